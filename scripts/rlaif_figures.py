"""The embedded RLAIF figures (#22) over seeds: AI-label agreement, swap averaging's gain, SL-CAI rounds, direct scores.

    OMP_NUM_THREADS=1 python scripts/rlaif_figures.py --seeds 0 1 2 --pairs 2000 --cai-prompts 128 --out runs/rlaif

Per seed s (a fresh comparison set and fresh responses; one judge build, seed 0):
- labels: `reviews.preference_pairs(n, seed=s)` (SFT-like pairs labelled by the simulated raters, τ = 1) judged with
  the `reviews` constitution (pointwise labels): agreement with gold, with the raters' labels, the raters' own
  agreement with gold, the Bayes ceiling, ECE against the raters; and the same pairs judged pairwise (its
  `labels: pairwise`): agreement with gold swap-averaged and first order only, position consistency;
- ood (with --ood-policy): pairs the SFT data never covers, a β = 0 PPO policy's samples against the SFT policy's on
  the same held-out prompts, labelled by the judge and by reward models (--ood-rm): agreement with gold;
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


def ood_agreement(judge, policy: str, sft: str, rm_dirs: list[str], prompts: list[dict], seed: int) -> dict:
    """Agreement with gold of the judge and of each reward model on (PPO sample, SFT sample) pairs of one prompt."""
    from tether.feedback.ai_labels import agreement
    from tether.generation import sample_records
    from tether.models import load_causal_lm, load_tokenizer
    from tether.rewards.spec import reward_from_spec
    from tether.tasks import reviews as R

    tok = load_tokenizer(sft)

    def samples(model_dir, s):
        model = load_causal_lm(model_dir).eval()
        return sample_records(model, tok, prompts, 2, max_new_tokens=48, temperature=1.0,
                              generator=torch.Generator().manual_seed(s), batch_size=64)

    ppo, base = samples(policy, 2 * seed + 1), samples(sft, 2 * seed + 2)
    texts, a, b = ppo.prompts, ppo.completions, base.completions
    ga, gb = R.gold_reward(texts, a), R.gold_reward(texts, b)
    decided = [i for i in range(len(a)) if ga[i] != gb[i]]
    truth = [ga[i] > gb[i] for i in decided]
    probs = [v.prob for v in judge.compare(texts, a, b)]
    out = {"pairs": len(decided), "ppo_better_gold": sum(truth) / len(decided),
           "judge": agreement([probs[i] for i in decided], truth)}
    for d in rm_dirs:
        rm = reward_from_spec(f"rm:{d}", batch_size=64)
        sa, sb = (rm(texts, x, [{}] * len(x)).scores.tolist() for x in (a, b))
        out[f"rm:{Path(d).name}"] = agreement([0.5 if sa[i] == sb[i] else float(sa[i] > sb[i]) for i in decided],
                                              truth)
    return out


def one_seed(judge, constitution, seed: int, n_pairs: int, n_cai: int, args=None) -> dict:
    import dataclasses

    from tether.feedback.ai_labels import label_pairs, summarise
    from tether.recipes.cai import revise_rounds
    from tether.rewards.judge import Judge
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
    pairwise = Judge(judge.backend, dataclasses.replace(constitution, labels="pairwise"))
    out["labels_pairwise"] = summarise(pairs, label_pairs(pairwise, pairs, constitution.name), R, tau=1.0)
    if args is not None and args.ood_policy:
        held_out = [{"prompt": p["prompt"]} for p in R.prompts("test", args.ood_prompts, seed)]
        out["ood"] = {Path(pol).parent.name: ood_agreement(judge, pol, args.sft, args.ood_rm, held_out, seed)
                      for pol in args.ood_policy}

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
    rows = [("AI labels (pointwise) vs gold", [r["labels"]["agreement_gold"] for r in results]),
            ("simulated raters vs gold", [r["labels"]["human_agreement_gold"] for r in results]),
            ("AI labels (pointwise) vs raters' labels", [r["labels"]["agreement_human"] for r in results]),
            ("Bayes ceiling (vs raters)", [r["labels"]["bayes_ceiling"] for r in results]),
            ("ECE (pointwise) vs raters", [r["labels"]["ece_human"] for r in results]),
            ("pairwise labels vs gold (swap-averaged)", [r["labels_pairwise"]["agreement_gold"] for r in results]),
            ("pairwise labels vs gold (one order)",
             [r["labels_pairwise"]["agreement_gold_one_order"] for r in results]),
            ("pairwise labels vs raters' labels", [r["labels_pairwise"]["agreement_human"] for r in results]),
            ("pairwise position consistency", [r["labels_pairwise"]["position_consistency"] for r in results]),
            ("direct score: Spearman with gold", [r["score_spearman_gold"] for r in results])]
    for policy in results[0].get("ood", {}):
        for key in results[0]["ood"][policy]:
            if key != "pairs":
                rows.append((f"off-distribution pairs ({policy}): {key}", [r["ood"][policy][key] for r in results]))
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
    ap.add_argument("--ood-policy", nargs="*", default=[], help="β = 0 PPO policy directories (their model/)")
    ap.add_argument("--ood-rm", nargs="*", default=[], help="reward model directories to compare with the judge")
    ap.add_argument("--sft", default="", help="the SFT policy the PPO policies started from")
    ap.add_argument("--ood-prompts", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from tether.rewards.constitution import load_constitution
    from tether.rewards.judge import Judge, LocalBackend

    constitution = load_constitution("reviews")
    judge = Judge(LocalBackend(args.judge), constitution) if args.judge else Judge.from_constitution(constitution)
    results = []
    for seed in args.seeds:
        results.append(one_seed(judge, constitution, seed, args.pairs, args.cai_prompts, args))
        print(json.dumps(results[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
