"""SFT -> reward model -> PPO from one config file: `tether pipeline --config pipeline.yaml`.

    # pipeline.yaml: one flat mapping; a stage's own keys carry its name as a prefix
    out: runs/pipe
    model: base-model-dir          # what SFT starts from
    task: reviews                  # optional: gold reward for rm eval and PPO
    sft_data: sft.jsonl
    sft_epochs: 2
    rm_data: prefs.jsonl
    ppo_prompts: prompts.jsonl
    ppo_max_steps: 200

    tether pipeline --config pipeline.yaml ppo_kl_coef=0.1 stages=rm,ppo

Keys: every key of `tether sft` is here as sft_KEY, of `tether rm` as rm_KEY, of `tether ppo` as ppo_KEY (see
`tether pipeline --help`), plus out, model, task, stages, seed and progress, which every stage shares. So the file
stays one flat dataclass that the usual loader checks key by key, and any stage setting can be overridden on the
command line. Empty wiring keys are filled from the stages before: sft_model <- model; rm_model and ppo_model <- the
SFT model (out/sft/model); ppo_reward <- rm:out/rm; rm_task and ppo_task <- task.

Each stage runs in its own subdirectory of `out` (out/sft, out/rm, out/ppo) with its own config.yaml, metrics.jsonl
and summary.json. Running the pipeline again skips every stage that has a summary.json and resumes a stage that
stopped midway from its last checkpoint (stages checkpoint every `<stage>_save_every` steps).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import typing
from dataclasses import dataclass
from pathlib import Path

from tether.config import ConfigError, at_least, load_config, one_of, opt
from tether.tasks import TASKS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: the recipe it runs and the key prefix of its settings."""

    prefix: str
    module: str
    config: str

    def load(self):
        module = importlib.import_module(self.module)
        return module, getattr(module, self.config)


STAGES: dict[str, Stage] = {
    "sft": Stage("sft", "tether.recipes.sft", "SFTConfig"),
    "rm": Stage("rm", "tether.recipes.reward", "RewardConfig"),
    "ppo": Stage("ppo", "tether.recipes.ppo", "PPOConfig"),
}
SHARED = ("out", "seed", "progress", "resume", "resume_changed", "overwrite")  # set by the pipeline, not prefixed


@dataclass
class PipelineBase:
    out: str = opt("runs/pipeline", "run directory; each stage writes into out/<stage>")
    model: str = opt("", "base model directory SFT starts from (required when the sft stage runs)")
    task: str = opt("", "embedded task (reviews, arithmetic): gold reward for rm eval and PPO, PPO prompts",
                    check=one_of("", *TASKS))
    stages: str = opt("sft,rm,ppo", "stages to run, in order (comma list)")
    seed: int = opt(0, "random seed of every stage", check=at_least(0))
    base_seed: int = opt(0, "seed of the task's base-model build when `model` is empty (a separate axis from `seed`)")
    progress: bool = opt(True, "show progress bars")

    def validate(self) -> None:
        unknown = [s for s in self.stage_list() if s not in self.stage_table()]
        if unknown:
            raise ConfigError(f"key 'stages': unknown stage {unknown[0]!r}; choose from {', '.join(self.stage_table())}")

    def stage_list(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()]

    @classmethod
    def stage_table(cls) -> dict[str, Stage]:
        return STAGES


def prefixed_fields(stages: dict[str, Stage], defaults: dict | None = None) -> list[tuple]:
    """(name, type, field) for every setting of every stage recipe, named <prefix>_<key>; `defaults` overrides."""
    defaults, out, seen = defaults or {}, [], set()
    for stage in stages.values():
        if stage.prefix in seen:
            continue
        seen.add(stage.prefix)
        _, cls = stage.load()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in SHARED:
                continue
            name = f"{stage.prefix}_{f.name}"
            # the copy keeps the stage field's allowed range, so a bad <prefix>_<key> fails at load naming that key
            metadata = {"help": f"{stage.prefix}: {f.metadata.get('help', '')}",
                        "derived": f.metadata.get("derived", False), "check": f.metadata.get("check")}
            if name in defaults:
                new = dataclasses.field(default=defaults[name], metadata=metadata)
            elif f.default_factory is not dataclasses.MISSING:
                new = dataclasses.field(default_factory=f.default_factory, metadata=metadata)
            else:
                new = dataclasses.field(default=f.default, metadata=metadata)
            out.append((name, hints[f.name], new))
    return out


PipelineConfig = dataclasses.make_dataclass(
    "PipelineConfig", prefixed_fields(STAGES), bases=(PipelineBase,), namespace={"__module__": __name__})


# --- running stages -------------------------------------------------------------------------------------------------
def stage_settings(cfg, prefix: str) -> dict:
    """The stage's own settings: every <prefix>_<key> of the pipeline config, prefix removed."""
    head = prefix + "_"
    return {f.name[len(head):]: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name.startswith(head)}


def sft_model_dir(cfg) -> str:
    """The policy every later stage starts from: the SFT output when there is one, else the base model."""
    sft = Path(cfg.out) / "sft" / "model"
    return str(sft) if "sft" in cfg.stage_list() or (sft / "config.json").exists() else cfg.model


def wire(cfg, name: str, settings: dict) -> dict:
    """Fill empty model/reward/task keys from the stages before (module docstring)."""
    fill = {
        "sft": {"model": cfg.model},
        "rm": {"model": sft_model_dir(cfg), "task": cfg.task},
        "ppo": {"model": sft_model_dir(cfg), "reward": f"rm:{Path(cfg.out) / 'rm'}", "task": cfg.task},
        "dpo": {"model": sft_model_dir(cfg), "task": cfg.task},
    }.get(cfg.stage_table()[name].prefix, {})
    for key, value in fill.items():
        if key in settings and not settings[key]:
            settings[key] = value
    return settings


def finished(run_dir: Path) -> dict | None:
    """The summary of a stage that completed (summary.json without an error), else None."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return None if "error" in summary else summary


def run_stage(cfg, name: str, overrides: dict | None = None) -> dict:
    """Run one stage in out/<name>: skipped when finished, resumed when it has checkpoints."""
    stage = cfg.stage_table()[name]
    run_dir = Path(cfg.out) / name
    done = finished(run_dir)
    if done is not None:
        log.info("stage %s: finished before (%s), skipped", name, run_dir / "summary.json")
        return done
    module, cls = stage.load()
    known = {f.name for f in dataclasses.fields(cls)}  # recipes sharing a prefix (dpo, dpo online) differ in keys
    settings = {k: v for k, v in wire(cfg, name, stage_settings(cfg, stage.prefix)).items() if k in known}
    settings.update(overrides or {})
    resume = any((run_dir / "checkpoints").glob("step-*/tether_state.json"))
    # a stage that stopped before its first checkpoint has nothing to continue: it starts again in its directory
    settings.update(out=str(run_dir), seed=cfg.seed, progress=cfg.progress, resume=resume, overwrite=not resume)
    try:
        stage_cfg = load_config(cls, None, settings, recipe=name)
    except ConfigError as e:
        raise ConfigError(f"stage {name} (keys {stage.prefix}_*): {e}") from None
    log.info("stage %s -> %s%s", name, run_dir, " (resuming)" if stage_cfg.resume else "")
    return module.run(stage_cfg)


def run(cfg) -> dict:
    """Run the selected stages in order; returns every stage's summary as {"<stage>/<key>": value}."""
    return {f"{name}/{k}": v for name in cfg.stage_list() for k, v in run_stage(cfg, name).items()}
