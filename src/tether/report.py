"""Plots and an HTML report of a pipeline or demo run directory (out/sft, out/rm, out/ppo, out/dpo, ...).

    from tether.report import write_report, text_summary
    write_report("runs/demo")      # runs/demo/report.html + curves.png, reward_vs_kl.png, overoptimisation.png
    print(text_summary("runs/demo"))

Everything is read back from what the recipes wrote: summary.json, metrics.jsonl (one line per PPO step: proxy
`reward`, `gold`, sequence `kl`, `response_length`, ...), evals.jsonl (held-out evaluations) and the
samples_start/samples_end.jsonl of PPO. A stage that did not run is left out of every table and plot.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

POLICY_STAGES = ("ppo", "ppo_nokl", "dpo", "ipo", "ppo_human", "ppo_ai", "ppo_judge")  # stages that train a policy and report gold/KL start and end
LABELS = {"ppo": "PPO", "ppo_nokl": "PPO, β = 0, weak proxy", "dpo": "DPO", "ipo": "IPO", "sft": "SFT", "rm": "reward model",
          "rm_small": "weak proxy RM", "rm_ai": "reward model on AI labels",
          "rm_human": "reward model on the raters' labels of the AI-labelled pairs", "ppo_human": "PPO on rm_human (RLHF)", "ppo_ai": "PPO on AI labels (RLAIF)",
          "ppo_judge": "PPO, β = 0, judge as reward (direct RLAIF)"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def load_stage(stage_dir: Path) -> dict | None:
    """summary, metrics, evals and samples of one stage directory; None if it has no summary.json."""
    if not (stage_dir / "summary.json").exists():
        return None
    return {
        "summary": json.loads((stage_dir / "summary.json").read_text()),
        "metrics": read_jsonl(stage_dir / "metrics.jsonl"),
        "evals": sorted(read_jsonl(stage_dir / "evals.jsonl"), key=lambda r: r.get("step", 0)),
        "samples_start": read_jsonl(stage_dir / "samples_start.jsonl"),
        "samples_end": read_jsonl(stage_dir / "samples_end.jsonl"),
    }


def load_run(out_dir: str | Path) -> dict[str, dict]:
    """{stage name: load_stage(...)} for every finished stage under out_dir, in a fixed order."""
    out_dir = Path(out_dir)
    order = ["sft", "rm", "ppo", "dpo", "ipo", "rm_small", "ppo_nokl"]
    names = order + sorted(p.name for p in out_dir.iterdir() if p.is_dir() and p.name not in order)
    stages = {name: load_stage(out_dir / name) for name in names if (out_dir / name).is_dir()}
    return {k: v for k, v in stages.items() if v is not None}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (NaNs skipped), so a curve over noisy rollout batches stays readable."""
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - window + 1) : i + 1] if v is not None and math.isfinite(v)]
        out.append(sum(part) / len(part) if part else float("nan"))
    return out


def gold_gain(summary: dict) -> float | None:
    """(gold_end − gold_start) / gold_std_start: the improvement over the SFT policy in units of its spread."""
    try:
        return (summary["gold_reward_end"] - summary["gold_reward_start"]) / summary["gold_reward_std_start"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


# --- plots ---------------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(stages: dict[str, dict], path: Path) -> Path | None:
    """2×2 panels over PPO steps: proxy reward, gold reward, sequence KL, response length (smoothed)."""
    runs = {k: v for k, v in stages.items() if k.startswith("ppo") and v["metrics"]}
    if not runs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("reward", "proxy reward (RM, normalised)"), ("gold", "gold reward (hidden)"),
              ("kl", "KL(π‖π_ref), nats per sequence"), ("response_length", "response length, tokens")]
    for ax, (key, title) in zip(axes.flat, panels):
        for name, run in runs.items():
            steps = [m["step"] for m in run["metrics"]]
            values = [m.get(key) for m in run["metrics"]]
            if any(v is not None for v in values):
                ax.plot(steps, smooth(values, max(1, len(values) // 20)), label=LABELS.get(name, name))
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_reward_vs_kl(stages: dict[str, dict], path: Path) -> Path | None:
    """Gold reward against sequence-level KL: the SFT point, PPO trajectories (training batches and held-out evals),
    and the end point of every policy stage (the DPO paper's Figure 2 in miniature)."""
    points = {k: v for k, v in stages.items() if k in POLICY_STAGES and "gold_reward_end" in v["summary"]}
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    first = next(iter(points.values()))["summary"]
    ax.scatter([0.0], [first["gold_reward_start"]], color="black", zorder=3, label="SFT policy")
    for name, run in points.items():
        label = LABELS.get(name, name)
        train = [(m["kl"], m["gold"]) for m in run["metrics"] if "kl" in m and "gold" in m]
        if train:
            window = max(1, len(train) // 10)
            line = ax.plot(smooth([p[0] for p in train], window), smooth([p[1] for p in train], window), alpha=0.5,
                           label=f"{label}: training batches (smoothed)")[0]
            color = line.get_color()
        else:
            color = None
        evals = [(e["kl_mean"], e["gold_mean"]) for e in run["evals"] if "kl_mean" in e and "gold_mean" in e]
        if len(evals) > 2:
            ax.plot(*zip(*evals), "o--", color=color, alpha=0.7, label=f"{label}: held-out evals")
        s = run["summary"]
        ax.scatter([s.get("kl_end", float("nan"))], [s["gold_reward_end"]], s=80, marker="*", color=color,
                   zorder=4, label=f"{label}: end (held out)")
    ax.set_xlabel("KL(π‖π_ref), nats per sequence")
    ax.set_ylabel("gold reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_overoptimisation(stages: dict[str, dict], path: Path) -> Path | None:
    """Proxy and gold reward over steps of the β = 0 run: the proxy keeps rising while the gold turns down."""
    run = stages.get("ppo_nokl")
    if not run or not run["metrics"]:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [m["step"] for m in run["metrics"]]
    window = max(1, len(steps) // 20)
    for key, label in (("reward", "proxy reward (RM)"), ("gold", "gold reward")):
        ax.plot(steps, smooth([m.get(key) for m in run["metrics"]], window), label=label)
    ax.set_xlabel("PPO step (β = 0: no KL tether)")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --- text and HTML -------------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else "nan"
    return "" if value is None else str(value)


def stage_rows(stages: dict[str, dict]) -> list[dict]:
    """One row per policy stage: gold start/end, gain in SFT std, KL, proxy start/end, time."""
    rows = []
    for name in POLICY_STAGES:
        if name not in stages:
            continue
        s = stages[name]["summary"]
        rows.append({"stage": LABELS.get(name, name), "gold_start": s.get("gold_reward_start"),
                     "gold_end": s.get("gold_reward_end"), "gain_sft_std": gold_gain(s), "kl_end": s.get("kl_end"),
                     "proxy_start": s.get("proxy_reward_start"), "proxy_end": s.get("proxy_reward_end"),
                     "seconds": s.get("wall_seconds")})
    return rows


def text_summary(out_dir: str | Path) -> str:
    """A few lines for the terminal: time per stage, RM accuracy, gold/KL per policy stage, the PPO target."""
    stages = load_run(out_dir)
    lines = ["stage times: " + ", ".join(f"{k} {_fmt(v['summary'].get('wall_seconds'))} s" for k, v in stages.items())]
    if "rm" in stages:
        s = stages["rm"]["summary"]
        lines.append(f"reward model: held-out accuracy {_fmt(s.get('eval_accuracy'))} "
                     f"(raters' Bayes accuracy {_fmt(s.get('bayes_accuracy'))})")
    for row in stage_rows(stages):
        lines.append(f"{row['stage']:<11} gold {_fmt(row['gold_start'])} -> {_fmt(row['gold_end'])} "
                     f"({_fmt(row['gain_sft_std'])} SFT-std), KL {_fmt(row['kl_end'])} nats, "
                     f"proxy {_fmt(row['proxy_start'])} -> {_fmt(row['proxy_end'])}")
    evals = [e for e in stages.get("ppo_nokl", {}).get("evals", []) if "gold_mean" in e]
    if len(evals) > 1:  # over-optimisation: where the held-out gold peaked, and what the proxy did after
        peak, last = max(evals, key=lambda e: e["gold_mean"]), evals[-1]
        lines.append(f"β = 0 vs the weak proxy: gold peaked at {_fmt(peak['gold_mean'])} (step {peak['step']}), "
                     f"ended at {_fmt(last['gold_mean'])} while the proxy went {_fmt(peak.get('proxy_mean'))} -> "
                     f"{_fmt(last.get('proxy_mean'))}")
    if "ppo" in stages:
        s = stages["ppo"]["summary"]
        gain, kl = gold_gain(s), s.get("kl_end")
        met = gain is not None and kl is not None and gain >= 1.0 and kl <= 8.0
        lines.append(f"PPO target (gold +1.0 SFT-std at KL <= 8 nats): {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def _samples_table(start: list[dict], end: list[dict], n: int = 8) -> str:
    rows = []
    for i in range(min(n, max(len(start), len(end)))):
        a = start[i] if i < len(start) else {}
        b = end[i] if i < len(end) else {}
        prompt = html.escape(str(a.get("prompt", b.get("prompt", ""))))
        cells = [f"{html.escape(str(x.get('completion', '')))}<br><small>gold {_fmt(x.get('gold'))}</small>"
                 for x in (a, b)]
        rows.append(f"<tr><td>{prompt}</td><td>{cells[0]}</td><td>{cells[1]}</td></tr>")
    return ("<table><tr><th>prompt</th><th>before (SFT policy)</th><th>after PPO</th></tr>" + "".join(rows)
            + "</table>")


def write_report(out_dir: str | Path) -> Path:
    """Write out_dir/report.html and its PNGs; returns the HTML path."""
    out_dir = Path(out_dir)
    stages = load_run(out_dir)
    images = [p for p in (plot_curves(stages, out_dir / "curves.png"),
                          plot_reward_vs_kl(stages, out_dir / "reward_vs_kl.png"),
                          plot_overoptimisation(stages, out_dir / "overoptimisation.png")) if p is not None]
    head = ["stage", "gold start", "gold end", "gain (SFT std)", "KL end (nats)", "proxy start", "proxy end", "seconds"]
    table = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row.values()) + "</tr>"
                    for row in stage_rows(stages))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>tether report</title><style>"
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}</style></head><body>",
        f"<h1>tether report: {html.escape(str(out_dir))}</h1>",
        f"<pre>{html.escape(text_summary(out_dir))}</pre>",
        "<h2>Policies on held-out prompts</h2>",
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + table + "</table>",
        *[f"<h2>{html.escape(p.stem.replace('_', ' '))}</h2><img src='{p.name}' width='900'>" for p in images],
    ]
    if "ppo" in stages:
        parts += ["<h2>Samples before and after PPO</h2>",
                  _samples_table(stages["ppo"]["samples_start"], stages["ppo"]["samples_end"])]
    if "ppo_nokl" in stages:
        parts += ["<h2>Samples after PPO with β = 0</h2>",
                  _samples_table(stages["ppo_nokl"]["samples_start"], stages["ppo_nokl"]["samples_end"])]
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts))
    return path
