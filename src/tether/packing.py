"""Layouts of a padded batch: its rows bin-packed into fewer rows, a shared prompt stored once, or one flat row.

    p = plan(mask)                             # None when packing would not pay
    p = plan_for(model, ids, mask, prefix_lengths=prompt_lens)   # the model's κ; rows with one prompt share it
    out = model(input_ids=pack(ids, p), position_ids=p.position_ids, use_cache=False)
    per_token = unpack(out_tensor, p)          # (R, W, ...) -> (N, T, ...) in the padded layout

This module only plans layouts and moves tokens in and out of them; forward.py runs models over them.

A batch padded to its longest row spends its forward and backward on pad tokens: with lengths spread evenly up to
the width, about half the work. `plan` places each row's real tokens (one contiguous span: right padding, left
padding or both) into rows of width W, first fit by decreasing length; `pack` lays them out with position_ids
restarting at 0 for every sequence and no attention mask, so transformers 5 derives the block-diagonal causal mask
from the restarts (data.py says why the mask must be absent and the cache off). `unpack` carries a per-token result
back to the padded (N, T) layout, so the code around a forward gets the tensors it would have got from the padded
batch.

Shared prompts: given each row's prompt length, rows whose prompts are the same tokens (DPO's chosen and rejected,
a reward model's pair, the G samples of a GRPO group) become one segment — the prompt once, then each row's
response at the positions it would have had — with a tree-shaped 4D mask (`Packing.visible`: a response sees the
prompt and itself, not its siblings). The first token of the second and later responses is predicted from the
prompt's last slot, not the slot before it (`jump_cols`, `jump_parents`). It needs an attention that takes a 4D
mask (sdpa, eager); with any other, rows are packed without sharing.

The width: rows of the batch's own width T cannot pair two sequences longer than T/2, so wider rows (about total/k
for k rows) pack tighter, but with a dense mask (sdpa on a CPU) attention costs W² per row. `plan` takes the width
of least estimated cost, rows·(W + W²/κ), against N·(T + T²/κ) for the padded batch, where κ is what one token
costs in the linear layers relative to one attention pair, about 2·hidden + 1.5·intermediate (`attention_ratio`).

One flat row (a third candidate of `plan`, where the model allows it: `flat_attention_ok`): every sequence back to
back in a single row, and attention computed sequence by sequence instead of through a mask (`span_attention`,
registered with transformers' attention interface and switched on around the forward by `attention_for`). The
linear layers see exactly the real tokens, each shared prompt once, and attention costs only the visible pairs: a
prompt attends causally to itself, then each run of same-length responses attends, as one batch, to the prompt's
keys and its own. Each attention call costs about RUN_COST tokens' worth, so `plan` takes the flat row only when
tokens + pairs/κ + RUN_COST·calls is the least. benchmarks/packing.py, forward and backward on a CPU with the
benchmark's 4.3M-parameter model: a GRPO group of 8 × (64 + 64..256) tokens 1.69x faster than padded (the packed
rows with a tree mask: 1.25x); DPO's and SFT's short rows keep the packed rows, which cost the same there.

This is not packing across the data set (`data.pack_examples`, which changes what a batch holds): the examples of a
step are the same either way, so the loss and the gradient are the same up to the order of float sums;
tests/test_packing.py checks log-probs, reward scores, PPO's logits and values and the gradients against the padded
forward. A plan that does not pay returns None and forward.py runs the padded forward.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tether.wrappers import hf_model, model_config


@dataclass
class Packing:
    shape: tuple[int, int]  # (N, T) of the padded batch
    width: int  # W, the width of the packed rows (T or wider)
    rows: int  # R packed rows
    src: torch.Tensor  # (n,) flat indices of the real tokens in the padded N*T layout
    dst: torch.Tensor  # (n,) the same tokens' flat indices in the packed R*W layout (shared prompts: many to one)
    first: torch.Tensor  # (n,) bool: the token opens its sequence (nothing before it)
    position_ids: torch.Tensor  # (R, W) 0, 1, ... per sequence; each row's unused tail is a segment of its own
    visible: torch.Tensor | None = None  # (R, 1, W, W) bool, only when prompts are shared: who attends to whom
    jump_cols: torch.Tensor | None = None  # (k,) packed flat indices of tokens whose predecessor is not the slot
    jump_parents: torch.Tensor | None = None  # before them (a response's first token after a shared prompt), and
    #                                           the flat index of that predecessor (the prompt's last token)
    spans: Spans | None = None  # one flat row: attention computed sequence by sequence (`span_attention`)


@dataclass
class Spans:
    """Who attends to whom in one flat row: per segment (start, prefix, suffix lengths), and `runs`, the row cut into
    the attention calls of `span_attention` (`_span_runs`). A segment is a causal sequence (prefix 0, one suffix) or
    a shared prompt then its responses, each response seeing the prompt and itself."""

    segments: list[tuple[int, int, tuple[int, ...]]]
    runs: list[tuple[int, int, int]]
    masks: dict = field(default_factory=dict, repr=False)  # (prefix, length, device) -> response mask

    def response_mask(self, prefix: int, length: int, device) -> torch.Tensor:
        """(length, prefix+length): a response's token i sees the whole prompt and its own tokens up to i."""
        key = (prefix, length, str(device))
        if key not in self.masks:
            cols = torch.arange(prefix + length, device=device)
            self.masks[key] = cols[None, :] <= prefix + torch.arange(length, device=device)[:, None]
        return self.masks[key]


@dataclass
class _Segment:
    """One packed unit: a prompt shared by several rows then each row's own tokens, or one whole row."""

    rows: list[int]
    prefix: int  # shared prompt tokens (0: a single row, nothing shared)
    suffixes: list[int]  # each row's tokens after the prefix

    @property
    def length(self) -> int:
        return self.prefix + sum(self.suffixes)


def _segments(ids: torch.Tensor | None, lengths: list[int], starts: list[int],
              prefix_lengths: list[int] | None) -> list[_Segment]:
    """Rows with the same first `prefix_length` real tokens (and the same prefix length) share one copy of them."""
    if ids is None or prefix_lengths is None:
        return [_Segment([i], 0, [n]) for i, n in enumerate(lengths) if n]
    groups: dict[tuple, list[int]] = {}
    singles = []
    for i, (n, s, k) in enumerate(zip(lengths, starts, prefix_lengths)):
        if not n:
            continue
        if 0 < k <= n:
            groups.setdefault(tuple(ids[i, s : s + k].tolist()), []).append(i)
        else:
            singles.append(_Segment([i], 0, [n]))
    out = []
    for key, members in groups.items():
        if len(members) == 1:
            out.append(_Segment(members, 0, [lengths[members[0]]]))
        else:
            out.append(_Segment(members, len(key), [lengths[i] - len(key) for i in members]))
    return out + singles


def first_fit_decreasing(lengths: list[int], width: int) -> list[tuple[int, int]]:
    """(row, offset) for each length: longest first, each into the first row with room. Lengths must be <= width."""
    free: list[int] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        row = next((r for r, room in enumerate(free) if room >= n), None)
        if row is None:
            row = len(free)
            free.append(width)
        where[i] = (row, width - free[row])
        free[row] -= n
    return where


def candidate_widths(total: int, min_width: int, n_rows: int, tries: int = 12) -> list[int]:
    """The narrowest width (T, or the longest segment), and the widths that would hold `total` tokens in k rows
    (k < N, up to `tries` of them, a little slack for the fit), none narrower."""
    widths = {min_width}
    for k in sorted({max(1, round(n_rows * (i / tries))) for i in range(1, tries + 1)}):
        if k < n_rows:
            widths.add(max(min_width, math.ceil(total * 1.04 / k)))
    return sorted(widths)


def attention_ratio(config) -> float:
    """κ: the linear-layer FLOPs of one token over the attention FLOPs of one (query, key) pair, from a model config."""
    hidden = getattr(config, "hidden_size", 0) or 0  # no config: count the linear layers only
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    return max(1.0, 2.0 * hidden + 1.5 * inner) if hidden else float("inf")


def plan(mask: torch.Tensor, kappa: float = float("inf"), min_saving: float = 0.05, ids: torch.Tensor | None = None,
         prefix_lengths: torch.Tensor | None = None, flat: bool = False) -> Packing | None:
    """The packing of a (N, T) attention mask, or None when it would not cut the estimated cost by `min_saving`
    (see the module docstring; κ = inf counts linear layers only) or a row's tokens are not contiguous.

    With `ids` and `prefix_lengths` (N,) (the real prompt tokens of each row), rows whose prompts are the same tokens
    share one copy of them: the prompt, then each row's response, each response seeing the prompt and itself
    (`visible`, a tree-shaped mask, which needs an attention that takes a 4D mask: sdpa or eager).

    With `flat`, one more candidate: every sequence in one row with nothing between them, attention computed
    sequence by sequence (`Packing.spans`, `span_attention`): no pad, no masked-out pair, each shared prompt once,
    but one attention call per run of same-length sequences. Its cost is tokens + visible pairs/κ + RUN_COST per
    call; it is taken when that is the least. It needs a model whose attention goes through transformers' attention
    interface (`flat_attention_ok`)."""
    n_rows, padded_width = mask.shape
    m = mask.detach().bool().cpu()
    lengths = m.sum(1).tolist()
    columns = torch.arange(padded_width)
    starts = torch.where(m, columns, padded_width).min(1).values.tolist()
    ends = torch.where(m, columns, -1).max(1).values.tolist()
    if any(n and e - s + 1 != n for n, s, e in zip(lengths, starts, ends)):
        return None  # holes inside a row: not a padded batch
    segments = _segments(None if ids is None else ids.detach().cpu(), lengths, starts,
                         None if prefix_lengths is None else prefix_lengths.tolist())
    sizes = [g.length for g in segments]

    def cost(rows: int, width: int) -> float:
        return rows * (width + width * width / kappa)

    best, best_cost = None, cost(n_rows, padded_width) * (1.0 - min_saving)
    for width in candidate_widths(sum(sizes), max(sizes + [padded_width]), n_rows):
        where = first_fit_decreasing(sizes, width)
        rows = 1 + max((r for r, _ in where), default=0)
        if rows < n_rows and cost(rows, width) < best_cost:
            best, best_cost = (width, rows, where), cost(rows, width)
    if flat and segments:
        ordered = _flat_order(segments)
        runs = _span_runs(ordered)
        pairs = sum(g.prefix * g.prefix + sum(n * (g.prefix + n) for n in g.suffixes) for g in segments)
        if sum(sizes) + pairs / kappa + RUN_COST * len(runs) <= best_cost:  # a tie: no mask to build
            return _flat_layout(ordered, runs, (n_rows, padded_width), starts, mask.device)
    if best is None:
        return None
    width, rows, where = best
    return _layout(segments, where, (n_rows, padded_width), width, rows, starts, mask.device)


RUN_COST = 8.0  # one more attention call of a flat row, in tokens through the linear layers. Measured by
#  `python benchmarks/packing.py --run-cost` (2 CPU threads, Qwen2 shapes, 4 layers, two runs on 2026-12-02):
#  hidden 64: 15.9 / 16.8, hidden 128: 4.9 / 4.9, hidden 256: 1.6 / 2.9; it falls as the model grows, since a call's
#  fixed cost is spread over more FLOPs. 8 lies inside that range; a different value would route some batches to
#  another layout and so change the rounding of every recorded figure, so it changes only with a new seed table.


def _flat_order(segments: list[_Segment]) -> list[_Segment]:
    """Segments of the same shape next to each other, and in each segment the responses of the same length, so that
    `span_attention` batches them."""
    ordered = []
    for g in segments:
        order = sorted(range(len(g.rows)), key=lambda j: g.suffixes[j])
        ordered.append(_Segment([g.rows[j] for j in order], g.prefix, [g.suffixes[j] for j in order]))
    return sorted(ordered, key=lambda g: (g.prefix, len(g.suffixes), g.suffixes))


def _span_runs(ordered: list[_Segment]) -> list[tuple[int, int, int]]:
    """The attention calls over ordered segments, in row order: (prefix, length, count). A shared prompt is (p, p, 0),
    then each run of its same-length responses (p, length, count); neighbouring whole sequences of one length are
    one run (0, length, count). Zero-length responses hold no token and get no call."""
    out: list[list[int]] = []
    for g in ordered:
        if g.prefix:
            out.append([g.prefix, g.prefix, 0])
            out += [[g.prefix, length, count] for length, count in _equal_runs(g.suffixes) if length]
        elif out and out[-1][:2] == [0, g.suffixes[0]]:
            out[-1][2] += 1
        else:
            out.append([0, g.suffixes[0], 1])
    return [(p, n, c) for p, n, c in out]


def _flat_layout(ordered: list[_Segment], runs, shape, starts: list[int], device) -> Packing:
    """The ordered segments in one row, back to back, with their spans."""
    offsets = [0]
    for g in ordered:
        offsets.append(offsets[-1] + g.length)
    p = _layout(ordered, [(0, o) for o in offsets[:-1]], shape, offsets[-1], 1, starts, device, tree=False)
    p.spans = Spans([(o, g.prefix, tuple(g.suffixes)) for o, g in zip(offsets, ordered)], runs)
    return p


def _layout(segments: list[_Segment], where, shape, width: int, rows: int, starts: list[int], device,
            tree: bool = True) -> Packing:
    """Index maps, positions and (with shared prompts and `tree`) the tree mask of a placement."""
    padded_width = shape[1]
    src, dst, first, jump_cols, jump_parents = [], [], [], [], []
    positions = torch.zeros(rows, width, dtype=torch.long)
    segment_of = torch.full((rows, width), -1, dtype=torch.long)  # unused tail: -1, made unique below
    member_of = torch.full((rows, width), -1, dtype=torch.long)  # -1: shared prompt (or a whole single row)
    used = [0] * rows
    for s, (g, (row, offset)) in enumerate(zip(segments, where)):
        base = row * width + offset
        segment_of[row, offset : offset + g.length] = s
        positions[row, offset : offset + g.prefix] = torch.arange(g.prefix)
        col = offset + g.prefix
        for j, (i, n) in enumerate(zip(g.rows, g.suffixes)):
            positions[row, col : col + n] = torch.arange(g.prefix, g.prefix + n)
            if g.prefix:
                member_of[row, col : col + n] = j
                src.append(i * padded_width + starts[i] + torch.arange(g.prefix))
                dst.append(base + torch.arange(g.prefix))
                first.append(torch.arange(g.prefix) == 0)
                if n and col > offset + g.prefix:  # the first response follows the prompt directly
                    jump_cols.append(row * width + col)
                    jump_parents.append(base + g.prefix - 1)
            src.append(i * padded_width + starts[i] + g.prefix + torch.arange(n))
            dst.append(row * width + col + torch.arange(n))
            first.append(torch.arange(n) == 0 if not g.prefix else torch.zeros(n, dtype=torch.bool))
            col += n
        used[row] = max(used[row], offset + g.length)
    for row, end in enumerate(used):
        positions[row, end:] = torch.arange(width - end)
    visible = None
    if tree and any(g.prefix for g in segments):
        tail = segment_of < 0  # each unused slot its own segment: it sees itself, so no row of the mask is empty
        segment_of = torch.where(tail, len(segments) + torch.arange(rows * width).view(rows, width), segment_of)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = segment_of[:, :, None] == segment_of[:, None, :]
        tree = (member_of[:, None, :] < 0) | (member_of[:, :, None] == member_of[:, None, :])
        visible = (same & tree & causal)[:, None].to(device)
    long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return Packing(shape, width, rows, torch.cat(src).to(device), torch.cat(dst).to(device),
                   torch.cat(first).to(device), positions.to(device), visible,
                   long(jump_cols) if jump_cols else None, long(jump_parents) if jump_parents else None)


def pack(values: torch.Tensor, p: Packing, fill: int = 0) -> torch.Tensor:
    """(N, T) padded ids (or any per-token tensor) -> (R, W) packed; unused places hold `fill`."""
    out = values.new_full((p.rows * p.width,), fill)
    return out.index_copy(0, p.dst, values.reshape(-1)[p.src]).view(p.rows, p.width)


def unpack(values: torch.Tensor, p: Packing, fill: float = 0.0, skip_first: bool = False) -> torch.Tensor:
    """(R, W, ...) packed per-token values -> (N, T, ...) in the padded layout, `fill` at pads (differentiable).

    With `skip_first`, each sequence's first token gets `fill` too (for values that depend on the token before it,
    such as next-token log-probs, which the packed row takes from the previous sequence)."""
    rest = values.shape[2:]
    flat = values.reshape(p.rows * p.width, *rest)
    src, dst = (p.src[~p.first], p.dst[~p.first]) if skip_first else (p.src, p.dst)
    out = values.new_full((p.shape[0] * p.shape[1], *rest), fill)
    return out.index_copy(0, src, flat[dst]).view(*p.shape, *rest)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting only real tokens, so left-padded rows start at 0 like unpadded ones."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each row (right or left padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


# --- attention sequence by sequence over one flat row -------------------------------------------------------------------
SPAN_ATTENTION = "tether_spans"  # the attention implementation a model runs under while a flat row goes through it
NO_MASK = torch.zeros(1, 1, 0, 0, dtype=torch.bool)  # the flat row's attention_mask: taken as is by transformers'
#   mask code, ignored by `span_attention`, and an error in any other attention (a forward re-run outside
#   `attention_for`, as gradient checkpointing would) rather than a silent causal mask across sequences


def _equal_runs(values) -> list[tuple[int, int]]:
    """(value, count) of each run of equal neighbours: [3, 3, 5] -> [(3, 2), (5, 1)]."""
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return [(v, c) for v, c in runs]


def span_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                   sliding_window: int | None = None, tether_spans: Spans | None = None, **kwargs):
    """Attention of one flat row (1, H, N, D) by `tether_spans`: a causal `scaled_dot_product_attention` per run of
    same-length sequences, and for a shared prompt one over the prompt then one per run of same-length responses
    (keys: the prompt's, then the response's own, causally). Registered with transformers' attention interface;
    returns (1, N, H, D) as its sdpa function does. The row is cut once with `split` (whose backward is one `cat`),
    not sliced piece by piece (each slice's backward writes a gradient the size of the whole row)."""
    if tether_spans is None:
        raise RuntimeError("span attention runs only on a flat row from packing.plan(flat=True): no tether_spans given")
    runs = tether_spans.runs
    longest = max(prefix + length for prefix, length, _ in runs)
    if sliding_window is not None and sliding_window < longest:
        raise ValueError(f"a sliding window of {sliding_window} is shorter than a sequence of {longest} tokens")
    gqa = key.shape[1] != query.shape[1]
    sizes = [length * max(count, 1) for _, length, count in runs]  # count 0: a shared prompt
    cut = [x[0].split(sizes, dim=1) for x in (query, key, value)]  # per run: (h, count·length, D)
    pieces, prompt = [], None
    for (prefix, length, count), q, k, v in zip(runs, *cut):
        if count == 0:  # a shared prompt: causal in itself; its keys and values serve the responses after it
            prompt = (k[None], v[None])
            q, k, v = q[None], k[None], v[None]
            mask = None
        else:
            q, k, v = (x.unflatten(1, (count, length)).transpose(0, 1) for x in (q, k, v))  # (count, h, length, D)
            mask = None
            if prefix:
                k = torch.cat([prompt[0].expand(count, -1, -1, -1), k], 2)
                v = torch.cat([prompt[1].expand(count, -1, -1, -1), v], 2)
                mask = tether_spans.response_mask(prefix, length, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                             scale=scaling, enable_gqa=gqa)
        pieces.append(out.transpose(0, 1).flatten(1, 2))  # (h, count·length, D)
    return torch.cat(pieces, 1)[None].transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SPAN_ATTENTION, span_attention)


_register()


def flat_attention_ok(model) -> bool:
    """Whether `model` can run a flat row: a transformers model whose attention goes through the attention interface
    (sdpa or eager), without gradient checkpointing (its re-run forward would not see the span attention) and
    without sliding-window layers."""
    hf = hf_model(model)
    config = getattr(hf, "config", None)
    if config is None or not getattr(type(hf), "_supports_attention_backend", False):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    checkpointing = "is_activation_checkpointing" if hasattr(type(hf), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"  # renamed in transformers 5.x
    if getattr(hf, checkpointing, False):
        return False
    return not (getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types",
                                                                                                 None) or ()))


@contextlib.contextmanager
def attention_for(p: Packing | None, *models):
    """While a flat row goes through `models`, their attention is `span_attention`; restored afterwards."""
    if p is None or p.spans is None:
        yield
        return
    configs = [model_config(m) for m in models]
    before = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = SPAN_ATTENTION
    try:
        yield
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation = b


def shares_prompts(config) -> bool:
    """Whether this model's attention takes the 4D tree mask that sharing a prompt between rows needs."""
    return getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")


def plan_for(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_lengths: torch.Tensor | None = None,
             padding_free: bool = True, also=()) -> Packing | None:
    """`plan` with the model's κ, sharing prompts where the model's attention allows it, a flat row where it and the
    models in `also` (others the same forward runs) all take one; None when switched off."""
    if not padding_free:
        return None
    config = model_config(model)
    share = prefix_lengths is not None and shares_prompts(config)
    return plan(attention_mask, attention_ratio(config), ids=input_ids if share else None,
                prefix_lengths=prefix_lengths if share else None,
                flat=all(flat_attention_ok(m) for m in (model, *also)))


def packed_attention_mask(p: Packing, model) -> torch.Tensor | None:
    """What the packed forward gets as attention_mask: None (the block-diagonal mask comes from the position
    restarts), or the tree mask of shared prompts as the model's attention wants it (bool for sdpa, additive in the
    weights' dtype for eager)."""
    if p.visible is None or getattr(model_config(model), "_attn_implementation", "sdpa") != "eager":
        return p.visible
    dtype = next(model.parameters()).dtype
    return torch.zeros(p.visible.shape, dtype=dtype, device=p.visible.device).masked_fill(~p.visible,
                                                                                           torch.finfo(dtype).min)
