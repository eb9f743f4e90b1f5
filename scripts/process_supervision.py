"""Process vs outcome supervision on the embedded `steps` task, as a seed table (Lightman et al. 2023, DeepSeekMath).

    OMP_NUM_THREADS=1 python scripts/process_supervision.py --seeds 0 1 2 --out runs/process

Per seed, from the task's base model (tether.tasks.steps.build_base):
1. sample `--train-prompts` x `--per-prompt` solutions of training problems at T = 1; label each one twice from the
   same sample (tasks.steps.labelled_samples): step labels from checking every intermediate result (PRM data) and
   the outcome label from the final answer (ORM data);
2. `tether rm` trains a PRM on the step labels and an ORM on the outcome labels (same base, same settings);
3. best-of-n on `--test-prompts` held-out problems, N = `--samples` solutions each: the accuracy of the answer picked
   by the PRM (Π_k p_k), by the ORM (p at the EOS) and by majority vote over final answers, for n = 1..N (PRM and
   ORM by the unbiased estimator metrics.unbiased_bon_estimate, majority vote by `--vote-draws` random n-subsets);
4. GRPO from the base with reward=prm:DIR (the process-supervision advantage) and with reward=rm:ORM (outcome
   supervision), the same settings; held-out greedy accuracy and step accuracy at the end, and the sampled (T = 1)
   accuracy of 4 samples per held-out problem.
Writes <out>/seed-<s>/... and <out>/table.json, <out>/table.md (mean and spread = sample std over seeds).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from tether import data as D
from tether.config import load_config
from tether.generation import sample_records
from tether.metrics import unbiased_bon_estimate
from tether.models import load_causal_lm, load_tokenizer
from tether.recipes import grpo as G
from tether.recipes.reward import RewardConfig
from tether.recipes.reward import run as run_rm
from tether.rewards.learned import LearnedReward
from tether.rewards.prm import PRMReward, majority_answer
from tether.tasks import steps as S


def sample(model_dir, records, k, seed, max_new_tokens=24):
    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir).eval()
    g = torch.Generator().manual_seed(seed)
    return sample_records(model, tok, records, k, max_new_tokens=max_new_tokens, temperature=1.0, generator=g,
                          batch_size=512)


def train_rms(base, work: Path, seed: int, args) -> tuple[Path, Path, dict]:
    train = S.prompts("train", args.train_prompts, seed=seed)
    s = sample(base, train, args.per_prompt, seed)
    prm, orm = S.labelled_samples(s.records, s.completions)
    D.write_jsonl(work / "prm.jsonl", prm)
    D.write_jsonl(work / "orm.jsonl", orm)
    common = [f"model={base}", "progress=false", f"seed={seed}", f"lr={args.rm_lr}", f"epochs={args.rm_epochs}",
              "batch_size=32", "eval_fraction=0.1"]
    sp = run_rm(load_config(RewardConfig, None, common + [f"data={work / 'prm.jsonl'}", f"out={work / 'prm'}"],
                            recipe="rm"))
    so = run_rm(load_config(RewardConfig, None, common + [f"data={work / 'orm.jsonl'}", f"out={work / 'orm'}"],
                            recipe="rm"))
    info = {"train_samples": len(prm), "train_outcome_right": sum(r["label"] for r in orm) / len(orm),
            "prm_step_accuracy": sp["eval_step_accuracy"], "prm_solution_accuracy": sp["eval_solution_accuracy"],
            "orm_solution_accuracy": so["eval_solution_accuracy"]}
    return work / "prm", work / "orm", info


def best_of_n(base, prm_dir, orm_dir, seed: int, args) -> dict:
    test = S.prompts("test", args.test_prompts, seed=seed)
    s = sample(base, test, args.samples, 10_000 + seed)
    prompts, completions, records = s.prompts, s.completions, s.records
    prm = PRMReward(prm_dir, device="cpu", batch_size=256)(prompts, completions, records).scores.tolist()
    orm = LearnedReward(orm_dir, device="cpu", batch_size=256)(prompts, completions, records).scores.tolist()
    gold = S.gold_reward(prompts, completions, records)
    answers = [S.final_answer(c) for c in completions]
    rng = random.Random(seed)
    N, ns = args.samples, [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= args.samples]
    table = {f"{k}@{n}": 0.0 for n in ns for k in ("prm", "orm", "vote")}
    for i, record in enumerate(test):
        rows = slice(i * N, (i + 1) * N)
        for n in ns:
            table[f"prm@{n}"] += unbiased_bon_estimate(prm[rows], gold[rows], n) / len(test)
            table[f"orm@{n}"] += unbiased_bon_estimate(orm[rows], gold[rows], n) / len(test)
            hits = 0
            for _ in range(args.vote_draws):
                picked = rng.sample(answers[rows], n)
                hits += majority_answer(picked, rng) == record["answer"]
            table[f"vote@{n}"] += hits / args.vote_draws / len(test)
    table["sample_accuracy"] = sum(gold) / len(gold)
    return table


def grpo(base, reward: str, out: Path, seed: int, args) -> dict:
    cfg = load_config(G.GRPOConfig, None, [f"model={base}", "task=steps", f"reward={reward}", f"out={out}",
                                           f"seed={seed}", f"max_steps={args.grpo_steps}", "prompts_per_step=16",
                                           "group_size=8", "max_new_tokens=24", "batch_size=128", "beta=0.0",
                                           f"lr={args.grpo_lr}", "n_eval_prompts=200", "progress=false"],
                      recipe="grpo")
    summary = G.run(cfg)
    test = S.prompts("test", 200, seed=0)
    s = sample(out / "model", test, 4, 20_000 + seed)
    summary["sampled_accuracy_end"] = sum(S.gold_reward(None, s.completions, s.records)) / len(s.completions)
    summary["sampled_step_accuracy_end"] = sum(S.step_accuracy(None, s.completions, s.records)) / len(s.completions)
    return summary


def table_md(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float))]
    lines = ["| figure | mean | spread (std) | per seed |", "|---|---|---|---|"]
    for k in keys:
        values = [r[k] for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {k} | {statistics.mean(values):.3f} | {spread:.3f} | "
                     + ", ".join(f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/process")
    p.add_argument("--train-prompts", type=int, default=400)
    p.add_argument("--per-prompt", type=int, default=8)
    p.add_argument("--rm-lr", type=float, default=1e-3)
    p.add_argument("--rm-epochs", type=float, default=2.0)
    p.add_argument("--test-prompts", type=int, default=100)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--vote-draws", type=int, default=50)
    p.add_argument("--grpo-steps", type=int, default=30)
    p.add_argument("--grpo-lr", type=float, default=5e-5)
    p.add_argument("--skip-grpo", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    base = S.build_base()
    out, rows = Path(args.out), []
    for seed in args.seeds:
        t0 = time.time()
        work = out / f"seed-{seed}"
        work.mkdir(parents=True, exist_ok=True)
        prm_dir, orm_dir, row = train_rms(base, work, seed, args)
        row.update(best_of_n(base, prm_dir, orm_dir, seed, args))
        if not args.skip_grpo:
            for name, reward in (("prm_grpo", f"prm:{prm_dir}"), ("orm_grpo", f"rm:{orm_dir}")):
                found = grpo(base, reward, work / name, seed, args)
                for k in ("accuracy_start", "accuracy_end", "step_accuracy_end", "sampled_accuracy_end",
                          "sampled_step_accuracy_end"):
                    row[f"{name}_{k}"] = found[k]
        row["seconds"] = time.time() - t0
        rows.append(row)
        (work / "row.json").write_text(json.dumps(row, indent=2) + "\n")
        print(json.dumps(row), flush=True)
    (out / "table.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    (out / "table.md").write_text(table_md(rows))
    print(table_md(rows))


if __name__ == "__main__":
    main()
