"""Tests of tether.advantages: hand-computed numbers and slow Python loops against the implemented versions."""

import math
import statistics

import pytest
import torch

from tether import advantages as A


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def random_mask(gen, B, T):
    """Right-padded response masks of random lengths 0..T (row 0 always empty, row 1 always full)."""
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0], lengths[1] = 0, T
    return (torch.arange(T)[None, :] < lengths[:, None]).double()


# --- per-token rewards ----------------------------------------------------------------------------------------------
def test_kl_penalized_rewards_by_hand():
    # β = 0.1; row 0 has 3 response tokens, row 1 has 2, row 2 none
    kl = t([0.5, -0.2, 1.0, 7.0], [0.3, 0.3, 9.0, 9.0], [4.0, 4.0, 4.0, 4.0])
    mask = t([1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    rewards = A.kl_penalized_rewards(t(2.0, -1.0, 5.0), kl, mask, beta=0.1)
    expected = t([-0.05, 0.02, -0.1 + 2.0, 0.0], [-0.03, -0.03 - 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(rewards, expected)


def test_kl_penalized_rewards_beta_zero_is_the_score_at_eos():
    mask = t([0.0, 1.0, 1.0, 0.0])  # (1, 4), a leading masked position (e.g. left padding) too
    rewards = A.kl_penalized_rewards(t(3.0), t([1.0, 2.0, 3.0, 4.0]), mask, beta=0.0)
    assert rewards.tolist() == [[0.0, 0.0, 3.0, 0.0]]


# --- GAE ------------------------------------------------------------------------------------------------------------
def gae_loop(rewards, values, mask, gamma, lam):
    """Plain GAE per row over the real tokens only, V after the last real token = 0."""
    B, T = rewards.shape
    adv, ret = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        steps = [i for i in range(T) if mask[b, i]]
        last = 0.0
        for k in reversed(range(len(steps))):
            i = steps[k]
            next_v = float(values[b, steps[k + 1]]) if k + 1 < len(steps) else 0.0
            delta = float(rewards[b, i]) + gamma * next_v - float(values[b, i])
            last = delta + gamma * lam * last
            adv[b, i], ret[b, i] = last, last + float(values[b, i])
    return adv, ret


def test_gae_three_tokens_by_hand():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], γ = 1, λ = 0.95, V after EOS = 0
    # δ2 = 1 + 0 − 0.7 = 0.3;  δ1 = 0 + 0.7 − 0.6 = 0.1;  δ0 = 0 + 0.6 − 0.5 = 0.1
    # Â2 = 0.3;  Â1 = 0.1 + 0.95·0.3 = 0.385;  Â0 = 0.1 + 0.95·0.385 = 0.46575
    rewards, values = t([0.0, 0.0, 1.0, 0.0]), t([0.5, 0.6, 0.7, 9.0])  # (1, 4)
    mask = t([1.0, 1.0, 1.0, 0.0])
    adv, ret = A.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv[0], t(0.46575, 0.385, 0.3, 0.0))
    torch.testing.assert_close(ret[0], t(0.96575, 0.985, 1.0, 0.0))
    # γ = 0.9, λ = 1: δ2 = 0.3, δ1 = 0.9·0.7 − 0.6 = 0.03, δ0 = 0.9·0.6 − 0.5 = 0.04
    # Â2 = 0.3, Â1 = 0.03 + 0.9·0.3 = 0.3, Â0 = 0.04 + 0.9·0.3 = 0.31 (= discounted return 0.81 − V0 0.5)
    adv, _ = A.gae(rewards, values, mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv[0], t(0.31, 0.3, 0.3, 0.0))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 1.0)])
def test_gae_equals_python_loop_on_random_inputs(gamma, lam):
    gen = torch.Generator().manual_seed(10)
    B, T = 8, 12
    rewards, values = torch.randn(B, T, generator=gen, dtype=torch.float64), torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, B, T)
    mask[2, 0:3] = 0.0  # left padding
    mask[3, 5] = 0.0  # a gap inside a response (e.g. a tool output not trained on)
    adv, ret = A.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert adv[0].abs().sum().item() == 0.0  # the empty row


# --- group estimators -----------------------------------------------------------------------------------------------
def test_grpo_advantages_by_hand_sample_std():
    # group [1, 0, 0, 0]: mean 0.25, sample std √((0.5625 + 3·0.0625)/3) = 0.5 -> 0.75/0.5 = 1.5, −0.25/0.5 = −0.5
    # group [2, 2, 2, 2]: all equal -> 0 everywhere (eps keeps it finite)
    adv = A.grpo_advantages(t(1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0), group_size=4, eps=0.0001)
    expected = t(0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0.0, 0.0, 0.0, 0.0)
    torch.testing.assert_close(adv, expected)
    assert A.grpo_advantages(t(3.0, 5.0), group_size=1).tolist() == [0.0, 0.0]  # group of one


def test_dr_grpo_and_rloo_by_hand():
    scores = t(1.0, 0.0, 0.0, 0.0)
    torch.testing.assert_close(A.dr_grpo_advantages(scores, 4), t(0.75, -0.25, -0.25, -0.25))
    # leave-one-out: 1 − mean(0, 0, 0) = 1; 0 − mean(1, 0, 0) = −1/3; and 4/3·(r − 0.25) gives the same
    torch.testing.assert_close(A.rloo_advantages(scores, 4), t(1.0, -1 / 3, -1 / 3, -1 / 3))
    torch.testing.assert_close(A.rloo_advantages(t(2.0, 5.0), 2), t(-3.0, 3.0))
    with pytest.raises(ValueError):
        A.rloo_advantages(scores, 1)
    with pytest.raises(ValueError):
        A.grpo_advantages(scores, 3)  # 4 rows are not whole groups of 3


def group_loop(scores, G, fn):
    out = []
    for start in range(0, len(scores), G):
        group = scores[start : start + G]
        out += [fn(i, group) for i in range(G)]
    return torch.tensor(out, dtype=torch.float64)


def test_group_estimators_equal_slow_loops():
    gen = torch.Generator().manual_seed(11)
    G = 5
    scores = torch.randn(4 * G, generator=gen, dtype=torch.float64).tolist()
    eps = 1e-4
    grpo = group_loop(scores, G, lambda i, g: (g[i] - statistics.mean(g)) / (statistics.stdev(g) + eps))
    dr = group_loop(scores, G, lambda i, g: g[i] - statistics.mean(g))
    rloo = group_loop(scores, G, lambda i, g: g[i] - statistics.mean(g[:i] + g[i + 1 :]))
    s = torch.tensor(scores, dtype=torch.float64)
    torch.testing.assert_close(A.grpo_advantages(s, G, eps), grpo)
    torch.testing.assert_close(A.dr_grpo_advantages(s, G), dr)
    torch.testing.assert_close(A.rloo_advantages(s, G), rloo)


def test_reinforce_pp_by_hand():
    # rewards (β KL already in): row 0 [−0.1, −0.1, 1.9], row 1 [−0.2, 0.8, pad]
    # return-to-go: row 0 [1.7, 1.8, 1.9], row 1 [0.6, 0.8]; mean over 5 tokens 6.8/5 = 1.36
    # unbiased var: (0.1156 + 0.1936 + 0.2916 + 0.5776 + 0.3136)/4 = 0.373
    rewards = t([-0.1, -0.1, 1.9], [-0.2, 0.8, 5.0])
    mask = t([1.0, 1.0, 1.0], [1.0, 1.0, 0.0])
    adv = A.reinforce_pp_advantages(rewards, mask)
    to_go = t([1.7, 1.8, 1.9], [0.6, 0.8, 1.36])
    expected = (to_go - 1.36) / math.sqrt(0.373 + 1e-8) * mask
    torch.testing.assert_close(adv, expected)


def test_reinforce_pp_equals_loop_on_random_inputs():
    gen = torch.Generator().manual_seed(12)
    B, T, gamma = 6, 9, 0.97
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, B, T)
    to_go = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        running = 0.0
        for i in reversed(range(T)):
            if mask[b, i]:
                running = float(rewards[b, i]) + gamma * running
                to_go[b, i] = running
    real = [float(to_go[b, i]) for b in range(B) for i in range(T) if mask[b, i]]
    mean, std = statistics.mean(real), statistics.stdev(real)
    expected = torch.where(mask > 0, (to_go - mean) / math.sqrt(std**2 + 1e-8), torch.zeros_like(to_go))
    torch.testing.assert_close(A.reinforce_pp_advantages(rewards, mask, gamma=gamma), expected)


def test_advantage_registry():
    spec = A.ADVANTAGE_ESTIMATORS["grpo"]
    assert spec.fn is A.grpo_advantages and not spec.per_token
    assert A.ADVANTAGE_ESTIMATORS["reinforce_pp"].per_token
    assert set(A.ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce_pp"}
    # RLOO on the sequence return: KL-penalised token rewards summed per row (docs/reference.md §Group policy gradients)
    mask = t([1.0, 1.0], [1.0, 1.0])
    rewards = A.kl_penalized_rewards(t(1.0, 0.0), t([1.0, 1.0], [0.0, 0.0]), mask, beta=0.5)
    returns = rewards.sum(-1)  # [1 − 0.5·2, 0] = [0, 0]
    assert A.ADVANTAGE_ESTIMATORS["rloo"].fn(returns, 2).tolist() == [0.0, 0.0]


# --- process supervision --------------------------------------------------------------------------------------------
def test_process_advantages_by_hand():
    # group of 2: response 0 has steps rewarded [1, 0] ending at tokens 1 and 3; response 1 one step [0] ending at 2
    # pooled [1, 0, 0]: mean 1/3, sample std √(1/3) = 0.5774 -> normalised 1 -> 1.1547, 0 -> −0.5774
    # response 0: tokens 0–1 get 1.1547 − 0.5774 = 0.5774, tokens 2–3 get −0.5774
    # response 1: tokens 0–2 get −0.5774, token 3 (after its last step, and masked) 0
    mask = t([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0])
    adv = A.process_advantages([[1.0, 0.0], [0.0]], [[1, 3], [2]], mask, group_size=2, eps=0.0)
    s = 1 / math.sqrt(3)
    expected = torch.tensor([[s, s, -s, -s], [-s, -s, -s, 0.0]], dtype=torch.float32)
    torch.testing.assert_close(adv, expected)


def test_process_advantages_equal_loop_and_validate_layout():
    gen = torch.Generator().manual_seed(13)
    G, T = 3, 10
    mask = torch.ones(2 * G, T)
    step_rewards, ends = [], []
    for _ in range(2 * G):
        n = int(torch.randint(1, 4, (1,), generator=gen))
        step_rewards.append(torch.rand(n, generator=gen).tolist())
        ends.append(sorted(torch.randperm(T, generator=gen)[:n].tolist()))
    adv = A.process_advantages(step_rewards, ends, mask, group_size=G)
    for i in range(2 * G):
        pooled = [r for j in range(i // G * G, i // G * G + G) for r in step_rewards[j]]
        mean, std = statistics.mean(pooled), statistics.stdev(pooled)
        for tok in range(T):
            want = sum((r - mean) / (std + 1e-4) for r, e in zip(step_rewards[i], ends[i]) if e >= tok)
            assert adv[i, tok].item() == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError):
        A.process_advantages([[1.0]], [[10]], torch.ones(1, 10), group_size=1)  # end beyond the response
    with pytest.raises(ValueError):
        A.process_advantages([[1.0, 0.0]], [[3]], torch.ones(1, 10), group_size=1)  # 2 rewards, 1 end
