"""The reference policy πref of every recipe: built one way, used by PPO, GRPO, DPO (held-out KL) and online DPO.

    reference = ReferencePolicy(policy, share=True, dtype=engine.autocast_dtype)   # a frozen copy, or the LoRA base
    ref_logprobs = reference.logprobs(sequences, mask, prompt_len, temperature)   # (B, T) response tokens
    evaluate_policy(..., ref_model=reference.model)   # a model like any other

Without LoRA it is a frozen, eval-mode copy of the starting policy. With LoRA adapters and `share` it is the
policy's own base weights with the adapters switched off (`wrappers.AdaptersOff`), so one copy of the base weights
serves both (docs/reference.md §PPO: "with LoRA the reference is the base with adapters disabled"). It runs in
the precision the policy trains in (`dtype`: bf16 autocast under mixed_precision=bf16, None for fp32), so that at
step 0 the KL is exactly 0 and DPO's loss exactly ln 2, whatever the machine chose.
"""

from __future__ import annotations

import torch

from tether.forward import response_outputs
from tether.models import frozen_copy
from tether.wrappers import AdaptersOff, InPrecision, has_adapters


class ReferencePolicy:
    def __init__(self, policy, share: bool = True, dtype: torch.dtype | None = None):
        self.shared = share and has_adapters(policy)
        self.model = InPrecision(AdaptersOff(policy) if self.shared else frozen_copy(policy), dtype)

    @torch.no_grad()
    def logprobs(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                 temperature: float = 1.0, padding_free: bool = True) -> torch.Tensor:
        """(B, T) log-probs of the response tokens under πref (logits / T), rows with one prompt sharing it."""
        return response_outputs(self.model, sequences, attention_mask, prompt_len, temperature,
                                padding_free=padding_free).logprobs
