"""FSDP2 sharded training (`train_shard=fsdp2`, distributed/fsdp.py) through a real recipe, 2 gloo processes.

- 2 processes with FSDP2 give the loss curve of 1 process with 2 accumulation steps (1e-5), and the consolidated
  model directory equals the one process's model;
- a sharded checkpoint (one .distcp per rank) resumes exactly: the interrupted run's curve equals the uninterrupted;
- the decoder layers are the units, the mixed-precision policy casts as asked, LoRA is refused by name.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tether.config import ConfigError, load_config
from tether.distributed import fsdp
from tether.recipes.sft import SFTConfig, run
from tether.testing import save_tiny, tiny_causal_lm, tiny_tokenizer

WORDS = "good great bad awful film movie book plot".split()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    save_tiny(root / "model", seed=0)
    rng = random.Random(0)
    with open(root / "demos.jsonl", "w") as f:
        for _ in range(32):
            completion = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) + " ."
            f.write(json.dumps({"prompt": "the film was", "completion": completion}) + "\n")
    return root


def common(workdir, **kw) -> dict:
    return {"model": str(workdir / "model"), "data": str(workdir / "demos.jsonl"), "batch_size": 4,
            "progress": False, "eval_fraction": 0, "lr": 3e-3, "mixed_precision": "fp32", **kw}  # equal to 1e-5


def torchrun_sft(keys: dict) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items()]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "tether.cli", "sft", "train_shard=fsdp2", *args], check=True, env=env, timeout=300, capture_output=True)


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # two torchrun launches: ~30 s of imports on 2 shared cores
def test_two_fsdp2_processes_equal_one_with_double_accumulation(workdir, tmp_path):
    torchrun_sft(common(workdir, max_steps=3, lr_schedule="constant", out=tmp_path / "fsdp"))
    run(load_config(SFTConfig, None, common(workdir, max_steps=3, lr_schedule="constant", grad_accum=2,
                                            out=str(tmp_path / "one"))))
    assert len(losses(tmp_path / "fsdp")) == 3
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model")  # consolidated: a plain HF dir
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model")
    assert json.loads((tmp_path / "fsdp" / "model" / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"]
    start = AutoModelForCausalLM.from_pretrained(workdir / "model").state_dict()
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[name], value, atol=1e-5, rtol=0)
        assert name.startswith("lm_head") or not torch.equal(value, start[name]) or "norm" in name  # it trained


@pytest.mark.slow  # three torchrun launches
def test_sharded_checkpoint_resumes_exactly(workdir, tmp_path):
    keys = common(workdir, max_steps=4, save_every=2, lr_schedule="linear")
    torchrun_sft({**keys, "out": tmp_path / "full"})
    torchrun_sft({**keys, "out": tmp_path / "cut"})
    ckpts = sorted((tmp_path / "cut" / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-0000002", "step-0000004"]
    assert sorted(p.name for p in (ckpts[0] / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    shutil.rmtree(ckpts[-1])  # the run died after step 2: resume from the sharded checkpoint
    torchrun_sft({**keys, "out": tmp_path / "cut", "resume": True})
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-5)
    assert len(losses(tmp_path / "cut")) == 4


def test_units_are_the_decoder_layers_and_precision_policy():
    model = tiny_causal_lm(tiny_tokenizer(), layers=3)
    assert [type(m).__name__ for m in fsdp.decoder_layers(model)] == ["LlamaDecoderLayer"] * 3
    bf16 = fsdp.mixed_precision_policy("bf16")
    assert bf16.param_dtype == torch.bfloat16 and bf16.reduce_dtype == torch.float32
    assert fsdp.mixed_precision_policy("no").param_dtype is None
    with pytest.raises(ValueError, match="names no decoder layer"):
        fsdp.shard(torch.nn.Linear(2, 2))


def test_lora_with_fsdp2_is_refused_by_key(workdir):
    with pytest.raises(ConfigError, match="key 'train_shard'.*lora_r=0"):
        load_config(SFTConfig, None, common(workdir, train_shard="fsdp2", lora_r=4))


@pytest.mark.slow  # two torchrun launches
def test_grpo_under_fsdp2_gives_the_ddp_numbers(tmp_path):
    """GRPO samples with the gathered weights (engine.full_weights) and trains sharded: the same scores, gradient
    norms and KL as DDP on 2 processes (the ranks sample different prompts and stop after different lengths)."""
    save_tiny(tmp_path / "m")
    with open(tmp_path / "p.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"the film was {i}", "answer": i}) + "\n")
    keys = [f"model={tmp_path / 'm'}", "task=none", f"prompts={tmp_path / 'p.jsonl'}",
            f"eval_prompts={tmp_path / 'p.jsonl'}", "reward=python:tests.test_grpo:length_reward", "max_steps=3",
            "prompts_per_step=2", "group_size=4", "max_new_tokens=5", "batch_size=4", "progress=false", "lr=1e-2",
            "beta=0.04", "mixed_precision=fp32"]  # FSDP2's bf16 policy and DDP's autocast round differently
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for shard in ("fsdp2", "ddp"):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "tether.cli", "grpo", *keys, f"train_shard={shard}", f"out={tmp_path / shard}"], check=True, env=env,
                       timeout=400, capture_output=True)
    rows = {s: [json.loads(x) for x in (tmp_path / s / "metrics.jsonl").read_text().splitlines()]
            for s in ("fsdp2", "ddp")}
    assert len(rows["fsdp2"]) == 3
    for a, b in zip(rows["fsdp2"], rows["ddp"]):
        for key in ("score", "grad_norm", "kl", "clipfrac"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key

