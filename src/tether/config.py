"""Configs: one flat dataclass per recipe, loaded from YAML plus `key=value` overrides, validated.

    cfg = load_config(SFTConfig, "sft.yaml", ["lr=3e-5", "lora_r=8"])

Every field is declared with `opt(default, "one-line help", check=...)`; the help and the allowed range become
`tether <command> --help`. Unknown keys, values of the wrong type and values outside their range are errors that name
the key (and the file when it came from one). Every float must be finite.

    lr: float = opt(1e-4, "peak learning rate", check=above(0))
    lr_schedule: str = opt("linear", "schedule", check=one_of("constant", "linear", "cosine"))
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key that does not exist, or a value that does not fit its field."""


@dataclasses.dataclass(frozen=True)
class Check:
    """The values a field allows: `ok(value)` and a phrase for messages and `--help` ("> 0", "in [0, 1)")."""

    ok: Any
    text: str

    def __str__(self) -> str:
        return self.text


def above(low: float) -> Check:
    return Check(lambda v: v > low, f"> {low:g}")


def at_least(low: float) -> Check:
    return Check(lambda v: v >= low, f">= {low:g}")


def between(low: float, high: float, high_open: bool = False) -> Check:
    """low <= v <= high (v < high with `high_open`)."""
    return Check(lambda v: low <= v and (v < high if high_open else v <= high),
                 f"in [{low:g}, {high:g}{')' if high_open else ']'}")


def one_of(*choices: str) -> Check:
    return Check(lambda v: v in choices, "one of " + " | ".join(choices))


def opt(default: Any, help: str, derived: bool = False, check: Check | None = None) -> Any:
    """A config field with a default, a one-line help text and the values it allows (`derived` fields are filled
    by the recipe). A list field's check applies to each item."""
    metadata = {"help": help, "derived": derived, "check": check}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_ranges(cfg) -> None:
    """ConfigError naming the first field whose value is outside its declared check, or a float that is not finite."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"key '{f.name}' must be a finite number, got {item!r}")
            check = f.metadata.get("check")
            if check is not None and item is not None and not check.ok(item):
                raise ConfigError(f"key '{f.name}' must be {check}, got {item!r}")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Turn a YAML/CLI value into the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key, where)
    if origin is list:
        (inner,) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):  # `ns=4`: YAML read one number
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}key '{key}' expects a list, got {value!r}")
        return [_coerce(v, inner, key, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and _is_int(value))):
            raise ConfigError(f"{where}key '{key}' expects an integer, got {value!r}")
        return int(value)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}key '{key}' expects a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}key '{key}' expects a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _unknown(key: str, known: list[str], where: str, recipe: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}unknown key '{key}' for {recipe}{hint}; `tether {recipe} --help` lists the keys")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`["lr=3e-5", "out=runs/x"]` -> {"lr": "3e-5", ...}; values are parsed as YAML scalars later."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


# TRL's names for keys tether has under another name: a TRL YAML runs with few edits. A value may need converting.
TRL_ALIASES: dict[str, tuple[str, Any]] = {
    "learning_rate": ("lr", None),
    "per_device_train_batch_size": ("batch_size", None),
    "gradient_accumulation_steps": ("grad_accum", None),
    "output_dir": ("out", None),
    "model_name_or_path": ("model", None),
    "num_train_epochs": ("epochs", None),
    "logging_steps": ("log_every", None),
    "save_steps": ("save_every", None),
    "save_total_limit": ("keep_checkpoints", None),
    "lr_scheduler_type": ("lr_schedule", None),
    "max_prompt_length": ("max_prompt_len", None),
    "max_completion_length": ("max_completion_len", None),
    "num_generations": ("group_size", None),
    "loss_type": ("loss", None),
    "bf16": ("mixed_precision", lambda v: "bf16" if _truthy(v) else "no"),
    "fp16": ("mixed_precision", lambda v: "fp16" if _truthy(v) else "no"),
}
NOT_ALIASED = {"max_length": "tether cuts prompts and completions separately: set max_prompt_len and "
                             "max_completion_len (their sum is TRL's max_length)"}
_NOTED: set[tuple[str, str]] = set()


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"))


def resolve_alias(cls, key: str, value: Any) -> tuple[str, Any]:
    """(tether key, value) for a key given under another name: the recipe's own renamed keys (`ALIASES` on the
    config class: old name -> new) or TRL's (TRL_ALIASES), each noted once on stderr; other keys unchanged."""
    names = {f.name for f in dataclasses.fields(cls)}
    if key in names:
        return key, value
    if key in NOT_ALIASED:
        raise ConfigError(f"key '{key}' (TRL's): {NOT_ALIASED[key]}")
    own = getattr(cls, "ALIASES", {})
    target, convert = (own[key], None) if key in own else TRL_ALIASES.get(key, (None, None))
    if target is None or target not in names:
        return key, value
    if (cls.__name__, key) not in _NOTED:
        _NOTED.add((cls.__name__, key))
        print(f"tether: key '{key}' is '{target}' here; read as {target}", file=sys.stderr)
    return target, (convert(value) if convert else value)


def load_config(cls, path: str | Path | None = None, overrides: list[str] | dict | None = None, recipe: str = ""):
    """Build `cls` from an optional YAML file and `key=value` overrides (the overrides win). Keys under TRL's or
    an older name are read as tether's (`resolve_alias`)."""
    recipe = recipe or cls.__name__.removesuffix("Config").lower()
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    if path:
        where = f"{path}: "
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a YAML config file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a text file (invalid UTF-8 at byte {e.start})") from None
        except PermissionError:
            raise ConfigError(f"{path}: not readable (permission denied)") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
        for key, value in loaded.items():
            key, value = resolve_alias(cls, str(key), value)
            if key not in types_:
                raise _unknown(str(key), list(types_), where, recipe)
            values[key] = _coerce(value, types_[key], key, where)
    items = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or []))
    for key, raw in items.items():
        key, raw = resolve_alias(cls, key, raw)
        if key not in types_:
            raise _unknown(key, list(types_), "", recipe)
        value = yaml.safe_load(raw) if isinstance(raw, str) and raw != "" else raw
        if types_[key] is str or typing.get_args(types_[key]) == (str, type(None)):
            value = raw  # keep strings verbatim: "1e-3" stays a string for str fields
        values[key] = _coerce(value, types_[key], key, "")
    cfg = cls(**values)
    check_ranges(cfg)
    validate = getattr(cfg, "validate", None)
    if validate:
        validate()
    return cfg


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    from tether.runfiles import write_atomic

    write_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe(cls) -> str:
    """One line per field: name, type, default and help (the body of `--help`)."""
    lines = []
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = getattr(types_[f.name], "__name__", str(types_[f.name]).replace("typing.", ""))
        check = f.metadata.get("check")
        allowed = f" [{check}]" if check is not None else ""
        lines.append(f"  {f.name}={default!r}  ({tp}{allowed})  {f.metadata.get('help', '')}")
    return "\n".join(lines)
