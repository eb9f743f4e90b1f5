"""The reward-vs-KL frontier: `dominance` by hand, and `tether eval frontier` end to end on a tiny model (every stage
a few steps) writing the CSV, the PNG and the verdict."""

import csv
import json
import math

import pytest

from tether.config import ConfigError, load_config
from tether.recipes import frontier as F
from tether.testing import save_tiny


def pt(method, kl, gold, se=0.01):
    return {"method": method, "kl": kl, "gold": gold, "gold_se": se}


def test_dominance_by_hand():
    start = pt("sft", 0.0, 0.0)
    points = {"bon": [pt("bon", 0.2, 0.5), pt("bon", 0.6, 0.8), pt("bon", 1.2, 0.9)],
              "dpo": [pt("dpo", 1.0, 1.5), pt("dpo", 3.0, 1.4)],
              "ppo": [pt("ppo", 2.0, 1.0), pt("ppo", 4.0, 2.0, se=0.5)]}
    segments = F.dominance(points, start)
    # budgets 0.2, 0.6: only best-of-n left the SFT point -> bon; 1.0 .. 3.0: DPO's 1.5 leads, over bon's 0.8 (margin
    # 0.7) and 0.9 (0.6), then PPO's 1.0 (0.5: the closest contest); at 4: PPO's 2.0 beats DPO's 1.5 with se 0.5:
    # margin 0.5 ± √(0.5² + 0.01²) = 0.5001, not significant
    assert [(s["kl_from"], s["kl_to"], s["best"]) for s in segments] == [
        (0.2, 1.0, "bon"), (1.0, 4.0, "dpo"), (4.0, math.inf, "ppo")]
    first, middle, last = segments
    assert first["gold"] == 0.5 and first["runner_up_gold"] == 0.0 and first["significant"]  # the others: SFT point
    assert middle["gold"] == 1.5 and middle["runner_up"] == "ppo" and middle["margin"] == pytest.approx(0.5)
    assert last["margin"] == pytest.approx(0.5) and last["margin_se"] == pytest.approx(math.sqrt(0.25 + 1e-4))
    assert not last["significant"]
    text = F.describe_dominance(segments)
    assert "KL 0.200–1.000 nats: bon best" in text and "KL ≥ 4.000 nats: ppo best" in text and "not resolved" in text


def test_dominance_ties_and_best_within():
    start = pt("sft", 0.0, 1.0)
    points = {"a": [pt("a", 1.0, 0.5)], "b": [pt("b", 2.0, 0.8)]}  # both below the SFT point: a tie at SFT everywhere
    assert [s["best"] for s in F.dominance(points, start)] == ["tie"]
    assert F.best_within(points["b"], 1.0) is None
    assert F.best_within(points["a"] + points["b"], 5.0)["gold"] == 0.8


def test_config_checks():
    with pytest.raises(ConfigError, match="unknown method"):
        load_config(F.FrontierConfig, None, {"stages": "ppo,rlhf"})
    cfg = load_config(F.FrontierConfig, None, {"betas_ppo": "0.05,0.5", "stages": "ppo,bon,odpo"})
    assert list(cfg.sweep()) == ["ppo_beta0.05", "ppo_beta0.5", "odpo_beta0.1"]
    assert cfg.stage_table()["ppo_beta0.5"].prefix == "ppo" and cfg.stage_table()["odpo_beta0.1"].prefix == "dpo"
    assert cfg.stage_table()["odpo_beta0.1"].module == "tether.recipes.online_dpo"


TINY = {
    "n_sft": 32, "n_pairs": 32, "n_rankings": 8, "sft_max_steps": 2, "sft_batch_size": 8, "rm_max_steps": 2, "rm_batch_size": 8,
    "betas_ppo": "0.05", "ppo_max_steps": 2, "ppo_rollout_batch": 8, "ppo_batch_size": 4, "ppo_num_minibatches": 2,
    "ppo_ppo_epochs": 1, "ppo_eval_every": 1, "ppo_n_eval_prompts": 4, "ppo_eval_samples": 1, "ppo_max_new_tokens": 8,
    "betas_dpo": "0.1,0.5", "dpo_max_steps": 2, "dpo_batch_size": 4, "dpo_eval_every": 1, "dpo_n_eval_prompts": 4,
    "dpo_eval_samples": 1, "dpo_max_new_tokens": 16, "dpo_lr": 1e-2, "bon_ns": "1,2,4", "progress": False,
    "stages": "ppo,dpo,bon,odpo", "odpo_rounds": 2, "odpo_pairs_per_round": 16,  # 16 tokens: enough responses end
}


def test_frontier_end_to_end_on_a_tiny_model(tmp_path):
    save_tiny(tmp_path / "m")
    cfg = load_config(F.FrontierConfig, None, {**TINY, "model": str(tmp_path / "m"), "out": str(tmp_path / "f")})
    summary = F.run(cfg)
    out = tmp_path / "f"
    rows = list(csv.DictReader(open(out / "frontier.csv")))
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    # SFT point, PPO 1 β × (eval after step 1, end), DPO 2 β × 2 evaluations, online DPO 2 rounds, best-of-n n = 2, 4
    assert len(by["sft"]) == 1 and float(by["sft"][0]["kl"]) == 0.0
    assert len(by["ppo"]) == 2 and len(by["dpo"]) == 4 and [r["setting"] for r in by["bon"]] == ["n=2", "n=4"]
    assert [r["run"] for r in by["odpo"]] == ["odpo_beta0.1"] * 2
    assert [float(r["kl"]) for r in by["bon"]] == pytest.approx([math.log(2) - 0.5, math.log(4) - 0.75])
    assert all(math.isfinite(float(r["kl"])) and math.isfinite(float(r["gold"])) for r in rows)
    assert (out / "frontier.png").stat().st_size > 10_000
    assert (out / "frontier.txt").read_text().strip() and summary["points"] == len(rows)
    assert json.loads((out / "summary.json").read_text())["dominance"]
    # the PPO end point is the run's own summary
    ppo = json.loads((out / "ppo_beta0.05" / "summary.json").read_text())
    assert float(by["ppo"][-1]["gold"]) == pytest.approx(ppo["gold_reward_end"])
    # running again reads every finished run back: the same CSV
    F.run(cfg)
    assert list(csv.DictReader(open(out / "frontier.csv"))) == rows
