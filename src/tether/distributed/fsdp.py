"""FSDP2 sharded training: the engine's `train_shard=fsdp2` (torch's own `fully_shard`, nothing home-made).

    torchrun --nproc_per_node 2 -m tether.cli sft model=DIR data=demos.jsonl train_shard=fsdp2

Each decoder layer (the classes a Hugging Face model lists in `_no_split_modules`) becomes one FSDP unit and the
root holds the rest (embeddings, final norm, a tied head), so a forward all-gathers one layer at a time and gradients
are reduce-scattered: every process keeps 1/world_size of the parameters, gradients and AdamW state. The
gradient reduction averages over processes exactly as DDP does, so the engine's global-count loss normalisation and
its "×world_size" scaling carry over unchanged (2 processes == 1 process with twice the accumulation).
Checkpoints are sharded (torch.distributed.checkpoint: each rank writes its own shards, a resume reads them back
into the same layout); the saved model is consolidated, a normal HF directory.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMMANDS = ("sft", "grpo")  # the recipes whose FSDP2 runs are tested (tests/test_fsdp.py)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules to shard one by one: instances of the classes the model names in `_no_split_modules`."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """Parameters cast to bf16/fp16 for the forward and backward, gradients reduced and kept in float32."""
    dtype = PARAM_DTYPES.get(precision)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype is not None else None)


def shard(model: torch.nn.Module, precision: str = "no", cpu_offload: bool = False) -> torch.nn.Module:
    """`fully_shard` every decoder layer, then the root; returns the same module, now an FSDPModule."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"train_shard=fsdp2: {type(model).__name__} names no decoder layer in _no_split_modules")
    kwargs = {"mp_policy": mixed_precision_policy(precision),
              "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)  # the root's weights are the first the backward needs
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor parameter (a plain tensor is its own shard)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global gradient norm over every shard (a DTensor reduction), clipped to `max_norm` when it is > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Accumulating micro-batches: reduce-scatter only on the last one (FSDP2's `no_sync`)."""
    model.set_requires_gradient_sync(sync)


def _state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def save_sharded(model, optimizer, path: Path) -> None:
    """Every rank writes its shards of the model and the optimizer state into `path` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer), checkpoint_id=str(path))


def load_sharded(model, optimizer, path: Path) -> None:
    """Read the shards written by `save_sharded` back into the model and the optimizer (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, gathered from every shard (collective; rank 0 receives them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_consolidated(model, state: dict[str, torch.Tensor], path: Path, tokenizer=None) -> Path:
    """A normal HF directory from a gathered state dict; config.json names the model's own class, not FSDP's."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), state_dict=state)
    plain = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = [plain]
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


@contextmanager
def gathered(model):
    """Full weights on every rank for the duration (generation): one all-gather, no resharding between the
    decoding steps, so ranks that stop sampling after different numbers of forwards never wait for each other."""
    if not is_sharded(model):
        yield model
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # as `shard` set them
