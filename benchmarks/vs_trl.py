"""tether vs TRL side by side: SFT, reward model, DPO, GRPO on one tiny Qwen2-shaped model (CPU).

    make bench                                      # = python benchmarks/vs_trl.py: the whole table, printed
    python benchmarks/vs_trl.py                     # all four stages, 5 runs each, + peak memory at V = 151,936
    python benchmarks/vs_trl.py --stages dpo,grpo --no-memory --no-append
    python benchmarks/vs_trl.py --smoke --no-append # seconds: tiny model, 3 steps (tests/test_bench.py runs this)
    python benchmarks/vs_trl.py --lengths fixed     # every row the same length: no padding in either library

TRL is a benchmark-only extra (`pip install -e ".[bench]"`, or `make bench`), never a tether dependency.

Two comparisons, in one run, the libraries alternating run by run (tether, TRL defaults, TRL, tether, ...) so that a
change in the machine's load falls on all of them:
- the headline: tether with its defaults (its best settings on this machine: `mixed_precision=auto`, which is
  bf16 autocast only where bf16 is native, precision.py; padding-free batches; the chunked LM head) against TRL with
  its own defaults, as a user runs it (`gradient_checkpointing=True`, `bf16=True`: autocast whatever the CPU). The
  issue's targets apply to this ratio.
- the control: TRL on tether's settings (no checkpointing, the precision tether's auto picks), everything else below
  identical.
Peak memory of DPO and GRPO at Qwen2.5's vocabulary (151,936; benchmarks/vocab_memory.py, each in its own process)
closes the report, and the load average at the start and the end goes with the table (`uptime`).

What is identical: the model (Qwen2-shaped, random init, fp32, same weights), the tokenizer (word level: one word is
one token, so both libraries get the same ids), the data (the same rows in both), the batch, the steps, AdamW with the same lr and linear schedule, gradient clipping
at 1.0, one process; in the control also no gradient checkpointing and the same precision. GRPO: the same prompts, G completions each of
exactly C new tokens (the EOS of the GRPO tokenizer is an id outside the model's vocabulary, so no row can stop early
in either library), temperature 1, no top-k/top-p, β = 0 (TRL's default; no reference model in either), one update
per generation, the same reward function.

The data comes in two shapes (`--lengths`). "variable" (the default, as real data is): prompts of P/4..P words and
completions of C/8..C-1 words + EOS, drawn uniformly, so each library pads or packs as it does by default — TRL pads
every batch to its longest row, tether bin-packs the rows of a batch into fewer rows of the same width
(`padding_free`, packing.py). "fixed": prompt P words, completion C-1 words + EOS, so there is no padding in either
and both run the same kernels on the same shapes. GRPO always generates exactly C new tokens (the issue's fixed
completion length).

How it is timed: each library runs its normal training loop; a hook stamps the wall clock at the end of every
optimizer step (TRL: a TrainerCallback.on_step_end; tether: a wrapper around Engine.optimizer_step). A step's time is
the gap between consecutive stamps, so it covers the whole loop body: data, forward, backward, optimizer, logging.
tokens/s = tokens per step / the step time after `warmup` steps (the median step with fixed lengths, the mean with
variable ones, whose steps differ in size); the figure is the median over `repeats` runs (tether and TRL alternate).
Tokens are counted the same way for both: every real (non-pad) token of every row fed to the trained model, as a
mean per step over the epoch (SFT B·(P+C), RM and DPO 2·B·(P+C), GRPO prompts·G·(P+C) with fixed lengths); pad
tokens a library computes are its own cost. tether's DPO computes the
reference log-probs once before the first step (its design); that time is spread over the run's steps and added to
each, so it is paid for. TRL's DPO runs the reference model in every step (its default, precompute_ref_log_probs=False).

Design differences measured here, each library on its defaults: tether's `padding_free=true` bin-packs each
micro-batch's rows into fewer rows and lets rows with the same prompt share one copy of it (packing.py; exact:
tests/test_packing.py), and its sampling backend "auto" is the lean Llama-family decoder (generation/lean.py); TRL
pads each batch to its longest row and generates with `model.generate`.

Settings that differ, each library keeping its own default: in the control TRL's gradient_checkpointing=True and
bf16=True are set to tether's (off, and bf16 only where tether's auto picks it); logging (TRL every 10 steps to nothing, tether every step to
metrics.jsonl and TensorBoard); TRL's extra per-step metrics (entropy, token accuracy) are its defaults; tether's
progress bar is off (TRL's tqdm too). Loss aggregations are chosen to be the same maths: TRL GRPO `dapo` = tether
`token-mean`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
TARGETS = {"sft": 1.5, "reward": 1.5, "dpo": 2.0, "grpo": 2.0}  # tether / TRL-with-its-defaults tokens/s (issue 21)
STAGES = tuple(TARGETS)
REWARDS_FILE = HERE / "bench_rewards.py"  # the GRPO reward, loaded by path in tether and imported for TRL


@dataclass
class Settings:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 0  # 0: as many as heads
    intermediate: int = 1024
    vocab: int = 512
    batch: int = 8  # rows (SFT) or pairs (RM, DPO) per optimizer step
    prompt_len: int = 32
    completion_len: int = 64  # completion tokens including the EOS (SFT, RM, DPO); new tokens (GRPO)
    steps: int = 12
    grpo_steps: int = 6
    warmup: int = 2  # steps left out of the timing (first-step allocations, lazy init)
    group_size: int = 8
    grpo_prompts: int = 2  # prompts per GRPO step: batch of prompts·G completions
    repeats: int = 5
    threads: int = field(default_factory=lambda: torch.get_num_threads())
    lr: float = 1e-5
    lengths: str = "variable"  # variable | fixed (SFT, RM, DPO rows; GRPO always generates completion_len tokens)


SMOKE = {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64, "vocab": 64, "batch": 2, "prompt_len": 4,
         "completion_len": 6, "steps": 3, "grpo_steps": 3, "warmup": 1, "group_size": 2, "grpo_prompts": 1,
         "repeats": 1}


# --- model, tokenizer and data, written once to a temporary directory -------------------------------------------------
def word_tokenizer(vocab: int, eos: str = "<eos>"):
    """Word-level tokenizer: <pad>=0, <eos>=1, <unk>=2, words t3..t{vocab-1}; an `eos` other than <eos> is appended
    last (id == vocab, outside the model's embedding: the GRPO tokenizer, whose EOS can never be sampled)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["<pad>", "<eos>", "<unk>"] + [f"t{i}" for i in range(3, vocab)] + ([eos] if eos != "<eos>" else [])
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token=eos, unk_token="<unk>")


def build_model(s: Settings):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads or s.heads,
                         max_position_embeddings=max(256, 2 * (s.prompt_len + s.completion_len)),
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return AutoModelForCausalLM.from_config(config)


def words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(n))


@dataclass
class Assets:
    root: Path
    model_dir: Path  # policy + <eos> tokenizer (SFT, RM, DPO)
    grpo_dir: Path  # the same weights + the GRPO tokenizer (EOS outside the vocabulary)
    demos: list[dict]
    pairs: list[dict]
    prompts: list[dict]

    def jsonl(self, name: str, rows: list[dict]) -> str:
        path = self.root / f"{name}.jsonl"
        if not path.exists():
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)


def build_assets(root: Path, s: Settings) -> Assets:
    rng = random.Random(0)
    model = build_model(s)
    model_dir, grpo_dir = root / "policy", root / "policy-grpo"
    model.save_pretrained(model_dir)
    word_tokenizer(s.vocab).save_pretrained(model_dir)
    model.config.eos_token_id = s.vocab  # the GRPO EOS: never sampled
    model.generation_config.eos_token_id = s.vocab
    model.save_pretrained(grpo_dir)
    word_tokenizer(s.vocab, eos="<stop>").save_pretrained(grpo_dir)
    n = s.batch * s.steps
    c = s.completion_len - 1  # + EOS
    fixed = s.lengths == "fixed"

    def prompt() -> str:
        return words(rng, s.prompt_len if fixed else rng.randint(max(1, s.prompt_len // 4), s.prompt_len), s.vocab)

    def completion() -> str:
        return " " + words(rng, c if fixed else rng.randint(max(1, s.completion_len // 8), c), s.vocab)

    demos = [{"prompt": prompt(), "completion": completion()} for _ in range(n)]
    pairs = [{"prompt": prompt(), "chosen": completion(), "rejected": completion()} for _ in range(n)]
    prompts = [{"prompt": words(rng, s.prompt_len, s.vocab), "answer": "0"} for _ in range(s.grpo_prompts * s.grpo_steps)]
    return Assets(root, model_dir, grpo_dir, demos, pairs, prompts)


def tokens_per_step(stage: str, s: Settings, a: Assets | None = None) -> float:
    """Real tokens fed to the trained model per step, the mean over the epoch (each word is one token, + EOS)."""
    if stage == "grpo" or a is None or s.lengths == "fixed":
        row = s.prompt_len + s.completion_len
        return {"sft": s.batch * row, "reward": 2 * s.batch * row, "dpo": 2 * s.batch * row,
                "grpo": s.grpo_prompts * s.group_size * row}[stage]
    n = lambda text: len(text.split())  # noqa: E731
    if stage == "sft":
        total = sum(n(d["prompt"]) + n(d["completion"]) + 1 for d in a.demos)
    else:
        total = sum(2 * n(p["prompt"]) + n(p["chosen"]) + n(p["rejected"]) + 2 for p in a.pairs)
    return total / s.steps


# --- timing -----------------------------------------------------------------------------------------------------------
class StepClock:
    """Wall-clock stamps at the end of each optimizer step; `extra` seconds (amortised one-off work) per step."""

    def __init__(self):
        self.stamps: list[float] = []
        self.extra = 0.0

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())

    def step_seconds(self, warmup: int, mean: bool = False) -> float:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])][max(0, warmup - 1):]
        if not gaps:
            raise RuntimeError(f"only {len(self.stamps)} steps were stamped; need more than warmup={warmup}")
        return (statistics.mean(gaps) if mean else statistics.median(gaps)) + self.extra


@contextlib.contextmanager
def tether_clock(clock: StepClock, stage: str, total_steps: int):
    """Stamp tether's optimizer steps; for DPO, spread the one-off reference pass over the steps."""
    from tether import engine
    from tether.recipes import dpo

    step, reference = engine.Engine.optimizer_step, dpo.reference_logps

    def stamped_step(self):
        out = step(self)
        clock.tick()
        return out

    def timed_reference(*args, **kwargs):
        t0 = time.perf_counter()
        out = reference(*args, **kwargs)
        clock.extra = (time.perf_counter() - t0) / total_steps
        return out

    engine.Engine.optimizer_step = stamped_step
    if stage == "dpo":
        dpo.reference_logps = timed_reference
    try:
        yield
    finally:
        engine.Engine.optimizer_step, dpo.reference_logps = step, reference


# --- tether ------------------------------------------------------------------------------------------------------------
def run_tether(stage: str, a: Assets, s: Settings, out: Path) -> StepClock:
    common = {"out": str(out), "lr": s.lr, "lr_schedule": "linear", "progress": False, "seed": 0}
    if stage == "sft":
        from tether.recipes.sft import SFTConfig, run

        cfg = SFTConfig(model=str(a.model_dir), data=a.jsonl("demos", a.demos), batch_size=s.batch,
                        max_steps=s.steps, eval_fraction=0.0, **common)
    elif stage == "reward":
        from tether.recipes.reward import RewardConfig, run

        cfg = RewardConfig(model=str(a.model_dir), data=a.jsonl("pairs", a.pairs), batch_size=s.batch,
                           max_steps=s.steps, eval_fraction=0.0, normalize=False, min_lr_ratio=0.0, **common)
    elif stage == "dpo":
        from tether.recipes.dpo import DPOConfig, run

        cfg = DPOConfig(model=str(a.model_dir), data=a.jsonl("pairs", a.pairs), batch_size=s.batch,
                        max_steps=s.steps, beta=0.1, loss="dpo", **common)
    else:
        from tether.recipes.grpo import GRPOConfig, run

        cfg = GRPOConfig(model=str(a.grpo_dir), task="none", prompts=a.jsonl("prompts", a.prompts),
                         eval_prompts=a.jsonl("prompts", a.prompts),
                         reward=f"python:{REWARDS_FILE}:share_of_t3", group_size=s.group_size,
                         prompts_per_step=s.grpo_prompts, max_new_tokens=s.completion_len, temperature=1.0, beta=0.0,
                         aggregation="token-mean", batch_size=s.grpo_prompts * s.group_size, max_steps=s.grpo_steps,
                         **common)
    clock = StepClock()
    with tether_clock(clock, stage, cfg.max_steps):
        run(cfg)
    return clock


# --- TRL ---------------------------------------------------------------------------------------------------------------
def trl_args(s: Settings, out: Path, steps: int, trl_defaults: bool) -> dict:
    from tether.precision import resolve_precision

    gpu = torch.cuda.is_available()
    bf16 = resolve_precision("auto") == "bf16"  # what tether's mixed_precision=auto picks on this machine
    same = {} if trl_defaults else {"gradient_checkpointing": False, "bf16": bf16}  # TRL's defaults: True, True
    return {"output_dir": str(out), "per_device_train_batch_size": s.batch, "max_steps": steps, "learning_rate": s.lr,
            "lr_scheduler_type": "linear", "use_cpu": not gpu, "report_to": "none", "save_strategy": "no",
            "disable_tqdm": True, "seed": 0, "dataloader_num_workers": 0, **same}


def run_trl(stage: str, a: Assets, s: Settings, out: Path, trl_defaults: bool = False) -> StepClock:
    import trl
    from bench_rewards import share_of_t3
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    from tether.models import load_tokenizer

    clock = StepClock()

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    if stage == "sft":
        trainer = trl.SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(a.model_dir), processing_class=load_tokenizer(a.model_dir),
            args=trl.SFTConfig(max_length=None, **trl_args(s, out, s.steps, trl_defaults)), train_dataset=Dataset.from_list(a.demos))
    elif stage == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(a.model_dir, num_labels=1)
        trainer = trl.RewardTrainer(
            model=model, processing_class=load_tokenizer(a.model_dir),
            args=trl.RewardConfig(max_length=None, **trl_args(s, out, s.steps, trl_defaults)), train_dataset=Dataset.from_list(a.pairs))
    elif stage == "dpo":
        trainer = trl.DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(a.model_dir), processing_class=load_tokenizer(a.model_dir),
            args=trl.DPOConfig(max_length=None, beta=0.1, **trl_args(s, out, s.steps, trl_defaults)),
            train_dataset=Dataset.from_list(a.pairs))
    else:
        args = trl_args(s, out, s.grpo_steps, trl_defaults)
        args["per_device_train_batch_size"] = s.grpo_prompts * s.group_size
        trainer = trl.GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(a.grpo_dir), processing_class=load_tokenizer(a.grpo_dir),
            reward_funcs=share_of_t3, train_dataset=Dataset.from_list([{"prompt": p["prompt"]} for p in a.prompts]),
            args=trl.GRPOConfig(num_generations=s.group_size, max_completion_length=s.completion_len,
                                temperature=1.0, top_k=0, top_p=1.0, beta=0.0, loss_type="dapo",
                                steps_per_generation=1, num_iterations=1, shuffle_dataset=False, **args))
    trainer.add_callback(Stamp())
    trainer.train()
    return clock


RUNNERS = {"tether": run_tether, "trl": run_trl,
           "trl-defaults": lambda stage, a, s, out: run_trl(stage, a, s, out, trl_defaults=True)}


# --- the table ---------------------------------------------------------------------------------------------------------
def measure(stages, s: Settings, root: Path, libs=("tether", "trl-defaults", "trl"),
            log=print) -> dict[str, dict[str, list[float]]]:
    """{stage: {"tether": [tokens/s per run], "trl": [...], ...}}; the libraries alternate run by run."""
    from accelerate.state import AcceleratorState

    assets = build_assets(root, s)
    found: dict[str, dict[str, list[float]]] = {}
    for stage in stages:
        found[stage] = {lib: [] for lib in libs}
        for r in range(s.repeats):
            for lib in libs:
                AcceleratorState._reset_state(reset_partial_state=True)  # one process, several precisions
                clock = RUNNERS[lib](stage, assets, s, root / f"{stage}-{lib}-{r}")
                warmup = min(s.warmup, len(clock.stamps) - 2)
                variable = s.lengths == "variable" and stage != "grpo"
                value = tokens_per_step(stage, s, assets) / clock.step_seconds(warmup, mean=variable)
                found[stage][lib].append(value)
                log(f"  {stage:<7} {lib:<12} run {r + 1}/{s.repeats}: {value:,.0f} tokens/s")
    return found


def spread(values: list[float]) -> str:
    """median (min-max) of the runs."""
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def table(found: dict, s: Settings) -> str:
    """Medians, spreads and ratios: the headline against "TRL defaults" (TRL as it comes), the control against
    "TRL" (TRL on tether's settings), each column present when it was measured."""
    libs = next(iter(found.values())).keys()
    head = "| stage | tether tokens/s |"
    if "trl-defaults" in libs:
        head += " TRL defaults tokens/s | tether/TRL defaults (headline) | target |"
    if "trl" in libs:
        head += " TRL same settings tokens/s | tether/TRL (control) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for stage, runs in found.items():
        t = statistics.median(runs["tether"])
        row = f"| {stage} | {spread(runs['tether'])} |"
        if "trl-defaults" in runs:
            d = statistics.median(runs["trl-defaults"])
            mark = "met" if t / d >= TARGETS[stage] else "not met"
            row += f" {spread(runs['trl-defaults'])} | {t / d:.2f}x | >= {TARGETS[stage]}x ({mark}) |"
        if "trl" in runs:
            r = statistics.median(runs["trl"])
            row += f" {spread(runs['trl'])} | {t / r:.2f}x |"
        lines.append(row)
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}"


def versions() -> str:
    import transformers

    import tether

    out = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    with contextlib.suppress(ImportError):
        import trl

        out.append(f"trl {trl.__version__}")
    return ", ".join(out + [f"tether {tether.__version__}"])


def uptime() -> str:
    """The load averages (1, 5, 15 minutes) as `uptime` prints them."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def report(found: dict, s: Settings, load_start: str, memory: str = "") -> str:
    n_params = sum(p.numel() for p in build_model(s).parameters())
    settings = {k: v for k, v in asdict(s).items()}
    return (f"\n## CPU side by side, {dt.date.today().isoformat()} (benchmarks/vs_trl.py)\n\n"
            f"- machine: {machine()}; torch threads {s.threads}\n- versions: {versions()}\n"
            f"- model: Qwen2-shaped, {n_params / 1e6:.2f}M parameters, random init, fp32\n"
            f"- data: {s.lengths} lengths (" + ("the same in every row" if s.lengths == "fixed" else
            f"prompts {max(1, s.prompt_len // 4)}-{s.prompt_len} tokens, completions {max(1, s.completion_len // 8) + 1}-"
            f"{s.completion_len} with the EOS; GRPO generates {s.completion_len}") + ")\n"
            f"- settings: {json.dumps(settings)}\n"
            f"- tokens/s: {'median' if s.lengths == 'fixed' else 'mean (GRPO: median)'} step time after {s.warmup} "
            f"warm-up steps; median (min-max) over {s.repeats} runs, the libraries alternating run by run\n"
            f"- machine load: at the start {load_start}; at the end {uptime()}\n\n"
            f"{table(found, s)}\n" + (f"\nPeak memory at a real vocabulary (benchmarks/vocab_memory.py): {memory}\n"
                                      if memory else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES), help="comma list of " + ", ".join(STAGES))
    p.add_argument("--repeats", type=int, default=None, help="runs per library and stage (default 5; median reported)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per SFT/RM/DPO run")
    p.add_argument("--grpo-steps", type=int, default=None, help="optimizer steps per GRPO run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--lengths", choices=("variable", "fixed"), default=None,
                   help="row lengths of the SFT/RM/DPO data (default variable)")
    p.add_argument("--trl-defaults", action=argparse.BooleanOptionalAction, default=True,
                   help="time TRL with its own defaults (gradient checkpointing, bf16 autocast): the headline")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure DPO and GRPO peak memory at vocabulary 151,936 (vocab_memory.py, ~5 min)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks the script runs")
    p.add_argument("--no-append", action="store_true", help="do not append the table to benchmarks/RESULTS.md")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"), help="file the table is appended to")
    args = p.parse_args(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        print('vs_trl: TRL is not installed; pip install -e ".[bench]" (or make bench)', file=sys.stderr)
        return 2
    stages = [x.strip() for x in args.stages.split(",") if x.strip()]
    unknown = [x for x in stages if x not in STAGES]
    if unknown:
        print(f"vs_trl: unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    s = Settings(**(SMOKE if args.smoke else {}))
    for key in ("repeats", "steps", "grpo_steps", "threads", "lengths"):
        if getattr(args, key) is not None:
            setattr(s, key, getattr(args, key))
    torch.set_num_threads(s.threads)
    import logging
    import warnings

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("tether").setLevel(logging.WARNING)
    load_start = uptime()
    with tempfile.TemporaryDirectory(prefix="tether-vs-trl-") as tmp:
        libs = ("tether", "trl-defaults", "trl") if args.trl_defaults else ("tether", "trl")
        found = measure(stages, s, Path(tmp), libs)
    memory = ""
    if args.memory:
        import vocab_memory

        shapes = vocab_memory.SMOKE if args.smoke else vocab_memory.SHAPES
        mem_stages = [x for x in ("dpo", "grpo") if x in stages]
        if mem_stages:
            found_mem = vocab_memory.measure(mem_stages, [lib for lib in vocab_memory.LIBS if lib in libs], shapes,
                                             s.threads)
            memory = f"{vocab_memory.describe(shapes)}.\n\n{vocab_memory.table(found_mem)}"
    text = report(found, s, load_start, memory)
    print(text)
    if not args.no_append and not args.smoke:
        with open(args.results, "a") as f:
            f.write(text)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
