"""Examples to padded batches: the row layouts of each collate_*, model_inputs, packing, token counts."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tether.data.tokenize import IGNORE_INDEX, Example, PairExample, RankingExample, UnpairedExample


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """(N, T) LongTensor of the sequences padded with pad_value to the longest T; side "left" for generation prompts."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if pad_value is None:
        raise ValueError("pad_value is None: the tokenizer has no pad token (set tokenizer.pad_token)")
    if not seqs:
        raise ValueError("cannot pad an empty list of sequences")
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if side == "left":
                out[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            else:
                out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _lengths_mask(lengths: Sequence[int], side: str = "right") -> torch.Tensor:
    """(N, max length) long mask, 1 on the first (right padding) or last (left padding) `length` positions."""
    return pad_sequences([[1] * n for n in lengths], 0, side)


def collate_lm(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded language-modelling batch: input_ids, attention_mask, labels (IGNORE_INDEX on pad), all (B, T).

    Packed examples also give `position_ids` (B, T); their padding is a segment of its own (positions 0, 1, ...),
    which real tokens never see under the causal mask. Feed the model `model_inputs(batch)`.
    """
    batch = {
        "input_ids": pad_sequences([e.input_ids for e in examples], pad_id),
        "attention_mask": _lengths_mask([len(e.input_ids) for e in examples]),
        "labels": pad_sequences([e.labels for e in examples], IGNORE_INDEX),
    }
    if any(e.position_ids is not None for e in examples):
        width = batch["input_ids"].shape[1]
        batch["position_ids"] = torch.tensor([
            (e.position_ids if e.position_ids is not None else list(range(len(e.input_ids))))
            + list(range(width - len(e.input_ids))) for e in examples
        ])
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """The keyword arguments of a causal-LM training forward for a `collate_lm` batch (no KV cache).

    Packed batches get input_ids + position_ids and no attention_mask: given a 2D mask, transformers builds a plain
    causal mask over the whole row and packed examples would attend to each other; without one (and without a cache,
    hence use_cache=False) it finds the segments from the position restarts and builds the block-diagonal causal
    mask (`masking_utils.find_packed_sequence_indices`).
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def collate_completions(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                        pad_id: int) -> dict[str, torch.Tensor]:
    """Rows prompt_i + completion_i, right padded.

    Returns input_ids, attention_mask, response_mask (N, T): 1 on completion tokens at their own positions (so the
    next-token log-probs logits[:, :-1] -> tokens[:, 1:] take response_mask[:, 1:]); last_index (N,): position of the
    last real token of each row, where a reward model reads its score.
    """
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    lengths = [len(r) for r in rows]
    return {
        "input_ids": pad_sequences(rows, pad_id),
        "attention_mask": _lengths_mask(lengths),
        "response_mask": pad_sequences([[0] * len(p) + [1] * len(c) for p, c in zip(prompt_ids, completion_ids)], 0),
        "last_index": torch.tensor([n - 1 for n in lengths], dtype=torch.long),
    }


def collate_pairs(pairs: Sequence[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected in one batch for one forward: rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected.

    input_ids, attention_mask, response_mask (2B, T); last_index (2B,); margin, weight, prob (B,) float32 (prob
    NaN where a pair has no soft label).
    """
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    batch = collate_completions(prompts, completions, pad_id)
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    batch["weight"] = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
    batch["prob"] = torch.tensor([math.nan if getattr(p, "prob", None) is None else p.prob for p in pairs],
                                 dtype=torch.float32)
    return batch


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) halves of anything with the rows of `collate_pairs`: x (2B, ...) -> two (B, ...).

    Rows 0..B-1 are prompt+chosen and rows B..2B-1 prompt+rejected, so chosen[i] and rejected[i] are pair i: the
    same split serves input_ids, masks, last_index and whatever a forward gives per row (log-probs, rewards). A
    tensor gives views of x.
    """
    rows = len(x)
    if rows % 2:
        raise ValueError(f"expected an even number of rows (B chosen, then B rejected), got {rows}")
    return x[: rows // 2], x[rows // 2 :]


def collate_rankings(rankings: Sequence[RankingExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Every completion of every prompt as one row (N = sum of K), in completion order, for one forward.

    input_ids, attention_mask, response_mask (N, T); last_index (N,); group (N,): index of the row's example;
    rank (N,): place of the row's completion in its ranking, 0 = best.
    """
    prompts, completions, group, rank = [], [], [], []
    for g, ex in enumerate(rankings):
        place = {index: r for r, index in enumerate(ex.ranking)}
        for k, ids in enumerate(ex.completion_ids):
            prompts.append(ex.prompt_ids)
            completions.append(ids)
            group.append(g)
            rank.append(place[k])
    batch = collate_completions(prompts, completions, pad_id)
    batch["group"] = torch.tensor(group, dtype=torch.long)
    batch["rank"] = torch.tensor(rank, dtype=torch.long)
    return batch


def collate_unpaired(examples: Sequence[UnpairedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows prompt+completion as `collate_completions`, plus label (B,) bool."""
    batch = collate_completions([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id)
    batch["label"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    return batch


def collate_prompts(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation (new tokens follow the last column): input_ids, attention_mask (B, T)."""
    return {"input_ids": pad_sequences(prompt_ids, pad_id, "left"),
            "attention_mask": _lengths_mask([len(p) for p in prompt_ids], "left")}


# --- packing ----------------------------------------------------------------------------------------------------------
def pack_examples(examples: Sequence[Example], max_len: int) -> list[Example]:
    """Concatenate consecutive examples into rows of at most max_len tokens (next-fit, order kept).

    Each packed row has position_ids restarting at 0 for every example, and the label of each example's first token
    is IGNORE_INDEX: unpacked, nothing predicts that token; packed, the previous example's last token would. So the
    packed summed NLL equals the unpacked one exactly, provided the model gets `model_inputs(batch)`.
    """
    rows: list[Example] = []
    current: Example | None = None
    for ex in examples:
        n = len(ex.input_ids)
        if n > max_len:
            raise ValueError(f"an example of {n} tokens does not fit max_len={max_len}")
        if n == 0:
            continue
        if current is None or len(current.input_ids) + n > max_len:
            current = Example([], [], position_ids=[])
            rows.append(current)
        current.input_ids += ex.input_ids
        current.labels += [IGNORE_INDEX] + ex.labels[1:]
        current.position_ids += list(range(n))
        current.prompt_truncated |= ex.prompt_truncated
        current.completion_truncated |= ex.completion_truncated
    return rows


def prompt_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) real prompt tokens of each row of a collate_completions-style batch (attention minus response mask)."""
    return (batch["attention_mask"] - batch["response_mask"]).sum(1)


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-pad) tokens of a collated batch, for tokens/s."""
    return int(batch["attention_mask"].sum())
