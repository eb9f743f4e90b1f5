"""Rewards for the benchmarks, and what the code sandbox costs per program.

The GRPO reward of the side-by-side benchmarks lives here, in a file of its own so tether loads it by path
(`rewards=python:benchmarks/bench_rewards.py:share_of_t3`) and TRL gets the same function object.

    python benchmarks/bench_rewards.py --runs 50     # sandbox cost: median ms per program, old vs current

The old sandbox (one process, an audit hook, root-only namespaces by hand) is read from git, the last revision that
has src/tether/rewards/sandbox.py, into a temporary directory and imported from there.
"""

from __future__ import annotations


def share_of_t3(prompts, completions, *args, **kwargs) -> list[float]:
    """The share of completion words equal to t3: cheap and deterministic, the same for both libraries."""
    return [c.split().count("t3") / max(1, len(c.split())) for c in completions]


ADD = "def add(a, b):\n    return a + b\n"
CASES = {  # name -> tests
    "assert (calls)": ["assert add(1, 2) == 3"],
    "check(candidate) (judge)": "def check(f):\n    assert f(1, 2) == 3\n\ncheck(add)\n",
}


def old_sandbox(directory: str, rev: str | None = None):
    """The module src/tether/rewards/sandbox.py as of `rev` (default: the last revision that has it), written
    into `directory` and imported from there."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    path = "src/tether/rewards/sandbox.py"
    if rev is None:
        last = subprocess.run(["git", "rev-list", "-1", "HEAD", "--", path], capture_output=True, text=True,
                              check=True).stdout.strip()
        exists = subprocess.run(["git", "cat-file", "-e", f"{last}:{path}"], capture_output=True).returncode == 0
        rev = last if exists else f"{last}^"
    source = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout
    target = Path(directory) / "old_sandbox.py"  # its child re-reads this file on every run: keep `directory`
    target.write_text(source)
    spec = importlib.util.spec_from_file_location("old_sandbox", target)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_sandbox"] = module
    spec.loader.exec_module(module)
    return module, rev


def median_ms(runners: dict, code: str, tests, runs: int) -> dict[str, float]:
    """Median wall-clock ms per runner over `runs` calls of run(code, tests), after two warm-up calls each; the
    runners take turns within each round, so a change in the machine's load falls on all of them alike."""
    import statistics
    import time

    times = {name: [] for name in runners}
    for i in range(runs + 2):
        for name, run in runners.items():
            start = time.perf_counter()
            result = run(code, tests)
            if i >= 2:
                times[name].append((time.perf_counter() - start) * 1000)
            assert result.passed, result
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> str:
    import os
    import platform
    import subprocess

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine())
    bwrap = subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip() or "no bwrap"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
            f"{bwrap}, uid {os.geteuid()}, load average {load}")


def main() -> None:
    import argparse
    import tempfile

    from tether.rewards.sandbox import SandboxLimits, run_program

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="timed runs per case and sandbox (median reported)")
    parser.add_argument("--old-rev", default=None, help="git revision of the old sandbox.py (default: the last)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tether-old-sandbox-") as tmp:
        old, rev = old_sandbox(tmp, args.old_rev)
        runners = {"old": lambda c, t: old.run_program(c, t, old.SandboxLimits()),
                   "new": lambda c, t: run_program(c, t, SandboxLimits())}
        print(f"machine: {machine()}")
        print(f"old sandbox: git {rev[:10]}; {args.runs} runs each, a trivial correct program (add), median ms")
        for name, tests in CASES.items():
            figures = median_ms(runners, ADD, tests, args.runs)
            print(f"{name:28s} " + "  ".join(f"{w} {ms:6.1f} ms" for w, ms in figures.items()))


if __name__ == "__main__":
    main()
