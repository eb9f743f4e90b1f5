"""The three layouts of a training forward side by side: padded, packed rows (masks) and one flat row (span attention).

    python benchmarks/packing.py                  # the 4.3M-parameter model of vs_trl.py, every shape, 5 repeats
    python benchmarks/packing.py --append         # also append the table to benchmarks/RESULTS.md
    python benchmarks/packing.py --smoke          # seconds: a tiny model (tests/test_bench.py runs this)
    python benchmarks/packing.py --run-cost       # measures packing.RUN_COST, the cost model's one constant

What is timed: `forward.token_outputs(...).logprobs` then `.sum().backward()` on one batch, the forward and backward a training
step spends on its rows (SFT, DPO, GRPO all go through it), for each layout on the same batches:
- padded: `padding_free=False`, every row as wide as the longest;
- rows: the packed rows of `packing.plan` with the flat row switched off (block-diagonal or tree masks);
- default: what `packing.plan_for` picks, the flat row when its cost model says so (the "picked" column names the
  layout it took for the first batch): the library's default behaviour.
Each figure is the median over `repeats` rounds of the mean over the shape's batches; the layouts alternate within
a round, so machine noise hits them alike. Ratios are padded time / layout time, measured in the same run.

Shapes (rows per batch; P prompt and C response tokens, uniform in the ranges given): SFT and DPO as in vs_trl.py's
variable-length data; GRPO as vs_trl.py generates it (2 prompts x G = 8, 32 + 64, all the same length); and a GRPO
group of longer, variable responses (G = 8, 64 + 64..256), where a dense mask over one wide row costs the most.

`--run-cost` measures the constant `packing.plan` weighs the flat row with: what one more attention call costs, in
tokens through the linear layers. The same 496 real tokens go through forward and backward twice: as 62 rows of 8
(one attention call per layer, nothing padded) and as one flat row of 31 sequences of lengths 1..31 (31 calls per
layer). RUN_COST = ((t_flat − t_rows) / (t_rows / 496) − extra pairs / κ) / 30, for Qwen2-shaped models of hidden
64, 128 and 256 (4 layers, MLP 4x), median of `--repeats` alternating rounds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# name: (groups, rows per group (G; 1: no shared prompt), prompt range, response range)
SHAPES = {
    "sft 8 x (8-32 + 9-64)": (8, 1, (8, 32), (9, 64)),
    "dpo 8 pairs (8-32 + 9-64)": (8, 2, (8, 32), (9, 64)),
    "grpo 2 x 8 x (32 + 64)": (2, 8, (32, 32), (64, 64)),
    "grpo 1 x 8 x (64 + 64-256)": (1, 8, (64, 64), (64, 256)),
}
SMOKE_SHAPES = {"dpo 2 pairs (2-4 + 2-6)": (2, 2, (2, 4), (2, 6)), "grpo 1 x 2 x (4 + 2-6)": (1, 2, (4, 4), (2, 6))}


def make_model(hidden: int, layers: int, heads: int, intermediate: int, vocab: int, max_len: int, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_len,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).to(device).train()


def make_batch(rng: random.Random, shape, vocab: int, device):
    """(ids, mask, prompt lengths) right-padded: `groups` prompts, each followed by `g` responses (g = 1: SFT rows)."""
    groups, g, (p_lo, p_hi), (c_lo, c_hi) = shape
    rows, prefix = [], []
    for _ in range(groups):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(p_lo, p_hi))]
        for _ in range(g):
            rows.append(prompt + [rng.randrange(3, vocab) for _ in range(rng.randint(c_lo, c_hi))])
            prefix.append(len(prompt) if g > 1 else 0)
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    prefix_lengths = torch.tensor(prefix) if g > 1 else None
    return ids.to(device), mask.to(device), None if prefix_lengths is None else prefix_lengths.to(device)


def forward_backward(model, batch, layout: str) -> float:
    from tether import packing
    from tether.forward import token_outputs

    ids, mask, prefix = batch
    flat_ok = packing.flat_attention_ok
    if layout == "rows":
        packing.flat_attention_ok = lambda _model: False
    try:
        t0 = time.perf_counter()
        lp = token_outputs(model, ids, mask, padding_free=layout != "padded", prefix_lengths=prefix).logprobs
        lp.sum().backward()
        if ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    finally:
        packing.flat_attention_ok = flat_ok
        model.zero_grad(set_to_none=True)


def picked(model, batch) -> str:
    from tether import packing

    p = packing.plan_for(model, batch[0], batch[1], batch[2])
    return "padded" if p is None else "flat" if p.spans is not None else f"{p.rows} rows of {p.width}"


def measure(shapes: dict, model, vocab: int, batches: int, repeats: int, device, log=print) -> list[dict]:
    rng = random.Random(0)
    out = []
    for name, shape in shapes.items():
        data = [make_batch(rng, shape, vocab, device) for _ in range(batches)]
        forward_backward(model, data[0], "default")  # warm-up: first-call allocations
        times = {layout: [] for layout in ("padded", "rows", "default")}
        for _ in range(repeats):
            for layout in times:
                times[layout].append(statistics.mean(forward_backward(model, b, layout) for b in data))
        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
        real = statistics.mean(int(b[1].sum()) for b in data)
        row = {"shape": name, "tokens": real, **ms, "picked": picked(model, data[0])}
        log(f"{name}: padded {ms['padded']:.1f} ms, rows {ms['rows']:.1f} ms, default {ms['default']:.1f} ms "
            f"(picked: {row['picked']})")
        out.append(row)
    return out


def run_cost(hidden: int, repeats: int, device, log=print) -> float:
    """RUN_COST measured on one model shape (see the module docstring), in tokens."""
    from tether import packing
    from tether.forward import forward_inputs

    model = make_model(hidden, 4, 4, 4 * hidden, 512, 64, device)
    lengths = list(range(1, 32))  # 31 sequences, 496 tokens
    n = sum(lengths)
    g = torch.Generator().manual_seed(0)
    flat_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    flat_mask = torch.zeros_like(flat_ids)
    for i, k in enumerate(lengths):
        flat_ids[i, :k], flat_mask[i, :k] = torch.randint(3, 512, (k,), generator=g), 1
    ordered = packing._flat_order(packing._segments(None, lengths, [0] * len(lengths), None))
    plan = packing._flat_layout(ordered, packing._span_runs(ordered), tuple(flat_mask.shape), [0] * len(lengths),
                                device)
    rows_ids = torch.randint(3, 512, (n // 8, 8), generator=g)
    batches = {"rows": (rows_ids.to(device), torch.ones_like(rows_ids).to(device), None),
               "flat": (flat_ids.to(device), flat_mask.to(device), plan)}

    def once(name: str) -> float:
        ids, mask, p = batches[name]
        t0 = time.perf_counter()
        with packing.attention_for(p, model):
            model(**forward_inputs(model, ids, mask, p)).logits.logsumexp(-1).sum().backward()
        if ids.is_cuda:
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    once("rows"), once("flat")  # warm-up
    times = {"rows": [], "flat": []}
    for _ in range(repeats):
        for name in times:
            times[name].append(once(name))
    t_rows, t_flat = statistics.median(times["rows"]), statistics.median(times["flat"])
    pairs = sum(k * (k + 1) // 2 for k in lengths) - (n // 8) * 36  # the flat row's extra (query, key) pairs
    kappa = packing.attention_ratio(model.config)
    cost = ((t_flat - t_rows) / (t_rows / n) - pairs / kappa) / (len(lengths) - 1)
    log(f"hidden {hidden}: rows {1000 * t_rows:.1f} ms, flat {1000 * t_flat:.1f} ms -> RUN_COST {cost:.1f} tokens")
    return cost


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| shape | real tokens | padded ms | rows ms | default ms (picked) | padded/rows | padded/default |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']:.0f} | {r['padded']:.1f} | {r['rows']:.1f} | {r['default']:.1f} "
                     f"({r['picked']}) | {r['padded'] / r['rows']:.2f}x | {r['padded'] / r['default']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, default=4, help="batches per shape, each timed once per round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: as it comes)")
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--run-cost", action="store_true", help="measure packing.RUN_COST instead of the layouts")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.run_cost:
        from tether import packing

        hiddens, repeats = ((32,), 2) if args.smoke else ((64, 128, 256), args.repeats)
        found = {h: run_cost(h, repeats, device) for h in hiddens}
        text = (f"## packing.py --run-cost, {dt.date.today()}: one more attention call of a flat row, in tokens\n\n"
                f"- machine: {platform.processor() or platform.machine()}, {device}, torch threads "
                f"{torch.get_num_threads()}; torch {torch.__version__}; median of {repeats} rounds\n"
                f"- Qwen2-shaped, 4 layers, MLP 4x hidden: " + ", ".join(f"hidden {h}: {c:.1f}" for h, c in
                                                                        found.items())
                + f" (packing.RUN_COST = {packing.RUN_COST})")
        print("\n" + text)
        if args.append and not args.smoke:
            with open(HERE / "RESULTS.md", "a") as f:
                f.write("\n" + text + "\n")
        return 0
    if args.smoke:
        dims, shapes, args.repeats, args.batches = (32, 1, 2, 64, 64), SMOKE_SHAPES, 1, 1
    else:
        dims, shapes = (256, 4, 4, 1024, 512), SHAPES
    hidden, layers, heads, intermediate, vocab = dims
    model = make_model(hidden, layers, heads, intermediate, vocab, 1024, device)
    rows = measure(shapes, model, vocab, args.batches, args.repeats, device)
    header = (f"## packing.py, {dt.date.today()}: forward + backward of one batch by layout\n\n"
              f"- machine: {platform.processor() or platform.machine()}, {device}, torch threads "
              f"{torch.get_num_threads()}; torch {torch.__version__}\n"
              f"- model: Qwen2-shaped, hidden {hidden}, {layers} layers, MLP {intermediate}, vocab {vocab}, fp32\n"
              f"- median over {args.repeats} rounds of the mean over {args.batches} batches; the layouts alternate")
    text = table(rows, header)
    print("\n" + text)
    if args.append:
        with open(HERE / "RESULTS.md", "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
