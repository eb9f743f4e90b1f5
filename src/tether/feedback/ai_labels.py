"""`tether label ai`: AI preference labels (RLAIF) on candidate pairs, in the JSONL `label export` writes, plus the
soft label and how it was read.

    tether label ai constitution=reviews data=prefs.jsonl out=ai_prefs.jsonl task=reviews
    tether label ai constitution=hhh.yaml data=candidates.jsonl out=ai_prefs.jsonl     # a server as the judge

`data` holds pairs ({prompt, chosen, rejected}, e.g. from `label export`: the human label is then known) or
candidates ({prompt, responses: [...]}, `label sample`: every pair of responses). Each output record is
    {"prompt", "chosen", "rejected", "prob", "rater": "ai:NAME", "principle", "prob_orders": [p1, p2],
     "human_agrees"?: bool, "hard"?: true}
with chosen the response the judge prefers, prob = P(chosen better) >= 0.5 (swap-averaged), prob_orders the two
readings of P(chosen better) (chosen shown first, chosen shown second), human_agrees whether the input's human label
picked the same response. `tether rm` and `tether dpo` train on `prob` as per-pair label smoothing 1 - prob.

The summary (printed, and written beside `out` as .meta.json): agreement with the human labels (swap-averaged and
first order only), with the task's gold reward and the Bayes ceiling of agreement with the raters (embedded tasks),
the position-consistency rate (the same response wins in both orders) and calibration (expected calibration error
of the judge's confidence in its pick against the human's agreeing, 10 bins).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from tether.config import ConfigError, above, at_least, one_of, opt
from tether.tasks import TASKS


@dataclass
class AILabelConfig:
    constitution: str = opt("reviews", "constitution: a packaged name (reviews, hhh) or a YAML file")
    data: str = opt("", "pairs {prompt, chosen, rejected} or candidates {prompt, responses} (JSONL)")
    out: str = opt("", "AI-labelled pairs JSONL to write (its summary beside it as .meta.json)")
    task: str = opt("", "embedded task whose gold reward the labels are checked against", check=one_of("", *TASKS))
    tau: float = opt(1.0, "the task's simulated raters' noise τ (for the Bayes ceiling)", check=above(0))
    limit: int = opt(0, "label only the first N records (0 = all)", check=at_least(0))
    cache: str = opt("", "on-disk judge cache (SQLite); empty: none")
    device: str = opt("cpu", "device of a local judge model")
    seed: int = opt(0, "principle sampling seed", check=at_least(0))

    def validate(self) -> None:
        if not self.data or not self.out:
            raise ConfigError("label ai needs data=FILE and out=FILE")


# --- pure statistics -------------------------------------------------------------------------------------------------
def agreement(probs: list[float], truths: list[bool]) -> float:
    """Share of pairs where the judge's side (prob > 1/2 means a) matches the truth (True: a better); NaN if none.
    A prob of exactly 1/2 counts half (the judge has no preference)."""
    if not probs:
        return math.nan
    return sum(0.5 if p == 0.5 else float((p > 0.5) == t) for p, t in zip(probs, truths)) / len(probs)


def expected_calibration_error(probs: list[float], outcomes: list[bool], bins: int = 10) -> float:
    """ECE = Σ_b (n_b / n)·|mean prob in b − share of outcomes in b|, equal-width bins over [0, 1] (Guo et al. 2017)."""
    if not probs:
        return math.nan
    groups: dict[int, list[tuple[float, bool]]] = {}
    for p, y in zip(probs, outcomes):
        groups.setdefault(min(bins - 1, int(p * bins)), []).append((p, y))
    return sum(len(g) / len(probs) * abs(sum(p for p, _ in g) / len(g) - sum(y for _, y in g) / len(g))
               for g in groups.values())


def human_calibration_error(p_a: list[float], human: list[bool]) -> float:
    """ECE of the judge's confidence in its own pick, max(p, 1 − p), against whether the human picked the same: the
    same number whichever response of a pair is called a (ECE of P(a) itself changes with that naming: when a is
    always the human's choice, every confident disagreement lands in a low bin whose outcomes are all 1)."""
    return expected_calibration_error([max(p, 1.0 - p) for p in p_a],
                                      [(p >= 0.5) == h for p, h in zip(p_a, human)])


# --- reading the input -----------------------------------------------------------------------------------------------
def read_pairs(path: str, limit: int = 0) -> list[dict]:
    """(prompt, a, b, human) per pair: human True when the input says a is better (pairs: a = chosen; a caller may
    swap a and b and set human False), None when the input says nothing (candidates)."""
    from tether.data import DataError, read_rows, validate_record

    out = []
    for line, row in read_rows(path):
        if isinstance(row, DataError):
            raise row
        if "responses" in row:
            from tether.feedback.candidates import _check_candidate

            validate_record(row, "prompts", path, line)
            try:
                _check_candidate(row)
            except DataError as e:
                e.path, e.line = path, line
                raise
            prompt = row.get("prompt", row.get("messages"))
            out += [{"prompt": prompt, "a": a, "b": b, "human": None} for a, b in combinations(row["responses"], 2)]
        else:
            row = validate_record(row, "pairs", path, line)
            if not isinstance(row["chosen"], str):
                raise DataError("label ai reads string responses (conversational pairs: give the last reply as a "
                                "string)", path, line, field="chosen")
            out.append({"prompt": row["prompt"], "a": row["chosen"], "b": row["rejected"], "human": True})
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError("no pairs", path)
    return out[:limit or None]


def prompt_text(prompt) -> str:
    """A string prompt as it is; chat turns as "Role: content" lines (the RL-CAI conversation)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in prompt)


# --- labelling -------------------------------------------------------------------------------------------------------
def label_pairs(judge, pairs: list[dict], name: str) -> list[dict]:
    """One output record per pair (module docstring)."""
    verdicts = judge.compare([prompt_text(p["prompt"]) for p in pairs], [p["a"] for p in pairs],
                             [p["b"] for p in pairs])
    out = []
    for pair, v in zip(pairs, verdicts):
        a_wins = v.prob >= 0.5
        orders = [v.prob_ab, v.prob_ba] if v.prob_ba is not None else [v.prob_ab]
        record = {"prompt": pair["prompt"], "chosen": pair["a"] if a_wins else pair["b"],
                  "rejected": pair["b"] if a_wins else pair["a"], "prob": v.prob if a_wins else 1.0 - v.prob,
                  "rater": f"ai:{name}", "principle": v.principle,
                  "prob_orders": orders if a_wins else [1.0 - x for x in orders]}
        if pair["human"] is not None:
            record["human_agrees"] = a_wins == pair["human"]
        if v.hard:
            record["hard"] = True
        out.append(record)
    return out


def summarise(pairs: list[dict], records: list[dict], task=None, tau: float = 1.0) -> dict:
    """Agreement, position consistency and calibration of labelled pairs (module docstring)."""
    p_a = [r["prob"] if r["chosen"] == pair["a"] else 1.0 - r["prob"] for pair, r in zip(pairs, records)]
    first = [r["prob_orders"][0] if r["chosen"] == pair["a"] else 1.0 - r["prob_orders"][0]
             for pair, r in zip(pairs, records)]
    summary = {"pairs": len(records), "hard_labels": sum(bool(r.get("hard")) for r in records),
               "mean_prob": sum(r["prob"] for r in records) / len(records)}
    if all(len(r["prob_orders"]) == 2 for r in records):
        summary["position_consistency"] = sum((a - 0.5) * (b - 0.5) > 0 for a, b in
                                              (r["prob_orders"] for r in records)) / len(records)
    known = [i for i, pair in enumerate(pairs) if pair["human"] is not None]
    if known:
        human = [pairs[i]["human"] for i in known]
        summary["agreement_human"] = agreement([p_a[i] for i in known], human)
        summary["agreement_human_one_order"] = agreement([first[i] for i in known], human)
        summary["ece_human"] = human_calibration_error([p_a[i] for i in known], human)
    if task is not None:
        prompts = [pair["prompt"] for pair in pairs]
        ga = task.gold_reward(prompts, [pair["a"] for pair in pairs])
        gb = task.gold_reward(prompts, [pair["b"] for pair in pairs])
        decided = [i for i in range(len(pairs)) if ga[i] != gb[i]]
        summary["agreement_gold"] = agreement([p_a[i] for i in decided], [ga[i] > gb[i] for i in decided])
        summary["agreement_gold_one_order"] = agreement([first[i] for i in decided], [ga[i] > gb[i] for i in decided])
        human = [i for i in decided if pairs[i]["human"] is not None]  # the input's labels against gold
        if human:
            summary["human_agreement_gold"] = agreement([float(pairs[i]["human"]) for i in human],
                                                        [ga[i] > gb[i] for i in human])
        if hasattr(task, "bayes_accuracy"):  # the best any labeller can agree with raters of noise τ
            summary["bayes_ceiling"] = sum(task.bayes_accuracy(ga[i], gb[i], tau) for i in range(len(pairs))) / \
                len(pairs)
    return summary


def run(cfg: AILabelConfig) -> dict:
    from tether.data import write_jsonl
    from tether.rewards.constitution import load_constitution
    from tether.rewards.judge import Judge
    from tether.runfiles import strict_json
    from tether.tasks import get_task

    constitution = load_constitution(cfg.constitution)
    pairs = read_pairs(cfg.data, cfg.limit)
    judge = Judge.from_constitution(constitution, cache=cfg.cache or None, seed=cfg.seed, device=cfg.device)
    records = label_pairs(judge, pairs, constitution.name)
    write_jsonl(cfg.out, records)
    summary = {**summarise(pairs, records, get_task(cfg.task) if cfg.task else None, cfg.tau), "out": cfg.out,
               "constitution": constitution.source, "judge": judge.backend.name}
    Path(cfg.out).with_suffix(".meta.json").write_text(strict_json(summary, indent=2) + "\n")
    return summary

