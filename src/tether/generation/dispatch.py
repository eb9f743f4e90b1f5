"""The dispatcher: `sample` picks a backend ("auto": lean where it applies, else eager) and runs it.

The package docstring (generation/__init__.py) describes the backends and the conventions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tether.data import pad_sequences
from tether.generation.core import Rollout, response_mask
from tether.generation.eager import sample_eager
from tether.generation.lean import sample_lean, supported

BACKENDS = {"eager": sample_eager, "lean": sample_lean}

def auto_backend(model, total_len: int) -> str:
    """The backend "auto" means for this model: "lean" where it applies, else "eager"."""
    return "lean" if supported(model, total_len) else "eager"


@torch.no_grad()
def sample(model, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int, *, eos_token_id,
           pad_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, return_logprobs: bool = False, backend: str = "auto",
           prompt_mask: torch.Tensor | None = None) -> Rollout:
    """Sample one response per prompt (repeat prompts for several); a row ends at any id of `eos_token_id` (an int
    or a list: `texts.stop_ids` gives a tokenizer's EOS, its chat template's end of turn and the model's EOS list).
    `model` may be a `generation.vllm.VLLMEngine`: vLLM samples, the rollout has the same layout."""
    from tether.generation.vllm import VLLMEngine

    engine = isinstance(model, VLLMEngine)
    device = torch.device("cpu") if engine else next(model.parameters()).device
    if isinstance(prompts, torch.Tensor):
        ids = prompts.to(device)
        mask = (prompt_mask if prompt_mask is not None else torch.ones_like(ids)).to(device).long()
    else:
        ids = pad_sequences(prompts, pad_token_id, side="left").to(device)
        mask = pad_sequences([[1] * len(p) for p in prompts], 0, side="left").to(device)
    if engine:
        response, logprobs = model.sample(ids, mask, max_new_tokens, eos_token_id, pad_token_id, temperature,
                                          top_k, top_p, generator)
    else:
        if backend == "auto":
            backend = auto_backend(model, ids.shape[1] + max_new_tokens)
        if backend not in BACKENDS:
            raise ValueError(f"unknown generation backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
        was_training = model.training
        model.eval()
        try:
            response, logprobs = BACKENDS[backend](model, ids, mask, max_new_tokens, eos_token_id, pad_token_id,
                                                   temperature, top_k, top_p, generator)
        finally:
            model.train(was_training)
    mask_out, has_eos = response_mask(response, eos_token_id)
    response = response.masked_fill(mask_out == 0, pad_token_id)
    logprobs = logprobs.float() * mask_out if return_logprobs else None
    return Rollout(ids, mask, response, mask_out, has_eos, logprobs)
