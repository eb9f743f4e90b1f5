"""AI feedback: a Judge asks a language model which of two responses better follows a principle (RL-CAI, RLAIF), how
good one response is (direct RLAIF), and writes critiques and revisions (SL-CAI).

    judge = Judge.from_constitution(load_constitution("reviews"))      # the backend named by the file's `judge:`
    judge = Judge(LocalBackend("runs/judge"), constitution)             # a local HF causal LM
    judge = Judge(HTTPBackend("http://host:8000/v1", "judge"), c)       # any OpenAI-compatible server (vLLM, SGLang)
    verdicts = judge.compare(prompts, a, b)      # [Verdict]: prob (a better), both orders, principle, hard
    scores = judge.score(prompts, completions)   # expected 1-10 score rescaled to [-1, 1]
    reward=judge:FILE.yaml                       # JudgeReward: direct RLAIF in PPO, GRPO, best-of-N, online DPO

How a label is made (Bai et al. 2022 §4.1; Lee et al. 2023 §3):
- the comparison prompt is rendered from the constitution; the judge reads the log-probability of each *whole*
  option string after it (every token of " (A)", not one token), and the two are normalised: p = e^la/(e^la + e^lb);
- with `swap`, the pair is judged again with b shown first and the two readings averaged (position bias);
- with `sampling: all` every principle is asked and the labels averaged by weight, else one principle per pair;
- with `labels: pointwise` no comparison is asked: each response gets its expected 1-K score from the score prompt
  alone, and P(a better) = σ((E[s_a] − E[s_b]) / pointwise_scale), a Bradley-Terry label on the judge's scores. A
  small judge that cannot compare two texts in one context may still score one well (the embedded judge does:
  docs/ai-feedback.md), and a pointwise label has no order, so no position bias to average away;
- with `cot`, a rationale is generated first and the label read after it, then clamped to cot_clamp ([0.4, 0.6]);
- a backend that gives no log-probs (a server without them) is asked for text; the option it names is a hard label
  (prob 1 or 0; 0.5 when it names neither), flagged `hard` in every verdict.
Every backend call is cached on disk (JudgeCache, keyed by backend and rendered prompt) when a cache path is given.

Backends implement two calls: `option_logprobs(contexts, options) -> [[float] | None]` and
`generate(contexts, max_new_tokens, temperature) -> [str]`. LocalBackend is exact and batched; HTTPBackend goes
through the official `openai` client (completions with echo + logprobs; chat top-logprobs of the first answer token
as the fallback), with a concurrency limit, the client's retries with exponential backoff on 408/409/429/5xx and
connection errors, and a timeout; a 4xx is a JudgeError naming the server and its message.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import ConfigError
from tether.rewards import RewardOutput, RewardSource


class JudgeError(ConfigError):
    """A judge backend failed in a way the user must fix (a server's 4xx, an unreachable server after retries); a
    ConfigError, so the CLI prints it as one line."""


# --- pure functions --------------------------------------------------------------------------------------------------
def option_probs(logps: Sequence[float]) -> list[float]:
    """p_i = exp(l_i) / Σ_j exp(l_j): the normalised probabilities of the options (RL-CAI §4.1's soft labels)."""
    top = max(logps)
    if top == -math.inf:
        return [1.0 / len(logps)] * len(logps)
    e = [math.exp(x - top) for x in logps]
    return [x / sum(e) for x in e]


def swap_average(p_first: float, p_second: float) -> float:
    """P(a better) = ½ (p_first + p_second): p_first read with a shown as option A, p_second with a shown as B
    (Lee et al. 2023 §3.1: both orders judged, the label averaged, to cancel position bias)."""
    return 0.5 * (p_first + p_second)


def position_consistent(p_first: float, p_second: float) -> bool:
    """The same response wins in both orders (both readings of P(a better) on one side of 1/2). Lee et al. report the
    complement, the same *position* winning after the swap, at 18-56% of pairs."""
    return (p_first - 0.5) * (p_second - 0.5) > 0


def clamp_cot(p: float, low: float = 0.4, high: float = 0.6) -> float:
    """RL-CAI §4.1: chain-of-thought labels are near 0 or 1 and overconfident; clamping them to [0.4, 0.6] works
    better than [0.2, 0.8] or none."""
    return min(high, max(low, p))


def expected_score(probs: Sequence[float]) -> float:
    """s = Σ_i i·P(i) over the scores 1..K (direct RLAIF, Lee et al. 2023 §3.3)."""
    return sum((i + 1) * p for i, p in enumerate(probs))


def rescale_score(s: float, k: int = 10) -> float:
    """s in [1, K] -> [-1, 1]: 2(s − 1)/(K − 1) − 1; for K = 10, (s − 5.5)/4.5."""
    return 2.0 * (s - 1.0) / (k - 1) - 1.0


def pointwise_prob(score_a: float, score_b: float, scale: float = 1.0) -> float:
    """P(a better) = σ((s_a − s_b) / scale) = 1 / (1 + exp(−(s_a − s_b) / scale)): Bradley-Terry on two expected
    scores, `scale` points of score per logit."""
    z = (score_a - score_b) / scale
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Σ w_i x_i / Σ w_i: the label of a comparison judged by several principles (an ensemble, RL-CAI §4.1)."""
    return sum(w * x for w, x in zip(weights, values)) / sum(weights)


def cut_at(text: str, stops: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string (a critique ends where the revision request starts)."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[:min(cuts)] if cuts else text


def hard_choice(text: str, options: Sequence[str]) -> int | None:
    """The option a generated answer names: the earliest-starting stripped option string in the text (None: none)."""
    found = [(text.find(o.strip()), -len(o.strip()), i) for i, o in enumerate(options) if o.strip() in text]
    return min(found)[2] if found else None


# --- the cache -------------------------------------------------------------------------------------------------------
class JudgeCache:
    """SQLite key -> JSON value; the key is sha256 of (backend name, call kind, rendered prompt, options/settings)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS judge (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.db.commit()

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str):
        with self.lock:
            row = self.db.execute("SELECT value FROM judge WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put_many(self, items: dict) -> None:
        with self.lock:
            self.db.executemany("INSERT OR REPLACE INTO judge VALUES (?, ?)",
                                [(k, json.dumps(v)) for k, v in items.items()])
            self.db.commit()


# --- the local backend -----------------------------------------------------------------------------------------------
@torch.no_grad()
def text_token_logprobs(model, tokenizer, texts: Sequence[str], batch_size: int = 32) -> list[dict]:
    """Per text: {"tokens", "offsets" (char start of each token), "logprobs" (None for the first token)} under the
    model, the text tokenised with the tokenizer's special tokens. `tether serve`'s echo and LocalBackend both read
    their log-probs here, so a judge over HTTP sees the numbers a local judge computes."""
    from tether.forward import token_outputs

    device = next(model.parameters()).device
    encoded = [tokenizer(t, return_offsets_mapping=True) for t in texts]
    out = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, e in enumerate(chunk):
            ids[j, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[j, :len(e["input_ids"])] = 1
        lp = token_outputs(model, ids.to(device), mask.to(device)).logprobs.float().cpu()  # (B, T-1)
        for j, e in enumerate(chunk):
            n = len(e["input_ids"])
            out.append({"ids": list(e["input_ids"]),
                        "tokens": tokenizer.convert_ids_to_tokens(e["input_ids"]),
                        "offsets": [s for s, _ in e["offset_mapping"]],
                        "logprobs": [None] + lp[j, :n - 1].tolist()})
    return out


def option_logprob(entry: dict, start: int) -> float:
    """Σ log p of the tokens that start at or after character `start` (the option's tokens)."""
    return float(sum(lp for off, lp in zip(entry["offsets"], entry["logprobs"]) if off >= start and lp is not None))


class LocalBackend:
    """A Hugging Face causal LM directory (or Hub ID) on this machine; exact, batched option log-probs."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", batch_size: int = 32):
        from tether.models import load_causal_lm, load_tokenizer

        self.tokenizer, self.model = load_tokenizer(model_dir), load_causal_lm(model_dir).to(device).eval()
        self.batch_size = batch_size
        self.name = f"local:{Path(model_dir).resolve() if Path(model_dir).exists() else model_dir}"

    def option_logprobs(self, contexts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        texts = [c + o for c in contexts for o in options]
        entries = text_token_logprobs(self.model, self.tokenizer, texts, self.batch_size)
        k = len(options)
        return [[option_logprob(entries[i * k + j], len(c)) for j in range(k)] for i, c in enumerate(contexts)]

    def generate(self, contexts: Sequence[str], max_new_tokens: int = 48, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
        from tether.generation import sample_records

        generator = torch.Generator(next(self.model.parameters()).device).manual_seed(seed)
        s = sample_records(self.model, self.tokenizer, [{"prompt": c} for c in contexts], 1,
                           max_new_tokens=max_new_tokens, temperature=temperature, generator=generator,
                           batch_size=self.batch_size)
        return s.completions


# --- the HTTP backend ------------------------------------------------------------------------------------------------
class HTTPBackend:
    """An OpenAI-compatible server through the official `openai` client: `api="completions"` reads the options'
    log-probs from an echoed prompt (vLLM, SGLang, `tether serve`); `api="chat"` reads the top log-probs of the first
    answer token (a chat-only server). A server that returns no log-probs gives None: the Judge asks for text."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, api: str = "completions",
                 concurrency: int = 8, retries: int = 4, timeout: float = 60.0):
        try:
            from openai import OpenAI
        except ModuleNotFoundError:
            raise JudgeError("an HTTP judge needs the openai client: pip install 'tether[feedback]'") from None
        self.client = OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=retries, timeout=timeout)
        self.base_url, self.model, self.api, self.concurrency = base_url, model, api, concurrency
        self.name = f"http:{base_url}:{model}:{api}"

    def _call(self, fn, *args):
        import openai

        try:
            return fn(*args)
        except openai.APIStatusError as e:
            raise JudgeError(f"judge server {self.base_url} answered {e.status_code}: {_message(e)}") from None
        except openai.APIConnectionError as e:  # includes timeouts, after the client's retries
            raise JudgeError(f"judge server {self.base_url} unreachable after retries: {e}") from None

    def _map(self, fn, items):
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(lambda x: self._call(fn, x), items))

    def _completion_options(self, context: str, options: Sequence[str]) -> list[float] | None:
        texts = [context + o for o in options]
        r = self.client.completions.create(model=self.model, prompt=texts, max_tokens=0, echo=True, logprobs=1,
                                           temperature=0.0)
        out = [0.0] * len(options)
        for choice in r.choices:
            lp = choice.logprobs
            if lp is None or lp.token_logprobs is None or lp.text_offset is None:
                return None
            end = len(texts[choice.index])
            out[choice.index] = float(sum(x for off, x in zip(lp.text_offset, lp.token_logprobs)
                                          if len(context) <= off < end and x is not None))
        return out

    def _chat_options(self, context: str, options: Sequence[str]) -> list[float] | None:
        r = self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": context}],
                                                max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20)
        lp = r.choices[0].logprobs
        if lp is None or not lp.content:
            return None
        top = {}
        for t in lp.content[0].top_logprobs:
            top[t.token.strip()] = max(top.get(t.token.strip(), -math.inf), t.logprob)
        # the first token of each option: chat gives one step of top log-probs, so multi-token options are judged
        # by their first token (exact options need api=completions)
        found = [top.get(o.strip(), top.get(o.strip()[:1], -math.inf)) for o in options]
        return None if max(found) == -math.inf else found  # no option among the top: read the text instead

    def option_logprobs(self, contexts, options):
        fn = self._completion_options if self.api == "completions" else self._chat_options
        return self._map(lambda c: fn(c, options), list(contexts))

    def generate(self, contexts, max_new_tokens=48, temperature=0.0, seed=0):
        if self.api == "completions":
            def one(c):
                r = self.client.completions.create(model=self.model, prompt=c, max_tokens=max_new_tokens,
                                                   temperature=temperature, seed=seed)
                return r.choices[0].text
        else:
            def one(c):
                r = self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": c}],
                                                        max_tokens=max_new_tokens, temperature=temperature,
                                                        seed=seed)
                return r.choices[0].message.content or ""
        return self._map(one, list(contexts))


def _message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(body.get("detail"), str):
            return body["detail"]
    return str(getattr(e, "message", e))


# --- the judge -------------------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """One comparison: prob = P(a better), swap-averaged and principle-averaged; the two orders' readings."""

    prob: float
    prob_ab: float  # P(a better) read with a shown first
    prob_ba: float | None  # P(a better) read with a shown second (None without swap)
    principle: str
    hard: bool = False

    @property
    def consistent(self) -> bool | None:
        return None if self.prob_ba is None else position_consistent(self.prob_ab, self.prob_ba)


class Judge:
    """A backend plus a constitution: comparisons, scores, critiques and revisions (module docstring)."""

    def __init__(self, backend, constitution, cache: JudgeCache | str | Path | None = None, seed: int = 0,
                 max_new_tokens: int = 48):
        self.backend, self.constitution, self.seed = backend, constitution, seed
        self.cache = JudgeCache(cache) if isinstance(cache, (str, Path)) else cache
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_constitution(cls, constitution, cache=None, seed: int = 0, device: str | None = None) -> Judge:
        """The backend the constitution's `judge:` section names (a model directory, builtin:reviews-judge, or a
        base_url of an OpenAI-compatible server)."""
        j = constitution.judge
        if j.get("base_url"):
            key = os.environ.get(j.get("api_key_env", ""), None) if j.get("api_key_env") else None
            backend = HTTPBackend(j["base_url"], str(j.get("model", "default")), key, j.get("api", "completions"),
                                  int(j.get("concurrency", 8)), int(j.get("retries", 4)), float(j.get("timeout", 60)))
        elif j.get("model"):
            model = str(j["model"])
            if model == "builtin:reviews-judge":
                from tether.tasks.reviews_judge import build_judge

                model = str(build_judge())
            backend = LocalBackend(model, device or j.get("device", "cpu"), int(j.get("batch_size", 32)))
        else:
            raise ConfigError(f"{constitution.source}: judge: needs `model` (a directory) or `base_url` (a server)")
        return cls(backend, constitution, cache or j.get("cache"), seed, int(j.get("max_new_tokens", 48)))

    # cached backend calls
    def _logprobs(self, contexts: list[str], options: list[str]) -> list[list[float] | None]:
        keys = [JudgeCache.key(self.backend.name, "options", c, options) for c in contexts]
        found = {k: self.cache.get(k) for k in keys} if self.cache else {}
        missing = [i for i, k in enumerate(keys) if found.get(k) is None]
        if missing:
            got = self.backend.option_logprobs([contexts[i] for i in missing], options)
            new = {keys[i]: g for i, g in zip(missing, got) if g is not None}
            found.update({keys[i]: g for i, g in zip(missing, got)})
            if self.cache and new:
                self.cache.put_many(new)
        return [found[k] for k in keys]

    def generate(self, contexts: list[str], max_new_tokens: int | None = None, temperature: float = 0.0,
                 stop: Sequence[str] = ()) -> list[str]:
        """Generated texts (greedy by default; temperature 0 calls are cached), each cut at its first `stop` string."""
        n = max_new_tokens or self.max_new_tokens
        keys = [JudgeCache.key(self.backend.name, "generate", c, n, temperature, self.seed) for c in contexts]
        found = {k: self.cache.get(k) for k in keys} if self.cache and temperature == 0 else {}
        missing = [i for i, k in enumerate(keys) if found.get(k) is None]
        if missing:
            got = self.backend.generate([contexts[i] for i in missing], n, temperature, self.seed)
            found.update({keys[i]: g for i, g in zip(missing, got)})
            if self.cache and temperature == 0:
                self.cache.put_many({keys[i]: g for i, g in zip(missing, got)})
        return [cut_at(found[k], stop) for k in keys]

    def _option_probs(self, contexts: list[str], options: list[str]) -> list[tuple[list[float], bool]]:
        """(probabilities of the options, hard) per context; a backend without log-probs is asked for text."""
        got = self._logprobs(contexts, options)
        out: list = [None] * len(contexts)
        no_lp = [i for i, g in enumerate(got) if g is None]
        for i, g in enumerate(got):
            if g is not None:
                out[i] = (option_probs(g), False)
        if no_lp:
            texts = self.generate([contexts[i] for i in no_lp], 8)
            for i, text in zip(no_lp, texts):
                pick = hard_choice(text, options)
                out[i] = ([1.0 / len(options)] * len(options) if pick is None else
                          [float(j == pick) for j in range(len(options))], True)
        return out

    def _prob_first(self, contexts: list[str]) -> list[tuple[float, bool]]:
        """P(option A) per rendered comparison; with cot, read after a generated rationale and clamped."""
        c = self.constitution
        options = c.templates["options"]
        if c.cot:
            asks = [c.templates["cot"].format(question_prompt=x) for x in contexts]
            rationales = self.generate(asks)
            contexts = [a + c.templates["cot_answer"].format(rationale=r.strip()) for a, r in zip(asks, rationales)]
        out = []
        for probs, hard in self._option_probs(contexts, options):
            p = probs[0]
            out.append((clamp_cot(p, *c.cot_clamp) if c.cot else p, hard))
        return out

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[Verdict]:
        """One Verdict per pair (a_i, b_i) after prompts_i."""
        c = self.constitution
        if c.labels == "pointwise":
            scores = self.expected_scores(list(prompts) * 2, list(a) + list(b))
            n = len(prompts)
            return [Verdict(p, p, None, "score") for p in
                    (pointwise_prob(scores[i], scores[n + i], c.pointwise_scale) for i in range(n))]
        rng = random.Random(f"judge-{self.seed}")
        picked = [c.pick(rng) for _ in prompts]
        jobs = [(i, p) for i, principles in enumerate(picked) for p in principles]
        first = [c.comparison_prompt(prompts[i], a[i], b[i], p) for i, p in jobs]
        second = [c.comparison_prompt(prompts[i], b[i], a[i], p) for i, p in jobs] if c.swap else []
        read = self._prob_first(first + second)
        ab, ba = read[:len(jobs)], read[len(jobs):]
        out, start = [], 0
        for principles in picked:
            rows, start = range(start, start + len(principles)), start + len(principles)  # jobs are in pair order
            weights = [p.weight for p in principles]
            p_ab = weighted_mean([ab[j][0] for j in rows], weights)
            p_ba = weighted_mean([1.0 - ba[j][0] for j in rows], weights) if c.swap else None
            hard = any(ab[j][1] for j in rows) or (c.swap and any(ba[j][1] for j in rows))
            prob = swap_average(p_ab, p_ba) if c.swap else p_ab
            out.append(Verdict(prob, p_ab, p_ba, "+".join(p.name for p in principles), hard))
        return out

    def expected_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """The expected 1-K score of each completion under the score prompt."""
        c = self.constitution
        contexts = [c.score_prompt(p, r) for p, r in zip(prompts, completions)]
        return [expected_score(probs) for probs, _ in self._option_probs(contexts, c.templates["score_options"])]

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Direct RLAIF: the expected 1-K score of each completion, rescaled to [-1, 1]."""
        k = len(self.constitution.templates["score_options"])
        return [rescale_score(s, k) for s in self.expected_scores(prompts, completions)]


class JudgeReward(RewardSource):
    """`reward=judge:FILE.yaml`: the judge's rescaled 1-10 score as the reward, no reward model (direct RLAIF)."""

    name = "judge"

    def __init__(self, constitution: str | Path, cache: str | None = None, device: str | None = None):
        from tether.rewards.constitution import load_constitution

        self.judge = Judge.from_constitution(load_constitution(constitution), cache=cache, device=device)

    def __call__(self, prompts, completions, records) -> RewardOutput:
        text_prompts = [p if isinstance(p, str) else json.dumps(p) for p in prompts]
        scores = torch.tensor(self.judge.score(text_prompts, list(completions)), dtype=torch.float32)
        return RewardOutput(scores=scores, components={self.name: scores})
