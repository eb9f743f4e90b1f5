"""The over-optimisation law on our own runs: `tether eval overopt` (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization") on the embedded `reviews` task.

    tether eval overopt                                      # proxies on 250/500/1,000/2,000 comparisons, BoN + PPO
    tether eval overopt rm_sizes=500 ppo_sizes=500 ppo_betas=0   # one proxy, PPO with β = 0 only

Stages (tether demo's data and stage settings, each in out/<stage>, a finished one skipped when run again):
1. SFT on the demonstrations (out/sft); proxies `rm_<n>`: the reward-model recipe on the first n rater-labelled
   comparisons of data/prefs.jsonl for each n in `rm_sizes` (Gao et al. §3.3: the proxy's data size);
2. best-of-n from the SFT policy: `bon_samples` samples of each of `bon_prompts` held-out prompts, scored once by every
   proxy and by the gold reward; for n = 1, 2, 4, ... bon_samples, gold and proxy of the proxy-best of n by the
   unbiased estimator (metrics.unbiased_bon_estimate) against d = sqrt(KL_bon), KL_bon = log n − (n−1)/n;
3. PPO against the proxies of `ppo_sizes` for each β in `ppo_betas` (out/ppo_rm<n>_beta<β>), held-out evaluations
   every `ppo_eval_every` steps (evals.jsonl): gold and proxy against d = sqrt(sequence KL to the SFT policy);
4. the fits of overopt.py to gold − gold(d = 0): R_bon(d) = d(α − βd) for best-of-n, R_RL(d) = d(α − β log d) for
   PPO; α, β, R², the fitted peak d* and the observed one.
Outputs: points.csv (every point), fits.json and fits.txt (one row per curve), overopt.png (points and fitted
curves), summary.json. CPU cost (one thread): SFT and each proxy tens of seconds; best-of-n sampling dominates its
stage; each PPO run about `ppo_max_steps` x 1-2 s.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import at_least, one_of, opt
from tether.recipes.demo import DEMO_DEFAULTS, DEMO_STAGES, prepare
from tether.recipes.pipeline import STAGES, PipelineBase, Stage, prefixed_fields, run_stage
from tether.runfiles import strict_json, write_atomic

log = logging.getLogger(__name__)

# the demo's stage settings; PPO evaluates often (each evaluation is one point of a curve) on fewer held-out samples
OVEROPT_DEFAULTS = {**DEMO_DEFAULTS, "ppo_max_steps": 100, "ppo_eval_every": 10, "ppo_n_eval_prompts": 64,
                    "ppo_eval_samples": 4}


@dataclass
class OveroptBase(PipelineBase):
    out: str = opt("runs/overopt", "run directory: data/, sft/, rm_<n>/, ppo_rm<n>_beta<β>/, points.csv, fits.*")
    model: str = opt("", "base model (default: tasks.reviews.build_base(), built once and cached)")
    task: str = opt("reviews", "the embedded task (its data, raters and gold reward)", check=one_of("reviews"))
    rm_sizes: list[int] = opt([250, 500, 1000, 2000], "comparisons each proxy reward model is trained on",
                              check=at_least(1))
    ppo_sizes: list[int] = opt([250, 500, 1000, 2000], "proxies (by size) PPO runs against (empty: no PPO)",
                               check=at_least(1))
    ppo_betas: list[float] = opt([0.0, 0.01], "PPO KL coefficients, one run per proxy each", check=at_least(0))
    bon_prompts: int = opt(32, "held-out prompts for best-of-n", check=at_least(1))
    bon_samples: int = opt(256, "samples per prompt for best-of-n (the largest n)", check=at_least(2))
    n_sft: int = opt(2000, "demonstrations written for SFT", check=at_least(0))
    n_pairs: int = opt(2000, "comparisons labelled by the simulated raters (the proxies take the first n)",
                       check=at_least(1))
    n_test_pairs: int = opt(1000, "held-out comparisons: each proxy's accuracy", check=at_least(0))
    n_rankings: int = opt(0, "(the proxies learn from pairs; kept at 0)", check=at_least(0))

    def validate(self) -> None:
        super().validate()
        from tether.config import ConfigError

        if max(self.rm_sizes) > self.n_pairs:
            raise ConfigError(f"key 'rm_sizes': {max(self.rm_sizes)} is more than n_pairs ({self.n_pairs})")
        missing = [n for n in self.ppo_sizes if n not in self.rm_sizes]
        if missing:
            raise ConfigError(f"key 'ppo_sizes': {missing[0]} is not one of rm_sizes {self.rm_sizes}")

    def ppo_runs(self) -> dict[str, tuple[int, float]]:
        return {f"ppo_rm{n}_beta{b:g}": (n, b) for n in self.ppo_sizes for b in self.ppo_betas}

    def stage_list(self) -> list[str]:
        return ["sft", *(f"rm_{n}" for n in self.rm_sizes), *self.ppo_runs()]

    def stage_table(self) -> dict[str, Stage]:
        return {"sft": STAGES["sft"], **{f"rm_{n}": STAGES["rm"] for n in self.rm_sizes},
                **{name: STAGES["ppo"] for name in self.ppo_runs()}}


OveroptConfig = dataclasses.make_dataclass(
    "OveroptConfig", prefixed_fields(DEMO_STAGES, OVEROPT_DEFAULTS), bases=(OveroptBase,),
    namespace={"__module__": __name__})


def stage_overrides(cfg, name: str) -> dict | None:
    out = Path(cfg.out)
    if name.startswith("rm_"):
        n = int(name[3:])
        subset = out / "data" / f"prefs_first{n}.jsonl"
        if not subset.exists():
            lines = (out / "data" / "prefs.jsonl").read_text().splitlines(keepends=True)
            write_atomic(subset, "".join(lines[:n]))
        return {"data": str(subset)}
    if name in cfg.ppo_runs():
        n, beta = cfg.ppo_runs()[name]
        return {"kl_coef": beta, "reward": f"rm:{out / f'rm_{n}'}"}
    return None


# --- the points -------------------------------------------------------------------------------------------------------
def bon_points(cfg, task) -> list[dict]:
    """Best-of-n from the SFT policy, every proxy scoring the same samples (module docstring, stage 2)."""
    from tether.generation import sample_records
    from tether.metrics import bon_kl, unbiased_bon_estimate
    from tether.models import load_causal_lm, load_tokenizer
    from tether.prompts import load_prompts
    from tether.rewards.learned import LearnedReward

    out = Path(cfg.out)
    held = load_prompts(str(out / "data" / "prompts_test.jsonl"), task, "test", cfg.bon_prompts)
    policy_dir = out / "sft" / "model"
    tokenizer, policy = load_tokenizer(policy_dir), load_causal_lm(policy_dir).eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    s = sample_records(policy, tokenizer, held, cfg.bon_samples, max_new_tokens=cfg.ppo_max_new_tokens,
                       temperature=cfg.ppo_temperature, generator=generator, batch_size=256)
    gold = [float(g) for g in task.gold_reward(s.prompts, s.completions, s.records)]
    N = cfg.bon_samples
    ns = sorted({2**i for i in range(int(math.log2(N)) + 1)} | {N})
    points = []
    for size in cfg.rm_sizes:
        proxy = LearnedReward(out / f"rm_{size}", device="cpu", batch_size=256)(s.prompts, s.completions,
                                                                                s.records).scores.tolist()
        for n in ns:
            g = p = 0.0
            for i in range(len(held)):
                rows = slice(i * N, (i + 1) * N)
                g += unbiased_bon_estimate(proxy[rows], gold[rows], n) / len(held)
                p += unbiased_bon_estimate(proxy[rows], proxy[rows], n) / len(held)
            kl = bon_kl(n)
            points.append({"method": "bon", "rm_size": size, "beta": "", "step": n, "kl": kl, "d": math.sqrt(kl),
                           "gold": g, "proxy": p})
    return points


def ppo_points(cfg) -> list[dict]:
    """Every held-out evaluation of every PPO run (step 0 is the SFT policy)."""
    points = []
    for name, (size, beta) in cfg.ppo_runs().items():
        for line in (Path(cfg.out) / name / "evals.jsonl").read_text().splitlines():
            e = json.loads(line)
            kl = max(0.0, float(e.get("kl_mean", 0.0) or 0.0))  # the k1 estimate can dip below 0 near the start
            points.append({"method": "ppo", "rm_size": size, "beta": beta, "step": e["step"], "kl": kl,
                           "d": math.sqrt(kl), "gold": e["gold_mean"], "proxy": e.get("proxy_mean")})
    return points


def curves(points: list[dict]) -> dict[tuple, list[dict]]:
    """(method, rm_size, beta) -> its points in order of d."""
    out: dict[tuple, list[dict]] = {}
    for p in points:
        out.setdefault((p["method"], p["rm_size"], p["beta"]), []).append(p)
    return {k: sorted(v, key=lambda p: (p["d"], p["step"])) for k, v in out.items()}


def fit_curve(method: str, pts: list[dict]) -> dict:
    """The law fitted to gold − gold at d = 0 (the start point: n = 1, or PPO's step 0), with the observed peak."""
    from tether.overopt import fit_bon, fit_rl, observed_peak

    start = min(pts, key=lambda p: p["step"])["gold"]
    d = [p["d"] for p in pts]
    rel = [p["gold"] - start for p in pts]
    fit = (fit_bon if method == "bon" else fit_rl)(d, rel)
    peak_d, peak_rel = observed_peak(d, rel)
    last = max(pts, key=lambda p: p["d"])
    return {**fit, "form": "d(α − βd)" if method == "bon" else "d(α − β log d)", "points": len(pts),
            "observed_peak_d": peak_d, "observed_peak_gold": peak_rel + start, "gold_start": start,
            "gold_at_largest_d": last["gold"], "largest_d": last["d"],
            "peak_within_sweep": bool(0 < fit["peak_d"] <= max(d)),
            "gold_falls_past_peak": bool(last["gold"] < peak_rel + start)}


def write_points(path: Path, points: list[dict]) -> Path:
    keys = ["method", "rm_size", "beta", "step", "kl", "d", "gold", "proxy"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows({k: p.get(k) for k in keys} for p in points)
    return path


def plot(by_curve: dict[tuple, list[dict]], fits: dict[str, dict], path: Path) -> Path:
    """Two panels (best-of-n, PPO): gold against d, points and fitted curves, one colour per proxy size."""
    from tether.overopt import FORMS
    from tether.report import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    sizes = sorted({k[1] for k in by_curve})
    cmap = plt.get_cmap("viridis")
    for (method, size, beta), pts in by_curve.items():
        ax = axes[0 if method == "bon" else 1]
        color = cmap(sizes.index(size) / max(1, len(sizes) - 1))
        fit = fits[curve_name((method, size, beta))]
        label = f"RM {size}" + ("" if method == "bon" else f", β={beta:g}") + f" (R²={fit['r2']:.2f})"
        marker = "o" if method == "bon" or beta == 0 else "s"
        ax.plot([p["d"] for p in pts], [p["gold"] for p in pts], marker, color=color, alpha=0.8, label=label)
        dd = torch.linspace(0, max(p["d"] for p in pts), 100, dtype=torch.float64)
        form = FORMS["bon" if method == "bon" else "rl"]
        ax.plot(dd.tolist(), (form(dd, fit["alpha"], fit["beta"]) + fit["gold_start"]).tolist(), "-", color=color,
                alpha=0.6)
    for ax, title in zip(axes, ("best-of-n: gold = d(α − βd)", "PPO: gold = d(α − β log d)")):
        ax.set_xlabel("d = sqrt(KL to the SFT policy)")
        ax.set_ylabel("held-out gold reward")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curve_name(key: tuple) -> str:
    method, size, beta = key
    return f"bon_rm{size}" if method == "bon" else f"ppo_rm{size}_beta{beta:g}"


def describe(fits: dict[str, dict]) -> str:
    head = (f"{'curve':<22} {'alpha':>8} {'beta':>8} {'R2':>6} {'d* fit':>8} {'d* seen':>8} {'gold peak':>9} "
            f"{'gold end':>9}")
    rows = [head] + [f"{name:<22} {f['alpha']:>8.3f} {f['beta']:>8.3f} {f['r2']:>6.3f} {f['peak_d']:>8.3f} "
                     f"{f['observed_peak_d']:>8.3f} {f['observed_peak_gold']:>9.3f} {f['gold_at_largest_d']:>9.3f}"
                     for name, f in fits.items()]
    return "\n".join(rows) + "\n"


def run(cfg) -> dict:
    from tether.tasks import get_task

    prepare(cfg)
    summaries = {name: run_stage(cfg, name, stage_overrides(cfg, name)) for name in cfg.stage_list()}
    out = Path(cfg.out)
    task = get_task(cfg.task)
    points = bon_points(cfg, task) + ppo_points(cfg)
    by_curve = curves(points)
    fits = {curve_name(k): fit_curve(k[0], pts) for k, pts in by_curve.items()}
    for n in cfg.rm_sizes:
        fits[f"bon_rm{n}"]["rm_eval_accuracy"] = summaries[f"rm_{n}"].get("eval_accuracy")
    write_points(out / "points.csv", points)
    write_atomic(out / "fits.json", strict_json(fits, indent=2) + "\n")
    text = describe(fits)
    write_atomic(out / "fits.txt", text)
    plot(by_curve, fits, out / "overopt.png")
    print(text)
    summary = {f"{name}/{k}": v for name, f in fits.items() for k, v in f.items() if k in ("alpha", "beta", "r2",
                                                                                        "peak_d", "observed_peak_d")}
    write_atomic(out / "summary.json", strict_json(summary, indent=2) + "\n")
    return summary
