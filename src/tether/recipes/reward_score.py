"""Score prompt/completion records with a reward model: `tether rm score`.

    tether rm score model=runs/rm data=samples.jsonl out=samples.scored.jsonl

Each output line is the input record plus `reward` (normalised, as every consumer sees it; normalize=false for the
raw head output), and `reward_std` for an ensemble (its members' disagreement). Records are {prompt, completion} (the
completion a string or turns), {messages} whose last turn is the assistant's response, or {text} (scored whole); they
are scored in batches, in the RM's training tokenisation (rewards.LearnedReward).

A directory saved by `tether rm` gives the same numbers without tether: AutoModelForSequenceClassification and its
saved tokenizer, on the ids scored here (the prompt's, the completion's, then EOS) right-padded, give exactly
`reward` with normalize=false and `reward` + config.reward_bias with normalize=true (models.portable_reward_model:
the gain is in the head, the bias cannot be).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tether import data as D
from tether.config import ConfigError, at_least, opt
from tether.rewards.learned import LearnedReward


@dataclass
class RMScoreConfig:
    model: str = opt("", "reward model: a `tether rm` run dir, a model dir, an ensemble dir or a Hub ID (required)")
    data: str = opt("", "prompt/completion records (JSONL, Parquet or saved dataset; required)")
    out: str = opt("", "output JSONL (default: <data stem>.scored.jsonl next to the data)")
    batch_size: int = opt(32, "sequences per forward", check=at_least(1))
    chunk: int = opt(1024, "records scored per call (bounds memory for big files)", check=at_least(1))
    normalize: bool = opt(True, "apply the stored gain/bias (false: the raw head output)")
    device: str = opt("", "cpu | cuda | ... (default: cuda when available)")
    skip_invalid: bool = opt(False, "skip invalid records (reported) instead of stopping at the first")

    def validate(self) -> None:
        if not self.model or not self.data:
            raise ConfigError("rm score needs model=DIR and data=FILE")


def prompt_and_completion(record: dict) -> tuple:
    """(prompt, response) of a demonstration record, the response being what is scored:
    - {prompt, completion}: the completion; given as turns (TRL's conversational form), its last turn, after the
      prompt's turns and the completion's earlier ones;
    - {messages}: the last turn;
    - {text}: all of it, after an empty prompt.
    The response must be the assistant's: a conversation that ends with another role raises DataError."""
    if "text" in record and "completion" not in record and "messages" not in record:
        return "", record["text"]
    if "messages" in record:
        turns, name = record["messages"], "messages"
    elif isinstance(record["completion"], list):
        turns, name = list(record["prompt"]) + record["completion"], "completion"
    else:
        return record["prompt"], record["completion"]
    if turns[-1]["role"] != "assistant":
        raise D.DataError(f"ends with a {turns[-1]['role']!r} turn; the scored response is the last turn, the "
                          "assistant's", field=name)
    return turns[:-1], turns[-1]["content"]


def _located(fn, record: dict, path: str, line: int):
    """fn(record), a DataError told at the record's file and line."""
    try:
        return fn(record)
    except D.DataError as e:
        e.path, e.line = path, line
        raise


def run(cfg: RMScoreConfig) -> dict:
    t0 = time.time()
    reward = LearnedReward(cfg.model, batch_size=cfg.batch_size, device=cfg.device or None, normalize=cfg.normalize)
    records = D.load_records(cfg.data, "demonstrations", skip_invalid=cfg.skip_invalid)
    scored = []
    for start in range(0, len(records), cfg.chunk):
        chunk = records[start : start + cfg.chunk]
        lines = records.lines[start : start + cfg.chunk]
        prompts, completions = zip(*(_located(prompt_and_completion, r, cfg.data, n) for r, n in zip(chunk, lines)))
        out = reward(list(prompts), list(completions), chunk)
        for i, record in enumerate(chunk):
            extra = {"reward": float(out.scores[i])}
            if out.std is not None:
                extra["reward_std"] = float(out.std[i])
            scored.append({**record, **extra})
    path = Path(cfg.data)
    out_path = D.write_jsonl(cfg.out or path.with_name(path.stem + ".scored.jsonl"), scored)
    rewards = [r["reward"] for r in scored]
    mean = sum(rewards) / len(rewards)
    return {"out": str(out_path), "records": len(scored), "skipped": len(records.skipped), "reward_mean": mean,
            "reward_std": (sum((x - mean) ** 2 for x in rewards) / len(rewards)) ** 0.5,
            "wall_seconds": time.time() - t0}
