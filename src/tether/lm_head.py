"""Token log-probs and entropy through the LM head in chunks of rows: never a (rows, V) fp32 logits tensor.

    head = linear_head(model)                       # the model's output projection, or None (then: plain logits)
    with hidden_states_out(head):
        hidden = model(**inputs).logits             # (B, T, d): the head returns its input inside this context
    logprobs, entropy = head_logprobs(hidden, head, tokens, temperature, entropy=True)  # (B, T) each, fp32

Why: a forward that returns logits holds (B, T, V) of them, and taking log-probs in fp32 makes another copy; with
a real vocabulary (Qwen2.5: V = 151,936) that, not the weights, is what runs out of memory on long DPO and GRPO
batches: 2 x 8 rows x 512 tokens is 5 GB of fp32 logits. Here the last hidden states go through the head a chunk of
rows at a time (at most `CHUNK_ELEMENTS` logits alive), and the backward recomputes each chunk's logits from the
saved hidden states instead of keeping them (`ChunkedHeadLogprobs`), so neither pass holds (B, T, V).

The head's matrix product runs in fp32 from the fp32 master weight, whatever autocast is on: the log-probs that PPO's
ratio and the KL estimators take differences of keep fp32 digits (a bf16 logit of 10 is off by up to 0.03, which
is a 3% ratio error). Tested equal to the plain path (logits, then `losses.logprobs_from_logits`) to 1e-5 in values
and in the gradients of the hidden states, the weight and the bias (tests/test_lm_head.py).

On CUDA with Liger-Kernel installed (optional, not a dependency), log-probs without a gradient and without entropy
(reference and old log-probs) come from Liger's fused linear-cross-entropy kernel with reduction="none". Not with a
gradient: that kernel computes its gradient in the forward and scales it by one scalar in the backward, which is
wrong for per-token loss weights.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB in fp32 (110 rows at V = 151,936; every row at V = 512 x 32k)

# Model types whose causal-LM forward is `logits = lm_head(hidden)` and nothing more (no soft-capping, no logit
# scale): only for these is "the head's input" the whole story. Others take the plain path.
PLAIN_HEAD_TYPES = {"llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mistral", "mixtral", "gpt2", "gpt_neox",
                    "phi", "phi3", "olmo", "olmo2", "smollm3", "opt"}


def linear_head(model) -> torch.nn.Linear | None:
    """The output projection of a causal LM (under DDP/peft wrappers) when the chunked path reproduces its logits:
    a plain `nn.Linear` of a model type in `PLAIN_HEAD_TYPES`, with local (not FSDP-sharded) weights. Else None."""
    from tether.wrappers import hf_model

    hf = hf_model(model)
    config = getattr(hf, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES or not hasattr(hf, "get_output_embeddings"):
        return None
    head = hf.get_output_embeddings()
    if type(head) is not torch.nn.Linear or hasattr(head.weight, "to_local"):  # LoRA on the head, a DTensor
        return None
    return head


@contextmanager
def hidden_states_out(head: torch.nn.Module | None):
    """Inside, `head` returns its input: the model's `.logits` are the last hidden states (B, T, d). None: no-op."""
    if head is None:
        yield
        return
    head.forward = _identity
    try:
        yield
    finally:
        del head.forward  # the class's forward again


def _identity(x: Tensor) -> Tensor:
    return x


def chunk_rows(vocab: int, budget: int | None = None) -> int:
    """Rows per chunk so that one chunk holds at most `budget` logits (default `CHUNK_ELEMENTS`; at least one row)."""
    return max(1, (CHUNK_ELEMENTS if budget is None else budget) // vocab)


class ChunkedHeadLogprobs(torch.autograd.Function):
    """(lp, H) of z = (h W^T + b) / T over chunks of rows; the backward recomputes each chunk's z.

    lp = z[token] − logsumexp(z);  H = logsumexp(z) − Σ_v p_v z_v,  p = softmax(z).
    Backward per chunk, with log p = z − lse: ∂lp/∂z = onehot(token) − p;  ∂H/∂z = −p ⊙ (log p + H);
    ∂/∂logits = ∂/∂z / T; then ∂h = g W, ∂W = gᵀ h, ∂b = Σ_rows g (g: the chunk's gradient of the logits).
    Shapes: hidden (M, d), weight (V, d), bias (V,) or None, tokens (M,) -> lp (M,), H (M,) (zeros without entropy).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, rows, with_entropy):
        dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        lp = torch.empty(len(hidden), dtype=dtype, device=hidden.device)
        ent = torch.zeros_like(lp)
        lse = torch.empty_like(lp)
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, len(hidden), rows):
                z = _chunk_logits(hidden[i:i + rows], w, b, temperature, dtype)  # (c, V)
                lse[i:i + rows] = torch.logsumexp(z, -1)
                lp[i:i + rows] = z.gather(-1, tokens[i:i + rows, None])[:, 0] - lse[i:i + rows]
                if with_entropy:
                    ent[i:i + rows] = lse[i:i + rows] - (torch.softmax(z, -1) * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, ent)
        ctx.temperature, ctx.rows, ctx.dtype = temperature, rows, dtype
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, bias, tokens, lse, ent = ctx.saved_tensors
        t, rows, dtype = ctx.temperature, ctx.rows, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden, dtype=dtype) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=dtype) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=dtype) if need_b and bias is not None else None
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        ent_used = bool(grad_ent.any())  # zeros when the entropy was detached or unused
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, len(hidden), rows):
                h = hidden[i:i + rows].to(dtype)
                z = _chunk_logits(h, w, b, t, dtype)  # (c, V), recomputed
                logp = z.sub_(lse[i:i + rows, None])  # log p, in place of z
                g_lp = grad_lp[i:i + rows, None].to(dtype)
                coef = g_lp  # g = −p ⊙ (g_lp + g_H (log p + H)) + g_lp onehot(token)
                if ent_used:
                    coef = g_lp + grad_ent[i:i + rows, None].to(dtype) * (logp + ent[i:i + rows, None])
                g = logp.exp_().mul_(coef).neg_()
                g.scatter_add_(-1, tokens[i:i + rows, None], g_lp)
                if t != 1.0:
                    g /= t
                if need_h:
                    grad_h[i:i + rows] = g @ w
                if need_w:
                    grad_w.addmm_(g.T, h)
                if grad_b is not None:
                    grad_b += g.sum(0)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return cast(grad_h, hidden), cast(grad_w, weight), cast(grad_b, bias), None, None, None, None


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, dtype) -> Tensor:
    """z = (h W^T + b) / T in `dtype` (c, V)."""
    z = h.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z += bias.to(dtype)
    return z / temperature if temperature != 1.0 else z


def head_logprobs(hidden: Tensor, head: torch.nn.Linear, tokens: Tensor, temperature: float = 1.0, *,
                  entropy: bool = False, entropy_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs of `tokens` and (with `entropy`) the entropy of each distribution, from the hidden states.

    Shapes: hidden (..., d), tokens (...) -> (...) each, fp32 (fp64 for fp64 inputs); equal to
    `losses.logprobs_from_logits(head(hidden), tokens, T)` and `losses.entropy_from_logits(head(hidden), T)`.
    The entropy carries a gradient only with `entropy_grad` (PPO's entropy bonus), otherwise it is detached.
    """
    lead, d = hidden.shape[:-1], hidden.shape[-1]
    flat, ids = hidden.reshape(-1, d), tokens.reshape(-1).long()
    fused = None if entropy else _liger_logprobs(flat, head, ids, temperature)
    if fused is not None:
        return fused.view(lead), None
    lp, ent = ChunkedHeadLogprobs.apply(flat, head.weight, head.bias, ids, float(temperature),
                                        chunk_rows(head.weight.shape[0]), entropy)
    if not entropy:
        return lp.view(lead), None
    ent = ent.view(lead)
    return lp.view(lead), ent if entropy_grad and torch.is_grad_enabled() else ent.detach()


def _liger_logprobs(hidden: Tensor, head: torch.nn.Linear, tokens: Tensor, temperature: float) -> Tensor | None:
    """−(per-token cross entropy) from Liger's fused linear-cross-entropy on CUDA, or None where it does not apply
    (not CUDA, Liger not installed, a bias, a temperature other than 1)."""
    if hidden.device.type != "cuda" or head.bias is not None or temperature != 1.0:
        return None
    if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
        return None  # its backward scales a gradient computed in the forward by one scalar: no per-token weights
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    loss = liger_fused_linear_cross_entropy(hidden.float(), head.weight.float(), tokens, reduction="none")
    loss = loss[0] if isinstance(loss, tuple) else loss
    return -loss.float()
