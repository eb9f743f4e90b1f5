"""vLLM as the rollout engine (generation/vllm.py), run where vLLM is installed (`make test-vllm`; skipped elsewhere):
a tiny random Qwen2 (head_dim 64, fp32) gives tether's greedy tokens with log-probs within 1e-5 of a training
forward's, before and after a weight push through collective_rpc; sampled tokens' log-probs are the tempered ones."""

import pytest
import torch

vllm = pytest.importorskip("vllm")

from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

from tether.distributed.sync import named_full_weights  # noqa: E402
from tether.forward import response_outputs  # noqa: E402
from tether.generation import sample  # noqa: E402
from tether.generation.vllm import VLLMEngine  # noqa: E402
from tether.testing import tiny_tokenizer  # noqa: E402


def tiny_qwen2(tok, seed: int):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id)  # head_dim 64: vLLM's CPU attention refuses 16
    return AutoModelForCausalLM.from_config(cfg).float().eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    tok = tiny_tokenizer()
    model = tiny_qwen2(tok, seed=0)
    model.save_pretrained(root / "m")
    tok.save_pretrained(root / "m")
    engine = VLLMEngine(root / "m", max_model_len=256, seed=0, memory_fraction=0.1)
    prompts = [tok.encode(t) for t in ("the film was", "what is 1 + 2 ?", "i loved this book and")]
    return tok, model, engine, prompts


def check(engine, model, tok, prompts, temperature):
    ours = sample(model, prompts, 12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  temperature=temperature, backend="eager", return_logprobs=True,
                  generator=torch.Generator().manual_seed(0))
    theirs = sample(engine, prompts, 12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    temperature=temperature, return_logprobs=True)
    recomputed = response_outputs(model, theirs.sequences, theirs.attention_mask, theirs.prompt_ids.shape[1],
                                  temperature if temperature > 0 else 1.0, padding_free=False).logprobs
    gap = ((theirs.logprobs - recomputed) * theirs.response_mask).abs().max().item()
    return ours, theirs, gap


def test_greedy_tokens_and_logprobs_equal_tethers_before_and_after_a_push(setup):
    tok, model, engine, prompts = setup
    engine.sleep()  # without sleep_mode (a CPU engine cannot have it) nothing happens
    assert not engine.asleep
    ours, theirs, gap = check(engine, model, tok, prompts, 0.0)
    assert torch.equal(ours.response_ids, theirs.response_ids)
    assert gap <= 1e-5, gap
    trained = tiny_qwen2(tok, seed=1)  # other weights, as after optimizer steps
    engine.push(named_full_weights(trained), version=1)
    assert engine.version == 1 and not engine.paused
    ours, theirs, gap = check(engine, trained, tok, prompts, 0.0)
    assert torch.equal(ours.response_ids, theirs.response_ids)  # the engine now samples the new weights
    assert gap <= 1e-5, gap


def test_sampled_logprobs_are_the_tempered_ones(setup):
    tok, model, engine, prompts = setup
    engine.push(named_full_weights(model), version=2)
    _, theirs, gap = check(engine, model, tok, prompts, 0.7)
    assert theirs.response_mask.sum() > 0 and gap <= 1e-5, gap


def test_grpo_samples_with_vllm_and_logs_the_train_vs_engine_kl(tmp_path):
    """generation_backend=vllm: the engine is built once, gets the weights after every step, and each step logs the
    KL between the trainer's recomputed log-probs and the engine's (fp32: ~0)."""
    import json

    from tether.config import load_config
    from tether.recipes import grpo as G

    tok = tiny_tokenizer()
    model = tiny_qwen2(tok, seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with open(tmp_path / "p.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"the film was {i}", "answer": i}) + "\n")
    cfg = load_config(G.GRPOConfig, None, {
        "model": str(tmp_path / "m"), "task": "none", "prompts": str(tmp_path / "p.jsonl"),
        "eval_prompts": str(tmp_path / "p.jsonl"), "reward": "python:tests.test_grpo:length_reward",
        "out": str(tmp_path / "run"), "max_steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 5,
        "batch_size": 4, "progress": False, "lr": 1e-2, "beta": 0.0, "generation_backend": "vllm"})
    G.run(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for x in lines:  # step 1 samples the weights pushed after step 0: a stale engine would show a KL
        assert 0 <= x["behaviour_kl"] < 1e-5 and x["clipped_share"] == 0.0, x


@pytest.fixture()
def qwen_dir(tmp_path):
    import json

    tok = tiny_tokenizer()
    tiny_qwen2(tok, seed=0).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with open(tmp_path / "p.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"the film was {i}"}) + "\n")
    return tmp_path


@pytest.fixture()
def pushes(monkeypatch):
    """The versions pushed into every VLLMEngine of the test, in order (the push itself runs as always)."""
    seen, real = [], VLLMEngine.push

    def push(self, named, version):
        seen.append(version)
        return real(self, named, version)

    monkeypatch.setattr(VLLMEngine, "push", push)
    return seen


def test_ppo_samples_with_vllm_gets_the_weights_after_every_step_and_logs_the_kl(qwen_dir, pushes):
    import json

    from tether.config import load_config
    from tether.recipes import ppo as P

    cfg = load_config(P.PPOConfig, None, {
        "model": str(qwen_dir / "m"), "reward": "python:tests.test_grpo:length_reward",
        "prompts": str(qwen_dir / "p.jsonl"), "out": str(qwen_dir / "run"), "progress": False, "max_steps": 3,
        "rollout_batch": 4, "num_minibatches": 1, "batch_size": 4, "max_new_tokens": 5, "n_eval_prompts": 2,
        "eval_samples": 1, "lr": 1e-2, "mixed_precision": "fp32", "generation_backend": "vllm"}, recipe="ppo")
    P.run(cfg)
    assert pushes == [0, 1, 2, 3]  # the start's weights, then after each step
    lines = [json.loads(x) for x in (qwen_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for x in lines:  # lr 1e-2 moves the policy each step: an engine without the new weights would show a KL
        assert 0 <= x["behaviour_kl"] < 1e-5, x


def test_online_dpo_samples_each_round_with_the_rounds_weights(qwen_dir, pushes):
    from tether.config import load_config
    from tether.recipes import online_dpo as O

    O.run(load_config(O.OnlineDPOConfig, None, {
        "model": str(qwen_dir / "m"), "task": "reviews", "label_source": "raters", "rounds": 2,
        "pairs_per_round": 16, "max_new_tokens": 16, "max_steps": 2, "batch_size": 4, "lr": 1e-2,
        "n_eval_prompts": 4, "out": str(qwen_dir / "run"), "progress": False, "generation_backend": "vllm"}))
    assert pushes == [0, 1]
    assert (qwen_dir / "run" / "rounds" / "round-1" / "pairs.jsonl").exists()


def test_best_of_n_samples_with_vllm_and_pushes_each_rounds_model(qwen_dir, pushes):
    from tether.config import load_config
    from tether.recipes import best_of_n as B

    summary = B.run(load_config(B.BoNConfig, None, {
        "model": str(qwen_dir / "m"), "reward": "reviews", "task": "reviews", "n": 4, "n_prompts": 4,
        "max_new_tokens": 8, "missing_eos_penalty": "none", "sft": True, "rounds": 2, "n_train_prompts": 4,
        "sft_max_steps": 1,
        "out": str(qwen_dir / "run"), "progress": False, "generation_backend": "vllm"}))
    assert pushes == [0, 1] and summary["samples"] == 4 and len(summary["winners_per_round"]) == 2


def test_a_lora_policy_reaches_the_engine_merged(qwen_dir, pushes):
    """GRPO with LoRA: the adapters start at a zero delta and move from step 0 on (lr 1e-2); a push without them
    merged would leave the engine on the base weights and the train-vs-engine KL would show it."""
    import json

    from tether.config import load_config
    from tether.recipes import grpo as G

    G.run(load_config(G.GRPOConfig, None, {
        "model": str(qwen_dir / "m"), "task": "none", "prompts": str(qwen_dir / "p.jsonl"),
        "eval_prompts": str(qwen_dir / "p.jsonl"), "reward": "python:tests.test_grpo:length_reward",
        "out": str(qwen_dir / "run"), "max_steps": 3, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 5,
        "batch_size": 4, "progress": False, "lr": 1e-2, "beta": 0.0, "lora_r": 4, "lora_alpha": 32,
        "mixed_precision": "fp32", "generation_backend": "vllm"}))
    assert pushes == [0, 1, 2, 3]
    lines = [json.loads(x) for x in (qwen_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for x in lines:
        assert 0 <= x["behaviour_kl"] < 1e-5, x
