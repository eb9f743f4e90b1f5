"""Config loading: YAML + key=value overrides, type coercion and errors that name the key."""

from dataclasses import dataclass

import pytest

from tether.config import ConfigError, above, at_least, between, describe, load_config, one_of, opt, save_config


@dataclass
class ToyConfig:
    lr: float = opt(1e-3, "learning rate")
    steps: int = opt(10, "steps")
    name: str = opt("run", "a name")
    packing: bool = opt(False, "pack")
    stages: list[str] = opt(["sft", "rm"], "stages")
    beta: float | None = opt(None, "optional number")


def test_overrides_are_typed():
    cfg = load_config(ToyConfig, None, ["lr=3e-5", "steps=7", "packing=true", "stages=sft,ppo", "beta=0.1"])
    assert (cfg.lr, cfg.steps, cfg.packing, cfg.stages, cfg.beta) == (3e-5, 7, True, ["sft", "ppo"], 0.1)


def test_string_fields_keep_text_verbatim():
    assert load_config(ToyConfig, None, ["name=1e-3"]).name == "1e-3"


def test_yaml_file_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nsteps: 3\n")
    cfg = load_config(ToyConfig, path, ["steps=4"])
    assert (cfg.lr, cfg.steps) == (0.5, 4)


def test_unknown_key_names_key_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'lrr' for toy \(did you mean 'lr'\?\)"):
        load_config(ToyConfig, None, ["lrr=1"])
    path = tmp_path / "c.yaml"
    path.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'stepz'"):
        load_config(ToyConfig, path)


@pytest.mark.parametrize("item,message", [
    ("steps=abc", "key 'steps' expects an integer, got 'abc'"),
    ("steps=1.5", "key 'steps' expects an integer"),
    ("lr=fast", "key 'lr' expects a number, got 'fast'"),
    ("packing=maybe", "key 'packing' expects true/false"),
    ("lr", "expected key=value"),
])
def test_wrong_types_are_clear(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ToyConfig, None, [item])


def test_bad_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(ToyConfig, path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(ToyConfig, path)


def test_save_round_trip_and_describe(tmp_path):
    cfg = load_config(ToyConfig, None, ["steps=5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(ToyConfig, tmp_path / "config.yaml") == cfg
    text = describe(ToyConfig)
    assert "steps=10  (int)  steps" in text and "lr=0.001  (float)  learning rate" in text


@dataclass
class RangedConfig:
    lr: float = opt(1e-3, "learning rate", check=above(0))
    steps: int = opt(10, "steps", check=at_least(1))
    share: float = opt(0.1, "share held out", check=between(0, 1, high_open=True))
    mode: str = opt("a", "a mode", check=one_of("a", "b"))
    ns: list[int] = opt([1, 2], "n values", check=at_least(1))
    cap: float | None = opt(None, "optional", check=above(0))


@pytest.mark.parametrize("override, message", [
    ("lr=0", "key 'lr' must be > 0, got 0.0"),
    ("lr=-1e-4", "key 'lr' must be > 0"),
    ("lr=nan", "key 'lr' must be a finite number, got nan"),
    ("lr=inf", "key 'lr' must be a finite number, got inf"),
    ("steps=0", "key 'steps' must be >= 1, got 0"),
    ("share=1", "key 'share' must be in [0, 1), got 1.0"),
    ("share=-0.5", "key 'share' must be in [0, 1)"),
    ("mode=c", "key 'mode' must be one of a | b, got 'c'"),
    ("ns=1,0", "key 'ns' must be >= 1, got 0"),
])
def test_values_outside_their_range_name_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(RangedConfig, None, [override])
    assert message in str(e.value)


def test_ranges_accept_the_edges_and_none_and_show_in_help():
    cfg = load_config(RangedConfig, None, ["share=0", "steps=1", "mode=b", "cap=none"])
    assert (cfg.share, cfg.steps, cfg.mode, cfg.cap) == (0.0, 1, "b", None)
    text = describe(RangedConfig)
    assert "(float [> 0])" in text and "[in [0, 1)]" in text and "[one of a | b]" in text


@pytest.mark.parametrize("content, message", [(b"\xff\xfe\x00binary", "not a text file"), (None, "is a directory")])
def test_unreadable_config_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(RangedConfig, path)
