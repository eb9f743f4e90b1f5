"""Loss functions of tether: pure functions of tensors that return `(loss, metrics)`.

Token log-probs and masked reductions, supervised NLL, Bradley-Terry reward-model losses, the DPO family of offline
preference losses (chosen by name through `PREFERENCE_LOSSES`), and the PPO clipped policy and value losses with the
loss aggregations of DAPO / GRPO / Dr. GRPO (chosen by name through `AGGREGATIONS`). Every formula cites the section
of docs/reference.md it implements; tests/test_losses.py checks each against hand-computed numbers.

Conventions: B batch, T tokens, V vocabulary, K completions per prompt. Masks are float or bool (B, T) with 1 on real
response tokens. Metrics are detached 0-dim tensors. Departures from the papers:
- `masked_mean` of an empty selection is 0, not NaN, so fully masked rows never poison a batch.
- Losses whose denominator is a count (`sft_loss`, the aggregations) accept that count from the caller: the engine
  passes the count of the whole global batch so that micro-batch losses add up to the global-batch loss exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# --- token log-probs and masked reductions --------------------------------------------------------------------------
def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision logits (logsumexp in bf16 loses digits), float64 kept as it is."""
    return torch.promote_types(x.dtype, torch.float32)


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log π(token) = z[token] − logsumexp(z) with z = logits / temperature.

    Shapes: logits (B, T, V), tokens (B, T) -> (B, T), float32 (float64 for float64 logits).
    Gather minus logsumexp keeps no (B, T, V) log-softmax copy alive for backward, and going one row at a time bounds
    the logsumexp temporaries to (T, V). The temperature must be the sampling temperature (docs/reference.md §PPO:
    the loss's log-probs come from logits / T), otherwise the ratio to the sampler's log-probs is biased.
    """
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):  # (T, V), (T,)
        z = row_logits.to(_compute_dtype(row_logits))
        if temperature != 1.0:
            z = z / temperature
        picked = z.gather(-1, row_tokens.long().unsqueeze(-1)).squeeze(-1)  # (T,)
        rows.append(picked - torch.logsumexp(z, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """H = logsumexp(z) − Σ_v softmax(z)_v z_v with z = logits / temperature (nats, per position).

    Shapes: logits (B, T, V) -> (B, T). One row at a time, as `logprobs_from_logits`.
    """
    rows = []
    for row_logits in logits:  # (T, V)
        z = row_logits.to(_compute_dtype(row_logits))
        if temperature != 1.0:
            z = z / temperature
        rows.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1))
    return torch.stack(rows)


def _safe_div(num: Tensor, den: Tensor | float) -> Tensor:
    """num / den, and 0 where den == 0 (a sum over nothing). Division by a guarded denominator keeps gradients finite."""
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return num / torch.where(den != 0, den, torch.ones_like(den))


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Σ x·mask over `dim` (all dimensions when None). Masked entries count as 0 even when they hold inf or NaN."""
    mask = mask.to(x.dtype)
    x = torch.where(mask != 0, x, torch.zeros_like(x)) * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Σ x·mask / Σ mask over `dim`; 0 where the mask selects nothing (e.g. a fully masked row)."""
    den = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return _safe_div(masked_sum(x, mask, dim), den)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the selected entries (all dimensions); Bessel-corrected n/(n−1) when `unbiased` and n > 1."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean) / sqrt(var + eps) over the selected entries; the mean is added back when `shift_mean` is False.

    docs/reference.md §PPO (advantages whitened per batch, shift mean). Shapes: x, mask (B, T) -> (B, T), 0 where
    masked.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.to(x.dtype) != 0, out, torch.zeros_like(out))


def sequence_logprobs(logprobs: Tensor, response_mask: Tensor, average: bool = False) -> Tensor:
    """Sequence log-prob: Σ_t logprobs over response tokens, or the per-token mean when `average` (IPO, SimPO, ORPO).

    Shapes: logprobs, response_mask (B, T) -> (B,). `LossSpec.logp_average` says which one a preference loss takes.
    """
    return masked_mean(logprobs, response_mask, dim=-1) if average else masked_sum(logprobs, response_mask, dim=-1)


# --- supervised fine-tuning -----------------------------------------------------------------------------------------
def sft_loss(logits: Tensor, labels: Tensor, num_tokens: float | Tensor | None = None) -> tuple[Tensor, dict]:
    """Token NLL: −Σ_t log π(label_t) over labels != −100, divided by `num_tokens`.

    Shapes: logits (B, T, V) already aligned with labels (B, T) (logits at t predict labels at t).
    Why a caller-given denominator: averaging each micro-batch over its own tokens and then averaging micro-batches
    weights a token of a short micro-batch more than one of a long micro-batch. Dividing every micro-batch's SUM by
    the token count of the whole global batch (all micro-batches, all processes) makes the accumulated gradient
    exactly the gradient of the global token mean, whatever the split. Default: the tokens of this batch.
    """
    mask = labels != -100
    logprobs = logprobs_from_logits(logits, labels.masked_fill(~mask, 0))  # (B, T)
    nll_sum = -masked_sum(logprobs, mask)
    n_local = mask.sum()
    loss = _safe_div(nll_sum, n_local if num_tokens is None else num_tokens)
    metrics = {"nll_sum": nll_sum.detach(), "num_tokens": n_local.detach(), "token_nll": _safe_div(nll_sum, n_local).detach()}
    return loss, metrics


# --- reward models --------------------------------------------------------------------------------------------------
def bradley_terry_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    margin: Tensor | None = None,
    label_smoothing: float | Tensor = 0.0,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """L = −(1−ε) log σ(r_w − r_l − m) − ε log σ(−(r_w − r_l − m)), weighted mean over pairs; ε a float or a (B,)
    tensor of per-pair values (soft labels: `soft_label_smoothing`).

    docs/reference.md §Reward model (Bradley-Terry, optional margin m as in Llama 2); ε is label smoothing for noisy
    raters.
    Shapes: chosen_scores, rejected_scores, margin, weight (B,) -> scalar loss.
    Metrics: accuracy (share with r_w > r_l strictly), margin (mean r_w − r_l), chosen/rejected mean scores.
    """
    diff = chosen_scores - rejected_scores  # (B,)
    logits = diff if margin is None else diff - margin
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    loss = losses.mean() if weight is None else _safe_div((losses * weight).sum(), weight.sum())
    d = diff.detach()
    metrics = {"accuracy": (d > 0).float().mean(), "margin": d.mean(),
               "chosen": chosen_scores.detach().mean(), "rejected": rejected_scores.detach().mean()}
    return loss, metrics


def soft_label_smoothing(prob: Tensor | None, label_smoothing: float) -> Tensor | float:
    """Per-pair ε_i = 1 − p_i for pairs with a soft label p_i = P(chosen preferred) (AI labels, RL-CAI: Bai et al.
    2022 §4.1), NaN marking pairs without one, which keep the run's `label_smoothing`; the plain float when no pair
    has a soft label. With ε_i = 1 − p_i, −(1−ε)log σ(x) − ε log σ(−x) is the cross-entropy against target p_i.
    Shapes: prob (B,) -> (B,)."""
    if prob is None or bool(torch.isnan(prob).all()):
        return label_smoothing
    return torch.where(torch.isnan(prob), torch.full_like(prob, label_smoothing), 1.0 - prob)


def ranking_loss(scores: Tensor, ranking: Tensor, valid: Tensor | None = None) -> tuple[Tensor, dict]:
    """InstructGPT ranking loss: the C(K,2) pairs of one prompt are ONE element, each pair weighted 1/C(K,2).

    L = mean_prompts [ 1/C(k,2) Σ_{i ranked above j} −log σ(r_i − r_j) ]   (docs/reference.md §Reward model)
    Shapes: scores (B, K) one score per completion; ranking (B, K) completion indices best -> worst; valid (B, K) bool
    over RANKING positions (False marks padding after the last real entry of a prompt with k < K completions; its
    index may be anything, −1 included). Prompts with fewer than 2 valid completions are left out.
    """
    B, K = scores.shape
    valid = torch.ones_like(ranking, dtype=torch.bool) if valid is None else valid.bool()
    ordered = scores.gather(1, ranking.long().clamp(min=0))  # (B, K) score of the r-th best
    diff = ordered[:, :, None] - ordered[:, None, :]  # (B, K, K) [b, i, j] = s(i-th best) − s(j-th best)
    above = torch.ones(K, K, dtype=torch.bool, device=scores.device).triu(1)  # i ranked above j
    pairs = above & valid[:, :, None] & valid[:, None, :]  # (B, K, K)
    per_prompt = masked_mean(-F.logsigmoid(diff), pairs, dim=(1, 2))  # (B,) mean over that prompt's pairs
    loss = masked_mean(per_prompt, pairs.any(dim=(1, 2)))
    metrics = {"accuracy": masked_mean((diff.detach() > 0).float(), pairs), "pairs": pairs.sum()}
    return loss, metrics


# --- DPO family: sequence log-probs in, (loss, metrics) out ---------------------------------------------------------
def _preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict:
    """docs/reference.md §DPO family: rewards/chosen = β·logratio(yw), rewards/rejected, margins, accuracies."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(),
            "rewards/margins": (c - r).mean(), "rewards/accuracies": (c > r).float().mean()}


def pair_mean(losses: Tensor, weight: Tensor | None = None) -> Tensor:
    """The mean of per-pair losses (B,), or their weighted mean Σ w_i ℓ_i / Σ w_i with a pair's `weight` field
    (None: every pair counts 1, the plain mean)."""
    return losses.mean() if weight is None else (weight * losses).sum() / weight.sum()


def _shifted(logits: Tensor, margin: Tensor | None) -> Tensor:
    """βh − m with a pair's `margin` m (how much more yw is preferred; Llama 2's RM margin, ODPO's offset)."""
    return logits if margin is None else logits - margin


def dpo_sigmoid_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    margin: Tensor | None = None,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """DPO (Rafailov et al. 2023), cDPO when ε > 0: L = −(1−ε) log σ(βh − m) − ε log σ(−(βh − m)),
    h = (log πθ(yw) − log πref(yw)) − (log πθ(yl) − log πref(yl)), summed token log-probs; m a pair's margin (0 by
    default: ODPO's offset, Amini et al. 2024), pairs weighted by `weight` (`pair_mean`).

    docs/reference.md §DPO family; with πθ = πref the loss is ln 2. Shapes: all inputs (B,) -> scalar (mean over
    pairs).
    """
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps  # (B,)
    logits = _shifted(beta * (chosen_ratio - rejected_ratio), margin)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return pair_mean(losses, weight), _preference_metrics(beta * chosen_ratio, beta * rejected_ratio)


def rpo_nll(chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """RPO's NLL term (Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 1): the chosen
    responses' negative log-likelihood per token, −mean_i log πθ(yw_i) / |yw_i|, added to a preference loss with
    weight α. DPO can raise the margin by lowering both responses' likelihood, which moves probability to text
    neither response had (on `reviews`: longer answers, where the KL goes); this term holds yw's likelihood up.
    Shapes: chosen_logps (B,) summed token log-probs, chosen_lengths (B,) token counts -> scalar.
    """
    return -(chosen_logps / chosen_lengths.clamp(min=1)).mean()


def robust_dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
    margin: Tensor | None = None,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Robust DPO (Chowdhury et al. 2024), unbiased under label flips with rate ε < 1/2:
    L = [−(1−ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε), h as in DPO.

    docs/reference.md §DPO family. Shapes: all inputs (B,) -> scalar.
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    logits = _shifted(beta * (chosen_ratio - rejected_ratio), margin)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return pair_mean(losses, weight), _preference_metrics(beta * chosen_ratio, beta * rejected_ratio)


def ipo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """IPO (Azar et al. 2023): L = (h − 1/(2τ))², h the log-ratio difference of per-token MEAN log-probs; τ = beta.

    docs/reference.md §DPO family. The squared loss pulls h to the finite target 1/(2τ) instead of pushing it to
    infinity.
    Shapes: all inputs (B,) -> scalar.
    """
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    losses = (h - 1 / (2 * beta)) ** 2
    return pair_mean(losses, weight), _preference_metrics(beta * chosen_ratio, beta * rejected_ratio)


def hinge_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    margin: Tensor | None = None,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """SLiC-HF hinge (Zhao et al. 2023) on the DPO log-ratio: L = max(0, 1 − (βh − m)), summed token log-probs.

    Shapes: all inputs (B,) -> scalar.
    """
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    losses = torch.relu(1 - _shifted(beta * (chosen_ratio - rejected_ratio), margin))
    return pair_mean(losses, weight), _preference_metrics(beta * chosen_ratio, beta * rejected_ratio)


def simpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, beta: float = 2.0, gamma: float = 1.0,
               weight: Tensor | None = None) -> tuple[Tensor, dict]:
    """SimPO (Meng et al. 2024), no reference: L = −log σ(β·logπθ(yw)/|yw| − β·logπθ(yl)/|yl| − γ).

    docs/reference.md §DPO family. Inputs are per-token MEAN log-probs (the 1/|y| of the formula), see
    `sequence_logprobs`.
    Shapes: chosen_logps, rejected_logps (B,) -> scalar. Metrics rewards = β·mean log-prob.
    """
    logits = beta * (chosen_logps - rejected_logps) - gamma
    return pair_mean(-F.logsigmoid(logits), weight), _preference_metrics(beta * chosen_logps, beta * rejected_logps)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x < 0, accurate at both ends (Mächler 2012); x is clamped just below 0."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, chosen_nll: Tensor | None = None, lam: float = 0.1,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """ORPO (Hong et al. 2024), no reference: L = NLL(yw) + λ·(−log σ(log odds(yw) − log odds(yl))),
    odds = P/(1−P), P = exp(mean token log-prob).

    docs/reference.md §DPO family. Inputs are per-token MEAN log-probs (B,). `chosen_nll` is the SFT term on the chosen
    responses (a scalar, e.g. `sft_loss` over the chosen tokens); default −mean(chosen_logps).
    Metrics rewards = λ·mean log-prob, plus nll and log_odds_ratio.
    """
    log_odds = (chosen_logps - _log1mexp(chosen_logps)) - (rejected_logps - _log1mexp(rejected_logps))  # (B,)
    nll = pair_mean(-chosen_logps, weight) if chosen_nll is None else chosen_nll
    loss = nll + lam * pair_mean(-F.logsigmoid(log_odds), weight)
    metrics = _preference_metrics(lam * chosen_logps, lam * rejected_logps)
    metrics.update({"nll": nll.detach(), "log_odds_ratio": log_odds.detach().mean()})
    return loss, metrics


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_logps: Tensor,
    ref_kl_logps: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict]:
    """KTO (Ethayarajh et al. 2024), unpaired: r = log πθ(y) − log πref(y); reference point
    z0 = max(0, mean(kl_logps − ref_kl_logps)), detached; desirable: λD(1 − σ(β(r − z0))), undesirable:
    λU(1 − σ(β(z0 − r))); mean over examples.

    docs/reference.md §DPO family. kl_logps / ref_kl_logps are summed log-probs of MISMATCHED pairs (completion of
    another prompt of the batch), the batch estimate of KL(πθ‖πref). Shapes: logps, ref_logps, desirable (bool) (B,);
    kl_logps, ref_kl_logps (B',) -> scalar. Metrics: rewards/chosen (rejected) = mean βr over (un)desirable examples,
    0 when there are none; kl = z0.
    """
    logratio = logps - ref_logps  # (B,)
    z0 = (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()
    desirable = desirable.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio))),
    )
    rewards = beta * logratio.detach()
    chosen, rejected = masked_mean(rewards, desirable), masked_mean(rewards, ~desirable)
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected, "kl": z0}
    return losses.mean(), metrics


@dataclass(frozen=True)
class LossSpec:
    """How a recipe calls a preference loss.

    fn(chosen_logps, rejected_logps[, ref_chosen_logps, ref_rejected_logps], **{h: cfg.h for h in hparams}) for
    paired losses; kto_loss's own signature when not `paired`.
    """

    fn: Callable[..., tuple[Tensor, dict]]
    needs_reference: bool  # load a reference model and pass ref_* log-probs
    logp_average: bool  # sequence log-prob = per-token mean (True) or sum (False), see `sequence_logprobs`
    hparams: tuple[str, ...] = ("beta",)  # keyword hyperparameters the function takes
    paired: bool = True  # chosen/rejected pairs (False: KTO's unpaired labelled completions)
    takes_margin: bool = False  # a pair's `margin` field shifts the loss (else a data set with margins is refused)


PREFERENCE_LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo_sigmoid_loss, True, False, ("beta", "label_smoothing"), takes_margin=True),
    "robust_dpo": LossSpec(robust_dpo_loss, True, False, ("beta", "label_smoothing"), takes_margin=True),
    "ipo": LossSpec(ipo_loss, True, True),
    "hinge": LossSpec(hinge_loss, True, False, takes_margin=True),
    "simpo": LossSpec(simpo_loss, False, True, ("beta", "gamma")),
    "orpo": LossSpec(orpo_loss, False, True, ("lam",)),
    "kto": LossSpec(kto_loss, True, False, ("beta", "desirable_weight", "undesirable_weight"), paired=False),
}


# --- loss aggregation over (B, T) per-token losses ------------------------------------------------------------------
def token_mean(x: Tensor, mask: Tensor, denominator: float | Tensor | None = None) -> Tensor:
    """DAPO token-level loss: 1/Σ_i|o_i| · Σ_i Σ_t ℓ_{i,t} (docs/reference.md §Group policy gradients).

    denominator: the response-token count; pass the global batch's count under accumulation / data parallelism.
    """
    return _safe_div(masked_sum(x, mask), mask.to(x.dtype).sum() if denominator is None else denominator)


def seq_mean_token_mean(x: Tensor, mask: Tensor, denominator: float | Tensor | None = None) -> Tensor:
    """GRPO: mean over sequences of per-sequence token means, 1/G Σ_i 1/|o_i| Σ_t ℓ_{i,t}
    (docs/reference.md §Group policy gradients).

    denominator: the number of sequences (default: rows with at least one response token; empty rows add 0).
    """
    per_seq = masked_mean(x, mask, dim=-1)  # (B,)
    count = (mask.to(x.dtype).sum(-1) > 0).sum() if denominator is None else denominator
    return _safe_div(per_seq.sum(), count)


def seq_mean_token_sum_norm(x: Tensor, mask: Tensor, denominator: float | Tensor | None = None) -> Tensor:
    """Dr. GRPO: Σ_i Σ_t ℓ_{i,t} / (G · L) with a constant L such as the generation budget
    (docs/reference.md §Group policy gradients).

    denominator: number of sequences × L; default B·T, which is that when responses are padded to the budget.
    """
    return _safe_div(masked_sum(x, mask), x.shape[0] * x.shape[1] if denominator is None else denominator)


AGGREGATIONS: dict[str, Callable[..., Tensor]] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}


# --- PPO --------------------------------------------------------------------------------------------------------------
def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    aggregation: str = "token-mean",
    denominator: float | Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """PPO clipped surrogate (Schulman et al. 2017): ℓ = −min(ρÂ, clip(ρ, 1−ε_low, 1+ε_high)Â), ρ = exp(logp − old_logp).

    docs/reference.md §PPO (ε = 0.2); clip-higher ε_high = 0.28 of DAPO (§Group policy gradients) when `clip_high`
    is given.
    Shapes: logprobs, old_logprobs, advantages, response_mask (B, T) -> scalar, reduced by AGGREGATIONS[aggregation].
    Metrics: clipfrac (share of tokens where the clipped term is active), approx_kl = mean (ρ − 1) − log ρ (k3 of
    KL(π_old‖πθ) on samples from π_old), ratio_mean.
    weights: optional (B, T) constants multiplying each token's term, an off-policy correction (OFF_POLICY_WEIGHTS).
    """
    clip_high = clip_low if clip_high is None else clip_high
    mask = response_mask.to(logprobs.dtype)
    logratio = torch.where(mask != 0, logprobs - old_logprobs, torch.zeros_like(logprobs))  # padding: ρ = 1
    ratio = torch.exp(logratio)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = AGGREGATIONS[aggregation](per_token, mask, denominator)
    with torch.no_grad():
        metrics = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                   "approx_kl": masked_mean((ratio - 1) - logratio, mask),
                   "ratio_mean": masked_mean(ratio, mask)}
    return loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    clip: float | None = 0.2,
    aggregation: str = "token-mean",
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Clipped value loss: ½·max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²); ½(V − R)² when clip is None.

    docs/reference.md §PPO (ε_v = 0.2). Shapes: values, old_values, returns, response_mask (B, T) -> scalar.
    Metrics: vf_clipfrac (share of tokens where the clipped error is the larger), value_mean.
    """
    mask = response_mask.to(values.dtype)
    unclipped = (values - returns) ** 2
    if clip is None:
        per_token, clipfrac = unclipped, torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).float().detach(), mask)
    loss = 0.5 * AGGREGATIONS[aggregation](per_token, mask, denominator)
    return loss, {"vf_clipfrac": clipfrac, "value_mean": masked_mean(values.detach(), mask)}


# --- off-policy correction of asynchronous rollouts (docs/reference.md §Off-policy correction) ------------------------
def behaviour_logratio(old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """log w_t = log π_old(a_t) − log π_rollout(a_t): trainer (or proximal) vs the policy that sampled a_t.

    Shapes: (B, T) each -> (B, T), 0 on padding (w = 1 there). Detached: the weights are constants of the loss.
    """
    diff = (old_logprobs - rollout_logprobs).detach()
    return torch.where(response_mask != 0, diff, torch.zeros_like(diff))


def tis_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor, cap: float = 2.0) -> Tensor:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
    RL training"): weight_t = min(w_t, C), w_t = π_old(a_t)/π_rollout(a_t). Shapes: (B, T) -> (B, T)."""
    return behaviour_logratio(old_logprobs, rollout_logprobs, response_mask).exp().clamp(max=cap)


def icepop_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor, cap: float = 2.0) -> Tensor:
    """ICEPOP-style masking (Ling team 2025, Ring-1T §IcePop): weight_t = w_t if 1/C ≤ w_t ≤ C else 0, so a token
    whose two probabilities disagree by more than a factor C gives no gradient at all. Shapes: (B, T) -> (B, T)."""
    w = behaviour_logratio(old_logprobs, rollout_logprobs, response_mask).exp()
    return torch.where((w >= 1.0 / cap) & (w <= cap), w, torch.zeros_like(w))


def sequence_mask_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor,
                          cap: float = 2.0) -> Tensor:
    """Sequence-level masking: weight 1 on every token of a sequence whose mean |log w_t| ≤ log C, else 0 (the whole
    sequence is dropped; its tokens are not reweighted). Shapes: (B, T) -> (B, T), 0 on padding."""
    mask = response_mask.to(old_logprobs.dtype)
    drift = masked_mean(behaviour_logratio(old_logprobs, rollout_logprobs, response_mask).abs(), mask, dim=-1)  # (B,)
    return (drift <= math.log(cap)).to(mask.dtype)[:, None] * mask


OFF_POLICY_WEIGHTS: dict[str, Callable[..., Tensor]] = {
    "tis": tis_weights,
    "icepop": icepop_weights,
    "seq_mask": sequence_mask_weights,
    "decoupled": tis_weights,  # AReaL's capped behaviour weight min(π_prox/π_behave, C): see decoupled_ppo_loss
}


def decoupled_ppo_loss(
    logprobs: Tensor,
    proximal_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    behaviour_cap: float = 2.0,
    aggregation: str = "token-mean",
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Decoupled PPO (Hilton et al. 2021, arXiv 2110.00641, eq. 3; AReaL, Fu et al. 2025, arXiv 2505.24298, §5.2):
    ℓ_t = −min(w_t, C) · min(ρ_t Â_t, clip(ρ_t, 1−ε_low, 1+ε_high) Â_t), ρ_t = π_θ/π_prox, w_t = π_prox/π_behave.

    The trust region is centred on the proximal policy (the trainer's weights before this update, log-probs
    recomputed), not on the stale policy that sampled; the behaviour weight corrects for the sampling. When the
    proximal log-probs are the trainer's own recompute this is TIS with the clip around the recompute.
    Shapes: all (B, T) -> scalar; metrics as `ppo_policy_loss`.
    """
    weights = tis_weights(proximal_logprobs, behaviour_logprobs, response_mask, behaviour_cap)
    return ppo_policy_loss(logprobs, proximal_logprobs, advantages, response_mask, clip_low, clip_high, aggregation,
                           denominator, weights=weights)


def off_policy_metrics(old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor,
                       weights: Tensor) -> dict[str, Tensor]:
    """What a correction did, over response tokens (docs/reference.md §Off-policy correction):
    weight_mean = mean weight_t; clipped_share = share of tokens whose weight differs from w_t (capped or masked);
    ess = (Σ weight)² / Σ weight² and ess_fraction = ess / n (1 = every token counts fully, as on-policy);
    behaviour_kl = mean (w_t − 1) − log w_t, the k3 estimate of KL(π_rollout ‖ π_old) on the sampled tokens.
    Shapes: (B, T) each -> 0-dim tensors."""
    mask = response_mask.to(weights.dtype)
    logw = behaviour_logratio(old_logprobs, rollout_logprobs, response_mask).to(weights.dtype)
    w, kept = logw.exp(), weights.detach() * mask
    n = mask.sum()
    ess = _safe_div(kept.sum() ** 2, (kept**2).sum())
    return {"weight_mean": masked_mean(kept, mask),
            "clipped_share": masked_mean((~torch.isclose(weights.detach(), w)).to(mask.dtype), mask),
            "ess": ess, "ess_fraction": _safe_div(ess, n),
            "behaviour_kl": masked_mean((w - 1) - logw, mask)}


def version_lag(current_version: int, batch_versions: Tensor) -> Tensor:
    """Mean number of optimizer steps between the weights that sampled each row and the weights being trained:
    lag = mean_i (v_now − v_i). Shapes: (B,) integer -> 0-dim float."""
    return (current_version - batch_versions.to(torch.float64)).mean()
