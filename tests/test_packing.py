"""Layouts (packing.py) run by forward.py: the packed forward gives the padded forward's numbers."""

import pytest
import torch

from tether import packing as P
from tether.data import pad_sequences
from tether.forward import PolicyAndValue, forward_inputs, reward_scores, token_outputs
from tether.models import load_reward_model
from tether.testing import save_tiny, tiny_causal_lm, tiny_tokenizer


def test_first_fit_decreasing_places_longest_first():
    # width 10: 7 opens row 0 (offset 0), 6 opens row 1, 3 fits after the 7, 4 after the 6, 2 needs row 2
    assert P.first_fit_decreasing([3, 7, 2, 6, 4], 10) == [(0, 7), (0, 0), (2, 0), (1, 0), (1, 6)]


def right_padded(lengths, width=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    rows = [torch.randint(3, 60, (n,), generator=g).tolist() for n in lengths]
    ids = pad_sequences(rows, 0)
    ids = torch.cat([ids, torch.zeros(len(rows), width - ids.shape[1], dtype=torch.long)], 1)
    mask = pad_sequences([[1] * n for n in lengths], 0)
    mask = torch.cat([mask, torch.zeros(len(rows), width - mask.shape[1], dtype=torch.long)], 1)
    return ids, mask


def test_plan_packs_rows_and_restarts_positions():
    ids, mask = right_padded([6, 2, 3, 5])  # width 6: [6], [5], [3, 2] -> 3 rows
    # κ = 6: the cost rows·(W + W²/κ) is 3·(6 + 6) = 36 at W = 6, against 4·12 = 48 padded, 2·(9 + 13.5) = 45 for
    # two rows of 9 and 17 + 48 = 65 for one row of 17
    p = P.plan(mask, kappa=6.0)
    assert (p.rows, p.width) == (3, 6)
    assert (P.plan(mask).rows, P.plan(mask).width) == (1, 17)  # κ = inf: attention is free, one row of 16 (+4%)
    packed = P.pack(ids, p)
    assert sorted(packed[packed != 0].tolist()) == sorted(ids[mask.bool()].tolist())
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 1, 0]]
    assert torch.equal(P.unpack(packed[..., None].float(), p)[..., 0], (ids * mask).float())


def test_plan_is_none_when_nothing_is_saved_or_rows_have_holes():
    assert P.plan(torch.ones(4, 5, dtype=torch.long)) is None  # fixed lengths: the padded forward runs
    two = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert P.plan(two, kappa=2.0) is None  # one row of 5: 5 + 25/2 = 17.5 > 0.95 · 2 · (3 + 9/2) = 14.25
    assert P.plan(two).width == 5  # κ = inf: the row of 5 costs 5 < 0.95 · 6
    assert P.plan(torch.tensor([[1, 0, 1], [1, 0, 0], [1, 0, 0]])) is None  # a hole: not a padded batch


def test_left_and_right_padding_together():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]])
    p = P.plan(mask)
    assert p.rows == 2  # [6], [3, 2, 1]
    ids = torch.arange(1, 25).view(4, 6) * mask
    assert torch.equal(P.unpack(P.pack(ids, p), p), ids)


@pytest.fixture(params=["flat", "rows"])
def layout(request, monkeypatch):
    """Run each forward-equality test both ways: one flat row with span attention (its per-call cost set to 0, so
    that the plan takes it even on these small batches), and packed rows with masks."""
    if request.param == "rows":
        monkeypatch.setattr(P, "flat_attention_ok", lambda model: False)
    else:
        monkeypatch.setattr(P, "RUN_COST", 0.0)
    return request.param


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_causal_lm(tok, seed=3, hidden=32).train()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logprobs_and_gradients_equal_the_padded_forward(tiny, attn, layout):
    tiny.config._attn_implementation = attn
    ids, mask = right_padded([9, 3, 4, 8, 2, 5], seed=1)
    # left padding too: shift row 1 right by 2 (its prompt would be left-padded in a rollout)
    ids[1] = torch.roll(ids[1], 2)
    mask[1] = torch.roll(mask[1], 2)
    real = (mask[:, 1:] * mask[:, :-1]).float()  # predicted tokens with a real token before them

    def run(padding_free):
        tiny.zero_grad()
        lp = token_outputs(tiny, ids, mask, padding_free=padding_free).logprobs
        (lp * real).sum().backward()
        return lp * real, [q.grad.clone() for q in tiny.parameters()]

    assert P.plan(mask).rows < len(ids)
    assert (P.plan_for(tiny, ids, mask).spans is not None) == (layout == "flat")
    lp_packed, g_packed = run(True)
    lp_padded, g_padded = run(False)
    tiny.config._attn_implementation = "sdpa"
    torch.testing.assert_close(lp_packed, lp_padded, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_packed, g_padded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packed_reward_scores_equal_the_padded_forward(tmp_path, layout):
    path = save_tiny(tmp_path / "rm", seed=2)
    model = load_reward_model(path).eval()
    ids, mask = right_padded([7, 2, 3, 6, 4, 1], seed=4)
    assert (P.plan_for(model, ids, mask).spans is not None) == (layout == "flat")
    with torch.no_grad():
        packed = reward_scores(model, ids, mask, padding_free=True)
        padded = reward_scores(model, ids, mask, padding_free=False)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_policy_and_value_outputs_equal_the_padded_forward(tmp_path, layout):
    """PPO's container (policy logits + value-head values) packed vs padded, on a rollout-shaped batch: left-padded
    prompts, right-padded responses; equal at every real position, gradients included."""
    tok = tiny_tokenizer()
    policy = tiny_causal_lm(tok, seed=6, hidden=32)
    value = load_reward_model(save_tiny(tmp_path / "v", seed=7))
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1]])
    response_mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0],
                                  [1, 1, 1, 0, 0, 0]])
    mask = torch.cat([prompt_mask, response_mask], 1)
    ids = torch.randint(3, 60, mask.shape, generator=torch.Generator().manual_seed(0)) * mask
    real = mask.bool()
    assert P.plan(mask).rows < len(ids)

    both = real[:, :-1] & real[:, 1:]  # columns whose token and predicted token are real

    def run(padding_free):
        model = PolicyAndValue(policy, value)
        model.zero_grad()
        out = token_outputs(model, ids, mask, entropy=True, entropy_grad=True, padding_free=padding_free)
        (out.logprobs[both].sum() + out.entropy[both].sum() + out.values[real[:, :-1]].sum()).backward()
        return out.logprobs[both], out.values[real[:, :-1]], [q.grad.clone() for q in model.parameters()
                                                              if q.grad is not None]

    packed, padded = run(True), run(False)
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1], padded[1], atol=1e-5, rtol=1e-5)
    assert len(packed[2]) == len(padded[2])
    for a, b in zip(packed[2], padded[2]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# --- rows that share a prompt -----------------------------------------------------------------------------------------
def test_shared_prompt_layout_and_tree_mask():
    # rows: prompt [5 6] + [7] and prompt [5 6] + [8 9]: one segment [5 6 7 8 9], positions 0 1 2 2 3
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    p = P.plan(mask, ids=ids, prefix_lengths=torch.tensor([2, 2]))
    assert (p.rows, p.width) == (1, 5)
    assert P.pack(ids, p).tolist() == [[5, 6, 7, 8, 9]]
    assert p.position_ids.tolist() == [[0, 1, 2, 2, 3]]
    assert p.visible[0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                              [1, 1, 0, 0, 0],
                                              [1, 1, 1, 0, 0],   # 7 sees the prompt and itself
                                              [1, 1, 0, 1, 0],   # 8 sees the prompt, not 7
                                              [1, 1, 0, 1, 1]]
    assert p.jump_cols.tolist() == [3] and p.jump_parents.tolist() == [1]  # 8 is predicted from 6, not from 7
    assert torch.equal(P.unpack(P.pack(ids, p), p), ids * mask)  # the prompt goes back to both rows
    different = torch.tensor([[5, 6, 7, 0], [5, 4, 8, 9]])  # other prompt tokens: nothing shared
    assert P.plan(mask, ids=different, prefix_lengths=torch.tensor([2, 2])) is None  # 3 + 4 in a row of 8: no gain


def assert_logprobs_and_gradients_match_padded(model, ids, mask, real, prefix=None):
    """`token_logprobs` with `padding_free` (whatever the plan picks) against the padded forward: log-probs at the
    `real` (N, T-1) positions and every parameter's gradient of their sum."""
    def run(padding_free):
        model.zero_grad()
        lp = token_outputs(model, ids, mask, padding_free=padding_free, prefix_lengths=prefix).logprobs
        (lp * real).sum().backward()
        return lp * real, [q.grad.clone() for q in model.parameters()]

    packed, padded = run(True), run(False)
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(packed[1], padded[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def pair_batch(seed=0):
    """collate_pairs-shaped rows: B chosen then B rejected, each prompt + completion, right-padded."""
    from tether.data import PairExample, collate_pairs

    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, 60, (n,), generator=g).tolist()  # noqa: E731
    pairs = [PairExample(rand(p), rand(c), rand(r)) for p, c, r in [(3, 5, 2), (6, 1, 4), (2, 7, 7), (4, 3, 1)]]
    return collate_pairs(pairs, 0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompts_give_the_padded_logprobs_and_gradients(tiny, attn, layout):
    from tether.data import prompt_lengths

    tiny.config._attn_implementation = attn
    batch = pair_batch()
    ids, mask, prefix = batch["input_ids"], batch["attention_mask"], prompt_lengths(batch)
    p = P.plan(mask, P.attention_ratio(tiny.config), ids=ids, prefix_lengths=prefix)
    assert p is not None and p.visible is not None and len(p.jump_cols) == 4
    assert (P.plan_for(tiny, ids, mask, prefix).spans is not None) == (layout == "flat")
    assert_logprobs_and_gradients_match_padded(tiny, ids, mask, batch["response_mask"][:, 1:].float(), prefix)
    tiny.config._attn_implementation = "sdpa"


def test_a_group_of_rollouts_shares_its_left_padded_prompt(tiny, layout):
    """GRPO-shaped: 2 prompts x 3 samples, prompts left-padded, responses right-padded; sequence_logprobs."""
    from tether.forward import response_outputs

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 60, (n,), generator=g) for n in (2, 4)]
    rows, masks = [], []
    for prompt in prompts:
        for n in (1, 3, 2):
            response = torch.randint(3, 60, (n,), generator=g)
            rows.append(torch.cat([torch.zeros(4 - len(prompt), dtype=torch.long), prompt, response,
                                   torch.zeros(3 - n, dtype=torch.long)]))
            masks.append(torch.tensor([0] * (4 - len(prompt)) + [1] * (len(prompt) + n) + [0] * (3 - n)))
    ids, mask = torch.stack(rows), torch.stack(masks)
    response = mask[:, 4:].float()
    with torch.no_grad():
        shared = response_outputs(tiny, ids, mask, 4).logprobs * response
        padded = response_outputs(tiny, ids, mask, 4, padding_free=False).logprobs * response
    assert P.plan(mask, ids=ids, prefix_lengths=mask[:, :4].sum(1)).visible is not None
    torch.testing.assert_close(shared, padded, atol=1e-5, rtol=1e-5)


def test_shared_prompt_reward_scores(tmp_path, layout):
    from tether.data import prompt_lengths

    model = load_reward_model(save_tiny(tmp_path / "rm", seed=8)).eval()
    batch = pair_batch(seed=2)
    args = (model, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        shared = reward_scores(*args, prefix_lengths=prompt_lengths(batch))
        padded = reward_scores(*args, padding_free=False)
    torch.testing.assert_close(shared, padded, atol=1e-5, rtol=1e-5)


# --- one flat row, attention sequence by sequence ----------------------------------------------------------------------
def test_flat_layout_puts_sequences_back_to_back_with_their_spans(monkeypatch):
    monkeypatch.setattr(P, "RUN_COST", 0.0)
    # the shared-prompt example above: prompt [5 6], responses [7] and [8 9]; one row of 5, no mask
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    p = P.plan(mask, ids=ids, prefix_lengths=torch.tensor([2, 2]), flat=True)
    assert (p.rows, p.width, p.visible) == (1, 5, None)
    assert P.pack(ids, p).tolist() == [[5, 6, 7, 8, 9]] and p.position_ids.tolist() == [[0, 1, 2, 2, 3]]
    assert p.spans.segments == [(0, 2, (1, 2))]
    assert p.spans.runs == [(2, 2, 0), (2, 1, 1), (2, 2, 1)]  # the prompt, then each run of responses
    assert p.jump_cols.tolist() == [3] and p.jump_parents.tolist() == [1]
    # whole sequences of lengths 3, 1, 3: ordered by length, the two 3s one run: [x] [a b c] [d e f]
    ids, mask = right_padded([3, 1, 3])
    p = P.plan(mask, flat=True)
    assert p.spans.segments == [(0, 0, (1,)), (1, 0, (3,)), (4, 0, (3,))]
    assert p.spans.runs == [(0, 1, 1), (0, 3, 2)]
    assert p.position_ids.tolist() == [[0, 0, 1, 2, 0, 1, 2]]
    assert torch.equal(P.unpack(P.pack(ids, p), p), ids)
    assert P.plan(torch.ones(3, 4, dtype=torch.long), flat=True) is None  # nothing to save: the padded forward


def test_the_plan_takes_the_flat_row_when_it_costs_least(monkeypatch):
    # lengths 3, 1, 3 (width 3), κ = 2. Padded: 3 · (3 + 9/2) = 22.5, times 0.95 = 21.4 to beat. Rows of 3: [3] [3]
    # [1] is no fewer rows; one row of 7 (>= 7.28 -> 8 wide): 8 + 64/2 = 40; two rows of 4: 2 · (4 + 8) = 24.
    # Flat: 7 tokens + (1 + 9 + 9)/2 pairs = 16.5, plus RUN_COST per call, 2 calls (lengths 1 and 3).
    _, mask = right_padded([3, 1, 3])
    monkeypatch.setattr(P, "RUN_COST", 2.0)  # 16.5 + 4 = 20.5 < 21.4
    assert P.plan(mask, kappa=2.0, flat=True).spans is not None
    monkeypatch.setattr(P, "RUN_COST", 3.0)  # 16.5 + 6 = 22.5: nothing pays, the padded forward runs
    assert P.plan(mask, kappa=2.0, flat=True) is None
    # a shared prompt of 2 with responses of 1 and 2: 3 calls (the prompt, each length)
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 8, 9]])
    segments = P._segments(ids, [3, 4], [0, 0], [2, 2])
    assert P._span_runs(P._flat_order(segments)) == [(2, 2, 0), (2, 1, 1), (2, 2, 1)]
    assert len(P._span_runs(P._flat_order(P._segments(None, [3, 1, 3], [0, 0, 0], None)))) == 2


def test_response_mask_sees_the_prompt_and_itself():
    spans = P.Spans([(0, 2, (3,))], [(2, 2, 0), (2, 3, 1)])
    assert spans.response_mask(2, 3, "cpu").int().tolist() == [[1, 1, 1, 0, 0],
                                                             [1, 1, 1, 1, 0],
                                                             [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_span_attention_with_empty_responses_and_runs_equals_the_padded_forward(tiny, attn, monkeypatch):
    """Three rows share a prompt and one of them has no response at all; two responses have the same length (one
    batched run); plus two whole sequences of the same length. Grouped KV heads (4 query, 2 key/value heads)."""
    tiny.config._attn_implementation = attn
    monkeypatch.setattr(P, "RUN_COST", 0.0)
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(3, 60, (3,), generator=g).tolist()
    rows = [prompt + torch.randint(3, 60, (n,), generator=g).tolist() for n in (2, 0, 2, 4)]
    rows += [torch.randint(3, 60, (5,), generator=g).tolist() for _ in range(2)]
    from tether.data import pad_sequences

    ids = pad_sequences(rows, 0)
    mask = pad_sequences([[1] * len(r) for r in rows], 0)
    prefix = torch.tensor([3, 3, 3, 3, 0, 0])
    p = P.plan_for(tiny, ids, mask, prefix)
    assert p.spans.runs == [(0, 5, 2), (3, 3, 0), (3, 2, 2), (3, 4, 1)]
    assert tiny.config.num_key_value_heads < tiny.config.num_attention_heads
    assert_logprobs_and_gradients_match_padded(tiny, ids, mask, (mask[:, 1:] * mask[:, :-1]).float(), prefix)
    tiny.config._attn_implementation = "sdpa"


def test_flat_rows_are_refused_where_the_span_attention_would_not_run(tiny):
    assert P.flat_attention_ok(tiny)
    tiny.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        assert not P.flat_attention_ok(tiny)  # its re-run forward would not be inside attention_for
    finally:
        tiny.gradient_checkpointing_disable()
    ids, mask = right_padded([4, 2])
    ordered = P._flat_order(P._segments(None, [4, 2], [0, 0], None))
    p = P._flat_layout(ordered, P._span_runs(ordered), tuple(mask.shape), [0, 0], "cpu")
    inputs = forward_inputs(tiny, ids, mask, p)
    with pytest.raises(RuntimeError):  # outside attention_for: sdpa gets the empty mask and fails, never silently
        tiny(**inputs)
    with P.attention_for(p, tiny):
        assert tiny.config._attn_implementation == P.SPAN_ATTENTION
        tiny(**inputs)
    assert tiny.config._attn_implementation == "sdpa"


def test_a_second_model_that_cannot_run_a_flat_row_keeps_packed_rows(tiny, monkeypatch):
    """PPO's policy and value share one forward: a value model without the span attention turns the flat row off for
    both, not packing as a whole."""
    monkeypatch.setattr(P, "RUN_COST", 0.0)
    other = tiny_causal_lm(tiny_tokenizer(), seed=4, hidden=32)
    other.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, mask = right_padded([6, 2, 3, 5])
    ids = torch.randint(3, 60, mask.shape) * mask
    assert P.plan_for(tiny, ids, mask).spans is not None
    p = P.plan_for(tiny, ids, mask, also=(other,))
    assert p is not None and p.spans is None and p.rows < len(ids)
