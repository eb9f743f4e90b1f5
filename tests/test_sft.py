"""SFT end to end on a tiny in-process model: the engine's promises checked through a real recipe.

- the loss falls on a memorisable set and the saved model loads with AutoModelForCausalLM;
- accumulation 1x8 == 8x1 (same loss curve), because losses are divided by global token counts;
- an interrupted and resumed run writes the same metrics as an uninterrupted one (1e-5);
- LoRA trains only adapters and saves a merged, loadable model;
- two processes (torchrun, gloo) give the loss curve of one process with twice the accumulation;
- NaN stops the run naming the step; the CLI's errors name the key / file / line.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tether.cli import main as cli_main
from tether.config import load_config
from tether.recipes.sft import SFTConfig, run
from tether.testing import save_tiny

WORDS = "good great bad awful film movie book plot".split()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    save_tiny(root / "model", seed=0)
    rng = random.Random(0)
    with open(root / "demos.jsonl", "w") as f:
        for _ in range(32):
            completion = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) + " ."
            f.write(json.dumps({"prompt": "the film was", "completion": completion}) + "\n")
    return root


def sft(workdir, out, **kw):
    base = {"model": str(workdir / "model"), "data": str(workdir / "demos.jsonl"), "out": str(out),
            "progress": False, "eval_fraction": 0.0, "lr": 3e-3, "lr_schedule": "constant",
            "mixed_precision": "fp32"}  # exact arithmetic; bf16 is test_precision.py's
    cfg = load_config(SFTConfig, None, {**base, **kw})
    return run(cfg)


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_model_loads(workdir, tmp_path):
    summary = sft(workdir, tmp_path / "run", max_steps=12, batch_size=8, lr=1e-2)
    curve = losses(tmp_path / "run")
    assert curve[-1] < curve[0] - 1.0, curve
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model/config.json", "tensorboard"):
        assert (tmp_path / "run" / name).exists(), name
    assert summary["steps"] == 12 and summary["tokens_per_second"] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert model.config.model_type == "llama"


def test_accumulation_1x8_equals_8x1(workdir, tmp_path):
    sft(workdir, tmp_path / "big", max_steps=3, batch_size=8, grad_accum=1)
    sft(workdir, tmp_path / "acc", max_steps=3, batch_size=1, grad_accum=8)
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), abs=1e-5)


def test_resume_is_exact(workdir, tmp_path):
    sft(workdir, tmp_path / "full", max_steps=6, batch_size=4, save_every=2, lr_schedule="linear")
    sft(workdir, tmp_path / "cut", max_steps=6, batch_size=4, save_every=2, lr_schedule="linear")
    # pretend the second run died after step 4: drop later checkpoints and metrics, then resume
    ckpts = sorted((tmp_path / "cut" / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-0000004", "step-0000006"]
    import shutil

    shutil.rmtree(ckpts[-1])
    sft(workdir, tmp_path / "cut", max_steps=6, batch_size=4, save_every=2, lr_schedule="linear", resume=True)
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-5)
    assert len(losses(tmp_path / "cut")) == 6


def test_lora_trains_adapters_and_saves_merged_model(workdir, tmp_path):
    sft(workdir, tmp_path / "lora", max_steps=3, batch_size=8, lora_r=4, lr=1e-2)
    before = AutoModelForCausalLM.from_pretrained(workdir / "model")
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "model")
    assert not any("lora" in k for k in after.state_dict())  # merged: a plain model other tools load
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed and all("proj" in k for k in changed), changed  # only LoRA-targeted linears moved


def test_nan_stops_with_step(workdir, tmp_path):
    from tether.engine import NonFiniteError

    # an absurd learning rate blows the weights up, so a later step's loss is inf/NaN
    with pytest.raises(NonFiniteError, match=r"at step \d+") as err:
        sft(workdir, tmp_path / "nan", max_steps=5, batch_size=4, lr=1e30, max_grad_norm=0.0)
    bad_step = int(str(err.value).split("at step ")[1].split(";")[0])
    logged = losses(tmp_path / "nan")
    assert len(logged) == bad_step and all(v == v for v in logged)  # every step before it logged, all finite
    assert (tmp_path / "nan" / "model-last-good" / "config.json").exists()


def test_cli_errors_name_key_and_line(workdir, tmp_path, capsys):
    assert cli_main(["sft", f"model={workdir / 'model'}", "data=x.jsonl", "lrr=1"]) == 2
    assert "unknown key 'lrr' for sft (did you mean 'lr'?)" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    code = cli_main(["sft", f"model={workdir / 'model'}", f"data={bad}", f"out={tmp_path / 'r'}", "progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2" in err and "completion" in err
    assert cli_main(["sft", "--help"]) == 0 and "max_prompt_len" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_equal_one_with_double_accumulation(workdir, tmp_path):
    common = [f"model={workdir / 'model'}", f"data={workdir / 'demos.jsonl'}", "max_steps=3", "batch_size=4",
              "progress=false", "eval_fraction=0", "lr=3e-3", "lr_schedule=constant", "mixed_precision=fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "tether.cli", "sft", *common, f"out={tmp_path / 'ddp'}"], check=True, env=env, timeout=600)
    sft(workdir, tmp_path / "one", max_steps=3, batch_size=4, grad_accum=2)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
