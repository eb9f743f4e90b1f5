"""Where the roles of a run go: the config keys of scale-out and the Ray placement plan, checked before anything
is created (an infeasible placement group would otherwise wait forever).

    placement=colocate   trainer and rollout engine share one bundle on one node (they take turns on its GPUs)
    placement=split      trainer and rollout engine in bundles on different nodes (STRICT_SPREAD)

`plan` and `check_resources` are pure: they take the numbers and the cluster's resources (`ray.cluster_resources()`,
`ray.nodes()`) and say what is missing by name; ray_backend.py turns a plan into placement groups and actors.
"""

from __future__ import annotations

from dataclasses import dataclass

from tether.config import ConfigError, above, at_least, one_of, opt
from tether.engine import Fields
from tether.losses import OFF_POLICY_WEIGHTS


@dataclass
class PlacementFields(Fields):
    """Where a recipe's roles run (PPO, GRPO): the local backend, or Ray actors in placement groups."""

    backend: str = opt("local", "where the roles run: local (this process, torchrun for more) or ray (trainer and "
                                "rollout engine as Ray actors in placement groups)", check=one_of("local", "ray"))
    placement: str = opt("colocate", "backend=ray: colocate (roles share a node) or split (roles on different nodes)",
                         check=one_of("colocate", "split"))
    nodes: int = opt(1, "backend=ray: nodes the roles spread over (split needs 2)", check=at_least(1))
    gpus_per_node: float = opt(0.0, "backend=ray: GPUs each node gives the roles (0 = CPU only)", check=at_least(0))
    cpus_per_role: float = opt(1.0, "backend=ray: CPUs each role (trainer, rollout engine) reserves", check=above(0))
    ray_address: str = opt("", "backend=ray: an existing cluster to join (ray://host:10001 or auto; empty = start "
                               "one on this machine)")
    sync_bucket_mb: float = opt(64.0, "weight sync: bucket size in MiB (one message per bucket)", check=above(0))
    sync_timeout: float = opt(300.0, "weight sync and every call to a Ray actor: seconds before it fails "
                                     "(never waits forever)", check=above(0))

    def validate(self) -> None:
        super().validate()
        if self.backend == "ray" and self.placement == "split" and self.nodes < 2:
            raise ConfigError("key 'placement': split puts the roles on different nodes and needs nodes >= 2 "
                              f"(nodes={self.nodes})")


@dataclass
class SamplerFields(Fields):
    """Who samples a recipe's responses (PPO, GRPO, online DPO, best-of-N)."""

    generation_backend: str = opt("tether", "who samples the responses: tether (its own sampler over the policy) "
                                            "or vllm (an engine built once, weights pushed after every update: "
                                            "generation/vllm.py, installed apart: make test-vllm)",
                                  check=one_of("tether", "vllm"))
    vllm_sleep: bool = opt(False, "generation_backend=vllm on a GPU shared with the trainer: the engine sleeps while "
                                  "the trainer trains (vLLM sleep level 1: weights to CPU memory, KV cache freed) "
                                  "and wakes to take the new weights; CUDA only")

    def validate(self) -> None:
        super().validate()
        if self.vllm_sleep and self.generation_backend != "vllm":
            raise ConfigError("key 'vllm_sleep': only with generation_backend=vllm")
        if self.vllm_sleep:
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("key 'vllm_sleep': vLLM's sleep mode needs a CUDA GPU, and this machine has none")
        if self.generation_backend == "vllm" and getattr(self, "backend", "local") == "ray":
            raise ConfigError("key 'generation_backend': vllm samples in this process (backend=local) for now; "
                              "backend=ray samples with tether's sampler")


@dataclass
class ScaleFields(PlacementFields, SamplerFields):
    """Placement, who samples, and how stale a rollout may be (GRPO)."""

    max_staleness: int = opt(0, "rollouts may come from weights up to N optimizer steps old (0 = on-policy: sample, "
                                "then train)", check=at_least(0))
    off_policy_correction: str = opt("tis", "correction of stale rollouts (max_staleness > 0): none | tis | icepop | "
                                            "seq_mask | decoupled (losses.OFF_POLICY_WEIGHTS)",
                                     check=one_of("none", *sorted(OFF_POLICY_WEIGHTS)))
    off_policy_cap: float = opt(2.0, "C of the correction: TIS cap, ICEPOP band [1/C, C], sequence bound log C",
                                check=above(1))


ROLES = ("trainer", "rollout")


@dataclass(frozen=True)
class Plan:
    bundles: list[dict[str, float]]  # one resource dict per bundle
    strategy: str  # Ray placement strategy: STRICT_PACK (together) or STRICT_SPREAD (one bundle per node)
    role_bundle: dict[str, int]  # role -> the bundle it is scheduled in
    role_resources: dict[str, dict[str, float]]  # role -> what its actor asks for inside the bundle


def plan(placement: str, nodes: int, gpus_per_node: float, cpus_per_role: float) -> Plan:
    """colocate: one bundle holding both roles, GPUs split evenly between them; split: one bundle per role, each
    with a node's GPUs, spread so no two share a node."""
    if placement == "colocate":
        per_role = {"CPU": cpus_per_role, **({"GPU": gpus_per_node / 2} if gpus_per_node else {})}
        bundle = {"CPU": 2 * cpus_per_role, **({"GPU": gpus_per_node} if gpus_per_node else {})}
        return Plan([bundle], "STRICT_PACK", {r: 0 for r in ROLES}, {r: per_role for r in ROLES})
    per_role = {"CPU": cpus_per_role, **({"GPU": gpus_per_node} if gpus_per_node else {})}
    return Plan([dict(per_role) for _ in ROLES], "STRICT_SPREAD", {r: i for i, r in enumerate(ROLES)},
                {r: per_role for r in ROLES})


def check_resources(p: Plan, cluster: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """Fail, naming the missing resource, when the cluster cannot hold the plan: the totals against
    `ray.cluster_resources()`, then each bundle against the nodes (`ray.nodes()`' alive Resources), one node per
    bundle for STRICT_SPREAD."""
    need: dict[str, float] = {}
    for bundle in p.bundles:
        for key, value in bundle.items():
            need[key] = need.get(key, 0.0) + value
    for key, value in need.items():
        if cluster.get(key, 0.0) < value:
            raise ConfigError(f"backend=ray: the placement asks for {value:g} {key} and the cluster has "
                              f"{cluster.get(key, 0.0):g} (ray.cluster_resources()); lower gpus_per_node / "
                              f"cpus_per_role or add nodes")
    fits = [[all(node.get(k, 0.0) >= v for k, v in bundle.items()) for node in nodes] for bundle in p.bundles]
    for i, row in enumerate(fits):
        if not any(row):
            raise ConfigError(f"backend=ray: no node has {p.bundles[i]} for one bundle (ray.nodes())")
    if p.strategy == "STRICT_SPREAD" and sum(any(f[j] for f in fits) for j in range(len(nodes))) < len(p.bundles):
        raise ConfigError(f"backend=ray: placement=split needs {len(p.bundles)} nodes that each hold "
                          f"{p.bundles[0]}; the cluster has {len(nodes)} node(s)")
