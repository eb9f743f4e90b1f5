"""Where a run's metrics go besides metrics.jsonl: TensorBoard, Weights & Biases, MLflow (`report_to=`).

    trackers = open_trackers(["tensorboard", "wandb"], run_dir, cfg, "dpo")   # ConfigError if a library is missing
    for t in trackers: t.log({"loss": 0.69, "eval/loss": 0.7}, step=3)      # logged as train/loss and eval/loss

Names follow TRL's: a metric is logged as train/<name> unless it already says where it comes from (eval/...).
Each tracker is its library's own client: W&B runs offline with WANDB_MODE=offline (its files under
run_dir/wandb), MLflow writes to MLFLOW_TRACKING_URI or, without one, to run_dir/mlruns.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from tether.config import ConfigError, config_to_dict

NAMES = ("tensorboard", "wandb", "mlflow", "none")


def tag(key: str) -> str:
    """TRL's metric names: train/<key>, or the key itself when it already has a prefix (eval/loss)."""
    return key if "/" in key and key.split("/", 1)[0] in ("train", "eval") else f"train/{key}"


def _numbers(metrics: dict) -> dict[str, float]:
    return {tag(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    def __init__(self, run_dir: Path, cfg, command: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, metrics: dict, step: int) -> None:
        for key, value in _numbers(metrics).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, run_dir: Path, cfg, command: str):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tether"), name=run_dir.name, dir=str(run_dir),
                              config=config_to_dict(cfg), job_type=command, reinit="create_new")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_numbers(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class Mlflow:
    def __init__(self, run_dir: Path, cfg, command: str):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", (run_dir / "mlruns").resolve().as_uri()))
        self.run = mlflow.start_run(run_name=f"{command}-{run_dir.name}")
        mlflow.log_params({k: str(v)[:250] for k, v in config_to_dict(cfg).items()})

    def log(self, metrics: dict, step: int) -> None:
        self.mlflow.log_metrics(_numbers(metrics), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check(names: list[str]) -> None:
    """ConfigError, before anything runs, for a tracker whose library is not installed."""
    import importlib.util

    for name in names:
        module = "torch.utils.tensorboard" if name == "tensorboard" else name
        if name != "none" and importlib.util.find_spec(module.split(".")[0]) is None:
            raise ConfigError(f"report_to={name} needs the {PACKAGES[name]} package (pip install {PACKAGES[name]})")


def open_trackers(names: list[str], run_dir: Path, cfg, command: str) -> list:
    return [TRACKERS[name](run_dir, cfg, command) for name in dict.fromkeys(names) if name != "none"]
