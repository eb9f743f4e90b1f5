"""The over-optimisation law of Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization"), as pure functions.

    fit = fit_bon(d, gold)          # {"alpha", "beta", "r2", "peak_d"}: gold(d) = d(α − βd), d = sqrt(KL)
    fit = fit_rl(d, gold)           # gold(d) = d(α − β log d)
    observed_peak(d, gold)          # the d of the highest measured gold

Gao et al. §3 (eqs. 1 and 2) measure the gold reward relative to the initial policy, so both forms pass through
(0, 0); each is linear in (α, β), and the fit is ordinary least squares on the design columns [d, −d²] (best-of-n)
or [d, −d·log d] (RL). R² = 1 − SS_res / SS_tot with SS_tot about the mean of the measured values. The fitted
peak solves dR/dd = 0: d* = α / (2β) for best-of-n, d* = exp(α/β − 1) for RL (a maximum when β > 0; with β <= 0 the
fitted curve never turns down and d* is infinite).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def bon_form(d: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """R_bon(d) = d(α − βd) (Gao et al. 2022, eq. 1)."""
    return d * (alpha - beta * d)


def rl_form(d: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """R_RL(d) = d(α − β log d) (Gao et al. 2022, eq. 2); R_RL(0) = 0 (d log d -> 0)."""
    d_log_d = torch.where(d > 0, d * torch.log(d.clamp(min=1e-300)), torch.zeros_like(d))
    return alpha * d - beta * d_log_d


def _columns_bon(d: torch.Tensor) -> torch.Tensor:
    return torch.stack([d, -d * d], dim=1)  # (N, 2)


def _columns_rl(d: torch.Tensor) -> torch.Tensor:
    d_log_d = torch.where(d > 0, d * torch.log(d.clamp(min=1e-300)), torch.zeros_like(d))
    return torch.stack([d, -d_log_d], dim=1)  # (N, 2)


def r_squared(y: torch.Tensor, fitted: torch.Tensor) -> float:
    """1 − Σ(y − ŷ)² / Σ(y − ȳ)²; 1.0 for a perfect fit of constant y, −inf never (NaN when y is constant and ŷ ≠ y)."""
    ss_res = float(((y - fitted) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else float("nan")
    return 1.0 - ss_res / ss_tot


def _fit(d: Sequence[float], gold: Sequence[float], columns: Callable, form: Callable) -> dict:
    x = torch.as_tensor(list(d), dtype=torch.float64)
    y = torch.as_tensor(list(gold), dtype=torch.float64)
    if x.shape != y.shape or len(x) < 2:
        raise ValueError(f"need at least 2 (d, gold) points of equal count, got {len(x)} and {len(y)}")
    if (x < 0).any():
        raise ValueError("d = sqrt(KL) must be >= 0")
    a = columns(x)  # (N, 2)
    coef = torch.linalg.lstsq(a, y[:, None], driver="gelsd").solution[:, 0]  # (2,) least squares (α, β)
    alpha, beta = float(coef[0]), float(coef[1])
    return {"alpha": alpha, "beta": beta, "r2": r_squared(y, form(x, alpha, beta))}


def fit_bon(d: Sequence[float], gold: Sequence[float]) -> dict:
    """Least-squares α, β of R_bon(d) = d(α − βd) to (d, gold − gold at d=0) points; R²; the peak d* = α/(2β)."""
    out = _fit(d, gold, _columns_bon, bon_form)
    out["peak_d"] = out["alpha"] / (2 * out["beta"]) if out["beta"] > 0 else math.inf
    return out


def fit_rl(d: Sequence[float], gold: Sequence[float]) -> dict:
    """Least-squares α, β of R_RL(d) = d(α − β log d); R²; the peak d* = exp(α/β − 1)."""
    out = _fit(d, gold, _columns_rl, rl_form)
    b = out["beta"]
    out["peak_d"] = math.exp(min(out["alpha"] / b - 1, 700.0)) if b > 0 else math.inf
    return out


FITS: dict[str, Callable[[Sequence[float], Sequence[float]], dict]] = {"bon": fit_bon, "rl": fit_rl}
FORMS: dict[str, Callable] = {"bon": bon_form, "rl": rl_form}


def observed_peak(d: Sequence[float], gold: Sequence[float]) -> tuple[float, float]:
    """(d, gold) of the highest measured gold (the first one on ties)."""
    i = max(range(len(gold)), key=lambda k: (gold[k], -k))
    return float(d[i]), float(gold[i])
