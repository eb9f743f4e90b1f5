"""prompts.train_and_held_out without a task or an eval file: a seeded tenth held out, at least one prompt."""

import pytest

from tether import data as D
from tether.config import ConfigError
from tether.prompts import train_and_held_out


@pytest.mark.parametrize("n, held", [(40, 4), (9, 1), (2, 1), (200, 8)])  # n_eval=8 caps the tenth of 200
def test_a_tenth_is_held_out_and_never_none(tmp_path, n, held):
    path = tmp_path / "prompts.jsonl"
    D.write_jsonl(path, [{"prompt": f"p{i}"} for i in range(n)])
    train, evals = train_and_held_out(str(path), "", None, 0, 8, seed=3)
    assert len(evals) == held and len(train) == n - held
    assert {r["prompt"] for r in train} | {r["prompt"] for r in evals} == {f"p{i}" for i in range(n)}
    assert train_and_held_out(str(path), "", None, 0, 8, seed=3) == (train, evals)  # seeded


def test_one_prompt_and_no_held_out_source_is_named(tmp_path):
    path = tmp_path / "one.jsonl"
    D.write_jsonl(path, [{"prompt": "p"}])
    with pytest.raises(ConfigError, match="one.jsonl: 1 prompt\\(s\\), too few to hold some out"):
        train_and_held_out(str(path), "", None, 0, 8)
