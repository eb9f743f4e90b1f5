"""`tether bench`: run the side-by-side benchmarks of the source checkout's benchmarks/ folder.

    tether bench                          # benchmarks/vs_trl.py: tether vs TRL on a CPU, appends to RESULTS.md
    tether bench suite=vs_trl stages=dpo,grpo repeats=5 append=false
    tether bench suite=gpu                # benchmarks/gpu.py: generation, GRPO and DPO figures on a CUDA device
    tether bench smoke=true               # tiny sizes: checks the scripts run

The benchmarks live beside the package, not in it (TRL is a benchmark-only extra), so this command needs a source
checkout (`pip install -e ".[bench]"`); it runs the script with this Python and returns its exit status.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tether.config import ConfigError, at_least, one_of, opt

SCRIPTS = {"vs_trl": "vs_trl.py", "gpu": "gpu.py"}


@dataclass
class BenchConfig:
    suite: str = opt("vs_trl", "vs_trl (tether vs TRL, CPU) | gpu (generation/GRPO/DPO figures on a GPU)",
                     check=one_of(*sorted(SCRIPTS)))
    stages: str = opt("", "vs_trl: comma list of sft, reward, dpo, grpo (default all); gpu: generate, grpo, dpo")
    repeats: int = opt(0, "runs per measurement, median reported (0 = the script's default)", check=at_least(0))
    threads: int = opt(0, "vs_trl: torch threads (0 = torch's default)", check=at_least(0))
    smoke: bool = opt(False, "tiny model and shapes: seconds, checks that the scripts run")
    append: bool = opt(True, "append the table to benchmarks/RESULTS.md (never with smoke)")
    benchmarks_dir: str = opt("", "folder holding the scripts (default: benchmarks/ of the source checkout)")

    def validate(self) -> None:
        if self.suite not in SCRIPTS:
            raise ConfigError(f"key 'suite' must be one of {sorted(SCRIPTS)}, got {self.suite!r}")


def script_path(cfg: BenchConfig) -> Path:
    folder = Path(cfg.benchmarks_dir) if cfg.benchmarks_dir else Path(__file__).resolve().parents[2] / "benchmarks"
    path = folder / SCRIPTS[cfg.suite]
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: tether bench runs from a source checkout "
                                "(or give benchmarks_dir=DIR)")
    return path


def command(cfg: BenchConfig) -> list[str]:
    """The script's command line for this config."""
    cmd = [sys.executable, str(script_path(cfg))]
    if cfg.stages:
        cmd += ["--stages" if cfg.suite == "vs_trl" else "--parts", cfg.stages]
    if cfg.repeats:
        cmd += ["--repeats", str(cfg.repeats)]
    if cfg.threads and cfg.suite == "vs_trl":
        cmd += ["--threads", str(cfg.threads)]
    if cfg.smoke:
        cmd.append("--smoke")
    if cfg.suite == "vs_trl" and not cfg.append:
        cmd.append("--no-append")
    if cfg.suite == "gpu" and cfg.append and not cfg.smoke:
        cmd.append("--append")
    return cmd


def run(cfg: BenchConfig) -> dict:
    cfg.validate()
    status = subprocess.call(command(cfg))
    if status != 0:
        raise SystemExit(status)
    return {"suite": cfg.suite, "exit_status": status}
