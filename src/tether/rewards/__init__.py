"""Reward sources behind one interface.

Every consumer (PPO, GRPO, best-of-N, online DPO, evaluation) asks a reward source for scores the same way:

    out = source(prompts, completions, records)   # -> RewardOutput
    out.scores        # (B,) float tensor, the reward each completion gets
    out.std           # (B,) ensemble disagreement, or None (used by the uncertainty-adaptive KL controller)
    out.components    # {name: (B,) tensor} for weighted sums, each logged separately
    out.step_scores   # list of per-step score lists (process rewards), or None

`records` are the data records the prompts came from (they carry `answer`, `tests`, ...), one per completion.
A plain Python function `f(prompts, completions, records) -> list[float]` is wrapped by `FunctionReward`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class RewardOutput:
    scores: torch.Tensor
    std: torch.Tensor | None = None
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    step_scores: list[list[float]] | None = None


class RewardSource:
    """Base class: subclasses implement `__call__(prompts, completions, records) -> RewardOutput`."""

    name = "reward"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict]) -> RewardOutput:
        raise NotImplementedError


class FunctionReward(RewardSource):
    """Wrap `f(prompts, completions, records) -> list[float]` (e.g. a verifier) as a reward source."""

    def __init__(self, fn: Callable[..., Sequence[float]], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")

    def __call__(self, prompts, completions, records) -> RewardOutput:
        scores = torch.tensor([float(s) for s in self.fn(prompts, completions, records)], dtype=torch.float32)
        return RewardOutput(scores=scores, components={self.name: scores})
