"""Candidate responses for raters to compare: sampled from a policy, optionally with an AI critique per response.

    tether label sample --model runs/sft/model --prompts prompts.jsonl --n 2 --out cand.jsonl
    tether label sample ... --critic python:my_critics:critique     # f(prompts, responses) -> list[str]
    tether label sample ... --critic model:runs/critic              # a causal LM writes the critique

A candidates file is JSONL, one prompt per line (DESIGN.md prompt forms):
    {"prompt": str | [turns], "responses": [str, str, ...], "critiques": [str, ...]?, "gold": 0 | 1?}
`critiques`, when present, has one text per response and is shown to raters under each response (CriticGPT,
McAleese et al. 2024: model-written critiques help people find flaws they would miss). `gold` marks a hidden gold
item: the index of the known better response, for measuring rater reliability (exactly two responses).

A model critic is prompted with CRITIC_TEMPLATE and sampled greedily; any python function with the signature
above works as well (a rule-based checker, a call to a judge model).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tether import data as D
from tether.data.schemas import _lone_surrogate

CRITIC_TEMPLATE = "{prompt} {response}\ncritique:"


def _check_candidate(record: dict) -> None:
    responses = record.get("responses")
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
        raise D.DataError("expected a list of at least two strings", field="responses")
    critiques = record.get("critiques")
    if critiques is not None and (not isinstance(critiques, list) or len(critiques) != len(responses)
                                  or not all(isinstance(c, str) for c in critiques)):
        raise D.DataError("expected one string per response", field="critiques")
    gold = record.get("gold")
    if gold is not None and (len(responses) != 2 or gold not in (0, 1) or isinstance(gold, bool)):
        raise D.DataError("a gold item has two responses and gold 0 or 1 (the better one)", field="gold")
    for name in ("responses", "critiques"):  # the store and the pages encode them as UTF-8: a lone surrogate cannot be
        for i, text in enumerate(record.get(name) or []):
            problem = _lone_surrogate(text)
            if problem:
                raise D.DataError(problem, field=f"{name}[{i}]")


def read_candidates(path: str | Path) -> list[dict]:
    """Validated candidate records with `prompt` (a string or turns); DataError names file, line and field."""
    out = []
    for line, row in D.read_rows(path):
        if isinstance(row, D.DataError):
            raise row
        D.validate_record(row, "prompts", path, line)
        try:
            _check_candidate(row)
        except D.DataError as e:
            e.path, e.line = path, line
            raise
        out.append({**row, "prompt": D.prompt_of(row)})
    if not out:
        raise D.DataError("no candidate records", path)
    return out


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: Sequence, n: int, max_new_tokens: int = 48,
                     temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
                     max_prompt_len: int = 256) -> list[list[str]]:
    """n sampled responses per prompt (a string or chat turns), as texts without EOS."""
    from tether.generation import sample_records

    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    samples = sample_records(model, tokenizer, [{"prompt": p} for p in prompts], n, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, generator=generator, max_prompt_len=max_prompt_len,
                             batch_size=batch_size)
    return [g["completions"] for g in samples.groups(n)]


def model_critic(model_dir: str, max_new_tokens: int = 48) -> Callable[[list, list[str]], list[str]]:
    """A critic that asks a causal LM for a critique of each (prompt, response), greedily."""
    from tether.models import load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir)

    def critique(prompts: list, responses: list[str]) -> list[str]:
        asks = [CRITIC_TEMPLATE.format(prompt=p if isinstance(p, str) else json.dumps(p), response=r)
                for p, r in zip(prompts, responses)]
        return [texts[0] for texts in sample_responses(model, tokenizer, asks, 1, max_new_tokens, temperature=0.0)]

    return critique


def load_critic(spec: str) -> Callable[[list, list[str]], list[str]]:
    """`model:DIR` or `python:MODULE:FUNCTION` / `python:FILE.py:FUNCTION` -> f(prompts, responses) -> critiques."""
    from tether.config import ConfigError
    from tether.rewards.spec import load_function

    kind, _, target = spec.partition(":")
    if kind == "model" and target:
        return model_critic(target)
    if kind == "python" and target:
        return load_function(target)
    raise ConfigError(f"critic {spec!r}: expected model:DIR or python:MODULE:FUNCTION")


def add_critiques(records: list[dict], critic: Callable[[list, list[str]], list[str]]) -> list[dict]:
    """Each record gets `critiques`, one per response, from one call of the critic over all responses."""
    prompts = [r["prompt"] for r in records for _ in r["responses"]]
    flat = critic(prompts, [resp for r in records for resp in r["responses"]])
    if len(flat) != len(prompts):
        raise ValueError(f"the critic returned {len(flat)} critiques for {len(prompts)} responses")
    out, i = [], 0
    for r in records:
        out.append({**r, "critiques": [str(c) for c in flat[i:i + len(r["responses"])]]})
        i += len(r["responses"])
    return out


def make_candidates(model, tokenizer, prompt_records: list[dict], n: int, seed: int = 0, **sampling) -> list[dict]:
    """Candidate records for prompt records (extra fields of a prompt record are kept)."""
    prompts = [D.prompt_of(r) for r in prompt_records]
    responses = sample_responses(model, tokenizer, prompts, n, seed=seed, **sampling)
    return [{**{k: v for k, v in r.items() if k != "messages"}, "prompt": p, "responses": texts}
            for r, p, texts in zip(prompt_records, prompts, responses)]
