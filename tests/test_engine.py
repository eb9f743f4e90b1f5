"""Engine pieces as pure functions: schedules, the seeded data stream and how it splits across processes."""

import math

import pytest

from tether.engine import lr_multiplier, step_indices, steps_for


def test_warmup_then_linear_decay():
    # 2 warmup steps: 1/2, 2/2; then linear from 1 at step 2 to 0 at step 10
    got = [lr_multiplier(s, 10, 2, "linear") for s in (0, 1, 2, 6, 10)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])


def test_cosine_to_floor():
    # InstructGPT RM: cosine decay to 10% of the peak
    assert lr_multiplier(0, 100, 0, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(50, 100, 0, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(100, 100, 0, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(7, 100, 0, "constant") == 1.0


def test_step_indices_cover_each_epoch_once_and_are_seeded():
    n, g = 10, 4
    stream = [i for s in range(5) for i in step_indices(s, g, n, seed=3)]  # 20 indices = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a new permutation each epoch
    assert step_indices(2, g, n, seed=3) == step_indices(2, g, n, seed=3)
    assert step_indices(2, g, n, seed=3) != step_indices(2, g, n, seed=4)


def test_steps_for():
    assert steps_for(100, 8, 1.0, 0) == math.ceil(100 / 8)
    assert steps_for(100, 8, 2.5, 0) == math.ceil(250 / 8)
    assert steps_for(100, 8, 1.0, 3) == 3
