"""Tests of tether.losses against hand-computed numbers (docs/reference.md) and naive reference loops."""

import itertools
import math

import pytest
import torch

from tether import losses as L

LN2 = math.log(2.0)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# --- token log-probs and masked reductions --------------------------------------------------------------------------
def test_logprobs_from_logits_matches_log_softmax_with_temperature():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen)
    tokens = torch.randint(0, 11, (3, 5), generator=gen)
    for temperature in (1.0, 0.7):
        expected = torch.log_softmax(logits / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
        torch.testing.assert_close(L.logprobs_from_logits(logits, tokens, temperature), expected)


def test_logprobs_from_logits_hand_numbers_and_bf16_upcast():
    # logits [0, ln 3] -> probabilities [1/4, 3/4]; at T = 0.5 the logits double: [0, ln 9] -> [1/10, 9/10]
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert L.logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert L.logprobs_from_logits(logits, torch.tensor([[0]]), 0.5).item() == pytest.approx(math.log(0.1), abs=1e-6)
    out = L.logprobs_from_logits(logits.bfloat16(), torch.tensor([[1]]))
    assert out.dtype == torch.float32


def test_logprobs_from_logits_gradient_equals_log_softmax_gradient():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 4), generator=gen)
    (g1,) = torch.autograd.grad(L.logprobs_from_logits(logits, tokens).sum(), logits)
    ref = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).sum()
    (g2,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g1, g2)


def test_entropy_from_logits():
    # uniform over 4 -> ln 4; probabilities [1/4, 3/4] -> −(¼ ln ¼ + ¾ ln ¾) = 0.5623
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0]], [[0.0, math.log(3.0), -1e9, -1e9]]]).reshape(2, 1, 4)
    h = L.entropy_from_logits(logits)
    assert h.shape == (2, 1)
    assert h[0, 0].item() == pytest.approx(math.log(4.0), abs=1e-6)
    assert h[1, 0].item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)


def test_masked_reductions_by_hand():
    x = t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert L.masked_sum(x, mask).item() == 7.0  # 1 + 2 + 4
    assert L.masked_mean(x, mask).item() == pytest.approx(7 / 3)
    assert L.masked_mean(x, mask, dim=-1).tolist() == [1.5, 4.0]
    # values 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9; biased 42/27, unbiased 42/18
    assert L.masked_var(x, mask, unbiased=False).item() == pytest.approx(42 / 27)
    assert L.masked_var(x, mask).item() == pytest.approx(42 / 18)


def test_masked_reductions_ignore_nan_in_padding_and_empty_rows_give_zero():
    x = t([1.0, float("nan")], [float("inf"), float("nan")])
    mask = t([1.0, 0.0], [0.0, 0.0])
    assert L.masked_sum(x, mask).item() == 1.0
    assert L.masked_mean(x, mask, dim=-1).tolist() == [1.0, 0.0]
    assert L.masked_mean(x, torch.zeros(2, 2)).item() == 0.0


def test_masked_whiten():
    x = t([1.0, 2.0, 3.0, 99.0])
    mask = t([1.0, 1.0, 1.0, 0.0])
    # mean 2, unbiased var 1 -> [-1, 0, 1], padding 0
    torch.testing.assert_close(L.masked_whiten(x, mask, eps=0.0), t([-1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(L.masked_whiten(x, mask, shift_mean=False, eps=0.0), t([1.0, 2.0, 3.0, 0.0]))


def test_sequence_logprobs_sum_and_mean():
    logprobs = t([-1.0, -2.0, -3.0], [-4.0, -5.0, 0.0])
    mask = t([1.0, 1.0, 1.0], [1.0, 1.0, 0.0])
    assert L.sequence_logprobs(logprobs, mask).tolist() == [-6.0, -9.0]
    assert L.sequence_logprobs(logprobs, mask, average=True).tolist() == [-2.0, -4.5]


# --- SFT ------------------------------------------------------------------------------------------------------------
def test_sft_loss_by_hand_and_global_denominator():
    # two tokens with p = 3/4 and 1/4 (logits [0, ln 3]); the third label is −100 and ignored
    logits = torch.tensor([[[0.0, math.log(3.0)]] * 3])  # (1, 3, 2)
    labels = torch.tensor([[1, 0, -100]])
    nll_sum = -(math.log(0.75) + math.log(0.25))  # 1.6740
    loss, metrics = L.sft_loss(logits, labels)
    assert loss.item() == pytest.approx(nll_sum / 2, abs=1e-6)
    assert metrics["num_tokens"].item() == 2
    loss, _ = L.sft_loss(logits, labels, num_tokens=8)
    assert loss.item() == pytest.approx(nll_sum / 8, abs=1e-6)


def test_sft_loss_accumulation_over_unequal_micro_batches_equals_whole_batch():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, 9, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 9, (4, 6), generator=gen)
    labels[0, 1:] = -100  # micro-batch 1 (rows 0-1) has 1 + 6 tokens, micro-batch 2 (rows 2-3) has 12
    whole, _ = L.sft_loss(logits, labels)
    n = int((labels != -100).sum())
    parts = L.sft_loss(logits[:2], labels[:2], num_tokens=n)[0] + L.sft_loss(logits[2:], labels[2:], num_tokens=n)[0]
    torch.testing.assert_close(parts, whole)
    naive = (L.sft_loss(logits[:2], labels[:2])[0] + L.sft_loss(logits[2:], labels[2:])[0]) / 2
    assert abs(naive.item() - whole.item()) > 1e-3  # per-micro-batch means would be wrong


# --- reward models --------------------------------------------------------------------------------------------------
def test_bradley_terry_by_hand():
    # diff 1 and −1: losses −log σ(1) = 0.3133 and −log σ(−1) = 1.3133, mean 0.8133; accuracy 1/2
    loss, metrics = L.bradley_terry_loss(t(2.0, 0.0), t(1.0, 1.0))
    assert loss.item() == pytest.approx((-math.log(sig(1)) - math.log(sig(-1))) / 2)
    assert metrics["accuracy"].item() == 0.5
    assert metrics["margin"].item() == 0.0


def test_bradley_terry_margin_smoothing_weight():
    # margin 0.5 on diff 1: −log σ(0.5) = 0.4741
    loss, _ = L.bradley_terry_loss(t(1.0), t(0.0), margin=t(0.5))
    assert loss.item() == pytest.approx(-math.log(sig(0.5)))
    # ε = 0.1: −0.9 log σ(1) − 0.1 log σ(−1) = 0.9·0.3133 + 0.1·1.3133 = 0.4133
    loss, _ = L.bradley_terry_loss(t(1.0), t(0.0), label_smoothing=0.1)
    assert loss.item() == pytest.approx(-0.9 * math.log(sig(1)) - 0.1 * math.log(sig(-1)))
    # weights 3 and 1: (3·0.3133 + 1·1.3133)/4 = 0.5633
    loss, _ = L.bradley_terry_loss(t(1.0, 0.0), t(0.0, 1.0), weight=t(3.0, 1.0))
    assert loss.item() == pytest.approx((-3 * math.log(sig(1)) - math.log(sig(-1))) / 4)


def naive_ranking_loss(scores, ranking, valid):
    """InstructGPT by the book: loop over prompts, then over every pair (better, worse) of that prompt."""
    per_prompt = []
    for b in range(scores.shape[0]):
        order = [int(i) for i, v in zip(ranking[b], valid[b]) if v]
        pairs = list(itertools.combinations(order, 2))  # (better, worse): combinations keep ranking order
        if pairs:
            total = sum(-math.log(sig(float(scores[b, i] - scores[b, j]))) for i, j in pairs)
            per_prompt.append(total / math.comb(len(order), 2))
    return sum(per_prompt) / len(per_prompt)


def test_ranking_loss_by_hand_three_completions():
    # ranking 2 > 0 > 1, scores r0 = 1, r1 = 0, r2 = 3: pairs (2,0) diff 2, (2,1) diff 3, (0,1) diff 1; weight 1/3 each
    loss, metrics = L.ranking_loss(t([1.0, 0.0, 3.0]), torch.tensor([[2, 0, 1]]))
    expected = -(math.log(sig(2)) + math.log(sig(3)) + math.log(sig(1))) / 3
    assert loss.item() == pytest.approx(expected)
    assert metrics["accuracy"].item() == 1.0
    assert metrics["pairs"].item() == 3


def test_ranking_loss_equals_naive_pairwise_loop_with_padding():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    ranking = torch.stack([torch.randperm(4, generator=gen) for _ in range(5)])
    valid = torch.ones(5, 4, dtype=torch.bool)
    valid[1, 3] = False  # 3 completions: 3 pairs
    valid[2, 2:] = False  # 2 completions: 1 pair
    valid[3, 1:] = False  # 1 completion: no pair, left out
    ranking[2, 2:] = -1
    loss, _ = L.ranking_loss(scores, ranking, valid)
    assert loss.item() == pytest.approx(naive_ranking_loss(scores, ranking, valid), rel=1e-12)
    # and it is NOT the mean over all pairs treated as independent samples
    all_pairs = [(b, i, j) for b in range(5) for i, j in itertools.combinations(
        [int(x) for x, v in zip(ranking[b], valid[b]) if v], 2)]
    flat = sum(-math.log(sig(float(scores[b, i] - scores[b, j]))) for b, i, j in all_pairs) / len(all_pairs)
    assert abs(loss.item() - flat) > 1e-4


# --- DPO family -----------------------------------------------------------------------------------------------------
# policy chosen −10 vs ref −12 (+2), policy rejected −15 vs ref −14 (−1): h = 3, β = 0.1 -> βh = 0.3
PAIR = dict(chosen_logps=t(-10.0), rejected_logps=t(-15.0), ref_chosen_logps=t(-12.0), ref_rejected_logps=t(-14.0))


@pytest.mark.parametrize("fn", [L.dpo_sigmoid_loss, L.robust_dpo_loss])
def test_dpo_with_policy_equal_reference_is_ln2(fn):
    logps = t(-12.3, -40.0)
    rej = t(-11.0, -35.5)
    loss, metrics = fn(logps, rej, logps.clone(), rej.clone(), beta=0.1)
    assert loss.item() == pytest.approx(LN2, abs=1e-12)
    assert metrics["rewards/margins"].item() == 0.0


def test_rpo_nll_by_hand():
    # summed log-probs -6 over 3 tokens and -2 over 1 token: both -2 per token, so the NLL is 2
    assert L.rpo_nll(torch.tensor([-6.0, -2.0]), torch.tensor([3, 1])).item() == pytest.approx(2.0)
    assert L.rpo_nll(torch.tensor([0.0]), torch.tensor([0])).item() == 0.0  # an empty response counts as 1 token


def test_dpo_and_cdpo_by_hand():
    loss, metrics = L.dpo_sigmoid_loss(**PAIR, beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.3)))  # −log σ(0.3) = 0.5544
    assert metrics["rewards/chosen"].item() == pytest.approx(0.2)
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.1)
    assert metrics["rewards/margins"].item() == pytest.approx(0.3)
    assert metrics["rewards/accuracies"].item() == 1.0
    # cDPO ε = 0.2: −0.8 log σ(0.3) − 0.2 log σ(−0.3) = 0.8·0.5544 + 0.2·0.8544 = 0.6144
    loss, _ = L.dpo_sigmoid_loss(**PAIR, beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(-0.8 * math.log(sig(0.3)) - 0.2 * math.log(sig(-0.3)))


def test_robust_dpo_by_hand():
    # ε = 0.2: [−0.8 log σ(0.3) + 0.2 log σ(−0.3)] / 0.6 = (0.4435 − 0.1709)/0.6 = 0.4544
    loss, _ = L.robust_dpo_loss(**PAIR, beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx((-0.8 * math.log(sig(0.3)) + 0.2 * math.log(sig(-0.3))) / 0.6)
    # ε = 0 is plain DPO
    assert L.robust_dpo_loss(**PAIR, label_smoothing=0.0)[0].item() == pytest.approx(L.dpo_sigmoid_loss(**PAIR)[0].item())
    with pytest.raises(ValueError):
        L.robust_dpo_loss(**PAIR, label_smoothing=0.5)


def test_ipo_target_is_one_over_two_tau():
    # τ = 0.1 -> target h = 5: zero loss and zero gradient there; h = 3 gives (3 − 5)² = 4
    assert L.ipo_loss(**PAIR, beta=0.1)[0].item() == pytest.approx(4.0)
    chosen = t(-7.0).requires_grad_()  # log-ratio +5 vs reference −12, rejected log-ratio 0
    loss, _ = L.ipo_loss(chosen, t(-14.0), t(-12.0), t(-14.0), beta=0.1)
    (grad,) = torch.autograd.grad(loss, chosen)
    assert loss.item() == pytest.approx(0.0) and grad.item() == pytest.approx(0.0)
    assert L.ipo_loss(**PAIR, beta=0.25)[0].item() == pytest.approx((3 - 2) ** 2)  # target 1/(2·0.25) = 2


def test_hinge_by_hand():
    assert L.hinge_loss(**PAIR, beta=0.1)[0].item() == pytest.approx(0.7)  # max(0, 1 − 0.3)
    assert L.hinge_loss(**PAIR, beta=1.0)[0].item() == 0.0  # max(0, 1 − 3)


def test_simpo_length_normalisation_by_hand():
    # chosen: 4 tokens of −0.5 (sum −2), rejected: 2 tokens of −1.5 (sum −3); per-token means −0.5 and −1.5
    logprobs = t([-0.5, -0.5, -0.5, -0.5], [-1.5, -1.5, 0.0, 0.0])
    mask = t([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0])
    mean = L.sequence_logprobs(logprobs, mask, average=True)
    assert L.PREFERENCE_LOSSES["simpo"].logp_average and not L.PREFERENCE_LOSSES["simpo"].needs_reference
    loss, metrics = L.simpo_loss(mean[:1], mean[1:], beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(-math.log(sig(2.0 * (-0.5) - 2.0 * (-1.5) - 1.0)))  # −log σ(1) = 0.3133
    assert metrics["rewards/chosen"].item() == pytest.approx(-1.0)
    # doubling the chosen response (same per-token log-prob) changes nothing
    longer = L.sequence_logprobs(t([-0.5] * 8), t([1.0] * 8), average=True)
    assert L.simpo_loss(longer, mean[1:], beta=2.0, gamma=1.0)[0].item() == pytest.approx(loss.item())


def test_orpo_by_hand():
    # mean log-probs ln 0.5 (odds 1) and ln 0.2 (odds 1/4): log odds ratio ln 4; ratio term −log σ(ln 4) = −ln 0.8
    chosen, rejected = t(math.log(0.5)), t(math.log(0.2))
    loss, metrics = L.orpo_loss(chosen, rejected, lam=0.1)
    assert metrics["log_odds_ratio"].item() == pytest.approx(math.log(4.0))
    assert metrics["nll"].item() == pytest.approx(math.log(2.0))  # default NLL = −mean(chosen_logps)
    assert loss.item() == pytest.approx(math.log(2.0) - 0.1 * math.log(0.8))  # 0.6931 + 0.0223 = 0.7155
    loss, _ = L.orpo_loss(chosen, rejected, chosen_nll=t(1.0), lam=0.5)
    assert loss.item() == pytest.approx(1.0 - 0.5 * math.log(0.8))
    # near-certain responses stay finite: P = 1 − 1e-9
    loss, _ = L.orpo_loss(t(math.log1p(-1e-9)), t(math.log(0.5)))
    assert math.isfinite(loss.item())


def test_orpo_length_normalisation():
    # the same per-token log-prob at lengths 2 and 6 gives the same mean log-prob, hence the same odds
    short = L.sequence_logprobs(t([-0.3, -0.3]), t([1.0, 1.0]), average=True)
    long = L.sequence_logprobs(t([-0.3] * 6), t([1.0] * 6), average=True)
    rejected = t(-1.0)
    assert L.orpo_loss(short, rejected)[0].item() == pytest.approx(L.orpo_loss(long, rejected)[0].item())
    assert L.PREFERENCE_LOSSES["orpo"].logp_average and not L.PREFERENCE_LOSSES["orpo"].needs_reference


def test_kto_reference_point_by_hand():
    # r = +2 (desirable) and −1 (undesirable); mismatched KL pairs mean (0.5 + 1.5)/2 = 1 -> z0 = 1; β = 0.5
    logps, ref = t(-8.0, -11.0), t(-10.0, -10.0)
    desirable = torch.tensor([True, False])
    kl_logps, ref_kl = t(-9.5, -8.5), t(-10.0, -10.0)
    loss, metrics = L.kto_loss(logps, ref, desirable, kl_logps, ref_kl, beta=0.5, undesirable_weight=2.0)
    d = 1 - sig(0.5 * (2 - 1))  # 1 − σ(0.5) = 0.3775
    u = 2.0 * (1 - sig(0.5 * (1 - (-1))))  # 2(1 − σ(1)) = 0.5379
    assert loss.item() == pytest.approx((d + u) / 2)
    assert metrics["kl"].item() == pytest.approx(1.0)
    assert metrics["rewards/chosen"].item() == pytest.approx(1.0)  # β·r = 0.5·2
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.5)


def test_kto_reference_point_clamped_at_zero_and_detached():
    # mismatched KL estimate −2 -> z0 = max(0, −2) = 0: loss 1 − σ(0.5·2)
    loss, metrics = L.kto_loss(t(-8.0), t(-10.0), torch.tensor([True]), t(-12.0), t(-10.0), beta=0.5)
    assert metrics["kl"].item() == 0.0
    assert loss.item() == pytest.approx(1 - sig(0.5 * 2))
    # z0 = 1 > 0: no gradient reaches the mismatched log-probs, the policy log-probs get one
    logps, kl_logps = t(-8.0).requires_grad_(), t(-9.0).requires_grad_()
    loss, _ = L.kto_loss(logps, t(-10.0), torch.tensor([True]), kl_logps, t(-10.0), beta=0.5)
    grads = torch.autograd.grad(loss, [logps, kl_logps], allow_unused=True)
    assert grads[0].item() == pytest.approx(-0.5 * sig(0.5) * (1 - sig(0.5)))  # d(1 − σ(β(r − z0)))/dr
    assert grads[1] is None


def test_preference_registry_calls_every_loss_by_its_spec():
    logprobs = torch.randn(4, 2, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.float64)
    hparams = {"beta": 0.1, "label_smoothing": 0.1, "gamma": 0.5, "lam": 0.1,
               "desirable_weight": 1.0, "undesirable_weight": 1.0}
    for name, spec in L.PREFERENCE_LOSSES.items():
        seq = L.sequence_logprobs(logprobs[:, 0] - 1.0, mask, average=spec.logp_average)  # policy
        ref = L.sequence_logprobs(logprobs[:, 1] - 1.0, mask, average=spec.logp_average)
        kw = {h: hparams[h] for h in spec.hparams}
        if not spec.paired:
            loss, metrics = spec.fn(seq, ref, torch.tensor([True, False, True, False]), seq.roll(1), ref.roll(1), **kw)
        elif spec.needs_reference:
            loss, metrics = spec.fn(seq[:2], seq[2:], ref[:2], ref[2:], **kw)
        else:
            loss, metrics = spec.fn(seq[:2], seq[2:], **kw)
        assert loss.dim() == 0 and math.isfinite(loss.item()), name
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins"} <= metrics.keys(), name


# --- aggregation ----------------------------------------------------------------------------------------------------
def test_aggregations_by_hand_with_a_fully_masked_row():
    x = t([1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0])
    mask = t([1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    # token-mean: (1+2+3+4+10)/5 = 4
    assert L.AGGREGATIONS["token-mean"](x, mask).item() == pytest.approx(4.0)
    # seq-mean-token-mean: rows 2.5 and 10, the empty row left out -> 6.25
    assert L.AGGREGATIONS["seq-mean-token-mean"](x, mask).item() == pytest.approx(6.25)
    # seq-mean-token-sum-norm: 20 / (3 rows · 4 positions) = 5/3; with the constant 2 rows · 8 = 16: 1.25
    assert L.AGGREGATIONS["seq-mean-token-sum-norm"](x, mask).item() == pytest.approx(20 / 12)
    assert L.AGGREGATIONS["seq-mean-token-sum-norm"](x, mask, 16).item() == pytest.approx(1.25)
    for fn in L.AGGREGATIONS.values():
        out = fn(x, torch.zeros_like(mask))
        assert out.item() == 0.0  # nothing selected: 0, not NaN


def test_token_mean_global_denominator_splits_exactly():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    mask = (torch.rand(6, 5, generator=gen) > 0.4).double()
    for name in L.AGGREGATIONS:
        fn = L.AGGREGATIONS[name]
        whole = fn(x, mask)
        if name == "token-mean":
            den = mask.sum()
        elif name == "seq-mean-token-mean":
            den = (mask.sum(-1) > 0).sum()
        else:
            den = 6 * 5
        parts = fn(x[:2], mask[:2], den) + fn(x[2:], mask[2:], den)
        torch.testing.assert_close(parts, whole)


# --- PPO ------------------------------------------------------------------------------------------------------------
def ppo_one(logp, old, adv, **kw):
    return L.ppo_policy_loss(t([logp]), t([old]), t([adv]), t([1.0]), **kw)


def test_ppo_clipped_and_unclipped_regions_by_hand():
    e = math.e
    # ratio = e, Â = 1: clipped to 1.2, loss = −min(e, 1.2) = −1.2, clipfrac 1
    loss, m = ppo_one(1.0, 0.0, 1.0)
    assert loss.item() == pytest.approx(-1.2) and m["clipfrac"].item() == 1.0
    # ratio = e, Â = −1: −min(−e, −1.2) = e (the pessimistic, unclipped term), clipfrac 0
    loss, m = ppo_one(1.0, 0.0, -1.0)
    assert loss.item() == pytest.approx(e) and m["clipfrac"].item() == 0.0
    # ratio = e^0.1 = 1.1052 inside [0.8, 1.2], Â = 2: loss = −2.2103
    loss, m = ppo_one(0.1, 0.0, 2.0)
    assert loss.item() == pytest.approx(-2 * math.exp(0.1)) and m["clipfrac"].item() == 0.0
    # ratio = e^−1 = 0.3679, Â = −1: clipped to 0.8, loss = −min(−0.3679, −0.8) = 0.8
    loss, m = ppo_one(-1.0, 0.0, -1.0)
    assert loss.item() == pytest.approx(0.8) and m["clipfrac"].item() == 1.0
    # clip-higher (DAPO) ε_high = 0.28: ratio e, Â = 1 -> −1.28
    assert ppo_one(1.0, 0.0, 1.0, clip_high=0.28)[0].item() == pytest.approx(-1.28)


def test_ppo_metrics_and_gradient_by_hand():
    # ratio = e^0.5: approx_kl = (e^0.5 − 1) − 0.5 = 0.1487
    logp = t([0.5]).requires_grad_()
    loss, m = L.ppo_policy_loss(logp, t([0.0]), t([1.0]), t([1.0]), clip_low=1.0)
    assert m["approx_kl"].item() == pytest.approx(math.exp(0.5) - 1.5)
    assert m["ratio_mean"].item() == pytest.approx(math.exp(0.5))
    loss.backward()  # unclipped: d(−ρÂ)/dlogp = −ρ
    assert logp.grad.item() == pytest.approx(-math.exp(0.5))
    # clipped region: no gradient
    logp = t([1.0]).requires_grad_()
    L.ppo_policy_loss(logp, t([0.0]), t([1.0]), t([1.0]))[0].backward()
    assert logp.grad.item() == 0.0


def test_ppo_masked_tokens_and_fully_masked_rows():
    logp = t([0.1, 50.0], [60.0, -70.0]).requires_grad_()  # padding holds absurd log-probs
    old = torch.zeros(2, 2, dtype=torch.float64)
    adv = t([1.0, 1.0], [1.0, 1.0])
    mask = t([1.0, 0.0], [0.0, 0.0])
    for aggregation in L.AGGREGATIONS:
        loss, m = L.ppo_policy_loss(logp, old, adv, mask, aggregation=aggregation)
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), aggregation
        assert grad[1].abs().sum().item() == 0.0 and grad[0, 1].item() == 0.0
    loss, _ = L.ppo_policy_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx(-math.exp(0.1))


def test_value_loss_by_hand():
    # V = 1, V_old = 0.5, R = 0: clip(V) = 0.7; ½ max(1, 0.49) = 0.5 (unclipped term larger)
    loss, m = L.value_loss(t([1.0]), t([0.5]), t([0.0]), t([1.0]))
    assert loss.item() == pytest.approx(0.5) and m["vf_clipfrac"].item() == 0.0
    # V = 1, V_old = 0.5, R = 2: ½ max((1−2)², (0.7−2)²) = ½·1.69 = 0.845 (clipped term larger)
    loss, m = L.value_loss(t([1.0]), t([0.5]), t([2.0]), t([1.0]))
    assert loss.item() == pytest.approx(0.845) and m["vf_clipfrac"].item() == 1.0
    # no clipping: ½(1−2)² = 0.5
    assert L.value_loss(t([1.0]), t([0.5]), t([2.0]), t([1.0]), clip=None)[0].item() == pytest.approx(0.5)
    # token-mean over two tokens with one masked: only the first counts
    loss, _ = L.value_loss(t([1.0, 9.0]), t([1.0, 0.0]), t([0.0, 0.0]), t([1.0, 0.0]))
    assert loss.item() == pytest.approx(0.5)


def test_value_loss_gradient_zero_when_clipped_term_dominates():
    values = t([1.0]).requires_grad_()
    loss, _ = L.value_loss(values, t([0.5]), t([2.0]), t([1.0]))
    loss.backward()
    assert values.grad.item() == 0.0  # clip(V) = 0.7 is constant in V there
    values = t([1.0]).requires_grad_()
    L.value_loss(values, t([0.5]), t([0.0]), t([1.0]))[0].backward()
    assert values.grad.item() == pytest.approx(1.0)  # d ½(V−R)²/dV = V − R


def test_policy_loss_matches_torch_reference_on_random_batch():
    gen = torch.Generator().manual_seed(6)
    logp, old, adv = (torch.randn(4, 7, generator=gen, dtype=torch.float64) * 0.3 for _ in range(3))
    mask = (torch.rand(4, 7, generator=gen) > 0.3).double()
    ratio = torch.exp(logp - old)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
    expected = (per_token * mask).sum() / mask.sum()
    loss, _ = L.ppo_policy_loss(logp, old, adv, mask, clip_high=0.28)
    torch.testing.assert_close(loss, expected)
