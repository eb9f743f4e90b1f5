"""Labels -> preference pairs `{"prompt", "chosen", "rejected"}` for `tether rm` and `tether dpo`: strings after a
string prompt; after a chat prompt, each response as one assistant turn (TRL's conversational format).

    tether label export --db feedback.sqlite --out prefs.jsonl               # one pair per item, majority vote
    tether label export --db feedback.sqlite --out prefs.jsonl --mode all    # one pair per label, with "rater"

The rule for ties and both-bad (a choice says nothing about which response is better unless it is A or B):
- majority: an item's votes are the A/B choices, mapped back to the responses through the stored display order.
  "tie" and "both bad" are abstentions. The item becomes one pair when one response has strictly more votes than
  the other (`votes` and `labels` fields say by how much); an even split, or no A/B vote at all, gives no pair.
  An item on which "both bad" is a strict majority of all labels gives no pair either: a pair would teach the
  reward model that one of two rejected responses is good.
- all: every A/B label is its own pair with its `rater` (the reward model then sees the raters' disagreement as
  label noise, Bradley-Terry style); tie and both-bad labels give no pair.
Gold items are the raters' test, not data: they are left out unless `include_gold`. The counts of what was dropped
and why come back with the records (and are printed by the CLI).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tether.data import write_jsonl
from tether.feedback.store import Store

MODES = ("majority", "all")


def _pair(label: dict, winner: int) -> dict:
    """A pair in one of TRL's two formats: strings after a string prompt; after a chat prompt (turns) the responses
    as assistant turns, so that every field is turns (TRL's `is_conversational` looks at any one of them)."""
    chosen, rejected = (label["response_0"], label["response_1"]) if winner == 0 else \
        (label["response_1"], label["response_0"])
    if isinstance(label["prompt"], list):
        chosen, rejected = ([{"role": "assistant", "content": text}] for text in (chosen, rejected))
    return {"prompt": label["prompt"], "chosen": chosen, "rejected": rejected}


def majority_pairs(labels: list[dict]) -> tuple[list[dict], dict]:
    """One pair per item with a strict A/B majority (module docstring); (records, dropped counts)."""
    by_item: dict[int, list[dict]] = defaultdict(list)
    for label in labels:
        by_item[label["item_id"]].append(label)
    records, dropped = [], {"split": 0, "no_preference": 0, "both_bad": 0}
    for item_labels in by_item.values():
        votes = [sum(label["winner"] == w for label in item_labels) for w in (0, 1)]
        bad = sum(label["choice"] == "bad" for label in item_labels)
        if 2 * bad > len(item_labels):
            dropped["both_bad"] += 1
        elif votes[0] == votes[1]:
            dropped["split" if votes[0] else "no_preference"] += 1
        else:
            winner = int(votes[1] > votes[0])
            records.append({**_pair(item_labels[0], winner), "votes": max(votes), "labels": len(item_labels)})
    return records, dropped


def all_pairs(labels: list[dict]) -> tuple[list[dict], dict]:
    """One pair per A/B label, with its rater; (records, dropped counts)."""
    records = [{**_pair(label, label["winner"]), "rater": label["rater"]} for label in labels
               if label["winner"] is not None]
    return records, {"tie": sum(label["choice"] == "tie" for label in labels),
                     "both_bad": sum(label["choice"] == "bad" for label in labels)}


def export_pairs(store: Store, mode: str = "majority", include_gold: bool = False,
                 rounds: set[int] | None = None) -> tuple[list[dict], dict]:
    """Preference records from every label in the store (of `rounds` if given) and the dropped counts."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    labels = [label for label in store.labels() if (include_gold or label["gold"] is None)
              and (rounds is None or label["round"] in rounds)]
    return (majority_pairs if mode == "majority" else all_pairs)(labels)


def export_file(store: Store, out: str | Path, **kwargs) -> dict:
    """Write the pairs as JSONL; returns {"pairs": n, "dropped_<reason>": n, "out": path}."""
    records, dropped = export_pairs(store, **kwargs)
    path = write_jsonl(out, records)
    return {"pairs": len(records), **{f"dropped_{k}": v for k, v in dropped.items()}, "out": str(path)}
