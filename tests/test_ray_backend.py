"""backend=ray: the placement plan and its resource check by hand; on a fake two-node cluster
(`ray.cluster_utils.Cluster`) colocated roles land on one node and split roles on two; GRPO with backend=ray and
max_staleness=0 gives the local backend's numbers, and with max_staleness=1 logs the correction."""

import json

import pytest
import torch

from tether.config import ConfigError, load_config
from tether.distributed import placement as P
from tether.recipes import grpo as G
from tether.testing import save_tiny


def test_plans_by_hand():
    together = P.plan("colocate", 1, 2.0, 1.0)
    assert together.bundles == [{"CPU": 2.0, "GPU": 2.0}] and together.strategy == "STRICT_PACK"
    assert together.role_bundle == {"trainer": 0, "rollout": 0}
    assert together.role_resources["trainer"] == {"CPU": 1.0, "GPU": 1.0}  # the node's GPUs, shared in turns
    apart = P.plan("split", 2, 1.0, 1.0)
    assert apart.bundles == [{"CPU": 1.0, "GPU": 1.0}] * 2 and apart.strategy == "STRICT_SPREAD"
    assert apart.role_bundle == {"trainer": 0, "rollout": 1}
    assert P.plan("colocate", 1, 0.0, 1.0).bundles == [{"CPU": 2.0}]  # CPU only: no GPU key at all


def test_missing_resources_are_named_before_anything_is_created():
    gpu = P.plan("colocate", 1, 2.0, 1.0)
    with pytest.raises(ConfigError, match=r"asks for 2 GPU and the cluster has 0 \(ray.cluster_resources\(\)\)"):
        P.check_resources(gpu, {"CPU": 16.0}, [{"CPU": 16.0}])
    with pytest.raises(ConfigError, match="no node has"):  # enough in total, but no single node holds the bundle
        P.check_resources(gpu, {"CPU": 4.0, "GPU": 2.0}, [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}])
    with pytest.raises(ConfigError, match="placement=split needs 2 nodes .* the cluster has 1 node"):
        P.check_resources(P.plan("split", 2, 0.0, 1.0), {"CPU": 8.0}, [{"CPU": 8.0}])
    P.check_resources(P.plan("split", 2, 0.0, 1.0), {"CPU": 2.0}, [{"CPU": 1.0}, {"CPU": 1.0}])  # fits exactly


def test_split_on_one_node_is_a_config_error():
    with pytest.raises(ConfigError, match="key 'placement': split .* nodes >= 2"):
        load_config(G.GRPOConfig, None, {"backend": "ray", "placement": "split", "nodes": 1})


@pytest.mark.slow  # a two-node Ray cluster: ~30 s to start on 2 shared cores
def test_fake_two_node_cluster_places_colocated_together_and_split_apart():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from tether.distributed import ray_backend as R

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    try:
        cluster.wait_for_nodes()
        assert len(R.alive_node_resources(ray)) == 2
        where = {}
        for mode, nodes in (("colocate", 1), ("split", 2)):
            cfg = load_config(G.GRPOConfig, None, {"backend": "ray", "placement": mode, "nodes": nodes,
                                                   "sync_timeout": 60})
            plan, group = R.placement_group_for(cfg, ray)
            actors = {role: ray.remote(R.TrainerActor).options(**R.role_options(plan, group, role)).remote(cfg)
                      for role in P.ROLES}
            where[mode] = {role: R.ray_get(a.node_id.remote(), 60, role) for role, a in actors.items()}
            for a in actors.values():
                ray.kill(a)
            ray.util.remove_placement_group(group)
        assert where["colocate"]["trainer"] == where["colocate"]["rollout"]
        assert where["split"]["trainer"] != where["split"]["rollout"]
        too_big = load_config(G.GRPOConfig, None, {"backend": "ray", "cpus_per_role": 3})
        with pytest.raises(ConfigError, match="asks for 6 CPU and the cluster has 4"):
            R.placement_group_for(too_big, ray)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow  # a local Ray and two actors loading a model: ~1-2 minutes on 2 shared cores
def test_grpo_on_ray_gives_the_local_numbers_and_runs_with_staleness(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.chdir(tmp_path.parent)  # any directory: the actors get the source tree on their path
    save_tiny(tmp_path / "m")
    with open(tmp_path / "p.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"the film was {i}", "answer": i}) + "\n")
    base = {"model": str(tmp_path / "m"), "task": "none", "prompts": str(tmp_path / "p.jsonl"),
            "eval_prompts": str(tmp_path / "p.jsonl"), "reward": "python:tests.test_grpo:length_reward",
            "max_steps": 3, "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 5, "batch_size": 4,
            "progress": False, "lr": 1e-2, "beta": 0.0, "sync_timeout": 120}

    def metrics(name, **kw):
        G.run(load_config(G.GRPOConfig, None, {**base, **kw, "out": str(tmp_path / name)}))
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    try:
        local, remote = metrics("local"), metrics("ray", backend="ray")
        for a, b in zip(local, remote):  # same seeds, same weights after every push: the same numbers
            for key in ("score", "grad_norm", "clipfrac", "length"):
                assert a[key] == pytest.approx(b[key], abs=1e-6), key
        stale = metrics("ray_stale", backend="ray", max_staleness=1)
        assert [x["version_lag"] for x in stale] == [0, 1, 1]
        assert all("ess_fraction" in x and "weight_mean" in x and "clipped_share" in x for x in stale)
    finally:
        ray.shutdown()


@pytest.mark.slow  # a local Ray and two actors loading a model: ~1-2 minutes on 2 shared cores
def test_ppo_on_ray_gives_the_local_numbers(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import ray

    from tether.recipes import ppo as PPO

    monkeypatch.chdir(tmp_path.parent)
    save_tiny(tmp_path / "m")
    with open(tmp_path / "p.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"the film was {i}"}) + "\n")
    base = {"model": str(tmp_path / "m"), "prompts": str(tmp_path / "p.jsonl"),
            "eval_prompts": str(tmp_path / "p.jsonl"), "reward": "python:tests.test_grpo:length_reward",
            "max_steps": 3, "rollout_batch": 4, "num_minibatches": 2, "batch_size": 2, "ppo_epochs": 2,
            "max_new_tokens": 5, "eval_samples": 1, "progress": False, "lr": 1e-3, "sync_timeout": 120}

    def metrics(name, **kw):
        PPO.run(load_config(PPO.PPOConfig, None, {**base, **kw, "out": str(tmp_path / name)}))
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    try:
        local, remote = metrics("local"), metrics("ray", backend="ray")
        assert len(local) == len(remote) == 3
        for a, b in zip(local, remote):  # the same prompts, draws and weights after every push: the same numbers
            for key in ("reward", "kl", "grad_norm", "pg_loss", "vf_loss", "clipfrac", "response_length"):
                assert a[key] == pytest.approx(b[key], abs=1e-6), key
    finally:
        ray.shutdown()


def test_ppo_offers_placement_and_vllm_but_not_stale_rollouts():
    """PPO samples on-policy: the placement keys and generation_backend exist, max_staleness does not; vLLM samples in
    this process only (not with backend=ray), as in GRPO; a LoRA policy is pushed merged."""
    from tether.recipes import ppo as PPO

    base = {"model": "m", "reward": "format", "task": "reviews"}
    assert load_config(PPO.PPOConfig, None, {**base, "backend": "ray", "sync_timeout": 5}).backend == "ray"
    assert load_config(PPO.PPOConfig, None, {**base, "generation_backend": "vllm"}).generation_backend == "vllm"
    with pytest.raises(ConfigError, match="max_staleness"):
        load_config(PPO.PPOConfig, None, {**base, "max_staleness": 1})
    with pytest.raises(ConfigError, match="generation_backend"):
        load_config(PPO.PPOConfig, None, {**base, "generation_backend": "vllm", "backend": "ray"})
    assert load_config(PPO.PPOConfig, None, {**base, "generation_backend": "vllm", "lora_r": 8}).lora_r == 8


def test_vllm_sleep_needs_vllm_and_a_cuda_gpu():
    base = {"model": "m", "task": "arithmetic"}
    with pytest.raises(ConfigError, match="vllm_sleep': only with generation_backend=vllm"):
        load_config(G.GRPOConfig, None, {**base, "vllm_sleep": True})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="vllm_sleep': vLLM's sleep mode needs a CUDA GPU"):
            load_config(G.GRPOConfig, None, {**base, "vllm_sleep": True, "generation_backend": "vllm"})
