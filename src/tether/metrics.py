"""Evaluation and diagnostic metrics of tether: plain functions, Python numbers out.

Diversity of samples (`distinct_n`, `repetition_rate`), health of a value model (`explained_variance`), calibration of
a reward model (`expected_calibration_error`), agreement of raters (`cohen_kappa`), best-of-N theory and its unbiased
estimate (`bon_kl`, `expected_max_normal`, `unbiased_bon_estimate`, docs/reference.md §Best-of-N and
over-optimisation), and the sequence-level KL that goes on the x-axis of reward-vs-KL plots (`sequence_kl`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import torch

from tether.kl import kl_k1
from tether.losses import masked_sum, masked_var

Tensor = torch.Tensor


def _ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[str] | Sequence[Sequence[Hashable]], n: int) -> float:
    """distinct-n (Li et al. 2016): distinct n-grams / all n-grams over the whole set of samples; 0 when there are none.

    samples: strings (split on whitespace) or token lists.
    """
    grams = [g for s in samples for g in _ngrams(s.split() if isinstance(s, str) else list(s), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(tokens: Sequence[Hashable], n: int) -> float:
    """Share of the n-grams of ONE sequence that repeat an earlier n-gram of it: 1 − distinct/total; 0 when too short.

    A degenerate "great great great great" has rate → 1; reward hacking by repetition shows up here first.
    """
    grams = _ngrams(list(tokens), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 − Var[R − V] / Var[R] over the masked tokens: 1 perfect critic, 0 no better than a constant, < 0 worse.

    NaN when the returns do not vary. Shapes: values, returns, mask (B, T).
    """
    var_returns = masked_var(returns, mask)
    if float(var_returns) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_returns)


def expected_calibration_error(probs: Sequence[float] | Tensor, labels: Sequence[int] | Tensor, bins: int = 10) -> float:
    """ECE = Σ_b (n_b/N)·|mean p in bin b − frequency of label 1 in bin b| (Naeini et al. 2015; Guo et al. 2017).

    probs: predicted probability of the event (for a reward model, σ(r_w − r_l) that the first response is the
    preferred one); labels: 1 when it happened. Equal-width bins on [0, 1]: bin b holds b/bins < p ≤ (b+1)/bins,
    p = 0 in the first bin. Shapes: (N,) -> float.
    """
    p = torch.as_tensor(probs, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels, dtype=torch.float64).flatten()
    idx = (torch.ceil(p * bins).long() - 1).clamp(0, bins - 1)  # (N,)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += float(sel.sum()) / len(p) * abs(float(p[sel].mean() - y[sel].mean()))
    return ece


def cohen_kappa(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> float:
    """Cohen's κ = (p_o − p_e)/(1 − p_e): agreement of two raters beyond chance (Cohen 1960).

    p_o share of items labelled alike; p_e = Σ_c P_a(c)·P_b(c). NaN when p_e = 1 (both raters use one same label).
    """
    if len(labels_a) != len(labels_b) or not labels_a:
        raise ValueError("cohen_kappa needs two equally long, non-empty label lists")
    n = len(labels_a)
    p_o = sum(a == b for a, b in zip(labels_a, labels_b)) / n
    count_a, count_b = Counter(labels_a), Counter(labels_b)
    p_e = sum(count_a[c] * count_b[c] for c in count_a) / n**2
    return float("nan") if p_e == 1.0 else (p_o - p_e) / (1.0 - p_e)


def bon_kl(n: int) -> float:
    """KL(π_bon ‖ π) = log n − (n−1)/n (Stiennon et al. 2020; an upper bound for discrete outputs),
    docs/reference.md §Best-of-N and over-optimisation."""
    return math.log(n) - (n - 1) / n


def expected_max_normal(n: int, points: int = 20001, limit: float = 10.0) -> float:
    """E[max of n iid N(0,1)] = ∫ x · n φ(x) Φ(x)^{n−1} dx by the trapezoid rule on [−limit, limit].

    The proxy reward gained by best-of-n under a N(0,1) proxy, docs/reference.md §Best-of-N and over-optimisation
    (2: 0.564, 4: 1.029, 8: 1.424).
    """
    x = torch.linspace(-limit, limit, points, dtype=torch.float64)
    phi = torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    density = n * phi * torch.special.ndtr(x) ** (n - 1)
    return float(torch.trapezoid(x * density, x))


def unbiased_bon_estimate(proxy: Sequence[float], gold: Sequence[float], n: int) -> float:
    """E[gold(best-of-n by proxy)] from N ≥ n samples, without resampling (Nakano et al. 2021; Gao et al. 2022):
    sort ascending by proxy, E = Σ_{k=n}^{N} C(k−1, n−1)/C(N, n) · gold(x_(k))
    (docs/reference.md §Best-of-N and over-optimisation).

    C(k−1, n−1)/C(N, n) is the probability that x_(k) is the proxy-best of a uniformly drawn n-subset. Ties in the
    proxy are broken by sample order. Weights in log space (lgamma) so N in the thousands is fine.
    """
    N = len(proxy)
    if len(gold) != N or not 1 <= n <= N:
        raise ValueError(f"need 1 <= n <= N and as many gold as proxy values (n={n}, N={N}, gold={len(gold)})")
    order = sorted(range(N), key=lambda i: proxy[i])

    def log_comb(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    log_total = log_comb(N, n)
    return sum(math.exp(log_comb(k - 1, n - 1) - log_total) * gold[order[k - 1]] for k in range(n, N + 1))


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Sequence KL estimate Σ_t k1 = Σ_t (log πθ − log πref) over response tokens (the x-axis of reward-vs-KL).

    Shapes: logprobs, ref_logprobs, mask (B, T) -> (B,).
    """
    return masked_sum(kl_k1(logprobs, ref_logprobs), mask, dim=-1)


def bon_kl_discrete(masses: Sequence[float], n: int) -> float:
    """Exact KL(π_bon ‖ π) of best-of-n over a discrete π, from the probability masses of its reward levels
    sorted ascending by reward (outputs of equal reward form one level; ties are broken uniformly at random).

    With F_j = Σ_{i≤j} q_i, best-of-n lands on level j with probability F_j^n − F_{j−1}^n and, within a level, on each
    output in proportion to π, so KL = Σ_j (F_j^n − F_{j−1}^n) · log((F_j^n − F_{j−1}^n) / q_j). For K equally likely
    distinct levels it tends to log n − (n−1)/n (`bon_kl`) as K → ∞ and stays below it: the bound of
    docs/reference.md §Best-of-N and over-optimisation is reached only when no two outputs tie. Zero-mass levels are
    skipped.
    """
    total = float(sum(masses))
    kl, below = 0.0, 0.0  # below: F_{j−1}
    for q in masses:
        q = q / total
        if q <= 0:
            continue
        upper = min(1.0, below + q)
        p_bon = upper**n - below**n
        if p_bon > 0:
            kl += p_bon * math.log(p_bon / q)
        below = upper
    return kl


def bon_kl_empirical(scores: Sequence[float], n: int) -> float:
    """`bon_kl_discrete` of the empirical distribution of N samples of ONE prompt: each distinct score is a level
    with mass count/N. Duplicate samples (a peaked policy) show up as ties and lower it below log n − (n−1)/n; with
    N distinct samples it is the KL of best-of-n from those N, which approaches the analytic value as N grows.
    """
    counts = Counter(float(s) for s in scores)
    return bon_kl_discrete([counts[s] for s in sorted(counts)], n)
