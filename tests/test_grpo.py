"""GRPO end to end on a tiny model: finite loss, parameters move, β = 0 loads no reference, dynamic sampling drops
groups with equal rewards, every reward function is logged on its own."""

import json
import math

import pytest
import torch

from tether.config import ConfigError, load_config
from tether.recipes import grpo as G
from tether.testing import save_tiny

LENGTH_REWARD = "python:tests.test_grpo:length_reward"


def length_reward(prompts, completions, records):
    return [float(len(c)) for c in completions]  # characters: differs between samples of a group


def constant_reward(prompts, completions, records):
    return [1.0] * len(completions)


@pytest.fixture()
def setup(tmp_path):
    save_tiny(tmp_path / "m")
    with open(tmp_path / "p.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"the film was {i}", "answer": i}) + "\n")
    return tmp_path


def cfg_for(tmp, **kw):
    base = {"model": str(tmp / "m"), "task": "none", "prompts": str(tmp / "p.jsonl"),
            "eval_prompts": str(tmp / "p.jsonl"), "reward": LENGTH_REWARD, "out": str(tmp / "run"),
            "max_steps": 2, "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 5, "batch_size": 4,
            "progress": False, "lr": 1e-2}
    return load_config(G.GRPOConfig, None, {**base, **kw})


def test_grpo_steps_change_the_policy(setup):
    from transformers import AutoModelForCausalLM

    summary = G.run(cfg_for(setup, beta=0.04))
    before = AutoModelForCausalLM.from_pretrained(setup / "m").state_dict()
    after = AutoModelForCausalLM.from_pretrained(setup / "run" / "model").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    lines = [json.loads(x) for x in (setup / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(x["kl"] == x["kl"] for x in lines)
    assert f"reward/{LENGTH_REWARD}" in lines[0]
    assert summary["steps"] == 2


def test_beta_zero_loads_no_reference(setup, monkeypatch):
    calls = []
    monkeypatch.setattr("tether.reference.frozen_copy", lambda m: calls.append(m) or m)
    G.run(cfg_for(setup, beta=0.0, estimator="rloo"))
    assert calls == []
    G.run(cfg_for(setup, beta=0.1, out=str(setup / "run2")))
    assert len(calls) == 1


def test_informative_groups_and_dynamic_sampling(setup):
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 2.0])
    assert G.informative_groups(scores, 3).tolist() == [False, True]
    summary = G.run(cfg_for(setup, reward="python:tests.test_grpo:constant_reward", dynamic_sampling=True,
                            max_refills=1))  # every group uninformative: steps are skipped, not crashed
    lines = [json.loads(x) for x in (setup / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["groups_informative"] == 0.0 for x in lines) and summary["steps"] == 2


def test_weights_and_several_rewards(setup):
    G.run(cfg_for(setup, reward=f"{LENGTH_REWARD},python:tests.test_grpo:constant_reward", reward_weights="1,0.5"))
    line = json.loads((setup / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["score"] == pytest.approx(line[f"reward/{LENGTH_REWARD}"] + 0.5 * 1.0, abs=1e-5)
    with pytest.raises(Exception, match="reward_weights"):
        cfg_for(setup, reward=LENGTH_REWARD, reward_weights="1,2").validate() or G.build_rewards(
            cfg_for(setup, reward=LENGTH_REWARD, reward_weights="1,2"), None)


def logging_reward(prompts, completions, records):
    """A length reward that also writes each call's prompts to $GRPO_PROMPT_LOG.<rank> (one JSON list per call)."""
    import os

    with open(f"{os.environ['GRPO_PROMPT_LOG']}.{os.environ.get('RANK', '0')}", "a") as f:
        f.write(json.dumps(list(prompts)) + "\n")
    return length_reward(prompts, completions, records)


@pytest.mark.slow
def test_two_processes_draw_disjoint_prompts(setup):
    """Under torchrun with 2 processes, each step's prompts are one global draw of 2 x prompts_per_step split
    between the ranks: no prompt sampled twice in a step, and together the draw a single process would take."""
    import os
    import subprocess
    import sys

    from tether.engine import step_indices

    log = setup / "prompts"
    cfg = cfg_for(setup, reward="python:tests.test_grpo:logging_reward", beta=0.0)
    args = [f"{k}={getattr(cfg, k)}" for k in ("model", "task", "prompts", "eval_prompts", "reward", "max_steps",
                                                "prompts_per_step", "group_size", "max_new_tokens", "batch_size")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRPO_PROMPT_LOG": str(log)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "tether.cli", "grpo", *args, "beta=0", "progress=false", f"out={setup / 'ddp'}"], check=True, env=env,
                   timeout=600, cwd=os.getcwd())
    pool = [json.loads(x)["prompt"] for x in (setup / "p.jsonl").read_text().splitlines()]
    calls = [[json.loads(x) for x in open(f"{log}.{r}").read().splitlines()] for r in (0, 1)]
    assert all(len(c) == 4 for c in calls)  # held-out reward at the start, 2 steps, held-out reward at the end
    for step in range(2):
        mine = [sorted(set(calls[r][1 + step])) for r in (0, 1)]  # a rank's rows: its prompts, G times each
        assert len(mine[0]) == len(mine[1]) == 2 and not set(mine[0]) & set(mine[1])
        assert sorted(mine[0] + mine[1]) == sorted(pool[i] for i in step_indices(step, 4, len(pool), cfg.seed))


def test_interrupted_and_resumed_run_matches_the_uninterrupted_one(setup, monkeypatch):
    """Kill during step 2 of 4, resume: the same metrics, and accuracy_start is the starting policy's, not the
    checkpoint's (it used to be measured again on the resumed policy)."""
    import json

    kw = {"beta": 0.04, "max_steps": 4, "save_every": 2, "task": "arithmetic", "reward": LENGTH_REWARD,
          "n_eval_prompts": 8}
    whole = G.run(cfg_for(setup, out=str(setup / "whole"), **kw))
    real, calls = G.grpo_update, []

    def crash_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(G, "grpo_update", crash_in_step_2)
    with pytest.raises(KeyboardInterrupt):
        G.run(cfg_for(setup, out=str(setup / "split"), **kw))
    monkeypatch.setattr(G, "grpo_update", real)
    accuracy, measured = G.greedy_accuracy, []
    monkeypatch.setattr(G, "greedy_accuracy", lambda *a, **k: measured.append(1) or accuracy(*a, **k))
    split = G.run(cfg_for(setup, out=str(setup / "split"), resume=True, **kw))
    assert len(measured) == 1  # the end accuracy only: the start's came from the checkpoint
    read = lambda name: [json.loads(x) for x in (setup / name / "metrics.jsonl").read_text().splitlines()]  # noqa
    for a, b in zip(read("whole"), read("split"), strict=True):
        for key in a.keys() - {"tokens_per_second"}:
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    assert split["accuracy_start"] == whole["accuracy_start"] and split["accuracy_end"] == whole["accuracy_end"]


def trl_style_reward(completions, **kwargs):
    """A reward function written for TRL's GRPOTrainer: completions by keyword, dataset columns as keywords."""
    return [float(len(c)) * (1.0 if a is not None else 0.0) for c, a in zip(completions, kwargs["answer"])]


def wrong_shape_reward(text):
    return [0.0]


def test_a_trl_style_reward_without_a_task_reports_its_own_reward(setup, tmp_path, capsys):
    """TRL's f(completions, **kwargs) runs unchanged; plain prompts (no answer needed for a python reward); no task
    and no eval_prompts: prompts held out of the training ones; the summary holds reward_start/end, no accuracy."""
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"the film was {i}", "answer": i}) + "\n" for i in range(40)))
    summary = G.run(load_config(G.GRPOConfig, None, {
        "model": str(setup / "m"), "task": "none", "prompts": str(plain), "rewards": "python:tests.test_grpo:"
        "trl_style_reward", "out": str(setup / "trl"), "max_steps": 1, "prompts_per_step": 2, "group_size": 2,
        "max_new_tokens": 4, "batch_size": 4, "progress": False}))
    assert "key 'rewards' is 'reward' here" in capsys.readouterr().err
    assert "reward_start" in summary and "accuracy_start" not in summary
    assert math.isfinite(summary["reward_start"]) and math.isfinite(summary["reward_end"])
    on_disk = json.loads((setup / "trl" / "summary.json").read_text())
    assert "NaN" not in (setup / "trl" / "summary.json").read_text() and on_disk["reward_start"] == summary["reward_start"]


def test_a_reward_function_of_the_wrong_shape_fails_before_any_model_loads(setup, monkeypatch):
    monkeypatch.setattr(G, "load_causal_lm", lambda *a, **k: pytest.fail("no model loads for a bad reward"))
    with pytest.raises(ConfigError, match=r"reward 'python:tests.test_grpo:wrong_shape_reward' takes \(text\)"):
        G.run(cfg_for(setup, reward="python:tests.test_grpo:wrong_shape_reward"))


def test_max_staleness_one_trains_on_batches_a_version_old_and_logs_the_correction(setup):
    """max_staleness=1: from step 1 each batch was sampled by the weights before the last update (lag 1), is
    corrected by TIS against recomputed log-probs, and the correction's figures are logged."""
    G.run(cfg_for(setup, max_steps=3, max_staleness=1, off_policy_correction="tis", beta=0.0))
    lines = [json.loads(x) for x in (setup / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["version_lag"] for x in lines] == [0, 1, 1]
    assert lines[0]["ess_fraction"] == 1.0 and lines[0]["clipped_share"] == 0.0  # on-policy: every weight 1
    for x in lines[1:]:  # lr 1e-2 moved the policy: the weights differ from 1 but stay capped at C = 2
        assert 0 < x["weight_mean"] <= 2.0 and x["weight_mean"] != 1.0
        assert 0 < x["ess_fraction"] <= 1.0 and x["behaviour_kl"] > 0
        assert 0 <= x["clipped_share"] <= 1.0


def test_on_policy_old_logprobs_by_passes_and_precision():
    """Lag 0 from tether's sampler: one pass returns no old log-probs (the update uses its own, detached: ratio 1
    in any precision); several passes keep the sampler's, unless the trainer runs under an autocast the sampler
    does not, when they are the trainer's own; a stale batch is always recomputed."""
    from tether.testing import tiny_causal_lm, tiny_tokenizer

    model = tiny_causal_lm(tiny_tokenizer()).eval()
    seq = torch.randint(3, 60, (4, 9))
    attn, mask = torch.ones_like(seq), torch.ones(4, 5)
    behaviour = torch.full((4, 5), -1.0)
    cfg = load_config(G.GRPOConfig, None, {"model": "m", "batch_size": 2, "ppo_epochs": 1})
    assert G.off_policy(cfg, model, seq, attn, mask, 4, behaviour, lag=0)[0] is None
    assert G.off_policy(cfg, model, seq, attn, mask, 4, behaviour, lag=0, same_precision=False)[0] is None
    cfg = load_config(G.GRPOConfig, None, {"model": "m", "batch_size": 2, "ppo_epochs": 2})
    assert G.off_policy(cfg, model, seq, attn, mask, 4, behaviour, lag=0)[0] is behaviour
    own = G.trainer_logprobs(cfg, model, seq, attn, 4)
    recomputed = G.off_policy(cfg, model, seq, attn, mask, 4, behaviour, lag=0, same_precision=False)[0]
    assert own.shape == (4, 5) and torch.equal(recomputed, own) and not torch.equal(own, behaviour)
    cfg = load_config(G.GRPOConfig, None, {"model": "m", "batch_size": 2, "max_staleness": 1,
                                           "off_policy_correction": "tis"})
    old, weights, metrics = G.off_policy(cfg, model, seq, attn, mask, 4, behaviour, lag=1)
    assert torch.equal(old, own) and weights is not None and metrics["behaviour_kl"] > 0
