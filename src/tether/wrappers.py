"""A model as the recipes hold it: a Hugging Face model, perhaps under LoRA adapters (peft) and a DDP wrapper.

    hf = hf_model(model)               # the transformers model under DDP's `.module` and peft's wrapper
    config = model_config(model)       # its config (None for a module that has none)
    with disabled_adapters(policy):    # the LoRA policy's base weights: the shared reference policy
        ...

The layers above (packing, forward, generation, models) need these facts about a model and nothing else from each
other, so they live here, importing nothing of tether.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch


def has_adapters(model) -> bool:
    """Whether `model` is a peft model (LoRA adapters that can be switched off)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class AdaptersOff(torch.nn.Module):
    """A module whose forward runs `model` with its LoRA adapters disabled: the shared reference as a model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with disabled_adapters(self.model):
            return self.model(*args, **kwargs)


class InPrecision(torch.nn.Module):
    """A module whose forward runs `model` under autocast to `dtype` (bf16 or fp16; None: as it is), as accelerate
    runs the prepared policy: a frozen reference computed in the policy's precision, so that while policy ==
    reference their log-probs agree to the last digit and the KL is 0, not the rounding of bf16."""

    def __init__(self, model, dtype: torch.dtype | None):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, *args, **kwargs):
        with autocast_to(self.dtype, next(self.model.parameters()).device.type):
            return self.model(*args, **kwargs)


def autocast_to(dtype: torch.dtype | None, device_type: str):
    """torch.autocast to `dtype` on `device_type`, or a no-op context for None (fp32 training)."""
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def hf_model(model):
    """The transformers model: DDP's `.module` unwrapped, `AdaptersOff`'s and `InPrecision`'s model, and a peft
    model's base model."""
    model = getattr(model, "module", model)
    while isinstance(model, (AdaptersOff, InPrecision)):
        model = model.model
    return model.get_base_model() if has_adapters(model) else model


def model_config(model):
    """The config of the transformers model under the wrappers; None for a module that has none."""
    return getattr(hf_model(model), "config", None)


@contextmanager
def disabled_adapters(model):
    """Run the LoRA base model with adapters off (the reference policy sharing the policy's base weights)."""
    ctx = model.disable_adapter() if has_adapters(model) else nullcontext()
    with ctx:
        yield model
