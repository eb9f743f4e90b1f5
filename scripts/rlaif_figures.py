"""The embedded RLAIF figures (#22) over seeds: AI-label agreement, swap averaging's gain, SL-CAI rounds, direct scores.

    OMP_NUM_THREADS=1 python scripts/rlaif_figures.py --seeds 0 1 2 --pairs 2000 --cai-prompts 128 --out runs/rlaif

Per seed s (a fresh comparison set and fresh responses; one judge build, seed 0):
- labels: `reviews.preference_pairs(n, seed=s)` (SFT-like pairs labelled by the simulated raters, τ = 1) judged with
  the `reviews` constitution: agreement with gold (swap-averaged and first order only), with the raters' labels, the
  raters' own agreement with gold, the Bayes ceiling, position consistency, ECE against the raters;
- sl_cai: SFT-like responses (`reviews.completion_for`) and loop-like ones (the same with a phrase repeated 3-6
  times) revised for 2 rounds by the judge; mean gold per round;
- score: Spearman correlation of the judge's rescaled 1-10 score with gold on SFT-like and degenerate texts.
Writes OUT/figures.json and prints a markdown table of mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def looped(rng: random.Random, text: str) -> str:
    toks = text.split()
    i = rng.randrange(max(1, len(toks) - 1))
    return " ".join(toks[:i] + toks[i:i + 2] * rng.randint(3, 6) + toks[i:])


def one_seed(judge, constitution, seed: int, n_pairs: int, n_cai: int) -> dict:
    from tether.feedback.ai_labels import label_pairs, summarise
    from tether.recipes.cai import revise_rounds
    from tether.tasks import reviews as R
    from tether.tasks import reviews_judge as RJ

    out, t0 = {"seed": seed}, time.time()
    raw = R.preference_pairs(n_pairs, seed=seed, tau=1.0)
    flip = random.Random(f"order-{seed}")  # which response is shown first is a coin flip, not the raters' choice
    pairs = []
    for p in raw:
        first = flip.random() < 0.5
        a, b = (p["chosen"], p["rejected"]) if first else (p["rejected"], p["chosen"])
        pairs.append({"prompt": p["prompt"], "a": a, "b": b, "human": first})
    records = label_pairs(judge, pairs, constitution.name)
    out["labels"] = summarise(pairs, records, R, tau=1.0)
    out["labels"]["seconds"] = time.time() - t0

    rng = random.Random(f"cai-figures-{seed}")
    prompts = [p["prompt"] for p in R.prompts("train", n_cai, seed)]
    ordinary = [R.completion_for(rng, rng.choice(R.MOODS)) for _ in prompts]
    loops = [looped(rng, r) for r in ordinary]
    for name, responses in (("ordinary", ordinary), ("loop", loops)):
        history = revise_rounds(judge, constitution, prompts, responses, 2, False, random.Random(seed), 48)
        out[f"cai_{name}"] = [statistics.mean(R.gold_reward(prompts, responses))] + [
            statistics.mean(R.gold_reward(prompts, [h[r]["revision"] for h in history])) for r in range(2)]

    texts = [R.completion_for(rng, rng.choice(R.MOODS)) for _ in range(n_cai)]
    texts += [RJ.corrupted(rng, t) for t in texts]
    scores = judge.score([rng.choice(prompts) for _ in texts], texts)
    out["score_spearman_gold"] = spearman(scores, R.gold_reward(None, texts))
    out["seconds"] = time.time() - t0
    return out


def table(results: list[dict]) -> str:
    def cell(values):
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else \
            f"{values[0]:.3f}"
    rows = [("AI labels vs gold (swap-averaged)", [r["labels"]["agreement_gold"] for r in results]),
            ("AI labels vs gold (one order)", [r["labels"]["agreement_gold_one_order"] for r in results]),
            ("simulated raters vs gold", [r["labels"]["human_agreement_gold"] for r in results]),
            ("AI labels vs raters' labels", [r["labels"]["agreement_human"] for r in results]),
            ("Bayes ceiling (vs raters)", [r["labels"]["bayes_ceiling"] for r in results]),
            ("position consistency", [r["labels"]["position_consistency"] for r in results]),
            ("ECE vs raters", [r["labels"]["ece_human"] for r in results]),
            ("direct score: Spearman with gold", [r["score_spearman_gold"] for r in results])]
    for name in ("ordinary", "loop"):
        for k in range(3):
            rows.append((f"SL-CAI {name} responses: gold after round {k}", [r[f"cai_{name}"][k] for r in results]))
    seeds = ", ".join(str(r["seed"]) for r in results)
    return "\n".join([f"| figure (seeds {seeds}) | mean ± std |", "|---|---|"] +
                     [f"| {name} | {cell(v)} |" for name, v in rows])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--cai-prompts", type=int, default=128)
    ap.add_argument("--judge", default="", help="a judge model directory instead of the built-in reviews judge")
    ap.add_argument("--out", default="runs/rlaif")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from tether.rewards.constitution import load_constitution
    from tether.rewards.judge import Judge, LocalBackend

    constitution = load_constitution("reviews")
    judge = Judge(LocalBackend(args.judge), constitution) if args.judge else Judge.from_constitution(constitution)
    results = []
    for seed in args.seeds:
        results.append(one_seed(judge, constitution, seed, args.pairs, args.cai_prompts))
        print(json.dumps(results[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
