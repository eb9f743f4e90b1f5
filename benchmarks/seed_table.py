"""The acceptance figures over base-build seeds x training seeds (tether.acceptance), as a table.

    python benchmarks/seed_table.py                          # 3 builds x 3 seeds, every figure, 2 worker processes
    python benchmarks/seed_table.py --builds 0 --seeds 0,1   # a corner of it
    python benchmarks/seed_table.py --append                 # also append the markdown table to RESULTS.md

Each cell runs on one torch thread in its own worker process (two at a time on two cores), the setting the slow
tier runs under (the Makefile exports OMP_NUM_THREADS=1), so on the machine that recorded the table the slow tests'
(0, 0) cell is one of these; another CPU's kernels round differently and give another draw (RESULTS.md). A reviews
cell is one `tether demo stages=sft,rm,ppo,dpo,ipo` (the rm, ppo, dpo and ipo figures, 2-6 minutes); a grpo or
rloo cell one `tether grpo task=arithmetic` (45-100 s). Finished cells are kept in OUT/cells/ and not run
again, so an interrupted table resumes. The result is benchmarks/seed_table.json: every cell, the fingerprint of the
settings it measured (tether.acceptance.settings) and per figure the mean, spread and worst case of the margin
above target.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
TABLE = HERE / "seed_table.json"


def run_cell(job: tuple[str, int, int, str]) -> tuple[str, float]:
    """One cell in a worker: (kind, base seed, seed, out root) -> (the cell's file, seconds)."""
    import torch

    from tether import acceptance

    torch.set_num_threads(1)
    kind, base_seed, seed, root = job
    name = f"{kind}-b{base_seed}-s{seed}"
    path = Path(root) / "cells" / f"{name}.json"
    if path.exists():
        return str(path), 0.0
    t0 = time.time()
    if kind == "reviews":
        cell = acceptance.reviews_cell(base_seed, seed, Path(root) / name)
    else:
        cell = acceptance.arithmetic_cell(kind, base_seed, seed, Path(root) / name)
    seconds = time.time() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seconds": seconds, "figures": cell}, indent=1))
    return str(path), seconds


def describe(figure: dict) -> str:
    if figure["figure"] == "rm":
        return f"{figure['accuracy']:.3f} (Bayes {figure['bayes_accuracy']:.3f})"
    if figure["figure"] in ("grpo", "rloo"):
        return f"{figure['accuracy_start']:.2f} -> {figure['accuracy_end']:.2f}, KL {figure['kl']:.2f}"
    return f"{figure['gain']:+.2f} at KL {figure['kl']:.1f}"


def state(name: str, s: dict) -> str:
    from tether.acceptance import SHORTFALL_ALLOWED, holds

    if s["all_passed"]:
        return "every cell passed"
    if holds(name, s):
        return f"short in some cell, within its allowance of {SHORTFALL_ALLOWED[name]:g}"
    return "MISSED in some cell"


def markdown(table: dict) -> str:
    from tether.acceptance import verdict

    cells, summary = table["cells"], table["summary"]
    builds = sorted({c["base_seed"] for c in cells})
    seeds = sorted({c["seed"] for c in cells})
    units = {"rm": "accuracy points", "ppo": "SFT-std", "dpo": "SFT-std", "ipo": "SFT-std", "grpo": "points",
             "rloo": "points"}
    lines = [f"### Acceptance figures over base builds x training seeds ({table['date']}, fingerprint "
             f"{table['fingerprint']}, {table['threads']} thread per cell)", ""]
    for name, s in summary.items():
        by = {(c["base_seed"], c["seed"]): c for c in cells if c["figure"] == name}
        lines += [f"**{name}** (margin above target, {units[name]}: mean {s['margin_mean']:+.3f}, std "
                  f"{s['margin_std']:.3f}, worst {s['margin_worst']:+.3f}; "
                  f"{state(name, s)})", "",
                  "| build | " + " | ".join(f"seed {s_}" for s_ in seeds) + " |",
                  "|---|" + "---|" * len(seeds)]
        for b in builds:
            row = []
            for s_ in seeds:
                c = by.get((b, s_))
                row.append("" if c is None else describe(c) + ("" if verdict(c)[0] else " (missed)"))
            lines.append(f"| {b} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--builds", default="0,1,2", help="base-build seeds")
    p.add_argument("--seeds", default="0,1,2", help="training seeds")
    p.add_argument("--kinds", default="reviews,grpo,rloo", help="cells to run: reviews (rm, ppo, dpo, ipo), grpo, rloo")
    p.add_argument("--workers", type=int, default=2, help="cells run at once, one thread each")
    p.add_argument("--out", default="runs/seed_table", help="run directories and finished cells")
    p.add_argument("--table", default=str(TABLE), help="where the JSON table goes")
    p.add_argument("--append", action="store_true", help="append the markdown table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    from tether.acceptance import fingerprint, holds, settings, summarise
    from tether.tasks import arithmetic, reviews

    builds = [int(x) for x in args.builds.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for b in builds:  # the bases first, one at a time (each build pins its own threads)
        if "reviews" in kinds:
            reviews.build_base(seed=b)
        if {"grpo", "rloo"} & set(kinds):
            arithmetic.build_base(seed=b)
    jobs = [(k, b, s, args.out) for k in kinds for b in builds for s in seeds]
    jobs.sort(key=lambda j: j[0] != "reviews")  # the long cells first, so the pool ends evenly
    files = []
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for path, seconds in pool.imap_unordered(run_cell, jobs):
            files.append(path)
            print(f"{Path(path).stem}: {seconds:.0f} s", flush=True)
    cells = [f for path in sorted(files) for f in json.loads(Path(path).read_text())["figures"].values()]
    table = {"date": date.today().isoformat(), "fingerprint": fingerprint(), "threads": 1,
             "summary": summarise(cells), "settings": settings(), "cells": cells}
    Path(args.table).write_text(json.dumps(table, indent=1) + "\n")
    text = markdown(table)
    print(text)
    if args.append:
        with open(HERE / "RESULTS.md", "a") as f:
            f.write("\n" + text + "\n")
    return 0 if all(holds(name, s) for name, s in table["summary"].items()) else 1


if __name__ == "__main__":
    sys.exit(main())
