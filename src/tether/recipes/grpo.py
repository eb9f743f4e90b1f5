"""GRPO, RLOO, Dr. GRPO and REINFORCE++ with verifiable rewards (RLVR): `tether grpo`.

    tether grpo task=arithmetic                          # builds the base model if missing, then GRPO
    tether grpo task=arithmetic estimator=rloo           # leave-one-out baseline
    tether grpo model=DIR prompts=math.jsonl reward=math,format reward_weights=1,0.2 beta=0
    tether grpo model=DIR prompts=p.jsonl reward=python:my_rewards:accuracy   # a TRL-style f(completions, **kw)

One step (docs/reference.md §Group policy gradients), the shape of PPO's (rollout, score, advantages, update, log):
1. `prompts_per_step` prompts per process (ranks draw disjoint prompts), each sampled `group_size` times (rows of a
   prompt are contiguous);
2. every reward function scores every completion (each logged on its own), the weighted sum is the score; a response
   with no EOS gets the soft overlong penalty when `overlong_cache` > 0 (DAPO); with `dynamic_sampling`, groups whose
   scores are all equal carry no signal and are replaced by fresh prompts (bounded tries);
3. advantages from the named estimator (`advantages.ADVANTAGE_ESTIMATORS`), broadcast over response tokens; with a
   reward that scores steps (`reward=prm:DIR`) and `process=true`, the process-supervision advantage instead
   (DeepSeekMath §4.1.3, `advantages.process_advantages`): step rewards normalised over the group, each token's
   advantage the sum of the normalised rewards of the steps ending at or after it;
4. `ppo_epochs` passes of the clipped surrogate (clip-higher via clip_high) aggregated by `aggregation`, plus
   β·k3 KL to the reference in the loss. With β = 0 no reference model is loaded at all;
5. metrics: kl, clipfrac and approx_kl are token means over every micro-batch of the step.
Rollouts come through a queue (distributed/staleness.py): with `max_staleness` = 0 each step samples, then trains
(the on-policy loop); with k > 0 a batch may come from weights k steps old, its ratio is taken against log-probs
recomputed with the current weights and each token weighted by `off_policy_correction` (losses.OFF_POLICY_WEIGHTS).
`backend=ray` runs this same `train` in a Ray actor with the rollout side (`RolloutSide`: the same `collect`,
rewards and prompts) in another (distributed/ray_backend.py); weights are pushed after every optimizer step.
On-policy with one pass the ratio's old log-probs are the update's own, detached (ratio 1 exactly, in any
precision); with more passes they are the sampling-time log-probs (tempered, unfiltered: what a recompute gives in
the same precision, see generation/__init__.py), recomputed only when the trainer runs under bf16 autocast and the
sampler does not, so no extra forward is spent on them otherwise. Losses are divided by counts over the whole step, so
micro-batch size does not change the update.
Default departures from DeepSeekMath, for a tiny model on two CPU cores: G = 8 (paper 64), 1 epoch, lr 1e-4 for 150
steps (measured on `arithmetic`: greedy exact match 0.475 -> 0.84 by step 200 at 1e-4; 2e-5 for 60 steps: 0.58;
3e-4: 0.67, too hot).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import torch

from tether.advantages import ADVANTAGE_ESTIMATORS, kl_penalized_rewards, process_advantages
from tether.config import ConfigError, above, at_least, one_of, opt
from tether.distributed.placement import ScaleFields
from tether.distributed.staleness import EngineProducer, LocalProducer, RolloutQueue
from tether.engine import (
    SCHEDULES,
    CheckpointFields,
    Engine,
    ModelFields,
    OptimizerFields,
    RunFields,
    step_indices,
)
from tether.evaluate import evaluate_policy
from tether.forward import response_outputs
from tether.generation import Rollout, sample_records
from tether.generation.vllm import engine_for
from tether.kl import kl_k3
from tether.losses import (
    AGGREGATIONS,
    OFF_POLICY_WEIGHTS,
    masked_mean,
    off_policy_metrics,
    ppo_policy_loss,
)
from tether.models import LoraSettings, load_causal_lm, load_tokenizer
from tether.prompts import load_task, train_and_held_out
from tether.reference import ReferencePolicy
from tether.rewards import FunctionReward, RewardSource
from tether.rewards.format import soft_overlong_penalty
from tether.rewards.process import step_end_positions
from tether.tasks import TASKS

log = logging.getLogger(__name__)


@dataclass
class GRPOConfig(ScaleFields, ModelFields, CheckpointFields, OptimizerFields, RunFields):
    ALIASES: ClassVar[dict[str, str]] = {"rewards": "reward"}  # the key's old name (before `reward=` everywhere)
    model: str = opt("", "policy to train (default: the task's base model, built if missing)")
    task: str = opt("arithmetic", "embedded task giving prompts and the verifier: arithmetic | reviews | none",
                    check=one_of("", "none", *TASKS))
    base_seed: int = opt(0, "seed of the task's base-model build when `model` is empty (a separate axis from `seed`)")
    prompts: str = opt("", "training prompts with answers/tests (verifiable records); default: the task's")
    eval_prompts: str = opt("", "held-out prompts (default: the task's test split)")
    reward: str = opt("task", "comma list of reward specs: task, math, format, code, python:mod:fn, rm:DIR "
                              "(rewards= is read as reward=)")
    reward_weights: str = opt("", "comma list of weights, one per reward (default: all 1)")
    estimator: str = opt("grpo", "advantage estimator: grpo | dr_grpo | rloo | reinforce_pp",
                         check=one_of(*sorted(ADVANTAGE_ESTIMATORS)))
    aggregation: str = opt("seq-mean-token-mean", "loss aggregation: token-mean | seq-mean-token-mean | "
                           "seq-mean-token-sum-norm", check=one_of(*sorted(AGGREGATIONS)))
    group_size: int = opt(8, "samples per prompt (G; group baselines need two)", check=at_least(2))
    prompts_per_step: int = opt(16, "prompts per optimizer step", check=at_least(1))
    max_new_tokens: int = opt(8, "generation budget per response", check=at_least(1))
    temperature: float = opt(1.0, "sampling temperature (log-probs use logits / T)", check=above(0))
    beta: float = opt(0.04, "KL-in-loss coefficient (k3); 0 = no reference model loaded", check=at_least(0))
    clip_low: float = opt(0.2, "PPO clip ε (lower)", check=above(0))
    clip_high: float = opt(0.2, "PPO clip upper ε (DAPO clip-higher: 0.28)", check=above(0))
    ppo_epochs: int = opt(1, "passes over each batch (1: the ratio is 1 and the loss is the policy gradient)",
                          check=at_least(1))
    process: bool = opt(True, "with a reward that scores steps (prm:DIR): the process-supervision advantage "
                              "(DeepSeekMath §4.1.3); false: the outcome advantage of its solution score")
    dynamic_sampling: bool = opt(False, "drop groups whose scores are all equal and refill them (DAPO)")
    max_refills: int = opt(4, "extra sampling rounds per step for dynamic sampling", check=at_least(0))
    overlong_cache: int = opt(0, "DAPO soft overlong penalty window Lc in tokens (0 = off)", check=at_least(0))
    n_train_prompts: int = opt(4000, "task prompts in the training pool", check=at_least(1))
    n_eval_prompts: int = opt(200, "held-out prompts for accuracy_start / accuracy_end", check=at_least(1))
    eval_every: int = opt(0, "held-out greedy accuracy every N steps (0 = start and end only)", check=at_least(0))
    lr: float = opt(1e-4, "peak learning rate (AdamW)", check=above(0))
    lr_schedule: str = opt("constant", "learning-rate schedule after warmup", check=one_of(*SCHEDULES))
    max_steps: int = opt(150, "optimizer steps", check=at_least(1))
    batch_size: int = opt(64, "rows per forward/backward micro-batch", check=at_least(1))

    def validate(self) -> None:
        super().validate()


def build_rewards(cfg: GRPOConfig, task) -> list[tuple[str, RewardSource, float]]:
    """(name, source, weight) per reward spec; "task" is the task's verifier/gold reward."""
    from tether.rewards.spec import reward_from_spec

    names = [s.strip() for s in cfg.reward.split(",") if s.strip()]
    weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights else [1.0] * len(names)
    if len(weights) != len(names):
        raise ConfigError(f"key 'reward_weights' has {len(weights)} values for {len(names)} rewards")
    out = []
    for name, weight in zip(names, weights):
        if name == "task":
            if task is None:
                raise ConfigError("reward=task needs task=NAME")
            out.append((name, FunctionReward(task.gold_reward, name="task"), weight))
        else:
            out.append((name, reward_from_spec(name), weight))
    return out


def score(rewards, prompts, completions, records) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of every reward source; each source's mean is returned for logging."""
    total, parts, _ = score_with_steps(rewards, prompts, completions, records)
    return total, parts


def score_with_steps(rewards, prompts, completions, records):
    """`score` and the weighted per-step scores of the one source that gives them (a PRM), else None."""
    total, parts, steps = torch.zeros(len(completions)), {}, None
    for name, source, weight in rewards:
        out = source(prompts, completions, records)
        s = out.scores.float().cpu()
        total += weight * s
        parts[f"reward/{name}"] = s.mean().item()
        for sub, values in out.components.items():  # a sum's parts, a rules file's propositions
            if sub != source.name:  # a function repeats its own score under its name
                parts[f"reward/{name}/{sub}"] = values.float().mean().item()
        if out.step_scores is not None:
            if len(rewards) > 1:
                raise ConfigError(f"reward {name!r} scores steps: process supervision takes it as the only reward")
            steps = [[weight * x for x in row] for row in out.step_scores]
    return total, parts, steps


def rollout(cfg, model, tokenizer, records, rewards, generator):
    """Sample G per record; returns rows (records repeated), the Rollout, scores (B,) and reward metrics."""
    samples = sample_records(model, tokenizer, records, cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, generator=generator, return_logprobs=True)
    out = samples.rollout
    scores, parts, steps = score_with_steps(rewards, samples.prompts, samples.completions, samples.records)
    if steps is not None and cfg.process:
        if cfg.dynamic_sampling or cfg.overlong_cache > 0 or cfg.estimator != "grpo":
            raise ConfigError("process supervision (a reward that scores steps, process=true) works with "
                              "estimator=grpo, no dynamic_sampling and no overlong_cache; set process=false")
        parts["steps"] = steps
    if cfg.overlong_cache > 0:
        lengths = out.response_mask.sum(1).float()
        lengths = torch.where(out.has_eos, lengths, torch.full_like(lengths, cfg.max_new_tokens + 1))
        scores = scores + soft_overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_cache)
    return samples.records, out, scores, parts


def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(n_groups,) True where a group's scores are not all equal (only those carry a learning signal)."""
    grouped = scores.view(-1, group_size)
    return (grouped.max(1).values - grouped.min(1).values) > 1e-8


def my_prompts(engine: Engine, cfg, pool: list[dict], draw: int) -> list[dict]:
    """This process's `prompts_per_step` of draw `draw` (a step, or a refill): ranks take disjoint slices of one
    global draw of prompts_per_step × world_size."""
    n = cfg.prompts_per_step
    idx = step_indices(draw, n * engine.world_size, len(pool), cfg.seed)[engine.rank * n : (engine.rank + 1) * n]
    return [pool[i] for i in idx]


def collect(cfg, engine, model, tokenizer, pool, rewards, step, generator) -> tuple:
    """One step's batch; with dynamic sampling, uninformative groups are dropped and refilled from the pool."""
    rows, roll, scores, parts = rollout(cfg, model, tokenizer, my_prompts(engine, cfg, pool, step), rewards,
                                        generator)
    metrics = {**parts, "score": scores.mean().item()}
    if not cfg.dynamic_sampling:
        return rows, roll, scores, metrics
    keep = informative_groups(scores, cfg.group_size)
    metrics["groups_informative"] = keep.float().mean().item()
    pieces = [_select(rows, roll, scores, keep, cfg.group_size)]
    have, tries = int(keep.sum()), 0
    while have < cfg.prompts_per_step and tries < cfg.max_refills:
        tries += 1
        extra = my_prompts(engine, cfg, pool, 10_000 * (step + 1) + tries)
        r2, ro2, s2, _ = rollout(cfg, model, tokenizer, extra, rewards, generator)
        k2 = informative_groups(s2, cfg.group_size)
        need = cfg.prompts_per_step - have
        k2 &= torch.cumsum(k2.long(), 0) <= need
        pieces.append(_select(r2, ro2, s2, k2, cfg.group_size))
        have += int(k2.sum())
    pieces = [p for p in pieces if p[0]]
    if not pieces:
        return [], None, torch.zeros(0), metrics
    rows = [row for rs, _, _ in pieces for row in rs]
    roll = Rollout.cat([r for _, r, _ in pieces], tokenizer.pad_token_id)
    return rows, roll, torch.cat([s for _, _, s in pieces]), metrics


def _select(rows, roll, scores, keep_groups, group_size):
    idx = keep_groups.repeat_interleave(group_size).nonzero()[:, 0]
    return [rows[i] for i in idx.tolist()], roll.rows(idx), scores[idx]


def step_token_ends(tokenizer, roll: Rollout, n_steps: list[int]) -> list[list[int]]:
    """Per row, the response-token index where each step of the decoded response ends (process.step_end_positions);
    the count must equal the reward's steps of that row."""
    ends = []
    for i, n in enumerate(n_steps):
        ids = roll.response_ids[i][roll.response_mask[i].bool()]
        row = step_end_positions(tokenizer, ids)
        if len(row) != n:
            raise ValueError(f"row {i}: the reward scored {n} steps but the response has {len(row)}")
        ends.append(row)
    return ends


def compute_advantages(cfg, estimator, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) advantages of the named estimator: per token (REINFORCE++), or per sequence broadcast over tokens."""
    if estimator.per_token:
        token_rewards = kl_penalized_rewards(scores, torch.zeros_like(mask), mask, 0.0)
        return estimator.fn(token_rewards, mask)
    return estimator.fn(scores, cfg.group_size)[:, None].expand_as(mask)


def trainer_logprobs(cfg, model, seq, attn, plen) -> torch.Tensor:
    """Log-probs of the sampled tokens under the trainer's current weights and precision, without gradients."""
    with torch.no_grad():
        return torch.cat([response_outputs(model, seq[i : i + cfg.batch_size], attn[i : i + cfg.batch_size],
                                           plen, cfg.temperature, padding_free=cfg.padding_free).logprobs
                          for i in range(0, len(seq), cfg.batch_size)])


def off_policy(cfg, model, seq, attn, mask, plen, behaviour: torch.Tensor, lag: int, same_precision: bool = True):
    """(old log-probs for the ratio or None, token weights or None, metrics) of a batch sampled `lag` versions ago.

    On-policy from tether's sampler (lag 0, or correction none) nothing is recomputed: with one pass (`ppo_epochs`
    1) old is None and the update takes its own detached log-probs, so the ratio is exactly 1 in any precision;
    with more passes the sampler's log-probs are the old ones, unless the trainer runs under an autocast the
    sampler does not (`same_precision` False), when they are recomputed in the trainer's precision. A stale batch,
    or one from another engine (vLLM), gets log-probs recomputed with the current weights (the proximal policy of
    decoupled PPO) and the named correction's weights of proximal against behaviour (docs/reference.md
    §Off-policy correction); behaviour_kl is then the trainer-vs-engine KL."""
    same_engine = lag == 0 and cfg.generation_backend == "tether"
    if same_engine or cfg.off_policy_correction == "none":
        metrics = off_policy_metrics(behaviour, behaviour, mask, torch.ones_like(mask)) if cfg.max_staleness else {}
        metrics = {k: float(v) for k, v in metrics.items()}
        if cfg.ppo_epochs == 1 and same_engine:
            return None, None, metrics
        if not same_precision and same_engine:
            return trainer_logprobs(cfg, model, seq, attn, plen), None, metrics
        return behaviour, None, metrics
    proximal = trainer_logprobs(cfg, model, seq, attn, plen)
    weights = OFF_POLICY_WEIGHTS[cfg.off_policy_correction](proximal, behaviour, mask, cfg.off_policy_cap)
    return proximal, weights, {k: float(v) for k, v in off_policy_metrics(proximal, behaviour, mask, weights).items()}


def grpo_update(cfg, engine: Engine, model, roll: Rollout, adv: torch.Tensor, reference, step: int,
                lag: int = 0) -> dict:
    """`ppo_epochs` passes over the step's rows in micro-batches of `batch_size`, one optimizer step per pass.

    Losses are divided by counts over the whole step (all ranks), so the micro-batch size does not change the
    update; kl, clipfrac and approx_kl come back as token means over every micro-batch. A batch sampled `lag`
    versions ago is corrected by `off_policy`."""
    seq, attn = roll.sequences.to(engine.device), roll.attention_mask.to(engine.device)
    mask = roll.response_mask.to(engine.device).float()
    plen = roll.prompt_ids.shape[1]
    old, weights, off = off_policy(cfg, model, seq, attn, mask, plen, roll.logprobs.to(engine.device), lag,
                                   same_precision=engine.autocast_dtype is None)
    ref = None if reference is None else reference.logprobs(seq, attn, plen, cfg.temperature, cfg.padding_free)
    n_rows = len(seq)
    denominator = {"token-mean": engine.all_sum(mask.sum()), "seq-mean-token-mean": engine.all_sum(n_rows),
                   "seq-mean-token-sum-norm": engine.all_sum(n_rows) * cfg.max_new_tokens}[cfg.aggregation]
    sums, tokens, stats = {}, 0.0, {}
    for _epoch in range(cfg.ppo_epochs):
        chunks = list(range(0, n_rows, cfg.batch_size))
        for j, i in enumerate(chunks):
            sl = slice(i, i + cfg.batch_size)
            logprobs = response_outputs(model, seq[sl], attn[sl], plen, cfg.temperature,
                                        padding_free=cfg.padding_free).logprobs
            old_sl = logprobs.detach() if old is None else old[sl]
            loss, pg = ppo_policy_loss(logprobs, old_sl, adv[sl], mask[sl], cfg.clip_low, cfg.clip_high,
                                       cfg.aggregation, denominator, None if weights is None else weights[sl])
            n = float(mask[sl].sum())
            parts = {"clipfrac": float(pg["clipfrac"]), "approx_kl": float(pg["approx_kl"])}
            if ref is not None:
                kl = kl_k3(logprobs, ref[sl])
                loss = loss + cfg.beta * AGGREGATIONS[cfg.aggregation](kl, mask[sl], denominator)
                parts["kl"] = masked_mean(kl.detach(), mask[sl]).item()
            engine.backward(loss, step, last_micro=j == len(chunks) - 1)
            engine.count_tokens(int(attn[sl].sum()))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * n
            tokens += n
        stats = engine.optimizer_step()
    return {**stats, **{k: v / max(tokens, 1.0) for k, v in sums.items()}, **off}


def held_out_reward(model, tokenizer, rewards, records, cfg) -> float:
    """The run's own reward (the weighted sum) of greedy completions of the held-out prompts: what a run without a
    task's verifier reports, under that name, instead of an accuracy it cannot measure."""
    s = sample_records(model, tokenizer, records, 1, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                       batch_size=256)
    return float(score(rewards, s.prompts, s.completions, s.records)[0].mean())


def greedy_step_accuracy(model, tokenizer, task, records, cfg) -> float:
    """Share of held-out greedy completions whose every step is right (a task with `step_accuracy`)."""
    s = sample_records(model, tokenizer, records, 1, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                       batch_size=256)
    return sum(task.step_accuracy(s.prompts, s.completions, s.records)) / max(1, len(records))


def greedy_accuracy(model, tokenizer, task, records, cfg) -> float:
    result = evaluate_policy(model, tokenizer, task, records, n_samples=1, max_new_tokens=cfg.max_new_tokens,
                             temperature=0.0, batch_size=256, seed=cfg.seed)
    return result.get("accuracy", result.get("gold_mean", float("nan")))


def prompt_pool(cfg, task, rewards) -> tuple[list[dict], list[dict]]:
    """(training pool, held-out prompts) of the task or the prompt files."""
    kind = "verifiable" if any(name in ("math", "code") for name, _, _ in rewards) or (
        task is not None and getattr(task, "RECORD_KIND", "prompts") == "verifiable") else "prompts"
    return train_and_held_out(cfg.prompts, cfg.eval_prompts, task, cfg.n_train_prompts, cfg.n_eval_prompts,
                              cfg.seed, kind)


def step_generator(cfg, ranks, step: int) -> torch.Generator:
    """The sampling generator of `step` on this rank: the same wherever the rollout runs."""
    return torch.Generator(device=ranks.device).manual_seed(cfg.seed * 1_000_003 + ranks.rank * 7919 + step)


class RolloutSide:
    """The rollout side of a run in another process (backend=ray): its own copy of the policy, the tokenizer, the
    rewards and the prompt pool; `produce` is the local backend's `collect`, seeded the same way."""

    def __init__(self, cfg: GRPOConfig):
        task = load_task(cfg.task)
        self.cfg, self.rewards = cfg, build_rewards(cfg, task)
        self.pool, _ = prompt_pool(cfg, task, self.rewards)
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_causal_lm(cfg.model, LoraSettings.from_config(cfg)).eval()
        self.ranks = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))

    def produce(self, step: int):
        return collect(self.cfg, self.ranks, self.model, self.tokenizer, self.pool, self.rewards, step,
                       step_generator(self.cfg, self.ranks, step))


def run(cfg: GRPOConfig) -> dict:
    task = load_task(cfg.task)
    if not cfg.model:
        if task is None:
            raise ConfigError("grpo needs model=DIR or task=NAME")
        cfg.model = str(task.build_base(seed=cfg.base_seed))
    build_rewards(cfg, task)  # a reward that cannot be called is an error before any model loads or actor starts
    if cfg.backend == "ray":  # the same `train`, in a Ray actor, with a RolloutSide in another
        from tether.distributed.ray_backend import launch

        return launch(cfg, train, RolloutSide)
    return train(cfg)


def train(cfg: GRPOConfig, producer=None) -> dict:
    """The loop; `producer` gives the rollouts (default: sampled here by the policy being trained)."""
    task = load_task(cfg.task)
    rewards = build_rewards(cfg, task)
    pool, held = prompt_pool(cfg, task, rewards)
    engine = Engine(cfg, "grpo")
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, LoraSettings.from_config(cfg)).to(engine.device)
    reference = ReferencePolicy(model, dtype=engine.autocast_dtype) if cfg.beta > 0 else None  # LoRA: adapters off
    model, _, _ = engine.setup(model, cfg.max_steps)
    start, extra = engine.resume()
    policy = engine.unwrap(model)
    figure = "accuracy" if task is not None else "reward"  # a task's verifier, else the run's own reward

    def measure() -> float:
        with engine.full_weights():
            if task is not None:
                return greedy_accuracy(policy, tokenizer, task, held, cfg)
            return held_out_reward(policy, tokenizer, rewards, held, cfg)

    start_value = extra[f"{figure}_start"] if f"{figure}_start" in extra else measure()  # never re-measured
    state = {f"{figure}_start": start_value}
    log.info("grpo: held-out greedy %s at start %.3f", figure, start_value)
    has_steps = task is not None and hasattr(task, "step_accuracy")  # the steps' own correctness, beside the outcome
    if has_steps:
        state["step_accuracy_start"] = extra.get("step_accuracy_start",
                                                 greedy_step_accuracy(policy, tokenizer, task, held, cfg))
    estimator = ADVANTAGE_ESTIMATORS[cfg.estimator]
    metrics: dict = {}
    vllm = engine_for(cfg) if producer is None else None
    if vllm is not None:  # built once; the same rollout function samples it
        producer = EngineProducer(vllm, lambda sampler, s: collect(
            cfg, engine, sampler, tokenizer, pool, rewards, s, step_generator(cfg, engine, s)))
    producer = producer or LocalProducer(
        lambda s: collect(cfg, engine, policy, tokenizer, pool, rewards, s, step_generator(cfg, engine, s)))
    queue = RolloutQueue(cfg.max_staleness, producer, end=cfg.max_steps)
    producer.load_weights(policy, start)  # a remote engine starts from the trainer's weights (a resumed run's too)

    for step in range(start, cfg.max_steps):
        with engine.full_weights():
            batch = queue.next(step, version=step)  # sampled now, or up to max_staleness versions ago
        rows, roll, scores, metrics = batch.payload
        if cfg.max_staleness:
            metrics["version_lag"] = step - batch.version
        if roll is None:  # every group uninformative even after refills: nothing to learn this step
            engine.log(step, metrics)
            continue
        mask = roll.response_mask.to(engine.device).float()
        steps = metrics.pop("steps", None)
        if steps is not None:  # process supervision: per-step rewards placed at each step's last token
            ends = step_token_ends(tokenizer, roll, [len(r) for r in steps])
            adv = process_advantages(steps, ends, mask, cfg.group_size)
        else:
            adv = compute_advantages(cfg, estimator, scores.to(engine.device), mask)
        metrics.update(grpo_update(cfg, engine, model, roll, adv, reference, step, lag=step - batch.version),
                       length=mask.sum(1).mean().item(), eos_rate=roll.has_eos.float().mean().item())
        producer.load_weights(policy, step + 1)  # a remote rollout engine receives them; a local one shares them
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            metrics[figure] = measure()
        engine.log(step, metrics)
        engine.maybe_checkpoint(step, extra=state)

    end_value = measure()
    if has_steps:
        state["step_accuracy_end"] = greedy_step_accuracy(policy, tokenizer, task, held, cfg)
    engine.save_checkpoint(cfg.max_steps, extra=state)
    engine.save_model(model, tokenizer)
    return engine.finish({
        f"{figure}_start": start_value, f"{figure}_end": end_value, "kl_end": metrics.get("kl", float("nan")),
        **{k: v for k, v in state.items() if k.startswith("step_accuracy")},
        "estimator": cfg.estimator, "steps": cfg.max_steps, "tokens_per_second": engine.tokens_per_second(),
    })
