"""`tether loop` on a tiny in-process model: rounds of sample -> label -> RM on all labels -> PPO.

- simulated raters: two rounds run unattended; each round's items get R labels from the queue, the RM of round 2
  trains on the labels of both rounds, PPO of round 2 starts from round 1's policy, gold reward reported per round;
  running again skips the finished rounds;
- human raters: the loop serves the app and waits; a "person" labels through HTTP and the round goes on.
"""

import json
import socket
import threading
import time

import httpx
import pytest
import torch
import yaml

from tether.config import ConfigError, load_config
from tether.feedback.loop import LoopConfig, run
from tether.feedback.store import Store
from tether.testing import save_tiny

torch.set_num_threads(1)

TINY = {"rounds": 2, "prompts_per_round": 4, "max_new_tokens": 6, "progress": False, "rm_max_steps": 1,
        "rm_batch_size": 4, "ppo_max_steps": 1, "ppo_rollout_batch": 4, "ppo_batch_size": 4, "ppo_num_minibatches": 1,
        "ppo_ppo_epochs": 1, "ppo_max_new_tokens": 6, "ppo_n_eval_prompts": 2, "ppo_eval_samples": 1}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("loop") / "base")


def loop_config(base, out, **kw):
    return load_config(LoopConfig, None, {**TINY, "out": str(out), "model": str(base), **kw}, recipe="loop")


def test_simulated_rounds_label_train_and_report_gold(base, tmp_path):
    out = tmp_path / "loop"
    summary = run(loop_config(base, out, raters_per_item=2, sim_raters=3))
    rows = [json.loads(line) for line in (out / "loop.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and summary["rounds"] == 2
    store = Store(out / "feedback.sqlite")
    for k in (1, 2):
        status = store.round_status(k)
        assert status["items"] >= 1 and status["complete"] == status["items"]
    labels = store.labels()
    assert len(labels) == 2 * sum(store.round_status(k)["items"] for k in (1, 2))  # R = 2 labels per item
    assert {lab["rater"] for lab in labels} <= {"sim-1", "sim-2", "sim-3"}
    assert len({(lab["item_id"], lab["rater"]) for lab in labels}) == len(labels)
    rm2 = yaml.safe_load((out / "round-2" / "rm" / "config.yaml").read_text())
    prefs2 = (out / "round-2" / "prefs.jsonl").read_text().splitlines()
    assert rm2["data"] == str(out / "round-2" / "prefs.jsonl") and rm2["model"] == str(base)
    assert len(prefs2) == rows[1]["pairs"] >= rows[0]["pairs"]  # all labels so far, not only this round's
    ppo2 = yaml.safe_load((out / "round-2" / "ppo" / "config.yaml").read_text())
    assert ppo2["model"] == str(out / "round-1" / "ppo" / "model")
    assert ppo2["reward"] == f"rm:{out / 'round-2' / 'rm'}"
    for key in ("gold_reward_round_0", "gold_reward_round_1", "gold_reward_round_2"):
        assert isinstance(summary[key], float)
    assert all(isinstance(r["sample_gold"], float) for r in rows)
    stamp = (out / "round-1" / "round.json").stat().st_mtime_ns
    again = run(loop_config(base, out, raters_per_item=2, sim_raters=3))
    assert again["gold_reward_round_2"] == summary["gold_reward_round_2"]
    assert (out / "round-1" / "round.json").stat().st_mtime_ns == stamp and len(store.labels()) == len(labels)


def test_loop_config_is_checked(base, tmp_path):
    with pytest.raises(ConfigError, match="raters"):
        loop_config(base, tmp_path, raters="robots")
    with pytest.raises(ConfigError, match="sim_raters"):
        loop_config(base, tmp_path, raters_per_item=4, sim_raters=2)
    with pytest.raises(ConfigError, match="task=reviews"):
        loop_config(base, tmp_path, task="arithmetic")


def test_human_round_serves_and_waits_for_the_quota(base, tmp_path):
    out = tmp_path / "human"
    db = out / "feedback.sqlite"
    token = Store(db).add_rater("dana")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = loop_config(base, out, rounds=1, raters="human", port=port, poll_seconds=0.1)
    result, errors = {}, []

    def loop():
        try:
            result.update(run(cfg))
        except Exception as e:
            errors.append(repr(e))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                          timeout=10)
    labelled, deadline = 0, time.time() + 120
    while thread.is_alive() and time.time() < deadline:
        try:
            shown = client.get("/api/next").json()
        except httpx.TransportError:
            time.sleep(0.1)  # not serving yet (sampling) or already stopped
            continue
        if shown["item"] is None:
            time.sleep(0.1)
            continue
        client.post("/api/label", json={"item_id": shown["item"]["id"], "choice": "A"},
                    headers={"X-CSRF-Token": shown["csrf"]})
        labelled += 1
    thread.join(timeout=60)
    assert errors == [] and result["rounds"] == 1
    assert labelled == Store(db).round_status(1)["items"] == len(Store(db).labels())
