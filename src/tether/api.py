"""The Python API: every recipe as a function taking keywords (or a config object), data as files or in memory.

    import tether
    summary = tether.sft(model="Qwen/Qwen2.5-0.5B", data=[{"prompt": "Hi", "completion": "Hello."}], out="runs/sft")
    summary = tether.dpo(model="runs/sft/model", data=pairs_dataset, beta=0.1, out="runs/dpo")   # a datasets.Dataset
    cfg = tether.load_config(tether.recipes.dpo.DPOConfig, "dpo.yaml")        # or a config object, checked again
    summary = tether.run("dpo", cfg)

Each function is `tether <command>`: the same keys, checked the same way (types, ranges, unknown keys with a
suggestion: `load_config`), the same run directory rules, and it returns the summary the CLI prints. A data key
(`data`, `prompts`, `eval_data`, `eval_prompts`, ...) takes a path, a list of dicts or a `datasets.Dataset`;
in-memory records are written once to a file named by a hash of their contents under
~/.cache/tether/inputs/ (TETHER_CACHE), so a run directory's run.json names real files, and a resume with the
same records finds the same file (different records: a different file, and the resume is refused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

from tether.config import ConfigError, config_to_dict, load_config

# the API's names -> (module, config class): the CLI's commands (tether.cli.COMMANDS), as functions
RECIPES = {
    "sft": ("tether.recipes.sft", "SFTConfig"),
    "rm": ("tether.recipes.reward", "RewardConfig"),
    "ppo": ("tether.recipes.ppo", "PPOConfig"),
    "dpo": ("tether.recipes.dpo", "DPOConfig"),
    "dpo_online": ("tether.recipes.online_dpo", "OnlineDPOConfig"),
    "grpo": ("tether.recipes.grpo", "GRPOConfig"),
    "bon": ("tether.recipes.best_of_n", "BoNConfig"),
    "evaluate": ("tether.evaluate", "EvalConfig"),
}
DATA_KEYS = ("data", "eval_data", "prompts", "eval_prompts", "train_prompts", "ptx_data", "normalize_data")


def _inputs_dir() -> Path:
    root = Path(os.environ.get("TETHER_CACHE", Path.home() / ".cache" / "tether"))
    return root / "inputs"


def records_file(records) -> str:
    """A path for in-memory records (a list of dicts or a `datasets.Dataset`): JSONL named by their contents."""
    rows = [dict(r) for r in records]
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    path = _inputs_dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not path.exists():
        from tether.runfiles import write_atomic

        write_atomic(path, text)
    return str(path)


def _as_path(key: str, value: Any) -> Any:
    if value is None or isinstance(value, (str, os.PathLike)):
        return "" if value is None else str(value)
    if isinstance(value, dict):
        raise ConfigError(f"key '{key}' expects a path, a list of records or a datasets.Dataset, got one dict")
    try:
        return records_file(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"key '{key}' expects a path, a list of records or a datasets.Dataset ({e})") from None


def config(name: str, cfg=None, **keys):
    """The recipe's config from a config object and/or keywords, checked as the CLI checks a YAML file."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    module_name, cls_name = RECIPES[name]
    cls = getattr(importlib.import_module(module_name), cls_name)
    values = config_to_dict(cfg) if cfg is not None else {}
    if cfg is not None and not isinstance(cfg, cls):
        raise ConfigError(f"{name} takes a {cls_name}, got {type(cfg).__name__}")
    values.update(keys)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: _as_path(k, v) if k in DATA_KEYS and k in fields else v for k, v in values.items()}
    return load_config(cls, None, values, recipe=name.replace("_", " "))


def run(name: str, cfg=None, **keys) -> dict:
    """Run recipe `name` (see RECIPES) and return its summary."""
    module = importlib.import_module(RECIPES[name][0]) if name in RECIPES else None
    checked = config(name, cfg, **keys)
    return module.run(checked)


def sft(cfg=None, **keys) -> dict:
    """`tether sft`: supervised fine-tuning on demonstrations."""
    return run("sft", cfg, **keys)


def rm(cfg=None, **keys) -> dict:
    """`tether rm`: a Bradley-Terry reward model on comparisons (pairs or rankings)."""
    return run("rm", cfg, **keys)


def ppo(cfg=None, **keys) -> dict:
    """`tether ppo`: PPO against a reward with a KL penalty to the reference policy."""
    return run("ppo", cfg, **keys)


def dpo(cfg=None, **keys) -> dict:
    """`tether dpo`: DPO and its family, offline."""
    return run("dpo", cfg, **keys)


def dpo_online(cfg=None, **keys) -> dict:
    """`tether dpo online`: pairs sampled from the policy round by round."""
    return run("dpo_online", cfg, **keys)


def grpo(cfg=None, **keys) -> dict:
    """`tether grpo`: GRPO, RLOO, Dr. GRPO, REINFORCE++ with verifiable or learned rewards."""
    return run("grpo", cfg, **keys)


def bon(cfg=None, **keys) -> dict:
    """`tether bon`: best-of-N sampling and rejection-sampling fine-tuning."""
    return run("bon", cfg, **keys)


def evaluate(cfg=None, **keys) -> dict:
    """`tether eval`: gold reward, KL, length and diversity of a model on held-out prompts."""
    return run("evaluate", cfg, **keys)
