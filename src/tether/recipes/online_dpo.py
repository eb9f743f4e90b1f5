"""Online (iterative) DPO: `tether dpo online` samples its pairs from the policy it trains, round after round.

    tether dpo online model=runs/sft/model task=reviews label_source=raters rounds=4 pairs_per_round=256
    tether dpo online model=... task=reviews label_source=rm:runs/rm           # a reward model labels
    tether dpo online model=... task=reviews label_source=gold                 # the hidden gold reward (oracle)
    tether dpo online model=... prompts=prompts.jsonl label_source=python:my_rewards:score

Each round r (the loss, training and held-out keys — loss, beta, lr, batch_size, LoRA, ... — are `tether dpo`'s):
1. sample: the next `pairs_per_round` training prompts, two responses each from the CURRENT policy at `temperature`;
2. label: `raters` asks the task's simulated raters (Bradley–Terry on the gold reward, noise τ = label_tau), any other
   source is a reward spec (gold = the task's gold reward, rm:DIR, python:mod:fn, built-ins, weighted sums) and the
   higher score is chosen. A response that ended (EOS) beats one that did not; pairs where neither ended, the two
   texts are equal or the scores tie are dropped;
3. reference log-probs of the new pairs under the FIXED reference — the starting policy (a frozen copy, or with LoRA
   its base with adapters off) — once per round, cached in rounds/round-R/ (keyed: dpo.reference_key);
4. train `epochs` passes over the round's pairs (`max_steps` > 0: that many steps per round) with dpo.train_step;
   then, with a task, gold reward and KL on held-out prompts (evals.jsonl) and label statistics (rounds.jsonl).
Every round's pairs are kept (rounds/round-R/pairs.jsonl), so a resumed run trains on exactly the pairs it sampled.
`generation_backend=vllm`: a vLLM engine (rank 0's, built once) samples the pairs, given the policy's weights at the
start of every round (generation/vllm.py).

This is on-policy DPO as in Guo et al. 2024 (online AI feedback) and iterative DPO (Xu et al. 2023; Dong et al. 2024),
with one departure: the reference stays the SFT model instead of becoming the last round's policy, so the KL that
every round reports is to the same model PPO and offline DPO are measured against.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

import torch

from tether import data as D
from tether.config import ConfigError, above, at_least, opt
from tether.distributed.placement import SamplerFields
from tether.distributed.sync import named_merged_weights
from tether.engine import Engine, TrainConfig, steps_for
from tether.evaluate import append_eval
from tether.generation import sample_records
from tether.generation.vllm import engine_for
from tether.losses import PREFERENCE_LOSSES
from tether.models import LoraSettings, load_causal_lm, load_tokenizer
from tether.prompts import load_prompts, load_task
from tether.recipes.dpo import (
    HeldOutFields,
    PreferenceFields,
    encode,
    held_out,
    held_out_records,
    reference_logps,
    start_evaluation,
    summarize,
    train_step,
)
from tether.reference import ReferencePolicy
from tether.runfiles import strict_json


@dataclass
class OnlineDPOConfig(HeldOutFields, PreferenceFields, SamplerFields, TrainConfig):
    model: str = opt("", "policy to train, usually the SFT model (also the reference; required)")
    prompts: str = opt("", "training prompts (default: the task's train split)")
    rounds: int = opt(3, "rounds of sample -> label -> train", check=at_least(1))
    pairs_per_round: int = opt(256, "prompts per round, two responses each", check=at_least(1))
    label_source: str = opt("raters", "raters (the task's simulated raters) | gold | rm:DIR | python:mod:fn")
    label_tau: float = opt(1.0, "raters: Bradley-Terry noise τ of the simulated raters", check=above(0))
    temperature: float = opt(1.0, "sampling temperature of the pairs (> 0: two greedy responses are equal)",
                             check=above(0))
    lr: float = opt(5e-6, "peak learning rate (AdamW)", check=above(0))

    def validate(self) -> None:
        super().validate()
        if not PREFERENCE_LOSSES[self.loss].paired:  # `loss` is one of PREFERENCE_LOSSES (its declared check)
            paired = sorted(k for k, v in PREFERENCE_LOSSES.items() if v.paired)
            raise ConfigError(f"key 'loss': online DPO samples pairs; choose one of {paired}, got {self.loss!r}")
        if not self.model:
            raise ConfigError("dpo online needs model=DIR")
        if not (self.prompts or self.task):
            raise ConfigError("dpo online needs prompts=FILE or task=NAME")
        if self.label_source in ("raters", "gold") and not self.task:
            raise ConfigError(f"label_source={self.label_source} needs task=NAME (its gold reward)")


# --- labelling: (prompts, a, b, records) -> [True (a chosen) | False (b chosen) | None (drop)] ---------------------
def rater_labeler(task, tau: float, seed: int):
    """The task's simulated raters: a preferred with probability σ((gold(a) − gold(b))/τ)."""
    if not hasattr(task, "rater_prefers"):
        raise ConfigError(f"task {task.__name__} has no simulated raters; use label_source=gold or a reward spec")
    rng = random.Random(f"online-raters-{seed}")
    if hasattr(task, "rater_labels"):  # raters whose utility is not the gold reward (tasks.sycophancy)
        return lambda prompts, a, b, records: task.rater_labels(prompts, a, b, records, tau, rng)

    def label(prompts, a, b, records):
        gold_a, gold_b = task.gold_reward(prompts, a, records), task.gold_reward(prompts, b, records)
        return [task.rater_prefers(x, y, tau, rng) for x, y in zip(gold_a, gold_b)]

    return label


def score_labeler(source):
    """A reward source: the higher score is chosen; equal scores carry no preference."""

    def label(prompts, a, b, records):
        score_a = source(prompts, a, records).scores.tolist()
        score_b = source(prompts, b, records).scores.tolist()
        return [None if x == y else x > y for x, y in zip(score_a, score_b)]

    return label


def make_labeler(cfg, task):
    if cfg.label_source == "raters":
        return rater_labeler(task, cfg.label_tau, cfg.seed)
    if cfg.label_source == "gold":
        from tether.rewards import FunctionReward

        return score_labeler(FunctionReward(task.gold_reward, name="gold"))
    from tether.rewards.spec import reward_from_spec

    return score_labeler(reward_from_spec(cfg.label_source))


def pairs_from_groups(groups: list[dict], labels: list) -> list[dict]:
    """Preference records from two-response groups and their labels, with the EOS and tie rules of the docstring."""
    pairs = []
    for g, a_wins in zip(groups, labels):
        (a, b), (eos_a, eos_b) = g["completions"], g["has_eos"]
        if eos_a != eos_b:
            a_wins = eos_a  # the response that ended wins, whatever the label
        elif not eos_a or a_wins is None or a.strip() == b.strip() or not a.strip() or not b.strip():
            continue
        chosen, rejected = (a, b) if a_wins else (b, a)
        pairs.append({"prompt": g["prompt"], "chosen": chosen, "rejected": rejected})
    return pairs


def round_stats(groups: list[dict], pairs: list[dict], task) -> dict:
    """How the round's samples and labels look: kept pairs, mean gold of the samples, labels that agree with gold."""
    stats = {"pairs": len(pairs), "dropped": len(groups) - len(pairs)}
    if task is not None and pairs:
        texts = [c for g in groups for c in g["completions"]]
        rows = [g["record"] for g in groups for _ in g["completions"]]  # a verifier's gold needs the answers
        stats["sample_gold"] = sum(task.gold_reward([""] * len(texts), texts, rows)) / len(texts)
        by_prompt = {str(g["prompt"]): g["record"] for g in groups}
        records = [by_prompt[str(p["prompt"])] for p in pairs]
        gold_c = task.gold_reward([p["prompt"] for p in pairs], [p["chosen"] for p in pairs], records)
        gold_r = task.gold_reward([p["prompt"] for p in pairs], [p["rejected"] for p in pairs], records)
        stats["label_gold_agreement"] = sum(c > r for c, r in zip(gold_c, gold_r)) / len(pairs)
    return stats


# --- one round's data ----------------------------------------------------------------------------------------------
def round_prompts(prompts: list[dict], r: int, n: int) -> list[dict]:
    """Round r's slice of the (cycled) prompt list."""
    return [prompts[(r * n + i) % len(prompts)] for i in range(n)]


def prepare_round(cfg, engine: Engine, policy, reference, tokenizer, labeler, task, prompts, r: int, spec,
                  sampler=None):
    """Sample + label round r (or read the pairs a previous run sampled), encode, reference log-probs (cached).
    `sampler` (generation_backend=vllm, rank 0): the engine that samples, given the policy's weights first."""
    round_dir = engine.run_dir / "rounds" / f"round-{r}"
    path = round_dir / "pairs.jsonl"
    if engine.is_main and not (cfg.resume and path.exists()):  # one sampler; every process reads its pairs
        records = round_prompts(prompts, r, cfg.pairs_per_round)
        generator = torch.Generator(engine.device).manual_seed(engine.seed * 1_000_003 + r)
        groups = sample_records(policy if sampler is None else sampler, tokenizer, records, 2,
                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, generator=generator,
                                max_prompt_len=cfg.max_prompt_len, batch_size=64).groups(2)
        labels = labeler([g["prompt"] for g in groups], [g["completions"][0] for g in groups],
                         [g["completions"][1] for g in groups], [g["record"] for g in groups])
        pairs = pairs_from_groups(groups, labels)
        if not pairs:
            raise RuntimeError(f"online DPO round {r}: no usable pair among {len(groups)} samples (see docstring)")
        D.write_jsonl(path, pairs)
        with (engine.run_dir / "rounds.jsonl").open("w" if r == 0 else "a") as f:
            f.write(strict_json({"round": r, **round_stats(groups, pairs, task)}) + "\n")
    engine.accelerator.wait_for_everyone()
    examples = encode(cfg, tokenizer, True, str(path))
    ref = reference_logps(engine, reference, examples, cfg, spec, tokenizer.pad_token_id,
                          round_dir) if spec.needs_reference else None
    return examples, ref


# --- the recipe ----------------------------------------------------------------------------------------------------
def run(cfg: OnlineDPOConfig) -> dict:
    spec = PREFERENCE_LOSSES[cfg.loss]
    engine = Engine(cfg, "dpo")
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, LoraSettings.from_config(cfg)).to(engine.device)
    task = load_task(cfg.task)
    prompts = load_prompts(cfg.prompts, task, "train", None if cfg.prompts else cfg.rounds * cfg.pairs_per_round,
                           cfg.seed)
    labeler = make_labeler(cfg, task)
    held = held_out_records(cfg, task) if task else []
    reference = ReferencePolicy(model, dtype=engine.autocast_dtype).model  # fixed: the starting policy
    per_round = cfg.max_steps or steps_for(cfg.pairs_per_round, engine.global_batch, cfg.epochs, 0)
    total = cfg.rounds * per_round
    model, _, _ = engine.setup(model, total, cfg.pairs_per_round)
    start, extra = engine.resume()
    policy = engine.unwrap(model)
    start_eval = start_evaluation(cfg, engine, policy, reference, tokenizer, task, held, start, extra)
    model.train()

    sampler = engine_for(cfg) if engine.is_main else None  # vllm: the one sampler, given each round's weights
    metrics, end_eval = {}, start_eval
    for r in range(start // per_round, cfg.rounds):
        if cfg.generation_backend == "vllm":
            weights = list(named_merged_weights(policy))  # LoRA merged in; every rank gathers (FSDP2)
            if sampler is not None:
                sampler.push(weights, version=r)
        examples, ref = prepare_round(cfg, engine, policy, reference, tokenizer, labeler, task, prompts, r, spec,
                                      sampler)
        if sampler is not None:
            sampler.sleep()  # vllm_sleep: the round's training gets the GPU's memory
        fields = (False, False)  # sampled pairs carry no weight or margin
        for step in range(max(start, r * per_round), (r + 1) * per_round):
            metrics = train_step(engine, model, examples, ref, spec, cfg, tokenizer.pad_token_id, step,
                                 data_step=step - r * per_round, fields=fields)
            metrics["round"] = r
            engine.log(step, metrics)
            engine.maybe_checkpoint(step, extra={"start_eval": start_eval})
        if task is not None:
            end_eval = held_out(cfg, policy, reference, tokenizer, task, held)
            if engine.is_main:
                append_eval(engine.run_dir, (r + 1) * per_round, {"round": r, **end_eval})

    engine.save_checkpoint(total, extra={"start_eval": start_eval})
    engine.save_model(model, tokenizer)
    summary = summarize(cfg, engine, metrics, total, start_eval, end_eval if task else {})
    rounds = [json.loads(x) for x in (engine.run_dir / "rounds.jsonl").read_text().splitlines()] \
        if (engine.run_dir / "rounds.jsonl").exists() else []
    summary.update(rounds=cfg.rounds, pairs_total=sum(x["pairs"] for x in rounds),
                   label_gold_agreement=_mean([x.get("label_gold_agreement") for x in rounds]))
    return engine.finish(summary)


def _mean(values: list) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else math.nan
