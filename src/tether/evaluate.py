"""The numbers every stage reports, on held-out prompts: `tether eval model=DIR task=reviews`.

For N samples per prompt from the policy (temperature T):
- gold_mean / gold_std: the task's hidden gold reward (the "human" taste, or the verifier);
- proxy_mean: the reward source being optimised, when one is given (its gap to gold is over-optimisation);
- kl_mean: sequence-level KL to the reference, Σ_t (log π(y_t) − log π_ref(y_t)) over response tokens of policy
  samples (the k1 estimator summed: unbiased for KL(π‖π_ref)), in nats;
- length_mean, eos_rate, distinct_1, distinct_2 (diversity: mode collapse shows here), repetition_rate;
- accuracy: greedy exact match, for verifiable tasks (records with an `answer`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import ConfigError, at_least, one_of, opt
from tether.forward import response_outputs
from tether.generation import sample_records
from tether.metrics import distinct_n, repetition_rate
from tether.prompts import load_prompts, load_task
from tether.runfiles import strict_json
from tether.tasks import TASKS


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def _sequence_kl(model, ref_model, rollouts, temperature) -> list[float]:
    """Σ_t (log π − log π_ref) over each sampled response's tokens, one forward of each model per rollout."""
    kls = []
    device = next(model.parameters()).device
    for roll in rollouts:
        seq, mask, plen = roll.sequences.to(device), roll.attention_mask.to(device), roll.prompt_ids.shape[1]
        logp = response_outputs(model, seq, mask, plen, temperature).logprobs
        ref = response_outputs(ref_model, seq, mask, plen, temperature).logprobs
        kls += ((logp - ref) * roll.response_mask.to(device)).sum(-1).tolist()
    return kls


def evaluate_policy(model, tokenizer, task, records: list[dict], n_samples: int = 4, max_new_tokens: int = 48,
                    temperature: float = 1.0, ref_model=None, batch_size: int = 64, seed: int = 0,
                    reward=None, n_show: int = 6) -> dict:
    """Held-out metrics of `model` (see the module docstring); `task` may be None when there is no gold reward."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    s = sample_records(model, tokenizer, records, n_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                       generator=generator, batch_size=batch_size)
    rows, prompts, completions = s.records, s.prompts, s.completions
    lengths = torch.cat([r.response_mask.sum(1) for r in s.rollouts]).float()
    has_eos = torch.cat([r.has_eos for r in s.rollouts]).float()
    token_lists = [tokenizer(c, add_special_tokens=False).input_ids for c in completions]
    result = {
        "n_prompts": len(records), "n_samples": len(rows),
        "length_mean": lengths.mean().item(), "eos_rate": has_eos.mean().item(),
        "distinct_1": distinct_n(token_lists, 1), "distinct_2": distinct_n(token_lists, 2),
        "repetition_rate": sum(repetition_rate(t, 2) for t in token_lists) / max(1, len(token_lists)),
    }
    gold = None
    if task is not None:
        gold = torch.tensor(task.gold_reward(prompts, completions, rows), dtype=torch.float64)
        result.update(gold_mean=gold.mean().item(), gold_std=gold.std().item() if len(gold) > 1 else 0.0)
    if reward is not None:
        proxy = torch.cat([reward(p, c, r).scores.double().cpu()
                           for p, c, r in zip(_batches(prompts, batch_size), _batches(completions, batch_size),
                                              _batches(rows, batch_size))])
        result.update(proxy_mean=proxy.mean().item(), proxy_std=proxy.std().item() if len(proxy) > 1 else 0.0)
    if ref_model is not None:
        kl = torch.tensor(_sequence_kl(model, ref_model, s.rollouts, temperature))
        result.update(kl_mean=kl.mean().item())
    if task is not None and records and "answer" in records[0]:
        greedy = sample_records(model, tokenizer, records, 1, max_new_tokens=max_new_tokens, temperature=0.0,
                                generator=generator, batch_size=batch_size)
        result["accuracy"] = sum(task.gold_reward(greedy.prompts, greedy.completions, records)) / len(records)
    shown = range(0, min(len(rows), n_show * n_samples), n_samples)  # the first sample of the first prompts
    result["samples"] = [
        {"prompt": prompts[i] if isinstance(prompts[i], str) else json.dumps(prompts[i]), "completion": completions[i],
         **({"gold": gold[i].item()} if gold is not None else {})}
        for i in shown
    ]
    return result


def held_out_eval(policy, tokenizer, task, records: list[dict], **settings) -> tuple[dict, list[dict]]:
    """`evaluate_policy` of a policy that is training (put in eval mode for it, and back): (numbers, samples shown).

    The one held-out evaluation of the training recipes: PPO, DPO (offline and online) and GRPO call it."""
    was_training = policy.training
    policy.eval()
    try:
        result = evaluate_policy(policy, tokenizer, task, records, **settings)
    finally:
        policy.train(was_training)
    samples = result.pop("samples", [])
    return {k: v for k, v in result.items() if isinstance(v, (int, float))}, samples


def append_eval(run_dir: Path, step: int, result: dict) -> None:
    """One held-out evaluation as a line of run_dir/evals.jsonl; step 0 (the starting policy) starts the file."""
    with (Path(run_dir) / "evals.jsonl").open("w" if step == 0 else "a") as f:
        f.write(strict_json({"step": step, **result}) + "\n")


@dataclass
class EvalConfig:
    model: str = opt("", "model directory to evaluate (required)")
    task: str = opt("reviews", "embedded task giving prompts and the gold reward: reviews | arithmetic | none",
                    check=one_of("", "none", *TASKS))
    prompts: str = opt("", "prompts file (default: the task's held-out prompts)")
    ref_model: str = opt("", "reference model for the sequence-level KL (empty: no KL)")
    reward: str = opt("", "reward spec scored as the proxy, e.g. rm:runs/rm (empty: none)")
    n_prompts: int = opt(64, "held-out prompts to use", check=at_least(1))
    n_samples: int = opt(4, "samples per prompt", check=at_least(1))
    max_new_tokens: int = opt(48, "longest response", check=at_least(1))
    temperature: float = opt(1.0, "sampling temperature (0 = greedy; the KL to ref_model needs > 0)", check=at_least(0))
    batch_size: int = opt(64, "sampling batch size", check=at_least(1))
    seed: int = opt(0, "random seed")
    out: str = opt("", "directory for summary.json (default: print only)")

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("eval needs model=DIR")
        if self.ref_model and self.temperature == 0:
            raise ConfigError("ref_model needs temperature > 0: the KL's log-probs come from logits / temperature")


def run(cfg: EvalConfig) -> dict:
    from tether.models import load_causal_lm, load_tokenizer

    task = load_task(cfg.task)
    tokenizer, model = load_tokenizer(cfg.model), load_causal_lm(cfg.model).eval()
    records = load_prompts(cfg.prompts, task, "test", cfg.n_prompts, cfg.seed)
    ref = load_causal_lm(cfg.ref_model).eval() if cfg.ref_model else None
    reward = None
    if cfg.reward:
        from tether.rewards.spec import reward_from_spec

        reward = reward_from_spec(cfg.reward)
    result = evaluate_policy(model, tokenizer, task, records, cfg.n_samples, cfg.max_new_tokens, cfg.temperature,
                             ref, cfg.batch_size, cfg.seed, reward)
    if cfg.out:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
