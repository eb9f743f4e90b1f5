"""Where a recipe's task and prompts come from: a named embedded task, a file, or the task's own splits.

    task = load_task(cfg.task)                                   # None for "" or "none"
    train = load_prompts(cfg.prompts, task, "train", cfg.n_train_prompts, cfg.seed, key="prompts")
    held = load_prompts(cfg.eval_prompts, task, "test", cfg.n_eval_prompts, cfg.seed, key="eval_prompts")
    train, held = train_and_held_out(cfg.prompts, cfg.eval_prompts, task, cfg.n_train_prompts, cfg.n_eval_prompts,
                                     cfg.seed)                 # held out of the training prompts when nothing else

A file gives its first `n` records (all of them for n=None), validated as `kind`; without one, the task's split.
"""

from __future__ import annotations

import random

from tether import data as D
from tether.config import ConfigError
from tether.tasks import get_task


def load_task(name: str):
    """The embedded task module of that name, or None for "" and "none"."""
    return None if name in ("", "none") else get_task(name)


def load_prompts(path: str, task, split: str, n: int | None, seed: int = 0, kind: str = "prompts",
                 key: str = "prompts") -> list[dict]:
    """Prompt records of `path`, or `n` of the task's `split` (seeded); ConfigError naming `key` when neither."""
    if path:
        records = list(D.load_records(path, kind))
        return records if n is None else records[:n]
    if task is None:
        raise ConfigError(f"needs {key}=FILE or task=NAME")
    return task.prompts(split, n, seed=seed)


def train_and_held_out(path: str, eval_path: str, task, n_train: int, n_eval: int, seed: int = 0,
                       kind: str = "prompts") -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompt records: a file or the task's train split, and a file or the task's test split;
    with neither held-out source, a seeded hold-out of `n_eval` (at most a tenth, at least one) of the training
    prompts. A file of one prompt with no held-out source is a ConfigError: nothing would be left to train or to
    evaluate on."""
    train = load_prompts(path, task, "train", None if path else n_train, seed, kind)
    if eval_path or task is not None:
        return train, load_prompts(eval_path, task, "test", n_eval, seed, key="eval_prompts")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    if len(train) < 2:
        raise ConfigError(f"{path}: {len(train)} prompt(s), too few to hold some out for evaluation; give more prompts "
                          "or eval_prompts=FILE")
    n = max(1, min(n_eval, len(train) // 10))
    return [train[i] for i in order[n:]], [train[i] for i in order[:n]]
