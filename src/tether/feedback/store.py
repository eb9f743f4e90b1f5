"""The feedback database: raters, comparison items, who is shown what, and every choice, in one SQLite file.

    store = Store("feedback.sqlite")
    store.add_items(candidate_records, round=1)          # pairs of responses to compare (idempotent)
    token = store.add_rater("alice")                     # the raw token is returned once; only its sha256 is kept
    rater = store.rater_for_token(token)
    item = store.next_item(rater.id)                     # the rater's queue: an open item, or a new one, or None
    store.submit(rater.id, item.id, "A", reason="...")   # (label_id, stored); a repeat is stored once
    store.undo(rater.id)                                 # deletes the rater's last choice, re-opens its item

Durability and concurrency: WAL journal; a choice is committed with synchronous=FULL, so it is on disk (WAL fsynced)
when `submit` returns, and neither a killed server nor a crashed machine loses what the page confirmed. Every connection is per thread; every write is one
`BEGIN IMMEDIATE` transaction, so two raters asking for the last open slot of an item are serialised by SQLite's
write lock instead of both getting it. Readers never block writers in WAL mode.

Queue rule: an item goes to `raters_per_item` (R) raters and never twice to the same one; a slot counts as taken
when it is labelled or assigned less than `lease_s` ago (a rater who walks away frees it after the lease). Gold
items (a known better response) go to every rater, hidden among the others: the queue order is a hash of the item,
so gold items are not recognisable by position. A rater's open assignment (including an undone one) comes first.

Display order: each assignment draws `swapped` at random; A is response_0 unless swapped. The label row stores
`swapped`, the choice as shown (A / B / tie / bad) and the canonical `winner` (0, 1, or NULL for tie and both-bad).
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CHOICES = ("A", "B", "tie", "bad")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS raters (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, token_hash TEXT UNIQUE NOT NULL,
    is_admin INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, round INTEGER NOT NULL DEFAULT 0, position INTEGER NOT NULL,
    prompt TEXT NOT NULL, response_0 TEXT NOT NULL, response_1 TEXT NOT NULL, critique_0 TEXT, critique_1 TEXT,
    gold INTEGER CHECK (gold IN (0, 1)), created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    item_id INTEGER NOT NULL REFERENCES items(id), rater_id INTEGER NOT NULL REFERENCES raters(id),
    swapped INTEGER NOT NULL, issued_at REAL NOT NULL, done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (item_id, rater_id));
CREATE INDEX IF NOT EXISTS assignments_rater ON assignments (rater_id, done);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL REFERENCES items(id),
    rater_id INTEGER NOT NULL REFERENCES raters(id), swapped INTEGER NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie', 'bad')), winner INTEGER CHECK (winner IN (0, 1)),
    reason TEXT NOT NULL DEFAULT '', seconds REAL, created_at REAL NOT NULL, UNIQUE (item_id, rater_id));
CREATE INDEX IF NOT EXISTS labels_rater ON labels (rater_id, id);
"""

# A slot is free when the count of labels + fresh assignments of an item is below R (gold items: no limit).
NEXT_ITEM = """
SELECT i.id FROM items i
WHERE NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.rater_id = :rater)
  AND (i.gold IS NOT NULL OR (SELECT COUNT(*) FROM assignments a
                              WHERE a.item_id = i.id AND (a.done = 1 OR a.issued_at > :fresh)) < :r)
ORDER BY i.round, i.position LIMIT 1
"""
REMAINING = NEXT_ITEM.replace("SELECT i.id", "SELECT COUNT(*)").replace(" LIMIT 1", "")


class NotAssigned(LookupError):
    """A choice for an item that is not in this rater's queue."""


@dataclass(frozen=True)
class Rater:
    id: int
    name: str
    is_admin: bool
    token_hash: str


@dataclass(frozen=True)
class Item:
    """A comparison as one rater sees it: `a` and `b` in display order (`swapped` says which response is A)."""

    id: int
    prompt: str | list
    a: str
    b: str
    critique_a: str | None
    critique_b: str | None
    swapped: bool
    round: int


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def winner_of(choice: str, swapped: bool) -> int | None:
    """Canonical index of the preferred response: A is response_0 unless swapped; tie and bad have none."""
    if choice == "A":
        return int(swapped)
    if choice == "B":
        return int(not swapped)
    return None


def item_key(prompt, first: str, second: str, gold) -> str:
    return hashlib.sha256(json.dumps([prompt, first, second, gold]).encode()).hexdigest()


class Store:
    """One SQLite file; safe to share between threads (each gets its own connection) and processes."""

    def __init__(self, path: str | Path, lease_s: float = 600.0):
        self.path, self.lease_s = str(path), lease_s
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db().executescript(SCHEMA)
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('secret', ?)", (secrets.token_hex(32),))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('raters_per_item', '1')")

    # --- connections ------------------------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. durable: fsync the WAL at COMMIT (synchronous=FULL), so it survives a crash of
        the machine; else NORMAL (no fsync; still safe against a killed process, and the next durable commit
        syncs it too). Only handing out an assignment is not durable: a lost one is simply handed out again."""
        db = self._db()
        db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # --- settings ---------------------------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self._db().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    @property
    def raters_per_item(self) -> int:
        return int(self.meta("raters_per_item") or 1)

    # --- raters -----------------------------------------------------------------------------------------------------
    def add_rater(self, name: str, admin: bool = False) -> str:
        """Register a rater (or the admin) and return their token; a name that exists gets a fresh token."""
        if not name.strip():
            raise ValueError("a rater needs a name")
        token = secrets.token_urlsafe(24)
        with self._write() as db:
            db.execute("INSERT INTO raters (name, token_hash, is_admin, created_at) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET token_hash = excluded.token_hash, is_admin = excluded.is_admin",
                       (name.strip(), hash_token(token), int(admin), time.time()))
        return token

    def rater_for_token(self, token: str | None) -> Rater | None:
        if not token:
            return None
        row = self._db().execute("SELECT id, name, is_admin, token_hash FROM raters WHERE token_hash = ?",
                                 (hash_token(token),)).fetchone()
        return None if row is None else Rater(row["id"], row["name"], bool(row["is_admin"]), row["token_hash"])

    def rater_names(self) -> dict[int, str]:
        return {r["id"]: r["name"] for r in self._db().execute("SELECT id, name FROM raters WHERE is_admin = 0")}

    # --- items ------------------------------------------------------------------------------------------------------
    def add_items(self, records: Iterable[dict], round: int = 0) -> int:
        """Every pair of distinct responses of each record becomes an item (a record with `gold` must have two);
        items already stored are left alone. Returns how many were new."""
        rows = []
        for record in records:
            responses, critiques = record["responses"], record.get("critiques") or [None] * len(record["responses"])
            gold = record.get("gold")
            for i in range(len(responses)):
                for j in range(i + 1, len(responses)):
                    if responses[i] == responses[j]:
                        continue  # nothing to compare
                    key = item_key(record["prompt"], responses[i], responses[j], gold)
                    rows.append((key, round, int(key[:12], 16), json.dumps(record["prompt"]), responses[i],
                                 responses[j], critiques[i], critiques[j], gold, time.time()))
        with self._write() as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO items (key, round, position, prompt, response_0, response_1, "
                           "critique_0, critique_1, gold, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            return db.total_changes - before

    def _item(self, db, item_id: int, swapped: bool) -> Item:
        row = db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        first, second = (row["response_1"], row["response_0"]) if swapped else (row["response_0"], row["response_1"])
        c_first, c_second = (row["critique_1"], row["critique_0"]) if swapped else (row["critique_0"], row["critique_1"])
        return Item(row["id"], json.loads(row["prompt"]), first, second, c_first, c_second, swapped, row["round"])

    def item_rows(self) -> list[dict]:
        return [dict(r) for r in self._db().execute("SELECT * FROM items ORDER BY id")]

    # --- the queue --------------------------------------------------------------------------------------------------
    def next_item(self, rater_id: int, rng: random.Random | None = None) -> Item | None:
        """The rater's open item, or a new assignment from the queue (see the module docstring), or None."""
        with self._write(durable=False) as db:
            row = db.execute("SELECT item_id, swapped FROM assignments WHERE rater_id = ? AND done = 0 "
                             "ORDER BY issued_at DESC LIMIT 1", (rater_id,)).fetchone()
            if row is not None:
                return self._item(db, row["item_id"], bool(row["swapped"]))
            now = time.time()
            found = db.execute(NEXT_ITEM, {"rater": rater_id, "fresh": now - self.lease_s,
                                           "r": self.raters_per_item}).fetchone()
            if found is None:
                return None
            swapped = (rng or random).random() < 0.5
            db.execute("INSERT INTO assignments (item_id, rater_id, swapped, issued_at) VALUES (?, ?, ?, ?)",
                       (found[0], rater_id, int(swapped), now))
            return self._item(db, found[0], swapped)

    def submit(self, rater_id: int, item_id: int, choice: str, reason: str = "") -> tuple[int, bool]:
        """Store a choice (as shown: A, B, tie, bad); returns (label id, stored). A repeat of an item the rater has
        labelled already is not stored again (stored=False, the first label's id)."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}")
        with self._write() as db:
            done = db.execute("SELECT id FROM labels WHERE item_id = ? AND rater_id = ?", (item_id, rater_id)).fetchone()
            if done is not None:
                return done[0], False
            row = db.execute("SELECT swapped, issued_at FROM assignments WHERE item_id = ? AND rater_id = ? "
                             "AND done = 0", (item_id, rater_id)).fetchone()
            if row is None:
                raise NotAssigned(f"item {item_id} is not in this rater's queue")
            now = time.time()
            cur = db.execute("INSERT INTO labels (item_id, rater_id, swapped, choice, winner, reason, seconds, "
                             "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (item_id, rater_id, row["swapped"], choice, winner_of(choice, bool(row["swapped"])),
                              reason, now - row["issued_at"], now))
            db.execute("UPDATE assignments SET done = 1 WHERE item_id = ? AND rater_id = ?", (item_id, rater_id))
            return cur.lastrowid, True

    def undo(self, rater_id: int) -> int | None:
        """Delete the rater's most recent choice; its item comes back first in their queue. Returns the item id."""
        with self._write() as db:
            row = db.execute("SELECT id, item_id FROM labels WHERE rater_id = ? ORDER BY id DESC LIMIT 1",
                             (rater_id,)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM labels WHERE id = ?", (row["id"],))
            db.execute("UPDATE assignments SET done = 0, issued_at = ? WHERE item_id = ? AND rater_id = ?",
                       (time.time(), row["item_id"], rater_id))
            return row["item_id"]

    def progress(self, rater_id: int) -> dict:
        """Labelled by this rater and left in their queue (an open assignment counts as left)."""
        db = self._db()
        done = db.execute("SELECT COUNT(*) FROM labels WHERE rater_id = ?", (rater_id,)).fetchone()[0]
        open_ = db.execute("SELECT COUNT(*) FROM assignments WHERE rater_id = ? AND done = 0", (rater_id,)).fetchone()[0]
        new = db.execute(REMAINING, {"rater": rater_id, "fresh": time.time() - self.lease_s,
                                     "r": self.raters_per_item}).fetchone()[0]
        return {"done": done, "left": open_ + new}

    # --- reading labels back ----------------------------------------------------------------------------------------
    def labels(self) -> list[dict]:
        """Every label joined with its item and rater: prompt, response_0/1, gold, rater, choice, winner, ..."""
        rows = self._db().execute(
            "SELECT l.id, l.item_id, l.choice, l.winner, l.swapped, l.reason, l.seconds, l.created_at, "
            "r.name AS rater, i.round, i.prompt, i.response_0, i.response_1, i.gold "
            "FROM labels l JOIN raters r ON r.id = l.rater_id JOIN items i ON i.id = l.item_id ORDER BY l.id")
        return [{**dict(r), "prompt": json.loads(r["prompt"])} for r in rows]

    def round_status(self, round: int) -> dict:
        """Items of a round (gold excluded) and how many have their R labels: the loop's quota."""
        row = self._db().execute(
            "SELECT COUNT(*), COALESCE(SUM((SELECT COUNT(*) FROM labels l WHERE l.item_id = i.id) >= ?), 0) "
            "FROM items i WHERE i.round = ? AND i.gold IS NULL", (self.raters_per_item, round)).fetchone()
        return {"items": row[0], "complete": row[1]}
