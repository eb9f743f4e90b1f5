"""The reward-vs-KL frontier on `reviews`: `tether eval frontier` — the DPO paper's Figure 2 in miniature.

    tether eval frontier                                   # base -> data -> SFT -> RM, then the sweeps, CSV + plot
    tether eval frontier out=runs/demo                     # reuse a demo's data, SFT and RM (finished runs are skipped)
    tether eval frontier betas_ppo=0.01,0.05,0.2 betas_dpo=0.05,0.2 bon_ns=1,4,16 stages=dpo,bon

One command, on the embedded task: the demo's base model, data, SFT and reward model (tether demo's stages and
settings, in out/sft and out/rm), then
- PPO against the RM for each β in `betas_ppo` (out/ppo_beta<β>), held-out evaluations every `ppo_eval_every` steps;
- DPO on the raters' comparisons for each β in `betas_dpo` (out/dpo_beta<β>), evaluations every `dpo_eval_every`;
- best-of-n by the RM from the SFT policy for every n in `bon_ns` (out/bon): gold by the unbiased estimator,
  KL = log n − (n−1)/n;
- opt in (stages=ppo,dpo,bon,odpo): online DPO for each β in `betas_odpo` (out/odpo_beta<β>), `odpo_rounds` rounds
  of `odpo_pairs_per_round` pairs sampled from the policy and labelled by the simulated raters, evaluated each round.
Every held-out evaluation is a point (sequence-level KL to the SFT policy, mean gold reward) on the same held-out
prompts. Outputs in `out`: frontier.csv (all points), frontier.png, and frontier.txt / summary.json saying which
method reaches the highest gold within each KL budget (`dominance`), with the margin and its standard error — whatever
the result is. Runs that finished before are read back, so a sweep can be extended by running again.
Every stage key of `tether demo` (sft_*, rm_*, ppo_*, dpo_*) works here too, with the demo's defaults.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from tether.config import ConfigError, above, at_least, load_config, one_of, opt
from tether.recipes.demo import DEMO_DEFAULTS, DEMO_STAGES, prepare
from tether.recipes.pipeline import PipelineBase, Stage, finished, prefixed_fields, run_stage
from tether.report import read_jsonl
from tether.runfiles import strict_json, write_atomic

log = logging.getLogger(__name__)

METHODS = ("ppo", "dpo", "bon", "odpo")
STAGE_OF = {"ppo": "ppo", "dpo": "dpo", "odpo": "odpo"}  # the recipe stage a swept method runs (bon: on its own)
ONLINE_DPO = Stage("dpo", "tether.recipes.online_dpo", "OnlineDPOConfig")  # reads the dpo_* keys it has
LABELS = {"ppo": "PPO (β sweep)", "dpo": "DPO (β sweep)", "bon": "best-of-n (analytic KL)", "odpo": "online DPO"}
# CPU defaults (two cores) are the demo's, measured on `reviews`: PPO 60 steps, DPO lr 5e-4 for 2 epochs (125 steps);
# wall times in benchmarks/RESULTS.md. Held-out evaluations every ~20 steps give each run a trajectory of points.
FRONTIER_DEFAULTS = {**DEMO_DEFAULTS, "ppo_eval_every": 20, "dpo_eval_every": 21}


@dataclass
class FrontierBase(PipelineBase):
    out: str = opt("runs/frontier", "run directory: data/, sft/, rm/, one directory per sweep point, frontier.*")
    model: str = opt("", "base model (default: tasks.reviews.build_base(), built once and cached)")
    task: str = opt("reviews", "the embedded task: data, held-out prompts and the gold reward (reviews only: its "
                               "data, raters and gold reward)", check=one_of("reviews"))
    stages: str = opt("ppo,dpo,bon", "methods to sweep (comma list of ppo, dpo, bon, odpo)")
    betas_ppo: list[float] = opt([0.01, 0.05, 0.2], "PPO KL coefficients β, one run each", check=at_least(0))
    betas_dpo: list[float] = opt([0.02, 0.1, 0.3], "DPO β values, one run each", check=above(0))
    betas_odpo: list[float] = opt([0.1], "online DPO β values (method odpo: opt in with stages=...,odpo)",
                                  check=above(0))
    odpo_rounds: int = opt(4, "online DPO rounds (odpo)", check=at_least(1))
    odpo_pairs_per_round: int = opt(256, "online DPO prompts per round, labelled by the simulated raters (odpo)",
                                    check=at_least(1))
    bon_ns: list[int] = opt([1, 2, 4, 8, 16], "best-of-n values (samples per prompt: the largest)", check=at_least(1))
    n_sft: int = opt(2000, "demonstrations written for SFT", check=at_least(0))
    n_pairs: int = opt(2000, "pairs labelled by the simulated raters (the RM's and DPO's data when n_rankings=0)",
                       check=at_least(0))
    n_rankings: int = opt(1000, "4-way rankings by the simulated raters: the RM's and DPO's data", check=at_least(0))
    n_test_pairs: int = opt(4000, "held-out comparisons on the test prompts: the reward model's evaluation set "
                                  "(4,000: a standard error of 0.007 on its accuracy)", check=at_least(0))

    def methods(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()]

    def validate(self) -> None:
        unknown = [m for m in self.methods() if m not in METHODS]
        if unknown:
            raise ConfigError(f"key 'stages': unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")

    def sweep(self) -> dict[str, tuple[str, dict]]:
        """Run name -> (method, overrides of its stage) of every PPO, DPO and online-DPO sweep point."""
        online = {"rounds": self.odpo_rounds, "pairs_per_round": self.odpo_pairs_per_round,
                  "label_source": "raters"}
        grids = {"ppo": [(b, {"kl_coef": b}) for b in self.betas_ppo],
                 "dpo": [(b, {"beta": b}) for b in self.betas_dpo],
                 "odpo": [(b, {"beta": b, **online}) for b in self.betas_odpo]}
        return {f"{m}_beta{b:g}": (m, o) for m in self.methods() if m in grids for b, o in grids[m]}

    def stage_list(self) -> list[str]:
        return ["sft", "rm", *self.sweep()]

    def stage_table(self) -> dict[str, Stage]:
        stages = {**DEMO_STAGES, "odpo": ONLINE_DPO}
        return {**DEMO_STAGES, **{name: stages[STAGE_OF[m]] for name, (m, _) in self.sweep().items()}}


FrontierConfig = dataclasses.make_dataclass(
    "FrontierConfig", prefixed_fields(DEMO_STAGES, FRONTIER_DEFAULTS), bases=(FrontierBase,),
    namespace={"__module__": __name__})


# --- points ---------------------------------------------------------------------------------------------------------
def eval_points(method: str, setting: str, run_dir: Path) -> list[dict]:
    """One point per held-out evaluation of a PPO/DPO run (evals.jsonl), the step-0 SFT point left out."""
    points = []
    for e in read_jsonl(run_dir / "evals.jsonl"):
        if e.get("step", 0) > 0 and "kl_mean" in e and "gold_mean" in e:
            se = e.get("gold_std", float("nan")) / math.sqrt(max(1, e.get("n_samples", 1)))
            points.append({"method": method, "setting": setting, "step": e["step"], "kl": e["kl_mean"],
                           "gold": e["gold_mean"], "gold_se": se, "run": run_dir.name})
    return points


def bon_points(summary: dict) -> list[dict]:
    """One point per n of the best-of-n table: analytic KL, unbiased gold estimate."""
    return [{"method": "bon", "setting": f"n={row['n']}", "step": 0, "kl": row["kl_analytic"], "gold": row["gold_bon"],
             "gold_se": row["gold_bon_se"], "run": "bon"} for row in summary["table"] if row["n"] > 1]


def sft_point(summary: dict) -> dict:
    se = summary["gold_reward_std_start"] / math.sqrt(max(1, summary.get("n_eval_samples", 1)))
    return {"method": "sft", "setting": "", "step": 0, "kl": 0.0, "gold": summary["gold_reward_start"],
            "gold_se": se, "run": "sft"}


def write_points(path: Path, points: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "setting", "step", "kl", "gold", "gold_se", "run"])
        writer.writeheader()
        writer.writerows(points)
    return path


# --- which method dominates where -----------------------------------------------------------------------------------
def best_within(points: list[dict], budget: float) -> dict | None:
    """The point of highest gold among those with KL ≤ budget (None if there is none)."""
    inside = [p for p in points if p["kl"] <= budget]
    return max(inside, key=lambda p: p["gold"]) if inside else None


def dominance(points: dict[str, list[dict]], start: dict) -> list[dict]:
    """Which method reaches the highest gold within each KL budget: segments [kl_from, kl_to) with the winner.

    Every method may stay at the SFT point `start` (KL 0), so its best-within-budget curve is a non-decreasing step
    function; breakpoints are the KLs of all points. Consecutive budgets with the same winner form one segment, which
    reports its closest contest (smallest margin): the winner's gold, the runner-up's, the margin and its standard
    error √(se₁² + se₂²), `significant` when the margin exceeds twice that. Pure: lists of dicts in, list of dicts out.
    """
    budgets = sorted({p["kl"] for pts in points.values() for p in pts if p["kl"] > 0})
    segments: list[dict] = []
    for i, budget in enumerate(budgets):
        best = {m: best_within(pts + [start], budget) for m, pts in points.items()}
        ranked = sorted(best.items(), key=lambda kv: kv[1]["gold"], reverse=True)
        (winner, top), (second, other) = ranked[0], ranked[1] if len(ranked) > 1 else ranked[0]
        margin = top["gold"] - other["gold"]
        name = winner if margin > 0 else "tie"
        se = math.sqrt(top["gold_se"] ** 2 + other["gold_se"] ** 2) if top is not other else 0.0
        kl_to = budgets[i + 1] if i + 1 < len(budgets) else math.inf
        contest = {"best": name, "gold": top["gold"], "runner_up": second, "runner_up_gold": other["gold"],
                   "margin": margin, "margin_se": se, "significant": margin > 2 * se}
        if segments and segments[-1]["best"] == name:
            segments[-1]["kl_to"] = kl_to
            if margin < segments[-1]["margin"]:  # a segment reports its closest contest
                segments[-1].update(contest)
            continue
        segments.append({"kl_from": budget, "kl_to": kl_to, **contest})
    return segments


def describe_dominance(segments: list[dict]) -> str:
    lines = []
    for s in segments:
        span = f"KL {s['kl_from']:.3f}–{s['kl_to']:.3f}" if math.isfinite(s["kl_to"]) else f"KL ≥ {s['kl_from']:.3f}"
        note = "" if s["significant"] else " (within 2 standard errors: not resolved)"
        lines.append(f"{span} nats: {s['best']} best, gold {s['gold']:.3f} vs {s['runner_up']} "
                     f"{s['runner_up_gold']:.3f} (margin {s['margin']:.3f} ± {s['margin_se']:.3f}){note}")
    return "\n".join(lines)


# --- the plot -------------------------------------------------------------------------------------------------------
def plot_frontier(points: list[dict], path: Path) -> Path:
    """Gold against KL: every PPO/DPO evaluation (shade by β), the best-of-n curve, the SFT point, each envelope."""
    from tether.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = {"ppo": "tab:blue", "dpo": "tab:orange", "bon": "tab:green", "odpo": "tab:red"}
    start = next(p for p in points if p["method"] == "sft")
    ax.scatter([0.0], [start["gold"]], color="black", marker="*", s=120, zorder=4, label="SFT policy")
    for method, color in colors.items():
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["kl"])
        if not pts:
            continue
        style = "o-" if method == "bon" else "o"
        ax.plot([p["kl"] for p in pts], [p["gold"] for p in pts], style, color=color, alpha=0.75,
                label=LABELS[method])
        for p in pts:
            if method == "bon" or p["step"] == max(q["step"] for q in pts if q["run"] == p["run"]):
                ax.annotate(p["setting"], (p["kl"], p["gold"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        hull, best = [], start["gold"]
        for p in pts:
            best = max(best, p["gold"])
            hull.append((p["kl"], best))
        ax.step([0.0] + [h[0] for h in hull], [start["gold"]] + [h[1] for h in hull], where="post", color=color,
                alpha=0.35, linestyle="--")
    ax.set_xscale("symlog", linthresh=1.0)  # linear below 1 nat, where best-of-n lives; logarithmic beyond
    ax.set_xlabel("KL(π‖π_SFT), nats per sequence (symlog)")
    ax.set_ylabel("mean gold reward (held-out prompts)")
    ax.set_title("reward vs KL frontier on `reviews`")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- the recipe -----------------------------------------------------------------------------------------------------
def run_bon(cfg, out: Path) -> dict:
    """Best-of-n from the SFT policy, chosen by the RM, on the same held-out prompts as PPO/DPO evaluate."""
    from tether.recipes import best_of_n

    done = finished(out)
    if done is not None:
        return done
    settings = {"model": str(Path(cfg.out) / "sft" / "model"), "reward": f"rm:{Path(cfg.out) / 'rm'}",
                "task": cfg.task, "prompts": cfg.ppo_eval_prompts, "n_prompts": cfg.ppo_n_eval_prompts,
                "n": max(cfg.bon_ns), "ns": list(cfg.bon_ns), "max_new_tokens": cfg.ppo_max_new_tokens,
                "temperature": cfg.ppo_temperature, "max_prompt_len": cfg.ppo_max_prompt_len, "seed": cfg.seed,
                "out": str(out), "progress": cfg.progress}
    return best_of_n.run(load_config(best_of_n.BoNConfig, None, settings, recipe="bon"))


def run(cfg) -> dict:
    prepare(cfg)
    for name in ("sft", "rm"):
        run_stage(cfg, name)
    out = Path(cfg.out)
    points, start = [], None
    for name, (method, overrides) in cfg.sweep().items():
        summary = run_stage(cfg, name, overrides)
        start = start or summary
        setting = f"β={overrides.get('kl_coef', overrides.get('beta'))}"
        points += eval_points(method, setting, out / name)
    if "bon" in cfg.methods():
        points += bon_points(run_bon(cfg, out / "bon"))
    if start is None:  # only best-of-n: the SFT point from its own table (n = 1)
        row = next(r for r in json.loads((out / "bon" / "summary.json").read_text())["table"] if r["n"] == 1)
        start = {"gold_reward_start": row["gold_bon"], "gold_reward_std_start": row["gold_bon_se"]}
    sft = sft_point({**start, "n_eval_samples": cfg.ppo_n_eval_prompts * cfg.ppo_eval_samples})
    points = [sft] + points
    write_points(out / "frontier.csv", points)
    plot_frontier(points, out / "frontier.png")
    by_method = {m: [p for p in points if p["method"] == m] for m in cfg.methods()}
    segments = dominance({m: pts for m, pts in by_method.items() if pts}, sft)
    text = describe_dominance(segments)
    (out / "frontier.txt").write_text(text + "\n")
    print(text)
    summary = {"points": len(points), "csv": str(out / "frontier.csv"), "plot": str(out / "frontier.png"),
               "dominance": segments}
    write_atomic(out / "summary.json", strict_json(summary, indent=2) + "\n")
    return summary
