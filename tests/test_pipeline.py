"""`tether pipeline` (SFT -> RM -> PPO from one file), `tether demo` and the report.

- the pipeline wires each stage to the one before (PPO's model is the SFT output, its reward the RM), writes one
  directory per stage, skips finished stages and resumes an unfinished one from its checkpoint;
- keys are the stages' own keys with a prefix, checked like any config (unknown keys, types, errors per stage);
- the report reads a run directory back into report.html + PNGs and a terminal summary;
- the demo on a tiny model and little data runs every stage and writes the report (fast); the real demo, with the
  built `reviews` base model, meets the PPO target within 10 minutes (slow).
"""

import json
import random
import time

import pytest
import torch
import yaml

from tether.cli import main as cli_main
from tether.config import ConfigError, load_config
from tether.data import write_jsonl
from tether.recipes.pipeline import PipelineConfig, run, stage_settings
from tether.report import gold_gain, smooth, text_summary, write_report
from tether.testing import save_tiny

torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the CPU is shared with other test workers

PROMPTS = ["the film was", "the plot is", "this book was", "the music is"]
GOOD, BAD = "good great wonderful brilliant".split(), "bad awful boring dull".split()


def gold(prompts, completions, records=None):
    """A toy 'hidden' reward for the report: +1 per good word, −1 per bad word."""
    return [sum((w in GOOD) - (w in BAD) for w in c.split()) for c in completions]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    save_tiny(root / "base")
    rng = random.Random(0)
    write_jsonl(root / "sft.jsonl", [{"prompt": p, "completion": f"{rng.choice(GOOD + BAD)} ."} for p in PROMPTS * 8])
    write_jsonl(root / "prefs.jsonl", [{"prompt": p, "chosen": f"{rng.choice(GOOD)} .", "rejected": f"{rng.choice(BAD)} ."}
                                       for p in PROMPTS * 8])
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 8])
    return root


def pipeline_config(workdir, out, **kw):
    base = {"out": str(out), "model": str(workdir / "base"), "progress": False,
            "sft_data": str(workdir / "sft.jsonl"), "sft_max_steps": 3, "sft_batch_size": 8,
            "rm_data": str(workdir / "prefs.jsonl"), "rm_max_steps": 3, "rm_batch_size": 8,
            "ppo_prompts": str(workdir / "prompts.jsonl"), "ppo_max_steps": 2, "ppo_rollout_batch": 8,
            "ppo_num_minibatches": 2, "ppo_batch_size": 4, "ppo_max_new_tokens": 5, "ppo_n_eval_prompts": 4,
            "ppo_eval_samples": 1}
    return load_config(PipelineConfig, None, {**base, **kw})


def test_pipeline_wires_stages_skips_finished_and_resumes(workdir, tmp_path):
    out = tmp_path / "pipe"
    summary = run(pipeline_config(workdir, out))
    for stage in ("sft", "rm", "ppo"):
        assert (out / stage / "summary.json").exists(), stage
    ppo_cfg = yaml.safe_load((out / "ppo" / "config.yaml").read_text())
    assert ppo_cfg["model"] == str(out / "sft" / "model") and ppo_cfg["reward"] == f"rm:{out / 'rm'}"
    rm_cfg = yaml.safe_load((out / "rm" / "config.yaml").read_text())
    assert rm_cfg["model"] == str(out / "sft" / "model") and rm_cfg["data"] == str(workdir / "prefs.jsonl")
    assert summary["ppo/steps"] == 2 and "sft/train_loss" in summary

    stamps = {s: (out / s / "summary.json").stat().st_mtime_ns for s in ("sft", "rm", "ppo")}
    (out / "ppo" / "summary.json").unlink()  # PPO "stopped" after its last checkpoint
    time.sleep(0.01)
    again = run(pipeline_config(workdir, out))
    assert {s: (out / s / "summary.json").stat().st_mtime_ns for s in ("sft", "rm")} == {
        s: stamps[s] for s in ("sft", "rm")}  # finished stages skipped
    assert yaml.safe_load((out / "ppo" / "config.yaml").read_text())["resume"] is True
    assert again["ppo/steps"] == 2 and len((out / "ppo" / "metrics.jsonl").read_text().splitlines()) == 2


def test_prefixed_keys_are_the_stage_keys(workdir, tmp_path):
    cfg = pipeline_config(workdir, tmp_path, ppo_kl_coef=0.2, stages="rm,ppo", rm_lr="3e-5")
    assert cfg.stage_list() == ["rm", "ppo"]
    ppo = stage_settings(cfg, "ppo")
    assert ppo["kl_coef"] == 0.2 and ppo["prompts"] == str(workdir / "prompts.jsonl") and "out" not in ppo
    assert stage_settings(cfg, "rm")["lr"] == 3e-5
    with pytest.raises(ConfigError, match="did you mean 'ppo_kl_coef'"):
        pipeline_config(workdir, tmp_path, ppo_kl_coeff=0.1)
    with pytest.raises(ConfigError, match="expects a number"):
        pipeline_config(workdir, tmp_path, sft_lr="fast")
    with pytest.raises(ConfigError, match="unknown stage 'grpo'"):
        pipeline_config(workdir, tmp_path, stages="sft,grpo")


def test_a_stage_config_error_names_the_stage(workdir, tmp_path):
    cfg = pipeline_config(workdir, tmp_path / "bad", stages="ppo", ppo_prompts="", model=str(workdir / "base"))
    with pytest.raises(ConfigError, match="stage ppo .*prompts=FILE or task"):
        run(cfg)


def test_cli_runs_the_pipeline_from_one_yaml_file(workdir, tmp_path, capsys):
    cfg = pipeline_config(workdir, tmp_path / "cli", stages="sft")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"out": cfg.out, "model": cfg.model, "stages": "sft", "progress": False,
                                    "sft_data": cfg.sft_data, "sft_max_steps": 2}))
    assert cli_main(["pipeline", "--config", str(path), "sft_batch_size=4"]) == 0
    assert '"sft/train_loss"' in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "cli" / "sft" / "config.yaml").read_text())["batch_size"] == 4


def test_report_from_a_run_directory(workdir, tmp_path):
    out = tmp_path / "rep"
    run(pipeline_config(workdir, out, ppo_reward=f"rm:{out / 'rm'}", ppo_max_steps=3))
    # a gold column as a task would give it, so the report's gold/KL plots have something to draw
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    (out / "ppo" / "metrics.jsonl").write_text("".join(json.dumps({**r, "gold": r["step"] * 0.5}) + "\n" for r in rows))
    summary = json.loads((out / "ppo" / "summary.json").read_text())
    summary.update(gold_reward_start=0.0, gold_reward_end=1.5, gold_reward_std_start=1.0, kl_end=2.0)
    (out / "ppo" / "summary.json").write_text(json.dumps(summary))

    path = write_report(out)
    page = path.read_text()
    assert path == out / "report.html" and "<img src='curves.png'" in page and "reward_vs_kl.png" in page
    assert (out / "curves.png").stat().st_size > 1000 and (out / "reward_vs_kl.png").stat().st_size > 1000
    assert not (out / "overoptimisation.png").exists()  # no β = 0 run here
    text = text_summary(out)
    assert "PPO" in text and "1.5 SFT-std" in text and "target (gold +1.0 SFT-std at KL <= 8 nats): met" in text


def test_report_helpers_by_hand():
    assert smooth([1.0, 3.0, float("nan"), 5.0], 2) == [1.0, 2.0, 3.0, 5.0]
    assert gold_gain({"gold_reward_start": -0.5, "gold_reward_end": 1.0, "gold_reward_std_start": 0.5}) == 3.0
    assert gold_gain({"gold_reward_start": 0.0}) is None


def test_demo_on_a_tiny_model_runs_every_stage_and_reports(tmp_path):
    pytest.importorskip("tether.tasks.reviews")
    from tether.recipes.demo import DEMO_STAGES, DemoConfig
    from tether.recipes.demo import run as demo

    save_tiny(tmp_path / "base")
    extra = {"dpo_max_steps": 2} if "dpo" in DEMO_STAGES else {}
    cfg = load_config(DemoConfig, None, {**extra,
        "out": str(tmp_path / "demo"), "model": str(tmp_path / "base"), "progress": False, "overopt": True,
        "n_sft": 40, "n_pairs": 40, "n_rankings": 10, "sft_max_steps": 2, "rm_max_steps": 2, "ppo_max_steps": 2,
        "nokl_max_steps": 2,
        "ppo_rollout_batch": 8, "ppo_num_minibatches": 2, "ppo_batch_size": 8, "ppo_max_new_tokens": 5,
        "ppo_n_eval_prompts": 4, "ppo_eval_samples": 1, "ppo_eval_every": 0})
    summary = demo(cfg)
    for stage in cfg.stage_list():
        assert (tmp_path / "demo" / stage / "summary.json").exists(), stage
    assert "ppo_nokl" in cfg.stage_list()
    nokl = yaml.safe_load((tmp_path / "demo" / "ppo_nokl" / "config.yaml").read_text())
    assert nokl["kl_coef"] == 0.0 and nokl["reward"] == f"rm:{tmp_path / 'demo' / 'rm_small'}"  # the weak proxy
    small = yaml.safe_load((tmp_path / "demo" / "rm_small" / "config.yaml").read_text())
    assert small["data"].endswith("prefs_small.jsonl") and any(k.startswith("rm_small/") for k in summary)
    n_small = len((tmp_path / "demo" / "data" / "prefs_small.jsonl").read_text().splitlines())
    assert n_small == min(cfg.overopt_pairs, 40)
    assert summary["ppo/gold_reward_start"] == summary["ppo/gold_reward_start"]  # the task's gold is reported
    assert (tmp_path / "demo" / "report.html").exists() and (tmp_path / "demo" / "overoptimisation.png").exists()
