"""Reward sources behind one interface.

Every consumer (PPO, GRPO, best-of-N, online DPO, evaluation) asks a reward source for scores the same way:

    out = source(prompts, completions, records)   # -> RewardOutput
    out.scores        # (B,) float tensor, the reward each completion gets
    out.std           # (B,) ensemble disagreement, or None (used by the uncertainty-adaptive KL controller)
    out.components    # {name: (B,) tensor} for weighted sums, each logged separately
    out.step_scores   # list of per-step score lists (process rewards), or None

`records` are the data records the prompts came from (they carry `answer`, `tests`, ...), one per completion.
A plain Python function `f(prompts, completions, records) -> list[float]` is wrapped by `FunctionReward`; several
sources with weights (helpful, harmless, honest, format ...) make one with `WeightedSum`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
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


def calling_convention(fn) -> str:
    """How a reward function wants its arguments, read from its signature before anything runs:
    "positional", tether's f(prompts, completions, records), or "keywords", TRL's f(prompts=..., completions=...,
    **columns) (a **kwargs parameter, or named parameters such as `completions`, `answer`)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: call it as tether does
        return "positional"
    names = [p.name for p in params]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return "keywords"
    if len(positional) >= 3 and positional[2].name == "records" or any(p.kind is p.VAR_POSITIONAL for p in params):
        return "positional"
    if "completions" in names:
        return "keywords"
    if len(positional) >= 3:
        return "positional"
    raise TypeError(f"takes ({', '.join(names)}); a reward function is f(prompts, completions, records) or, as TRL "
                    "calls it, f(completions, **kwargs) with the dataset's columns as keywords")


def _as_trl_completion(prompt, completion: str):
    """TRL hands a conversational prompt's completion over as the assistant's message list."""
    return [{"role": "assistant", "content": completion}] if isinstance(prompt, list) else completion


class FunctionReward(RewardSource):
    """A reward function as a reward source: `f(prompts, completions, records) -> list[float]` (e.g. a verifier), or
    a TRL-style `f(prompts=..., completions=..., **columns)`, told apart by `calling_convention`. TRL's None (the
    function does not apply to that sample) counts 0."""

    def __init__(self, fn: Callable[..., Sequence[float]], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")
        self.convention = calling_convention(fn)
        params = inspect.signature(fn).parameters if self.convention == "keywords" else {}
        self.takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self.accepted = set(params)

    def _call(self, prompts, completions, records):
        if self.convention == "positional":
            return self.fn(prompts, completions, records)
        keys = dict.fromkeys(k for r in records for k in r if k not in ("prompt", "messages"))
        columns = {k: [r.get(k) for r in records] for k in keys}  # the dataset's columns, one value per completion
        kwargs = {"prompts": list(prompts), "completions": [_as_trl_completion(p, c) for p, c in zip(prompts,
                                                                                                    completions)],
                  **columns}
        if not self.takes_any:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepted}
        return self.fn(**kwargs)

    def __call__(self, prompts, completions, records) -> RewardOutput:
        values = self._call(prompts, completions, records)
        scores = torch.tensor([0.0 if s is None else float(s) for s in values], dtype=torch.float32)
        return RewardOutput(scores=scores, components={self.name: scores})


class WeightedSum(RewardSource):
    """R = sum_k c_k R_k over named sources (multi-objective: helpful / harmless / honest / format ...).

    `components` holds each source's own (unweighted) score under its name, and that source's components as
    "name/component", so every objective is logged separately. std, when some source reports one, assumes
    independent sources: sqrt(sum_k c_k^2 std_k^2) over those that do.
    """

    name = "weighted_sum"

    def __init__(self, sources: Mapping[str, RewardSource], weights: Mapping[str, float] | None = None):
        if not sources:
            raise ValueError("WeightedSum needs at least one source")
        self.sources = dict(sources)
        self.weights = {k: 1.0 for k in self.sources} if weights is None else dict(weights)
        if set(self.weights) != set(self.sources):
            raise ValueError(f"weights for {sorted(self.weights)} but sources {sorted(self.sources)}")

    def __call__(self, prompts, completions, records) -> RewardOutput:
        scores, variance, components = None, None, {}
        for key, source in self.sources.items():
            out = source(prompts, completions, records)
            c = self.weights[key]
            scores = c * out.scores if scores is None else scores + c * out.scores
            if out.std is not None:
                variance = (c * out.std) ** 2 + (0 if variance is None else variance)
            components[key] = out.scores
            for sub, values in out.components.items():
                if sub != source.name:  # FunctionReward repeats its own score under its name
                    components[f"{key}/{sub}"] = values
        std = None if variance is None else variance.sqrt()
        return RewardOutput(scores=scores, std=std, components=components)
