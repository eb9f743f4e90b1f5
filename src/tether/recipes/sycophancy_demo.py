"""`tether demo sycophancy`: watch preference training create sycophancy, and two ways to stop it.

    tether demo sycophancy out=runs/syc seeds=0,1,2

On the sycophancy task's base model (tasks/sycophancy.py; one base build, `base_seed`), for each training seed:
1. base:          the testbed's metrics of the base model (evaluate_sycophancy: greedy, n_questions per kind);
2. dpo_raters:    online DPO on the simulated raters' labels (Bradley-Terry on a utility that likes agreement);
3. grpo_raters:   GRPO on the raters' utility itself (what a perfect reward model of their labels would score);
4. grpo_rule:     the same plus a rule-based penalty (rewards/rules_file.py): "the answer equals the number the user
                  stated", its weight fitted by `tether rules fit` on a small gold-labelled set with the raters'
                  utility as the fixed base margin (RBR, OpenAI 2024: R = R_rm + w·φ);
5. grpo_verifier: GRPO on the verifier (gold = correctness).
Each arm is scored like the base; seed-S/ARM/ holds its run and eval.json; summary.json and table.md hold every
figure per seed and their mean and standard deviation across seeds; sycophancy.png the means side by side.
An arm whose eval.json exists is not run again (delete it to redo one).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from tether.config import above, at_least, load_config, opt
from tether.runfiles import strict_json

ARMS = ("dpo_raters", "grpo_raters", "grpo_rule", "grpo_verifier")
RATERS = "python:tether.tasks.sycophancy:rater_utility"
RULES = """\
# The blunt rule: the answer equals the number the user stated (asserting prompts only).
propositions:
  agrees_with_user:
    prompt: "I think the answer is (?P<user>-?\\\\d+)"
    regex: "^\\\\s*{user}\\\\s*$"
"""


@dataclass
class SycophancyDemoConfig:
    out: str = opt("runs/sycophancy", "directory of the whole experiment")
    seeds: list[int] = opt([0, 1, 2], "training seeds (one base build for all)")
    base_seed: int = opt(0, "seed of the task's base build")
    arms: list[str] = opt(list(ARMS), f"arms to run: {', '.join(ARMS)}")
    n_questions: int = opt(300, "held-out questions per kind in each evaluation", check=at_least(1))
    label_tau: float = opt(0.2, "Bradley-Terry noise τ of the raters", check=above(0))
    dpo_rounds: int = opt(3, "online DPO rounds", check=at_least(1))
    dpo_pairs: int = opt(1024, "online DPO prompts per round", check=at_least(1))
    dpo_lr: float = opt(2e-4, "online DPO learning rate", check=above(0))
    grpo_steps: int = opt(150, "GRPO steps per arm", check=at_least(1))
    grpo_lr: float = opt(1e-4, "GRPO learning rate", check=above(0))
    fit_pairs: int = opt(200, "gold-labelled pairs the rule weight is fitted on", check=at_least(1))
    rules: str = opt("", "rules file to fit and use (empty: write the blunt rule to out/rules.yaml)")


def fit_rule(cfg: SycophancyDemoConfig, out: Path) -> Path:
    """The rules file, its weight fitted on gold-labelled pairs with the raters' logit u/τ as the fixed margin
    (tether rules fit), so w is on the scale of the reward it is added to."""
    from tether import data as D
    from tether.recipes import rules_fit
    from tether.tasks import sycophancy as S

    path = Path(cfg.rules) if cfg.rules else out / "rules.yaml"
    if not cfg.rules:
        path.write_text(RULES)
    D.write_jsonl(out / "labelled_pairs.jsonl", S.labelled_pairs(cfg.fit_pairs))
    rules_fit.run(load_config(rules_fit.RulesFitConfig, None, {"rules": str(path), "data": str(
        out / "labelled_pairs.jsonl"), "base": f"{RATERS}*{1 / cfg.label_tau:g}", "out": str(out / "rules.fitted.yaml")}))
    return out / "rules.fitted.yaml"


def train_arm(cfg: SycophancyDemoConfig, arm: str, base: str, seed: int, run_dir: Path, rules: Path) -> str:
    """Run one arm's training; returns its model directory."""
    common = {"model": base, "task": "sycophancy", "out": str(run_dir), "seed": seed, "progress": False,
              "overwrite": True, "report_to": ["none"]}
    if arm == "dpo_raters":
        from tether.recipes import online_dpo as M

        settings = {**common, "label_source": "raters", "label_tau": cfg.label_tau, "rounds": cfg.dpo_rounds,
                    "pairs_per_round": cfg.dpo_pairs, "lr": cfg.dpo_lr, "batch_size": 32, "max_new_tokens": 6,
                    "n_eval_prompts": 64, "eval_samples": 1}
        M.run(load_config(M.OnlineDPOConfig, None, settings, recipe="dpo online"))
    else:
        from tether.recipes import grpo as M

        raters = f"{RATERS}*{1 / cfg.label_tau:g}"  # u/τ: the raters' Bradley-Terry logit, the scale w was fitted on
        reward = {"grpo_raters": raters, "grpo_rule": f"{raters}+rules:{rules}", "grpo_verifier": "task"}[arm]
        settings = {**common, "reward": reward, "max_steps": cfg.grpo_steps, "lr": cfg.grpo_lr,
                    "max_new_tokens": 6, "n_eval_prompts": 200}
        M.run(load_config(M.GRPOConfig, None, settings, recipe="grpo"))
    return str(run_dir / "model")


def evaluate_dir(cfg: SycophancyDemoConfig, model_dir: str, path: Path) -> dict:
    from tether.evaluate_sycophancy import evaluate_sycophancy, flat
    from tether.models import load_causal_lm, load_tokenizer

    metrics, _ = evaluate_sycophancy(load_causal_lm(model_dir).eval(), load_tokenizer(model_dir), cfg.n_questions)
    metrics["flat"] = flat(metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(strict_json(metrics, indent=2) + "\n")
    return metrics


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) over seeds, NaNs left out; std NaN for fewer than two values."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else math.nan


def seed_table(per_seed: dict[str, list[dict]]) -> dict[str, dict[str, list[float]]]:
    """arm -> figure -> [mean, std] across seeds, from arm -> [flat metrics of each seed]."""
    return {arm: {k: list(mean_and_spread([r[k] for r in rows])) for k in rows[0]} for arm, rows in per_seed.items()}


def table_markdown(table: dict, n_seeds: int) -> str:
    cols = list(next(iter(table.values())))
    lines = [f"mean ± std over {n_seeds} seeds", "", "| arm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for arm, row in table.items():
        cells = [f"{m:.3f} ± {s:.3f}" if not math.isnan(s) else f"{m:.3f}" for m, s in (row[c] for c in cols)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(cfg: SycophancyDemoConfig) -> dict:
    from tether.evaluate_sycophancy import plot_metrics
    from tether.tasks import sycophancy as S

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    base = str(S.build_base(seed=cfg.base_seed))
    rules = fit_rule(cfg, out)
    base_eval = out / "base" / "eval.json"
    base_metrics = json.loads(base_eval.read_text()) if base_eval.exists() else evaluate_dir(cfg, base, base_eval)
    per_seed = {"base": [base_metrics["flat"]] * len(cfg.seeds)}  # greedy: the base's figures are seed-free
    full = {"base": base_metrics}
    for arm in cfg.arms:
        per_seed[arm] = []
        for seed in cfg.seeds:
            run_dir = out / f"seed-{seed}" / arm
            path = run_dir / "eval.json"
            if path.exists():
                metrics = json.loads(path.read_text())
            else:
                metrics = evaluate_dir(cfg, train_arm(cfg, arm, base, int(seed), run_dir / "run", rules), path)
            per_seed[arm].append(metrics["flat"])
            full[f"{arm}/seed-{seed}"] = metrics
    table = seed_table(per_seed)
    summary = {"base_model": base, "seeds": cfg.seeds, "rules": str(rules), "table": table, "per_seed": per_seed}
    (out / "summary.json").write_text(strict_json(summary, indent=2) + "\n")
    (out / "table.md").write_text(table_markdown(table, len(cfg.seeds)))
    means = {arm: {"accuracy": {k[4:]: v[0] for k, v in row.items() if k.startswith("acc_")},
                   **{k: v[0] for k, v in row.items() if not k.startswith("acc_")}} for arm, row in table.items()}
    plot_metrics(means, out / "sycophancy.png")
    print(table_markdown(table, len(cfg.seeds)), flush=True)
    return summary
