"""Log-probs through the LM head in chunks (lm_head.py): the plain path's numbers and gradients, no (N, T, V) kept."""

import math

import pytest
import torch

from tether import forward as FW
from tether import lm_head as H
from tether.losses import entropy_from_logits, logprobs_from_logits
from tether.testing import tiny_causal_lm, tiny_tokenizer


def test_one_position_by_hand():
    # h = [1], W = [[2], [0], [-1]], b = 0: z = [2, 0, -1]; lse = log(e² + 1 + e⁻¹) = 2.1698
    # lp(token 0) = 2 − 2.1698 = −0.1698; p = [0.8438, 0.1142, 0.0420]
    # H = lse − Σ p z = 2.1698 − (1.6876 + 0 − 0.0420) = 0.5242
    head = torch.nn.Linear(1, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0], [0.0], [-1.0]]))
    lp, ent = H.head_logprobs(torch.tensor([[1.0]]), head, torch.tensor([0]), entropy=True)
    lse = math.log(math.e ** 2 + 1 + math.e ** -1)
    p = [math.exp(z - lse) for z in (2.0, 0.0, -1.0)]
    assert lp.item() == pytest.approx(2.0 - lse, abs=1e-6)
    assert ent.item() == pytest.approx(lse - (2 * p[0] - p[2]), abs=1e-6)
    assert ent.item() == pytest.approx(0.5242, abs=1e-4)
    # ∂lp/∂z = onehot − p = [0.1562, −0.1142, −0.0420]; ∂lp/∂h = Σ_v (∂lp/∂z_v) W_v = 2·0.1562 + 0.0420 = 0.3544
    h = torch.tensor([[1.0]], requires_grad=True)
    H.head_logprobs(h, head, torch.tensor([0]))[0].sum().backward()
    assert h.grad.item() == pytest.approx(2 * (1 - p[0]) + p[2], abs=1e-6)
    assert head.weight.grad[:, 0].tolist() == pytest.approx([1 - p[0], -p[1], -p[2]], abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_chunks_equal_the_plain_path_with_gradients(monkeypatch, temperature, bias):
    monkeypatch.setattr(H, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows a chunk, the last chunk short (13 rows)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=bias)
    hidden = torch.randn(13, 8, requires_grad=True)
    tokens = torch.randint(0, 50, (13,))
    w_lp, w_ent = torch.randn(13), torch.randn(13)  # arbitrary downstream weights (a loss of both outputs)

    def grads(lp, ent):
        (lp * w_lp + ent * w_ent).sum().backward()
        out = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
        hidden.grad = None
        head.zero_grad(set_to_none=True)
        return out

    lp, ent = H.head_logprobs(hidden, head, tokens, temperature, entropy=True, entropy_grad=True)
    got = lp.detach(), ent.detach(), grads(lp, ent)
    logits = head(hidden)[None]
    lp, ent = logprobs_from_logits(logits, tokens[None], temperature)[0], entropy_from_logits(logits, temperature)[0]
    want = lp.detach(), ent.detach(), grads(lp, ent)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_entropy_without_entropy_grad_is_detached():
    head = torch.nn.Linear(4, 6)
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    lp, ent = H.head_logprobs(hidden, head, torch.zeros(2, 3, dtype=torch.long), entropy=True)
    assert lp.shape == ent.shape == (2, 3) and lp.requires_grad and not ent.requires_grad


@pytest.fixture(scope="module")
def tiny():
    return tiny_causal_lm(tiny_tokenizer(), seed=3, hidden=32).train()


def _plain(monkeypatch):
    monkeypatch.setattr(FW, "linear_head", lambda model: None)


@pytest.mark.parametrize("padding_free", [False, True])
def test_token_outputs_equal_the_full_logits_path(tiny, monkeypatch, padding_free):
    """Padded and packed (shared prompts: the first response token's jump) layouts, log-probs, entropy, gradients."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (4, 9), generator=g)
    ids[1] = ids[0]  # two rows with the same prompt of 4 tokens
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    mask[3, :2] = 0
    prefix = torch.tensor([4, 4, 3, 3])
    weight = torch.randn(4, 8, generator=g)
    assert H.linear_head(tiny) is tiny.lm_head

    def run():
        tiny.zero_grad(set_to_none=True)
        out = FW.token_outputs(tiny, ids, mask, 0.8, prefix_lengths=prefix, entropy=True, entropy_grad=True,
                               padding_free=padding_free)
        real = (mask[:, 1:] * mask[:, :-1]).float()
        ((out.logprobs + 0.1 * out.entropy) * real * weight).sum().backward()
        return out.logprobs * real, out.entropy * real, [p.grad.clone() for p in tiny.parameters()]

    chunked = run()
    _plain(monkeypatch)
    plain = run()
    torch.testing.assert_close(chunked[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked[1], plain[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(chunked[2], plain[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_completion_nll_of_packed_examples_equals_the_full_logits_path(tiny, monkeypatch):
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]]),
             "labels": ids.masked_fill(torch.tensor([[1, 0, 0, 1, 0, 0, 0]] * 2).bool(), -100)}
    with torch.no_grad():
        chunked = FW.completion_nll(tiny, batch, 9.0)
        _plain(monkeypatch)
        plain = FW.completion_nll(tiny, batch, 9.0)
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-6)


def test_the_backward_keeps_no_vocabulary_sized_tensor(monkeypatch):
    """All autograd saves for the backward is far smaller than (N, T, V) (the plain path saves the logits)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    model = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=4096, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2,
                                                         num_key_value_heads=1))
    ids = torch.randint(3, 4096, (4, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    full = ids.numel() * 4096

    weights = {p.data_ptr() for p in model.parameters()}

    def saved():  # activation elements autograd keeps, each tensor once (the weights, saved too, are no batch cost)
        sizes = {}

        def keep(t):
            if t.data_ptr() not in weights:
                sizes[t.data_ptr()] = t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            FW.token_outputs(model, ids, mask, padding_free=False).logprobs.sum()
        return sum(sizes.values())

    assert saved() < full // 10  # hidden-state sized tensors only
    _plain(monkeypatch)
    assert saved() >= full  # the check would see the logits


def test_heads_that_are_not_a_plain_projection_take_the_plain_path(tiny):
    from transformers import AutoModelForCausalLM, Gemma2Config

    gemma = AutoModelForCausalLM.from_config(Gemma2Config(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                          num_hidden_layers=1, num_attention_heads=2,
                                                          num_key_value_heads=1, head_dim=8))
    assert H.linear_head(gemma) is None  # final_logit_softcapping: the head's output is not the logits
    with H.hidden_states_out(tiny.lm_head):
        assert tiny.lm_head(torch.ones(1, 32)).shape == (1, 32)
    assert tiny.lm_head(torch.ones(1, 32)).shape == (1, tiny.config.vocab_size)  # restored


def test_lora_policy_and_its_adapters_off_reference_take_the_chunked_head(monkeypatch):
    """Under peft (all-linear LoRA leaves the output layer alone) the chunked head serves the policy and the
    reference with adapters off, and gives the plain path's log-probs for both."""
    from peft import LoraConfig, get_peft_model

    from tether.wrappers import AdaptersOff

    model = get_peft_model(tiny_causal_lm(tiny_tokenizer(), seed=4), LoraConfig(r=4, target_modules="all-linear",
                                                                                init_lora_weights=False))
    assert H.linear_head(model) is model.get_base_model().lm_head
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        chunked = [FW.token_outputs(m, ids, mask).logprobs for m in (model, AdaptersOff(model))]
        _plain(monkeypatch)
        plain = [FW.token_outputs(m, ids, mask).logprobs for m in (model, AdaptersOff(model))]
    assert not torch.allclose(plain[0], plain[1])  # the adapters change the policy: two different models
    for a, b in zip(chunked, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
