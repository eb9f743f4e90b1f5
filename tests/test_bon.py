"""Best-of-N: the table against the analytic numbers of docs/reference.md §Best-of-N and over-optimisation within
sampling error (a N(0,1) proxy, a toy discrete policy), the winner rule by hand, and `tether bon` end to end on a tiny
model (table, files, sft=true rounds)."""

import csv
import json
import math
import random
from collections import Counter

import pytest
import torch

from tether import metrics as M
from tether.config import ConfigError, load_config
from tether.recipes import best_of_n as B
from tether.testing import save_tiny


def test_table_matches_normal_theory_within_sampling_error():
    # proxy = gold ~ N(0, 1), 400 prompts x 64 samples: gold_bon must be E[max of n normals] (0.564, 1.029, 1.424,
    # 1.766) within 4 standard errors, and every sample is distinct, so kl_empirical is log n − (n−1)/n within 0.01
    rng = random.Random(0)
    proxy = [[rng.gauss(0, 1) for _ in range(64)] for _ in range(400)]
    rows = B.bon_table(proxy, proxy, [1, 2, 4, 8, 16])
    for row, table_max, table_kl in zip(rows, [0.0, 0.564, 1.029, 1.424, 1.766], [0.0, 0.193, 0.636, 1.204, 1.835]):
        assert abs(row["gold_bon"] - table_max) < 4 * row["gold_bon_se"], row
        assert row["gold_bon"] == row["proxy_bon"]  # the proxy is the gold here
        assert row["kl_analytic"] == pytest.approx(table_kl, abs=5e-4)
        assert row["kl_empirical"] == pytest.approx(table_kl, abs=0.01)
        assert row["normal_max"] == pytest.approx(table_max, abs=5e-4)
        assert abs(row["proxy_gain_z"] - table_max) < 0.1  # per-prompt z-scores: near the normal table
    assert rows[0]["gold_bon"] == pytest.approx(sum(map(sum, proxy)) / (400 * 64))  # n = 1: the plain mean


def test_gold_that_ignores_the_proxy_does_not_move():
    rng = random.Random(1)
    proxy = [[rng.gauss(0, 1) for _ in range(16)] for _ in range(200)]
    gold = [[rng.gauss(0, 1) for _ in range(16)] for _ in range(200)]
    for row in B.bon_table(proxy, gold, [1, 4, 16]):
        assert abs(row["gold_bon"]) < 4 * row["gold_bon_se"]


def test_toy_discrete_policy_best_of_n_matches_the_exact_distribution():
    # π over 6 outputs, two pairs of them tied in reward. Draw best-of-4 20,000 times with the recipe's winner rule:
    # the frequencies match the exact best-of-n law and the plug-in KL matches bon_kl_discrete within sampling error,
    # which is below the analytic log 4 − 3/4 = 0.636 because of the ties
    probs = [0.3, 0.25, 0.15, 0.15, 0.1, 0.05]
    reward = [0.0, 1.0, 1.0, 2.0, 3.0, 3.0]
    n, draws, rng = 4, 20_000, random.Random(0)
    counts = Counter()
    for _ in range(draws):
        outs = rng.choices(range(6), weights=probs, k=n)
        counts[outs[B.best_index([reward[o] for o in outs])]] += 1
    levels = sorted(set(reward))
    masses = [sum(p for p, r in zip(probs, reward) if r == level) for level in levels]
    exact = M.bon_kl_discrete(masses, n)
    below = 0.0
    for level, q in zip(levels, masses):
        p_level = (below + q) ** n - below**n
        for y in (i for i in range(6) if reward[i] == level):  # within a level in proportion to π
            p_y = p_level * probs[y] / q
            assert abs(counts[y] / draws - p_y) < 4 * math.sqrt(p_y * (1 - p_y) / draws) + 1e-9
        below += q
    freq = [counts[y] / draws for y in range(6)]
    level_freq = [sum(f for f, r in zip(freq, reward) if r == level) for level in levels]
    plug_in = sum(f * math.log(f / q) for f, q in zip(level_freq, masses) if f > 0)
    assert plug_in == pytest.approx(exact, abs=0.02)
    # levels 0.3, 0.4, 0.15, 0.15: F = .3, .7, .85, 1 -> best-of-4 on them .0081, .2320, .2819, .4780;
    # KL = .0081·ln(.027) + .232·ln(.58) + .2819·ln(1.879) + .478·ln(3.187) = −.0293 − .1264 + .1779 + .5540 = .5762
    assert exact == pytest.approx(0.5762, abs=1e-4) and exact < M.bon_kl(n) - 0.05


def test_best_index_and_winners_by_hand():
    assert B.best_index([0.1, 0.7, 0.7, 0.2]) == 1  # the first of tied
    groups = [{"prompt": "p", "completions": ["a", "b", "c"], "has_eos": [True, False, True], "proxy": [0.1, 0.9, 0.5]},
              {"prompt": "q", "completions": ["d", " ", "f"], "has_eos": [True, True, True], "proxy": [0.1, 0.9, 0.5]}]
    assert B.winners(groups, 3) == []  # "b" never ended, " " is empty
    assert [w["completion"] for w in B.winners(groups, 3, require_eos=False)] == ["b"]
    assert [w["completion"] for w in B.winners(groups, 1)] == ["a", "d"]  # best of the first one only


def test_config_checks_the_n_values():
    with pytest.raises(ConfigError, match="ns"):
        load_config(B.BoNConfig, None, {"model": "m", "reward": "reviews", "task": "reviews", "n": 4, "ns": "1,8"})
    cfg = load_config(B.BoNConfig, None, {"model": "m", "reward": "reviews", "task": "reviews", "n": 6})
    assert cfg.n_values() == [1, 2, 4, 6]
    cfg = load_config(B.BoNConfig, None, ["model=m", "reward=reviews", "task=reviews", "n=6", "ns=4"])
    assert cfg.n_values() == [4]  # one value on the command line is a list of one


@pytest.fixture()
def tiny(tmp_path):
    save_tiny(tmp_path / "m")
    return tmp_path


def bon(tmp, **kw):
    base = {"model": str(tmp / "m"), "reward": "reviews", "task": "reviews", "n": 4, "n_prompts": 3,
            "max_new_tokens": 6, "out": str(tmp / "bon"), "missing_eos_penalty": "none", "progress": False}
    return B.run(load_config(B.BoNConfig, None, {**base, **kw}))


def test_bon_end_to_end_table_and_files(tiny):
    summary = bon(tiny)
    out = tiny / "bon"
    rows = list(csv.DictReader(open(out / "bon_table.csv")))
    assert [int(r["n"]) for r in rows] == [1, 2, 4]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(len(s["completions"]) == 4 for s in samples)
    # the reward is the gold itself: proxy and gold columns agree; n = 1 is the mean, n = 4 the mean of the maxima
    assert [float(r["gold_bon"]) for r in rows] == pytest.approx([float(r["proxy_bon"]) for r in rows])
    assert float(rows[0]["proxy_bon"]) == pytest.approx(sum(sum(s["gold"]) / 4 for s in samples) / 3)
    assert float(rows[2]["proxy_bon"]) == pytest.approx(sum(max(s["gold"]) for s in samples) / 3)
    assert float(rows[0]["proxy_bon"]) <= float(rows[1]["proxy_bon"]) <= float(rows[2]["proxy_bon"])
    winners = [json.loads(x) for x in (out / "winners.jsonl").read_text().splitlines()]
    best = {s["prompt"]: max(s["gold"]) for s in samples}
    assert all(w["gold"] == best[w["prompt"]] for w in winners)
    assert summary["kl_analytic_at_n"] == pytest.approx(math.log(4) - 0.75)
    assert json.loads((out / "summary.json").read_text())["n"] == 4


def test_bon_sft_rounds_fine_tune_on_the_winners(tiny):
    summary = bon(tiny, sft=True, rounds=2, n_train_prompts=4, sft_max_steps=2, sft_batch_size=2, sft_lr=1e-2)
    from tether.models import load_causal_lm

    start, end = load_causal_lm(tiny / "m"), load_causal_lm(summary["model"])
    assert summary["model"].endswith("round-1/sft/model")
    assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), end.parameters()))
    assert (tiny / "bon" / "round-0" / "winners.jsonl").exists() and summary["winners_per_round"][0] > 0
    assert math.isfinite(summary["gold_reward_end"]) and math.isfinite(summary["kl_end"])


def test_bon_resumes_an_interrupted_run_without_redrawing(tiny, monkeypatch):
    """Kill in round 1's fine-tuning; resume=true keeps the table's samples and round 0, and ends where an
    uninterrupted run ends. Without resume or overwrite, the directory is refused."""
    from tether.config import ConfigError
    from tether.recipes import sft

    kw = {"sft": True, "rounds": 2, "n_train_prompts": 4, "sft_max_steps": 2, "sft_batch_size": 2, "sft_lr": 1e-2}
    whole = bon(tiny, out=str(tiny / "whole"), **kw)
    real, rounds = sft.run, []

    def killed_in_round_1(cfg):
        rounds.append(cfg.out)
        if len(rounds) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(cfg)

    monkeypatch.setattr(sft, "run", killed_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        bon(tiny, **kw)
    monkeypatch.setattr(sft, "run", real)
    with pytest.raises(ConfigError, match="holds an earlier run"):
        bon(tiny, **kw)
    samples_before = (tiny / "bon" / "samples.jsonl").read_text()
    resumed = bon(tiny, resume=True, **kw)
    assert (tiny / "bon" / "samples.jsonl").read_text() == samples_before  # the table was not redrawn
    for key in ("gold_bon_at_n", "proxy_bon_at_n", "winners_per_round", "gold_reward_end", "kl_end"):
        assert resumed[key] == pytest.approx(whole[key]), key
