"""`tether <command> [--config FILE.yaml] [key=value ...]`: one entry point for every recipe.

    tether sft model=DIR data=demos.jsonl
    tether rm --config rm.yaml lr=1e-5
    tether sft --help              # every key with its type, default and one-line help

A command maps to a recipe module with a flat config dataclass and a `run(cfg)` function. Errors in the config or the
data are printed as one clear line (file, line, field) and exit with status 2; nothing is traced back at the user.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tether.config import ConfigError, describe, load_config
from tether.data import DataError
from tether.engine import NonFiniteError
from tether.runfiles import strict_json

# command words -> (module, config class). Longest match wins, so "rm eval" beats "rm".
COMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("tether.recipes.sft", "SFTConfig"),
    "rm": ("tether.recipes.reward", "RewardConfig"),
    "rm eval": ("tether.recipes.reward_eval", "RMEvalConfig"),
    "rm score": ("tether.recipes.reward_score", "RMScoreConfig"),
    "ppo": ("tether.recipes.ppo", "PPOConfig"),
    "dpo": ("tether.recipes.dpo", "DPOConfig"),
    "dpo online": ("tether.recipes.online_dpo", "OnlineDPOConfig"),
    "grpo": ("tether.recipes.grpo", "GRPOConfig"),
    "bon": ("tether.recipes.best_of_n", "BoNConfig"),
    "pipeline": ("tether.recipes.pipeline", "PipelineConfig"),
    "demo": ("tether.recipes.demo", "DemoConfig"),
    "eval": ("tether.evaluate", "EvalConfig"),
    "eval frontier": ("tether.recipes.frontier", "FrontierConfig"),
    "eval overopt": ("tether.recipes.overopt", "OveroptConfig"),
    "eval sycophancy": ("tether.evaluate_sycophancy", "SycophancyEvalConfig"),
    "rules fit": ("tether.recipes.rules_fit", "RulesFitConfig"),
    "demo sycophancy": ("tether.recipes.sycophancy_demo", "SycophancyDemoConfig"),
    "loop": ("tether.feedback.loop", "LoopConfig"),
    "bench": ("tether.bench", "BenchConfig"),
    "serve": ("tether.serve", "ServeConfig"),
    "label ai": ("tether.feedback.ai_labels", "AILabelConfig"),
    "cai": ("tether.recipes.cai", "CAIConfig"),
}

HELP = {
    "sft": "supervised fine-tuning on demonstrations",
    "rm": "train a Bradley-Terry reward model on comparisons (rm eval / rm score too)",
    "ppo": "PPO against a reward with a KL penalty to the reference model",
    "dpo": "DPO and its family (IPO, cDPO, SimPO, ORPO, KTO), offline (dpo online: sampled round by round)",
    "grpo": "GRPO / RLOO / REINFORCE++ with verifiable or learned rewards",
    "bon": "best-of-N sampling and rejection-sampling fine-tuning",
    "pipeline": "SFT -> RM -> PPO from one config",
    "demo": "the whole pipeline on the embedded `reviews` task, with a report",
    "eval": "score a model on a task: gold reward, KL, length, diversity (eval frontier: reward-vs-KL sweep)",
    "label": "collect human comparisons: sample, serve, add-rater, export",
    "loop": "rounds of sample -> label -> reward model -> PPO",
    "bench": "side-by-side throughput benchmarks",
    "rules": "rules fit FILE.yaml data=pairs.jsonl: Bradley-Terry weights of a rules file (reward=rules:FILE)",
    "serve": "an OpenAI-compatible server for a model directory (completions, chat, /score)",
    "cai": "Constitutional AI's SL stage: critique -> revision rounds -> SFT on the revisions",
}


def _resolve(words: list[str]) -> tuple[str, list[str]]:
    """Split argv into the longest known command and the rest."""
    for n in (2, 1):
        key = " ".join(words[:n])
        if key in COMMANDS:
            return key, words[n:]
    raise SystemExit(f"tether: unknown command {' '.join(words[:1])!r}; run `tether --help`")


def _load(command: str):
    module_name, cls_name = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("tether"):
            raise SystemExit(f"tether {command}: not yet available in this version") from None
        raise
    return module, getattr(module, cls_name)


def quiet_libraries() -> None:
    """tether's own log lines at INFO; the libraries' per-load progress bars and the tied-weights notice on every save
    are noise in a run that loads and saves models many times (the run's own progress bar says where it is)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tether").setLevel(logging.INFO)
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)  # "Removed shared tensor {'lm_head.weight'}"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"


def _label(argv: list[str]) -> int:
    from tether.feedback.cli import main as label_main

    return label_main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0].strip() + "\n\ncommands:")
        for name, text in HELP.items():
            print(f"  {name:<9} {text}")
        return 0
    if argv[0] == "--version":
        from tether import __version__

        print(__version__)
        return 0
    if argv[0] == "label" and argv[1:2] != ["ai"]:  # `label ai` takes key=value like the recipes
        return _label(argv[1:])
    command, rest = _resolve(argv)
    parser = argparse.ArgumentParser(prog=f"tether {command}", add_help=False)
    parser.add_argument("--config", default=None)
    parser.add_argument("-h", "--help", action="store_true")
    args, overrides = parser.parse_known_args(rest)
    module, cls = _load(command)
    positional = getattr(cls, "POSITIONAL", None)  # `tether rules fit FILE` reads as rules=FILE
    if positional and overrides and "=" not in overrides[0] and not overrides[0].startswith("-"):
        overrides = [f"{positional}={overrides[0]}", *overrides[1:]]
    if args.help:
        print(f"usage: tether {command} [--config FILE.yaml] [key=value ...]\n\n{HELP.get(command.split()[0], '')}\n")
        print("keys:\n" + describe(cls))
        return 0
    unknown_flags = [o for o in overrides if o.startswith("-")]
    if unknown_flags:
        print(f"tether {command}: unknown option {unknown_flags[0]}; settings are key=value", file=sys.stderr)
        return 2
    if command == "dpo" and any(o.split("=", 1)[0] == "online" for o in overrides):
        print("tether dpo: online DPO is a command of its own: `tether dpo online key=value ...`", file=sys.stderr)
        return 2
    quiet_libraries()
    try:
        cfg = load_config(cls, args.config, overrides, recipe=command)
        summary = module.run(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"tether {command}: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # the run stopped itself; what it kept is named in the message
        print(f"tether {command}: stopped: {e}", file=sys.stderr)
        return 3
    except OSError as e:  # a read-only or full disk, a permission: one line, not a traceback
        print(f"tether {command}: cannot write {e.filename or 'a file'}: {e.strerror or e}", file=sys.stderr)
        return 2
    if isinstance(summary, dict):
        print(strict_json({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
