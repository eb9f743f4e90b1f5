"""`reviews`: the DPO paper's IMDb controlled-sentiment experiment in miniature, built locally in minutes.

    base = build_base()                      # BPE tokenizer + tiny Llama pretrained on generated reviews (cached)
    write_data("data/", n_sft=2000, n_pairs=2000, n_rankings=200)
    gold_reward(prompts, completions)        # the hidden "human" taste

The world: short movie reviews from a grammar. A prompt is a review opening ("the film was"); a completion goes on
with adjectives of known polarity, intensifiers, negations, neutral filler and 1–3 sentences. Reviewers have a mood,
so demonstrations are of MIXED sentiment and the SFT policy has a real spread of gold reward.

The gold reward (what the simulated humans like), on a scale where SFT-like samples have std ~1:
    gold = sentiment − repetition − rambling − missing_ending
- sentiment: the MEAN polarity of the sentiment words (strong ±2, weak ±1, ×1.5 after an intensifier, sign flipped
  after "not"), so saying "wonderful" five times is not better than saying it once;
- repetition: 4 × the share of repeated word bigrams (0 for fluent text, large for "great great great ...");
- rambling: 0.15 per word beyond 24 words (SFT reviews are 4–22 words);
- missing ending: 1 when the text does not end with terminal punctuation.
A reward model trained only on SFT-like comparisons learns "positive words = good" and knows nothing of degenerate
text; a policy optimised hard against it finds repetition and rambling, which gold punishes. That is the point:
over-optimisation shows up as proxy reward rising while gold falls.

Simulated raters prefer a over b with probability σ((g(a) − g(b))/τ) (Bradley–Terry noise). The best any reward model
can do on such labels is the Bayes accuracy, mean over pairs of max(p, 1 − p); `write_data` stores it in a sidecar.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

from tether.tasks.pretrain import build_cached, cache_dir, pack_blocks, pretrain, tiny_llama

VERSION = 2  # 2: a fixed BPE merge order and a pinned build thread count (byte-identical builds)
STRONG_POS = ["wonderful", "brilliant", "superb", "amazing", "excellent", "moving", "beautiful", "perfect"]
WEAK_POS = ["good", "nice", "fine", "pleasant", "decent", "fun", "solid", "charming"]
WEAK_NEG = ["dull", "weak", "slow", "bland", "messy", "flat", "silly", "forgettable"]
STRONG_NEG = ["awful", "terrible", "dreadful", "horrible", "painful", "boring", "ugly", "pointless"]
POLARITY = {**{w: 2.0 for w in STRONG_POS}, **{w: 1.0 for w in WEAK_POS},
            **{w: -1.0 for w in WEAK_NEG}, **{w: -2.0 for w in STRONG_NEG}}
INTENSIFIERS = ["very", "really", "truly", "quite", "so"]
SUBJECTS = ["the film", "the movie", "the plot", "the acting", "the music", "the story", "the ending", "the cast",
            "the script", "the camera work", "the dialogue", "the pacing", "the lead actor", "the soundtrack"]
VERBS = ["was", "is", "felt", "seemed", "looked", "sounded"]
FILLER = ["i saw it on a sunday", "we watched it at home", "my friend picked it", "it runs about two hours",
          "i went in with no plans", "the cinema was full", "i watched it twice", "it came out last year"]
OPENINGS = [f"{s} {v}" for s in SUBJECTS for v in VERBS[:3]] + [
    "i watched this movie and it was", "honestly , the film was", "my friends and i thought the story was",
    "overall the movie is", "to be fair , the plot was", "i have to say the acting was",
]
MOODS = [-2.0, -1.0, 0.0, 1.0, 2.0]


# --- the grammar -----------------------------------------------------------------------------------------------------
def _adjective(rng: random.Random, mood: float) -> str:
    """An adjective phrase whose polarity leans with the reviewer's mood (with a chance of the other side)."""
    lean = mood + rng.gauss(0.0, 1.0)
    pool = STRONG_POS if lean > 1.2 else WEAK_POS if lean > 0 else WEAK_NEG if lean > -1.2 else STRONG_NEG
    word = rng.choice(pool)
    if rng.random() < 0.1:  # a negated opposite: "not good" when the mood is low
        opposite = {id(STRONG_POS): STRONG_NEG, id(WEAK_POS): WEAK_NEG, id(WEAK_NEG): WEAK_POS,
                    id(STRONG_NEG): STRONG_POS}[id(pool)]
        return "not " + rng.choice(opposite)
    if rng.random() < 0.3:
        return rng.choice(INTENSIFIERS) + " " + word
    return word


def _clause(rng: random.Random, mood: float) -> str:
    first = _adjective(rng, mood)
    if rng.random() < 0.35:
        joiner = rng.choice(["and", "but", "and also"])
        return f"{first} {joiner} {_adjective(rng, mood)}"
    return first


def _sentence(rng: random.Random, mood: float) -> str:
    if rng.random() < 0.2:
        return rng.choice(FILLER) + " ."
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {_clause(rng, mood)} {rng.choice(['.', '.', '!'])}"


def completion_for(rng: random.Random, mood: float) -> str:
    """Continue an opening: an adjective clause, an ending, then 0–2 more sentences."""
    parts = [f"{_clause(rng, mood)} {rng.choice(['.', '.', '!'])}"]
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        parts.append(_sentence(rng, mood))
    return " ".join(parts)


def review(rng: random.Random) -> tuple[str, str]:
    mood = rng.choice(MOODS)
    return rng.choice(OPENINGS), completion_for(rng, mood)


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(review(rng)) for _ in range(n)]


# --- the gold reward -------------------------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z']+|[.!?,]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def sentiment_score(text: str) -> float:
    """Mean polarity of sentiment words (0 when none); intensifiers ×1.5, "not" flips the sign."""
    values, toks = [], words(text)
    for i, w in enumerate(toks):
        if w in POLARITY:
            v = POLARITY[w]
            if i > 0 and toks[i - 1] in INTENSIFIERS:
                v *= 1.5
            if "not" in toks[max(0, i - 2) : i]:
                v = -v
            values.append(v)
    return sum(values) / len(values) if values else 0.0


def repetition_penalty(text: str) -> float:
    """4 × share of word bigrams that already appeared earlier in the same text."""
    toks = [w for w in words(text) if w not in ".!?,"]
    bigrams = list(zip(toks, toks[1:]))
    if not bigrams:
        return 0.0
    return 4.0 * (1.0 - len(set(bigrams)) / len(bigrams))


def rambling_penalty(text: str, natural: int = 24) -> float:
    n = len([w for w in words(text) if w not in ".!?,"])
    return 0.15 * max(0, n - natural)


def ending_penalty(text: str) -> float:
    return 0.0 if text.strip().endswith((".", "!", "?")) else 1.0


def gold_score(completion: str) -> float:
    return sentiment_score(completion) - repetition_penalty(completion) - rambling_penalty(completion) - \
        ending_penalty(completion)


def gold_reward(prompts, completions, records=None) -> list[float]:
    """The hidden taste of the simulated humans (see the module docstring); the prompt does not matter."""
    return [gold_score(c) for c in completions]


# --- prompts, demonstrations, raters ---------------------------------------------------------------------------------
def prompts(split: str, n: int, seed: int = 0) -> list[dict]:
    """Review openings; "train" and "test" use disjoint openings (every third opening is held out)."""
    held = OPENINGS[::3]
    pool = held if split == "test" else [o for o in OPENINGS if o not in held]
    rng = random.Random(f"{split}-{seed}")
    return [{"prompt": rng.choice(pool)} for _ in range(n)]


def sft_demonstrations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"sft-{seed}")
    train = [p["prompt"] for p in prompts("train", 64, seed)]
    return [{"prompt": rng.choice(train), "completion": completion_for(rng, rng.choice(MOODS))} for _ in range(n)]


def rater_prefers(gold_a: float, gold_b: float, tau: float, rng: random.Random) -> bool:
    """True when the simulated rater prefers a: probability σ((g_a − g_b)/τ)."""
    return rng.random() < 1.0 / (1.0 + math.exp(-(gold_a - gold_b) / tau))


def bayes_accuracy(gold_a: float, gold_b: float, tau: float) -> float:
    p = 1.0 / (1.0 + math.exp(-(gold_a - gold_b) / tau))
    return max(p, 1.0 - p)


def preference_pairs(n: int, seed: int = 0, tau: float = 1.0, raters: dict[str, float] | None = None,
                     split: str = "train") -> list[dict]:
    """Two SFT-like completions of one prompt, labelled by a rater (named raters with their own τ if given).
    split="test" draws other pairs on the held-out prompts: a comparison set no reward model trained on."""
    rng = random.Random(f"pairs-{seed}" if split == "train" else f"pairs-{split}-{seed}")
    raters = raters or {"sim": tau}
    train = [p["prompt"] for p in prompts(split, 64, seed)]
    out = []
    for _ in range(n):
        prompt = rng.choice(train)
        a, b = (completion_for(rng, rng.choice(MOODS)) for _ in range(2))
        name = rng.choice(sorted(raters))
        ga, gb = gold_score(a), gold_score(b)
        chosen, rejected = (a, b) if rater_prefers(ga, gb, raters[name], rng) else (b, a)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "rater": name,
                    "bayes": bayes_accuracy(ga, gb, raters[name])})
    return out


def rankings(n: int, k: int = 4, seed: int = 0, tau: float = 1.0) -> list[dict]:
    """K-way rankings by Plackett–Luce sampling with weights exp(g/τ) (the K-way form of the same noise)."""
    rng = random.Random(f"rank-{seed}")
    train = [p["prompt"] for p in prompts("train", 64, seed)]
    out = []
    for _ in range(n):
        comps = [completion_for(rng, rng.choice(MOODS)) for _ in range(k)]
        weights = {i: math.exp(gold_score(c) / tau) for i, c in enumerate(comps)}
        order = []
        while weights:
            r, acc = rng.random() * sum(weights.values()), 0.0
            for i, w in weights.items():
                acc += w
                if acc >= r:
                    order.append(i)
                    del weights[i]
                    break
        out.append({"prompt": rng.choice(train), "completions": comps, "ranking": order})
    return out


def write_data(out_dir, n_sft: int = 2000, n_pairs: int = 2000, n_rankings: int = 0, seed: int = 0,
               tau: float = 1.0, n_test_prompts: int = 128, n_test_pairs: int = 0) -> dict[str, Path]:
    """prompts_train/test.jsonl, sft.jsonl, prefs.jsonl (+ prefs.meta.json), rankings.jsonl in DESIGN.md formats;
    with n_test_pairs, prefs_test.jsonl (+ its sidecar): held-out comparisons on the test prompts."""
    from tether.data import write_jsonl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "prompts_train": write_jsonl(out / "prompts_train.jsonl", prompts("train", 512, seed)),
        "prompts_test": write_jsonl(out / "prompts_test.jsonl", prompts("test", n_test_prompts, seed)),
        "sft": write_jsonl(out / "sft.jsonl", sft_demonstrations(n_sft, seed)),
    }
    splits = {"prefs": ("train", n_pairs)} | ({"prefs_test": ("test", n_test_pairs)} if n_test_pairs else {})
    for name, (split, n) in splits.items():
        pairs = preference_pairs(n, seed, tau, split=split)
        bayes = sum(p.pop("bayes") for p in pairs) / max(1, len(pairs))
        files[name] = write_jsonl(out / f"{name}.jsonl", pairs)
        meta = {"task": "reviews", "n": n, "tau": tau, "bayes_accuracy": bayes, "seed": seed, "split": split}
        files[f"{name}_meta"] = out / f"{name}.meta.json"
        files[f"{name}_meta"].write_text(json.dumps(meta, indent=2) + "\n")
    files["meta"] = files["prefs_meta"]
    if n_rankings:
        files["rankings"] = write_jsonl(out / "rankings.jsonl", rankings(n_rankings, 4, seed, tau))
    return files


# --- the base model --------------------------------------------------------------------------------------------------
SETTINGS = {"version": VERSION, "corpus": 60000, "vocab": 600, "hidden": 128, "layers": 4, "heads": 4,
            "block": 64, "steps": 1200, "batch": 32, "lr": 3e-3}
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"


def bpe_merges(word_counts: dict[str, int], vocab_size: int, prefix: str = "##") -> tuple[list[str], list]:
    """Byte-pair encoding's merge loop (Sennrich et al. 2016, section 3.1) with a fixed tie-break.

    A word starts as its characters, every one after the first marked as a continuation (`prefix`). Each step merges
    the most frequent adjacent pair, counted over word frequencies; among equally frequent pairs the lexicographically
    smallest wins, so the result depends on the corpus alone (the `tokenizers` trainer breaks ties in hash order,
    and gave a different vocabulary on every build). Stops at `vocab_size` symbols or when no pair is left.
    Returns the symbols in the order they were added (alphabet sorted, then merge products) and the merges in rank
    order."""
    words = {w: [w[0]] + [prefix + c for c in w[1:]] for w in sorted(word_counts)}
    vocab = sorted({s for symbols in words.values() for s in symbols})
    known, merges = set(vocab), []
    while len(vocab) < vocab_size:
        pairs: dict[tuple[str, str], int] = {}
        for w, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + word_counts[w]
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        merged = a + b[len(prefix):]
        merges.append((a, b))
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
        for w, symbols in words.items():
            i, out = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[w] = out
    return vocab, merges


def train_tokenizer(texts: list[str], vocab_size: int):
    """BPE over whitespace/punctuation words with <pad>=0, <eos>=1, <unk>=2 and a plain-text chat template; the
    merges come from `bpe_merges`, so the same texts give a byte-identical tokenizer on every machine."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    split = pre_tokenizers.Whitespace()
    counts: dict[str, int] = {}
    for text in texts:
        for word, _ in split.pre_tokenize_str(text):
            counts[word] = counts.get(word, 0) + 1
    symbols, merges = bpe_merges(counts, vocab_size - len(specials))
    vocab = {t: i for i, t in enumerate(specials + symbols)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", continuing_subword_prefix="##"))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = split
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE  # chat and plain prompts mean the same text here
    return fast


def _build(out: Path, seed: int, settings: dict) -> None:
    texts = corpus(settings["corpus"], seed)
    tok = train_tokenizer(texts, settings["vocab"])
    docs = [tok(t).input_ids + [tok.eos_token_id] for t in texts]
    model = tiny_llama(len(tok), settings["hidden"], settings["layers"], settings["heads"], 256,
                       tok.pad_token_id, tok.eos_token_id, seed)
    print(f"reviews: pretraining a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter model "
          f"on {len(texts)} generated reviews", flush=True)
    losses = pretrain(model, pack_blocks(docs, settings["block"]), settings["steps"], settings["batch"],
                      settings["lr"], seed, name="reviews")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "build.json").write_text(json.dumps({**settings, "seed": seed, "final_loss": losses[-1]}, indent=2))


def build_base(out_dir=None, seed: int = 0, force: bool = False, **overrides) -> Path:
    """Tokenizer + pretrained tiny Llama as a normal HF directory, cached by settings (a few minutes on 2 cores)."""
    settings = {**SETTINGS, **overrides}
    target = Path(out_dir) if out_dir else cache_dir("reviews", {**settings, "seed": seed})
    return build_cached(target, lambda tmp: _build(tmp, seed, settings), force)
