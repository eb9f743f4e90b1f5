"""Tests of tether.metrics against hand-computed numbers, docs/reference.md tables and brute force."""

import itertools
import math
import random

import pytest
import torch

from tether import metrics as M


def test_distinct_n_by_hand():
    # "the cat the cat" + "the dog": unigrams the×3, cat×2, dog -> 3 distinct / 6; bigrams (the cat)×2, (cat the),
    # (the dog) -> 3 distinct / 4
    texts = ["the cat the cat", "the dog"]
    assert M.distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert M.distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert M.distinct_n([[1, 2, 3], [1, 2]], 2) == pytest.approx(2 / 3)  # (1,2) twice, (2,3)
    assert M.distinct_n(["one"], 2) == 0.0


def test_repetition_rate_by_hand():
    assert M.repetition_rate([1, 2, 3, 4], 1) == 0.0
    assert M.repetition_rate(["great"] * 5, 1) == pytest.approx(0.8)  # 1 distinct of 5
    # bigrams (1,2) (2,1) (1,2) (2,1) (1,2): 2 distinct of 5 -> 0.6
    assert M.repetition_rate([1, 2, 1, 2, 1, 2], 2) == pytest.approx(0.6)
    assert M.repetition_rate([7], 2) == 0.0


def test_explained_variance_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert M.explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    assert M.explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)
    # V = [1, 1, 1]: residual [0, 1, 2] has var 1, returns var 1 -> 0; V = [3, 2, 1]: residual [−2, 0, 2] var 4 -> −3
    assert M.explained_variance(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), returns, mask) == pytest.approx(0.0)
    assert M.explained_variance(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), returns, mask) == pytest.approx(-3.0)
    assert math.isnan(M.explained_variance(returns, torch.ones_like(returns), mask))


def test_expected_calibration_error_by_hand():
    # 2 bins: [0.1, 0.2] mean 0.15 vs frequency 0.5 -> 0.35·2/4; [0.8, 0.9] mean 0.85 vs 1 -> 0.15·2/4; ECE 0.25
    assert M.expected_calibration_error([0.1, 0.2, 0.8, 0.9], [0, 1, 1, 1], bins=2) == pytest.approx(0.25)
    # perfectly calibrated: p = 0.25 with one success in four, p = 0.75 with three in four
    probs, labels = [0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0]
    assert M.expected_calibration_error(probs, labels) == pytest.approx(0.0)
    # bin edges: p = 0.5 falls in the lower of 2 bins, p = 0 in the first
    assert M.expected_calibration_error([0.0, 0.5, 1.0], [0, 0, 1], bins=2) == pytest.approx(2 / 3 * 0.25)


def test_cohen_kappa_by_hand():
    # p_o = 4/5; P_a(1) = 3/5, P_b(1) = 2/5 -> p_e = 0.6·0.4 + 0.4·0.6 = 0.48; κ = 0.32/0.52 = 0.6154
    assert M.cohen_kappa([1, 1, 0, 0, 1], [1, 0, 0, 0, 1]) == pytest.approx(0.32 / 0.52)
    assert M.cohen_kappa(["a", "b", "c"], ["a", "b", "c"]) == pytest.approx(1.0)
    assert M.cohen_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert math.isnan(M.cohen_kappa([1, 1], [1, 1]))


@pytest.mark.parametrize("n,value", [(2, 0.193), (4, 0.636), (8, 1.204), (16, 1.835), (64, 3.175), (256, 4.549)])
def test_bon_kl_table(n, value):
    assert M.bon_kl(n) == pytest.approx(value, abs=5e-4)


@pytest.mark.parametrize("n,value", [(2, 0.564), (4, 1.029), (8, 1.424), (16, 1.766), (64, 2.344)])
def test_expected_max_normal_table(n, value):
    assert M.expected_max_normal(n) == pytest.approx(value, abs=5e-4)


def test_expected_max_normal_closed_forms():
    assert M.expected_max_normal(1) == pytest.approx(0.0, abs=1e-9)
    assert M.expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), abs=1e-8)  # 0.5642
    assert M.expected_max_normal(3) == pytest.approx(1.5 / math.sqrt(math.pi), abs=1e-8)  # 0.8463


def brute_force_bon(proxy, gold, n):
    subsets = list(itertools.combinations(range(len(proxy)), n))
    return sum(gold[max(s, key=lambda i: (proxy[i], i))] for s in subsets) / len(subsets)


def test_unbiased_bon_estimate_equals_brute_force():
    rng = random.Random(0)
    proxy = [rng.gauss(0, 1) for _ in range(9)]
    gold = [p + rng.gauss(0, 1) for p in proxy]
    for n in (1, 2, 3, 5, 9):
        assert M.unbiased_bon_estimate(proxy, gold, n) == pytest.approx(brute_force_bon(proxy, gold, n), rel=1e-12)
    assert M.unbiased_bon_estimate(proxy, gold, 1) == pytest.approx(sum(gold) / 9)  # n = 1: the plain mean
    # by hand, N = 3, n = 2: sorted gold [g1, g2, g3] -> (C(1,1) g2 + C(2,1) g3)/C(3,2) = (g2 + 2 g3)/3
    assert M.unbiased_bon_estimate([0.3, 0.1, 0.2], [30.0, 10.0, 20.0], 2) == pytest.approx((20.0 + 2 * 30.0) / 3)
    with pytest.raises(ValueError):
        M.unbiased_bon_estimate([0.1], [1.0], 2)


def test_unbiased_bon_estimate_large_n_is_finite():
    rng = random.Random(1)
    proxy = [rng.gauss(0, 1) for _ in range(2000)]
    # gold = proxy: the estimate is E[max of 64 of these], close to the N(0,1) value 2.344
    assert M.unbiased_bon_estimate(proxy, proxy, 64) == pytest.approx(2.344, abs=0.15)


def test_sequence_kl_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 5.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.5], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # row 0: 0.5 − 1 + 0.5 = 0; row 1: 1 + 0 (third token masked) = 1
    assert M.sequence_kl(logprobs, ref, mask).tolist() == [0.0, 1.0]


def test_bon_kl_discrete_by_hand():
    # two equally likely levels, n = 2: best-of-2 is low with prob 0.25, high with 0.75
    # KL = 0.25·log(0.25/0.5) + 0.75·log(0.75/0.5) = −0.1733 + 0.3041 = 0.1308
    assert M.bon_kl_discrete([0.5, 0.5], 2) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-12)
    assert M.bon_kl_discrete([0.5, 0.5], 2) == pytest.approx(0.1308, abs=1e-4)
    assert M.bon_kl_discrete([3.0, 1.0], 1) == 0.0  # n = 1 is the policy itself
    assert M.bon_kl_discrete([1.0], 16) == 0.0  # every output ties: best-of-n changes nothing
    assert M.bon_kl_discrete([0.5, 0.0, 0.5], 2) == pytest.approx(M.bon_kl_discrete([0.5, 0.5], 2))  # empty level
    assert M.bon_kl_discrete([2, 2], 2) == pytest.approx(M.bon_kl_discrete([0.5, 0.5], 2))  # masses are normalised


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_bon_kl_discrete_reaches_the_analytic_bound_without_ties(n):
    many = M.bon_kl_discrete([1.0] * 100_000, n)
    assert many == pytest.approx(M.bon_kl(n), abs=1e-3)
    assert M.bon_kl_discrete([1.0] * 10, n) < many  # few distinct outputs: below the bound


def test_bon_kl_empirical_counts_ties():
    # scores 1, 1, 2, 2: the same two half-mass levels as above, whatever the order
    assert M.bon_kl_empirical([2.0, 1.0, 2.0, 1.0], 2) == pytest.approx(M.bon_kl_discrete([0.5, 0.5], 2))
    assert M.bon_kl_empirical([0.3] * 8, 4) == 0.0
    # 1,000 distinct scores: within 0.01 of log n − (n−1)/n
    assert M.bon_kl_empirical([i / 1000 for i in range(1000)], 8) == pytest.approx(1.204, abs=0.01)
