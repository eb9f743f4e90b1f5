"""A rollout engine in a process of its own (a Ray actor): tether's sampler over its own copy of the policy.

    worker = RolloutWorker(make_side, cfg)      # make_side(cfg) -> an object with .model and .produce(step)
    worker.open_sync(host, port, timeout_s)     # rank 1 of the trainer's weight-sync group
    worker.produce(step)                        # the recipe's own rollout function, run here
    worker.receive(version)                     # paused, new weights received in buckets, resumed (finally)

The recipe supplies `make_side`, so the rollout, reward and prompt functions are the local backend's. Calls to an
actor run one at a time, in the order they were made: a `receive` posted after a `produce` waits for it, so a batch
is always sampled by one weight version, the one `version` says.
"""

from __future__ import annotations

import torch

from tether.distributed.sync import SyncGroup, receive_weights


class RolloutWorker:
    def __init__(self, make_side, cfg):
        torch.set_num_threads(max(1, int(getattr(cfg, "cpus_per_role", 1))))
        self.side, self.cfg = make_side(cfg), cfg
        self.version, self.paused, self.group = 0, False, None

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def open_sync(self, host: str, port: int, timeout_s: float) -> None:
        self.group = SyncGroup(host, port, 1, 2, timeout_s)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def produce(self, step: int):
        if self.paused:
            raise RuntimeError("rollout engine is paused: weights are being pushed")
        return self.side.produce(step)

    def receive(self, version: int) -> int:
        """New weights from the trainer; the engine is resumed however the receive ends."""
        self.pause()
        try:
            receive_weights(self.group, self.side.model, self.cfg.sync_bucket_mb)
            self.version = version
        finally:
            self.resume()
        return self.version
