"""Load and faults on loopback, against `tether label serve` in its own process.

- load: 20 raters at once, each making 50 choices through the JSON API (and re-sending every 10th, as a double
  click would) -> exactly 1,000 label rows, none lost, none doubled, no item past its R raters; the request rate
  held is printed and kept as a test property (`pytest -s` shows it);
- kill: raters labelling while the server is SIGKILLed mid-run; after a restart on the same database every choice
  the server had confirmed is there, and labelling goes on.
Both bounded in count and time: every client call has a timeout and every thread a deadline.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tether.data import write_jsonl
from tether.feedback.candidates import read_candidates
from tether.feedback.store import Store

N_RATERS, PER_RATER, R = 20, 50, 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db, port) -> subprocess.Popen:
    """`tether label serve` in a process of its own (items are added beforehand: then it never imports torch)."""
    cmd = [sys.executable, "-m", "tether.feedback.cli", "serve", "--db", str(db), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/label", timeout=1).status_code == 401:
                return proc
        except httpx.TransportError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not come up")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rater_client(port, token) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                        timeout=30)


def label_once(client, rng, counters) -> tuple[int, int, str] | None:
    """Fetch the next item and choose; (item id, confirmed label id, csrf), or None when the queue is empty."""
    shown = client.get("/api/next")
    shown.raise_for_status()
    body = shown.json()
    counters["requests"] += 1
    if body["item"] is None:
        return None
    payload = {"item_id": body["item"]["id"], "choice": rng.choice(["A", "B", "tie", "bad"])}
    answer = client.post("/api/label", json=payload, headers={"X-CSRF-Token": body["csrf"]})
    answer.raise_for_status()
    counters["requests"] += 1
    return body["item"]["id"], answer.json()["label_id"], body["csrf"]


@pytest.fixture
def setup(tmp_path):
    db = tmp_path / "f.sqlite"
    candidates = write_jsonl(tmp_path / "cand.jsonl", [{"prompt": f"prompt {i}", "responses": [f"a{i}", f"b{i}"]}
                                                       for i in range(200)])
    store = Store(db)
    store.add_items(read_candidates(candidates))
    store.set_meta("raters_per_item", str(R))
    tokens = [store.add_rater(f"r{i}") for i in range(N_RATERS)]
    return store, db, candidates, tokens


def test_20_concurrent_raters_1000_choices_none_lost_or_doubled(setup, record_property):
    store, db, candidates, tokens = setup
    port = free_port()
    proc = start_server(db, port)
    confirmed: list[list[int]] = [[] for _ in tokens]
    repeats, failures = [], []
    counters = [{"requests": 0} for _ in tokens]

    def work(i):
        rng = random.Random(i)
        try:
            with rater_client(port, tokens[i]) as client:
                for n in range(PER_RATER):
                    item_id, label_id, csrf = label_once(client, rng, counters[i])
                    confirmed[i].append(label_id)
                    if n % 10 == 0:  # a double click: the same item once more
                        again = client.post("/api/label", json={"item_id": item_id, "choice": "A"},
                                            headers={"X-CSRF-Token": csrf})
                        counters[i]["requests"] += 1
                        repeats.append((label_id, again.json()))
        except Exception as e:  # reported below; a thread must not die silently
            failures.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(N_RATERS)]
    t0 = time.time()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, 120 - (time.time() - t0)))
        seconds = time.time() - t0
        assert not any(t.is_alive() for t in threads), "load test ran past its deadline"
    finally:
        stop(proc)
    assert failures == []
    rows = Store(db).labels()
    assert len(rows) == N_RATERS * PER_RATER == 1000
    assert len({(r["item_id"], r["rater"]) for r in rows}) == 1000  # none doubled
    assert sorted(r["id"] for r in rows) == sorted(i for c in confirmed for i in c)  # none lost
    per_item: dict[int, int] = {}
    for r in rows:
        per_item[r["item_id"]] = per_item.get(r["item_id"], 0) + 1
    assert max(per_item.values()) <= R
    assert len(repeats) == N_RATERS * PER_RATER // 10
    assert all(answer == {"label_id": label_id, "stored": False} for label_id, answer in repeats)
    requests = sum(c["requests"] for c in counters)
    rate = {"requests": requests, "seconds": round(seconds, 2), "requests_per_second": round(requests / seconds, 1),
            "choices_per_second": round(1000 / seconds, 1)}
    record_property("load", json.dumps(rate))
    print("\nfeedback load:", json.dumps(rate))


def test_server_killed_mid_run_keeps_every_confirmed_choice(setup):
    store, db, candidates, tokens = setup
    port = free_port()
    proc = start_server(db, port)
    confirmed: list[int] = []
    lock, stop_at = threading.Lock(), 100

    def work(i):
        rng = random.Random(100 + i)
        with rater_client(port, tokens[i]) as client:
            while time.time() < deadline:
                try:
                    _, label_id, _ = label_once(client, rng, {"requests": 0})
                except (httpx.TransportError, httpx.HTTPStatusError):
                    return  # the server is gone: what it confirmed before is what counts
                with lock:
                    confirmed.append(label_id)

    deadline = time.time() + 60
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(5)]
    for t in threads:
        t.start()
    try:
        while len(confirmed) < stop_at and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # mid-run: requests are in flight
        proc.wait(10)
        for t in threads:
            t.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(confirmed) >= stop_at and not any(t.is_alive() for t in threads)
    stored = {r["id"] for r in Store(db).labels()}
    assert set(confirmed) <= stored  # every confirmed choice survived the kill
    assert len(stored - set(confirmed)) <= len(threads)  # at most the in-flight ones were committed unconfirmed

    port = free_port()
    proc = start_server(db, port)  # restart on the same database
    try:
        with rater_client(port, tokens[0]) as client:
            _, label_id, _ = label_once(client, random.Random(0), {"requests": 0})
        rows = Store(db).labels()
        assert {r["id"] for r in rows} == stored | {label_id} and len(rows) == len(stored) + 1
    finally:
        stop(proc)


@pytest.mark.parametrize("bad,message", [
    ("[" * 100000 + "]" * 100000, "invalid JSON: nested more than 100 levels deep"),
    ('{"prompt": "p", "responses": ["a", "' + "9" * 5000 + '"], "x": ' + "9" * 5000 + "}",
     "invalid JSON: an integer of more than 4300 digits"),
    ('{"prompt": "p\\ud800", "responses": ["a", "b"]}',
     "field 'prompt': contains a lone surrogate (\\ud800) at character 1, not valid Unicode"),
    ('{"prompt": "p", "responses": ["a", "b\\udfff"]}',
     "field 'responses[1]': contains a lone surrogate (\\udfff) at character 1, not valid Unicode"),
    ('{"prompt": "p", "responses": ["a", "b"], "critiques": ["\\ud800", "ok"]}',
     "field 'critiques[0]': contains a lone surrogate (\\ud800) at character 0, not valid Unicode"),
])
def test_candidates_file_hostile_lines_give_one_line_errors(tmp_path, bad, message):
    """`tether label serve --candidates` reads through data.read_rows: the data layer's one-line errors."""
    path = tmp_path / "cand.jsonl"
    path.write_text(json.dumps({"prompt": "p", "responses": ["", "b"]}) + "\n" + bad + "\n")
    with pytest.raises(ValueError) as info:
        read_candidates(path)
    assert type(info.value).__name__ == "DataError" and str(info.value) == f"{path}:2: {message}"
