"""Where a tether GRPO step goes: decode, reward, old/reference log-probs, update (forward + backward), optimizer.

    python benchmarks/grpo_profile.py               # vs_trl.py's GRPO shape: 2 prompts x G = 8, 32 + 64 tokens
    python benchmarks/grpo_profile.py --beta 0.04   # with a reference model (its log-probs are one more forward)
    python benchmarks/grpo_profile.py --smoke

The recipe runs unchanged (`tether.recipes.grpo.run`, the model and data of benchmarks/vs_trl.py); the functions it
calls for each phase are wrapped with a wall clock for the run: `sample_records` (prompt encoding, the decode
loop, text decoding), the reward, `response_outputs` without a gradient (old or reference log-probs) and with one
(the update's forward), `Engine.backward` and `Engine.optimizer_step`. Per phase: seconds per step after the warm-up
steps, and its share of the step. The decode floor beside it is the matrix products alone: the decode's FLOPs at the
rollout batch divided by the rate `torch.mm` reaches at that shape on this machine (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@contextlib.contextmanager
def phase_clocks(totals: dict, stamps: list):
    """Wrap the GRPO recipe's phase functions; `totals[phase]` collects (start, seconds) per call, `stamps` the
    step ends."""
    from tether import engine as E
    from tether.recipes import grpo

    originals = {"sample_records": grpo.sample_records, "score_with_steps": grpo.score_with_steps,
                 "response_outputs": grpo.response_outputs}
    step, backward = E.Engine.optimizer_step, E.Engine.backward

    def clocked(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            key = name if name != "response_outputs" else ("update forward" if torch.is_grad_enabled()
                                                           else "old/ref log-probs")
            totals[key].append((t0, time.perf_counter() - t0))
            return out
        return wrapper

    names = {"sample_records": "decode", "score_with_steps": "reward", "response_outputs": "response_outputs"}
    for attr, fn in originals.items():
        setattr(grpo, attr, clocked(names[attr], fn))
    ref_logprobs = None
    with contextlib.suppress(ImportError, AttributeError):
        from tether import reference

        ref_logprobs = reference.ReferencePolicy.logprobs
        reference.ReferencePolicy.logprobs = clocked("reference", ref_logprobs)
    E.Engine.backward = clocked("backward", backward)

    def stamped(self, *a, **k):
        t0 = time.perf_counter()
        out = step(self, *a, **k)
        totals["optimizer"].append((t0, time.perf_counter() - t0))
        stamps.append(time.perf_counter())
        return out

    E.Engine.optimizer_step = stamped
    try:
        yield
    finally:
        for attr, fn in originals.items():
            setattr(grpo, attr, fn)
        E.Engine.optimizer_step, E.Engine.backward = step, backward
        if ref_logprobs is not None:
            reference.ReferencePolicy.logprobs = ref_logprobs


def mm_rate(rows: int, hidden: int, threads: int) -> float:
    """FLOP/s of torch.mm at (rows, hidden) x (hidden, hidden) on this machine, median of 50 calls."""
    torch.set_num_threads(threads)
    a, b = torch.randn(rows, hidden), torch.randn(hidden, hidden)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * rows * hidden * hidden / statistics.median(times)


def decode_flops(s) -> float:
    """Matrix-product FLOPs of one decode step at the rollout batch: per layer q, k, v, o (4 h²) and the MLP (3 h·i),
    the LM head (h·V), ×2 per multiply-add, × rows."""
    rows = s.grpo_prompts * s.group_size
    per_row = s.layers * (4 * s.hidden ** 2 + 3 * s.hidden * s.intermediate) + s.hidden * s.vocab
    return 2 * rows * per_row


def main(argv=None) -> int:
    import vs_trl

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = vs_trl.Settings(**(vs_trl.SMOKE if args.smoke else {}), threads=args.threads)
    s.grpo_steps = args.steps
    totals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    stamps: list[float] = []
    from tether.recipes.grpo import GRPOConfig, run

    with tempfile.TemporaryDirectory(prefix="tether-grpo-profile-") as tmp:
        a = vs_trl.build_assets(Path(tmp), s)
        cfg = GRPOConfig(model=str(a.grpo_dir), task="none", prompts=a.jsonl("prompts", a.prompts),
                         eval_prompts=a.jsonl("prompts", a.prompts), reward=f"python:{vs_trl.REWARDS_FILE}:share_of_t3",
                         group_size=s.group_size, prompts_per_step=s.grpo_prompts, max_new_tokens=s.completion_len,
                         temperature=1.0, beta=args.beta, aggregation="token-mean", batch_size=s.grpo_prompts * s.group_size,
                         max_steps=s.grpo_steps, out=str(Path(tmp) / "run"), lr=s.lr, progress=False, seed=0)
        with phase_clocks(totals, stamps):
            run(cfg)
    first = stamps[min(s.warmup, len(stamps) - 2) - 1] if s.warmup > 0 else stamps[0]  # the timed window
    gaps = [b - a for a, b in zip(stamps, stamps[1:]) if a >= first]
    step, n = statistics.median(gaps), len(gaps)
    print(f"GRPO step, {s.grpo_prompts} prompts x G = {s.group_size}, {s.prompt_len} + {s.completion_len} tokens, "
          f"hidden {s.hidden}, {s.layers} layers, vocab {s.vocab}, beta {args.beta}, {args.threads} threads: "
          f"median step {step:.3f} s, mean {sum(gaps) / n:.3f} s over {n} steps\n")
    print("| phase | s per step | share of the mean step |\n|---|---|---|")
    accounted = 0.0
    for name, calls in totals.items():
        per_step = sum(d for t0, d in calls if first <= t0 < stamps[-1]) / n
        accounted += per_step
        print(f"| {name} | {per_step:.3f} | {per_step / (sum(gaps) / n):.0%} |")
    rest = sum(gaps) / n - accounted
    print(f"| the rest (advantages, loss, metrics, logging, data) | {rest:.3f} | {rest / (sum(gaps) / n):.0%} |")
    rows = s.grpo_prompts * s.group_size
    floor = decode_flops(s) * s.completion_len / mm_rate(rows, s.hidden, args.threads)
    print(f"\ndecode floor (matrix products only, torch.mm at {rows} x {s.hidden}): {floor:.3f} s a rollout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
