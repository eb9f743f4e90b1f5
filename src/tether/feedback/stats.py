"""Rater statistics for the admin page: throughput, agreement on shared items (percent, Cohen's kappa), gold accuracy.

    rows = store.labels()            # one dict per label: item_id, rater, choice, winner, gold, seconds, created_at
    rater_table(rows, now)           # per rater: labels, median seconds per label, labels in the last hour, gold accuracy
    agreement_table(rows)            # per pair of raters who share items, plus all pairs pooled

A label's verdict is what it says about the two responses in canonical order: "0" or "1" (the better one), "tie"
or "bad" (both bad), so a rater who saw the pair swapped agrees with one who did not. Agreement counts all four
verdicts as categories.

Cohen's kappa (Cohen 1960): κ = (p_o − p_e) / (1 − p_e), p_o the observed agreement, p_e = Σ_k p1(k)·p2(k) the
agreement expected from each rater's own verdict frequencies. κ is undefined (NaN) when p_e = 1 (both raters always
gave one and the same verdict). The pooled row treats every pair of labels on a shared item as one observation.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from itertools import combinations


def verdict(label: dict) -> str:
    return str(label["winner"]) if label["winner"] is not None else label["choice"]


def percent_agreement(pairs: Sequence[tuple[str, str]]) -> float:
    """Share of pairs with equal verdicts (NaN without pairs)."""
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else math.nan


def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> float:
    """Cohen's kappa of (rater 1, rater 2) verdict pairs; see the module docstring."""
    if not pairs:
        return math.nan
    n = len(pairs)
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    p_o = percent_agreement(pairs)
    p_e = sum(first[k] * second[k] for k in first) / (n * n)
    return math.nan if p_e == 1.0 else (p_o - p_e) / (1.0 - p_e)


def shared_pairs(labels: Sequence[dict]) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(rater, rater) in name order -> their verdict pairs on the items both labelled."""
    by_item: dict[int, dict[str, str]] = defaultdict(dict)
    for label in labels:
        by_item[label["item_id"]][label["rater"]] = verdict(label)
    out: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for votes in by_item.values():
        for r1, r2 in combinations(sorted(votes), 2):
            out[(r1, r2)].append((votes[r1], votes[r2]))
    return dict(out)


def agreement_table(labels: Sequence[dict]) -> list[dict]:
    """One row per pair of raters with shared items, then the pooled row ("all pairs")."""
    pairs = shared_pairs(labels)
    rows = [{"raters": f"{a} / {b}", "shared": len(p), "percent": 100 * percent_agreement(p), "kappa": cohen_kappa(p)}
            for (a, b), p in sorted(pairs.items())]
    pooled = [pair for p in pairs.values() for pair in p]
    rows.append({"raters": "all pairs", "shared": len(pooled), "percent": 100 * percent_agreement(pooled),
                 "kappa": cohen_kappa(pooled)})
    return rows


def gold_accuracy(labels: Sequence[dict]) -> tuple[int, float]:
    """(gold items labelled, share where the known better response was chosen); tie and bad count as wrong."""
    gold = [label for label in labels if label["gold"] is not None]
    return len(gold), (sum(label["winner"] == label["gold"] for label in gold) / len(gold) if gold else math.nan)


def rater_table(labels: Sequence[dict], now: float) -> list[dict]:
    """Per rater: labels, median seconds from being shown an item to choosing, labels in the last hour, gold."""
    by_rater: dict[str, list[dict]] = defaultdict(list)
    for label in labels:
        by_rater[label["rater"]].append(label)
    rows = []
    for name, own in sorted(by_rater.items()):
        seconds = [label["seconds"] for label in own if label["seconds"] is not None]
        n_gold, accuracy = gold_accuracy(own)
        rows.append({"rater": name, "labels": len(own), "last_hour": sum(now - l["created_at"] < 3600 for l in own),
                     "median_seconds": statistics.median(seconds) if seconds else math.nan,
                     "gold_items": n_gold, "gold_accuracy": accuracy})
    return rows


def throughput(labels: Sequence[dict], now: float) -> dict:
    """All raters together: labels, labels in the last hour, labels per minute between the first and last label."""
    times = [label["created_at"] for label in labels]
    span = max(times) - min(times) if len(times) > 1 else 0.0
    return {"labels": len(times), "last_hour": sum(now - t < 3600 for t in times),
            "per_minute": 60 * (len(times) - 1) / span if span > 0 else math.nan}
