"""Does torch.compile pay on this machine, for a run of the demo's length? Compile time against the gain per step.

    python benchmarks/compile_gain.py                # the reviews base model (the demo's), 2 threads
    python benchmarks/compile_gain.py --smoke        # a tiny random model, seconds

Two parts of a PPO/GRPO step are timed eager and compiled (inductor, which runs on a CPU through its C++ backend):
- the training forward + backward of the policy on a padded batch of the demo's PPO shape (32 rows of 8 + 48 tokens),
  compiled with static shapes over length buckets (widths rounded up to a multiple of 16, so a run of varying
  lengths compiles once per bucket, not once per step): the demo's widths fall in 2-3 buckets;
- the lean decoder's one-token step (generation/lean.py) at batch 64 over 48 new tokens, compiled with dynamic
  shapes (the cache it attends over grows by one slot a step; static shapes would recompile every step).
For each: the first call (compile included), the steady-state time per call eager and compiled, and the number of
steps after which compiling has paid for itself; against that, the demo's PPO stage runs 60 steps, each with one
rollout of 48 decode steps and 4 x 2 training forward + backward passes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of the next `repeats` calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def bucket(width: int, multiple: int = 16) -> int:
    """A padded width rounded up to a multiple of `multiple` (the compiled shapes: one graph per bucket)."""
    return -(-width // multiple) * multiple


def train_step(model, ids, mask):
    def run():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).sum().backward()
    return run


def decode_steps(model, batch: int, prompt: int, new: int, step_fn=None):
    from tether.generation.lean import LeanDecoder

    total = prompt + new
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt))
    key_mask = torch.ones(batch, total, dtype=torch.bool)

    def run():
        dec = LeanDecoder(model, batch, total, key_mask)
        forward = step_fn(dec) if step_fn else dec.forward
        with torch.no_grad():
            dec.forward(ids, torch.arange(prompt).expand(batch, -1), 0)
            tok = torch.randint(3, model.config.vocab_size, (batch, 1))
            for t in range(new):
                forward(tok, torch.full((batch, 1), prompt + t), prompt + t)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        from tether.testing import tiny_causal_lm, tiny_tokenizer

        model, rows, prompt, new, batch = tiny_causal_lm(tiny_tokenizer()), 4, 4, 6, 4
    else:
        from transformers import AutoModelForCausalLM

        from tether.tasks import reviews

        model, rows, prompt, new, batch = AutoModelForCausalLM.from_pretrained(reviews.build_base()), 32, 8, 48, 64
    model.train()
    width = bucket(prompt + new)
    ids = torch.randint(3, model.config.vocab_size, (rows, width))
    mask = torch.ones_like(ids)
    out = {}
    out["train eager"] = timed(train_step(model, ids, mask), args.repeats)
    compiled = torch.compile(model, dynamic=False)
    out["train compiled"] = timed(train_step(compiled, ids, mask), args.repeats)
    model.eval()
    out["decode eager"] = timed(decode_steps(model, batch, prompt, new), args.repeats)
    from tether.generation.lean import LeanDecoder

    step = torch.compile(LeanDecoder.forward, dynamic=True)  # one compiled function for every decoder
    out["decode compiled"] = timed(decode_steps(model, batch, prompt, new,
                                                lambda dec: lambda *a: step(dec, *a)), args.repeats)
    print(f"threads {args.threads}; train: {rows} rows x {width}; decode: batch {batch}, {prompt} + {new} tokens")
    print("| part | first call s | steady s | ")
    print("|---|---|---|")
    for name, (first, steady) in out.items():
        print(f"| {name} | {first:.2f} | {steady:.4f} |")
    for part in ("train", "decode"):
        (_, e), (first, c) = out[f"{part} eager"], out[f"{part} compiled"]
        gain = e - c
        pays = f"pays after {(first - c) / gain:.0f} calls" if gain > 0 else "never pays (slower compiled)"
        print(f"{part}: {e / c:.2f}x per call compiled; compile ~{first - c:.1f} s; {pays}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
