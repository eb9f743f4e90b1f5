"""Peak memory of DPO and GRPO at a real vocabulary (Qwen2.5's 151,936 tokens): tether against TRL, on a CPU.

    python benchmarks/vocab_memory.py                   # DPO and GRPO; tether, TRL as it comes, TRL on tether's settings
    python benchmarks/vocab_memory.py --stages dpo --libs tether,trl-defaults
    python benchmarks/vocab_memory.py --smoke           # seconds: a small vocabulary (tests/test_bench.py runs this)

With a small hidden size and a real vocabulary, the (rows, length, V) logits, not the weights, are what a training
step holds: at the DPO shape here (4 pairs = 8 rows of 32 + 96 tokens) one fp32 copy of them is 0.62 GB, while the
whole model (hidden 64, 2 layers, tied embeddings) is 41 MB. tether takes log-probs through the LM head in chunks
(src/tether/lm_head.py); TRL computes the full logits and their log-softmax.

How it is measured: each (stage, library) runs in its own fresh Python process (so no run inherits another's heap):
it builds the same model, tokenizer and data as benchmarks/vs_trl.py (`Settings` below), reads its resident set size
(VmRSS) just before training, runs the library's normal training loop for a few steps, and reports the peak resident
set size from then on (VmHWM, reset at the baseline through /proc/self/clear_refs; getrusage's ru_maxrss where
that reset is not allowed) and the peak minus that baseline (what training added: activations,
logits, gradients, optimizer state, the reference model). The ratio is of the added memory; both figures are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

QWEN_VOCAB = 151_936
SHAPES = {"vocab": QWEN_VOCAB, "hidden": 64, "layers": 2, "heads": 2, "intermediate": 256, "batch": 4,
          "prompt_len": 32, "completion_len": 96, "steps": 3, "grpo_steps": 2, "warmup": 0, "group_size": 4,
          "grpo_prompts": 2, "repeats": 1, "lengths": "fixed"}
SMOKE = {**SHAPES, "vocab": 2048, "prompt_len": 4, "completion_len": 8, "steps": 2, "grpo_steps": 1,
         "group_size": 2, "grpo_prompts": 1, "batch": 2}
LIBS = ("tether", "trl-defaults", "trl")


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set size now (VmRSS) or its peak since the last reset (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Restart the peak RSS count here (Linux: writing 5 to clear_refs resets VmHWM), so that building the data
    before the baseline cannot be the peak; False where the kernel does not allow it (then ru_maxrss is used)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(stage: str, lib: str, shapes: dict, threads: int) -> dict:
    """One measurement in this (fresh) process: {"base_mb", "peak_mb", "added_mb"}."""
    import torch

    torch.set_num_threads(threads)
    import vs_trl

    quiet()
    s = vs_trl.Settings(**shapes)
    if lib == "tether":  # the library's code is loaded before the baseline: its import is not training memory
        from tether.recipes import dpo, grpo  # noqa: F401
    else:
        import trl

        trl.DPOTrainer, trl.GRPOTrainer  # noqa: B018  (lazy attributes: this imports the trainers)
    with tempfile.TemporaryDirectory(prefix="tether-vocab-mem-") as tmp:
        assets = vs_trl.build_assets(Path(tmp), s)
        base = rss_mb()
        reset = reset_peak()
        vs_trl.RUNNERS[lib](stage, assets, s, Path(tmp) / "run")
        peak = rss_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB
    return {"base_mb": base, "peak_mb": peak, "added_mb": peak - base}


def quiet() -> None:
    import logging
    import warnings

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")
    logging.getLogger("tether").setLevel(logging.WARNING)


def measure(stages, libs, shapes: dict, threads: int, log=print) -> dict[str, dict[str, dict]]:
    """{stage: {lib: child's figures}}, each from its own subprocess."""
    found: dict[str, dict[str, dict]] = {}
    for stage in stages:
        found[stage] = {}
        for lib in libs:
            cmd = [sys.executable, __file__, "--child", stage, lib, "--shapes", json.dumps(shapes),
                   "--threads", str(threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if done.returncode != 0:
                raise RuntimeError(f"{stage}/{lib} failed:\n{done.stderr[-3000:]}")
            found[stage][lib] = json.loads(done.stdout.strip().splitlines()[-1])
            log(f"  {stage:<5} {lib:<13} peak {found[stage][lib]['peak_mb']:,.0f} MB, "
                f"added by training {found[stage][lib]['added_mb']:,.0f} MB")
    return found


def table(found: dict) -> str:
    libs = list(next(iter(found.values())))
    others = [lib for lib in libs if lib != "tether"]
    head = "| stage | " + " | ".join(f"{lib} peak (added) MB" for lib in libs) + " | " + \
           " | ".join(f"tether/{lib} added" for lib in others) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for stage, runs in found.items():
        cells = [f"{runs[lib]['peak_mb']:,.0f} ({runs[lib]['added_mb']:,.0f})" for lib in libs]
        ratios = [f"{runs['tether']['added_mb'] / runs[lib]['added_mb']:.2f}x" for lib in others]
        lines.append(f"| {stage} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def describe(shapes: dict) -> str:
    rows = {"dpo": 2 * shapes["batch"], "grpo": shapes["grpo_prompts"] * shapes["group_size"]}
    return (f"Qwen2-shaped, vocabulary {shapes['vocab']:,}, hidden {shapes['hidden']}, {shapes['layers']} layers; "
            f"DPO {shapes['batch']} pairs ({rows['dpo']} rows) of {shapes['prompt_len']} + {shapes['completion_len']} "
            f"tokens, {shapes['steps']} steps; GRPO {shapes['grpo_prompts']} prompts x G = {shapes['group_size']} "
            f"({rows['grpo']} rows) of {shapes['prompt_len']} + {shapes['completion_len']} new tokens, "
            f"{shapes['grpo_steps']} steps; TRL defaults: gradient checkpointing and bf16 autocast, TRL: neither")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default="dpo,grpo")
    p.add_argument("--libs", default=",".join(LIBS), help="comma list of " + ", ".join(LIBS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--child", nargs=2, metavar=("STAGE", "LIB"), help=argparse.SUPPRESS)
    p.add_argument("--shapes", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, json.loads(args.shapes), args.threads)))
        return 0
    shapes = SMOKE if args.smoke else SHAPES
    import vs_trl

    vs_trl.Settings(**shapes)  # the keys are Settings fields
    found = measure(args.stages.split(","), args.libs.split(","), shapes, args.threads)
    print(f"\n{describe(shapes)}\n\n{table(found)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
