"""PPO peak memory with LoRA: the reference as the policy's base with adapters disabled vs a frozen copy of the policy.

    python benchmarks/ppo_memory.py                   # a random 8-layer Llama of hidden 1024 (~75M parameters)
    python benchmarks/ppo_memory.py --hidden 256 --layers 2 --no-append

Each setting runs in its own process (peak memory is per process): `tether ppo` with `lora_r=8` for two steps, once
with `share_reference=true` (one copy of the base weights: the reference is the base with adapters off) and once with
`share_reference=false` (a frozen deep copy of the policy as the reference). The figure is the run's
`peak_memory_mb` from summary.json: the largest CUDA allocation on a GPU, the largest resident set size seen during the
run on a CPU. Four models are in memory in both: policy, reference, reward and value (the value and reward model here
are the same random reward-model directory, as in a pipeline where the value is initialised from the RM).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(root: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    """A random Llama-shaped policy and a reward model of the same shape, as HF directories."""
    from transformers import AutoModelForSequenceClassification

    from tether.testing import save_tiny

    policy = save_tiny(root / "policy", hidden=hidden, layers=layers, heads=8)
    rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    rm.config.pad_token_id = rm.config.pad_token_id or 0
    rm.save_pretrained(root / "rm")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (policy / name).exists():
            (root / "rm" / name).write_bytes((policy / name).read_bytes())
    n = sum(p.numel() for p in rm.parameters())
    print(f"model: {n / 1e6:.1f}M parameters (hidden {hidden}, {layers} layers)", flush=True)
    return policy, root / "rm"


def peak_mb(root: Path, policy: Path, rm: Path, share: bool) -> float:
    out = root / f"share-{share}"
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the film was {i}"}) + "\n" for i in range(16)))
    cmd = [sys.executable, "-m", "tether.cli", "ppo", f"model={policy}", f"reward=rm:{rm}", f"value_model={rm}",
           f"prompts={prompts}", f"eval_prompts={prompts}", "task=", "lora_r=8", f"share_reference={str(share).lower()}",
           "max_steps=2", "rollout_batch=8", "batch_size=8", "num_minibatches=1", "max_new_tokens=16",
           "n_eval_prompts=4", "eval_samples=1", "progress=false", f"out={out}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())["peak_memory_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        policy, rm = build(root, args.hidden, args.layers)
        shared, copied = peak_mb(root, policy, rm, True), peak_mb(root, policy, rm, False)
    lines = [f"## PPO peak memory with LoRA, {dt.date.today()} (benchmarks/ppo_memory.py)", "",
             f"- random Llama-shaped model, hidden {args.hidden}, {args.layers} layers; LoRA r = 8; 2 PPO steps",
             "", "| reference | peak memory (MB) |", "|---|---|",
             f"| base with adapters disabled (share_reference=true) | {shared:,.0f} |",
             f"| frozen copy of the policy (share_reference=false) | {copied:,.0f} |",
             f"| saved | {copied - shared:,.0f} |", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        with (HERE / "RESULTS.md").open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
