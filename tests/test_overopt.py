"""The over-optimisation fits (tether.overopt): exact recovery from noiseless points, worked by hand."""

import math

import pytest
import torch

from tether.overopt import bon_form, fit_bon, fit_rl, observed_peak, r_squared, rl_form


def test_bon_form_by_hand():
    # α = 2, β = 0.5: d(2 − 0.5d) at d = 0, 1, 2, 3 is 0, 1.5, 2, 1.5
    got = bon_form(torch.tensor([0.0, 1.0, 2.0, 3.0]), 2.0, 0.5)
    assert got.tolist() == [0.0, 1.5, 2.0, 1.5]


def test_rl_form_by_hand():
    # α = 1, β = 0.5: d(1 − 0.5 log d) at d = 0, 1, e, e² is 0, 1, e/2, 0
    e = math.e
    got = rl_form(torch.tensor([0.0, 1.0, e, e * e], dtype=torch.float64), 1.0, 0.5).tolist()
    assert got == pytest.approx([0.0, 1.0, e / 2, 0.0], abs=1e-12)


def test_fit_bon_recovers_alpha_beta_and_peak():
    fit = fit_bon([0.0, 1.0, 2.0, 3.0], [0.0, 1.5, 2.0, 1.5])
    assert fit["alpha"] == pytest.approx(2.0, abs=1e-12)
    assert fit["beta"] == pytest.approx(0.5, abs=1e-12)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    assert fit["peak_d"] == pytest.approx(2.0, abs=1e-12)  # α / (2β) = 2 / 1


def test_fit_rl_recovers_alpha_beta_and_peak():
    e = math.e
    fit = fit_rl([1.0, e, e * e], [1.0, e / 2, 0.0])
    assert fit["alpha"] == pytest.approx(1.0, abs=1e-12)
    assert fit["beta"] == pytest.approx(0.5, abs=1e-12)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    assert fit["peak_d"] == pytest.approx(e, abs=1e-12)  # exp(α/β − 1) = exp(1)


def test_fit_never_turning_down_has_no_finite_peak():
    fit = fit_bon([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])  # gold = d: α = 1, β = 0
    assert fit["alpha"] == pytest.approx(1.0) and fit["beta"] == pytest.approx(0.0, abs=1e-12)
    assert fit["peak_d"] == math.inf


def test_r_squared_by_hand():
    # y = 1, 2, 3 (mean 2, SS_tot = 2); ŷ = 1, 2, 4: SS_res = 1 -> R² = 1 − 1/2
    assert r_squared(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 4.0])) == 0.5


def test_observed_peak_and_bad_input():
    assert observed_peak([0.0, 1.0, 2.0, 3.0], [0.0, 1.5, 2.0, 1.5]) == (2.0, 2.0)
    with pytest.raises(ValueError, match="at least 2"):
        fit_bon([1.0], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        fit_rl([-1.0, 1.0], [0.0, 1.0])
