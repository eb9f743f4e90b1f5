"""Pretraining a tiny causal LM on a generated corpus, and the cache the embedded tasks build into.

This is not a recipe: it is how an embedded task makes its *base model* (what a downloaded checkpoint would be
elsewhere). A short, plain AdamW loop over packed token blocks.

A build is a function of its settings and seed alone: `pinned_threads` runs it on BUILD_THREADS threads with torch's
deterministic algorithms, whatever the caller's thread count (the same 60 steps gave other weights on 1 thread than
on 2: float sums are split by thread count), and the reviews tokenizer has a fixed merge order. Two builds on
machines of one kind are byte-identical (tests/test_tasks_reviews.py, tests/test_tasks_arithmetic.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig


def cache_root() -> Path:
    return Path(os.environ.get("TETHER_CACHE", Path.home() / ".cache" / "tether"))


def cache_dir(task: str, settings: dict) -> Path:
    """`<cache>/<task>-<hash of settings>`: a change of version or settings builds anew."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / f"{task}-{digest}"


BUILD_THREADS = 2  # the build's torch thread count, fixed so every machine computes the same sums


@contextmanager
def pinned_threads(threads: int = BUILD_THREADS) -> Iterator[None]:
    """Run a block on `threads` torch threads with deterministic algorithms; restore both afterwards."""
    before, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(strict)


def build_cached(target: Path, build: Callable[[Path], None], force: bool = False) -> Path:
    """Build into a temporary sibling and rename, so an interrupted build never leaves a half cache."""
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        with pinned_threads():
            build(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_llama(vocab_size: int, hidden: int, layers: int, heads: int, max_len: int, pad_id: int, eos_id: int,
               seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_len,
        tie_word_embeddings=True, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id,
        attention_dropout=0.0, rope_theta=10000.0,
    )
    return AutoModelForCausalLM.from_config(config)


def pack_blocks(token_lists: list[list[int]], block: int) -> torch.Tensor:
    """Concatenate documents (each already ending in EOS) and cut into (N, block) rows."""
    flat = [t for doc in token_lists for t in doc]
    n = len(flat) // block
    return torch.tensor(flat[: n * block]).view(n, block)


def lr_factor(step: int, warmup: int, decay_start: int, decay_steps: int) -> float:
    """Linear warmup to 1 over `warmup` steps, 1 until `decay_start`, then cosine to 0 over `decay_steps`."""
    if step < warmup:
        return (step + 1) / warmup
    if step < decay_start:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - decay_start) / max(1, decay_steps))))


def pretrain(model, blocks: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int,
             log_every: int = 100, name: str = "pretrain", targets: torch.Tensor | None = None,
             until_loss: float | None = None, cooldown: int = 1000, warmup: int | None = None) -> list[float]:
    """Next-token cross-entropy on random batches of packed blocks. `targets` (N, L) bool, if given, marks the tokens
    whose prediction is trained (default: every token after the first).

    Schedule: linear warmup (default 5% of `steps`), then cosine decay to 0 at `steps`. With `until_loss`, the lr
    stays at its peak until the mean loss of the last 100 steps falls below it, then decays over `cooldown` steps;
    `steps` caps the whole run. Small models learn column arithmetic abruptly, after a plateau whose length depends
    on the seed (arithmetic, 4,000 steps of cosine: base build 0 left its plateau at step ~2,000, build 1 never did);
    training until the loss says the skill is there gives every build the same skill, at its own length."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = warmup or max(1, steps // 20)
    decay_start, end = (warmup, steps) if until_loss is None else (steps - cooldown, steps)
    model.train()
    losses, t0, step = [], time.time(), 0
    while step < end:
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, warmup, decay_start, end - decay_start)
        rows = torch.randint(0, len(blocks), (batch_size,), generator=generator)
        batch = blocks[rows]  # (B, L)
        logits = model(input_ids=batch).logits[:, :-1]
        losses_bt = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                    reduction="none")  # (B·(L−1),)
        if targets is None:
            loss = losses_bt.mean()
        else:
            mask = targets[rows][:, 1:].reshape(-1).to(losses_bt.dtype)
            loss = (losses_bt * mask).sum() / mask.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if until_loss is not None and step < decay_start and len(losses) >= 100 and sum(losses[-100:]) < 100 * until_loss:
            decay_start, end = step + 1, min(steps, step + 1 + cooldown)  # learnt: cool down and stop
        if log_every and (step % log_every == 0 or step == end - 1):
            print(f"  {name} step {step + 1}/{end} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
        step += 1
    model.eval()
    return losses
