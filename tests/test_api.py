"""The Python API: the recipes as functions of `tether`, data in memory, configs checked as the CLI checks them;
docs/python-api.md's example runs as written."""

import re
from pathlib import Path

import pytest

import tether
from tether.config import ConfigError

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def test_the_documented_example_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL).group(1)
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)  # noqa: S102  (the project's own documentation)
    assert scope["sft"]["steps"] == 2 and scope["dpo"]["steps"] == 2 and scope["rm"]["train_loss"] > 0
    assert len(list((tmp_path / "cache" / "inputs").glob("*.jsonl"))) == 2  # demos and pairs, the Dataset = pairs


def test_config_values_set_in_code_are_checked_like_the_cli(tmp_path):
    cfg = tether.api.config("sft", model="m", data="d.jsonl", max_steps="2")
    assert cfg.max_steps == 2
    with pytest.raises(ConfigError, match="key 'lr' must be > 0"):
        tether.api.config("sft", model="m", data="d.jsonl", lr=-1)
    with pytest.raises(ConfigError, match="unknown key 'max_step' for sft \\(did you mean 'max_steps'\\?\\)"):
        tether.api.config("sft", model="m", data="d.jsonl", max_step=2)
    with pytest.raises(ConfigError, match="expects a path, a list of records or a datasets.Dataset"):
        tether.api.config("sft", model="m", data={"prompt": "p", "completion": "c"})
    base = tether.api.config("dpo", model="m", data="d.jsonl", beta=0.3)
    assert tether.api.config("dpo", base, lr=1e-3).beta == 0.3  # an object, then keywords over it
    with pytest.raises(ConfigError, match="dpo takes a DPOConfig, got SFTConfig"):
        tether.api.config("dpo", cfg)


def test_the_same_records_give_the_same_file_and_others_another(tmp_path, monkeypatch):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path))
    rows = [{"prompt": "p", "completion": "c"}]
    a, b = tether.api.records_file(rows), tether.api.records_file(list(rows))
    c = tether.api.records_file([{"prompt": "p", "completion": "other"}])
    assert a == b != c and Path(a).read_text() == '{"completion": "c", "prompt": "p"}\n'
