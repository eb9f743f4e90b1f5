"""Supervised fine-tuning on demonstrations: prompt-masked cross-entropy (stage 1 of InstructGPT).

    tether sft model=DIR data=demos.jsonl out=runs/sft lr=1e-4 epochs=2

The loss is the summed NLL of completion tokens divided by the number of completion tokens in the whole global batch,
so gradient accumulation and data parallelism give the same update as one large batch.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from tether import data as D
from tether.config import ConfigError, above, at_least, between, opt
from tether.engine import Engine, TrainConfig, steps_for
from tether.forward import completion_nll
from tether.models import LoraSettings, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class SFTConfig(TrainConfig):
    model: str = opt("", "Hugging Face model directory to fine-tune (required)")
    data: str = opt("", "demonstrations: JSONL, Parquet or saved dataset of {prompt, completion} or {messages}")
    eval_data: str = opt("", "held-out demonstrations (default: hold out eval_fraction of data)")
    eval_fraction: float = opt(0.05, "share of `data` held out for eval_loss when eval_data is empty",
                               check=between(0, 1, high_open=True))
    eval_every: int = opt(0, "evaluate every N steps (0 = only at the end)", check=at_least(0))
    max_prompt_len: int = opt(256, "prompt tokens kept (cut from the left)", check=at_least(1))
    max_completion_len: int = opt(256, "completion tokens kept (cut from the right)", check=at_least(1))
    packing: bool = opt(False, "pack several examples per row (padding-free); see data.pack_examples")
    skip_invalid: bool = opt(False, "skip invalid records (reported) instead of stopping at the first")
    lr: float = opt(1e-4, "peak learning rate (AdamW)", check=above(0))

    def validate(self) -> None:
        super().validate()
        if not self.model or not self.data:
            raise ConfigError("sft needs model=DIR and data=FILE")


def encode_split(cfg: SFTConfig, tokenizer, path: str) -> tuple[list, D.TruncationStats]:
    records = D.load_records(path, "demonstrations", skip_invalid=cfg.skip_invalid)
    return D.encode_records(D.encode_demonstration, tokenizer, records, cfg.max_prompt_len, cfg.max_completion_len,
                            log)


def split_train_eval(cfg: SFTConfig, tokenizer) -> tuple[list, list, dict]:
    train, stats = encode_split(cfg, tokenizer, cfg.data)
    if cfg.eval_data:
        held, _ = encode_split(cfg, tokenizer, cfg.eval_data)
    else:
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = int(len(train) * cfg.eval_fraction) if len(train) >= 20 else 0
        held = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in order[n_eval:]]
    if cfg.packing:
        train = D.pack_examples(train, cfg.max_prompt_len + cfg.max_completion_len)
    return train, held, stats.as_dict()


@torch.no_grad()
def eval_loss(model, examples: list, pad_id: int, batch_size: int, device) -> float:
    """Mean token NLL of the held-out demonstrations (nan when there are none)."""
    if not examples:
        return float("nan")
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in D.collate_lm(examples[i : i + batch_size], pad_id).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += completion_nll(model, batch, num_tokens=1.0).item()
        count += n
    model.train()
    return total / max(1, count)


def run(cfg: SFTConfig) -> dict:
    engine = Engine(cfg, "sft")
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, LoraSettings.from_config(cfg))
    train, held, truncation = split_train_eval(cfg, tokenizer)
    pad = tokenizer.pad_token_id
    total = steps_for(len(train), engine.global_batch, cfg.epochs, cfg.max_steps)
    model, _, _ = engine.setup(model, total, len(train))
    start, _ = engine.resume()
    model.train()

    loss_value = float("nan")
    for step in range(start, total):
        batches = [D.collate_lm([train[i] for i in mb], pad) for mb in engine.micro_batches(step)]
        batches = [{k: v.to(engine.device) for k, v in b.items()} for b in batches]
        n_tokens = engine.all_sum(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
        step_loss = 0.0
        for j, batch in enumerate(batches):
            loss = completion_nll(model, batch, num_tokens=n_tokens, padding_free=cfg.padding_free)
            engine.backward(loss, step, last_micro=j == len(batches) - 1)
            step_loss += loss.item()
            engine.count_tokens(int(batch["attention_mask"].sum()))
        stats = engine.optimizer_step()
        loss_value = engine.all_sum(step_loss)  # each process holds its share of the global mean
        metrics = {"loss": loss_value, **stats}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            metrics["eval_loss"] = eval_loss(model, held, pad, cfg.batch_size, engine.device)
        engine.log(step, metrics)
        engine.maybe_checkpoint(step)

    engine.save_checkpoint(total)
    engine.save_model(model, tokenizer)
    return engine.finish({
        "train_loss": loss_value,
        "eval_loss": eval_loss(model, held, pad, cfg.batch_size, engine.device),
        "steps": total,
        "train_examples": len(train),
        "eval_examples": len(held),
        **{f"truncation_{k}": v for k, v in truncation.items()},
        "tokens_per_second": engine.tokens_per_second(),
    })
