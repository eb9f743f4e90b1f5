"""The feedback (judge) model of the embedded `reviews` task: a separate tiny LM that compares, scores, critiques and
revises reviews, pretrained locally on documents written by noisy programmatic critics.

    judge_dir = build_judge()                   # cached as <cache>/reviews-judge-<hash>, independent of the base
    tether label ai model=$(judge_dir) constitution=reviews pairs=prefs.jsonl out=ai.jsonl

Why it carries a signal (and which): the corpus is the `reviews` grammar's text (clean and corrupted: repeated,
rambling, cut off) plus documents in four shapes, each answer written by a *critic* of one principle:

    review a : R1 review b : R2 question : which review is kinder ? answer : a
    review : R question : how good is this review from 1 to 10 ? answer : 7
    review : R critique request : point out the unkind words . critique : it says dull . revision request :
        rewrite the review to be kinder . revision : R'
    review : R revision request : rewrite the review to be kinder . revision : R'          (no critique)

The critics never see `reviews.gold_score`. Each measures its principle its own, simpler way and with noise:
    kinder          mean lexicon polarity (strong ±2, weak ±1, "not" flips; intensifiers ignored) + N(0, 0.35)
    repeats less    share of repeated words (unigrams, not gold's bigrams) + N(0, 0.05)
    ends properly   ends with . ! ? (the critic misreads 10% of texts)
    stays short     words beyond 20 (gold's threshold is 24) + N(0, 1)
    overall score   5.5 + 1.5·kind − 8·repeat − 0.3·overlong − 2·unfinished + N(0, 0.7), rounded, clipped to 1–10
and revises by rule: swap negative words for positive ones (each with probability 0.85), drop repeated word pairs,
add a full stop, cut to two sentences. So the judge can at best reproduce noisy critics of the gold reward's parts;
how close its labels come to the gold reward is measured, not built in (`tether label ai`).

The tokenizer is trained on this corpus (its own vocabulary: it must read the question words); the base model's
build and cache are untouched.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tether.tasks import reviews as R
from tether.tasks.pretrain import build_cached, cache_dir, pretrain, tiny_llama

VERSION = 1
PRINCIPLES = {  # name -> (comparison question, critique request, revision request)
    "kind": ("which review is kinder ?", "point out the unkind words .", "rewrite the review to be kinder ."),
    "repeat": ("which review repeats itself less ?", "point out the repeated words .",
               "rewrite the review without repeating itself ."),
    "ending": ("which review finishes its sentence ?", "does the review finish its sentence ?",
               "rewrite the review so that it ends properly ."),
    "short": ("which review stays short ?", "is the review too long ?", "rewrite the review to be short ."),
}
SCORE_QUESTION = "how good is this review from 1 to 10 ?"
NEGATIVE = set(R.WEAK_NEG) | set(R.STRONG_NEG)
POSITIVE = set(R.WEAK_POS) | set(R.STRONG_POS)
SWAP = {**dict(zip(R.WEAK_NEG, R.WEAK_POS)), **dict(zip(R.STRONG_NEG, R.STRONG_POS))}


# --- the critics: a noisy measurement per principle (higher = better), never the gold score ---------------------------
def kindness(text: str) -> float:
    """Mean lexicon polarity of the sentiment words, "not" within two words flipping it (0 when none)."""
    toks, values = R.words(text), []
    for i, w in enumerate(toks):
        if w in R.POLARITY:
            values.append(-R.POLARITY[w] if "not" in toks[max(0, i - 2):i] else R.POLARITY[w])
    return sum(values) / len(values) if values else 0.0


def repeated_share(text: str) -> float:
    """Share of words that already appeared earlier in the text (punctuation left out)."""
    toks = [w for w in R.words(text) if w not in ".!?,"]
    return 1.0 - len(set(toks)) / len(toks) if toks else 0.0


def n_words(text: str) -> int:
    return len([w for w in R.words(text) if w not in ".!?,"])


def ends(text: str) -> bool:
    return text.strip().endswith((".", "!", "?"))


def critic_value(principle: str, text: str, rng: random.Random) -> float:
    """One critic's noisy reading of a text under its principle (module docstring)."""
    if principle == "kind":
        return kindness(text) + rng.gauss(0, 0.35)
    if principle == "repeat":
        return -repeated_share(text) + rng.gauss(0, 0.05)
    if principle == "ending":
        return float(ends(text) != (rng.random() < 0.1))
    if principle == "short":
        return -max(0, n_words(text) - 20) + rng.gauss(0, 1.0)
    raise ValueError(f"unknown principle {principle!r}")


def critic_score(text: str, rng: random.Random) -> int:
    """The overall critic's 1–10 score."""
    raw = 5.5 + 1.5 * kindness(text) - 8 * repeated_share(text) - 0.3 * max(0, n_words(text) - 20) \
        - 2 * (not ends(text)) + rng.gauss(0, 0.7)
    return max(1, min(10, round(raw)))


def critique(principle: str, text: str) -> str:
    """What the critic says about a text under its principle."""
    toks = R.words(text)
    if principle == "kind":
        bad = [w for i, w in enumerate(toks) if (w in NEGATIVE) != ("not" in toks[max(0, i - 2):i])
               and w in R.POLARITY]
        return f"it says {' and '.join(dict.fromkeys(bad))} ." if bad else "nothing unkind ."
    if principle == "repeat":
        seen, again = set(), []
        for w in (w for w in toks if w not in ".!?,"):
            if w in seen and w not in again:
                again.append(w)
            seen.add(w)
        return f"it repeats {' and '.join(again[:3])} ." if again else "nothing repeated ."
    if principle == "ending":
        return "it ends properly ." if ends(text) else "it stops in the middle ."
    if principle == "short":
        return "it is too long ." if n_words(text) > 20 else "it is short enough ."
    raise ValueError(f"unknown principle {principle!r}")


def revise(principle: str, text: str, rng: random.Random) -> str:
    """The critic's rewrite of a text under its principle (imperfect: some unkind words survive)."""
    toks = text.split()
    if principle == "kind":
        out, i = [], 0
        while i < len(toks):
            w = toks[i]
            if w == "not" and i + 1 < len(toks) and toks[i + 1] in POSITIVE and rng.random() < 0.85:
                out.append(toks[i + 1])  # "not good" -> "good"
                i += 2
                continue
            out.append(SWAP[w] if w in SWAP and rng.random() < 0.85 else w)
            i += 1
        return " ".join(out)
    if principle == "repeat":
        seen, out = set(), []
        for w in toks:
            if out and (out[-1], w) in seen and w not in ".!?,":
                continue
            if out:
                seen.add((out[-1], w))
            out.append(w)
        return " ".join(out)
    if principle == "ending":
        return text if ends(text) else text.rstrip(" ,") + " ."
    if principle == "short":
        sentences, current = [], []
        for w in toks:
            current.append(w)
            if w in (".", "!", "?"):
                sentences.append(" ".join(current))
                current = []
        kept = " ".join(sentences[:2]) if sentences else " ".join(toks[:20])
        return kept if ends(kept) else kept + " ."
    raise ValueError(f"unknown principle {principle!r}")


# --- texts: clean reviews and the degenerate ones an over-optimised policy writes -----------------------------------
def corrupted(rng: random.Random, text: str) -> str:
    """A review made worse in one or two of the ways gold punishes: repetition, rambling, a missing ending."""
    toks = text.split()
    for kind in rng.sample(["repeat", "ramble", "cut"], rng.choice([1, 1, 2])):
        if kind == "repeat":
            i = rng.randrange(len(toks))
            span = toks[i:i + rng.choice([1, 2, 3])]
            toks = toks[:i] + span * rng.randint(2, 6) + toks[i:]
        elif kind == "ramble":
            toks += " ".join(R._sentence(rng, rng.choice(R.MOODS)) for _ in range(rng.randint(3, 7))).split()
        else:
            toks = toks[:max(2, rng.randrange(len(toks)))]
            while toks and toks[-1] in (".", "!", "?"):
                toks.pop()
    return " ".join(toks)


def some_review(rng: random.Random, p_corrupt: float = 0.35) -> str:
    opening, completion = R.review(rng)
    text = f"{opening} {completion}"
    return corrupted(rng, text) if rng.random() < p_corrupt else text


def comparison_doc(rng: random.Random, principle: str, a: str, b: str) -> str:
    va, vb = critic_value(principle, a, rng), critic_value(principle, b, rng)
    answer = "a" if va > vb or (va == vb and rng.random() < 0.5) else "b"
    return f"review a : {a} review b : {b} question : {PRINCIPLES[principle][0]} answer : {answer}"


def score_doc(rng: random.Random, text: str) -> str:
    return f"review : {text} question : {SCORE_QUESTION} answer : {critic_score(text, rng)}"


def revision_doc(rng: random.Random, principle: str, text: str, with_critique: bool) -> str:
    _, ask_critique, ask_revision = PRINCIPLES[principle]
    said = f" critique request : {ask_critique} critique : {critique(principle, text)}" if with_critique else ""
    return f"review : {text}{said} revision request : {ask_revision} revision : {revise(principle, text, rng)}"


def judge_corpus(n: int, seed: int = 0) -> list[str]:
    """n documents: 15% reviews, 55% comparisons, 15% scores, 15% critique/revision (a fifth without critique)."""
    rng, names, docs = random.Random(f"judge-{seed}"), sorted(PRINCIPLES), []
    for _ in range(n):
        u = rng.random()
        if u < 0.15:
            docs.append(some_review(rng))
        elif u < 0.70:
            docs.append(comparison_doc(rng, rng.choice(names), some_review(rng), some_review(rng)))
        elif u < 0.85:
            docs.append(score_doc(rng, some_review(rng)))
        else:
            docs.append(revision_doc(rng, rng.choice(names), some_review(rng, 0.6), rng.random() < 0.8))
    return docs


# --- the build -------------------------------------------------------------------------------------------------------
SETTINGS = {"version": VERSION, "corpus": 120000, "vocab": 700, "hidden": 128, "layers": 4, "heads": 4,
            "block": 128, "steps": 1800, "batch": 32, "lr": 3e-3}
BUILD_THREADS = 1  # the judge builds on one thread (the build is a function of its settings; see pretrain.py)


def whole_doc_blocks(token_lists: list[list[int]], block: int, pad_id: int):
    """Documents packed whole into (N, block) rows, padded at the end, with a (N, block) mask of trained tokens:
    a comparison's answer is never cut off from the two reviews it is about (pack_blocks would cut ~40% of them).
    Documents longer than a block are left out."""
    import torch

    rows, current = [], []
    for doc in token_lists:
        if len(doc) > block:
            continue
        if len(current) + len(doc) > block:
            rows.append(current)
            current = []
        current = current + doc
    rows.append(current)
    ids = torch.full((len(rows), block), pad_id, dtype=torch.long)
    targets = torch.zeros((len(rows), block), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        targets[i, :len(row)] = True
    return ids, targets


def _build(out: Path, seed: int, settings: dict) -> None:
    import torch

    torch.set_num_threads(BUILD_THREADS)
    texts = judge_corpus(settings["corpus"], seed)
    tok = R.train_tokenizer(texts, settings["vocab"])
    docs = [tok(t).input_ids + [tok.eos_token_id] for t in texts]
    model = tiny_llama(len(tok), settings["hidden"], settings["layers"], settings["heads"], 512,
                       tok.pad_token_id, tok.eos_token_id, seed)
    print(f"reviews-judge: pretraining a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter model "
          f"on {len(texts)} critic-written documents", flush=True)
    blocks, targets = whole_doc_blocks(docs, settings["block"], tok.pad_token_id)
    losses = pretrain(model, blocks, settings["steps"], settings["batch"], settings["lr"], seed,
                      name="reviews-judge", targets=targets)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "build.json").write_text(json.dumps({**settings, "seed": seed, "final_loss": losses[-1]}, indent=2))


def build_judge(out_dir=None, seed: int = 0, force: bool = False, **overrides) -> Path:
    """The judge model as a normal HF directory, cached under its own key ("reviews-judge")."""
    settings = {**SETTINGS, **overrides}
    target = Path(out_dir) if out_dir else cache_dir("reviews-judge", {**settings, "seed": seed})
    return build_cached(target, lambda tmp: _build(tmp, seed, settings), force)
