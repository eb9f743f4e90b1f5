"""`tether loop`: iterated RLHF, round after round of sample -> label -> reward model on all labels -> PPO.

    tether loop task=reviews rounds=2                                  # unattended, simulated raters
    tether loop --config loop.yaml raters=human port=8000              # people label in the web app
    tether loop --help                                                 # every key, rm_* and ppo_* included

Setup (once): the start policy is `model`, or, when empty, the task's base model fine-tuned on the task's
demonstrations (stage out/sft, keys sft_*). Then each round k, in out/round-k:
1. sample: `n` responses from the current policy to `prompts_per_round` prompts (the task's train prompts, or
   `prompts`) -> candidates.jsonl -> items of round k in the feedback database (out/feedback.sqlite by default);
2. label: raters=simulated: `sim_raters` simulated raters (the `reviews` task's Bradley-Terry raters with noise
   `sim_tau`) take items from the same queue people use, `raters_per_item` per item; raters=human: the web app
   serves on host:port (add raters first with `tether label add-rater NAME --db DB`) and the loop waits until every
   item of the round has its `raters_per_item` labels;
3. reward model: trained from the start policy on ALL labels so far (majority vote export, feedback/export.py),
   keys rm_*, in out/round-k/rm;
4. PPO from the current policy against that reward model, keys ppo_*, in out/round-k/ppo; its output is the next
   round's policy. The KL tether is to the policy the round started from (the reference moves with the rounds, as
   in the iterated online RLHF of Bai et al. 2022 and Llama 2).
With a task, every round reports the gold reward of the policy before and after its PPO stage (held-out prompts) and
of the round's samples; summary.json and loop.jsonl hold the table. A round that finished is skipped when the loop
runs again; an unfinished one continues (its candidates, labels and finished stages are kept).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tether.config import ConfigError, above, at_least, between, one_of, opt
from tether.data import load_records, write_jsonl
from tether.feedback.store import Store
from tether.recipes.demo import DEMO_DEFAULTS
from tether.recipes.pipeline import STAGES, Stage, prefixed_fields, run_stage
from tether.runfiles import strict_json, write_atomic
from tether.tasks import TASKS

log = logging.getLogger(__name__)

RATERS = ("simulated", "human")
# the demo's measured settings for the reviews task, with fewer PPO steps per round (there are several rounds)
LOOP_DEFAULTS = {**{k: v for k, v in DEMO_DEFAULTS.items() if k.split("_")[0] in STAGES}, "ppo_max_steps": 30}


@dataclass
class LoopBase:
    out: str = opt("runs/loop", "run directory: sft/, round-1/, round-2/, ..., feedback.sqlite, loop.jsonl")
    model: str = opt("", "start policy (default: the task's base model after SFT on the task's demonstrations)")
    task: str = opt("reviews", "embedded task: prompts, gold reward per round, the simulated raters' taste",
                    check=one_of("", *TASKS))
    rounds: int = opt(3, "rounds of sample -> label -> RM -> PPO", check=at_least(1))
    raters: str = opt("simulated", "simulated (unattended) | human (serve the web app and wait for labels)",
                      check=one_of(*RATERS))
    prompts: str = opt("", "prompt records to draw each round's prompts from (default: the task's train prompts)")
    prompts_per_round: int = opt(64, "prompts sampled per round", check=at_least(1))
    n: int = opt(2, "responses per prompt (every pair of distinct responses is an item)", check=at_least(2))
    max_new_tokens: int = opt(48, "response budget of the candidates", check=at_least(1))
    temperature: float = opt(1.0, "sampling temperature of the candidates (> 0: greedy responses are all alike)",
                             check=above(0))
    raters_per_item: int = opt(1, "R: raters who label each item", check=at_least(1))
    sim_raters: int = opt(3, "simulated: how many raters share the queue (at least raters_per_item)",
                          check=at_least(1))
    sim_tau: float = opt(1.0, "simulated: Bradley-Terry noise τ, P(a over b) = σ((gold_a − gold_b)/τ)",
                         check=above(0))
    db: str = opt("", "feedback database (default: out/feedback.sqlite)")
    host: str = opt("127.0.0.1", "human: interface the web app listens on")
    port: int = opt(8000, "human: port of the web app", check=between(1, 65535))
    poll_seconds: float = opt(5.0, "human: how often the loop checks whether the round is labelled", check=above(0))
    n_sft: int = opt(2000, "demonstrations from the task for the setup SFT (only when `model` is empty)",
                     check=at_least(1))
    seed: int = opt(0, "random seed of every stage and of the simulated raters", check=at_least(0))
    base_seed: int = opt(0, "seed of the task's base-model build when `model` is empty (a separate axis from `seed`)")
    progress: bool = opt(True, "show progress bars")

    def validate(self) -> None:
        if self.raters == "simulated" and self.task != "reviews":
            raise ConfigError("raters=simulated needs task=reviews (its gold reward is the simulated raters' taste)")
        if self.raters == "simulated" and self.sim_raters < self.raters_per_item:
            raise ConfigError("key 'sim_raters' must be at least raters_per_item")
        if not self.task and not (self.model and self.prompts):
            raise ConfigError("without a task, give both model and prompts")

    def stage_list(self) -> list[str]:
        return ["rm", "ppo"]

    @classmethod
    def stage_table(cls) -> dict[str, Stage]:
        return STAGES


LoopConfig = dataclasses.make_dataclass(
    "LoopConfig", prefixed_fields(STAGES, LOOP_DEFAULTS), bases=(LoopBase,), namespace={"__module__": __name__})


# --- setup ----------------------------------------------------------------------------------------------------------
def start_policy(cfg, task) -> str:
    """`model`, or the task's base model after SFT on its demonstrations (stage out/sft)."""
    if cfg.model:
        return cfg.model
    if task is None or not hasattr(task, "sft_demonstrations"):
        raise ConfigError("key 'model' is empty and the task has no demonstrations to fine-tune a start policy on")
    demos = write_jsonl(Path(cfg.out) / "data" / "sft.jsonl", task.sft_demonstrations(cfg.n_sft, cfg.seed))
    run_stage(cfg, "sft", {"model": str(task.build_base(seed=cfg.base_seed)), "data": str(demos)})
    return str(Path(cfg.out) / "sft" / "model")


def round_prompts(cfg, task, k: int) -> list[dict]:
    """The prompts of round k: a seeded draw from `prompts`, else from the task's train split."""
    if cfg.prompts:
        pool = list(load_records(cfg.prompts, "prompts"))
        return random.Random(f"{cfg.seed}-{k}").sample(pool, min(cfg.prompts_per_round, len(pool)))
    return task.prompts("train", cfg.prompts_per_round, seed=cfg.seed * 1000 + k)


# --- one round ------------------------------------------------------------------------------------------------------
def sample_round(cfg, policy: str, task, k: int, path: Path) -> list[dict]:
    """candidates.jsonl of round k (kept when it exists, so a resumed round labels the same items)."""
    from tether.feedback.candidates import make_candidates, read_candidates
    from tether.models import load_causal_lm, load_tokenizer

    if path.exists():
        return read_candidates(path)
    model, tokenizer = load_causal_lm(policy), load_tokenizer(policy)
    records = make_candidates(model, tokenizer, round_prompts(cfg, task, k), cfg.n, seed=cfg.seed * 1000 + k,
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    write_jsonl(path, records)
    return records


def simulated_raters(store: Store, count: int) -> list:
    """Raters sim-1..sim-count, registered once (their tokens are never needed: they use the store directly)."""
    names = store.rater_names()
    for i in range(1, count + 1):
        if f"sim-{i}" not in names.values():
            store.add_rater(f"sim-{i}")
    ids = {name: rid for rid, name in store.rater_names().items()}
    return [ids[f"sim-{i}"] for i in range(1, count + 1)]


def label_simulated(cfg, store: Store, task, k: int) -> int:
    """Simulated raters take turns at the queue until it is empty for all of them; returns labels stored."""
    from tether.tasks.reviews import rater_prefers

    rng = random.Random(f"raters-{cfg.seed}-{k}")
    raters, stored = simulated_raters(store, cfg.sim_raters), 0
    while raters:
        for rater_id in list(raters):
            item = store.next_item(rater_id, rng)
            if item is None:
                raters.remove(rater_id)
                continue
            gold_a, gold_b = task.gold_reward([item.prompt] * 2, [item.a, item.b])
            choice = "A" if rater_prefers(gold_a, gold_b, cfg.sim_tau, rng) else "B"
            stored += store.submit(rater_id, item.id, choice)[1]
    return stored


def wait_for_humans(cfg, store: Store, k: int, url: str) -> None:
    """Block until every item of round k has its R labels, saying how far it is now and then."""
    said = None
    while True:
        status = store.round_status(k)
        if status["complete"] >= status["items"]:
            return
        if status != said:
            log.info("round %d: %d of %d items labelled by %d raters; raters work at %s", k, status["complete"],
                     status["items"], store.raters_per_item, url)
            said = status
        time.sleep(cfg.poll_seconds)


def train_round(cfg, start: str, policy: str, round_dir: Path, prefs: Path) -> tuple[dict, dict]:
    """RM from the start policy on the labels so far, then PPO from the current policy against it."""
    round_cfg = dataclasses.replace(cfg, out=str(round_dir))
    rm = run_stage(round_cfg, "rm", {"model": start, "data": str(prefs), "task": cfg.task})
    ppo = run_stage(round_cfg, "ppo", {"model": policy, "reward": f"rm:{round_dir / 'rm'}", "task": cfg.task})
    return rm, ppo


def run_round(cfg, store: Store, task, start: str, policy: str, k: int, url: str) -> dict:
    from tether.feedback.export import export_file

    round_dir = Path(cfg.out) / f"round-{k}"
    done = round_dir / "round.json"
    if done.exists():
        return json.loads(done.read_text())
    candidates = sample_round(cfg, policy, task, k, round_dir / "candidates.jsonl")
    store.add_items(candidates, round=k)
    if cfg.raters == "simulated":
        label_simulated(cfg, store, task, k)
    else:
        wait_for_humans(cfg, store, k, url)
    exported = export_file(store, round_dir / "prefs.jsonl")
    if not exported["pairs"]:
        raise ConfigError(f"round {k}: no preference pairs yet (every item tied or both bad); label more items")
    rm, ppo = train_round(cfg, start, policy, round_dir, round_dir / "prefs.jsonl")
    row = {"round": k, "items": store.round_status(k)["items"], "labels": len(store.labels()),
           "pairs": exported["pairs"], "rm_eval_accuracy": rm.get("eval_accuracy"),
           "gold_start": ppo.get("gold_reward_start"), "gold_end": ppo.get("gold_reward_end"),
           "kl_end": ppo.get("kl_end"), "policy": str(round_dir / "ppo" / "model")}
    if task is not None:
        responses = [r for c in candidates for r in c["responses"]]
        prompts = [c["prompt"] for c in candidates for _ in c["responses"]]
        row["sample_gold"] = sum(task.gold_reward(prompts, responses)) / len(responses)
    write_atomic(done, strict_json(row, indent=2) + "\n")
    return row


# --- the recipe -----------------------------------------------------------------------------------------------------
def run(cfg) -> dict:
    from tether.tasks import get_task

    task = get_task(cfg.task) if cfg.task else None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Store(cfg.db or out / "feedback.sqlite")
    store.set_meta("raters_per_item", str(cfg.raters_per_item))
    start = start_policy(cfg, task)
    rows, policy = [], start
    with ExitStack() as stack:
        url = ""
        if cfg.raters == "human":
            from tether.feedback.app import BackgroundServer, create_app

            url = stack.enter_context(BackgroundServer(create_app(store), cfg.host, cfg.port)).url
            if not store.rater_names():
                log.warning("no raters yet: add them with `tether label add-rater NAME --db %s --url %s`",
                            store.path, url)
        for k in range(1, cfg.rounds + 1):
            row = run_round(cfg, store, task, start, policy, k, url)
            log.info("round %d: %s", k, row)
            rows.append(row)
            policy = row["policy"]
    write_jsonl(out / "loop.jsonl", rows)
    summary = {"rounds": len(rows), "policy": policy, "labels": rows[-1]["labels"], "per_round": rows,
               "gold_reward_round_0": rows[0]["gold_start"],
               **{f"gold_reward_round_{r['round']}": r["gold_end"] for r in rows}}
    write_atomic(out / "summary.json", strict_json(summary, indent=2) + "\n")
    return summary
