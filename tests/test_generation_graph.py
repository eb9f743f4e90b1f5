"""The fast decode path ("graph" backend) on a CPU: the step that a GPU captures in a CUDA graph, run uncaptured.

Greedy tokens equal "eager" and `model.generate` (padding, EOS and early stop included), samples follow the model's
tempered softmax at the first token and at a decode step, sampling-time log-probs equal the recomputation, the
exponential race draws like multinomial, and the vllm backend says what it needs when vLLM is absent."""

import importlib.util
import math

import pytest
import torch

from tests.test_generation import EOS, PAD, prompts  # the `lm` fixture is in conftest.py
from tether import generation_graph as G
from tether.generation import sample, sequence_logprobs


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[bool, float, int]:
    """Pearson chi-square of counts against probs over cells expecting >= 5 (the rest pooled), ~4 sigma bound."""
    n = counts.sum()
    expected = probs * n
    keep = expected >= 5
    observed, exp = counts[keep], expected[keep]
    if expected[~keep].sum() > 1:
        observed = torch.cat([observed, counts[~keep].sum().view(1)])
        exp = torch.cat([exp, expected[~keep].sum().view(1)])
    chi2 = (((observed - exp) ** 2) / exp).sum().item()
    dof = len(exp) - 1
    return chi2 < dof + 4 * math.sqrt(2 * dof), chi2, dof


def test_greedy_graph_equals_eager_and_generate_with_padding_and_eos(lm):
    tok, model = lm
    ps = prompts(tok) * 3  # 9 rows of 3 lengths: left padding differs per row
    runs = {b: sample(model, ps, 20, eos_token_id=EOS, pad_token_id=PAD, temperature=0, backend=b, return_logprobs=True)
            for b in ("graph", "eager", "hf")}
    graph = runs["graph"]
    for other in ("eager", "hf"):
        ref = runs[other]
        assert torch.equal(graph.response_mask.sum(1), ref.response_mask.sum(1))
        width = int(ref.response_mask.sum(1).max())
        assert torch.equal(graph.response_ids[:, :width], ref.response_ids[:, :width])
        assert torch.allclose(graph.logprobs[:, :width], ref.logprobs[:, :width], atol=1e-5)


def test_stops_early_once_every_row_has_finished(lm):
    tok, model = lm
    # EOS = the first greedy token of every row: all rows finish at column 0 and the loop stops at its first check
    first = sample(model, prompts(tok), 1, eos_token_id=EOS, pad_token_id=PAD, temperature=0).response_ids[:, 0]
    eos = int(first[0])
    rows = [p for p, t in zip(prompts(tok), first.tolist()) if t == eos]
    out = sample(model, rows, 50, eos_token_id=eos, pad_token_id=PAD, temperature=0, backend="graph")
    assert out.response_ids.shape[1] == 1 and out.response_mask.sum().item() == len(rows) and out.has_eos.all()


def test_decode_runs_all_steps_and_writes_every_column(lm):
    tok, model = lm
    ids = torch.tensor([tok("the film was").input_ids] * 2)
    mask = torch.ones_like(ids)
    cache, logits = G.prefill(model, ids, mask, 6)
    first, lp = G.draw(logits, 0.0, 0, 1.0, None)
    step, buffers = G.build_step(model, cache, mask, first, lp, 6, eos_token_id=10_000, pad_token_id=PAD,
                                 temperature=0.0, top_k=0, top_p=1.0, generator=None)
    response, logprobs = G.decode(step, buffers, 6, use_graph=False)
    assert response.shape == (2, 6) and int(buffers["slot"]) == ids.shape[1] + 5  # five steps, one slot each
    assert (logprobs < 0).all()  # every column written (the buffer starts at 0)
    assert (buffers["attn"][:, 0, 0, : ids.shape[1] + 5] == 0).all()  # prompt + fed tokens visible
    assert (buffers["attn"][:, 0, 0, ids.shape[1] + 5 :] < -1e30).all()  # the last token is never fed


def test_exponential_race_draws_like_multinomial():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log().expand(20_000, -1)
    tokens, logprobs = G.draw(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(0))
    ok, chi2, dof = chi_square_ok(torch.bincount(tokens, minlength=5).float(), probs)
    assert ok, (chi2, dof)
    assert torch.allclose(logprobs, probs.log()[tokens], atol=1e-6)
    # top-k 2 leaves tokens 0 and 1 only, in ratio 2:1
    tokens, _ = G.draw(logits, 1.0, 2, 1.0, torch.Generator().manual_seed(1))
    assert set(tokens.tolist()) == {0, 1} and abs((tokens == 0).float().mean().item() - 2 / 3) < 0.02


def test_first_and_decode_step_tokens_follow_the_tempered_softmax(lm):
    tok, model = lm
    p = tok("the film was").input_ids
    n, temp = 4000, 0.8
    out = sample(model, [p] * n, 2, eos_token_id=EOS, pad_token_id=PAD, temperature=temp, backend="graph",
                 generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = (model(input_ids=torch.tensor([p])).logits[0, -1] / temp).softmax(-1)  # (V,)
        vocab = len(first)
        after = torch.tensor([p + [k] for k in range(vocab)])
        second = (model(input_ids=after).logits[:, -1] / temp).softmax(-1)  # (V, V): [k] = p(. | p, k)
    live = out.response_ids[:, 0] != EOS
    ok, chi2, dof = chi_square_ok(torch.bincount(out.response_ids[:, 0], minlength=vocab).float(), first)
    assert ok, ("first", chi2, dof)
    # marginal of the second token over rows whose first token was not EOS: sum_k p(k) p(. | k), k != EOS
    weight = first.clone()
    weight[EOS] = 0
    marginal = weight @ second / weight.sum()
    counts = torch.bincount(out.response_ids[live, 1], minlength=vocab).float()
    ok, chi2, dof = chi_square_ok(counts, marginal)
    assert ok, ("second", chi2, dof)


def test_sampled_logprobs_equal_recomputation(lm):
    tok, model = lm
    out = sample(model, prompts(tok), 12, eos_token_id=EOS, pad_token_id=PAD, temperature=0.7, return_logprobs=True,
                 backend="graph", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        again = sequence_logprobs(model, out.sequences, out.attention_mask, out.prompt_ids.shape[1], 0.7)
    assert torch.allclose(again * out.response_mask, out.logprobs, atol=1e-5)


def test_graph_sampling_is_seeded(lm):
    tok, model = lm

    def run(seed):
        return sample(model, prompts(tok), 8, eos_token_id=EOS, pad_token_id=PAD, backend="graph",
                      generator=torch.Generator().manual_seed(seed)).response_ids

    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


def test_auto_is_lean_for_llama_and_unknown_backend_is_refused(lm):
    from tether.generation import _auto_backend

    tok, model = lm
    assert _auto_backend(model, torch.device("cpu"), 16) == "lean"
    with pytest.raises(ValueError, match="unknown generation backend 'fast'"):
        sample(model, prompts(tok), 2, eos_token_id=EOS, pad_token_id=PAD, backend="fast")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM installed: the message is for its absence")
def test_vllm_backend_says_what_it_needs(lm):
    tok, model = lm
    with pytest.raises(ImportError, match=r"needs vLLM \(pip install vllm\)"):
        sample(model, prompts(tok), 2, eos_token_id=EOS, pad_token_id=PAD, backend="vllm")
