"""`steps`: multi-step arithmetic with worked steps, for process supervision (PRM vs ORM on the same samples).

    base = build_base()                      # character tokenizer (with "\\n") + tiny Llama pretrained on worked sums
    prompts("test", 200)                     # [{"prompt": "What is 23+45+19?", "answer": 87, "operands": [...]}, ..]
    # a completion: " 23+45=68\\n68+19=87"  (one step per line; the last step's result is the answer)
    step_labels([23, 45, 19], ["23+45=68", "68+19=86"])   # [1, -1]: labels stop at the first wrong step
    gold_reward(prompts, completions, records)             # 1.0 when the final answer is right (the outcome)

A step "a+b=c" is right when a is the running total so far (the first operand for the first step), b the next
operand, and c = a + b. The base model learns from worked examples that are wrong on purpose: a step that needs a
carry forgets it (arithmetic.forgot_carry) with probability `p_error`, and any step slips one digit of its result with
probability `p_slip`; the worked example then carries on from the wrong total, so an early error spoils the answer
while the later steps look right locally. Step labels (PRM800K's +1 / -1, none after the first -1) come from checking
each intermediate result; outcome labels from the final answer, so a PRM and an ORM learn from the same samples
(`labelled_samples`). `step_accuracy` is the share of completions whose every step is right.

Its own base build and cache key (`steps-<hash>`); arithmetic's build and settings are untouched.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch

from tether.tasks.arithmetic import forgot_carry
from tether.tasks.pretrain import build_cached, cache_dir, pinned_threads, pretrain, tiny_llama

VERSION = 1
RECORD_KIND = "verifiable"  # prompt files for this task need an `answer`
SETTINGS = {"version": VERSION, "min_terms": 3, "max_terms": 3, "p_error": 0.3, "p_slip": 0.05,
            "examples": 20000, "hidden": 96, "layers": 3, "heads": 4, "steps": 3000, "batch": 32, "lr": 3e-3,
            "warmup": 100, "threads": 1}  # a small build: it runs on one thread (pinned: the same weights anywhere)
CHARS = list("0123456789+=?\n Whatis")
_STEP = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*(\d+)\s*$")


def problem(rng: random.Random, min_terms: int = 3, max_terms: int = 4) -> list[int]:
    """Operands of one problem: min_terms..max_terms two-digit numbers."""
    return [rng.randint(10, 99) for _ in range(rng.randint(min_terms, max_terms))]


def question(operands: list[int]) -> str:
    return "What is " + "+".join(map(str, operands)) + "?"


def hash_split(text: str) -> str:
    return "test" if sum(map(ord, text)) % 5 == 0 else "train"


def prompts(split: str, n: int, seed: int = 0) -> list[dict]:
    """Problems split by a hash of the question, so "train" and "test" never share one."""
    rng = random.Random(f"steps-{split}-{seed}")
    out, seen = [], set()
    while len(out) < n:
        ops = problem(rng, SETTINGS["min_terms"], SETTINGS["max_terms"])
        q = question(ops)
        if (hash_split(q) == "test") != (split == "test") or q in seen:
            continue
        seen.add(q)
        out.append({"prompt": q, "answer": sum(ops), "operands": ops})
    return out


def worked_steps(operands: list[int], rng: random.Random | None = None, p_error: float = 0.0,
                 p_slip: float = 0.0) -> list[str]:
    """The steps "total+next=result", each result possibly wrong (a forgotten carry, a slipped digit), the next step
    continuing from the written result."""
    total, steps = operands[0], []
    for b in operands[1:]:
        right = total + b
        result = right
        if rng is not None:
            wrong = forgot_carry(total, b, "+")
            if wrong != right and rng.random() < p_error:
                result = wrong
            elif rng.random() < p_slip:
                digits = list(str(result))
                k = rng.randrange(len(digits))
                digits[k] = str((int(digits[k]) + rng.choice([1, 9])) % 10)
                result = int("".join(digits))
        steps.append(f"{total}+{b}={result}")
        total = result
    return steps


def parse_step(step: str) -> tuple[int, int, int] | None:
    m = _STEP.match(step)
    return None if m is None else (int(m.group(1)), int(m.group(2)), int(m.group(3)))


def step_labels(operands: list[int], steps: list[str]) -> list[int]:
    """+1 per right step, then -1 at the first wrong one and nothing after it (PRM800K). A step is right when it reads
    "a+b=c" with a the running total, b the next operand and c = a + b; a step past the last operand is wrong."""
    labels, total = [], operands[0]
    for k, step in enumerate(steps):
        parsed = parse_step(step)
        if parsed is None or k + 1 >= len(operands) or parsed != (total, operands[k + 1], total + operands[k + 1]):
            return labels + [-1]
        labels.append(1)
        total = parsed[2]
    return labels


def split_completion(completion: str) -> list[str]:
    return [s.strip() for s in completion.split("\n") if s.strip()]


def final_answer(completion: str) -> int | None:
    """The result of the last step, or None when the last line is not a step."""
    steps = split_completion(completion)
    parsed = parse_step(steps[-1]) if steps else None
    return None if parsed is None else parsed[2]


def _operands(record: dict) -> list[int]:
    if "operands" in record:
        return [int(x) for x in record["operands"]]
    prompt = record["prompt"]
    return [int(x) for x in re.findall(r"\d+", prompt if isinstance(prompt, str) else prompt[-1]["content"])]


def gold_reward(prompts, completions, records=None) -> list[float]:
    """The outcome: 1.0 when the last step's result is the answer, else 0.0."""
    if records is None:
        raise ValueError("steps.gold_reward needs the records (they carry the answers)")
    return [1.0 if final_answer(c) == int(r["answer"]) else 0.0 for c, r in zip(completions, records)]


def steps_correct(completion: str, record: dict) -> bool:
    """Every step right and the steps reach the answer (no step missing)."""
    ops = _operands(record)
    steps = split_completion(completion)
    labels = step_labels(ops, steps)
    return len(steps) == len(ops) - 1 and all(label == 1 for label in labels)


def step_accuracy(prompts, completions, records) -> list[float]:
    """1.0 per completion whose every step is right (process correctness; the outcome can be right by luck)."""
    return [1.0 if steps_correct(c, r) else 0.0 for c, r in zip(completions, records)]


def labelled_samples(prompt_records: list[dict], completions: list[str]) -> tuple[list[dict], list[dict]]:
    """(PRM records {"prompt", "steps", "labels"}, ORM records {"prompt", "completion", "label"}) of the same
    samples; a completion without a step is left out of both."""
    prm, orm = [], []
    for record, completion in zip(prompt_records, completions):
        steps = split_completion(completion)
        if not steps:
            continue
        prm.append({"prompt": record["prompt"], "steps": steps, "labels": step_labels(_operands(record), steps)})
        orm.append({"prompt": record["prompt"], "completion": completion,
                    "label": final_answer(completion) == int(record["answer"])})
    return prm, orm


def worked_examples(n: int, seed: int, settings: dict) -> list[str]:
    rng = random.Random(f"steps-pretrain-{seed}")
    texts = []
    while len(texts) < n:
        ops = problem(rng, settings["min_terms"], settings["max_terms"])
        q = question(ops)
        if hash_split(q) == "test":
            continue
        texts.append(q + " " + "\n".join(worked_steps(ops, rng, settings["p_error"], settings["p_slip"])))
    return texts


def char_tokenizer():
    """One token per character (<pad>=0, <eos>=1, <unk>=2), "\\n" included, decoded without separators."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + sorted(set(CHARS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return fast


def _build(out: Path, seed: int, settings: dict) -> None:
    tok = char_tokenizer()
    texts = worked_examples(settings["examples"], seed, settings)
    docs = [tok(t).input_ids + [tok.eos_token_id] for t in texts]
    block = max(len(d) for d in docs)
    rows = [d + [tok.pad_token_id] * (block - len(d)) for d in docs]
    start = [d.index(tok.convert_tokens_to_ids("?")) + 1 for d in docs]  # the loss on the worked steps and EOS only
    targets = torch.tensor([[start[i] <= j < len(d) for j in range(block)] for i, d in enumerate(docs)])
    model = tiny_llama(len(tok), settings["hidden"], settings["layers"], settings["heads"], 96,
                       tok.pad_token_id, tok.eos_token_id, seed)
    print(f"steps: pretraining on {len(texts)} worked sums ({settings['p_error']:.0%} of carries dropped)", flush=True)
    losses = pretrain(model, torch.tensor(rows), settings["steps"], settings["batch"], settings["lr"], seed,
                      log_every=500, name="steps", targets=targets, warmup=settings["warmup"])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "build.json").write_text(json.dumps({**settings, "seed": seed, "final_loss": losses[-1],
                                                "steps_run": len(losses)}, indent=2))


def build_base(out_dir=None, seed: int = 0, force: bool = False, **overrides) -> Path:
    """Character tokenizer + pretrained tiny Llama as a normal HF directory, cached by settings."""
    settings = {**SETTINGS, **overrides}
    target = Path(out_dir) if out_dir else cache_dir("steps", {**settings, "seed": seed})

    def build(tmp: Path) -> None:
        with pinned_threads(settings["threads"]):  # inside build_cached's own pinning: this build's thread count
            _build(tmp, seed, settings)

    return build_cached(target, build, force)
