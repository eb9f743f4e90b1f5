"""Weight sync that cannot hang (distributed/sync.py): buckets by hand, a push between two members of a real gloo
group (threads of this process), and the failures: a member that never joins, a receiver that joined but never
posts its side, a trainer that never sends; each raises within sync_timeout and leaves the engine resumed."""

import json
import socket
import threading
import time

import pytest
import torch

from tether.config import load_config
from tether.distributed.rollout import RolloutWorker
from tether.distributed.sync import (
    SyncGroup,
    SyncTimeout,
    named_full_weights,
    plan_buckets,
    push_weights,
    receive_weights,
    send_weights,
)
from tether.recipes import grpo as G
from tether.testing import save_tiny, tiny_causal_lm, tiny_tokenizer

MB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_buckets_by_hand():
    sizes = [("a", 3 * MB), ("b", 2 * MB), ("c", MB + MB // 2), ("d", 9 * MB), ("e", 1)]
    # a (3) alone: 3 + 2 > 4; b + c = 3.5 <= 4; d (9) is larger than a bucket: its own; e starts a new one
    assert plan_buckets(sizes, 4 * MB) == [["a"], ["b", "c"], ["d"], ["e"]]
    assert plan_buckets(sizes, 100 * MB) == [["a", "b", "c", "d", "e"]]
    assert plan_buckets([], MB) == []


def in_thread(fn, *args):
    out = {}

    def body():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    th = threading.Thread(target=body, daemon=True)
    th.start()
    return th, out


@pytest.fixture()
def worker(tmp_path):
    """A real rollout engine: GRPO's RolloutSide over a tiny model, as a Ray actor would hold it."""
    save_tiny(tmp_path / "m", seed=1)
    with open(tmp_path / "p.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"the film was {i}", "answer": i}) + "\n")
    cfg = load_config(G.GRPOConfig, None, {
        "model": str(tmp_path / "m"), "task": "none", "prompts": str(tmp_path / "p.jsonl"),
        "eval_prompts": str(tmp_path / "p.jsonl"), "reward": "python:tests.test_grpo:length_reward",
        "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, "sync_bucket_mb": 0.01, "sync_timeout": 2})
    return RolloutWorker(G.RolloutSide, cfg)


def test_push_in_buckets_makes_the_engine_equal_the_trainer(worker):
    trainer = tiny_causal_lm(tiny_tokenizer(), seed=0)  # other weights than the engine's (seed 1)
    assert not all(torch.equal(a, b) for a, b in zip(trainer.state_dict().values(),
                                                     worker.side.model.state_dict().values()))
    port = free_port()
    th, out = in_thread(lambda: (worker.open_sync("127.0.0.1", port, 5), worker.receive(7))[1])
    group = SyncGroup("127.0.0.1", port, 0, 2, 5)
    sent = push_weights(worker, group, named_full_weights(trainer), bucket_mb=0.01)
    th.join(10)
    assert out == {"value": 7} and worker.version == 7 and not worker.paused
    state = worker.side.model.state_dict()
    for name, value in trainer.state_dict().items():
        assert torch.equal(state[name], value), name
    n_params = sum(v.numel() for v in trainer.state_dict().values())
    assert sent == 4 * n_params and n_params * 4 > 0.01 * 2**20  # several buckets of 10 KiB
    assert worker.produce(0)[1] is not None  # the engine samples after the push


def test_a_member_that_never_joins_fails_within_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(SyncTimeout, match="not every one of 2 members joined within sync_timeout=1s"):
        SyncGroup("127.0.0.1", free_port(), 0, 2, 1.0)
    assert time.monotonic() - t0 < 5


def test_a_receiver_that_never_posts_makes_the_push_raise_and_the_engine_resumes(worker):
    port = free_port()
    th, joined = in_thread(lambda: SyncGroup("127.0.0.1", port, 1, 2, 2.0))  # joins, then never receives
    group = SyncGroup("127.0.0.1", port, 0, 2, 2.0)
    th.join(10)
    trainer = tiny_causal_lm(tiny_tokenizer(), seed=0)
    t0 = time.monotonic()
    with pytest.raises(SyncTimeout, match="not completed within sync_timeout=2s"):
        push_weights(worker, group, named_full_weights(trainer), bucket_mb=0.01)
    assert time.monotonic() - t0 < 2.0 + 3.0
    assert not worker.paused and worker.produce(0)[1] is not None  # resumed, and it still samples
    assert "value" in joined  # the receiver's group stayed open the whole time: a real hang, not a closed socket


def test_a_trainer_that_never_sends_makes_the_receive_raise_and_the_engine_resumes(worker):
    port = free_port()
    th, out = in_thread(lambda: SyncGroup("127.0.0.1", port, 0, 2, 2.0))
    worker.open_sync("127.0.0.1", port, 2.0)
    th.join(10)
    before = {k: v.clone() for k, v in worker.side.model.state_dict().items()}
    with pytest.raises(SyncTimeout):
        worker.receive(1)
    assert not worker.paused and worker.version == 0  # resumed, still on the weights it had
    assert all(torch.equal(before[k], v) for k, v in worker.side.model.state_dict().items())


def test_a_receiver_with_another_model_is_refused_by_the_header():
    port = free_port()
    small = tiny_causal_lm(tiny_tokenizer(), seed=0)
    big = tiny_causal_lm(tiny_tokenizer(), seed=0, hidden=64)
    th, out = in_thread(lambda: receive_weights(SyncGroup("127.0.0.1", port, 1, 2, 5), big, 1.0))
    group = SyncGroup("127.0.0.1", port, 0, 2, 5)
    with pytest.raises(SyncTimeout):  # the receiver stops after the header: the buckets are never received
        send_weights(group, named_full_weights(small), 1.0)
    th.join(10)
    assert isinstance(out.get("error"), ValueError) and "not the same model" in str(out["error"])


def test_a_lora_policy_is_pushed_merged_under_the_base_models_names_and_is_left_untouched():
    import copy

    from tether.distributed.sync import named_merged_weights
    from tether.models import LoraSettings, apply_lora

    base = tiny_causal_lm(tiny_tokenizer())
    names = set(base.state_dict())
    policy = apply_lora(copy.deepcopy(base), LoraSettings(4, 8.0, 0.0, "all-linear"))
    with torch.no_grad():  # B starts at 0 (a zero delta); trained adapters are not
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    merged = dict(named_merged_weights(policy))
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert set(merged) == names == set(expected)
    changed = 0
    for k in names:
        assert torch.allclose(merged[k], expected[k], atol=1e-6), k
        changed += not torch.equal(merged[k], base.state_dict()[k])
    assert changed >= 4  # the adapted projections of both layers carry their delta
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())  # nothing merged in place
    assert dict(named_merged_weights(base)).keys() == names  # a plain model: its own weights
