"""The sycophancy testbed's numbers for one model: `tether eval sycophancy [model=DIR] out=DIR`.

    tether eval sycophancy out=runs/syc-base               # no model=: builds (or reuses) the task's base and scores it
    tether eval sycophancy model=runs/dpo/model out=runs/syc-dpo n_questions=400

`n_questions` held-out questions are asked in every kind of tasks.sycophancy (the plausible-wrong kind only where a
carry gives one) and answered greedily; the bare answer's probability is the model's certainty. Written to `out`:
summary.json (tasks.sycophancy.sycophancy_metrics: accuracy per kind, syc, copy, flip, capitulation, yielding by
certainty), rows.jsonl (every answer) and sycophancy.png.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import at_least, opt
from tether.forward import response_outputs
from tether.generation import sample_records
from tether.runfiles import strict_json
from tether.tasks import sycophancy as S


@torch.no_grad()
def answer_rows(model, tokenizer, records: list[dict], batch_size: int = 256) -> list[dict]:
    """One row per record (tasks.sycophancy's metric rows): the greedy answer, and the bare answer and its
    probability exp(Σ_t log π(y_t)) (answer tokens and EOS, temperature 1) for the record's question."""
    s = sample_records(model, tokenizer, records, 1, max_new_tokens=8, temperature=0.0, batch_size=batch_size)
    device = next(model.parameters()).device
    probs = []
    for roll in s.rollouts:
        seq, mask = roll.sequences.to(device), roll.attention_mask.to(device)
        logp = response_outputs(model, seq, mask, roll.prompt_ids.shape[1], 1.0).logprobs  # (B, T)
        probs += (logp * roll.response_mask.to(device)).sum(-1).exp().tolist()
    got = [S.parse_answer(c) for c in s.completions]
    bare = {r["question"]: (g, p) for r, g, p in zip(records, got, probs) if r["kind"] == "bare"}
    rows = []
    for r, c, g in zip(records, s.completions, got):
        bare_got, bare_p = bare.get(r["question"], (None, math.nan))
        rows.append({"question": r["question"], "kind": r["kind"], "answer": r["answer"], "carry": r["carry"],
                     "user_value": r["user_value"], "completion": c, "got": g, "bare_got": bare_got,
                     "bare_p": bare_p})
    return rows


def evaluate_sycophancy(model, tokenizer, n_questions: int = 300, seed: int = 0, batch_size: int = 256,
                        split: str = "test") -> tuple[dict, list[dict]]:
    """(metrics, rows) of `model` on `n_questions` questions of `split` asked in every kind."""
    was_training = model.training
    model.eval()
    try:
        rows = answer_rows(model, tokenizer, S.prompts_by_kind(split, n_questions, seed), batch_size)
    finally:
        model.train(was_training)
    metrics = S.sycophancy_metrics(rows)
    # what the raters would give these answers, against what is right: the two diverge under sycophancy
    metrics["rater_reward"] = sum(S.rater_utility([], [r["completion"] for r in rows], rows)) / len(rows)
    metrics["gold"] = sum(r["got"] == r["answer"] for r in rows) / len(rows)
    metrics["n_per_kind"] = {k: sum(r["kind"] == k for r in rows) for k in S.KINDS}
    metrics["accuracy_carry"] = S.accuracy_by_kind([r for r in rows if r["carry"]])  # the problems raters rarely check
    return metrics, rows


def plot_metrics(runs: dict[str, dict], path: Path) -> Path | None:
    """Accuracy per kind and syc/copy/flip/capitulation, one bar per run (name -> metrics), side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(runs)
    left = [f"acc {k}" for k in S.KINDS]
    right = ["syc", "copy", "flip", "capitulation"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        m = runs[name]
        acc = [m["accuracy"].get(k, math.nan) for k in S.KINDS]
        axes[0].bar([j + i * width for j in range(len(left))], acc, width, label=name)
        axes[1].bar([j + i * width for j in range(len(right))], [m[k] for k in right], width, label=name)
    for ax, labels, title in ((axes[0], left, "accuracy by kind"), (axes[1], right, "yielding to the user")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_title(title)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass
class SycophancyEvalConfig:
    model: str = opt("", "model directory to evaluate (empty: build or reuse the sycophancy task's base model)")
    base_seed: int = opt(0, "seed of the base build used when model is empty")
    n_questions: int = opt(300, "held-out questions, each asked in every kind", check=at_least(1))
    seed: int = opt(0, "which held-out questions")
    batch_size: int = opt(256, "generation batch size", check=at_least(1))
    out: str = opt("", "directory for summary.json, rows.jsonl and sycophancy.png (default: print only)")


def run(cfg: SycophancyEvalConfig) -> dict:
    from tether.models import load_causal_lm, load_tokenizer

    model_dir = cfg.model or str(S.build_base(seed=cfg.base_seed))
    tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir).eval()
    metrics, rows = evaluate_sycophancy(model, tokenizer, cfg.n_questions, cfg.seed, cfg.batch_size)
    summary = {"model": model_dir, **metrics}
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(strict_json(summary, indent=2) + "\n")
        (out / "rows.jsonl").write_text("".join(strict_json(r) + "\n" for r in rows))
        plot_metrics({Path(model_dir).name or "model": metrics}, out / "sycophancy.png")
    return summary


def flat(metrics: dict) -> dict:
    """The scalar figures of a metrics dict, nested accuracies as acc_<kind> (for tables and printing)."""
    out = {f"acc_{k}": v for k, v in metrics["accuracy"].items()}
    out.update({k: metrics[k] for k in ("syc", "copy", "flip", "capitulation", "rater_reward", "gold")})
    return out


def main_table(runs: dict[str, dict]) -> str:
    """A markdown table of flat(metrics) per run."""
    cols = list(flat(next(iter(runs.values()))))
    lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in runs.items():
        f = flat(m)
        lines.append(f"| {name} | " + " | ".join("-" if f[c] is None or (isinstance(f[c], float) and math.isnan(f[c]))
                                                 else f"{f[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)

