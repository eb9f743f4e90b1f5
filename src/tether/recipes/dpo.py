"""DPO and its family, offline: `tether dpo` (no reward model, no RL).

    tether dpo model=runs/sft/model data=prefs.jsonl beta=0.1                  # sigmoid DPO
    tether dpo model=... data=prefs.jsonl loss=ipo | robust_dpo | hinge | simpo | orpo
    tether dpo model=... data=unpaired.jsonl loss=kto                          # {"prompt","completion","label"}
    tether dpo model=... data=prefs.jsonl rpo_alpha=1                          # + α·NLL of the chosen (RPO)
    tether dpo model=... data=prefs.jsonl task=reviews eval_every=20           # + gold reward and KL on held-out prompts
    tether dpo online model=... task=reviews label_source=raters rounds=4      # online/iterative DPO (online_dpo.py)

The loss comes by name from `losses.PREFERENCE_LOSSES`, which also says whether it needs the reference policy and
whether sequence log-probs are summed or averaged per token. By design:
- reference log-probs are computed ONCE, before the first step, with the starting policy (which *is* the reference),
  and cached in the run directory (`reference_logps-<key>.pt`, keyed by model and data, reused on resume) — no reference model stays in memory
  during training, and none is loaded at all for SimPO/ORPO;
- chosen and rejected go through ONE forward (data.collate_pairs stacks them);
- each micro-batch's mean loss is weighted by its share of the global batch, so accumulation/DP give the global mean.
KTO pairs each completion with the next example's prompt to estimate its reference point z0 (the batch KL).
With a task, held-out gold reward and KL to the reference are measured at the start, every `eval_every` steps and at
the end (evals.jsonl, as PPO writes it); summary.json compares start and end.
`tether dpo online` samples the pairs from the policy itself, round after round: recipes/online_dpo.py, which
builds on this module's pieces (this module knows nothing of it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tether import data as D
from tether import rundir
from tether.config import ConfigError, above, at_least, between, one_of, opt
from tether.engine import Engine, TrainConfig, steps_for
from tether.evaluate import append_eval, held_out_eval
from tether.forward import sequence_logps
from tether.losses import PREFERENCE_LOSSES, rpo_nll, soft_label_smoothing
from tether.models import LoraSettings, load_causal_lm, load_tokenizer
from tether.prompts import load_prompts, load_task
from tether.reference import ReferencePolicy
from tether.runfiles import save_torch_atomic
from tether.tasks import TASKS
from tether.wrappers import autocast_to

log = logging.getLogger(__name__)


@dataclass
class PreferenceFields:
    """The preference loss and how its data are cut: what offline and online DPO share."""

    loss: str = opt("dpo", "dpo | robust_dpo | ipo | hinge | simpo | orpo | kto",
                    check=one_of(*sorted(PREFERENCE_LOSSES)))
    beta: float = opt(0.1, "β: strength of the KL tether (IPO: τ; SimPO: reward scale)", check=above(0))
    label_smoothing: float = opt(0.0, "cDPO / robust DPO label-noise rate ε", check=between(0, 0.5, high_open=True))
    rpo_alpha: float = opt(0.0, "RPO: weight α of the chosen responses' per-token NLL added to a paired loss (0 = off)",
                           check=at_least(0))
    gamma: float = opt(1.0, "SimPO target margin γ", check=at_least(0))
    lam: float = opt(0.1, "ORPO weight λ of the odds-ratio term", check=at_least(0))
    desirable_weight: float = opt(1.0, "KTO λ_D", check=at_least(0))
    undesirable_weight: float = opt(1.0, "KTO λ_U", check=at_least(0))
    max_prompt_len: int = opt(256, "prompt tokens kept (cut from the left)", check=at_least(1))
    max_completion_len: int = opt(256, "completion tokens kept (cut from the right)", check=at_least(1))


@dataclass
class HeldOutFields:
    """Held-out gold reward and KL of the policy during training (evals.jsonl)."""

    task: str = opt("", "embedded task for gold reward and KL on held-out prompts (e.g. reviews)",
                    check=one_of("", "none", *TASKS))
    eval_prompts: str = opt("", "held-out prompts (default: the task's test split)")
    n_eval_prompts: int = opt(64, "held-out prompts", check=at_least(1))
    eval_samples: int = opt(2, "samples per held-out prompt", check=at_least(1))
    eval_every: int = opt(0, "also evaluate on the held-out prompts every N steps, to evals.jsonl (0 = start and end)",
                          check=at_least(0))
    max_new_tokens: int = opt(48, "generation budget for the evaluation samples (and online samples)",
                              check=at_least(1))


@dataclass
class DPOConfig(HeldOutFields, PreferenceFields, TrainConfig):
    model: str = opt("", "policy to train, usually the SFT model (also the reference; required)")
    data: str = opt("", "preference pairs {prompt, chosen, rejected}, K-way rankings (as their C(K,2) pairs), or "
                        "unpaired {prompt, completion, label} for kto")
    eval_data: str = opt("", "held-out pairs (same kinds as data): loss, reward accuracy and margin every eval_every "
                             "steps and at the end, in metrics.jsonl under eval/ and in summary.json")
    skip_invalid: bool = opt(False, "skip invalid records (reported) instead of stopping at the first")
    lr: float = opt(5e-6, "peak learning rate (AdamW)", check=above(0))

    def validate(self) -> None:
        super().validate()
        self.validate_inputs()

    def validate_inputs(self) -> None:
        if not self.model or not self.data:
            raise ConfigError("dpo needs model=DIR and data=FILE (or `tether dpo online` to sample its pairs)")


def encode(cfg, tokenizer, paired: bool, path: str | None = None, skip_invalid: bool = False) -> list:
    """Encoded training records. K-way rankings become their C(K,2) pairs, better completion chosen (the DPO
    paper's IMDb data: 4 completions a prompt -> 6 pairs)."""
    path = path or cfg.data
    kind = "unpaired" if not paired else D.detect_kind(path)
    records = D.load_records(path, kind, skip_invalid=skip_invalid)
    if kind == "rankings":
        pairs = [(pair, line) for ranking, line in zip(records, records.lines) for pair in D.expand_ranking(ranking)]
        records = D.Records([p for p, _ in pairs], path, "pairs", lines=[line for _, line in pairs])
    encode_one = D.encode_pair if paired else D.encode_unpaired
    return D.encode_records(encode_one, tokenizer, records, cfg.max_prompt_len, cfg.max_completion_len, log)[0]


def collate(examples: list, pad_id: int, paired: bool) -> dict:
    """Paired: 2B rows (chosen then rejected). KTO: B matched rows, then B rows of completion i with prompt i+1."""
    if paired:
        return D.collate_pairs(examples, pad_id)
    shifted = examples[1:] + examples[:1]
    prompts = [e.prompt_ids for e in examples] + [e.prompt_ids for e in shifted]
    batch = D.collate_completions(prompts, [e.completion_ids for e in examples] * 2, pad_id)
    batch["label"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    return batch


def loss_for(spec, cfg: DPOConfig, logps: torch.Tensor, ref: tuple | None, labels=None, margin=None, weight=None,
             prob=None):
    """The named loss of a collated batch's log-probs (chosen rows, then rejected rows; KTO: matched rows, then the
    mismatched rows of its reference point) and the reference's (chosen, rejected) pair of (b,) tensors; a pair's
    `margin`, `weight` and `prob` fields (b,) where the data set has them (None: none; prob NaN where a pair has
    none). A soft label p trains as per-pair label smoothing 1 − p (losses.soft_label_smoothing)."""
    hp = {h: getattr(cfg, h) for h in spec.hparams}
    if prob is not None and spec.fn is PREFERENCE_LOSSES["dpo"].fn:
        hp["label_smoothing"] = soft_label_smoothing(prob, hp["label_smoothing"])
    if weight is not None:
        hp["weight"] = weight
    if margin is not None:
        hp["margin"] = margin
    policy, policy_other = D.split_pairs(logps)
    if not spec.paired:
        return spec.fn(policy, ref[0], labels, policy_other, ref[1], **hp)
    if spec.needs_reference:
        return spec.fn(policy, policy_other, ref[0], ref[1], **hp)
    return spec.fn(policy, policy_other, **hp)


def reference_key(model_dir: str, examples: list, spec, dtype: torch.dtype | None = None) -> str:
    """What the reference log-probs depend on: the reference model's files, every example's token ids, whether the
    loss sums or averages them, and the precision they were computed in (the policy's: an fp32 cache does not serve
    a bf16 run). A cache under another key belongs to other pairs, another model or another precision."""
    h = hashlib.sha256(f"{rundir.fingerprint(Path(model_dir))} {spec.logp_average} {spec.paired}".encode())
    if dtype is not None:
        h.update(str(dtype).encode())
    for ex in examples:
        h.update(repr(dataclasses.astuple(ex)).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def reference_logps(engine, model, examples, cfg, spec, pad_id, cache_dir: Path | None = None) -> torch.Tensor:
    """Log-probs of every row under `model` (the reference: the starting policy, `cfg.model`), (n, 2): chosen and
    rejected (KTO: matched and mismatched). Cached in cache_dir (default the run directory) under
    reference_logps-<reference_key>.pt, written atomically; a cache under another key, or unreadable, is not used."""
    key = reference_key(cfg.model, examples, spec, engine.autocast_dtype)
    path = Path(cache_dir or engine.run_dir) / f"reference_logps-{key}.pt"
    if path.exists():
        try:
            cached = torch.load(path)
            if cached.shape == (len(examples), 2):
                return cached
        except (OSError, RuntimeError, EOFError, ValueError) as e:
            log.warning("%s is unreadable (%s); computing the reference log-probs again", path, e)
    model.eval()
    out = []
    for i in range(0, len(examples), cfg.batch_size):
        chunk = examples[i : i + cfg.batch_size]
        batch = {k: v.to(engine.device) for k, v in collate(chunk, pad_id, spec.paired).items()}
        with autocast_to(engine.autocast_dtype, engine.device.type):  # the precision the policy trains in
            rows = sequence_logps(model, batch, spec.logp_average, cfg.padding_free).cpu()
        out.append(torch.stack(D.split_pairs(rows), 1))  # (b, 2): chosen/matched, rejected/mismatched
    model.train()
    cached = torch.cat(out)
    if engine.is_main:
        save_torch_atomic(cached, path)
    return cached


@torch.no_grad()
def pairs_eval(engine, model, examples, ref, spec, cfg, pad) -> dict:
    """The loss and the implicit reward's accuracy and margin on held-out pairs (`eval_data`), under eval/ keys: the
    mean over pairs of the same loss the training uses (weights and margins included)."""
    weighted, margined = pair_fields(spec, examples)
    was_training = model.training
    model.eval()
    sums, total = {}, 0.0
    for i in range(0, len(examples), cfg.batch_size):
        idx = list(range(i, min(i + cfg.batch_size, len(examples))))
        batch = {k: v.to(engine.device) for k, v in collate([examples[j] for j in idx], pad, spec.paired).items()}
        logps = sequence_logps(model, batch, spec.logp_average, cfg.padding_free)
        ref_pair = None if ref is None else (ref[idx, 0].to(engine.device), ref[idx, 1].to(engine.device))
        loss, parts = loss_for(spec, cfg, logps, ref_pair, batch.get("label"),
                               batch["margin"] if margined else None, batch["weight"] if weighted else None,
                               batch.get("prob"))
        n = float(sum(examples[j].weight for j in idx)) if weighted else float(len(idx))
        for key, value in {"loss": loss, **parts}.items():
            sums[key] = sums.get(key, 0.0) + float(value.float().mean()) * n
        total += n
    model.train(was_training)
    return {f"eval/{k}": v / total for k, v in sums.items()}


def held_out(cfg, policy, ref_model, tokenizer, task, records) -> dict:
    """Gold reward, KL to the reference, length, ... of the policy on the held-out prompts (numbers only)."""
    return held_out_eval(policy, tokenizer, task, records, n_samples=cfg.eval_samples,
                         max_new_tokens=cfg.max_new_tokens, temperature=1.0, ref_model=ref_model, batch_size=64,
                         seed=cfg.seed)[0]


def pair_fields(spec, examples: list) -> tuple[bool, bool]:
    """(weighted, margined): whether the pairs carry weights other than 1 and margins other than 0 (then the loss
    uses them); ConfigError naming the loss when the pairs have margins it has no use for."""
    weighted = spec.paired and any(getattr(e, "weight", 1.0) != 1.0 for e in examples)
    margined = spec.paired and any(getattr(e, "margin", 0.0) != 0.0 for e in examples)
    if margined and not spec.takes_margin:
        usable = sorted(name for name, s in PREFERENCE_LOSSES.items() if s.takes_margin)
        raise ConfigError(f"the pairs have 'margin' fields, which loss {spec.fn.__name__} cannot use; use loss="
                          f"{' | '.join(usable)}, or drop the margins")
    if spec.paired and any(getattr(e, "prob", None) is not None for e in examples) \
            and spec.fn is not PREFERENCE_LOSSES["dpo"].fn:
        raise ConfigError(f"the pairs have 'prob' fields (soft labels), which loss {spec.fn.__name__} cannot use; "
                          "use loss=dpo (a soft label p is its per-pair label smoothing 1 - p), or drop them")
    return weighted, margined


def train_step(engine, model, examples, ref, spec, cfg, pad, step: int, data_step: int | None = None,
               fields: tuple[bool, bool] | None = None) -> dict:
    """One optimizer step over the micro-batches of `data_step` (default `step`) of `examples`; returns metrics.

    With weighted pairs each micro-batch's weighted mean counts by its share of the global weight, so the step's
    loss is Σ w_i ℓ_i / Σ w_i over the global batch (as unweighted pairs give the plain global mean)."""
    weighted, margined = fields if fields is not None else pair_fields(spec, examples)  # callers pass it once
    micro = engine.micro_batches(step if data_step is None else data_step, len(examples))
    size = (lambda idx: sum(examples[i].weight for i in idx)) if weighted else len  # noqa: E731
    n_global = engine.all_sum(sum(size(m) for m in micro))
    sums: dict[str, float] = {}
    for j, idx in enumerate(micro):
        batch = {k: v.to(engine.device) for k, v in collate([examples[i] for i in idx], pad, spec.paired).items()}
        logps = sequence_logps(model, batch, spec.logp_average, cfg.padding_free)
        ref_pair = None if ref is None else (ref[idx, 0].to(engine.device), ref[idx, 1].to(engine.device))
        loss, parts = loss_for(spec, cfg, logps, ref_pair, batch.get("label"),
                               batch["margin"] if margined else None, batch["weight"] if weighted else None,
                               batch.get("prob"))
        if cfg.rpo_alpha and spec.paired:  # RPO: + α·NLL(yw) per token (losses.rpo_nll)
            chosen, lengths = D.split_pairs(logps)[0], D.split_pairs(batch["response_mask"])[0][:, 1:].sum(-1)
            nll = rpo_nll(chosen * (lengths if spec.logp_average else 1), lengths)
            loss, parts = loss + cfg.rpo_alpha * nll, {**parts, "nll_chosen": nll}
        share = size(idx) / n_global  # mean over the micro-batch -> its share of the global mean
        engine.backward(loss * share, step, last_micro=j == len(micro) - 1)
        engine.count_tokens(int(batch["attention_mask"].sum()))
        for key, value in {"loss": loss, **parts}.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach().float().mean()) * share
    metrics = {k: engine.all_sum(v) for k, v in sums.items()}
    metrics.update(engine.optimizer_step())
    return metrics


def start_evaluation(cfg, engine, policy, ref_model, tokenizer, task, held, start: int, extra: dict) -> dict:
    """The starting policy's held-out numbers: from the checkpoint on resume, else measured (evals.jsonl step 0)."""
    if extra.get("start_eval") is not None or task is None:
        return extra.get("start_eval") or {}
    result = held_out(cfg, policy, ref_model, tokenizer, task, held)
    if start == 0 and engine.is_main:
        append_eval(engine.run_dir, 0, result)
    return result


def summarize(cfg, engine, metrics: dict, total: int, start_eval: dict, end_eval: dict) -> dict:
    """summary.json of a DPO run (offline or online): the issue's keys, plus length and diversity at the end."""
    summary = {"train_loss": metrics.get("loss", float("nan")),
               "reward_accuracy": metrics.get("rewards/accuracies", float("nan")),
               "steps": total, "loss_name": cfg.loss, "tokens_per_second": engine.tokens_per_second()}
    if start_eval or end_eval:
        summary.update(gold_reward_start=start_eval.get("gold_mean"), gold_reward_end=end_eval.get("gold_mean"),
                       gold_reward_std_start=start_eval.get("gold_std"), kl_end=end_eval.get("kl_mean"),
                       length_end=end_eval.get("length_mean"), distinct_2_end=end_eval.get("distinct_2"))
    return summary


def run(cfg: DPOConfig) -> dict:
    spec = PREFERENCE_LOSSES[cfg.loss]
    engine = Engine(cfg, "dpo")
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, LoraSettings.from_config(cfg)).to(engine.device)  # the reference passes first
    pad = tokenizer.pad_token_id
    examples = encode(cfg, tokenizer, spec.paired, skip_invalid=cfg.skip_invalid)
    task = load_task(cfg.task)
    held = held_out_records(cfg, task) if task else []
    ref_model = ReferencePolicy(model, dtype=engine.autocast_dtype).model if task else None  # the held-out KL only
    ref = reference_logps(engine, model, examples, cfg, spec, pad) if spec.needs_reference else None
    fields = pair_fields(spec, examples)  # margins a loss cannot use are refused before the first step
    held_pairs = encode(cfg, tokenizer, spec.paired, path=cfg.eval_data) if cfg.eval_data else []
    held_ref = reference_logps(engine, model, held_pairs, cfg, spec, pad) if held_pairs and spec.needs_reference \
        else None
    total = steps_for(len(examples), engine.global_batch, cfg.epochs, cfg.max_steps)
    model, _, _ = engine.setup(model, total, len(examples))
    start, extra = engine.resume()
    policy = engine.unwrap(model)
    start_eval = start_evaluation(cfg, engine, policy, ref_model, tokenizer, task, held, start, extra)
    model.train()

    metrics, pairs_end = {}, {}
    for step in range(start, total):
        metrics = train_step(engine, model, examples, ref, spec, cfg, pad, step, fields=fields)
        due = cfg.eval_every and (step + 1) % cfg.eval_every == 0
        if task is not None and due and step + 1 < total:
            result = held_out(cfg, policy, ref_model, tokenizer, task, held)
            if engine.is_main:
                append_eval(engine.run_dir, step + 1, result)
        if held_pairs and (due or step + 1 == total):
            pairs_end = pairs_eval(engine, model, held_pairs, held_ref, spec, cfg, pad)
            metrics.update(pairs_end)
        engine.log(step, metrics)
        engine.maybe_checkpoint(step, extra={"start_eval": start_eval})

    engine.save_checkpoint(total, extra={"start_eval": start_eval})
    end_eval = held_out(cfg, policy, ref_model, tokenizer, task, held) if task else {}
    if task is not None and engine.is_main:
        append_eval(engine.run_dir, total, end_eval)
    engine.save_model(model, tokenizer)
    summary = summarize(cfg, engine, metrics, total, start_eval, end_eval)
    if held_pairs:
        summary.update(eval_loss=pairs_end.get("eval/loss"), eval_reward_accuracy=pairs_end.get("eval/rewards/accuracies"),
                       eval_reward_margin=pairs_end.get("eval/rewards/margins"), eval_pairs=len(held_pairs))
    return engine.finish(summary)


def held_out_records(cfg, task) -> list[dict]:
    return load_prompts(cfg.eval_prompts, task, "test", cfg.n_eval_prompts, cfg.seed, key="eval_prompts")
