"""Batched sampling with a KV cache: the rollout engine of PPO, GRPO, best-of-N, online DPO and evaluation.

    out = sample(model, prompt_ids, max_new_tokens=64, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                 temperature=1.0, generator=torch.Generator().manual_seed(0), return_logprobs=True)
    out.sequences        # (B, P+T) left-padded prompt + right-padded response
    out.response_mask    # (B, T) 1 on response tokens up to and including the first EOS
    texts = decode_responses(tok, out)
    s = sample_records(model, tok, records, n=4, max_new_tokens=48, generator=g)   # records -> texts (texts.py)

Why not `model.generate`: it is general (beam search, stopping criteria, logits processors, cache classes) and pays
for it on every step; RL sampling needs one thing — prefill once, then one token per step for every row — and the
per-step overhead dominates at the small batch shapes of RLHF on a CPU. The loop (core.decode_loop) does exactly that.

The package: core.py (the rollout record, logit filtering, token picking, the loop) is imported by the backends;
dispatch.py imports the backends and picks one; texts.py goes from records to texts through it.
Backends (`BACKENDS`, by name):
- "lean" (lean.py): the Llama-family decoder (Llama, Qwen2, Qwen3, Mistral) written out layer by layer over a
  preallocated cache; what "auto" picks wherever `lean.supported` says it applies. Measured on one CPU core (4.3M
  parameters, batch 16, 32 + 64 tokens): 9.8 ms a step against 12.7 ms for "eager" and 18 ms for `generate`.
- "eager" (eager.py): the same loop over the model's own forward and transformers' dynamic cache; "auto" elsewhere.
Both pick tokens with the same function and generator calls, so for one seed they give the same tokens wherever
their logits agree to rounding. tests/test_generation.py checks both against `model.generate` (the oracle lives in
the tests) and against a loop without a cache.

Conventions: prompts are left-padded and get explicit `position_ids` (cumsum of the mask − 1), so a padded row gives
exactly what it gives alone. `temperature == 0` is greedy. The returned `logprobs` are log-probs of the sampled tokens
under the *tempered, unfiltered* distribution (log_softmax(logits / T)) — the quantity a training forward recomputes
(`forward.response_outputs`); top-k / top-p only decide which token is drawn.
"""

from tether.generation.core import Rollout
from tether.generation.dispatch import BACKENDS, auto_backend, sample
from tether.generation.texts import Samples, decode_responses, sample_records, stop_ids

__all__ = ["BACKENDS", "Rollout", "Samples", "auto_backend", "decode_responses", "sample", "sample_records", "stop_ids"]
