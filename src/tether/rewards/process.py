"""Process (step) rewards: split a solution into steps, score every step, and place step scores on tokens.

    split_steps("a = 1\\nb = a + 1\\n\\nso b = 2")        # ["a = 1", "b = a + 1", "so b = 2"]
    prm_solution_score([0.9, 0.8, 0.5])                  # 0.36: P(every step correct), Lightman et al. 2023
    reward = ProcessReward(step_scorer)                   # RewardOutput(scores, step_scores=[[p_1, ..], ..])
    ends = step_end_positions(tokenizer, completion_ids)  # [token index where step k ends, ...]
    rewards = scatter_step_scores(step_scores, ends, T)   # (B, T): step k's score at its last token, else 0

Process-supervised GRPO (DeepSeekMath §4.1.3) needs exactly that layout: normalise all step scores of a group,
r~ = (r - mean R) / std R, then the advantage of token t is the sum of r~ over the steps ending at or after t,
i.e. a reverse cumulative sum along T of the scattered normalised scores.

A step is a non-blank piece of the completion between delimiters (default "\\n"), without its surrounding
whitespace. A `step_scorer(prompt, steps, record) -> [p(step k is correct), ...]` is any process reward model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from tether.rewards import RewardOutput, RewardSource


def step_spans(completion: str, delimiter: str = "\n") -> list[tuple[int, int]]:
    """Character spans [start, end) of the non-blank steps of `completion`, without surrounding whitespace."""
    if not delimiter:
        raise ValueError("the step delimiter must be a non-empty string")
    spans, start = [], 0
    while start <= len(completion):
        end = completion.find(delimiter, start)
        end = len(completion) if end < 0 else end
        piece = completion[start:end]
        if piece.strip():
            left = start + len(piece) - len(piece.lstrip())
            spans.append((left, start + len(piece.rstrip())))
        start = end + len(delimiter)
    return spans


def split_steps(completion: str, delimiter: str = "\n") -> list[str]:
    """The non-blank steps of `completion`, stripped."""
    return [completion[a:b] for a, b in step_spans(completion, delimiter)]


def prm_solution_score(step_probs: Sequence[float]) -> float:
    """Lightman et al. 2023 ("Let's Verify Step by Step"): P(solution correct) = prod_k p(step k correct).

    Empty input gives the empty product 1.0; `ProcessReward` scores a completion with no steps 0 instead.
    """
    return float(math.prod(float(p) for p in step_probs))


def prm_min_score(step_probs: Sequence[float]) -> float:
    """The weakest step decides (the min aggregation of Wang et al. 2024, Math-Shepherd). Empty input: 1.0."""
    return float(min((float(p) for p in step_probs), default=1.0))


AGGREGATES: dict[str, Callable[[Sequence[float]], float]] = {"prod": prm_solution_score, "min": prm_min_score}


class ProcessReward(RewardSource):
    """Score each step with `step_scorer(prompt, steps, record) -> list[float]` (one probability per step);
    the sequence score aggregates them (`AGGREGATES`: "prod" as Lightman, or "min"). A completion without
    steps gets step_scores [] and score 0.0."""

    def __init__(
        self,
        step_scorer: Callable[[str, list[str], dict], Sequence[float]],
        delimiter: str = "\n",
        aggregate: str = "prod",
        name: str = "process",
    ):
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}; choose one of {sorted(AGGREGATES)}")
        self.step_scorer, self.delimiter, self.aggregate, self.name = step_scorer, delimiter, aggregate, name

    def __call__(self, prompts, completions, records) -> RewardOutput:
        step_scores, scores = [], []
        for i, (prompt, completion, record) in enumerate(zip(prompts, completions, records)):
            steps = split_steps(completion, self.delimiter)
            probs = [float(p) for p in self.step_scorer(prompt, steps, record)] if steps else []
            if len(probs) != len(steps):
                raise ValueError(f"step scorer gave {len(probs)} scores for {len(steps)} steps (row {i})")
            step_scores.append(probs)
            scores.append(AGGREGATES[self.aggregate](probs) if steps else 0.0)
        out = torch.tensor(scores, dtype=torch.float32)
        return RewardOutput(scores=out, components={self.name: out}, step_scores=step_scores)


def step_end_positions(
    tokenizer, completion_ids: Sequence[int] | torch.Tensor, delimiter: str = "\n"
) -> list[int]:
    """For each step of the decoded completion, the index (into `completion_ids`) of the token where it ends:
    the first k such that ids[:k+1] decodes to text reaching the step's last character.

    Decoding skips special tokens (EOS, padding) and never cleans up spaces, so prefix lengths only grow; each
    step costs a binary search of O(log T) decodes. Two steps may end in the same token when one token spans a
    delimiter; `scatter_step_scores` then adds their scores.
    """
    ids = completion_ids.tolist() if isinstance(completion_ids, torch.Tensor) else list(completion_ids)

    def decode(k: int) -> str:
        return tokenizer.decode(ids[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    positions = []
    lo_start = 1
    for _, end in step_spans(decode(len(ids)), delimiter):
        lo, hi = lo_start, len(ids)  # smallest k in [lo, hi] with len(decode(k)) >= end
        while lo < hi:
            mid = (lo + hi) // 2
            if len(decode(mid)) >= end:
                hi = mid
            else:
                lo = mid + 1
        positions.append(lo - 1)
        lo_start = lo
    return positions


def scatter_step_scores(
    step_scores: Sequence[Sequence[float]], positions: Sequence[Sequence[int]], length: int
) -> torch.Tensor:
    """(B, T) float32 tensor: row b holds step k's score at token positions[b][k] (summed where steps share a
    token), zero elsewhere."""
    out = torch.zeros(len(step_scores), length, dtype=torch.float32)  # (B, T)
    for b, (scores, pos) in enumerate(zip(step_scores, positions)):
        if len(scores) != len(pos):
            raise ValueError(f"row {b}: {len(scores)} step scores but {len(pos)} positions")
        if pos and not 0 <= min(pos) <= max(pos) < length:
            raise ValueError(f"row {b}: positions {list(pos)} outside [0, {length})")
        out[b].index_put_((torch.tensor(pos, dtype=torch.long),), torch.tensor(scores, dtype=torch.float32),
                          accumulate=True)
    return out
