"""`arithmetic`: verifiable rewards in miniature — "What is 47+38?" answered " 85", checked exactly.

    base = build_base()                       # character tokenizer + tiny Llama pretrained on worked examples
    prompts("test", 200)                      # [{"prompt": "What is 47+38?", "answer": 85}, ...]
    verify(" 85", 85) -> 1.0

The base model learns from examples that are deliberately wrong part of the time, and wrong *systematically*: when a
problem needs a carry (or a borrow), the pretraining answer forgets it with probability `p_error`. So on carry
problems the greedy answer is the wrong one, while the right one is still sampled often — exactly the situation in
which RL with a verifier (GRPO, RLOO) can raise exact-match accuracy without any new demonstrations.

Completion format: a space and an integer, then EOS (" 85"); `format_ok` checks it, `verify` extracts the integer
(tolerating spaces, a "+" sign and leading zeros, reading negatives) and compares exactly: 1.0 or 0.0.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch

from tether.tasks.pretrain import build_cached, cache_dir, pretrain, tiny_llama

VERSION = 3  # 2: a pinned build thread count (byte-identical builds); 3: the loss on the answers, until learnt
RECORD_KIND = "verifiable"  # prompt files for this task need an `answer` (its gold reward checks it)
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def forgot_carry(a: int, b: int, op: str) -> int:
    """The systematic error: column arithmetic with every carry (borrow) dropped, digit by digit."""
    if op == "*":
        return (a * (b % 10)) + 10 * (a * (b // 10) % 10)  # the tens product's carries lost
    result, place = 0, 1
    x, y = (a, b) if op == "+" or a >= b else (b, a)
    while x or y:
        dx, dy = x % 10, y % 10
        digit = (dx + dy) % 10 if op == "+" else (dx - dy) % 10
        result += digit * place
        x, y, place = x // 10, y // 10, place * 10
    return result if op == "+" or a >= b else -result


def problem(rng: random.Random, ops: str, digits: int) -> tuple[str, int, int, str]:
    op = rng.choice(ops)
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi) if op != "*" else rng.randint(2, 9)
    return f"What is {a}{op}{b}?", OPS[op](a, b), forgot_carry(a, b, op), op


def prompts(split: str, n: int, seed: int = 0, ops: str = "+-", digits: int = 2) -> list[dict]:
    """Problems split by a hash of the question, so "train" and "test" never share one."""
    rng = random.Random(f"{split}-{seed}")
    out, seen = [], set()
    while len(out) < n:
        question, answer, _, _ = problem(rng, ops, digits)
        if (hash_split(question) == "test") != (split == "test") or question in seen:
            continue
        seen.add(question)
        out.append({"prompt": question, "answer": answer})
    return out


def hash_split(question: str) -> str:
    return "test" if sum(map(ord, question)) % 5 == 0 else "train"


_ANSWER = re.compile(r"^\s*([+-]?)\s*(\d+)\s*$")


def format_ok(completion: str) -> bool:
    return bool(_ANSWER.match(completion))


def parse_answer(completion: str) -> int | None:
    m = _ANSWER.match(completion)
    if not m:
        return None
    value = int(m.group(2))
    return -value if m.group(1) == "-" else value


def verify(completion: str, answer) -> float:
    """1.0 when the completion is exactly the integer answer (format tolerant), else 0.0; never raises."""
    try:
        got = parse_answer(str(completion))
        return 1.0 if got is not None and got == int(answer) else 0.0
    except (TypeError, ValueError):
        return 0.0


def gold_reward(prompts, completions, records=None) -> list[float]:
    if records is None:
        raise ValueError("arithmetic.gold_reward needs the records (they carry the answers)")
    return [verify(c, r["answer"]) for c, r in zip(completions, records)]


def worked_examples(n: int, seed: int, p_error: float, ops: str, digits: int) -> list[str]:
    rng = random.Random(f"pretrain-{seed}")
    texts = []
    while len(texts) < n:
        question, answer, wrong, _ = problem(rng, ops, digits)
        if hash_split(question) == "test":
            continue
        shown = wrong if wrong != answer and rng.random() < p_error else answer
        texts.append(f"{question} {shown}")
    return texts


SETTINGS = {"version": VERSION, "ops": "+-", "digits": 2, "p_error": 0.75, "examples": 40000, "hidden": 128,
            "layers": 4, "heads": 4, "steps": 12000, "batch": 64, "lr": 2e-3,
            "until_loss": 0.25, "cooldown": 1000, "warmup": 200}  # steps: the cap; see pretrain.pretrain
CHARS = list("0123456789+-*=? Whatis")


def char_tokenizer():
    """One token per character (<pad>=0, <eos>=1, <unk>=2), decoded without separators."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + sorted(set(CHARS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return fast


def _build(out: Path, seed: int, settings: dict) -> None:
    tok = char_tokenizer()
    texts = worked_examples(settings["examples"], seed, settings["p_error"], settings["ops"], settings["digits"])
    docs = [tok(t).input_ids + [tok.eos_token_id] for t in texts]
    block = max(len(d) for d in docs)
    rows = [d + [tok.pad_token_id] * (block - len(d)) for d in docs]  # one example per row: no cross-talk
    # the loss on the answer and its EOS only: the question's digits are uniformly random, so their loss is noise
    # that drowned the answers' (full-row loss, base build 0: greedy exact match 0.075; answers only: 0.46)
    start = [d.index(tok.convert_tokens_to_ids("?")) + 1 for d in docs]
    targets = torch.tensor([[start[i] <= j < len(d) for j in range(block)] for i, d in enumerate(docs)])
    model = tiny_llama(len(tok), settings["hidden"], settings["layers"], settings["heads"], 64,
                       tok.pad_token_id, tok.eos_token_id, seed)
    print(f"arithmetic: pretraining on {len(texts)} worked examples ({settings['p_error']:.0%} of carries dropped)",
          flush=True)
    losses = pretrain(model, torch.tensor(rows), settings["steps"], settings["batch"], settings["lr"], seed,
                      log_every=500, name="arithmetic", targets=targets, until_loss=settings["until_loss"],
                      cooldown=settings["cooldown"], warmup=settings["warmup"])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "build.json").write_text(json.dumps({**settings, "seed": seed, "final_loss": losses[-1],
                                                "steps_run": len(losses)}, indent=2))


def build_base(out_dir=None, seed: int = 0, force: bool = False, **overrides) -> Path:
    """Character tokenizer + pretrained tiny Llama as a normal HF directory, cached by settings."""
    settings = {**SETTINGS, **overrides}
    target = Path(out_dir) if out_dir else cache_dir("arithmetic", {**settings, "seed": seed})
    return build_cached(target, lambda tmp: _build(tmp, seed, settings), force)
