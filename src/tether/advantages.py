"""Advantage estimators of tether: per-token rewards, GAE, and the critic-free group estimators of RLVR.

PPO path: `kl_penalized_rewards` -> `gae` (with a value model). Critic-free path: one score per sequence, rows grouped
contiguously by prompt (prompt i owns rows i·G .. i·G+G−1), an estimator from `ADVANTAGE_ESTIMATORS`, then the
per-sequence advantage broadcast over that sequence's response tokens. Every formula cites its section of
docs/reference.md; tests/test_advantages.py checks each against a slow Python loop and hand-computed numbers.

Choices made here:
- Group std is the SAMPLE std (n − 1), as DeepSeekMath's released code and TRL/verl compute it; a group of one has
  std 0, and a group whose rewards are all equal gets advantage 0 (the eps keeps it finite).
- `reinforce_pp_advantages` and `masked_whiten` normalise over the batch they are given; under data parallelism that
  is one process's share of the global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tether.losses import masked_whiten

Tensor = torch.Tensor


def _last_index(mask: Tensor) -> Tensor:
    """(B,) position of the last nonzero entry of each row of a (B, T) mask; 0 for an empty row."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * (mask != 0)).argmax(-1)


def kl_penalized_rewards(scores: Tensor, kl: Tensor, response_mask: Tensor, beta: float) -> Tensor:
    """r_t = −β·kl_t on every response token, plus the sequence score on the LAST real response token.

    docs/reference.md §PPO (InstructGPT; "N+ implementation details"). kl is the per-token estimate, usually
    k1 = logprobs − ref_logprobs. A row without response tokens gets all zeros (its score has no token to sit on).
    Shapes: scores (B,), kl (B, T), response_mask (B, T) -> rewards (B, T), 0 on masked positions.
    """
    mask = response_mask.to(kl.dtype)
    rewards = torch.where(mask != 0, -beta * kl, torch.zeros_like(kl))  # (B, T)
    has_tokens = (mask.sum(-1) > 0).to(kl.dtype)  # (B,)
    last = _last_index(mask).unsqueeze(-1)  # (B, 1)
    return rewards.scatter_add(1, last, (scores.to(kl.dtype) * has_tokens).unsqueeze(-1))


def gae(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), docs/reference.md §PPO:
    δ_t = r_t + γV(s_{t+1}) − V(s_t);  Â_t = Σ_l (γλ)^l δ_{t+l};  returns = Â + V.

    Only response tokens are steps: masked positions are skipped (the next step of a token is the next REAL token) and
    V after the last real token is 0 (the episode ends at EOS). Vectorised over the batch, a loop over T.
    Shapes: rewards, values, response_mask (B, T) -> advantages, returns (B, T), both 0 on masked positions.
    """
    mask = response_mask.to(values.dtype) != 0
    next_value = torch.zeros_like(values[:, 0])  # (B,) V(s_{t+1}) of the next real token
    next_adv = torch.zeros_like(values[:, 0])  # (B,) Â of the next real token
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        m = mask[:, t]
        advantages[:, t] = torch.where(m, adv_t, torch.zeros_like(adv_t))
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv_t, next_adv)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def _groups(scores: Tensor, group_size: int) -> Tensor:
    """(B,) -> (B/G, G): row i·G + j is sample j of prompt i."""
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"batch of {scores.shape[0]} scores is not a whole number of groups of {group_size}")
    return scores.reshape(-1, group_size)


def grpo_advantages(scores: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath): Â_i = (r_i − mean_group r) / (std_group r + eps), same on every token.

    docs/reference.md §Group policy gradients. std is the sample std (n − 1), 0 for a group of one.
    Shapes: scores (B,) -> (B,).
    """
    groups = _groups(scores, group_size)  # (B/G, G)
    mean = groups.mean(-1, keepdim=True)
    std = groups.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((groups - mean) / (std + eps)).reshape(-1)


def dr_grpo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO (Liu et al. 2025): Â_i = r_i − mean_group r, no division by the std
    (docs/reference.md §Group policy gradients).

    Shapes: scores (B,) -> (B,).
    """
    groups = _groups(scores, group_size)
    return (groups - groups.mean(-1, keepdim=True)).reshape(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024): Â_i = R_i − mean_{j≠i} R_j = k/(k−1)·(R_i − mean R), k = group_size ≥ 2.

    docs/reference.md §Group policy gradients; R is the sequence return, KL penalty included (e.g. the row sum of
    `kl_penalized_rewards`). Shapes: scores (B,) -> (B,).
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    groups = _groups(scores, group_size)
    return (group_size / (group_size - 1) * (groups - groups.mean(-1, keepdim=True))).reshape(-1)


def reinforce_pp_advantages(token_rewards: Tensor, response_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ (Hu 2025): A_t = Σ_{i≥t} γ^{i−t} r_i, then whitened over the batch
    (docs/reference.md §Group policy gradients).

    With token_rewards from `kl_penalized_rewards` this is A_t = score − β Σ_{i≥t} KL_i. The return-to-go is GAE with
    V = 0 and λ = 1. Shapes: token_rewards, response_mask (B, T) -> (B, T), 0 on masked positions.
    """
    to_go, _ = gae(token_rewards, torch.zeros_like(token_rewards), response_mask, gamma=gamma, lam=1.0)
    return masked_whiten(to_go, response_mask)


@dataclass(frozen=True)
class Estimator:
    """How a recipe calls an advantage estimator.

    per_token False: fn(scores (B,), group_size) -> (B,), to broadcast over response tokens (scores = the sequence
    return, e.g. `kl_penalized_rewards(...).sum(-1)`); per_token True: fn(token_rewards, response_mask) -> (B, T).
    """

    fn: Callable[..., Tensor]
    per_token: bool


ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {
    "grpo": Estimator(grpo_advantages, per_token=False),
    "dr_grpo": Estimator(dr_grpo_advantages, per_token=False),
    "rloo": Estimator(rloo_advantages, per_token=False),
    "reinforce_pp": Estimator(reinforce_pp_advantages, per_token=True),
}


def process_advantages(
    step_rewards: Sequence[Sequence[float]],
    step_token_ends: Sequence[Sequence[int]],
    response_mask: Tensor,
    group_size: int,
    eps: float = 1e-4,
) -> Tensor:
    """GRPO with process supervision (DeepSeekMath §4.1.3): r̃ = (r − mean R)/(std R + eps), R = all step rewards of
    the group's G responses pooled; Â_t = Σ of r̃ over the steps ending at or after token t.

    Input layout: step_rewards[i][k] is the PRM reward of step k of response row i; step_token_ends[i][k] is the
    index, on the response token axis of `response_mask`, of the LAST token of that step (inclusive, increasing).
    Rows are grouped contiguously by prompt as elsewhere. Tokens after the last step end get 0.
    Shapes: response_mask (B, T) -> advantages (B, T) float32, 0 on masked positions.
    """
    B, T = response_mask.shape
    if len(step_rewards) != B or len(step_token_ends) != B or B % group_size:
        raise ValueError(f"need {B} rows of step rewards and ends, grouped by {group_size}")
    advantages = torch.zeros(B, T, dtype=torch.float32, device=response_mask.device)
    for start in range(0, B, group_size):
        rows = range(start, start + group_size)
        pooled = torch.tensor([r for i in rows for r in step_rewards[i]], dtype=torch.float64)
        mean = pooled.mean() if len(pooled) else 0.0
        std = pooled.std() if len(pooled) > 1 else 0.0
        for i in rows:
            if len(step_rewards[i]) != len(step_token_ends[i]):
                raise ValueError(f"row {i}: {len(step_rewards[i])} step rewards but {len(step_token_ends[i])} ends")
            for reward, end in zip(step_rewards[i], step_token_ends[i]):
                if not 0 <= end < T:
                    raise ValueError(f"row {i}: step end {end} outside the {T} response positions")
                advantages[i, : end + 1] += float((reward - mean) / (std + eps))
    return torch.where(response_mask != 0, advantages, torch.zeros_like(advantages))
