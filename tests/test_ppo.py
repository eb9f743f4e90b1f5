"""PPO end to end on a tiny in-process model: what the recipe promises beyond the formulas.

The formulas (GAE, clipped losses, KL estimators, controllers) are checked by hand in test_advantages.py,
test_losses.py and test_kl.py; here:
- a few PPO steps: losses finite, policy AND value parameters change, the saved policy/value load, metrics logged;
- the missing-EOS penalty replaces the reward of responses without EOS, and only theirs;
- the LoRA reference (adapters disabled) equals the base model exactly, while the trained policy differs;
- an interrupted and resumed run writes the same metrics as an uninterrupted one (1e-5), β controller included;
- PPO-ptx, KL in the loss, and the uncertainty-adaptive β on a reward ensemble run and log what they should.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tether.config import ConfigError, load_config
from tether.data import write_jsonl
from tether.forward import PolicyAndValue, response_outputs
from tether.models import LoraSettings, load_causal_lm, load_reward_model, load_tokenizer, save_pretrained
from tether.recipes import ppo as P
from tether.reference import ReferencePolicy
from tether.testing import save_tiny

torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the CPU is shared with other test workers

PROMPTS = ["the film was", "i loved the", "this book is", "the plot", "the music was", "we watched the"]
TIMING = {"gen_tokens_per_second", "train_tokens_per_second", "tokens_per_second", "time_generate", "time_forward",
          "memory_mb"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    save_tiny(root / "base", seed=0)
    tok = load_tokenizer(root / "base")
    for seed in (1, 2):  # two reward models: "rm" alone, and both as an ensemble
        torch.manual_seed(seed)
        save_pretrained(load_reward_model(root / "base"), root / "ensemble" / f"member-{seed - 1}", tokenizer=tok)
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 4])
    write_jsonl(root / "demos.jsonl", [{"prompt": p, "completion": "good film ."} for p in PROMPTS])
    return root


def config(workdir, out, **kw):
    base = {"model": str(workdir / "base"), "reward": f"rm:{workdir / 'ensemble' / 'member-0'}",
            "prompts": str(workdir / "prompts.jsonl"), "out": str(out), "progress": False, "max_steps": 2,
            "rollout_batch": 8, "num_minibatches": 2, "batch_size": 2, "ppo_epochs": 2, "max_new_tokens": 6,
            "n_eval_prompts": 4, "eval_samples": 1, "lr": 3e-3,
            "mixed_precision": "fp32"}  # exact arithmetic; bf16 is test_precision.py's
    return load_config(P.PPOConfig, None, {**base, **kw}, recipe="ppo")


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_few_steps_train_policy_and_value_and_save_loadable_models(workdir, tmp_path):
    summary = P.run(config(workdir, tmp_path / "run", max_steps=3))
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("loss", "pg_loss", "vf_loss", "reward", "score", "kl", "kl_k3", "beta", "entropy", "clipfrac",
                "approx_kl", "explained_variance", "response_length", "eos_rate", "distinct_2", "repetition_rate",
                "gen_tokens_per_second", "train_tokens_per_second", "reward_raw", "grad_norm"):
        assert key in rows[-1], key
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # step 0: policy == reference
    assert rows[-1]["kl"] != 0.0

    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    value = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "value")
    base = load_file(workdir / "base" / "model.safetensors")
    rm = load_file(workdir / "ensemble" / "member-0" / "model.safetensors")
    assert not torch.equal(policy.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           base["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(value.state_dict()["score.weight"], rm["score.weight"])  # value starts from the RM
    for key in ("proxy_reward_start", "proxy_reward_end", "kl_end", "beta_end", "tokens_per_second",
                "peak_memory_mb", "wall_seconds"):
        assert key in summary, key
    assert summary["kl_start"] == pytest.approx(0.0, abs=1e-4) and summary["peak_memory_mb"] > 0
    assert (tmp_path / "run" / "samples_start.jsonl").exists() and (tmp_path / "run" / "samples_end.jsonl").exists()


def eos_heavy_policy(workdir, tmp_path):
    """The tiny model with its (tied) EOS row scaled up: EOS becomes near-certain at some positions, near-impossible
    at others, so a batch holds responses with and without EOS."""
    model = AutoModelForCausalLM.from_pretrained(workdir / "base")
    tok = load_tokenizer(workdir / "base")
    with torch.no_grad():
        model.get_output_embeddings().weight[tok.eos_token_id] *= 40.0
    save_pretrained(model, tmp_path / "eos_policy", tokenizer=tok)
    return tmp_path / "eos_policy"


def constant_reward(prompts, completions, records):
    return [5.0] * len(completions)


@pytest.mark.parametrize("penalty", [-1.0, None])
def test_missing_eos_penalty_replaces_the_score_of_responses_without_eos(workdir, tmp_path, penalty):
    policy_dir = eos_heavy_policy(workdir, tmp_path)
    cfg = config(workdir, tmp_path / "run", model=str(policy_dir), reward=f"python:{__name__}:constant_reward",
                 missing_eos_penalty=penalty, rollout_batch=24, max_new_tokens=4)
    tok = load_tokenizer(policy_dir)
    policy = load_causal_lm(policy_dir)
    value = load_reward_model(policy_dir)
    model = PolicyAndValue(policy, value)
    records = [{"prompt": p} for p in PROMPTS * 4]
    gen = torch.Generator().manual_seed(0)
    batch, stats, (_, completions) = P.rollout(cfg, model, ReferencePolicy(policy, True), P.load_reward(cfg, "cpu"),
                                               tok, records, gen, torch.device("cpu"))
    ends_with_eos = torch.tensor([bool((row[m.bool()] == tok.eos_token_id).any())
                                  for row, m in zip(batch.sequences[:, batch.prompt_len:], batch.response_mask)])
    assert 0 < int(ends_with_eos.sum()) < len(records), "the test needs responses with and without EOS"
    expected = torch.where(ends_with_eos, 5.0, 5.0 if penalty is None else penalty)
    assert torch.equal(batch.scores, expected)
    assert stats["reward"] == pytest.approx(5.0)  # the proxy itself is logged before the penalty
    assert stats["eos_rate"] == pytest.approx(float(ends_with_eos.float().mean()))


def test_lora_reference_is_the_base_model_with_adapters_off(workdir):
    policy = load_causal_lm(workdir / "base", LoraSettings(r=4, alpha=8.0))
    with torch.no_grad():  # train the adapters a little: lora_B is 0 at init
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    reference = ReferencePolicy(policy, share=True)
    assert reference.shared and reference.model.model.model is policy  # no second copy of the weights
    base = load_causal_lm(workdir / "base")
    tok = load_tokenizer(workdir / "base")
    seqs = torch.tensor([tok("the film was good film .")["input_ids"]])
    mask = torch.ones_like(seqs)
    ref = reference.logprobs(seqs, mask, prompt_len=3, temperature=0.7)
    assert torch.allclose(ref, response_outputs(base, seqs, mask, 3, temperature=0.7).logprobs, atol=1e-6)
    assert not torch.allclose(ref, response_outputs(policy, seqs, mask, 3, temperature=0.7).logprobs, atol=1e-3)
    unshared = ReferencePolicy(policy, share=False)  # the memory comparison's baseline: a frozen copy
    assert unshared.model is not policy
    assert not any(p.requires_grad for p in unshared.model.parameters())


def test_interrupted_and_resumed_run_matches_the_uninterrupted_one(workdir, tmp_path, monkeypatch):
    kw = {"max_steps": 4, "save_every": 2, "kl_controller": "adaptive", "kl_target": 0.01, "kl_horizon": 10}
    P.run(config(workdir, tmp_path / "whole", **kw))

    real_update, calls = P.ppo_update, []

    def crash_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption during step 2")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(P, "ppo_update", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        P.run(config(workdir, tmp_path / "split", **kw))
    monkeypatch.setattr(P, "ppo_update", real_update)
    assert [r["step"] for r in metrics(tmp_path / "split")] == [0, 1]
    P.run(config(workdir, tmp_path / "split", resume=True, **kw))

    whole, split = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == [0, 1, 2, 3]
    assert len({r["beta"] for r in whole}) == 4  # the adaptive β moved every step, so its state had to resume
    for a, b in zip(whole, split):
        for key in a.keys() - TIMING:
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), (a["step"], key)
    s_whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    s_split = json.loads((tmp_path / "split" / "summary.json").read_text())
    for key in ("proxy_reward_start", "proxy_reward_end", "kl_end", "beta_end"):
        assert s_whole[key] == pytest.approx(s_split[key], abs=1e-5), key


def test_ptx_term_and_kl_in_loss(workdir, tmp_path):
    P.run(config(workdir, tmp_path / "ptx", ptx_coef=0.5, ptx_data=str(workdir / "demos.jsonl"),
                 kl_in_loss=True, kl_estimator="k3"))
    row = metrics(tmp_path / "ptx")[-1]
    assert row["ptx_loss"] > 0 and torch.isfinite(torch.tensor(row["loss"]))


def test_uncertainty_controller_follows_the_ensemble_std(workdir, tmp_path):
    P.run(config(workdir, tmp_path / "unc", reward=f"rm:{workdir / 'ensemble'}", kl_controller="uncertainty",
                 kl_coef=0.1, max_steps=3, lr=3e-2))
    rows = metrics(tmp_path / "unc")
    assert all(r["reward_std"] > 0 for r in rows)
    assert rows[0]["beta"] == pytest.approx(0.1)  # σ_ref is taken from the first batch: β starts at β0
    for prev, row in zip(rows, rows[1:]):  # β logged at step s was set from the ensemble std of step s − 1
        assert row["beta"] == pytest.approx(min(1.0, 0.1 * prev["reward_std"] / rows[0]["reward_std"]), rel=1e-4)


def test_config_errors_name_the_key(workdir, tmp_path):
    with pytest.raises(ConfigError, match="k1 as a loss"):
        config(workdir, tmp_path, kl_in_loss=True)
    with pytest.raises(ConfigError, match="kl_controller"):
        config(workdir, tmp_path, kl_controller="magic")
    with pytest.raises(ConfigError, match="multiple of num_minibatches"):
        config(workdir, tmp_path, rollout_batch=7)
    with pytest.raises(ConfigError, match="prompts=FILE or task"):
        config(workdir, tmp_path, prompts="")
