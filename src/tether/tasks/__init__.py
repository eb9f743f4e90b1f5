"""Embedded tasks: everything built locally, with a hidden gold reward (see DESIGN.md, "The embedded default").

A task module exposes:
    build_base(out_dir=None, seed=0) -> Path       tokenizer + pretrained tiny causal LM (cached)
    prompts(split, n, seed) -> list[dict]          prompt records ({"prompt": ...}, plus "answer" for arithmetic)
    gold_reward(prompts, completions, records=None) -> list[float]   the hidden "human" taste / the verifier
"""

from __future__ import annotations

import importlib

TASKS = {"reviews": "tether.tasks.reviews", "arithmetic": "tether.tasks.arithmetic", "steps": "tether.tasks.steps",
         "sycophancy": "tether.tasks.sycophancy"}


def get_task(name: str):
    """Import a task module by name (`reviews`, `arithmetic`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return importlib.import_module(TASKS[name])
