"""KL divergence of the policy from the reference: per-token estimators and the controllers of the KL coefficient β.

Estimators (Schulman, "Approximating KL divergence", docs/reference.md §KL estimators) take log-probs of tokens
SAMPLED FROM THE POLICY and estimate KL(πθ‖πref) per token with r = πref/πθ; chosen by name through `KL_ESTIMATORS`.
Controllers hold β across a run: `.value` is the current β, `.update(current_kl, n_steps, reward_std=None)` is called
once per rollout batch with what the recipe measured, and `state_dict()` / `load_state_dict()` let a resumed run
continue with exactly the same β (register the controller with the engine's checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = −log r = log πθ − log πref: unbiased, high variance, can be negative (docs/reference.md §KL estimators).

    As a loss on on-policy samples its expected gradient is zero. Shapes: (B, T) -> (B, T).
    """
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = ½(log r)²: biased (bias 0.25·KL at KL = 0.5 for N(0,1) vs N(1,1)), low variance
    (docs/reference.md §KL estimators).

    As a loss its expected gradient is that of reverse KL(πθ‖πref). Shapes: (B, T) -> (B, T).
    """
    return 0.5 * (ref_logprobs - logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = (r − 1) − log r: unbiased, low variance, always ≥ 0 (docs/reference.md §KL estimators; GRPO's KL term,
    §Group policy gradients).

    As a loss its expected gradient is that of forward KL(πref‖πθ). Shapes: (B, T) -> (B, T).
    """
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


class FixedKLController:
    """Constant β (N+ default 0.05, docs/reference.md §KL controllers)."""

    def __init__(self, beta: float):
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int, reward_std: float | None = None) -> float:
        """β stays as it is."""
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 (lm-human-preferences), docs/reference.md §KL controllers:
    err = clip(KL/target − 1, −0.2, 0.2);  β ← β·(1 + err·n_steps/horizon).

    current_kl: mean sequence KL of the batch (nats); n_steps: episodes in the batch. β moves at most 20% per horizon.
    """

    def __init__(self, init_beta: float = 0.15, target: float = 6.0, horizon: int = 10000):
        self.value, self.target, self.horizon = float(init_beta), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int, reward_std: float | None = None) -> float:
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])


class UncertaintyKLController:
    """β tied to the reward model's uncertainty on the batch: pull harder towards πref where the reward is unreliable.

    Rule: β = clamp(β0 · max(0, 1 + c·(σ_batch/σ_ref − 1)), β_min, β_max), where σ_batch (`reward_std`) is the mean
    over the batch of the std across reward-ensemble members, and σ_ref is given or else taken from the first batch
    (so β starts at β0). β follows the current batch (no memory besides σ_ref): the uncertainty of the samples the
    policy produces now is what should set the tether now. Over-optimisation shows up as ensemble disagreement
    (Coste et al. 2024, "Reward model ensembles help mitigate overoptimization").
    """

    def __init__(self, init_beta: float = 0.05, coef: float = 1.0, beta_min: float = 0.0, beta_max: float = 1.0,
                 ref_std: float | None = None):
        self.init_beta, self.coef, self.beta_min, self.beta_max = float(init_beta), float(coef), beta_min, beta_max
        self.ref_std = None if ref_std is None else float(ref_std)
        self.value = float(init_beta)

    def update(self, current_kl: float, n_steps: int, reward_std: float | None = None) -> float:
        if reward_std is None:
            raise ValueError("UncertaintyKLController.update needs reward_std (the reward ensemble's std)")
        if self.ref_std is None:
            self.ref_std = float(reward_std)
        ratio = float(reward_std) / self.ref_std if self.ref_std > 0 else 1.0
        beta = self.init_beta * max(0.0, 1.0 + self.coef * (ratio - 1.0))
        self.value = min(max(beta, self.beta_min), self.beta_max)
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "ref_std": self.ref_std, "init_beta": self.init_beta, "coef": self.coef,
                "beta_min": self.beta_min, "beta_max": self.beta_max}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.ref_std = float(state["value"]), state["ref_std"]
        self.init_beta, self.coef = float(state["init_beta"]), float(state["coef"])
        self.beta_min, self.beta_max = float(state["beta_min"]), float(state["beta_max"])
