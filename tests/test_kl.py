"""Tests of tether.kl: the numerical claims of docs/reference.md §KL estimators and hand-computed controller updates."""

import math

import pytest
import torch

from tether import kl as K


def normal_logpdf(x, mu):
    return -0.5 * (x - mu) ** 2 - 0.5 * math.log(2 * math.pi)


def samples(n=1_000_000, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_estimators_by_hand():
    # log πθ = −1, log πref = −2: log r = −1, r = e^−1
    logp, ref = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64)
    assert K.kl_k1(logp, ref).item() == pytest.approx(1.0)
    assert K.kl_k2(logp, ref).item() == pytest.approx(0.5)
    assert K.kl_k3(logp, ref).item() == pytest.approx(math.exp(-1) - 1 + 1)  # (r − 1) − log r = 0.3679
    assert set(K.KL_ESTIMATORS) == {"k1", "k2", "k3"} and K.KL_ESTIMATORS["k3"] is K.kl_k3


def test_monte_carlo_q_n01_p_n01():
    # samples from q = πθ = N(0,1), reference p = N(0.1,1): log r = 0.1x − 0.005, true KL(q‖p) = 0.1²/2 = 0.005
    x = samples()
    logp, ref = normal_logpdf(x, 0.0), normal_logpdf(x, 0.1)
    true_kl = 0.005
    k1, k2, k3 = K.kl_k1(logp, ref), K.kl_k2(logp, ref), K.kl_k3(logp, ref)
    # k1 = 0.005 − 0.1x: std 0.1, so std/true = 20 (Schulman's table); both unbiased
    assert k1.mean().item() == pytest.approx(true_kl, abs=3e-4)  # standard error 1e-4
    assert (k1.std() / true_kl).item() == pytest.approx(20.0, abs=0.2)
    assert k3.mean().item() == pytest.approx(true_kl, abs=5e-5)  # standard error 7e-6
    assert (k3.std() / true_kl).item() == pytest.approx(1.42, abs=0.02)
    assert k3.min().item() >= 0.0 and k1.min().item() < 0.0
    # k2: ½ E[(0.1x − 0.005)²] = ½(0.01 + 0.000025) = 0.0050125, bias 1.25e-5 at this small KL
    assert k2.mean().item() == pytest.approx(0.0050125, abs=2e-5)


def test_k2_bias_quarter_kl_at_half_nat():
    # q = N(0,1), p = N(1,1): log r = x − 0.5, true KL 0.5; E k2 = ½ E(x − 0.5)² = ½(1 + 0.25) = 0.625 -> bias 0.125
    x = samples(seed=1)
    k2 = K.kl_k2(normal_logpdf(x, 0.0), normal_logpdf(x, 1.0))
    assert (k2.mean().item() - 0.5) / 0.5 == pytest.approx(0.25, abs=0.01)  # standard error 0.0016 relative
    k3 = K.kl_k3(normal_logpdf(x, 0.0), normal_logpdf(x, 1.0))
    assert k3.mean().item() == pytest.approx(0.5, abs=0.01)  # k3 stays unbiased


def expected_gradient(estimator, theta, ref_logprobs):
    """E_{x~πθ}[∇θ k(x)] exactly on a categorical: sum over outcomes weighted by detached probabilities."""
    theta = theta.clone().requires_grad_()
    logprobs = torch.log_softmax(theta, -1)
    loss = (logprobs.exp().detach() * estimator(logprobs, ref_logprobs)).sum()
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


def test_gradients_as_a_loss_k1_zero_k2_reverse_k3_forward():
    theta = torch.tensor([0.3, -1.0, 0.8, 0.1], dtype=torch.float64)
    ref_logprobs = torch.log_softmax(torch.tensor([0.0, 0.5, -0.2, 1.0], dtype=torch.float64), -1)

    def grad_of(fn):
        th = theta.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(torch.log_softmax(th, -1)), th)
        return g

    reverse = grad_of(lambda lp: (lp.exp() * (lp - ref_logprobs)).sum())  # ∇ KL(πθ‖πref)
    forward = grad_of(lambda lp: (ref_logprobs.exp() * (ref_logprobs - lp)).sum())  # ∇ KL(πref‖πθ)
    torch.testing.assert_close(expected_gradient(K.kl_k1, theta, ref_logprobs), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(expected_gradient(K.kl_k2, theta, ref_logprobs), reverse)
    torch.testing.assert_close(expected_gradient(K.kl_k3, theta, ref_logprobs), forward)
    assert (reverse - forward).abs().max().item() > 1e-3  # the two really differ here


# --- controllers ----------------------------------------------------------------------------------------------------
def test_fixed_controller():
    ctl = K.FixedKLController(0.05)
    assert ctl.update(current_kl=100.0, n_steps=512) == 0.05 and ctl.value == 0.05
    other = K.FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_ziegler_by_hand():
    ctl = K.AdaptiveKLController(init_beta=0.15, target=6.0, horizon=10000)
    # KL 9: 9/6 − 1 = 0.5 clipped to 0.2; β = 0.15·(1 + 0.2·512/10000) = 0.15·1.01024 = 0.151536
    assert ctl.update(9.0, 512) == pytest.approx(0.151536)
    # KL 5.4: 0.9 − 1 = −0.1; β = 0.151536·(1 − 0.1·0.0512) = 0.151536·0.99488 = 0.150760
    assert ctl.update(5.4, 512) == pytest.approx(0.151536 * 0.99488)
    # KL 0: err clipped to −0.2
    assert ctl.update(0.0, 10000) == pytest.approx(0.151536 * 0.99488 * 0.8)
    # KL on target: no change
    before = ctl.value
    assert ctl.update(6.0, 512) == before


def test_uncertainty_controller_by_hand():
    ctl = K.UncertaintyKLController(init_beta=0.05, coef=1.0, beta_min=0.01, beta_max=0.2)
    assert ctl.update(0.0, 64, reward_std=0.2) == pytest.approx(0.05)  # first batch sets σ_ref = 0.2
    assert ctl.ref_std == 0.2
    assert ctl.update(0.0, 64, reward_std=0.3) == pytest.approx(0.075)  # 0.05·(1 + (1.5 − 1))
    assert ctl.update(0.0, 64, reward_std=0.1) == pytest.approx(0.025)  # 0.05·(1 + (0.5 − 1))
    assert ctl.update(0.0, 64, reward_std=1.0) == pytest.approx(0.2)  # 0.05·5 = 0.25 clamped to β_max
    assert ctl.update(0.0, 64, reward_std=0.0) == pytest.approx(0.01)  # 0.05·0 clamped to β_min
    strong = K.UncertaintyKLController(init_beta=0.05, coef=2.0, ref_std=0.2)
    assert strong.update(0.0, 64, reward_std=0.05) == 0.0  # 1 + 2(0.25 − 1) = −0.5 -> 0
    with pytest.raises(ValueError):
        strong.update(0.0, 64)


@pytest.mark.parametrize("make,stats", [
    (lambda: K.AdaptiveKLController(), [(9.0, 256, None), (3.0, 256, None), (7.0, 128, None), (1.0, 512, None)]),
    (lambda: K.UncertaintyKLController(), [(0.0, 8, 0.4), (0.0, 8, 0.6), (0.0, 8, 0.3), (0.0, 8, 0.5)]),
])
def test_controllers_resume_exactly(make, stats):
    straight = make()
    for s in stats:
        straight.update(*s)
    first = make()
    for s in stats[:2]:
        first.update(*s)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for s in stats[2:]:
        resumed.update(*s)
    assert resumed.value == straight.value and resumed.state_dict() == straight.state_dict()
