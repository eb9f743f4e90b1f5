"""The lean decoder (generation/lean.py) gives the tokens and log-probs of the "eager" backend, on Llama and Qwen2
shapes (biases, grouped KV heads), with LoRA adapters, and says no to models it does not cover."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

from tether.generation import auto_backend, sample
from tether.generation.lean import supported
from tether.models import LoraSettings, apply_lora
from tether.testing import tiny_causal_lm, tiny_tokenizer

EOS, PAD = 1, 0


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def tiny_qwen2(tok, seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=PAD, eos_token_id=EOS)
    return AutoModelForCausalLM.from_config(config).eval()


def prompt_ids(tok):  # different lengths: the batch is left-padded
    return [tok("the film was").input_ids, tok("i loved this book and the").input_ids, tok("it").input_ids]


def both(model, tok, temperature, seed=0, n=12):
    out = {}
    for backend in ("eager", "lean"):
        out[backend] = sample(model, prompt_ids(tok), n, eos_token_id=EOS, pad_token_id=PAD, temperature=temperature,
                              return_logprobs=True, backend=backend, generator=torch.Generator().manual_seed(seed))
    return out["eager"], out["lean"]


@pytest.mark.parametrize("shape", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_lean_gives_the_eager_tokens_and_logprobs(tok, shape, temperature):
    model = tiny_causal_lm(tok, seed=4, hidden=64).eval() if shape == "llama" else tiny_qwen2(tok, seed=4)
    assert supported(model, 64)
    for seed in range(3):
        eager, lean = both(model, tok, temperature, seed)
        assert torch.equal(eager.response_ids, lean.response_ids)
        assert torch.equal(eager.response_mask, lean.response_mask)
        torch.testing.assert_close(lean.logprobs, eager.logprobs, atol=1e-5, rtol=1e-5)


def test_lean_sees_lora_adapters(tok):
    model = tiny_causal_lm(tok, seed=5, hidden=64)
    model = apply_lora(model, LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # move the adapters off zero, so the adapted model differs from its base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    assert supported(model, 64)
    eager, lean = both(model, tok, 1.0)
    assert torch.equal(eager.response_ids, lean.response_ids)
    torch.testing.assert_close(lean.logprobs, eager.logprobs, atol=1e-5, rtol=1e-5)


def test_models_it_does_not_cover_decode_eager(tok):
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    assert not supported(gpt2, 16)
    windowed = tiny_qwen2(tok)
    for layer in windowed.model.layers:
        layer.self_attn.sliding_window = 8
    assert supported(windowed, 8) and not supported(windowed, 9)
    assert auto_backend(gpt2, 16) == "eager"
    assert auto_backend(windowed, 9) == "eager"
    out = sample(gpt2.eval(), prompt_ids(tok), 4, eos_token_id=EOS, pad_token_id=PAD, temperature=0)
    assert out.response_ids.shape == (3, 4)
