"""Rule-based rewards (OpenAI 2024, "Rule Based Rewards for Language Model Safety").

    rules = [Proposition("refuses", r"(?i)\\bI can(?:no|')t help"),
             Proposition("apologises", r"(?i)\\bsorry\\b"),
             Proposition("short", lambda prompt, completion: len(completion) < 400)]
    w = fit_rule_weights(grade(rules, p_w, y_w), grade(rules, p_l, y_l), base_margin=rm_w - rm_l)
    reward = RuleReward(rules, w, base=rm_source)       # R = R_rm + sum_i w_i * phi_i
    total = WeightedSum({"helpful": rm, "harmless": reward}, {"helpful": 1.0, "harmless": 0.5})  # rewards/__init__

docs/reference.md §AI feedback and rules: binary propositions phi_i are graded per response and combined by a
linear model fitted on a small labelled set, added to the reward model's score: R = R_rm + sum_i w_i phi_i.

Fitting: logistic regression on preference pairs (Bradley-Terry), not least squares on scores. The RM's score
is already a Bradley-Terry logit, so fitting w by the same likelihood with the RM margin as a fixed offset,
    L(w) = -sum_pairs log sigma((r_w - r_l) + w . (phi_w - phi_l)) + (l2 / 2) |w|^2,
puts w on the RM's own scale and needs only comparisons ("ideal completion beats this one"), the labels the
RBR paper uses; least squares would need absolute target scores and a choice of their scale. A bias term
cancels in every difference, so none is fitted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tether.rewards import RewardOutput, RewardSource


@dataclass(frozen=True)
class Proposition:
    """A binary proposition phi about a response: a regex searched in the completion, or a predicate
    `f(prompt, completion) -> bool` that may look at both."""

    name: str
    test: str | Callable[[str, str], bool]

    def __call__(self, prompt: str, completion: str) -> bool:
        if isinstance(self.test, str):
            return re.search(self.test, completion) is not None
        return bool(self.test(prompt, completion))


def grade(
    propositions: Sequence[Proposition], prompts: Sequence[str], completions: Sequence[str]
) -> torch.Tensor:
    """phi: (B, K) float tensor, phi[b, i] = 1.0 if proposition i holds for response b else 0.0."""
    rows = [[float(p(prompt, c)) for p in propositions] for prompt, c in zip(prompts, completions)]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(completions), len(propositions))


def fit_rule_weights(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    base_margin: torch.Tensor | None = None,
    l2: float = 1e-2,
    steps: int = 50,
) -> torch.Tensor:
    """Bradley-Terry fit of rule weights w on preference pairs, by Newton's method (the loss is convex).

        minimise  -sum_n log sigma(m_n + w . d_n) + (l2 / 2) |w|^2
        d_n = phi(y_w) - phi(y_l),   m_n = base margin r_rm(y_w) - r_rm(y_l)

    Args: chosen, rejected (N, K) proposition grades of the preferred / dispreferred response of each pair;
    base_margin (N,) r_rm(y_w) - r_rm(y_l) held fixed (None: 0); l2 > 0 keeps w finite when a proposition
    separates the pairs perfectly.
    Returns: w (K,) float64.

    Each Newton step is halved until the loss does not rise (backtracking): where the base margins are large the
    curvature p(1 − p) is nearly 0 at w = 0, and a full step overshoots without end (margins of ±5, one rule:
    w = 3400 after 50 full steps, the loss 700 times its start).
    """
    d = (chosen - rejected).double()  # (N, K)
    m = torch.zeros(d.shape[0], dtype=torch.float64) if base_margin is None else base_margin.double()  # (N,)
    w = torch.zeros(d.shape[1], dtype=torch.float64)  # (K,)
    eye = torch.eye(d.shape[1], dtype=torch.float64)
    loss = lambda v: -torch.nn.functional.logsigmoid(m + d @ v).sum() + 0.5 * l2 * (v @ v)  # noqa: E731
    for _ in range(steps):
        p = torch.sigmoid(m + d @ w)  # (N,) model probability that the chosen response wins
        grad = -d.T @ (1 - p) + l2 * w  # (K,)
        hess = d.T @ (d * (p * (1 - p))[:, None]) + l2 * eye + 1e-12 * eye  # (K, K)
        step = torch.linalg.solve(hess, grad)
        before = loss(w)
        for _ in range(60):
            if loss(w - step) <= before:
                break
            step = step / 2
        w = w - step
        if step.abs().max() < 1e-10:
            break
    return w


class RuleReward(RewardSource):
    """R = R_base + bias + sum_i w_i phi_i. Each proposition's grade phi_i (0/1) is reported in `components`
    under its name, so its rate can be logged over training; the base score under "base"."""

    name = "rules"

    def __init__(
        self,
        propositions: Sequence[Proposition],
        weights: Sequence[float] | torch.Tensor,
        base: RewardSource | None = None,
        bias: float = 0.0,
    ):
        self.propositions = list(propositions)
        self.weights = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)  # (K,)
        if len(self.weights) != len(self.propositions):
            raise ValueError(f"{len(self.propositions)} propositions but {len(self.weights)} weights")
        names = [p.name for p in self.propositions]
        if len(set(names)) != len(names) or "base" in names:
            raise ValueError(f"proposition names must be unique and not 'base': {names}")
        self.base, self.bias = base, bias

    def __call__(self, prompts, completions, records) -> RewardOutput:
        phi = grade(self.propositions, prompts, completions)  # (B, K)
        scores = phi @ self.weights + self.bias  # (B,)
        components = {p.name: phi[:, i] for i, p in enumerate(self.propositions)}
        std = None
        if self.base is not None:
            base = self.base(prompts, completions, records)
            scores = scores + base.scores
            components["base"] = base.scores
            std = base.std  # the rules themselves are deterministic
        return RewardOutput(scores=scores, std=std, components=components)
