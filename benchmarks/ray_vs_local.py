"""GRPO on `arithmetic`, local backend against backend=ray, by seed: the seed table of issue 20.

    python benchmarks/ray_vs_local.py --seeds 0 1 2 --steps 40          # prints the table, writes runs/ray_vs_local/
    python benchmarks/ray_vs_local.py --smoke                           # a tiny model, 2 steps (seconds, no task)

Cells: local (max_staleness=0), ray (max_staleness=0: the same numbers are expected, since the rollout actor holds
the trainer's exact fp32 weights after every push and draws with the same seeded generator) and ray with
max_staleness=1 (one-step-off rollouts corrected by TIS). Each cell reports the held-out greedy exact match at start
and end, the wall time, and for the stale cell the mean version lag, TIS weight, clipped share and ESS fraction.
One thread per process (OMP_NUM_THREADS=1); the cells run one after the other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

CELLS = {"local": {}, "ray": {"backend": "ray"}, "ray_stale1": {"backend": "ray", "max_staleness": 1}}


def run_cell(name: str, seed: int, steps: int, root: Path, extra: dict, task: str = "arithmetic") -> dict:
    from tether.config import load_config
    from tether.recipes import grpo as G

    keys = {"task": task, "seed": seed, "max_steps": steps, "progress": False, "out": str(root / f"{name}-{seed}"),
            "overwrite": True, **CELLS[name], **extra}
    t0 = time.time()
    summary = G.run(load_config(G.GRPOConfig, None, keys))
    rows = [json.loads(x) for x in (root / f"{name}-{seed}" / "metrics.jsonl").read_text().splitlines()]
    out = {"start": summary.get("accuracy_start", summary.get("reward_start")),
           "end": summary.get("accuracy_end", summary.get("reward_end")), "wall_s": time.time() - t0}
    for key in ("version_lag", "weight_mean", "clipped_share", "ess_fraction", "behaviour_kl"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = statistics.mean(values)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="runs/ray_vs_local")
    ap.add_argument("--task", default="arithmetic", help="the embedded task (its held-out figure: exact match or gold)")
    ap.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts for the start and end figures")
    ap.add_argument("--smoke", action="store_true", help="a tiny in-process model and prompt file, 2 steps")
    args = ap.parse_args(argv)
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    extra = {"n_eval_prompts": args.eval_prompts}
    if args.smoke:
        from tether.testing import save_tiny

        save_tiny(root / "m")
        with open(root / "p.jsonl", "w") as f:
            for i in range(8):
                f.write(json.dumps({"prompt": f"what is {i} + 1 ?", "answer": str(i + 1)}) + "\n")
        extra = {"model": str(root / "m"), "task": "none", "prompts": str(root / "p.jsonl"), "reward": "math",
                 "eval_prompts": str(root / "p.jsonl"), "prompts_per_step": 2, "group_size": 2, "batch_size": 4}
        args.steps, args.seeds = 2, args.seeds[:1]
    table = {name: [run_cell(name, s, args.steps, root, extra, args.task) for s in args.seeds] for name in CELLS}
    (root / "table.json").write_text(json.dumps(table, indent=2))
    print(f"GRPO on {args.task}, {args.steps} steps, seeds {args.seeds}: held-out greedy figure (accuracy or gold)")
    print("| cell | start | end (per seed) | end mean ± sd | wall s (mean) | lag | TIS weight | clipped | ESS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, cells in table.items():
        ends = [c["end"] for c in cells]
        sd = statistics.stdev(ends) if len(ends) > 1 else 0.0
        extra_cols = " | ".join(f"{statistics.mean(c.get(k, float('nan')) for c in cells):.3f}"
                                for k in ("version_lag", "weight_mean", "clipped_share", "ess_fraction"))
        print(f"| {name} | {statistics.mean(c['start'] for c in cells):.3f} | "
              f"{', '.join(f'{e:.3f}' for e in ends)} | {statistics.mean(ends):.3f} ± {sd:.3f} | "
              f"{statistics.mean(c['wall_s'] for c in cells):.0f} | {extra_cols} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
