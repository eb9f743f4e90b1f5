"""PPO against a reward with a KL tether to the reference policy: stage 3 of InstructGPT, `tether ppo`.

    tether ppo model=runs/sft/model reward=rm:runs/rm task=reviews out=runs/ppo
    tether ppo model=runs/sft/model reward=rm:runs/rm prompts=prompts.jsonl lora_r=16
    tether ppo model=... reward="rm:runs/rm*1.0+format*0.5" kl_controller=adaptive kl_target=6

One step, as InstructGPT and "The N+ implementation details of RLHF with PPO" describe it (docs/reference.md §PPO):
1. rollout: `rollout_batch` prompts, one response each, sampled at temperature T (top_k 0, top_p 1), cut after the
   first EOS; the reward source scores prompt+response, and a response without EOS gets `missing_eos_penalty` instead.
2. one no-grad forward of the policy+value container gives old log-probs (from logits / T) and values; one of the
   reference (the frozen SFT model, or with LoRA the policy's base with adapters off) gives ref log-probs.
3. per-token rewards r_t = −β·kl_t (k1 by default) plus the score at the last token (advantages.kl_penalized_rewards);
   a process reward (reward=prm:DIR) puts each step's score at the token that ends the step instead (`step_rewards`),
   or β·kl in the loss instead (`kl_in_loss`); GAE (γ, λ); advantages whitened over the batch.
4. `ppo_epochs` passes over the batch in `num_minibatches` shuffled minibatches, each accumulated over micro-batches of
   `batch_size` rows: clipped surrogate + vf_coef·clipped value loss − ent_coef·entropy (+ ptx_coef·NLL on
   demonstrations, InstructGPT's PPO-ptx). Losses are token sums over the minibatch's global token count.
5. β controller update (fixed / adaptive (Ziegler) / uncertainty-adaptive), metrics, checkpoint.

Policy and value live in ONE module (`PolicyAndValue`) so the engine's single optimizer, DDP wrapper and checkpoints
cover both; the KL controller is registered with the engine, and every random draw of a step (sampling, minibatch
order, ptx batches) comes from a generator seeded by (seed, rank, step), so a resumed run repeats the uninterrupted one.
Who samples: tether's sampler over the policy being trained, or with `generation_backend=vllm` a vLLM engine built
once and given the weights after every step (generation/vllm.py); the old log-probs are the trainer's own either
way, and the engine's KL to them is logged each step (`behaviour_kl`). `backend=ray` runs the same `train` in a Ray
actor beside a rollout actor (distributed/ray_backend.py).
Held-out evaluation (`evaluate.evaluate_policy` plus the proxy reward) runs before the first step (the SFT policy) and
after the last; summary.json compares them.

Departures from the N+ defaults, for a tiny model on two CPU cores (the `reviews` task):
- lr 1e-5 instead of 3e-6 and temperature 1.0 instead of 0.7: a model of a few million parameters moves little at
  3e-6 within a few hundred rollouts, and T = 0.7 makes its samples too alike for the advantages to carry signal.
- rollout_batch 64 with 4 minibatches instead of 512 in 1: hundreds of updates fit in minutes this way.
- The LR schedule is constant by default (N+ decays linearly to 0 over a budget of 10^6 episodes).
The formulas are the papers'; tests/test_losses.py, test_advantages.py and test_kl.py check them by hand.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tether import data as D
from tether.advantages import gae, kl_penalized_rewards
from tether.config import ConfigError, above, at_least, between, one_of, opt
from tether.distributed.placement import PlacementFields, SamplerFields
from tether.distributed.staleness import EngineProducer, LocalProducer, RolloutQueue
from tether.engine import (
    SCHEDULES,
    CheckpointFields,
    Engine,
    ModelFields,
    OptimizerFields,
    RunFields,
    step_indices,
    steps_for,
)
from tether.evaluate import append_eval, held_out_eval
from tether.forward import PolicyAndValue, completion_nll, token_outputs
from tether.generation import Rollout, sample_records
from tether.generation.vllm import engine_for
from tether.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, UncertaintyKLController
from tether.losses import (
    masked_mean,
    masked_sum,
    masked_whiten,
    off_policy_metrics,
    ppo_policy_loss,
    value_loss,
)
from tether.metrics import distinct_n, explained_variance, repetition_rate
from tether.models import LoraSettings, load_causal_lm, load_reward_model, load_tokenizer
from tether.prompts import load_task, train_and_held_out
from tether.reference import ReferencePolicy
from tether.rewards.process import scatter_step_scores, step_end_positions
from tether.tasks import TASKS

log = logging.getLogger(__name__)


@dataclass
class PPOConfig(PlacementFields, SamplerFields, ModelFields, CheckpointFields, OptimizerFields, RunFields):
    model: str = opt("", "policy to train: the SFT model directory (also the reference policy; required)")
    reward: str = opt("", "reward spec: rm:DIR (a `tether rm` output), python:mod:fn, a built-in, or weighted sums")
    value_model: str = opt("", "value model init (default: the reward model of `reward` if it is rm:DIR, else `model`)")
    task: str = opt("", "embedded task (reviews, arithmetic): prompts when `prompts` is empty, and its gold reward",
                    check=one_of("", "none", *TASKS))
    prompts: str = opt("", "training prompts: JSONL, Parquet or saved dataset of {prompt} or {messages}")
    eval_prompts: str = opt("", "held-out prompts (default: the task's test split, or n_eval_prompts held out)")
    n_train_prompts: int = opt(2000, "training prompts drawn from the task (task only)", check=at_least(1))
    n_eval_prompts: int = opt(64, "held-out prompts for the start/end evaluation", check=at_least(1))
    eval_samples: int = opt(2, "samples per held-out prompt in evaluations", check=at_least(1))
    eval_every: int = opt(0, "also evaluate every N steps, written to evals.jsonl (0 = only start and end)",
                          check=at_least(0))
    rollout_batch: int = opt(64, "prompts per PPO step (per process), one response each", check=at_least(1))
    batch_size: int = opt(16, "rows per forward/backward in the update (micro-batch); accumulated to a minibatch",
                          check=at_least(1))
    max_prompt_len: int = opt(64, "prompt tokens kept (cut from the left)", check=at_least(1))
    max_new_tokens: int = opt(48, "response budget; a response without EOS by then gets missing_eos_penalty",
                              check=at_least(1))
    temperature: float = opt(1.0, "sampling temperature; log-probs for the loss come from logits / temperature",
                             check=above(0))
    missing_eos_penalty: float | None = opt(-1.0, "score of a response without EOS (none = keep the reward's score)")
    kl_coef: float = opt(0.05, "β of the KL penalty (initial β for adaptive controllers); 0 = no tether",
                         check=at_least(0))
    kl_estimator: str = opt("k1", "per-token KL estimator in the reward (k1 | k2 | k3); k3 or k2 with kl_in_loss",
                            check=one_of(*sorted(KL_ESTIMATORS)))
    kl_controller: str = opt("fixed", "β controller: fixed | adaptive (Ziegler) | uncertainty (reward ensemble std)",
                             check=one_of("adaptive", "fixed", "uncertainty"))  # the keys of CONTROLLERS below
    kl_target: float = opt(6.0, "adaptive: target sequence KL in nats", check=above(0))
    kl_horizon: int = opt(10000, "adaptive: horizon in episodes", check=at_least(1))
    kl_uncertainty_coef: float = opt(1.0, "uncertainty: β = β0·(1 + c·(σ/σ_first − 1)), clamped to [0, kl_max]",
                                     check=at_least(0))
    kl_max: float = opt(1.0, "uncertainty: upper bound of β", check=at_least(0))
    kl_in_loss: bool = opt(False, "put β·KL in the loss (GRPO style) instead of the reward")
    gamma: float = opt(1.0, "GAE discount γ", check=between(0, 1))
    lam: float = opt(0.95, "GAE λ", check=between(0, 1))
    whiten_rewards: bool = opt(False, "whiten per-token rewards over the batch (N+: off, it shortens outputs)")
    cliprange: float = opt(0.2, "PPO ratio clip ε", check=above(0))
    cliprange_value: float = opt(0.2, "value clip ε_v around the rollout's values", check=above(0))
    vf_coef: float = opt(0.1, "weight of the value loss", check=at_least(0))
    ent_coef: float = opt(0.0, "weight of the entropy bonus", check=at_least(0))
    ppo_epochs: int = opt(4, "passes over each rollout batch", check=at_least(1))
    num_minibatches: int = opt(4, "minibatches per pass (one optimizer step each)", check=at_least(1))
    ptx_coef: float = opt(0.0, "γ_ptx: weight of the NLL on `ptx_data` added to the loss (InstructGPT PPO-ptx)",
                          check=at_least(0))
    ptx_data: str = opt("", "demonstrations for the ptx term ({prompt, completion} or {messages})")
    share_reference: bool = opt(True, "with LoRA, the reference is the base with adapters off (one copy of weights)")
    reward_batch_size: int = opt(64, "sequences per reward-model forward", check=at_least(1))
    lr: float = opt(1e-5, "peak learning rate (AdamW) of policy and value", check=above(0))
    adam_eps: float = opt(1e-5, "AdamW epsilon (N+: 1e-5)", check=above(0))
    lr_schedule: str = opt("constant", "learning-rate schedule after warmup: constant | linear | cosine",
                           check=one_of(*SCHEDULES))
    max_steps: int = opt(100, "PPO steps (rollout batches); 0 = `epochs` passes over the prompts", check=at_least(0))
    epochs: float = opt(1.0, "passes over the training prompts when max_steps is 0", check=above(0))

    def validate(self) -> None:
        super().validate()
        if not self.model or not self.reward:
            raise ConfigError("ppo needs model=DIR and reward=SPEC (e.g. reward=rm:runs/rm)")
        if not (self.prompts or self.task):
            raise ConfigError("ppo needs prompts=FILE or task=NAME")
        if self.kl_in_loss and self.kl_estimator == "k1":
            raise ConfigError("kl_in_loss=true needs kl_estimator=k3 or k2: k1 as a loss has zero expected gradient")
        if self.rollout_batch % self.num_minibatches:
            raise ConfigError(f"rollout_batch ({self.rollout_batch}) must be a multiple of num_minibatches "
                              f"({self.num_minibatches})")
        if self.lora_dropout:
            raise ConfigError("PPO needs dropout off (N+): set lora_dropout=0")
        if self.ptx_coef and not self.ptx_data:
            raise ConfigError("ptx_coef > 0 needs ptx_data=FILE")


CONTROLLERS = {
    "fixed": lambda cfg: FixedKLController(cfg.kl_coef),
    "adaptive": lambda cfg: AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon),
    "uncertainty": lambda cfg: UncertaintyKLController(cfg.kl_coef, cfg.kl_uncertainty_coef, 0.0, cfg.kl_max),
}


# --- setup --------------------------------------------------------------------------------------------------------------
def value_init_dir(cfg: PPOConfig) -> str:
    """The value model starts from the reward model (N+); a reward that is not one RM leaves the policy's trunk."""
    if cfg.value_model:
        return cfg.value_model
    spec = cfg.reward.strip()
    if spec.startswith("rm:") and "+" not in spec and "*" not in spec:
        from tether.rewards.learned import reward_model_dirs

        return str(reward_model_dirs(spec[3:])[0])
    return cfg.model


def load_reward(cfg: PPOConfig, device):
    """A reward source from the spec; a bare directory means rm:DIR."""
    from tether.rewards.spec import reward_from_spec

    spec = f"rm:{cfg.reward}" if Path(cfg.reward).is_dir() else cfg.reward
    return reward_from_spec(spec, device=device, batch_size=cfg.reward_batch_size)


def raw_proxy_mean(source, scores: torch.Tensor) -> float | None:
    """Mean RM output before the stored gain/bias: (normalised / gain) + mean bias, when all members share the gain."""
    models = getattr(source, "models", None)
    if not models:
        return None
    def raw(config, key):  # a saved model folds its gain into the head and keeps the originals under reward_raw_*
        return getattr(config, f"reward_raw_{key}", getattr(config, f"reward_{key}", 1.0 if key == "gain" else 0.0))

    gains = {raw(m.config, "gain") for m in models}
    if len(gains) != 1:
        return None
    bias = sum(raw(m.config, "bias") for m in models) / len(models)
    return float(scores.mean()) / gains.pop() + bias


def memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; the current resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- rollout ------------------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One PPO batch: everything the update needs, (B, ·) tensors on the training device."""

    sequences: torch.Tensor  # (B, P+T) left-padded prompt + right-padded response
    attention_mask: torch.Tensor  # (B, P+T)
    response_mask: torch.Tensor  # (B, T) 1 on response tokens up to and including the first EOS
    prompt_len: int  # P
    logprobs: torch.Tensor  # (B, T) old log-probs from logits / T
    ref_logprobs: torch.Tensor  # (B, T)
    values: torch.Tensor  # (B, T) V(s_t), the state before response token t
    scores: torch.Tensor  # (B,) reward of each response (missing-EOS penalty applied)
    step_rewards: torch.Tensor | None = None  # (B, T) a process reward's step scores at each step's last token
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T)

    def rows(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k)[idx] for k in ("sequences", "attention_mask", "response_mask", "logprobs",
                                                    "ref_logprobs", "values", "advantages", "returns")}


@torch.no_grad()
def forward_in_chunks(model, sequences, attention_mask, prompt_len: int, temperature: float, chunk: int,
                      padding_free: bool = True):
    """Old log-probs, values and entropy of the response tokens from the policy+value container, `chunk` rows at once.

    Returns (B, T) each: log π(a_t) from logits / T, V(s_t) read at the position that predicts a_t, and H_t. The
    policy's forwards (here and in the update) do not share repeated prompts between rows, the reference's do: the
    figures of benchmarks/RESULTS.md were measured so, and the two layouts round differently.
    """
    out = []
    for i in range(0, len(sequences), chunk):
        o = token_outputs(model, sequences[i : i + chunk], attention_mask[i : i + chunk], temperature,
                          entropy=True, padding_free=padding_free).columns(prompt_len - 1)
        out.append((o.logprobs, o.values, o.entropy))
    return [torch.cat(parts) for parts in zip(*out)]


@dataclass
class Sampled:
    """One step's responses and their scores, from wherever they were sampled (this process or a rollout actor),
    and the state of the step's generator after sampling: the update draws its minibatch order from it, so a
    remote rollout gives the numbers of a local one."""

    records: list[dict]
    prompts: list[str]
    completions: list[str]
    rollout: Rollout
    scored: object  # the reward source's RewardOutput
    gen_seconds: float
    generator_state: torch.Tensor
    generator_device: str
    raw_mean: float | None = None  # mean RM output before the stored gain/bias (raw_proxy_mean)
    source_name: str | None = None  # the reward source's name (a function's own score is not logged twice)

    def generator(self) -> torch.Generator:
        g = torch.Generator(self.generator_device)
        g.set_state(self.generator_state)
        return g


def step_records(cfg: PPOConfig, train: list[dict], step: int, rank: int, world_size: int) -> list[dict]:
    """This process's `rollout_batch` prompts of `step` (ranks take disjoint slices of one global draw)."""
    idx = step_indices(step, cfg.rollout_batch * world_size, len(train), cfg.seed)
    return [train[i] for i in idx[rank * cfg.rollout_batch : (rank + 1) * cfg.rollout_batch]]


def step_generator(process_seed: int, step: int, device) -> torch.Generator:
    """Every random draw of a step (sampling, then minibatch order and ptx batches) comes from this generator;
    `process_seed` is the engine's (seed + rank · 100,003)."""
    return torch.Generator(device).manual_seed(process_seed * 1_000_003 + step)


@torch.no_grad()
def sample_and_score(cfg: PPOConfig, policy, reward, tokenizer, records: list[dict],
                     generator: torch.Generator) -> Sampled:
    """One response per prompt at temperature T, and the reward source's scores of them."""
    t0 = time.time()
    samples = sample_records(policy, tokenizer, records, 1, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, generator=generator, max_prompt_len=cfg.max_prompt_len,
                             return_logprobs=cfg.generation_backend == "vllm")  # the engine's, against the trainer's
    gen_seconds = time.time() - t0
    scored = reward(samples.prompts, samples.completions, records)
    return Sampled(records, samples.prompts, samples.completions, samples.rollout, scored, gen_seconds,
                   generator.get_state(), str(generator.device), raw_proxy_mean(reward, scored.scores.float()),
                   getattr(reward, "name", None))


@torch.no_grad()
def rollout(cfg: PPOConfig, model, reference: ReferencePolicy, reward, tokenizer, records: list[dict],
            generator: torch.Generator, device) -> tuple[Batch, dict, tuple]:
    """Sample, score, and compute old/ref log-probs and values for one batch of prompts.

    Returns (batch, metrics, (prompts, completions)).
    """
    policy = getattr(model, "module", model).policy
    return score_batch(cfg, model, reference, tokenizer, sample_and_score(cfg, policy, reward, tokenizer, records,
                                                                          generator), device)


@torch.no_grad()
def score_batch(cfg: PPOConfig, model, reference: ReferencePolicy, tokenizer, sampled: Sampled,
                device) -> tuple[Batch, dict, tuple]:
    """The trainer's side of a rollout: old log-probs and values from the policy+value container, the reference's
    log-probs, the missing-EOS penalty, and the rollout's metrics."""
    out: Rollout = sampled.rollout
    gen_seconds, scored = sampled.gen_seconds, sampled.scored
    prompts, completions = sampled.prompts, sampled.completions
    proxy = scored.scores.float().to(device)  # (B,)
    has_eos = out.has_eos.to(device)
    scores = proxy if cfg.missing_eos_penalty is None else torch.where(
        has_eos, proxy, torch.full_like(proxy, cfg.missing_eos_penalty))

    sequences, attention_mask = out.sequences.to(device), out.attention_mask.to(device)
    response_mask = out.response_mask.to(device).float()
    P = out.prompt_ids.shape[1]
    t1 = time.time()
    logprobs, values, entropy = forward_in_chunks(model, sequences, attention_mask, P, cfg.temperature,
                                                  cfg.batch_size, cfg.padding_free)
    ref_logprobs = reference.logprobs(sequences, attention_mask, P, cfg.temperature,
                                      cfg.padding_free).to(device).float()
    forward_seconds = time.time() - t1
    batch = Batch(sequences, attention_mask, response_mask, P, logprobs, ref_logprobs, values, scores)
    if scored.step_scores is not None:  # a process reward (prm:DIR): rewards at the step boundaries
        batch.step_rewards = step_rewards(tokenizer, out, scored.step_scores).to(device)

    kl_tokens = logprobs - ref_logprobs  # (B, T) k1
    lengths = response_mask.sum(-1)
    response_tokens = [ids[: int(n)].tolist() for ids, n in zip(out.response_ids, lengths)]
    metrics = {
        "reward": proxy.mean(),
        "score": scores.mean(),
        "kl": masked_sum(kl_tokens, response_mask, dim=-1).mean(),
        "kl_k3": masked_sum(KL_ESTIMATORS["k3"](logprobs, ref_logprobs), response_mask, dim=-1).mean(),
        "entropy": masked_mean(entropy, response_mask),
        "response_length": lengths.mean(),
        "eos_rate": has_eos.float().mean(),
        "distinct_2": distinct_n(completions, 2),
        "repetition_rate": sum(repetition_rate(t, 2) for t in response_tokens) / len(response_tokens),
        "gen_tokens_per_second": float(lengths.sum()) / max(gen_seconds, 1e-9),
        "time_generate": gen_seconds,
        "time_forward": forward_seconds,
    }
    if out.logprobs is not None:  # another engine sampled (vLLM): KL of its log-probs to the trainer's, each step
        metrics["behaviour_kl"] = off_policy_metrics(logprobs, out.logprobs.to(device), response_mask,
                                                     torch.ones_like(response_mask))["behaviour_kl"]
    if sampled.raw_mean is not None:
        metrics["reward_raw"] = sampled.raw_mean
    if scored.std is not None:
        metrics["reward_std"] = scored.std.float().mean()
    for name, component in scored.components.items():
        if len(scored.components) > 1 or name != sampled.source_name:  # not a function's own score again
            metrics[f"reward/{name}"] = component.float().mean()
    return batch, metrics, (prompts, completions)


def step_rewards(tokenizer, out: Rollout, step_scores: list[list[float]]) -> torch.Tensor:
    """(B, T) step k's score at the response token where step k ends (process.step_end_positions), zero elsewhere
    and on every row without EOS (that row keeps only the missing-EOS penalty)."""
    ends = []
    for i, scores in enumerate(step_scores):
        ids = out.response_ids[i][out.response_mask[i].bool()]
        row = step_end_positions(tokenizer, ids) if out.has_eos[i] else []
        if out.has_eos[i] and len(row) != len(scores):
            raise ValueError(f"row {i}: the reward scored {len(scores)} steps but the response has {len(row)}")
        ends.append(row)
    kept = [scores if out.has_eos[i] else [] for i, scores in enumerate(step_scores)]
    return scatter_step_scores(kept, ends, out.response_mask.shape[1])


def compute_advantages(cfg: PPOConfig, batch: Batch, beta: float) -> None:
    """Per-token KL-penalised rewards -> GAE -> whitened advantages, stored on the batch (docs/reference.md §PPO).

    With a process reward the sequence score is replaced by the step scores at the step boundaries (a row without
    EOS keeps its missing-EOS penalty at its last token instead)."""
    mask = batch.response_mask
    kl = KL_ESTIMATORS[cfg.kl_estimator](batch.logprobs, batch.ref_logprobs)  # (B, T)
    terminal = batch.scores
    if batch.step_rewards is not None:
        terminal = torch.where(batch.step_rewards.abs().sum(-1) > 0, torch.zeros_like(batch.scores), batch.scores)
    rewards = kl_penalized_rewards(terminal, kl, mask, 0.0 if cfg.kl_in_loss else beta)
    if batch.step_rewards is not None:
        rewards = rewards + batch.step_rewards
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, batch.values, mask, cfg.gamma, cfg.lam)
    batch.advantages, batch.returns = masked_whiten(advantages, mask), returns


# --- update -------------------------------------------------------------------------------------------------------------
def ppo_loss(cfg: PPOConfig, model, mb: dict, prompt_len: int, n_tokens: float, beta: float):
    """Loss of one micro-batch: clipped surrogate + vf_coef·clipped value loss − ent_coef·entropy (+ β·KL in loss).

    Every term is a token sum divided by `n_tokens`, the response tokens of the whole global minibatch.
    """
    mask = mb["response_mask"]
    out = token_outputs(model, mb["sequences"], mb["attention_mask"], cfg.temperature, entropy=cfg.ent_coef != 0,
                        entropy_grad=True, padding_free=cfg.padding_free).columns(prompt_len - 1)  # (b, T) each
    pg_loss, pg_stats = ppo_policy_loss(out.logprobs, mb["logprobs"], mb["advantages"], mask, cfg.cliprange,
                                        denominator=n_tokens)
    vf_loss, vf_stats = value_loss(out.values, mb["values"], mb["returns"], mask, cfg.cliprange_value,
                                   denominator=n_tokens)
    loss = pg_loss + cfg.vf_coef * vf_loss
    if cfg.ent_coef:
        loss = loss - cfg.ent_coef * masked_sum(out.entropy, mask) / n_tokens
    if cfg.kl_in_loss:
        kl = KL_ESTIMATORS[cfg.kl_estimator](out.logprobs, mb["ref_logprobs"])
        loss = loss + beta * masked_sum(kl, mask) / n_tokens
    return loss, {"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(), **pg_stats, **vf_stats}


def ptx_loss(model, batch: dict, n_tokens: float, padding_free: bool = True) -> torch.Tensor:
    """PPO-ptx: summed NLL of demonstration completion tokens / n_tokens (InstructGPT, docs/reference.md §PPO)."""
    return completion_nll(getattr(model, "module", model).policy, batch, n_tokens, padding_free)


LOSS_SHARES = {"loss", "pg_loss", "vf_loss", "ptx_loss"}  # per micro-batch: its part of the minibatch's loss


def ppo_update(cfg: PPOConfig, engine: Engine, model, batch: Batch, step: int, beta: float,
               generator: torch.Generator, ptx: list | None = None, pad_id: int = 0) -> dict:
    """`ppo_epochs` × `num_minibatches` optimizer steps over one rollout batch; returns the mean of each metric."""
    B = len(batch.sequences)
    sums: dict[str, float] = {}
    count = 0
    for _epoch in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator).to(batch.sequences.device)
        for mb_idx in order.chunk(cfg.num_minibatches):
            micro = mb_idx.split(cfg.batch_size)
            n_tokens = engine.all_sum(batch.response_mask[mb_idx].sum())
            ptx_batches = ptx_micro_batches(ptx, generator, len(micro), cfg.batch_size, pad_id, engine.device)
            n_ptx = engine.all_sum(sum(int((b["labels"][:, 1:] != -100).sum()) for b in ptx_batches))
            for j, idx in enumerate(micro):
                loss, stats = ppo_loss(cfg, model, batch.rows(idx), batch.prompt_len, n_tokens, beta)
                if ptx_batches:
                    nll = ptx_loss(model, ptx_batches[j], n_ptx, cfg.padding_free)
                    loss, stats["ptx_loss"] = loss + cfg.ptx_coef * nll, nll.detach()
                engine.backward(loss, step, last_micro=j == len(micro) - 1)
                engine.count_tokens(int(batch.attention_mask[idx].sum()))
                for k, v in {"loss": loss.detach(), **stats}.items():  # shares add up, means average
                    sums[k] = sums.get(k, 0.0) + float(v) / (1 if k in LOSS_SHARES else len(micro))
            for k, v in engine.optimizer_step().items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    for k in sorted(LOSS_SHARES & sums.keys()):  # this process's share of the global minibatch loss
        sums[k] = engine.all_sum(sums[k])  # the same global value on every process
    return {k: v / count for k, v in sums.items()}


def ptx_micro_batches(examples: list | None, generator: torch.Generator, n: int, size: int, pad_id: int,
                      device) -> list[dict]:
    """n micro-batches of `size` demonstrations drawn with the step's generator (the ptx term's data); [] without."""
    if not examples:
        return []
    picks = torch.randint(len(examples), (n, size), generator=generator).tolist()
    return [{k: v.to(device) for k, v in D.collate_lm([examples[i] for i in row], pad_id).items()} for row in picks]


# --- evaluation ---------------------------------------------------------------------------------------------------------
def evaluate(cfg: PPOConfig, policy, reference: ReferencePolicy, reward, tokenizer, task, records: list[dict],
             seed: int) -> tuple[dict, list[dict]]:
    """Held-out numbers of the current policy: gold, KL, length, ... (evaluate.evaluate_policy) plus proxy reward."""
    return held_out_eval(policy, tokenizer, task, records, n_samples=cfg.eval_samples,
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, ref_model=reference.model,
                         batch_size=cfg.rollout_batch, seed=seed, reward=reward)


def summarize_eval(prefix: str, result: dict) -> dict:
    keys = {"proxy_reward": "proxy_mean", "gold_reward": "gold_mean", "gold_reward_std": "gold_std", "kl": "kl_mean",
            "length": "length_mean", "eos_rate": "eos_rate", "distinct_2": "distinct_2"}
    return {f"{name}_{prefix}": result[key] for name, key in keys.items() if key in result}


# --- the recipe ---------------------------------------------------------------------------------------------------------
class RolloutSide:
    """The rollout side of a run in another process (backend=ray): its own copy of the policy, the tokenizer, the
    reward source and the training prompts; `produce` is the local backend's sampling and scoring, seeded the
    same way. Old and reference log-probs and values stay with the trainer."""

    def __init__(self, cfg: PPOConfig):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a GPU when the actor was given one
        task = load_task(cfg.task)
        self.cfg, self.device = cfg, device
        self.train, _ = train_and_held_out(cfg.prompts, cfg.eval_prompts, task, cfg.n_train_prompts,
                                           cfg.n_eval_prompts, cfg.seed)
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_causal_lm(cfg.model, LoraSettings.from_config(cfg)).to(device).eval()
        self.reward = load_reward(cfg, device)

    def produce(self, step: int) -> Sampled:
        records = step_records(self.cfg, self.train, step, 0, 1)
        return sample_and_score(self.cfg, self.model, self.reward, self.tokenizer, records,
                                step_generator(self.cfg.seed, step, self.device))


def run(cfg: PPOConfig) -> dict:
    if cfg.backend == "ray":  # the same `train`, in a Ray actor, with a RolloutSide in another
        from tether.distributed.ray_backend import launch

        load_reward(cfg, "cpu")  # a reward that cannot be loaded is an error before any actor starts
        return launch(cfg, train, RolloutSide, name="ppo")
    return train(cfg)


def train(cfg: PPOConfig, producer=None) -> dict:
    """The loop; `producer` gives each step's sampled and scored responses (default: sampled here by the policy
    being trained; generation_backend=vllm: a vLLM engine of this process; backend=ray: a remote rollout actor;
    both receive the weights after every step)."""
    engine = Engine(cfg, "ppo")
    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    task = load_task(cfg.task)
    tokenizer = load_tokenizer(cfg.model)
    train_prompts, held = train_and_held_out(cfg.prompts, cfg.eval_prompts, task, cfg.n_train_prompts,
                                             cfg.n_eval_prompts, cfg.seed)

    lora = LoraSettings.from_config(cfg)
    policy = load_causal_lm(cfg.model, lora).to(device)
    reference = ReferencePolicy(policy, cfg.share_reference, engine.autocast_dtype)
    value = load_reward_model(value_init_dir(cfg), lora).to(device)
    reward = load_reward(cfg, device)
    controller = CONTROLLERS[cfg.kl_controller](cfg)
    engine.register(controller)
    ptx = None
    if cfg.ptx_coef:
        ptx = [D.encode_demonstration(tokenizer, r, cfg.max_prompt_len, cfg.max_new_tokens)
               for r in D.load_records(cfg.ptx_data, "demonstrations")]

    global_rollout = cfg.rollout_batch * engine.world_size
    n_steps = steps_for(len(train_prompts), global_rollout, cfg.epochs, cfg.max_steps)
    updates_per_step = cfg.ppo_epochs * cfg.num_minibatches
    model, _, _ = engine.setup(PolicyAndValue(policy, value), n_steps * updates_per_step)
    engine.total_steps = n_steps  # progress, logging and checkpoints count PPO steps; the schedule counts updates
    start, extra = engine.resume()
    policy = engine.unwrap(model).policy
    vllm = engine_for(cfg) if producer is None else None
    if vllm is not None:  # built once; the weights pushed after every step
        producer = EngineProducer(vllm, lambda sampler, s: sample_and_score(
            cfg, sampler, reward, tokenizer, step_records(cfg, train_prompts, s, engine.rank, engine.world_size),
            step_generator(engine.seed, s, device)))
    producer = producer or LocalProducer(lambda s: sample_and_score(
        cfg, policy, reward, tokenizer, step_records(cfg, train_prompts, s, engine.rank, engine.world_size),
        step_generator(engine.seed, s, device)))
    queue = RolloutQueue(0, producer, end=n_steps)  # PPO trains on-policy: each step samples, then trains
    producer.load_weights(policy, start)  # a remote engine starts from the trainer's weights (a resumed run's too)

    peak = memory_mb(device)
    start_eval = extra.get("start_eval")
    if start_eval is None:
        start_eval, samples = evaluate(cfg, policy, reference, reward, tokenizer, task, held, seed=cfg.seed)
        if engine.is_main:
            D.write_jsonl(engine.run_dir / "samples_start.jsonl", samples)
            append_eval(engine.run_dir, 0, start_eval)
    log.info("start (SFT policy) on %d held-out prompts: %s", len(held), start_eval)

    gen_tokens = train_tokens = 0
    gen_seconds = train_seconds = 0.0
    metrics: dict = {}
    for step in range(start, n_steps):
        sampled = queue.next(step, version=step).payload
        generator = sampled.generator()  # its state after sampling: minibatch order and ptx draws go on from it
        records = sampled.records
        batch, metrics, (prompts, completions) = score_batch(cfg, model, reference, tokenizer, sampled, device)
        if task is not None:
            metrics["gold"] = sum(task.gold_reward(prompts, completions, records)) / len(records)
        beta = controller.value
        compute_advantages(cfg, batch, beta)
        metrics["explained_variance"] = explained_variance(batch.values, batch.returns, batch.response_mask)
        metrics["return"] = float(batch.scores.mean() - beta * metrics["kl"])
        t0 = time.time()
        metrics.update(ppo_update(cfg, engine, model, batch, step, beta, generator, ptx, tokenizer.pad_token_id))
        seconds = time.time() - t0
        producer.load_weights(policy, step + 1)  # a remote rollout engine receives them; a local one shares them
        n_train = int(batch.attention_mask.sum()) * cfg.ppo_epochs
        metrics["train_tokens_per_second"] = n_train / max(seconds, 1e-9)
        gen_tokens += int(batch.response_mask.sum())
        gen_seconds += metrics["time_generate"]
        train_tokens, train_seconds = train_tokens + n_train, train_seconds + seconds
        metrics["beta"] = beta
        controller.update(float(metrics["kl"]), global_rollout, reward_std=metrics.get("reward_std"))
        peak = max(peak, memory_mb(device))
        metrics["memory_mb"] = peak
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < n_steps:
            result, _ = evaluate(cfg, policy, reference, reward, tokenizer, task, held, seed=cfg.seed + 1)
            if engine.is_main:
                append_eval(engine.run_dir, step + 1, result)
        engine.log(step, metrics)
        engine.maybe_checkpoint(step, extra={"start_eval": start_eval})

    end_eval, samples = evaluate(cfg, policy, reference, reward, tokenizer, task, held, seed=cfg.seed + 1)
    peak = max(peak, memory_mb(device))
    if engine.is_main:
        D.write_jsonl(engine.run_dir / "samples_end.jsonl", samples)
        append_eval(engine.run_dir, n_steps, end_eval)
    engine.save_checkpoint(n_steps, extra={"start_eval": start_eval})
    engine.save_model(policy, tokenizer)
    engine.save_model(engine.unwrap(model).value, tokenizer, engine.run_dir / "value")
    return engine.finish({
        **summarize_eval("start", start_eval),
        **summarize_eval("end", end_eval),
        "beta_end": controller.value,
        "steps": n_steps,
        "episodes": n_steps * global_rollout,
        "train_reward_end": float(metrics.get("reward", float("nan"))),
        "gen_tokens_per_second": gen_tokens / max(gen_seconds, 1e-9),
        "train_tokens_per_second": train_tokens / max(train_seconds, 1e-9),
        "tokens_per_second": (gen_tokens + train_tokens) / max(gen_seconds + train_seconds, 1e-9),
        "peak_memory_mb": peak,
        "lora_shared_reference": reference.shared,
    })
