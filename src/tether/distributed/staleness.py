"""Asynchronous rollouts bounded by staleness: `max_staleness=k` lets a batch be sampled by weights up to k optimizer
steps older than the ones that train on it (0 = today's on-policy loop: sample, then train, nothing ahead).

    queue = RolloutQueue(max_staleness, producer)          # producer: produce(step) -> handle, collect(handle)
    for step in range(start, total):
        batch = queue.next(step, version=step)           # tops up to k+1 batches with the current weights
        ...train on batch.payload, corrected by importance weights when batch.version < step (losses.py)...
        producer.load_weights(model, step + 1)            # a remote engine receives them; a local one shares them

The queue is filled in step order with the weights of the moment, so with k = 1 batch s+1 is sampled (on a remote
engine: while step s trains) by version s and trained on at step s+1: the schedule of AReaL / PipelineRL's
one-step-off pipeline. A batch older than k versions is refused, never trained on. With a local producer the
batches are sampled in the same process one after the other: the numbers of the asynchronous schedule, no overlap.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Batch:
    step: int  # the optimizer step this batch was sampled for
    version: int  # the weight version (optimizer steps taken) that sampled it
    payload: Any


class RolloutQueue:
    def __init__(self, max_staleness: int, producer, end: int | None = None):
        self.max_staleness, self.producer, self.end = max_staleness, producer, end  # no batch for step >= end
        self.pending: deque[tuple[int, int, Any]] = deque()  # (step, version, handle)
        self.next_step: int | None = None

    def next(self, step: int, version: int) -> Batch:
        """The batch of `step`: sampled earlier (at most max_staleness versions ago) or now."""
        if self.next_step is None:
            self.next_step = step
        while len(self.pending) < self.max_staleness + 1 and (self.end is None or self.next_step < self.end):
            self.pending.append((self.next_step, version, self.producer.produce(self.next_step)))
            self.next_step += 1
        at, sampled_by, handle = self.pending.popleft()
        payload = self.producer.collect(handle)
        if at != step or version - sampled_by > self.max_staleness:
            raise RuntimeError(f"rollout queue: batch of step {at} sampled by version {sampled_by} cannot train "
                               f"step {step} at version {version} (max_staleness={self.max_staleness})")
        return Batch(at, sampled_by, payload)


class EngineProducer:
    """Rollouts from a generation engine of this process that holds weights of its own (vLLM): the recipe's rollout
    function run over the engine, the trainer's weights pushed into it after every optimizer step."""

    def __init__(self, sampler, produce: Callable[[Any, int], Any]):
        self.sampler, self._produce = sampler, produce

    def produce(self, step: int) -> Any:
        out = self._produce(self.sampler, step)
        self.sampler.sleep()  # sleep_mode: training gets the GPU's memory until the next sample or push
        return out

    def collect(self, handle: Any) -> Any:
        return handle

    def load_weights(self, model, version: int) -> None:
        from tether.distributed.sync import named_merged_weights

        self.sampler.push(named_merged_weights(model), version)  # a LoRA policy: its adapters merged in


class LocalProducer:
    """Rollouts sampled in this process by the policy being trained (its weights are shared: nothing to push)."""

    def __init__(self, produce: Callable[[int], Any]):
        self._produce = produce

    def produce(self, step: int) -> Any:
        return self._produce(step)

    def collect(self, handle: Any) -> Any:
        return handle

    def load_weights(self, model, version: int) -> None:
        pass
