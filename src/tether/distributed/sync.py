"""Trainer-to-rollout-engine weight sync that cannot hang.

    group = SyncGroup(host, port, rank, world_size, timeout_s)  # rank 0: the trainer's rank 0; 1..: rollout engines
    push_weights(engine, group, named_full_weights(model), bucket_mb)     # trainer: pause, send, resume (finally)
    receive_weights(group, model, bucket_mb)                              # each engine: the same buckets, received

The hangs users report (a rank gathering in another order, one side waiting for a transfer the other never posted,
a collective with no timeout, an engine left paused after a failed push) are closed one by one:
- every rank plans the same buckets from names sorted the same way (`plan_buckets`), and FSDP2 shards are gathered
  in that order on every trainer rank (`named_full_weights`);
- a header (bucket count, element count) is compared first, so a receiver holding another model fails at once;
- every bucket's broadcast is posted before any is awaited, on both sides;
- the group is torch's own gloo group (`ProcessGroupGloo` over a `TCPStore`, separate from the training group) and
  the rendezvous and every wait carry `timeout_s`: a receiver that never joins raises `SyncTimeout` after it;
- the engine is paused for the push and resumed in a `finally`, so a failed push never leaves it paused.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist


class SyncTimeout(RuntimeError):
    """A weight push or receive did not complete within `sync_timeout` seconds."""


def plan_buckets(sizes: list[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """Names grouped into buckets of at most `bucket_bytes` (a tensor larger than that is a bucket of its own), in
    the order given, which every rank takes as sorted by name. sizes: [(name, bytes)]."""
    buckets: list[list[str]] = []
    used = bucket_bytes  # forces a new bucket for the first tensor
    for name, nbytes in sizes:
        if used + nbytes > bucket_bytes or not buckets:
            buckets.append([])
            used = 0
        buckets[-1].append(name)
        used += nbytes
    return buckets


def named_full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) in sorted-name order; FSDP2 shards are all-gathered, every trainer rank calling this
    in the same order (a rank that skips or reorders one would wait forever on the others)."""
    state = model.state_dict()
    for name in sorted(state):
        value = state[name]
        yield name, (value.full_tensor() if hasattr(value, "full_tensor") else value).detach()


def named_merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights a plain HF model of the same architecture loads: for a LoRA (peft) policy, each adapted layer's
    base weight plus its active adapters' delta (peft's `get_delta_weight`: scaling · B @ A), under the base model's
    own names, with the model left untouched (merging in place and back would drift by the rounding each step);
    any other model as `named_full_weights`."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        yield from named_full_weights(model)
        return
    prefix, deltas = "base_model.model.", {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in module.active_adapters)
    state = model.state_dict()
    for key in sorted(state):
        if ".lora_" in key:
            continue
        value = state[key].detach()
        if key in deltas:
            value = value + deltas[key].detach().to(value.dtype)
        yield key.removeprefix(prefix).replace(".base_layer.", "."), value


class SyncGroup:
    """A gloo group of its own for weight pushes: rank 0 sends, ranks 1.. receive. Joining waits at most `timeout_s`
    for every member (then SyncTimeout names the ranks that never came)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout = rank, world_size, timedelta(seconds=timeout_s)
        try:
            store = dist.TCPStore(host, port, world_size, rank == 0, timeout=self.timeout, wait_for_workers=False)
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore("tether-sync", store), rank, world_size, self.timeout)
        except (RuntimeError, dist.DistStoreError) as e:
            raise SyncTimeout(f"weight-sync group {host}:{port}: not every one of {world_size} members joined "
                              f"within sync_timeout={timeout_s:g}s ({str(e).splitlines()[0]})") from e

    def broadcast_all(self, tensors: list[torch.Tensor]) -> None:
        """Post a broadcast from rank 0 of every tensor, then wait for each within what is left of the timeout."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        works = [self.pg.broadcast([t], opts) for t in tensors]  # all posted before any is awaited
        for i, work in enumerate(works):
            left = max(0.001, deadline - time.monotonic())
            try:
                work.wait(timedelta(seconds=left))
            except RuntimeError as e:
                raise SyncTimeout(f"weight sync: bucket {i + 1}/{len(works)} not completed within sync_timeout="
                                  f"{self.timeout.total_seconds():g}s ({str(e).splitlines()[0]})") from e


def _bucket_plan(named: list[tuple[str, torch.Tensor]], bucket_mb: float) -> list[list[int]]:
    sizes = [(str(i), t.numel() * t.element_size()) for i, (_, t) in enumerate(named)]
    return [[int(i) for i in bucket] for bucket in plan_buckets(sizes, int(bucket_mb * 2**20))]


def _header(named: list[tuple[str, torch.Tensor]], plan: list[list[int]]) -> torch.Tensor:
    return torch.tensor([len(plan), sum(t.numel() for _, t in named)], dtype=torch.int64)


def send_weights(group: SyncGroup, weights: Iterable[tuple[str, torch.Tensor]], bucket_mb: float) -> int:
    """Rank 0: the header, then one flat float32 tensor per bucket; returns the bytes sent."""
    named = [(n, t.detach().to("cpu", torch.float32)) for n, t in weights]
    plan = _bucket_plan(named, bucket_mb)
    header = _header(named, plan)
    group.broadcast_all([header])
    flats = [torch.cat([named[i][1].reshape(-1) for i in bucket]) for bucket in plan]
    group.broadcast_all(flats)
    return sum(f.numel() * 4 for f in flats)


def receive_weights(group: SyncGroup, model: torch.nn.Module, bucket_mb: float) -> None:
    """Ranks 1..: receive the buckets planned from this model's own (sorted) weights and copy them in."""
    state = model.state_dict()
    named = [(name, state[name]) for name in sorted(state)]
    plan = _bucket_plan(named, bucket_mb)
    header = torch.zeros(2, dtype=torch.int64)
    group.broadcast_all([header])
    if not torch.equal(header, _header(named, plan)):
        raise ValueError(f"weight sync: the trainer sends {header.tolist()} (buckets, elements), this engine's "
                         f"model has {_header(named, plan).tolist()}: not the same model")
    flats = [torch.empty(sum(named[i][1].numel() for i in bucket)) for bucket in plan]
    group.broadcast_all(flats)
    with torch.no_grad():
        for bucket, flat in zip(plan, flats):
            for i, piece in zip(bucket, flat.split([named[i][1].numel() for i in bucket])):
                named[i][1].copy_(piece.view_as(named[i][1]))


def push_weights(engine, group: SyncGroup, weights: Iterable[tuple[str, torch.Tensor]], bucket_mb: float) -> int:
    """Pause the rollout engine, send the weights, resume it whatever happened (a failed push raises after it)."""
    engine.pause()
    try:
        return send_weights(group, weights, bucket_mb)
    finally:
        engine.resume()


def ray_get(refs, timeout_s: float, what: str):
    """`ray.get` with a timeout: an actor that died or hangs raises SyncTimeout naming `what`, never waits forever."""
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        raise SyncTimeout(f"{what}: no answer within {timeout_s:g}s") from e
