"""The "eager" backend: the decode loop over the model's own forward with transformers' dynamic KV cache.

It runs any causal LM transformers can run, and is what "auto" picks where the lean decoder (lean.py) does not apply.
"""

from __future__ import annotations

import torch

from tether.generation.core import cache_keyword, decode_loop
from tether.packing import position_ids_from_mask


def _returned_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def sample_eager(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p, generator):
    """Prefill with the model's forward, then one token per step for every row through its dynamic cache."""
    positions = position_ids_from_mask(mask)
    key = cache_keyword(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    state = {"past": _returned_cache(out), "mask": mask, "pos": positions[:, -1:] + 1}

    def step(tokens, t):
        state["mask"] = torch.cat([state["mask"], torch.ones_like(tokens[:, None])], dim=1)
        o = model(input_ids=tokens[:, None], attention_mask=state["mask"], position_ids=state["pos"],
                  use_cache=True, **{key: state["past"]})
        state["past"], state["pos"] = _returned_cache(o), state["pos"] + 1
        return o.logits[:, -1]

    return decode_loop(step, out.logits[:, -1], len(ids), max_new_tokens, eos_token_id, pad_token_id,
                       temperature, top_k, top_p, generator)
