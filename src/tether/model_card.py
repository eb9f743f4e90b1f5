"""The README.md (a Hugging Face model card) tether writes into every model directory it saves.

    write_card(run_dir / "model", "dpo", cfg, summary)

A YAML header the Hub reads (library, tags, the base model and data sets when they are Hub IDs), then what made the
model: the command, its data, the settings that matter, and the run's figures from summary.json once it is known.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tether.config import config_to_dict
from tether.runfiles import write_atomic

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?$")
SHOWN = ("model", "data", "reward", "task", "loss", "beta", "lr", "epochs", "max_steps", "batch_size", "grad_accum",
         "kl_coef", "estimator", "group_size", "lora_r", "seed")


def _is_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and not Path(value).exists()


def card_text(command: str, cfg, summary: dict | None = None) -> str:
    settings = config_to_dict(cfg)
    header = {"library_name": "transformers", "tags": ["tether", command]}
    base = str(settings.get("model", ""))
    if base and _is_hub_id(base):
        header["base_model"] = base.split("@")[0]
    data = [str(settings[k]) for k in ("data", "prompts") if settings.get(k)]
    if any(_is_hub_id(d) for d in data):
        header["datasets"] = [d for d in data if _is_hub_id(d)]
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {Path(settings.get('out', 'model')).name}", "",
             f"Trained with `tether {command}` (tether, a library for training language models from human "
             "preferences).", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{settings[k]}` |" for k in SHOWN if k in settings and settings[k] not in ("", None, [])]
    figures = {k: v for k, v in (summary or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and k != "wall_seconds"}
    if figures:
        lines += ["", "| figure (summary.json) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in figures.items()]
    return "\n".join(lines) + "\n"


def write_card(path: str | Path, command: str, cfg, summary: dict | None = None) -> Path:
    return write_atomic(Path(path) / "README.md", card_text(command, cfg, summary))
