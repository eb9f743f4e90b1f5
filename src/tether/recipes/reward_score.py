"""Score prompt/completion records with a reward model: `tether rm score`.

    tether rm score model=runs/rm data=samples.jsonl out=samples.scored.jsonl

Each output line is the input record plus `reward` (normalised, as every consumer sees it; normalize=false for the
raw head output), and `reward_std` for an ensemble (its members' disagreement). Records are {prompt, completion}, or
{messages} whose last turn is the assistant's response; they are scored in batches, in the RM's training tokenisation
(rewards.LearnedReward).

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
    """(prompt, completion) of a demonstration record; for a chat, the last turn is the response."""
    if "messages" in record:
        return record["messages"][:-1], record["messages"][-1]["content"]
    return record["prompt"], record["completion"]


def run(cfg: RMScoreConfig) -> dict:
    t0 = time.time()
    reward = LearnedReward(cfg.model, batch_size=cfg.batch_size, device=cfg.device or None, normalize=cfg.normalize)
    records = D.load_records(cfg.data, "demonstrations", skip_invalid=cfg.skip_invalid)
    scored = []
    for start in range(0, len(records), cfg.chunk):
        chunk = records[start : start + cfg.chunk]
        prompts, completions = zip(*(prompt_and_completion(r) for r in chunk))
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
