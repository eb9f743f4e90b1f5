"""Padding-free forwards: the rows of a padded batch bin-packed into fewer rows of the same width.

    lp = token_logprobs(model, ids, mask)      # (N, T-1), as from the padded forward, without computing the pads
    p = plan(mask)                             # None when packing would save no row
    out = model(input_ids=pack(ids, p), position_ids=p.position_ids, use_cache=False)
    per_token = unpack(out_tensor, p)          # (R, T, ...) -> (N, T, ...) in the padded layout

A batch padded to its longest row spends its forward and backward on pad tokens: with lengths spread evenly up to
the width, about half the work. `plan` places each row's real tokens (one contiguous span: right padding, left
padding or both) into rows of width W, first fit by decreasing length; `pack` lays them out with
position_ids restarting at 0 for every sequence and no attention mask, so transformers 5 derives the block-diagonal
causal mask from the restarts (data.py says why the mask must be absent and the cache off). `unpack` carries a
per-token result back to the padded (N, T) layout, so the code around a forward gets the tensors it would have got
from the padded batch.

The width: rows of the batch's own width T cannot pair two sequences longer than T/2, so wider rows (about
total/k for k rows) pack tighter, but with a dense block-diagonal mask (sdpa on a CPU) attention costs W² per row. `plan` takes the
width of least estimated cost, rows·(W + W²/κ), against N·(T + T²/κ) for the padded batch, where κ is what one token
costs in the linear layers relative to one attention pair, about 2·hidden + 1.5·intermediate (`attention_ratio`).

This is not packing across the data set (`data.pack_examples`, which changes what a batch holds): the examples of a
step are the same either way, so the loss and the gradient are the same up to the order of float sums;
tests/test_packing.py checks log-probs, reward scores and gradients against the padded forward. A plan that saves no
row returns None and the caller runs the padded forward, so fixed-length data pays nothing for the check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tether.losses import logprobs_from_logits


@dataclass
class Packing:
    shape: tuple[int, int]  # (N, T) of the padded batch
    width: int  # W, the width of the packed rows (T or a multiple of it)
    rows: int  # R packed rows
    src: torch.Tensor  # (n,) flat indices of the real tokens in the padded N*T layout
    dst: torch.Tensor  # (n,) the same tokens' flat indices in the packed R*T layout
    first: torch.Tensor  # (n,) bool: the token opens its sequence (nothing before it in its own row)
    position_ids: torch.Tensor  # (R, T) 0, 1, ... per sequence; each row's unused tail is a segment of its own


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


def attention_ratio(config) -> float:
    """κ: the linear-layer FLOPs of one token over the attention FLOPs of one (query, key) pair, from a model config."""
    hidden = getattr(config, "hidden_size", 0) or 0  # no config: count the linear layers only
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    return max(1.0, 2.0 * hidden + 1.5 * inner) if hidden else float("inf")


def candidate_widths(total: int, padded_width: int, n_rows: int, tries: int = 12) -> list[int]:
    """T, and the widths that would hold `total` tokens in k rows (k < N, up to `tries` of them, a little slack for
    the fit), each at least T."""
    widths = {padded_width}
    for k in sorted({max(1, round(n_rows * (i / tries))) for i in range(1, tries + 1)}):
        if k < n_rows:
            widths.add(max(padded_width, math.ceil(total * 1.04 / k)))
    return sorted(widths)


def plan(mask: torch.Tensor, kappa: float = float("inf"), min_saving: float = 0.05) -> Packing | None:
    """The packing of a (N, T) attention mask, or None when it would not cut the estimated cost by `min_saving`
    (see the module docstring; κ = inf counts linear layers only) or a row's tokens are not contiguous."""
    n_rows, padded_width = mask.shape
    m = mask.detach().bool().cpu()
    lengths = m.sum(1).tolist()
    columns = torch.arange(padded_width)
    starts = torch.where(m, columns, padded_width).min(1).values.tolist()
    ends = torch.where(m, columns, -1).max(1).values.tolist()
    if any(n and e - s + 1 != n for n, s, e in zip(lengths, starts, ends)):
        return None  # holes inside a row: not a padded batch

    def cost(rows: int, width: int) -> float:
        return rows * (width + width * width / kappa)

    best, best_cost = None, cost(n_rows, padded_width) * (1.0 - min_saving)
    total = sum(lengths)
    for width in candidate_widths(total, padded_width, n_rows):
        where = first_fit_decreasing(lengths, width)
        rows = 1 + max((r for (r, _), n in zip(where, lengths) if n), default=0)
        if rows < n_rows and cost(rows, width) < best_cost:
            best, best_cost = (width, rows, where), cost(rows, width)
    if best is None:
        return None
    width, rows, where = best
    src, dst, first = [], [], []
    positions = torch.zeros(rows, width, dtype=torch.long)
    used = [0] * rows
    for i, ((row, offset), n) in enumerate(zip(where, lengths)):
        if not n:
            continue
        src.append(i * padded_width + starts[i] + torch.arange(n))
        dst.append(row * width + offset + torch.arange(n))
        first.append(torch.arange(n) == 0)
        positions[row, offset : offset + n] = torch.arange(n)
        used[row] = max(used[row], offset + n)
    for row, end in enumerate(used):
        positions[row, end:] = torch.arange(width - end)
    device = mask.device
    return Packing((n_rows, padded_width), width, rows, torch.cat(src).to(device), torch.cat(dst).to(device), torch.cat(first).to(device),
                   positions.to(device))


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


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                   padding_free: bool = True) -> torch.Tensor:
    """(N, T-1) log-probs of tokens 1..T-1 under logits / T, one forward, packed when that saves rows.

    Column t is log p(token t+1 | tokens <= t) as `logprobs_from_logits(model(ids).logits[:, :-1], ids[:, 1:])` gives
    it; pads and each row's first real token are 0 on the packed path and whatever the padded forward computes on the
    other, so multiply by a mask of real predicted tokens (a response or label mask)."""
    from tether.models import position_ids_from_mask

    config = getattr(getattr(model, "module", model), "config", None)  # DDP keeps the model in .module
    p = plan(attention_mask, attention_ratio(config)) if padding_free else None
    if p is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
        return logprobs_from_logits(logits[:, :-1], input_ids[:, 1:], temperature=temperature)
    ids = pack(input_ids, p)
    logits = model(input_ids=ids, position_ids=p.position_ids, use_cache=False).logits  # (R, W, V)
    lp = F.pad(logprobs_from_logits(logits[:, :-1], ids[:, 1:], temperature=temperature), (1, 0))  # lp of token t
    return unpack(lp, p, skip_first=True)[:, 1:]


def padded_outputs(forward, input_ids: torch.Tensor, attention_mask: torch.Tensor, kappa: float = float("inf"),
                   padding_free: bool = True):
    """Call `forward(input_ids, attention_mask, position_ids)` -> a (rows, T, ...) tensor or a tuple of them, packed
    when that saves rows, and return the outputs in the padded (N, T, ...) layout (0 at pads).

    For outputs at a position that depend only on the tokens up to it in its own sequence (logits, values): packed,
    each real position sees exactly what it sees in the padded batch. The packed call gets attention_mask None."""
    from tether.models import position_ids_from_mask

    p = plan(attention_mask, kappa) if padding_free else None
    if p is None:
        return forward(input_ids, attention_mask, position_ids_from_mask(attention_mask))
    out = forward(pack(input_ids, p), None, p.position_ids)
    if isinstance(out, tuple):
        return tuple(unpack(o, p) for o in out)
    return unpack(out, p)
