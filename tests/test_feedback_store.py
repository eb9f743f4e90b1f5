"""The feedback store, statistics, export and candidates, without a server.

- queue: R raters per item and never the same rater twice; gold items to every rater; a lease frees a slot;
  undo re-opens the item; a repeated choice is stored once; the display order maps back to the responses;
- storage: WAL, tokens only as sha256, items idempotent, everything visible to a second connection;
- statistics: percent agreement and Cohen's kappa by hand, gold accuracy;
- export: the majority rule with its tie / split / both-bad cases, `all` mode with raters, gold left out;
- candidates: validation names file, line and field; `tether label sample` with a critic on a tiny model.
"""

import hashlib
import json
import math
import random
import sqlite3

import pytest
import torch

from tether.cli import main as tether_main
from tether.data import DataError, load_records, write_jsonl
from tether.feedback import stats
from tether.feedback.candidates import read_candidates
from tether.feedback.export import export_pairs
from tether.feedback.store import NotAssigned, Store, winner_of
from tether.testing import save_tiny

torch.set_num_threads(1)


def make_store(tmp_path, r=1, **kw) -> Store:
    store = Store(tmp_path / "f.sqlite", **kw)
    store.set_meta("raters_per_item", str(r))
    return store


def raters(store, *names):
    return [store.rater_for_token(store.add_rater(n)).id for n in names]


def vote(store, rater, item, text):
    """Choose the response with this text, whatever side it is shown on."""
    return store.submit(rater, item.id, "A" if item.a == text else "B")


def test_queue_gives_each_item_to_r_raters_never_twice(tmp_path):
    store = make_store(tmp_path, r=2)
    assert store.add_items([{"prompt": "p", "responses": ["x", "y"]}, {"prompt": "q", "responses": ["u", "v"]}]) == 2
    r1, r2, r3 = raters(store, "r1", "r2", "r3")
    first = store.next_item(r1)
    store.submit(r1, first.id, "A")
    second = store.next_item(r1)
    assert second.id != first.id
    assert store.next_item(r2).id == first.id  # first still has a free slot (1 label of 2)
    third = store.next_item(r3)
    assert third.id == second.id  # first is full: r1's label + r2's open assignment
    assert store.next_item(r3).id == third.id  # an open assignment comes back until answered
    store.submit(r1, second.id, "B")
    assert store.next_item(r1) is None  # r1 labelled both; never the same item twice
    assert store.progress(r1) == {"done": 2, "left": 0}
    assert store.progress(r3) == {"done": 0, "left": 1}


def test_lease_frees_an_abandoned_slot_and_gold_goes_to_everyone(tmp_path):
    store = make_store(tmp_path, r=1, lease_s=0.0)
    store.add_items([{"prompt": "p", "responses": ["x", "y"]}])
    r1, r2 = raters(store, "r1", "r2")
    assert store.next_item(r1) is not None
    assert store.next_item(r2) is not None  # r1's assignment is older than the lease: the slot is free again
    held = make_store(tmp_path / "held", r=1)
    held.add_items([{"prompt": "p", "responses": ["x", "y"]}, {"prompt": "g", "responses": ["good", "bad"], "gold": 0}])
    a, b, c = raters(held, "a", "b", "c")
    seen = {rid: [] for rid in (a, b, c)}
    for rid in (a, b, c):
        while (item := held.next_item(rid)) is not None:
            seen[rid].append(item.prompt)
            held.submit(rid, item.id, "A")
    assert sorted(len(v) for v in seen.values()) == [1, 1, 2]  # the regular item once (R=1), gold for all
    assert all("g" in v for v in seen.values())


def test_submit_maps_display_order_dedupes_and_undo_reopens(tmp_path):
    store = make_store(tmp_path)
    store.add_items([{"prompt": "p", "responses": ["first", "second"]}])
    (r1,) = raters(store, "r1")
    item = store.next_item(r1)
    assert (item.a, item.b) == (("second", "first") if item.swapped else ("first", "second"))
    label_id, stored = store.submit(r1, item.id, "A", reason=" short ")
    assert stored and store.submit(r1, item.id, "B") == (label_id, False)  # a repeat is stored once
    (row,) = store.labels()
    assert row["choice"] == "A" and row["winner"] == int(item.swapped) and row["swapped"] == int(item.swapped)
    assert [winner_of(c, s) for c in ("A", "B", "tie", "bad") for s in (False, True)] == [0, 1, 1, 0, None, None,
                                                                                         None, None]
    assert store.undo(r1) == item.id and store.labels() == []
    assert store.next_item(r1).id == item.id  # the undone item comes back
    store.submit(r1, item.id, "tie")
    assert [lab["choice"] for lab in store.labels()] == ["tie"]
    assert store.undo(r1) == item.id and store.undo(r1) is None
    with pytest.raises(NotAssigned):
        store.submit(r1, item.id + 1, "A")
    with pytest.raises(ValueError, match="choice"):
        store.submit(r1, item.id, "C")


def test_storage_is_wal_tokens_hashed_items_idempotent(tmp_path):
    store = make_store(tmp_path)
    records = [{"prompt": [{"role": "user", "content": "hi"}], "responses": ["a", "b", "c", "a"]}]
    assert store.add_items(records) == 5  # 6 pairs of 4 responses, minus the identical ("a", "a")
    assert store.add_items(records) == 0
    token = store.add_rater("alice")
    db = sqlite3.connect(tmp_path / "f.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    (stored_hash,) = db.execute("SELECT token_hash FROM raters").fetchone()
    assert stored_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token.encode() not in (tmp_path / "f.sqlite").read_bytes() + (tmp_path / "f.sqlite-wal").read_bytes()
    rater = store.rater_for_token(token)
    store.submit(rater.id, store.next_item(rater.id).id, "bad")
    again = Store(tmp_path / "f.sqlite")  # a second connection sees the committed label and the chat prompt
    assert [(lab["rater"], lab["choice"], lab["prompt"][0]["content"]) for lab in again.labels()] == [
        ("alice", "bad", "hi")]
    assert store.rater_for_token("wrong") is None and store.rater_for_token("") is None


def test_kappa_and_agreement_by_hand():
    # p_o = 3/4; rater 1 says 0,0,1,1 and rater 2 says 0,1,1,1: p_e = (2·1 + 2·3)/16 = 1/2; κ = (3/4 − 1/2)/(1/2)
    pairs = [("0", "0"), ("0", "1"), ("1", "1"), ("1", "1")]
    assert stats.percent_agreement(pairs) == 0.75
    assert stats.cohen_kappa(pairs) == pytest.approx(0.5)
    assert stats.cohen_kappa([("0", "1"), ("1", "0")]) == pytest.approx(-1.0)  # p_o = 0, p_e = 1/2
    assert math.isnan(stats.cohen_kappa([("tie", "tie")]))  # p_e = 1: undefined
    assert math.isnan(stats.cohen_kappa([]))
    labels = [{"item_id": 1, "rater": "a", "winner": 0, "choice": "A", "gold": None},
              {"item_id": 1, "rater": "b", "winner": 0, "choice": "B", "gold": None},
              {"item_id": 2, "rater": "a", "winner": None, "choice": "tie", "gold": None},
              {"item_id": 2, "rater": "b", "winner": 1, "choice": "A", "gold": None},
              {"item_id": 3, "rater": "a", "winner": 1, "choice": "B", "gold": 1},
              {"item_id": 3, "rater": "b", "winner": None, "choice": "bad", "gold": 1}]
    rows = stats.agreement_table(labels)
    assert [(r["raters"], r["shared"], round(r["percent"], 2)) for r in rows] == [("a / b", 3, 33.33),
                                                                               ("all pairs", 3, 33.33)]
    assert stats.gold_accuracy(labels) == (2, 0.5)  # a right, b's "both bad" counts as wrong


def test_export_majority_rule_and_all_mode(tmp_path):
    store = make_store(tmp_path, r=3)
    store.add_items([{"prompt": "win", "responses": ["good", "meh"]}, {"prompt": "split", "responses": ["x", "y"]},
                     {"prompt": "none", "responses": ["t1", "t2"]}, {"prompt": "junk", "responses": ["j1", "j2"]},
                     {"prompt": "gold", "responses": ["right", "wrong"], "gold": 0}])
    plan = {"win": ["good", "good", "meh"], "split": ["x", "y", "tie"], "none": ["tie", "tie", "bad"],
            "junk": ["bad", "bad", "j1"], "gold": ["right", "right", "wrong"]}
    for n, rid in enumerate(raters(store, "r1", "r2", "r3")):
        while (item := store.next_item(rid)) is not None:
            what = plan[item.prompt][n]
            if what in ("tie", "bad"):
                store.submit(rid, item.id, what)
            else:
                vote(store, rid, item, what)
    records, dropped = export_pairs(store)
    assert records == [{"prompt": "win", "chosen": "good", "rejected": "meh", "votes": 2, "labels": 3}]
    assert dropped == {"split": 1, "no_preference": 1, "both_bad": 1}
    with_gold, _ = export_pairs(store, include_gold=True)
    assert {"prompt": "gold", "chosen": "right", "rejected": "wrong", "votes": 2, "labels": 3} in with_gold
    every, counts = export_pairs(store, mode="all")
    assert sorted((r["prompt"], r["chosen"], r["rater"]) for r in every) == [
        ("junk", "j1", "r3"), ("split", "x", "r1"), ("split", "y", "r2"),
        ("win", "good", "r1"), ("win", "good", "r2"), ("win", "meh", "r3")]
    assert counts == {"tie": 3, "both_bad": 3}
    write_jsonl(tmp_path / "prefs.jsonl", every)
    assert len(load_records(tmp_path / "prefs.jsonl", "pairs")) == 6  # valid input for `tether rm` / `tether dpo`


@pytest.mark.parametrize("line, field", [
    ({"prompt": "p", "responses": ["only one"]}, "responses"),
    ({"prompt": "p", "responses": ["a", "b"], "critiques": ["one"]}, "critiques"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "gold": 0}, "gold"),
    ({"prompt": "p", "responses": ["a", "b"], "gold": True}, "gold"),
    ({"responses": ["a", "b"]}, "prompt"),
])
def test_candidates_validation_names_file_line_field(tmp_path, line, field):
    path = write_jsonl(tmp_path / "cand.jsonl", [{"prompt": "ok", "responses": ["a", "b"]}, line])
    with pytest.raises(DataError) as err:
        read_candidates(path)
    assert err.value.line == 2 and field in str(err.value) and str(path) in str(err.value)


def test_label_sample_and_export_cli(tmp_path, capsys):
    save_tiny(tmp_path / "model")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the film was"}, {"prompt": "the book is"}])
    (tmp_path / "critic.py").write_text("def critique(prompts, responses):\n"
                                        "    return [f'{len(r.split())} words' for r in responses]\n")
    argv = ["label", "sample", "--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.jsonl"),
            "--n", "3", "--out", str(tmp_path / "cand.jsonl"), "--max-new-tokens", "5",
            "--critic", f"python:{tmp_path / 'critic.py'}:critique"]
    assert tether_main(argv) == 0
    cands = read_candidates(tmp_path / "cand.jsonl")
    assert [c["prompt"] for c in cands] == ["the film was", "the book is"]
    assert all(len(c["responses"]) == 3 and c["critiques"] == [f"{len(r.split())} words" for r in c["responses"]]
               for c in cands)
    db = tmp_path / "f.sqlite"
    assert tether_main(["label", "add-rater", "ann", "--db", str(db), "--url", "http://127.0.0.1:9"]) == 0
    link = capsys.readouterr().out.strip().splitlines()[-1]
    assert link.startswith("http://127.0.0.1:9/login?token=")
    store = Store(db)
    rater = store.rater_for_token(link.split("token=")[1])
    store.add_items([{"prompt": "p", "responses": ["x", "y"]}])
    store.submit(rater.id, store.next_item(rater.id, random.Random(0)).id, "A")
    assert tether_main(["label", "export", "--db", str(db), "--out", str(tmp_path / "p.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 1
    assert tether_main(["label", "sample", "--model", str(tmp_path / "model"), "--prompts",
                        str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_label_serve_adds_candidates_once_and_checks_gold(tmp_path, monkeypatch, capsys):
    import tether.feedback.app as app_module

    served = []
    monkeypatch.setattr(app_module, "serve", lambda store, host, port: served.append((store.path, host, port)))
    cand = write_jsonl(tmp_path / "cand.jsonl", [{"prompt": "p", "responses": ["x", "y", "z"]}])
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"prompt": "g", "responses": ["right", "wrong"], "gold": 0}])
    argv = ["label", "serve", "--db", str(tmp_path / "f.sqlite"), "--candidates", str(cand), "--gold", str(gold),
            "--raters-per-item", "3", "--port", "8123"]
    assert tether_main(argv) == 0 and tether_main(argv) == 0
    first, second = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (first["new_items"], second["new_items"], second["items"], second["raters_per_item"]) == (4, 0, 4, 3)
    assert served == [(str(tmp_path / "f.sqlite"), "127.0.0.1", 8123)] * 2
    not_gold = write_jsonl(tmp_path / "not_gold.jsonl", [{"prompt": "g", "responses": ["a", "b"]}])
    assert tether_main(["label", "serve", "--db", str(tmp_path / "f.sqlite"), "--gold", str(not_gold)]) == 2
    assert "gold" in capsys.readouterr().err and len(served) == 2
