"""Rule-based rewards, rule-weight fitting, weighted sums, and the format rewards (think/answer, overlong)."""

import math
import time

import pytest
import torch

from tether.rewards import FunctionReward, RewardOutput, RewardSource, WeightedSum
from tether.rewards.format import (
    is_think_answer,
    soft_overlong_penalty,
    think_answer_format,
    think_answer_format_lenient,
)
from tether.rewards.rules import Proposition, RuleReward, fit_rule_weights, grade

# --- propositions and RuleReward ----------------------------------------------------------------------------

SORRY = Proposition("apologises", r"(?i)\bsorry\b")
SHORT = Proposition("short", lambda prompt, completion: len(completion) < 10)
ECHO = Proposition("echoes_prompt", lambda prompt, completion: prompt in completion)


def test_grade_regex_and_callable():
    phi = grade([SORRY, SHORT, ECHO], ["hi", "q"], ["Sorry!", "a long answer, q"])
    assert phi.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert grade([SORRY], [], []).shape == (0, 1)


def test_rule_reward_hand_numbers():
    # R = base + bias + w . phi with w = (-1, 0.5), bias 0.25:
    # "sorry" (apologises, short): 1 + 0.25 - 1 + 0.5 = 0.75;  "a long answer" (neither): 2 + 0.25 = 2.25
    base = FunctionReward(lambda p, c, r: [1.0, 2.0], name="rm")
    reward = RuleReward([SORRY, SHORT], [-1.0, 0.5], base=base, bias=0.25)
    out = reward(["p", "p"], ["sorry", "a long answer"], [{}, {}])
    assert torch.allclose(out.scores, torch.tensor([0.75, 2.25]))
    assert out.components["apologises"].tolist() == [1.0, 0.0]
    assert out.components["short"].tolist() == [1.0, 0.0]
    assert out.components["base"].tolist() == [1.0, 2.0]


def test_rule_reward_rejects_bad_configuration():
    with pytest.raises(ValueError, match="2 propositions but 1 weights"):
        RuleReward([SORRY, SHORT], [1.0])
    with pytest.raises(ValueError, match="unique"):
        RuleReward([SORRY, SORRY], [1.0, 1.0])


# --- fitting ------------------------------------------------------------------------------------------------


def test_fit_three_to_one_gives_ln3():
    # One proposition; it favours the chosen response in 3 pairs and the rejected one in 1, no RM margin:
    # maximise 3 log sigma(w) + log sigma(-w)  =>  sigma(w) = 3/4  =>  w = ln 3 = 1.0986
    chosen = torch.tensor([[1.0], [1.0], [1.0], [0.0]])
    rejected = torch.tensor([[0.0], [0.0], [0.0], [1.0]])
    w = fit_rule_weights(chosen, rejected, l2=0.0)
    assert w.shape == (1,) and w.item() == pytest.approx(math.log(3), abs=1e-8)


def test_fit_uses_rm_margin_as_offset():
    # Raters split 50/50 on a pair where the RM prefers A by ln 3 and phi(A) - phi(B) = 1: the likelihood
    # sigma(ln3 + w) * sigma(-(ln3 + w)) peaks at ln3 + w = 0, so the rule must cancel the RM: w = -ln 3.
    a, b = torch.tensor([[1.0]]), torch.tensor([[0.0]])
    chosen, rejected = torch.cat([a, b]), torch.cat([b, a])
    margin = torch.tensor([math.log(3), -math.log(3)], dtype=torch.float64)
    assert fit_rule_weights(chosen, rejected, margin, l2=0.0).item() == pytest.approx(-math.log(3), abs=1e-8)


def test_fit_matches_lbfgs_on_random_pairs():
    gen = torch.Generator().manual_seed(0)
    chosen = (torch.rand(40, 3, generator=gen) < 0.6).float()
    rejected = (torch.rand(40, 3, generator=gen) < 0.4).float()
    margin = torch.randn(40, generator=gen)
    l2 = 0.1
    w = fit_rule_weights(chosen, rejected, margin, l2=l2)
    d, m = (chosen - rejected).double(), margin.double()
    v = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(m + d @ v).sum() + 0.5 * l2 * (v * v).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(w, v.detach(), atol=1e-6)


def test_fit_stays_finite_when_a_rule_separates_perfectly():
    chosen, rejected = torch.ones(5, 1), torch.zeros(5, 1)
    w = fit_rule_weights(chosen, rejected, l2=1e-2)
    # stationarity: 5 (1 - sigma(w)) = 0.01 w
    assert torch.isfinite(w).all() and 5 * (1 - torch.sigmoid(w)) == pytest.approx(0.01 * w, abs=1e-8)


def test_fit_converges_where_large_base_margins_make_full_newton_steps_overshoot():
    """Margins of ±5 put p(1 − p) near 0 at w = 0: undamped Newton ran off to w = 3400; the damped fit stops where
    the gradient Σ_n −d_n (1 − σ(m_n + w d_n)) + l2 w is 0."""
    gen = torch.Generator().manual_seed(1)
    d = (torch.rand(200, 1, generator=gen) < 0.5).float() - (torch.rand(200, 1, generator=gen) < 0.5).float()
    margin = 5.0 * torch.sign(torch.randn(200, generator=gen))
    w = fit_rule_weights(d.clamp(min=0), (-d).clamp(min=0), margin, l2=1e-2)
    p = torch.sigmoid(margin.double() + d.double() @ w)
    assert abs(w.item()) < 10 and (-(d.double().T @ (1 - p)) + 1e-2 * w).abs().max() < 1e-8


# --- WeightedSum --------------------------------------------------------------------------------------------


class _Ensemble(RewardSource):
    name = "ensemble"

    def __call__(self, prompts, completions, records):
        return RewardOutput(scores=torch.tensor([1.0, -1.0]), std=torch.tensor([0.3, 0.4]))


def test_weighted_sum_hand_numbers_and_components():
    helpful = FunctionReward(lambda p, c, r: [2.0, 0.0], name="helpful_fn")
    harmless = RuleReward([SORRY], [1.5])
    total = WeightedSum({"helpful": helpful, "harmless": harmless, "rm": _Ensemble()},
                        {"helpful": 1.0, "harmless": 0.5, "rm": 2.0})
    out = total(["p", "p"], ["sorry", "sure"], [{}, {}])
    # row 0: 1*2 + 0.5*1.5 + 2*1 = 4.75;  row 1: 1*0 + 0.5*0 + 2*(-1) = -2
    assert torch.allclose(out.scores, torch.tensor([4.75, -2.0]))
    assert out.components["helpful"].tolist() == [2.0, 0.0]
    assert out.components["harmless"].tolist() == [1.5, 0.0]
    assert out.components["harmless/apologises"].tolist() == [1.0, 0.0]
    assert "helpful/helpful_fn" not in out.components
    # std: only the ensemble reports one: 2 * (0.3, 0.4)
    assert torch.allclose(out.std, torch.tensor([0.6, 0.8]))


def test_weighted_sum_default_weights_and_errors():
    a = FunctionReward(lambda p, c, r: [1.0], name="a")
    b = FunctionReward(lambda p, c, r: [2.0], name="b")
    out = WeightedSum({"a": a, "b": b})(["p"], ["c"], [{}])
    assert out.scores.tolist() == [3.0] and out.std is None
    with pytest.raises(ValueError, match="weights for"):
        WeightedSum({"a": a}, {"b": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        WeightedSum({})


# --- format rewards -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,strict,lenient",
    [
        ("<think>\n7*6=42\n</think>\n<answer>\n42\n</answer>", 1, 1),
        ("  <think>a</think><answer>b</answer>\n", 1, 1),
        ("<think>a</think> extra <answer>b</answer>", 0, 1),  # text between the blocks
        ("Sure! <think>a</think><answer>b</answer>", 0, 1),  # text before
        ("<think>a</think><answer>b</answer> bye", 0, 1),  # text after
        ("<think>a</think><answer>b</answer><answer>c</answer>", 0, 1),  # two answers
        ("<think>a<think>b</think><answer>c</answer>", 0, 1),  # nested think
        ("<think> </think><answer>b</answer>", 0, 1),  # empty think
        ("<answer>b</answer><think>a</think>", 0, 0),  # wrong order
        ("<think>a</think>", 0, 0),
        ("<think>a</think><answer>b", 0, 0),  # cut off
        ("", 0, 0),
    ],
)
def test_think_answer_format(text, strict, lenient):
    assert is_think_answer(text, strict=True) == bool(strict)
    assert is_think_answer(text, strict=False) == bool(lenient)


def test_format_reward_functions():
    completions = ["<think>a</think><answer>b</answer>", "x <think>a</think><answer>b</answer>", "b"]
    assert think_answer_format(["p"] * 3, completions, [{}] * 3) == [1.0, 0.0, 0.0]
    assert think_answer_format_lenient(["p"] * 3, completions, [{}] * 3) == [1.0, 1.0, 0.0]


def test_format_rewards_stay_fast_on_repeated_tags():
    # lazy regexes such as <think>.*?</think> rescan the text from every "<think>": ~15 s per text below
    texts = ["<think>" * 20000, "<think>a" + "</think>" * 20000, "<think></think><answer>" * 10000]
    start = time.monotonic()
    assert think_answer_format(["p"] * 3, texts, [{}] * 3) == [0.0, 0.0, 0.0]
    assert think_answer_format_lenient(["p"] * 3, texts, [{}] * 3) == [0.0, 0.0, 0.0]
    assert time.monotonic() - start < 5.0


def test_soft_overlong_penalty_hand_numbers():
    # L_max = 20, L_cache = 4: free up to 16; 17 -> (16-17)/4 = -0.25; 18 -> -0.5; 20 -> -1; beyond -> -1
    out = soft_overlong_penalty(torch.tensor([0, 10, 16, 17, 18, 20, 21, 100]), max_len=20, cache_len=4)
    assert out.dtype == torch.float32
    assert out.tolist() == [0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]


def test_soft_overlong_penalty_dapo_defaults_and_list_input():
    # DAPO: L_max = 20480, L_cache = 4096: 18432 tokens -> (16384 - 18432) / 4096 = -0.5
    assert soft_overlong_penalty([16384, 18432, 20480], 20480, 4096).tolist() == [0.0, -0.5, -1.0]
    assert soft_overlong_penalty([5, 6], max_len=5, cache_len=5).tolist() == [-1.0, -1.0]  # ramp spans 0..5


def test_soft_overlong_penalty_rejects_bad_lengths():
    for cache_len in (0, 21):
        with pytest.raises(ValueError, match="cache_len"):
            soft_overlong_penalty([1], max_len=20, cache_len=cache_len)
