"""Reward-model training on human comparisons: Bradley-Terry (stage 2 of InstructGPT), `tether rm`.

    tether rm model=runs/sft/model data=prefs.jsonl out=runs/rm
    tether rm model=runs/sft/model data=rankings.jsonl           # K-way rankings, one element per prompt
    tether rm model=runs/sft/model data=prefs.jsonl ensemble=4   # 4 members, mean and std as reward + uncertainty

Model: any causal-LM directory (usually the SFT model) gets a scalar head initialised N(0, 1/(d+1)); an existing
sequence-classification RM is fine-tuned as it is (models.load_reward_model). The score is read at the last real token
(forward.reward_scores). Full fine-tuning or LoRA (lora_r > 0; merged on save unless merge_lora=false).

Data (`data_kind`, default auto: rankings when the first record has `completions`, pairs when it has `chosen`):
- pairs {prompt, chosen, rejected, [margin], [weight]}: losses.bradley_terry_loss, −log σ(r_w − r_l − m) with the
  record's margin (use_margin), label smoothing and the record's weight; chosen and rejected rows go through ONE
  forward (data.collate_pairs). Ties (chosen == rejected) are dropped and counted (InstructGPT drops ties).
- rankings {prompt, completions, ranking}: losses.ranking_loss, the C(K,2) pairs of a prompt are ONE element weighted
  1/C(K,2), from K forward rows (data.collate_rankings) instead of C(K,2) pair forwards.
- steps {prompt, steps, labels} (a process reward model) and unpaired {prompt, completion, label} (an outcome reward
  model): binary classifiers read at each step's delimiter / at the EOS (rewards.prm, Lightman et al. 2023), saved
  with reward_kind prm/orm and without reward normalisation; used as reward=prm:DIR.
The loss of a micro-batch is its sum over elements (pairs: weight-weighted) divided by the count over the whole
global batch (engine.all_sum), so gradient accumulation and data parallelism give exactly the global-batch mean.
Defaults follow InstructGPT: 1 epoch, cosine decay to 10% of the peak lr.

After training:
- eval on held-out comparisons (eval_data, or eval_fraction of data): accuracy, loss, ECE, length bias, gold
  agreement with `task=` (recipes.reward_eval); bayes_accuracy from the `<data stem>.meta.json` sidecar if present.
- normalisation (docs/reference.md §Reward model): reward_bias = mean raw score of the reference responses
  (normalize_data: prompt/completion records such as the SFT demonstrations; default: every completion of the training
  comparisons, i.e. samples of the policy the raters compared) and, with normalize_scale, reward_gain = 1/std. Both go
  into the saved config, so forward.reward_scores (and every consumer) returns (raw − bias)·gain. The training
  truncation lengths are stored too (reward_max_prompt_len / reward_max_completion_len) for rewards.LearnedReward.
- the saved directory scores the same outside tether (models.portable_reward_model): the gain is folded into the
  score head (reward_gain 1.0 in the saved config; the values found are kept as reward_raw_gain / reward_raw_bias),
  and the tokenizer pads with a token of its own, so AutoModelForSequenceClassification's plain forward on a
  right-padded batch reads the EOS as tether does. transformers' decoder heads have no bias parameter, so the bias
  stays in the config (in the saved units): HF's plain forward = tether's score + config.reward_bias.
- ensemble=K: K members trained with seeds seed..seed+K−1 (head init and data order differ; the held-out split is the
  same) in members/member-i/ (metrics, checkpoints, summary), their models in model/member-i/; the top summary.json
  holds the ensemble's eval (mean score) and per-member numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from tether import data as D
from tether.config import ConfigError, above, at_least, between, one_of, opt
from tether.engine import SCHEDULES, Engine, TrainConfig, steps_for
from tether.forward import reward_scores
from tether.losses import bradley_terry_loss, ranking_loss, soft_label_smoothing
from tether.models import LoraSettings, load_reward_model, load_tokenizer, portable_reward_model
from tether.recipes.reward_eval import (
    COMPARISON_KINDS,
    Comparisons,
    bayes_accuracy,
    evaluate_comparisons,
    load_comparisons,
    load_task,
)
from tether.rewards import prm
from tether.rewards.learned import score_sequences
from tether.tasks import TASKS
from tether.wrappers import hf_model

log = logging.getLogger(__name__)


@dataclass
class RewardConfig(TrainConfig):
    model: str = opt("", "causal-LM (usually the SFT model) or reward-model directory to start from (required)")
    data: str = opt("", "comparisons: pairs or rankings (JSONL, Parquet or saved dataset; required)")
    data_kind: str = opt("auto", "pairs | rankings | steps | unpaired | auto (told apart by the first record's "
                         "fields: chosen, completions, steps, completion + label)",
                         check=one_of("auto", *COMPARISON_KINDS))
    eval_data: str = opt("", "held-out comparisons (default: hold out eval_fraction of data)")
    eval_fraction: float = opt(0.1, "share of `data` held out for evaluation when eval_data is empty",
                               check=between(0, 1, high_open=True))
    eval_every: int = opt(0, "evaluate every N steps (0 = only at the end)", check=at_least(0))
    task: str = opt("", "embedded task the data comes from (reviews): report agreement with its gold reward",
                    check=one_of("", *TASKS))
    max_prompt_len: int = opt(256, "prompt tokens kept (cut from the left)", check=at_least(1))
    max_completion_len: int = opt(256, "completion tokens kept (cut from the right)", check=at_least(1))
    label_smoothing: float = opt(0.0, "label smoothing ε of the Bradley-Terry loss (pairs only)",
                                 check=between(0, 0.5, high_open=True))
    use_margin: bool = opt(True, "subtract a pair's `margin` field inside the sigmoid (Llama 2)")
    normalize: bool = opt(True, "shift rewards so the reference responses score mean 0")
    normalize_scale: bool = opt(False, "also scale rewards so the reference responses have std 1")
    normalize_data: str = opt("", "reference prompt/completion records (default: the training comparisons' completions)")
    normalize_max: int = opt(2000, "at most this many reference responses are scored", check=at_least(1))
    ensemble: int = opt(1, "train K reward models with seeds seed..seed+K-1 (uncertainty = their std)",
                        check=at_least(1))
    eval_batch_size: int = opt(32, "sequences per forward when scoring", check=at_least(1))
    skip_invalid: bool = opt(False, "skip invalid records (reported) instead of stopping at the first")
    lr: float = opt(1e-4, "peak learning rate (AdamW)", check=above(0))
    lr_schedule: str = opt("cosine", "learning-rate schedule after warmup: constant | linear | cosine",
                           check=one_of(*SCHEDULES))
    min_lr_ratio: float = opt(0.1, "final lr as a fraction of the peak (InstructGPT RM: cosine to 0.1)",
                              check=between(0, 1))

    def validate(self) -> None:
        super().validate()
        if not self.model or not self.data:
            raise ConfigError("rm needs model=DIR and data=FILE")


# --- the loss of one micro-batch, by data kind ------------------------------------------------------------------------
def pairs_loss(model, batch: dict, denominator: float, label_smoothing: float = 0.0, use_margin: bool = True,
               padding_free: bool = True):
    """Bradley-Terry over a collate_pairs batch: ONE forward of 2B rows, Σ_b w_b·ℓ_b / denominator."""
    scores = reward_scores(model, batch["input_ids"], batch["attention_mask"], normalize=False,
                           padding_free=padding_free, prefix_lengths=D.prompt_lengths(batch))  # (2B,)
    chosen, rejected = D.split_pairs(scores)  # rows 0..B-1 chosen, B..2B-1 rejected
    margin = batch["margin"] if use_margin else None
    eps = soft_label_smoothing(batch.get("prob"), label_smoothing)
    loss, metrics = bradley_terry_loss(chosen, rejected, margin, eps, batch["weight"])
    return loss * batch["weight"].sum() / denominator, metrics  # weighted mean -> weighted sum / global weight


def rankings_loss(model, batch: dict, denominator: float, label_smoothing: float = 0.0, use_margin: bool = True,
                  padding_free: bool = True):
    """InstructGPT ranking loss over a collate_rankings batch: K forward rows per prompt, Σ_prompts ℓ / denominator."""
    scores = reward_scores(model, batch["input_ids"], batch["attention_mask"], normalize=False,
                           padding_free=padding_free, prefix_lengths=D.prompt_lengths(batch))  # (N,)
    group, rank = batch["group"], batch["rank"]
    B, K = int(group.max()) + 1, int(rank.max()) + 1
    ordered = scores.new_zeros(B, K).index_put((group, rank), scores)  # (B, K) [b, r] = score of the r-th best
    valid = torch.zeros(B, K, dtype=torch.bool, device=scores.device)  # (B, K) False where a prompt has < K
    valid[group, rank] = True
    ranking = torch.arange(K, device=scores.device).expand(B, K)  # `ordered` is already best -> worst
    loss, metrics = ranking_loss(ordered, ranking, valid)
    return loss * B / denominator, metrics


LOSSES = {"pairs": (D.collate_pairs, pairs_loss), "rankings": (D.collate_rankings, rankings_loss),
          "steps": (prm.collate_labelled, prm.labelled_loss), "unpaired": (prm.collate_labelled, prm.labelled_loss)}


def element_weight(kind: str, example) -> float:
    """What an element adds to the global denominator: a pair its weight, a ranking 1, a labelled completion its
    count of labelled positions (the classifiers' loss is a mean over labelled steps)."""
    if kind in prm.LABELLED_KINDS:
        return float(len(example.targets))
    return example.weight if kind == "pairs" else 1.0


# --- data -------------------------------------------------------------------------------------------------------------
def split_train_eval(cfg: RewardConfig, tokenizer) -> tuple[Comparisons, Comparisons]:
    """Training and held-out comparisons; without eval_data a seeded eval_fraction of `data` is held out."""
    args = (tokenizer, cfg.max_prompt_len, cfg.max_completion_len, cfg.skip_invalid)
    train = load_comparisons(cfg.data, cfg.data_kind, *args)
    if cfg.eval_data:
        return train, load_comparisons(cfg.eval_data, "auto", *args)  # its own kind: rankings can be judged on pairs
    order = list(range(len(train.examples)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = int(len(order) * cfg.eval_fraction) if len(order) >= 20 else 0

    def subset(idx: list[int]) -> Comparisons:
        return Comparisons(train.kind, [train.records[i] for i in idx], [train.examples[i] for i in idx],
                           train.truncation, train.ties_dropped)

    return subset(order[n_eval:]), subset(order[:n_eval])


def reference_sequences(cfg: RewardConfig, tokenizer, train: Comparisons) -> list[list[int]]:
    """Token sequences whose raw scores set the normalisation (at most normalize_max of them)."""
    if not cfg.normalize_data:
        kind = COMPARISON_KINDS[train.kind]
        seqs = [s for ex in train.examples for s in kind.sequences(ex)]
    else:
        seqs = []
        for rec in D.load_records(cfg.normalize_data, "demonstrations", skip_invalid=cfg.skip_invalid):
            if "messages" in rec:  # the last assistant turn is the response, the turns before it the prompt
                prompt, completion = rec["messages"][:-1], rec["messages"][-1]["content"]
            elif "completion" not in rec:  # a {"text"} record: the whole text is the response
                seqs.append(D.encode_demonstration(tokenizer, rec, cfg.max_prompt_len, cfg.max_completion_len).input_ids)
                continue
            else:  # a string, or turns after a chat prompt (the template's continuation)
                prompt, completion = rec["prompt"], rec["completion"]
            p, _ = D.encode_prompt(tokenizer, prompt, cfg.max_prompt_len)
            c, _ = D.encode_reply(tokenizer, prompt, completion, cfg.max_completion_len)
            seqs.append(p + c)
    return seqs[: cfg.normalize_max]


def normalization(raw: torch.Tensor, scale: bool) -> tuple[float, float]:
    """(bias, gain) with (raw − bias)·gain of mean 0 (and std 1 when `scale`) on the reference scores (N,)."""
    bias = float(raw.mean())
    std = float(raw.std()) if len(raw) > 1 else 0.0
    gain = 1.0 / std if scale and std > 0 else 1.0
    return bias, gain


# --- training ---------------------------------------------------------------------------------------------------------
def train_one(cfg: RewardConfig, tokenizer, train: Comparisons, held: Comparisons, model_dir: Path | None = None,
              task=None) -> dict:
    """Train, evaluate, normalise and save one reward model; returns its summary."""
    engine = Engine(cfg, "rm")
    model = load_reward_model(cfg.model, LoraSettings.from_config(cfg))
    pad = tokenizer.pad_token_id
    collate, loss_fn = LOSSES[train.kind]
    total = steps_for(len(train.examples), engine.global_batch, cfg.epochs, cfg.max_steps)
    model, _, _ = engine.setup(model, total, len(train.examples))
    start, _ = engine.resume()
    model.train()

    loss_value, accuracy = float("nan"), float("nan")
    for step in range(start, total):
        micro = [[train.examples[i] for i in mb] for mb in engine.micro_batches(step)]
        denominator = engine.all_sum(sum(element_weight(train.kind, ex) for mb in micro for ex in mb))
        step_loss, step_acc = 0.0, 0.0
        for j, examples in enumerate(micro):
            batch = {k: v.to(engine.device) for k, v in collate(examples, pad).items()}
            loss, metrics = loss_fn(model, batch, denominator, cfg.label_smoothing, cfg.use_margin, cfg.padding_free)
            engine.backward(loss, step, last_micro=j == len(micro) - 1)
            step_loss += loss.item()
            step_acc += metrics["accuracy"].item() / len(micro)
            engine.count_tokens(int(batch["attention_mask"].sum()))
        stats = engine.optimizer_step()
        loss_value = engine.all_sum(step_loss)  # each process holds its share of the global mean
        accuracy = engine.all_sum(step_acc) / engine.world_size
        metrics = {"loss": loss_value, "accuracy": accuracy, **stats}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            found = evaluate_comparisons([model], held, pad, cfg.eval_batch_size, engine.device)
            metrics.update({f"eval_{k}": found[k] for k in ("accuracy", "loss", "ece") if k in found})
        engine.log(step, metrics)
        engine.maybe_checkpoint(step)
    engine.save_checkpoint(total)

    # normalised and evaluated in fp32, the precision its consumers (rm:DIR, `rm score`, AutoModel) run it in: stats
    # taken under bf16 autocast would leave the saved model off mean 0 by bf16's rounding
    model = engine.unwrap(model, keep_autocast=False)
    hf = hf_model(model)
    hf.config.reward_bias, hf.config.reward_gain = 0.0, 1.0
    bias, gain = 0.0, 1.0
    if train.kind in prm.LABELLED_KINDS:  # a classifier: its logit is a log-odds and is kept one
        hf.config.reward_kind, hf.config.prm_delimiter = ("prm" if train.kind == "steps" else "orm"), prm.DELIMITER
    elif cfg.normalize:
        raw = score_sequences(model, reference_sequences(cfg, tokenizer, train), pad, cfg.eval_batch_size,
                              engine.device, normalize=False)
        bias, gain = normalization(raw, cfg.normalize_scale)
    hf.config.reward_bias, hf.config.reward_gain = bias, gain
    hf.config.reward_max_prompt_len, hf.config.reward_max_completion_len = cfg.max_prompt_len, cfg.max_completion_len
    found = evaluate_comparisons([model], held, pad, cfg.eval_batch_size, engine.device, task)
    engine.save_model(model, portable_reward_model(model, tokenizer), model_dir)  # gain in the head, a pad of its own
    return engine.finish({
        "eval_accuracy": found.get("accuracy", float("nan")),
        "eval_loss": found.get("loss", float("nan")),
        "bayes_accuracy": bayes_accuracy(cfg.eval_data or cfg.data),  # the labels the accuracy is measured on
        "ece": found.get("ece", float("nan")),
        "reward_gain": gain,
        "reward_bias": bias,
        "train_loss": loss_value,
        "train_accuracy": accuracy,
        "steps": total,
        "tokens_per_second": engine.tokens_per_second(),
        "data_kind": train.kind,
        "train_examples": len(train.examples),
        "eval_examples": len(held.examples),
        "ties_dropped": train.ties_dropped,
        **{f"truncation_{k}": v for k, v in train.truncation.items()},
        **{f"eval_{k}": v for k, v in found.items() if k not in ("accuracy", "loss", "ece")},
    })


def run(cfg: RewardConfig) -> dict:
    tokenizer = load_tokenizer(cfg.model)
    train, held = split_train_eval(cfg, tokenizer)
    if train.kind == "rankings" and cfg.label_smoothing > 0:
        raise ConfigError("label_smoothing applies to pairs only; the ranking loss has none")
    task = load_task(cfg.task)
    if cfg.ensemble == 1:
        return train_one(cfg, tokenizer, train, held, task=task)
    return train_ensemble(cfg, tokenizer, train, held, task)


def train_ensemble(cfg: RewardConfig, tokenizer, train: Comparisons, held: Comparisons, task) -> dict:
    """K members with seeds seed + i, each a run of its own under members/; then the ensemble's (mean score) eval."""
    top = Engine(cfg, "rm")
    members = []
    for i in range(cfg.ensemble):
        member_cfg = dataclasses.replace(cfg, seed=cfg.seed + i, ensemble=1,
                                         out=str(top.run_dir / "members" / f"member-{i}"))
        members.append(train_one(member_cfg, tokenizer, train, held, top.run_dir / "model" / f"member-{i}", task))
    models = [load_reward_model(top.run_dir / "model" / f"member-{i}").to(top.device) for i in range(cfg.ensemble)]
    found = evaluate_comparisons(models, held, tokenizer.pad_token_id, cfg.eval_batch_size, top.device, task)
    mean = lambda key: sum(m[key] for m in members) / len(members)  # noqa: E731
    return top.finish({
        "eval_accuracy": found.get("accuracy", float("nan")),
        "eval_loss": found.get("loss", float("nan")),
        "bayes_accuracy": bayes_accuracy(cfg.eval_data or cfg.data),  # the labels the accuracy is measured on
        "ece": found.get("ece", float("nan")),
        "member_eval_accuracy_mean": mean("eval_accuracy"),
        "reward_gain": [m["reward_gain"] for m in members],
        "reward_bias": [m["reward_bias"] for m in members],
        "train_loss": mean("train_loss"),
        "steps": sum(m["steps"] for m in members),
        "tokens_per_second": sum(m["tokens_per_second"] * m["wall_seconds"] for m in members) / max(
            1e-9, sum(m["wall_seconds"] for m in members)),
        "ensemble": cfg.ensemble,
        "data_kind": train.kind,
        "train_examples": len(train.examples),
        "eval_examples": len(held.examples),
        **{f"eval_{k}": v for k, v in found.items() if k not in ("accuracy", "loss", "ece")},
    })
