"""GPU figures of issue 8 in one run: decode speed by backend, GRPO end to end vs TRL, DPO tokens/s and % of peak.

    python benchmarks/gpu.py                 # on a CUDA machine: Qwen2.5-0.5B-shaped random model (494M) in bf16
    python benchmarks/gpu.py --smoke         # anywhere, in seconds: a tiny model, tiny shapes (tests/test_bench.py)
    python benchmarks/gpu.py --append        # also append the table to benchmarks/RESULTS.md

1. Generation: `tether.generation.sample` at batch 64, 128 prompt + 256 new tokens, no EOS stop (the EOS id lies
   outside the vocabulary), temperature 1, for transformers' `model.generate` (the peer, "hf") and the backends
   "eager" and "lean". New tokens/s = B·T / wall time of a whole call (prefill included), median of `--repeats` calls
   after one warm-up call. Target: the fastest backend >= 25,000 new tokens/s.
2. GRPO end to end, tether vs TRL on identical work (benchmarks/vs_trl.py's runners and settings): 4 prompts × G = 8,
   128 + 256 tokens, β = 0, bf16 autocast in both; tether's sampling uses its "auto" backend. Target: tether >= 10x
   TRL's tokens/s.
3. DPO, tether (reference log-probs once) and TRL (reference model each step), batch 8 pairs, 512 + 512 tokens.
   % of peak = tokens/s · 8·N / peak, where 8·N FLOPs per token counts forward 2N + backward 4N + reference 2N, and
   the peak is the measured bf16 matmul ceiling of this device (an 8192³ matmul; the spec sheet says more). Target:
   tether >= 40% of the bf16 peak.
TRL parts are skipped (and say so) when TRL is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import statistics
import sys
import tempfile
import time
import types
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vs_trl as V  # noqa: E402  (the side-by-side runners and settings, shared)

# Qwen2.5-0.5B's shape: 24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864, vocab 151,936, tied embeddings
FULL = V.Settings(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151_936, repeats=3)
SMOKE = V.Settings(hidden=32, layers=1, heads=2, intermediate=64, vocab=64, repeats=1, warmup=1)
GEN = {"full": (64, 128, 256), "smoke": (4, 4, 6)}  # batch, prompt tokens, new tokens
GRPO = {"full": {"grpo_prompts": 4, "group_size": 8, "prompt_len": 128, "completion_len": 256, "grpo_steps": 4},
        "smoke": {"grpo_prompts": 1, "group_size": 2, "prompt_len": 4, "completion_len": 6, "grpo_steps": 3}}
DPO = {"full": {"batch": 8, "prompt_len": 512, "completion_len": 512, "steps": 6},
       "smoke": {"batch": 2, "prompt_len": 4, "completion_len": 6, "steps": 3}}
TARGETS = {"best new tokens/s": 25_000, "grpo tether/TRL": 10.0, "dpo % of bf16 peak": 40.0}


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n×n×n matmul in `dtype` (median of 5 after a warm-up): the practical ceiling of this device."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(6):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def generation(s: V.Settings, shape: tuple[int, int, int], device, dtype, repeats: int, log=print) -> dict[str, float]:
    """New tokens/s of `sample` per backend on a random model, fixed length (EOS outside the vocabulary)."""

    batch, prompt_len, new = shape
    model = V.build_model(s).to(device=device, dtype=dtype).eval()
    prompts = torch.randint(3, s.vocab, (batch, prompt_len), device=device)
    found = {}
    for backend in ("hf", "eager", "lean"):
        times = []
        for r in range(repeats + 1):  # the first call warms up (kernels, allocator) and is not counted
            generator = torch.Generator(device=device).manual_seed(r)
            sync(device)
            t0 = time.perf_counter()
            out = generate(model, prompts, new, s.vocab, backend, generator)
            sync(device)
            if r:
                times.append(time.perf_counter() - t0)
        assert out.response_ids.shape == (batch, new), out.response_ids.shape
        found[backend] = batch * new / statistics.median(times)
        log(f"  generate {backend:<6} {found[backend]:,.0f} new tokens/s ({1000 * statistics.median(times) / new:.2f} ms/step)")
    return found


def generate(model, prompts, new: int, eos: int, backend: str, generator):
    """One sampling call: tether's `sample` with `backend`, or for "hf" transformers' `model.generate`."""
    from tether.generation import sample

    if backend != "hf":
        return sample(model, prompts, new, eos_token_id=eos, pad_token_id=0, temperature=1.0, backend=backend,
                      generator=generator)
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))  # generate draws from the global RNG
    seqs = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                          min_new_tokens=new, do_sample=True, temperature=1.0, top_k=None, pad_token_id=0,
                          eos_token_id=eos)
    return types.SimpleNamespace(response_ids=seqs[:, prompts.shape[1]:])


def side_by_side(stage: str, s: V.Settings, root: Path, libs, log=print) -> dict[str, float]:
    """Median tokens/s per library for one stage, with vs_trl's runners (tether and TRL alternate)."""
    found = V.measure([stage], s, root, libs, log=log)[stage]
    return {lib: statistics.median(values) for lib, values in found.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model and shapes, seconds, any device")
    p.add_argument("--parts", default="generate,grpo,dpo", help="comma list of generate, grpo, dpo")
    p.add_argument("--repeats", type=int, default=None, help="calls / runs per measurement (median)")
    p.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    size = "smoke" if args.smoke else "full"
    device, dtype = device_and_dtype()
    if device.type != "cuda" and not args.smoke:
        print("gpu.py: no CUDA device; run with --smoke to check the script on a CPU", file=sys.stderr)
        return 2
    base = SMOKE if args.smoke else FULL
    if args.repeats:
        base = replace(base, repeats=args.repeats)
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    try:
        import trl  # noqa: F401

        libs = ("tether", "trl")
    except ImportError:
        libs = ("tether",)
        print('gpu.py: TRL not installed (pip install -e ".[bench]"): tether figures only')
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    with torch.device("meta"):  # the shape only, no memory
        n_params = sum(p.numel() for p in V.build_model(base).parameters())
    peak = matmul_peak(device, dtype, 256 if args.smoke else 8192)
    rows = [("device", torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
            ("model", f"Qwen2-shaped, {n_params / 1e6:.1f}M parameters, {str(dtype)[6:]}"),
            (f"measured {str(dtype)[6:]} matmul peak", f"{peak / 1e12:.1f} TFLOP/s")]
    with tempfile.TemporaryDirectory(prefix="tether-gpu-bench-") as tmp:
        if "generate" in parts:
            found = generation(base, GEN[size], device, dtype, base.repeats)
            b, prompt_len, new = GEN[size]
            for backend, value in found.items():
                rows.append((f"generate {backend}, batch {b}, {prompt_len} + {new} tokens", f"{value:,.0f} new tokens/s"))
            best = max((k for k in found if k != "hf"), key=found.get)
            rows.append((f"{best} / hf", f"{found[best] / found['hf']:.1f}x (target: >= 25,000 new tokens/s)"))
        if "grpo" in parts:
            s = replace(base, **GRPO[size])
            found = side_by_side("grpo", s, Path(tmp) / "grpo", libs)
            rows.append((f"GRPO tether (auto), {s.grpo_prompts} prompts x {s.group_size}, {s.prompt_len} + {s.completion_len}",
                         f"{found['tether']:,.0f} tokens/s"))
            if "trl" in found:
                rows.append(("GRPO TRL (same work)", f"{found['trl']:,.0f} tokens/s; tether/TRL "
                             f"{found['tether'] / found['trl']:.1f}x (target >= 10x)"))
        if "dpo" in parts:
            s = replace(base, **DPO[size])
            found = side_by_side("dpo", s, Path(tmp) / "dpo", libs)
            for lib, value in found.items():
                share = 100 * value * 8 * n_params / peak
                rows.append((f"DPO {lib}, batch {s.batch}, {s.prompt_len} + {s.completion_len}",
                             f"{value:,.0f} tokens/s = {share:.1f}% of the measured peak at 8·N FLOPs/token"
                             + (" (target >= 40%)" if lib == "tether" else "")))
    text = (f"\n## GPU, {dt.date.today().isoformat()} (benchmarks/gpu.py{' --smoke' if args.smoke else ''})\n\n"
            f"- versions: {V.versions()}\n\n| what | figure |\n|---|---|\n"
            + "".join(f"| {k} | {v} |\n" for k, v in rows))
    print(text)
    if args.append and not args.smoke:
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
