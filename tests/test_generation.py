"""The sampling loop: greedy equals `model.generate` and a no-cache loop, padding changes nothing, sampling is
seeded and distributed like the model's softmax, sampling-time log-probs equal the recomputation, EOS is handled.
`generate_oracle` (transformers' `model.generate`) is the reference every backend is held to; it lives here, not in
the package, because nothing in tether samples with it."""

import math

import pytest
import torch

from tether.forward import response_outputs
from tether.generation import BACKENDS, decode_responses, sample
from tether.generation.core import filter_logits, response_mask

EOS, PAD = 1, 0


def prompts(tok):
    return [tok("the film was").input_ids, tok("i loved this book and").input_ids, tok("it").input_ids]


def greedy_no_cache(model, ids, n):
    ids = torch.tensor([ids])
    for _ in range(n):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
        if nxt.item() == EOS:
            break
    return ids[0].tolist()


def generate_oracle(model, ids: list[list[int]], n: int) -> list[list[int]]:
    """Greedy responses of `model.generate`, one prompt at a time (no padding), cut after the first EOS."""
    out = []
    for p in ids:
        seq = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)[0, len(p):]
        cut = (seq == EOS).nonzero()
        out.append(seq[: int(cut[0]) + 1 if len(cut) else n].tolist())
    return out


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_greedy_matches_generate(lm, backend):
    tok, model = lm
    ps = prompts(tok)
    out = sample(model, ps, 10, eos_token_id=EOS, pad_token_id=PAD, temperature=0, backend=backend)
    mine = [out.response_ids[row, : int(out.response_mask[row].sum())].tolist() for row in range(len(ps))]
    assert mine == generate_oracle(model, ps, 10)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_greedy_matches_no_cache_loop_and_padding_changes_nothing(lm, backend):
    tok, model = lm
    ps = prompts(tok)
    out = sample(model, ps, 10, eos_token_id=EOS, pad_token_id=PAD, temperature=0, backend=backend)
    for row, p in enumerate(ps):
        n = int(out.response_mask[row].sum())
        assert p + out.response_ids[row, :n].tolist() == greedy_no_cache(model, p, 10)[: len(p) + n]


def test_sampling_is_seeded(lm):
    tok, model = lm
    a = sample(model, prompts(tok), 8, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(3))
    b = sample(model, prompts(tok), 8, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(3))
    c = sample(model, prompts(tok), 8, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)


def test_first_token_frequencies_follow_the_softmax(lm):
    tok, model = lm
    p = tok("the film was").input_ids
    n = 4000
    out = sample(model, [p] * n, 1, eos_token_id=EOS, pad_token_id=PAD, temperature=0.8,
                 generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = (model(input_ids=torch.tensor([p])).logits[0, -1] / 0.8).softmax(-1)
    counts = torch.bincount(out.response_ids[:, 0], minlength=len(probs)).float()
    expected = probs * n
    keep = expected >= 5  # chi-square over well-populated cells, the rest pooled
    observed, exp = counts[keep], expected[keep]
    if expected[~keep].sum() > 1:
        observed = torch.cat([observed, counts[~keep].sum().view(1)])
        exp = torch.cat([exp, expected[~keep].sum().view(1)])
    chi2 = (((observed - exp) ** 2) / exp).sum().item()
    dof = len(exp) - 1
    assert chi2 < dof + 4 * math.sqrt(2 * dof), (chi2, dof)  # ~4 sigma above the mean of a chi-square


def test_sampled_logprobs_equal_recomputation(lm):
    tok, model = lm
    out = sample(model, prompts(tok), 12, eos_token_id=EOS, pad_token_id=PAD, temperature=0.7, return_logprobs=True,
                 generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        again = response_outputs(model, out.sequences, out.attention_mask, out.prompt_ids.shape[1], 0.7).logprobs
    assert torch.allclose(again * out.response_mask, out.logprobs, atol=1e-5)


def test_response_mask_stops_after_first_eos():
    response = torch.tensor([[5, 6, EOS, 7, EOS, 8], [5, 6, 7, 8, 9, 10], [EOS, 4, 4, 4, 4, 4]])
    mask, has_eos = response_mask(response, EOS)
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_rows_that_finish_are_padded(lm):
    tok, model = lm
    out = sample(model, prompts(tok) * 4, 16, eos_token_id=EOS, pad_token_id=PAD, temperature=1.5,
                 generator=torch.Generator().manual_seed(0))
    for ids, m, eos in zip(out.response_ids, out.response_mask, out.has_eos):
        n = int(m.sum())
        assert (ids[n:] == PAD).all() and (ids[: n - 1] != EOS).all()
        assert bool(eos) == (ids[n - 1].item() == EOS)


def test_filter_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # top_p 0.75: 0.5 then 0.3 reaches 0.8 >= 0.75; the rest dropped
    assert torch.isinf(filter_logits(logits, top_p=0.75)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]


def test_decode_strips_eos_and_padding(lm):
    tok, model = lm
    out = sample(model, prompts(tok), 5, eos_token_id=EOS, pad_token_id=PAD, temperature=0)
    out.response_ids[0] = torch.tensor([6, 11, EOS, PAD, PAD])
    out.response_mask[0] = torch.tensor([1, 1, 1, 0, 0])
    assert decode_responses(tok, out)[0] == "the film"


def test_a_row_ends_at_any_stop_id(lm):
    """A chat model ends a turn with its end-of-turn token, not EOS: every id of the list stops a row."""
    tok, model = lm
    ps = prompts(tok)
    free = sample(model, ps, 6, eos_token_id=EOS, pad_token_id=PAD, temperature=0)
    second = [int(free.response_ids[i, 1]) for i in range(len(ps))]  # what greedy decoding says second
    stopped = sample(model, ps, 6, eos_token_id=[EOS, *second], pad_token_id=PAD, temperature=0)
    assert stopped.has_eos.all()
    for i in range(len(ps)):
        n = int(stopped.response_mask[i].sum())
        ended = stopped.response_ids[i, :n].tolist()
        assert ended == free.response_ids[i, :n].tolist() and ended[-1] in (EOS, *second) and n <= 2


def test_stop_ids_take_the_end_of_turn_token_and_the_models_eos_list():
    from tether.generation import stop_ids
    from tether.testing import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end != tok.eos_token_id
    model = tiny_causal_lm(tok)
    assert stop_ids(tok) == [tok.eos_token_id, end]
    model.generation_config.eos_token_id = [tok.eos_token_id, 42]
    assert stop_ids(tok, model) == [tok.eos_token_id, 42, end]
    plain = tiny_tokenizer(chat_template=True)  # its template closes a turn with <eos> itself: nothing more
    assert stop_ids(plain) == [plain.eos_token_id]
