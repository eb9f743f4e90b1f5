"""A constitution: the written principles an AI judge labels, critiques and revises by (Bai et al. 2022, §3-4).

    c = load_constitution("reviews")                     # the packaged default of the embedded task
    c = load_constitution("my_constitution.yaml")
    c.comparison_prompt(prompt, a, b, principle)         # the rendered RL-CAI question
    c.pick(rng)                                          # principles for one comparison (sampling: per_comparison | all)

The YAML file (every key but `principles` optional; shipped examples: rewards/constitutions/reviews.yaml and
hhh.yaml):

    name: my-assistant
    judge: {model: DIR | builtin:reviews-judge, base_url: http://host:8000/v1, api: completions | chat,
            api_key_env: TETHER_SERVE_TOKEN, concurrency: 8, retries: 4, timeout: 60, cache: PATH}
    sampling: per_comparison        # one principle drawn per comparison by weight (RL-CAI), or `all`: the weighted
                                    # mean of every principle's label (an ensemble)
    swap: true                      # judge both orders and average (RLAIF §3.1: position bias)
    cot: false                      # chain of thought first; its labels clamped to cot_clamp (RL-CAI §4.1)
    cot_clamp: [0.4, 0.6]
    labels: pairwise                # pairwise: the comparison prompt above; pointwise: each response scored alone
                                    # by the score prompt, P(a better) = σ((E[s_a] − E[s_b]) / pointwise_scale)
    pointwise_scale: 1.0            # points of expected score per logit of the pointwise label
    principles:
      - {name: harmless, weight: 1.0, comparison: "Which response is less harmful?",
         critique: "Identify ways the response is harmful.", revision: "Rewrite the response to remove harm."}
    templates: {comparison, options, score, score_options, critique, revision, revision_direct, cot, cot_answer}
    few_shot: {comparison: [str], score: [str], critique: [str]}   # prepended to the rendered prompts

Template fields: comparison {few_shot} {prompt} {a} {b} {question}; score {few_shot} {prompt} {response}
{question}; critique {few_shot} {prompt} {response} {request}; revision {context} {critique} {request};
revision_direct {few_shot} {prompt} {response} {request}; cot {question_prompt}; cot_answer {rationale}; `stop`: the
strings at which a generated critique or revision is cut.
Errors name the file and the key (`principles[2].weight: must be a number > 0`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tether.config import ConfigError

HERE = Path(__file__).parent / "constitutions"
SAMPLING = ("per_comparison", "all")
LABELS = ("pairwise", "pointwise")
TEMPLATE_FIELDS = {
    "comparison": {"few_shot", "prompt", "a", "b", "question"},
    "score": {"few_shot", "prompt", "response", "question"},
    "critique": {"few_shot", "prompt", "response", "request"},
    "revision": {"context", "critique", "request"},
    "revision_direct": {"few_shot", "prompt", "response", "request"},
    "cot": {"question_prompt"},
    "cot_answer": {"rationale"},
}
DEFAULT_TEMPLATES = {  # the RL-CAI wording (Bai et al. 2022, §4.1) and SL-CAI's request/response turns (§3.1)
    "comparison": "{few_shot}Consider the following conversation between a human and an assistant:\n{prompt}\n"
                  "{question}\nOptions:\n(A) {a}\n(B) {b}\nThe answer is:",
    "options": [" (A)", " (B)"],
    "score": "{few_shot}Consider the following conversation between a human and an assistant:\n{prompt}\n"
             "Assistant: {response}\n{question} Rate the response from 1 to 10.\nRating:",
    "score_question": "How good is the assistant's response?",
    "score_options": [f" {i}" for i in range(1, 11)],
    "critique": "{few_shot}Human: {prompt}\nAssistant: {response}\nCritique Request: {request}\nCritique:",
    "revision": "{context} {critique}\nRevision Request: {request}\nRevision:",
    "revision_direct": "{few_shot}Human: {prompt}\nAssistant: {response}\nRevision Request: {request}\nRevision:",
    "cot": "{question_prompt} Let's think step by step:",
    "cot_answer": " {rationale}\nSo the answer is:",
    "stop": ["\nCritique Request:", "\nRevision Request:", "\nHuman:"],  # where a critique or revision ends
}
JUDGE_KEYS = {"model", "base_url", "api", "api_key_env", "concurrency", "retries", "timeout", "cache", "device",
              "batch_size", "max_new_tokens"}


@dataclass(frozen=True)
class Principle:
    name: str
    comparison: str
    critique: str = ""
    revision: str = ""
    weight: float = 1.0


@dataclass
class Constitution:
    name: str
    principles: list[Principle]
    templates: dict = field(default_factory=lambda: dict(DEFAULT_TEMPLATES))
    few_shot: dict = field(default_factory=dict)
    sampling: str = "per_comparison"
    swap: bool = True
    cot: bool = False
    cot_clamp: tuple[float, float] = (0.4, 0.6)
    labels: str = "pairwise"
    pointwise_scale: float = 1.0
    judge: dict = field(default_factory=dict)
    source: str = "<memory>"

    def shots(self, kind: str) -> str:
        """The few-shot examples of a kind, each followed by a blank line."""
        return "".join(f"{s}\n\n" for s in self.few_shot.get(kind, []))

    def comparison_prompt(self, prompt: str, a: str, b: str, principle: Principle) -> str:
        return self.templates["comparison"].format(few_shot=self.shots("comparison"), prompt=prompt, a=a, b=b,
                                                   question=principle.comparison)

    def score_prompt(self, prompt: str, response: str) -> str:
        return self.templates["score"].format(few_shot=self.shots("score"), prompt=prompt, response=response,
                                              question=self.templates["score_question"])

    def critique_prompt(self, prompt: str, response: str, principle: Principle) -> str:
        return self.templates["critique"].format(few_shot=self.shots("critique"), prompt=prompt, response=response,
                                                 request=principle.critique)

    def revision_prompt(self, context: str, critique: str, principle: Principle) -> str:
        return self.templates["revision"].format(context=context, critique=critique, request=principle.revision)

    def direct_revision_prompt(self, prompt: str, response: str, principle: Principle) -> str:
        return self.templates["revision_direct"].format(few_shot=self.shots("critique"), prompt=prompt,
                                                        response=response, request=principle.revision)

    def pick(self, rng: random.Random) -> list[Principle]:
        """The principles one comparison is judged by: one drawn by weight, or all of them."""
        if self.sampling == "all":
            return list(self.principles)
        return rng.choices(self.principles, weights=[p.weight for p in self.principles])


def _fail(source: str, key: str, problem: str):
    raise ConfigError(f"{source}: {key}: {problem}")


def _text(raw: dict, key: str, source: str, where: str, required: bool = True) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str) or (required and not value.strip()):
        _fail(source, f"{where}.{key}", "must be a non-empty string" if required else "must be a string")
    return value


def _principles(raw, source: str) -> list[Principle]:
    if not isinstance(raw, list) or not raw:
        _fail(source, "principles", "must be a non-empty list of {name, comparison, critique, revision, weight}")
    out, names = [], set()
    for i, item in enumerate(raw):
        where = f"principles[{i}]"
        if not isinstance(item, dict):
            _fail(source, where, "must be a mapping")
        unknown = set(item) - {"name", "comparison", "critique", "revision", "weight"}
        if unknown:
            _fail(source, f"{where}.{sorted(unknown)[0]}", "unknown key")
        name = _text(item, "name", source, where)
        if name in names:
            _fail(source, f"{where}.name", f"{name!r} appears twice")
        names.add(name)
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight <= 0:
            _fail(source, f"{where}.weight", f"must be a number > 0, got {weight!r}")
        out.append(Principle(name, _text(item, "comparison", source, where), _text(item, "critique", source, where,
                                                                                  False),
                             _text(item, "revision", source, where, False), float(weight)))
    return out


def _templates(raw, source: str) -> dict:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        _fail(source, "templates", "must be a mapping")
    templates = {**DEFAULT_TEMPLATES, **raw}
    for key in raw:
        if key not in DEFAULT_TEMPLATES:
            _fail(source, f"templates.{key}", f"unknown template; use {', '.join(DEFAULT_TEMPLATES)}")
    for key, fields in TEMPLATE_FIELDS.items():
        text = templates[key]
        if not isinstance(text, str):
            _fail(source, f"templates.{key}", "must be a string")
        try:
            text.format(**{f: "x" for f in fields})
        except (KeyError, IndexError, ValueError) as e:
            _fail(source, f"templates.{key}", f"bad placeholder {e}; it may use {{{'}, {'.join(sorted(fields))}}}")
    if not isinstance(templates["stop"], list) or not all(isinstance(s, str) and s for s in templates["stop"]):
        _fail(source, "templates.stop", "must be a list of non-empty strings")
    for key, n in (("options", 2), ("score_options", 2)):
        opts = templates[key]
        if not isinstance(opts, list) or len(opts) < n or not all(isinstance(o, str) and o.strip() for o in opts) \
                or len(set(opts)) != len(opts):
            _fail(source, f"templates.{key}", "must be a list of distinct non-empty strings")
    if len(templates["options"]) != 2:
        _fail(source, "templates.options", "must be exactly two strings (the first names response a)")
    return templates


def parse_constitution(raw, source: str = "<memory>") -> Constitution:
    """A Constitution from the parsed YAML mapping; ConfigError names the source and the key."""
    if not isinstance(raw, dict):
        _fail(source, "(top level)", "must be a mapping with at least `principles`")
    known = {"name", "judge", "sampling", "swap", "cot", "cot_clamp", "labels", "pointwise_scale", "principles",
             "templates", "few_shot"}
    unknown = set(raw) - known
    if unknown:
        _fail(source, sorted(unknown)[0], f"unknown key; use {', '.join(sorted(known))}")
    sampling = raw.get("sampling", "per_comparison")
    if sampling not in SAMPLING:
        _fail(source, "sampling", f"must be one of {' | '.join(SAMPLING)}, got {sampling!r}")
    labels = raw.get("labels", "pairwise")
    if labels not in LABELS:
        _fail(source, "labels", f"must be one of {' | '.join(LABELS)}, got {labels!r}")
    scale = raw.get("pointwise_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        _fail(source, "pointwise_scale", f"must be a number > 0, got {scale!r}")
    for key in ("swap", "cot"):
        if not isinstance(raw.get(key, False), bool):
            _fail(source, key, "must be true or false")
    clamp = raw.get("cot_clamp", [0.4, 0.6])
    if not (isinstance(clamp, list) and len(clamp) == 2 and all(isinstance(x, (int, float)) for x in clamp)
            and 0 <= clamp[0] < clamp[1] <= 1):
        _fail(source, "cot_clamp", f"must be [low, high] with 0 <= low < high <= 1, got {clamp!r}")
    few_shot = raw.get("few_shot") or {}
    if not isinstance(few_shot, dict):
        _fail(source, "few_shot", "must be a mapping of comparison/score/critique to lists of strings")
    for key, shots in few_shot.items():
        if key not in ("comparison", "score", "critique") or not isinstance(shots, list) \
                or not all(isinstance(s, str) for s in shots):
            _fail(source, f"few_shot.{key}", "must be comparison, score or critique: a list of strings")
    judge = raw.get("judge") or {}
    if not isinstance(judge, dict):
        _fail(source, "judge", "must be a mapping")
    for key in judge:
        if key not in JUDGE_KEYS:
            _fail(source, f"judge.{key}", f"unknown key; use {', '.join(sorted(JUDGE_KEYS))}")
    if judge.get("api", "completions") not in ("completions", "chat"):
        _fail(source, "judge.api", f"must be completions or chat, got {judge.get('api')!r}")
    return Constitution(str(raw.get("name", Path(source).stem)), _principles(raw.get("principles"), source),
                        _templates(raw.get("templates"), source), few_shot, sampling, raw.get("swap", True),
                        raw.get("cot", False), (float(clamp[0]), float(clamp[1])), labels, float(scale), judge,
                        source)


def constitution_path(name: str | Path) -> Path:
    """A file path, or the name of a packaged constitution (`reviews`, `hhh`)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    packaged = HERE / f"{name}.yaml"
    if packaged.exists():
        return packaged
    known = ", ".join(sorted(p.stem for p in HERE.glob("*.yaml")))
    raise ConfigError(f"constitution {str(name)!r}: no such file and no packaged constitution of that name ({known})")


def load_constitution(name: str | Path) -> Constitution:
    path = constitution_path(name)
    if not path.exists():
        raise ConfigError(f"constitution {str(path)!r}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    return parse_constitution(raw, str(path))
