"""Best-of-N sampling and rejection-sampling fine-tuning: `tether bon`.

    tether bon model=runs/demo/sft/model reward=rm:runs/demo/rm task=reviews n=16      # the table for n = 1..16
    tether bon model=... reward=rm:... task=reviews n=8 sft=true                        # fine-tune on the winners
    tether bon model=... reward=rm:... task=reviews n=8 sft=true rounds=3               # expert iteration
    tether bon model=... reward=python:my_rewards:brevity prompts=prompts.jsonl n=4

1. The table. `samples` (default n) responses per held-out prompt from the policy; the reward source scores each one
   (a response without EOS gets `missing_eos_penalty`, as in PPO, and cannot be a winner for SFT; with
   missing_eos_penalty=none it keeps its score and can). For every n in `ns` the table (bon_table.csv and
   summary.json) reports, averaged over prompts:
   - proxy_bon / gold_bon: E[reward of the proxy-best of n], by the unbiased estimator Σ C(k−1,n−1)/C(N,n)·x_(k)
     over the N samples of a prompt (metrics.unbiased_bon_estimate,
     docs/reference.md §Best-of-N and over-optimisation) — no resampling;
   - kl_analytic = log n − (n−1)/n, the KL(π_bon ‖ π) to report (Stiennon et al. 2020;
     docs/reference.md §Best-of-N and over-optimisation);
   - kl_empirical: the exact KL of best-of-n over each prompt's empirical distribution, ties counted
     (metrics.bon_kl_empirical): equal to kl_analytic up to sampling error when the policy's responses all differ,
     lower when it repeats itself (the analytic value is an upper bound for discrete outputs);
   - proxy_gain_z: E[best-of-n proxy] − mean, in units of the prompt's proxy std, next to normal_max = E[max of n
     N(0,1)] (0.564, 1.029, 1.424, 1.766 for n = 2, 4, 8, 16;
     docs/reference.md §Best-of-N and over-optimisation): equal if the proxy is normal.
   Every sample (samples.jsonl) and each prompt's winner (winners.jsonl, demonstrations format) are kept.
2. `sft=true`: rejection-sampling fine-tuning (expert iteration when rounds > 1). Each round samples n responses per
   TRAINING prompt from the current policy, keeps the proxy-best (if it ended with EOS), and runs `tether sft` on
   those winners (round-R/winners.jsonl -> round-R/sft); the next round samples from the new model. The final model is
   evaluated against the starting one on the held-out prompts (gold reward, KL) like DPO and PPO.

`generation_backend=vllm` samples with a vLLM engine built once (generation/vllm.py): the table's samples come from
it, and with sft=true each round's fine-tuned weights are pushed into it before the round samples.

Measured on `reviews` (the demo's SFT policy and RM, 2 CPU cores): best-of-8 by the RM lifts held-out gold from 0.01
to 1.70 (+1.14 SFT-std) at KL 1.20; fine-tuning on best-of-8 winners of 256 prompts (sft_lr 1e-3, 2 epochs — with
1e-4 for 1 epoch the policy hardly moves, KL 0.002) gives +0.68 SFT-std at KL 0.68 in 27 s for one round and +1.26 at
KL 5.9 in 55 s for rounds=3, with distinct-2 falling from 0.42 to 0.15 (the winners are alike).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tether import data as D
from tether import rundir
from tether.config import ConfigError, above, at_least, load_config, one_of, opt
from tether.distributed.placement import SamplerFields
from tether.evaluate import evaluate_policy
from tether.generation import sample_records
from tether.generation.vllm import engine_for
from tether.metrics import bon_kl, bon_kl_empirical, expected_max_normal, unbiased_bon_estimate
from tether.prompts import load_prompts, load_task
from tether.runfiles import strict_json, write_atomic
from tether.tasks import TASKS

log = logging.getLogger(__name__)


@dataclass
class BoNConfig(SamplerFields):
    model: str = opt("", "policy to sample from (required)")
    reward: str = opt("", "reward spec that picks the winner: rm:DIR, python:mod:fn, a built-in (required)")
    task: str = opt("", "embedded task: held-out prompts when `prompts` is empty, and the gold reward",
                    check=one_of("", "none", *TASKS))
    prompts: str = opt("", "held-out prompts for the table (default: the task's test split)")
    n_prompts: int = opt(64, "held-out prompts used", check=at_least(1))
    n: int = opt(16, "best-of-n: candidates per prompt for the winners (and the largest n of the table)",
                 check=at_least(1))
    samples: int = opt(0, "samples N per held-out prompt for the table (0 = n); N > n lowers the estimator's variance",
                       check=at_least(0))
    ns: list[int] = opt([], "n values of the table, comma list (default: 1, 2, 4, ... up to n)", check=at_least(1))
    max_prompt_len: int = opt(64, "prompt tokens kept (cut from the left)", check=at_least(1))
    max_new_tokens: int = opt(48, "response budget", check=at_least(1))
    temperature: float = opt(1.0, "sampling temperature (> 0: greedy samples are all alike, and the KL's log-probs "
                                  "come from logits / T)", check=above(0))
    missing_eos_penalty: float | None = opt(-1.0, "score of a response without EOS (none = keep the reward's score)")
    batch_size: int = opt(64, "rows per sampling batch", check=at_least(1))
    sft: bool = opt(False, "fine-tune on the winners (rejection-sampling fine-tuning)")
    rounds: int = opt(1, "sft=true: rounds of sample -> pick -> fine-tune (expert iteration)", check=at_least(1))
    train_prompts: str = opt("", "sft=true: prompts the winners are drawn for (default: the task's train split)")
    n_train_prompts: int = opt(256, "sft=true: training prompts per round", check=at_least(1))
    sft_lr: float = opt(1e-3, "sft=true: learning rate", check=above(0))
    sft_epochs: float = opt(2.0, "sft=true: passes over each round's winners", check=above(0))
    sft_batch_size: int = opt(16, "sft=true: batch size", check=at_least(1))
    sft_max_steps: int = opt(0, "sft=true: steps per round (0 = from sft_epochs)", check=at_least(0))
    eval_samples: int = opt(2, "sft=true: samples per held-out prompt for gold/KL before and after",
                            check=at_least(1))
    seed: int = opt(0, "random seed (also the sft stage's)", check=at_least(0))
    out: str = opt("", "run directory (default runs/bon-<timestamp>)")
    progress: bool = opt(True, "show progress bars (the sft stage)")
    resume: bool = opt(False, "continue the run in `out`: its samples and finished rounds are kept, not redrawn")
    resume_changed: list[str] = opt([], "resume: keys whose new value is accepted though the run used another")
    overwrite: bool = opt(False, "replace the earlier run in `out` (its files are deleted first)")

    def validate(self) -> None:
        super().validate()
        if not self.model or not self.reward:
            raise ConfigError("bon needs model=DIR and reward=SPEC (e.g. reward=rm:runs/rm, or reward=reviews for gold)")
        if not (self.prompts or self.task):
            raise ConfigError("bon needs prompts=FILE or task=NAME")
        if self.sft and not (self.train_prompts or self.task):
            raise ConfigError("bon sft=true needs train_prompts=FILE or task=NAME")
        bad = [k for k in self.n_values() if not 1 <= k <= self.n_samples()]
        if bad:
            raise ConfigError(f"key 'ns': {bad[0]} is not in 1..samples ({self.n_samples()})")

    def n_samples(self) -> int:
        return self.samples or self.n

    def n_values(self) -> list[int]:
        if self.ns:
            return sorted(set(self.ns))
        powers = [2**i for i in range(int(math.log2(self.n)) + 1)]
        return sorted(set(powers) | {self.n})


# --- sampling and scoring -------------------------------------------------------------------------------------------
def _sample(cfg: BoNConfig, model, tokenizer, records: list[dict], k: int, generator) -> list[dict]:
    """k responses per record: [{"record", "prompt", "completions": [k], "has_eos": [k]}], in record order."""
    return sample_records(model, tokenizer, records, k, max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature, generator=generator, max_prompt_len=cfg.max_prompt_len,
                          batch_size=cfg.batch_size).groups(k)


def score_groups(groups: list[dict], reward, penalty: float | None, task=None) -> None:
    """Adds "proxy" (reward, penalty where no EOS) and, with a task, "gold" lists to every group, in place."""
    for g in groups:
        k = len(g["completions"])
        prompts, records = [g["prompt"]] * k, [g["record"]] * k
        out = reward(prompts, g["completions"], records)
        scores = out.scores.float().tolist()
        g["components"] = {name: c.float().tolist() for name, c in out.components.items()
                           if len(out.components) > 1 or name != getattr(reward, "name", None)}
        g["proxy"] = [s if eos or penalty is None else penalty for s, eos in zip(scores, g["has_eos"])]
        if task is not None:
            g["gold"] = [float(x) for x in task.gold_reward(prompts, g["completions"], records)]


def component_rates(groups: list[dict], n: int) -> dict[str, dict[str, float]]:
    """Each reward component's mean over every sample and over the best-of-n winners (a rule's rate before and after
    selection): {name: {"all": ..., "best": ...}}."""
    names = list(groups[0].get("components", {})) if groups else []
    out = {}
    for name in names:
        every = [x for g in groups for x in g["components"][name]]
        best = [g["components"][name][best_index(g["proxy"][:n])] for g in groups]
        out[name] = {"all": sum(every) / len(every), "best": sum(best) / len(best)}
    return out


def best_index(scores: list[float]) -> int:
    """The proxy-best candidate; the first of tied ones (the candidates are iid, so this is a uniform tie-break)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


# --- the table ------------------------------------------------------------------------------------------------------
def _mean_se(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def bon_table(proxy: list[list[float]], gold: list[list[float]] | None, ns: list[int]) -> list[dict]:
    """One row per n (module docstring): proxy/gold of best-of-n with standard errors over prompts, KLs, z-gain.

    proxy[p], gold[p]: the N ≥ max(ns) samples of prompt p. Pure: numbers in, numbers out.
    """
    rows = []
    for n in ns:
        proxy_bon = [unbiased_bon_estimate(s, s, n) for s in proxy]
        z = [(b - sum(s) / len(s)) / _std(s) for b, s in zip(proxy_bon, proxy) if _std(s) > 0]
        row = {"n": n, "kl_analytic": bon_kl(n), "kl_empirical": _mean_se([bon_kl_empirical(s, n) for s in proxy])[0]}
        row["proxy_bon"], row["proxy_bon_se"] = _mean_se(proxy_bon)
        if gold is not None:
            row["gold_bon"], row["gold_bon_se"] = _mean_se([unbiased_bon_estimate(s, g, n) for s, g in zip(proxy, gold)])
        row["proxy_gain_z"] = _mean_se(z)[0] if z else float("nan")
        row["normal_max"] = expected_max_normal(n)
        rows.append(row)
    return rows


def _std(values: list[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / max(1, len(values) - 1))


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def winners(groups: list[dict], n: int, require_eos: bool = True) -> list[dict]:
    """The proxy-best of each prompt's first n candidates, as demonstrations; with `require_eos` a winner that never
    ended is left out (fine-tuning on it would teach the policy to stop mid-sentence), and so is an empty one."""
    out = []
    for g in groups:
        i = best_index(g["proxy"][:n])
        if (g["has_eos"][i] or not require_eos) and g["completions"][i].strip():
            out.append({"prompt": g["prompt"], "completion": g["completions"][i], "proxy": g["proxy"][i],
                        **({"gold": g["gold"][i]} if "gold" in g else {})})
    return out


# --- rejection-sampling fine-tuning ---------------------------------------------------------------------------------
def fine_tune_round(cfg: BoNConfig, model_dir: str, data: Path, out: Path) -> str:
    """`tether sft` on one round's winners; skipped when that round finished before. Returns the new model dir."""
    from tether.recipes import sft
    from tether.recipes.pipeline import finished

    if finished(out) is None:
        resume = any((out / "checkpoints").glob("step-*/tether_state.json"))  # interrupted: go on; else start over
        settings = {"model": model_dir, "data": str(data), "out": str(out), "lr": cfg.sft_lr, "epochs": cfg.sft_epochs,
                    "batch_size": cfg.sft_batch_size, "max_steps": cfg.sft_max_steps, "eval_fraction": 0.0,
                    "max_prompt_len": cfg.max_prompt_len, "max_completion_len": cfg.max_new_tokens + 1,
                    "seed": cfg.seed, "progress": cfg.progress, "resume": resume, "overwrite": not resume}
        sft.run(load_config(sft.SFTConfig, None, settings, recipe="sft"))
    return str(out / "model")


def expert_iteration(cfg: BoNConfig, tokenizer, reward, task, run_dir: Path, held: list[dict],
                     engine=None) -> dict:
    """`rounds` of sample n -> keep the best -> SFT, then gold/KL of the final model vs the start (held out).
    `engine` (generation_backend=vllm) samples each round after the round's weights are pushed into it."""
    from tether.distributed.sync import named_merged_weights
    from tether.models import load_causal_lm

    train = load_prompts(cfg.train_prompts, task, "train", cfg.n_train_prompts, cfg.seed, key="train_prompts")
    current, kept = cfg.model, []
    for r in range(cfg.rounds):
        round_dir = run_dir / f"round-{r}"
        data = round_dir / "winners.jsonl"
        if not data.exists():
            policy = load_causal_lm(current).eval()
            if engine is not None:
                engine.push(named_merged_weights(policy), version=r)
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + r + 1)
            groups = _sample(cfg, policy if engine is None else engine, tokenizer, train, cfg.n, generator)
            if engine is not None:
                engine.sleep()  # vllm_sleep: the round's fine-tuning gets the GPU's memory
            score_groups(groups, reward, cfg.missing_eos_penalty, task)
            D.write_jsonl(data, winners(groups, cfg.n, cfg.missing_eos_penalty is not None))
        kept.append(sum(1 for _ in data.open()))
        current = fine_tune_round(cfg, current, data, round_dir / "sft")
    reference, policy = load_causal_lm(cfg.model).eval(), load_causal_lm(current).eval()
    settings = (cfg.eval_samples, cfg.max_new_tokens, cfg.temperature)
    start = evaluate_policy(reference, tokenizer, task, held, *settings, None, cfg.batch_size, cfg.seed)
    end = evaluate_policy(policy, tokenizer, task, held, *settings, reference, cfg.batch_size, cfg.seed)
    return {"model": current, "winners_per_round": kept, "gold_reward_start": start.get("gold_mean"),
            "gold_reward_std_start": start.get("gold_std"), "gold_reward_end": end.get("gold_mean"),
            "kl_end": end.get("kl_mean"), "length_end": end.get("length_mean"), "distinct_2_end": end.get("distinct_2")}


# --- the recipe -----------------------------------------------------------------------------------------------------
def run(cfg: BoNConfig) -> dict:
    from tether.models import load_causal_lm, load_tokenizer
    from tether.rewards.spec import reward_from_spec

    t0 = time.time()
    run_dir = Path(cfg.out or f"runs/bon-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = rundir.hold(run_dir, "bon")  # one writer; held until this function returns
    rundir.prepare(run_dir, cfg, "bon")  # a fresh run, overwrite=true, or a resume of the same settings
    task = load_task(cfg.task)
    spec = f"rm:{cfg.reward}" if Path(cfg.reward).is_dir() else cfg.reward
    reward = reward_from_spec(spec)
    tokenizer, model = load_tokenizer(cfg.model), load_causal_lm(cfg.model).eval()
    held = load_prompts(cfg.prompts, task, "test", cfg.n_prompts, cfg.seed)
    engine = engine_for(cfg)  # vllm: built once; expert iteration pushes each round's weights into it

    samples = run_dir / "samples.jsonl"
    if cfg.resume and samples.exists():  # the table's samples of the interrupted run, scored as they were
        groups = [json.loads(x) for x in samples.read_text().splitlines()]
    else:
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003)
        groups = _sample(cfg, model if engine is None else engine, tokenizer, held, cfg.n_samples(), generator)
        score_groups(groups, reward, cfg.missing_eos_penalty, task)
    table = bon_table([g["proxy"] for g in groups], [g["gold"] for g in groups] if task else None, cfg.n_values())
    write_csv(run_dir / "bon_table.csv", table)
    D.write_jsonl(run_dir / "samples.jsonl", ({k: v for k, v in g.items() if k != "record"} for g in groups))
    D.write_jsonl(run_dir / "winners.jsonl", winners(groups, cfg.n, cfg.missing_eos_penalty is not None))
    at_n = next(row for row in table if row["n"] == max(k for k in cfg.n_values() if k <= cfg.n))
    summary = {"n": at_n["n"], "samples": cfg.n_samples(), "n_prompts": len(held), "table": table,
               **{f"{k}_at_n": v for k, v in at_n.items() if k != "n"},
               "components": component_rates(groups, at_n["n"])}
    if cfg.sft:
        summary.update(expert_iteration(cfg, tokenizer, reward, task, run_dir, held, engine))
    summary["wall_seconds"] = time.time() - t0
    write_atomic(run_dir / "summary.json", strict_json(summary, indent=2) + "\n")
    lock.close()
    log.info("best-of-%d: %s", at_n["n"], {k: round(v, 4) for k, v in at_n.items() if isinstance(v, float)})
    return summary
