"""Did a change keep every number? Short runs of every recipe on the reviews base, here and at another revision.

    python scripts/same_numbers.py                  # this working tree against HEAD
    python scripts/same_numbers.py --rev d114e5c    # against any revision (checked out into a temporary worktree)
    python scripts/same_numbers.py --only grpo,rloo # SFT and the RM (the others start from them), then these runs

For a refactor that claims "behaviour unchanged": SFT, the reward model (rankings), PPO (full and LoRA), DPO with
RPO's term, IPO, online DPO, GRPO, RLOO with dynamic sampling and LoRA, best-of-N with a fine-tuning round, and
`tether eval`, each a few steps on the task's base model, one thread, once with each source tree. Every number of
summary.json, metrics.jsonl, evals.jsonl and rounds.jsonl (timings and memory left out) and every samples file are
compared; the script prints those that differ and exits 1 if any do. About 5 minutes per tree on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("time", "second", "memory", "wall", "tokens_per")  # timings differ run to run


def runs(sft: str, rm: str, data: Path, online: list[str]) -> dict[str, list[str]]:
    """name -> `tether` arguments of each short run (sft and rm first: the others start from them)."""
    eval_ = ["task=reviews", "n_eval_prompts=8"]
    return {
        "ppo": ["ppo", f"model={sft}", f"reward=rm:{rm}", "max_steps=2", "rollout_batch=16", "num_minibatches=2",
                "batch_size=8", *eval_],
        "ppo_lora": ["ppo", f"model={sft}", f"reward=rm:{rm}", "max_steps=2", "rollout_batch=8", "num_minibatches=2",
                     "batch_size=4", "task=reviews", "n_eval_prompts=4", "lora_r=4", "lr=1e-3", "eval_every=1"],
        "dpo": ["dpo", f"model={sft}", f"data={data / 'rankings.jsonl'}", "max_steps=3", "batch_size=8", *eval_,
                "rpo_alpha=0.1", "lr=1e-3"],
        "ipo": ["dpo", f"model={sft}", f"data={data / 'prefs.jsonl'}", "max_steps=2", "batch_size=8", "loss=ipo",
                "beta=0.25", "lr=1e-3"],
        "online": [*online, f"model={sft}", "task=reviews", "rounds=2", "pairs_per_round=8", "max_steps=1",
                   "batch_size=4", "n_eval_prompts=4", "max_new_tokens=16", "lr=1e-3"],
        "grpo": ["grpo", f"model={sft}", "task=reviews", "max_steps=2", "prompts_per_step=4", "group_size=4",
                 "batch_size=8", "n_eval_prompts=8", "max_new_tokens=12", "n_train_prompts=64"],
        "rloo": ["grpo", f"model={sft}", "task=reviews", "max_steps=2", "prompts_per_step=4", "group_size=4",
                 "batch_size=8", "n_eval_prompts=8", "max_new_tokens=12", "n_train_prompts=64", "estimator=rloo",
                 "dynamic_sampling=true", "lora_r=4"],
        "bon": ["bon", f"model={sft}", f"reward=rm:{rm}", "task=reviews", "n=4", "n_prompts=6", "sft=true",
                "n_train_prompts=6", "sft_max_steps=2"],
    }


def tether(src: Path, args: list[str], out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    extra = [] if args[0] == "eval" else ["progress=false"]
    code = "import sys; from tether.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, *args, *extra, f"out={out}"], env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"{src}: tether {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def numbers(out: Path) -> dict:
    """Every number of the run files under `out` (by file, line and key) and the text of every samples file."""
    found = {}
    for f in sorted(out.rglob("*.json*")):
        if f.name not in ("summary.json", "metrics.jsonl", "evals.jsonl", "rounds.jsonl"):
            continue
        rows = [json.loads(x) for x in f.read_text().splitlines() if x] if f.suffix == ".jsonl" else \
            [json.loads(f.read_text())]
        if f.name == "evals.jsonl":
            rows.sort(key=lambda r: r.get("step", 0))
        for i, row in enumerate(rows):
            for key, value in row.items():
                if isinstance(value, (int, float)) and not any(s in key for s in SKIP):
                    found[f"{f.relative_to(out)}[{i}].{key}"] = value
    for f in sorted(out.rglob("samples*.jsonl")):
        found[str(f.relative_to(out))] = f.read_text()
    return found


def measure(src: Path, out: Path, data: Path, base: str, only: list[str] | None = None) -> dict:
    tether(src, ["sft", f"model={base}", f"data={data / 'sft.jsonl'}", "max_steps=4", "batch_size=8", "lr=1e-3"],
           out / "sft")
    sft = str(out / "sft" / "model")
    tether(src, ["rm", f"model={sft}", f"data={data / 'rankings.jsonl'}", "max_steps=4", "batch_size=4",
                 f"eval_data={data / 'prefs_test.jsonl'}", "task=reviews", "normalize_max=40"], out / "rm")
    rm = str(out / "rm" / "model")
    commands = json.loads(subprocess.run(
        [sys.executable, "-c", "import json; from tether.cli import COMMANDS; print(json.dumps(list(COMMANDS)))"],
        env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True, check=True).stdout)
    online = ["dpo", "online"] if "dpo online" in commands else ["dpo", "online=true"]  # before/after the split
    for name, args in runs(sft, rm, data, online).items():
        if only is None or name in only:
            tether(src, args, out / name)
    if only is not None and "eval" not in only:
        return numbers(out)
    tether(src, ["eval", f"model={out / 'dpo' / 'model'}", f"ref_model={sft}", "task=reviews", "n_prompts=6",
                 "n_samples=2", f"reward=rm:{rm}"], out / "eval")
    return numbers(out)


def same(a, b) -> bool:
    """Equal, NaN counting as equal to NaN (a metric undefined in both runs)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="HEAD", help="the revision to compare this working tree against")
    ap.add_argument("--only", default="", help="comma list of the runs to compare (default: all); sft and rm "
                                               "always run")
    args = ap.parse_args(argv)
    only = [x for x in args.only.split(",") if x] or None
    from tether.tasks import reviews

    base = str(reviews.build_base(seed=0))
    with tempfile.TemporaryDirectory(prefix="tether-same-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        reviews.write_data(data, n_sft=200, n_pairs=200, n_rankings=60, n_test_pairs=50)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "old"), args.rev],
                       check=True, capture_output=True)
        try:
            old = measure(tmp / "old" / "src", tmp / "runs-old", data, base, only)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "old")], check=False)
        new = measure(ROOT / "src", tmp / "runs-new", data, base, only)
    differ = [k for k in sorted(set(old) | set(new)) if not same(old.get(k, "(absent)"), new.get(k, "(absent)"))]
    for key in differ:
        show = lambda v: "(text)" if isinstance(v, str) else v  # noqa: E731
        print(f"{key}: {show(old.get(key, '(absent)'))} -> {show(new.get(key, '(absent)'))}")
    print(f"{len(old)} numbers and samples files at {args.rev}, {len(differ)} different in this tree")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
