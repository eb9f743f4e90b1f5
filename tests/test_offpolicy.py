"""Off-policy corrections of asynchronous rollouts (losses.py, docs/reference.md §Off-policy correction), by hand."""

import math

import pytest
import torch

from tether import losses as L


def batch():
    """Two rows; row 0 has w = (3, 0.25, 1), row 1 has w = (1.5, pad, pad)."""
    rollout = torch.zeros(2, 3, dtype=torch.float64)
    old = torch.tensor([[math.log(3), math.log(0.25), 0.0], [math.log(1.5), 7.0, -7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float64)
    return old, rollout, mask


def test_weights_by_hand_with_cap_two():
    old, rollout, mask = batch()
    torch.testing.assert_close(L.tis_weights(old, rollout, mask, 2.0) * mask,
                               torch.tensor([[2.0, 0.25, 1.0], [1.5, 0, 0]], dtype=torch.float64))
    # ICEPOP band [1/2, 2]: 3 and 0.25 fall outside and are zeroed, 1 and 1.5 keep their weight
    torch.testing.assert_close(L.icepop_weights(old, rollout, mask, 2.0) * mask,
                               torch.tensor([[0.0, 0.0, 1.0], [1.5, 0, 0]], dtype=torch.float64))
    # row 0: mean |log w| = (ln 3 + ln 4 + 0)/3 = 0.828 > ln 2 = 0.693 -> dropped; row 1: ln 1.5 = 0.405 -> kept
    torch.testing.assert_close(L.sequence_mask_weights(old, rollout, mask, 2.0),
                               torch.tensor([[0.0, 0.0, 0.0], [1.0, 0, 0]], dtype=torch.float64))
    assert set(L.OFF_POLICY_WEIGHTS) == {"tis", "icepop", "seq_mask", "decoupled"}


def test_padding_never_changes_a_weight_and_weights_are_constants():
    old, rollout, mask = batch()
    old.requires_grad_(True)
    w = L.tis_weights(old, rollout, mask, 2.0)
    assert not w.requires_grad
    assert w[1, 1].item() == w[1, 2].item() == 1.0  # log w = ±7 on padding is ignored


def test_off_policy_metrics_by_hand():
    old, rollout, mask = batch()
    m = L.off_policy_metrics(old, rollout, mask, L.tis_weights(old, rollout, mask, 2.0))
    assert m["weight_mean"].item() == pytest.approx((2 + 0.25 + 1 + 1.5) / 4)  # 1.1875
    assert m["clipped_share"].item() == pytest.approx(0.25)  # only w = 3 was capped
    ess = 4.75**2 / (4 + 0.0625 + 1 + 2.25)  # (Σw)²/Σw² = 22.5625/7.3125
    assert m["ess"].item() == pytest.approx(ess)
    assert m["ess_fraction"].item() == pytest.approx(ess / 4)
    k3 = [(3 - 1) - math.log(3), (0.25 - 1) - math.log(0.25), 0.0, (1.5 - 1) - math.log(1.5)]
    assert m["behaviour_kl"].item() == pytest.approx(sum(k3) / 4)  # 0.40805
    on_policy = L.off_policy_metrics(rollout, rollout, mask, torch.ones_like(mask))
    assert on_policy["ess_fraction"].item() == 1.0 and on_policy["behaviour_kl"].item() == 0.0
    assert on_policy["clipped_share"].item() == 0.0


def test_decoupled_ppo_by_hand():
    """One token: ρ = π/π_prox = 1.5, behaviour weight π_prox/π_behave = 3 capped at 2."""
    prox = torch.tensor([[0.0]], dtype=torch.float64)
    behave = prox - math.log(3)
    mask = torch.ones(1, 1, dtype=torch.float64)
    for adv, expected, grad in ((1.0, -2 * 1.2, 0.0), (-1.0, 2 * 1.5, 2 * 1.5)):
        logp = (prox + math.log(1.5)).requires_grad_(True)
        loss, metrics = L.decoupled_ppo_loss(logp, prox, behave, torch.full_like(prox, adv), mask, 0.2, 0.2, 2.0)
        loss.backward()
        assert loss.item() == pytest.approx(expected)  # +Â: clipped to 1.2, ×2; −Â: ρ = 1.5 kept, ×2
        assert logp.grad.item() == pytest.approx(grad)  # d(2ρ)/dlogp = 2ρ; no gradient where the clip is active
        assert metrics["clipfrac"].item() == (1.0 if adv > 0 else 0.0)


def test_unit_weights_leave_the_ppo_loss_unchanged_and_weights_scale_each_token():
    gen = torch.Generator().manual_seed(0)
    logp, old, adv = (torch.randn(3, 4, generator=gen, dtype=torch.float64) * 0.3 for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    plain, _ = L.ppo_policy_loss(logp, old, adv, mask)
    ones, _ = L.ppo_policy_loss(logp, old, adv, mask, weights=torch.ones_like(mask))
    assert plain.item() == ones.item()
    half, _ = L.ppo_policy_loss(logp, old, adv, mask, weights=torch.full_like(mask, 0.5))
    assert half.item() == pytest.approx(plain.item() / 2)


def test_version_lag():
    assert L.version_lag(5, torch.tensor([5, 4, 4, 3])).item() == 1.0
    assert L.version_lag(2, torch.tensor([2, 2])).item() == 0.0


# --- the rollout queue (distributed/staleness.py) ---------------------------------------------------------------------
def schedule(max_staleness: int, steps: int):
    """(step trained, step sampled for, version that sampled it) and the produce calls, through a real queue."""
    from tether.distributed.staleness import LocalProducer, RolloutQueue

    made = []
    current = {"version": 0}
    producer = LocalProducer(lambda s: made.append((s, current["version"])) or s)
    queue = RolloutQueue(max_staleness, producer, end=steps)
    trained = []
    for step in range(steps):
        current["version"] = step
        batch = queue.next(step, version=step)
        trained.append((step, batch.payload, batch.version))
    return trained, made


def test_queue_with_no_staleness_samples_each_step_then_trains():
    trained, made = schedule(0, 3)
    assert made == [(0, 0), (1, 1), (2, 2)]
    assert trained == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]


def test_queue_with_staleness_one_samples_a_step_ahead_and_never_past_the_end():
    trained, made = schedule(1, 4)
    assert made == [(0, 0), (1, 0), (2, 1), (3, 2)]  # batch s+1 sampled by version s; nothing for step 4
    assert trained == [(0, 0, 0), (1, 1, 0), (2, 2, 1), (3, 3, 2)]  # lag 0, then 1


def test_queue_refuses_a_batch_older_than_max_staleness():
    from tether.distributed.staleness import LocalProducer, RolloutQueue

    queue = RolloutQueue(1, LocalProducer(lambda s: s))
    queue.next(0, version=0)
    with pytest.raises(RuntimeError, match="sampled by version 0 cannot train step 1 at version 3"):
        queue.next(1, version=3)
