"""The lean decode path (backend "lean"): the decoder of Llama-family models run layer by layer over a static cache.

    rollout = sample(model, prompts, 64, eos_token_id=..., pad_token_id=..., backend="lean")

Why: the transformers forward builds masks, resolves the attention interface, grows a dynamic cache with
`torch.cat` and handles many options on every call. The Llama-family decoder (Llama, Qwen2, Qwen3, Mistral: pre-norm
RMSNorm, rotary attention with grouped KV heads, gated MLP) is short enough to write out: this module calls the
model's own submodules (norms, projections — LoRA layers included —, rotary embedding, MLP) in that order, keeps keys
and values in buffers of length P+T allocated once, and uses one `scaled_dot_product_attention` per layer with a
boolean mask sliced from a preallocated one. Measured on one CPU core, a 4.3M-parameter Qwen2 shape, batch 16,
32 + 64 tokens: 9.8 ms a step against 12.7 ms for "eager" and 18 ms for `generate`; the matrix products are about
60% of the lean step, so on a CPU the gain stops there (benchmarks/RESULTS.md). Tokens are picked by
`core.pick_tokens`, the same function and generator calls as the "eager" backend, so for one seed both backends
give the same tokens wherever their logits agree to rounding (tests/test_generation_lean.py checks tokens and
log-probs against "eager"; tests/test_generation.py checks greedy decoding against a loop without a cache).

`supported(model, total_len)` says when it applies: a model of those types, every layer full attention (no sliding
window shorter than P+T), an attention implementation of sdpa or eager (flash attention kernels are not reused
here). Anything else decodes with "eager"; "auto" picks "lean" when `supported` says so.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from tether.generation.core import decode_loop
from tether.packing import position_ids_from_mask
from tether.wrappers import has_adapters

LAYER_TYPES = {"LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "MistralDecoderLayer"}


def _parts(model):
    """(the CausalLM under any adapters, its decoder stack) or None when the model is not of a supported shape."""
    base = model.get_base_model() if has_adapters(model) else model
    core = getattr(base, "model", None)
    layers = getattr(core, "layers", None)
    if layers is None or not len(layers) or type(layers[0]).__name__ not in LAYER_TYPES:
        return None
    if not all(hasattr(core, name) for name in ("embed_tokens", "norm", "rotary_emb")) or not hasattr(base, "lm_head"):
        return None
    return base, core


def supported(model, total_len: int) -> bool:
    """True when the lean decoder reproduces this model's forward for sequences of `total_len` tokens."""
    parts = _parts(model)
    if parts is None:
        return False
    base, core = parts
    if getattr(base.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    for layer in core.layers:
        window = getattr(layer.self_attn, "sliding_window", None)
        if window is not None and window < total_len:
            return False
    return True


class LeanDecoder:
    """Keys/values of B rows for P+T positions, and the forward of new tokens at given positions over them."""

    def __init__(self, model, batch: int, total_len: int, key_mask: torch.Tensor):
        base, core = _parts(model)
        self.core, self.lm_head = core, base.lm_head
        self.layers = list(core.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        config = base.config
        kv_heads = config.num_key_value_heads
        self.gqa = config.num_attention_heads != kv_heads
        param = next(model.parameters())
        shape = (batch, kv_heads, total_len, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in self.layers]
        self.key_mask = key_mask.bool()  # (B, P+T): which cache slots hold real tokens

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
        """Run tokens ids (B, S) at `positions` (B, S) into cache slots start..start+S-1; returns logits (B, V) of
        the last of them. Slot j attends to the real slots <= j (and to itself, so a pad row stays finite)."""
        batch, new = ids.shape
        end = start + new
        visible = self.key_mask[:, None, None, :end]  # (B, 1, 1, end)
        if new > 1:  # prefill: causal within the new tokens
            slots = torch.arange(end, device=ids.device)
            rows = torch.arange(start, end, device=ids.device)
            causal = slots[None, :] <= rows[:, None]  # (S, end)
            visible = (visible & causal) | (slots[None, :] == rows[:, None])
        h = self.core.embed_tokens(ids)
        cos, sin = self.core.rotary_emb(h, positions)
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            shape = (batch, new, -1, self.head_dim)
            q = attn.q_proj(x).view(shape)
            k = attn.k_proj(x).view(shape)
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            keys[:, :, start:end] = k
            values[:, :, start:end] = attn.v_proj(x).view(shape).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=visible,
                                               scale=attn.scaling, enable_gqa=self.gqa)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(batch, new, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.core.norm(h[:, -1]))


def sample_lean(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p, generator):
    """The "lean" backend: prefill and decode through `LeanDecoder`, tokens picked as the "eager" backend does."""
    batch, prompt_len = ids.shape
    total = prompt_len + max_new_tokens
    key_mask = torch.ones(batch, total, dtype=torch.bool, device=ids.device)
    key_mask[:, :prompt_len] = mask.bool()
    decoder = LeanDecoder(model, batch, total, key_mask)
    positions = position_ids_from_mask(mask)
    first = decoder.forward(ids, positions, 0)
    pos = positions[:, -1:] + 1

    def step(tokens, t):
        nonlocal pos
        logits = decoder.forward(tokens[:, None], pos, prompt_len + t)
        pos = pos + 1
        return logits

    return decode_loop(step, first, batch, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p,
                        generator)
