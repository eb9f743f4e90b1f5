"""`backend=ray`: the roles of an RL recipe as Ray actors in placement groups (Ray's own scheduler, nothing
home-made).

    tether grpo task=arithmetic backend=ray                                   # a local Ray on this machine
    tether ppo model=runs/sft/model reward=rm:runs/rm task=reviews backend=ray  # PPO: the same, on-policy
    tether grpo task=arithmetic backend=ray placement=split nodes=2 gpus_per_node=1 ray_address=auto

`launch(cfg, train, make_side)`: Ray is started (or joined at `ray_address`), the plan of placement.py is checked
against `ray.cluster_resources()` and `ray.nodes()` (a missing resource is named before any group is made), one
placement group is created and awaited with `sync_timeout`, then
- the rollout engine: a `RolloutWorker` actor building the recipe's rollout side (policy copy, rewards, prompts);
- the trainer: a `TrainerActor` running the recipe's own `train(cfg, producer)`, the loop of the local backend,
  with a `RayProducer` in place of the local one;
the two open their weight-sync group together (both calls posted, then awaited with a timeout), and after each
optimizer step the trainer pushes its weights in buckets (sync.py). Every `ray.get` carries a timeout.
What runs where: the reward functions run beside the rollout engine, the reference policy beside the trainer.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

from tether.distributed import placement
from tether.distributed.rollout import RolloutWorker
from tether.distributed.sync import SyncGroup, SyncTimeout, named_full_weights, push_weights, ray_get


class RayProducer:
    """The queue's producer over a remote rollout engine: produce is a remote call (a future), collect awaits it."""

    def __init__(self, actor, group: SyncGroup, cfg):
        self.actor, self.group, self.cfg = actor, group, cfg
        self.sync_seconds = 0.0

    def produce(self, step: int):
        return self.actor.produce.remote(step)

    def collect(self, ref):
        return ray_get(ref, self.cfg.sync_timeout, "rollout engine (produce)")

    def pause(self) -> None:  # the remote engine pauses itself around its receive (RolloutWorker.receive)
        pass

    def resume(self) -> None:
        pass

    def load_weights(self, model, version: int) -> None:
        """Push `model`'s weights: the engine's receive is posted first, then the buckets sent, then it is awaited."""
        t0 = time.perf_counter()
        ref = self.actor.receive.remote(version)
        try:
            push_weights(self, self.group, named_full_weights(model), self.cfg.sync_bucket_mb)
        except SyncTimeout:
            ray_get(ref, self.cfg.sync_timeout, "rollout engine (receive after a failed push)")
            raise
        got = ray_get(ref, self.cfg.sync_timeout, "rollout engine (receive)")
        if got != version:
            raise RuntimeError(f"weight sync: the rollout engine holds version {got}, the trainer sent {version}")
        self.sync_seconds += time.perf_counter() - t0


class TrainerActor:
    def __init__(self, cfg):
        import torch

        torch.set_num_threads(max(1, int(cfg.cpus_per_role)))
        self.group = None

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def sync_address(self) -> tuple[str, int]:
        """This node's address and a free port on it: where the weight-sync group's store listens."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def open_sync(self, host: str, port: int, timeout_s: float) -> None:
        self.group = SyncGroup(host, port, 0, 2, timeout_s)

    def run(self, train, cfg, rollout_actor):
        return train(cfg, RayProducer(rollout_actor, self.group, cfg))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def start_ray(cfg):
    """Join `ray_address`, or start a local Ray whose workers import what this process imports (its sys.path: a
    `python:module:fn` reward resolves the same there) and use one thread each."""
    import ray

    if not ray.is_initialized():
        path = dict.fromkeys(p for p in (os.getcwd(), *sys.path, os.environ.get("PYTHONPATH", "")) if p)
        env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
        ray.init(address=cfg.ray_address or None, runtime_env={"env_vars": env}, log_to_driver=False,
                 include_dashboard=False)
    return ray


def alive_node_resources(ray) -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def placement_group_for(cfg, ray):
    """The plan checked against the cluster, then its placement group, ready within `sync_timeout`."""
    from ray.util.placement_group import placement_group

    p = placement.plan(cfg.placement, cfg.nodes, cfg.gpus_per_node, cfg.cpus_per_role)
    placement.check_resources(p, ray.cluster_resources(), alive_node_resources(ray))
    group = placement_group(p.bundles, strategy=p.strategy)
    ray_get(group.ready(), cfg.sync_timeout, f"placement group {p.bundles} ({p.strategy})")
    return p, group


def role_options(p, group, role: str) -> dict:
    """`.options(...)` that schedule `role`'s actor in its bundle of the placement group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    res = p.role_resources[role]
    return {"num_cpus": res["CPU"], "num_gpus": res.get("GPU", 0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=p.role_bundle[role])}


def launch(cfg, train, make_side, name: str = "grpo") -> dict:
    """Run `train(cfg, producer)` in a trainer actor with a remote rollout engine built by `make_side(cfg)`."""
    ray = start_ray(cfg)
    cfg.out = str(Path(cfg.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve())
    p, group = placement_group_for(cfg, ray)
    rollout = ray.remote(RolloutWorker).options(**role_options(p, group, "rollout")).remote(make_side, cfg)
    trainer = ray.remote(TrainerActor).options(**role_options(p, group, "trainer")).remote(cfg)
    host, port = ray_get(trainer.sync_address.remote(), cfg.sync_timeout, "trainer (address)")
    opened = [trainer.open_sync.remote(host, port, cfg.sync_timeout),
              rollout.open_sync.remote(host, port, cfg.sync_timeout)]  # both posted, then awaited
    ray_get(opened, 2 * cfg.sync_timeout, "weight-sync group (trainer and rollout engine)")
    try:
        done = trainer.run.remote(train, cfg, rollout)
        while True:  # the run itself has no deadline; an actor that dies raises here instead of hanging
            ready, _ = ray.wait([done], timeout=cfg.sync_timeout)
            if ready:
                return ray.get(ready[0])
    finally:
        for actor in (trainer, rollout):
            ray.kill(actor)
        ray.util.remove_placement_group(group)
