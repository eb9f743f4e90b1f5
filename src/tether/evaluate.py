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

from tether import data as D
from tether.config import ConfigError, opt
from tether.generation import decode_responses, sample, sequence_logprobs
from tether.metrics import distinct_n, repetition_rate


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def _generate(model, tokenizer, records, n_samples, max_new_tokens, temperature, batch_size, generator):
    """Sample n per record; returns (records repeated, prompts, completions, rollouts list)."""
    rows = [r for r in records for _ in range(n_samples)]
    out_rows, prompts, completions, rollouts = [], [], [], []
    for chunk in _batches(rows, batch_size):
        ids = [D.encode_prompt(tokenizer, D.prompt_of(r))[0] for r in chunk]
        roll = sample(model, ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, temperature=temperature, generator=generator)
        out_rows += chunk
        prompts += [D.prompt_of(r) for r in chunk]
        completions += decode_responses(tokenizer, roll)
        rollouts.append(roll)
    return out_rows, prompts, completions, rollouts


@torch.no_grad()
def _sequence_kl(model, ref_model, rollouts, temperature) -> list[float]:
    kls = []
    for roll in rollouts:
        seq, mask, plen = roll.sequences, roll.attention_mask, roll.prompt_ids.shape[1]
        device = next(model.parameters()).device
        seq, mask = seq.to(device), mask.to(device)
        logp = sequence_logprobs(model, seq, mask, plen, temperature)
        ref = sequence_logprobs(ref_model, seq, mask, plen, temperature)
        kls += ((logp - ref) * roll.response_mask.to(device)).sum(-1).tolist()
    return kls


def evaluate_policy(model, tokenizer, task, records: list[dict], n_samples: int = 4, max_new_tokens: int = 48,
                    temperature: float = 1.0, ref_model=None, batch_size: int = 64, seed: int = 0,
                    reward=None, n_show: int = 6) -> dict:
    """Held-out metrics of `model` (see the module docstring); `task` may be None when there is no gold reward."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    rows, prompts, completions, rollouts = _generate(model, tokenizer, records, n_samples, max_new_tokens,
                                                     temperature, batch_size, generator)
    lengths = torch.cat([r.response_mask.sum(1) for r in rollouts]).float()
    has_eos = torch.cat([r.has_eos for r in rollouts]).float()
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
        kl = torch.tensor(_sequence_kl(model, ref_model, rollouts, temperature))
        result.update(kl_mean=kl.mean().item())
    if task is not None and records and "answer" in records[0]:
        _, g_prompts, g_completions, _ = _generate(model, tokenizer, records, 1, max_new_tokens, 0.0, batch_size,
                                                   generator)
        result["accuracy"] = sum(task.gold_reward(g_prompts, g_completions, records)) / len(records)
    shown = range(0, min(len(rows), n_show * n_samples), n_samples)  # the first sample of the first prompts
    result["samples"] = [
        {"prompt": prompts[i] if isinstance(prompts[i], str) else json.dumps(prompts[i]), "completion": completions[i],
         **({"gold": gold[i].item()} if gold is not None else {})}
        for i in shown
    ]
    return result


@dataclass
class EvalConfig:
    model: str = opt("", "model directory to evaluate (required)")
    task: str = opt("reviews", "embedded task giving prompts and the gold reward: reviews | arithmetic | none")
    prompts: str = opt("", "prompts file (default: the task's held-out prompts)")
    ref_model: str = opt("", "reference model for the sequence-level KL (empty: no KL)")
    reward: str = opt("", "reward spec scored as the proxy, e.g. rm:runs/rm (empty: none)")
    n_prompts: int = opt(64, "held-out prompts to use")
    n_samples: int = opt(4, "samples per prompt")
    max_new_tokens: int = opt(48, "longest response")
    temperature: float = opt(1.0, "sampling temperature")
    batch_size: int = opt(64, "sampling batch size")
    seed: int = opt(0, "random seed")
    out: str = opt("", "directory for summary.json (default: print only)")

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("eval needs model=DIR")


def run(cfg: EvalConfig) -> dict:
    from tether.models import load_causal_lm, load_tokenizer
    from tether.tasks import get_task

    task = None if cfg.task in ("", "none") else get_task(cfg.task)
    tokenizer, model = load_tokenizer(cfg.model), load_causal_lm(cfg.model).eval()
    if cfg.prompts:
        records = list(D.load_records(cfg.prompts, "prompts"))[: cfg.n_prompts]
    elif task is not None:
        records = task.prompts("test", cfg.n_prompts, seed=cfg.seed)
    else:
        raise ConfigError("eval needs prompts=FILE or a task")
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
