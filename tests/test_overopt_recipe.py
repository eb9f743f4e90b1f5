"""`tether eval overopt`: stage names and overrides, the curves and their fits from points (fast), and the law on the
embedded reviews task end to end (slow: gold at the largest KL below its peak for the β = 0 proxy run)."""

import json
import math

import pytest

from tether.config import ConfigError, load_config
from tether.recipes import overopt as O


def cfg_for(tmp_path, *overrides):
    return load_config(O.OveroptConfig, None, [f"out={tmp_path}", *overrides], recipe="eval overopt")


def test_stages_and_their_overrides(tmp_path):
    cfg = cfg_for(tmp_path, "rm_sizes=250,500", "ppo_sizes=500", "ppo_betas=0,0.01")
    assert cfg.stage_list() == ["sft", "rm_250", "rm_500", "ppo_rm500_beta0", "ppo_rm500_beta0.01"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prefs.jsonl").write_text("".join(f'{{"i": {i}}}\n' for i in range(600)))
    got = O.stage_overrides(cfg, "rm_250")
    assert len(open(got["data"]).read().splitlines()) == 250  # the first 250 comparisons
    assert O.stage_overrides(cfg, "ppo_rm500_beta0.01") == {"kl_coef": 0.01, "reward": f"rm:{tmp_path / 'rm_500'}"}
    with pytest.raises(ConfigError, match="ppo_sizes"):
        cfg_for(tmp_path, "rm_sizes=250", "ppo_sizes=500")
    with pytest.raises(ConfigError, match="n_pairs"):
        cfg_for(tmp_path, "rm_sizes=3000")


def test_fit_curve_on_points_of_the_law():
    # best-of-n points on gold = 0.5 + d(2 − 0.5d): start 0.5 at d = 0, peak at d = 2, gold 1.5 at d = 3
    pts = [{"step": n, "d": d, "gold": 0.5 + d * (2 - 0.5 * d)} for n, d in ((1, 0.0), (2, 1.0), (4, 2.0), (8, 3.0))]
    fit = O.fit_curve("bon", pts)
    assert fit["alpha"] == pytest.approx(2.0) and fit["beta"] == pytest.approx(0.5) and fit["r2"] == pytest.approx(1)
    assert fit["peak_d"] == pytest.approx(2.0) and fit["observed_peak_d"] == 2.0
    assert fit["observed_peak_gold"] == pytest.approx(2.5) and fit["gold_at_largest_d"] == pytest.approx(2.0)
    assert fit["peak_within_sweep"] and fit["gold_falls_past_peak"]
    # PPO points on gold = d(1 − 0.5 log d) (start 0): the peak at d = e
    rl = [{"step": 10 * i, "d": d, "gold": d * (1 - 0.5 * math.log(d)) if d else 0.0}
          for i, d in enumerate((0.0, 1.0, math.e, math.e ** 2))]
    fit = O.fit_curve("ppo", rl)
    assert fit["peak_d"] == pytest.approx(math.e) and fit["gold_falls_past_peak"]


def test_curves_group_and_order_points():
    points = [{"method": "ppo", "rm_size": 500, "beta": 0.0, "step": 20, "d": 2.0},
              {"method": "ppo", "rm_size": 500, "beta": 0.0, "step": 0, "d": 0.0},
              {"method": "bon", "rm_size": 500, "beta": "", "step": 1, "d": 0.0}]
    by = O.curves(points)
    assert [p["step"] for p in by[("ppo", 500, 0.0)]] == [0, 20] and len(by[("bon", 500, "")]) == 1
    assert O.curve_name(("ppo", 500, 0.0)) == "ppo_rm500_beta0" and O.curve_name(("bon", 250, "")) == "bon_rm250"


@pytest.mark.slow
def test_overopt_gold_falls_past_its_peak_for_the_beta_zero_proxy_run(tmp_path):
    cfg = cfg_for(tmp_path, "rm_sizes=500", "ppo_sizes=500", "ppo_betas=0", "bon_prompts=16", "bon_samples=64",
                  "ppo_max_steps=80", "progress=false")
    O.run(cfg)
    fits = json.loads((tmp_path / "fits.json").read_text())
    ppo = fits["ppo_rm500_beta0"]
    assert ppo["gold_at_largest_d"] < ppo["observed_peak_gold"]  # over-optimisation: gold turned down
    assert (tmp_path / "overopt.png").exists() and (tmp_path / "points.csv").exists()
