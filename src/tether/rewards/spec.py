"""Reward specs: one string names the reward of a run (PPO, GRPO, best-of-N and online DPO all read `reward=`).

    reward_from_spec("rm:runs/rm")                         # a learned reward model or ensemble (LearnedReward)
    reward_from_spec("prm:runs/prm")                       # a process reward model (rewards.prm.PRMReward)
    reward_from_spec("judge:constitution.yaml")            # direct RLAIF: an AI judge scores 1-10 (JudgeReward)
    reward_from_spec("python:my_rewards:brevity")          # f(prompts, completions, records) -> list[float]
    reward_from_spec("python:trl_rewards:accuracy")        # TRL's f(completions, **columns) works as it is
    reward_from_spec("python:path/to/rewards.py:brevity")  # the same, from a file
    reward_from_spec("arithmetic")                         # a built-in: a task's gold reward or a verifier (BUILTINS)
    reward_from_spec("rm:runs/rm*1.0+format*0.5")          # weighted sum (rewards.WeightedSum), each part logged
    reward_from_spec("rm:runs/rm+rules:rules.yaml")        # R_rm + Σ w_i φ_i from a rules file (rules_file.py)

Grammar: spec = term ("+" term)*, term = source ["*" weight], weight a number (negative allowed: "format*-0.5").
Terms split at a "+" followed by a letter, so a weight such as 1e+3 stays whole (a path with "+<letter>" in it cannot
be used). One term with weight 1 gives the source itself; anything else a WeightedSum whose components are named
after the terms ("rm", the function's name, the built-in's name; repeated names get a suffix _2, _3, ...).
A spec that names nothing known raises ConfigError (the CLI prints it as one line).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

from tether.config import ConfigError
from tether.rewards import FunctionReward, RewardSource

# built-in names -> "module:function" of a reward function f(prompts, completions, records) -> list[float]
BUILTINS = {
    "reviews": "tether.tasks.reviews:gold_reward",
    "arithmetic": "tether.tasks.arithmetic:gold_reward",
    "math": "tether.rewards.math:math_accuracy",
    "code": "tether.rewards.code:code_tests_reward",
    "format": "tether.rewards.format:think_answer_format",
    "format_lenient": "tether.rewards.format:think_answer_format_lenient",
}

_FORMS = "rm:DIR, prm:DIR, rules:FILE.yaml, judge:FILE.yaml, python:MODULE:FUNCTION, python:FILE.py:FUNCTION or a built-in (" + ", ".join(BUILTINS) + ")"


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """"rm:a*2+format*-0.5" -> [("rm:a", 2.0), ("format", -0.5)]."""
    terms = []
    for part in re.split(r"\+(?=\s*[A-Za-z_])", spec.strip()):
        source, weight = part.strip(), 1.0
        if "*" in source:
            head, _, tail = source.rpartition("*")
            try:
                source, weight = head.strip(), float(tail)
            except ValueError:
                raise ConfigError(f"reward spec {spec!r}: weight {tail!r} is not a number") from None
        if not source:
            raise ConfigError(f"reward spec {spec!r}: empty term; use {_FORMS}")
        terms.append((source, weight))
    return terms


def load_function(target: str):
    """"module:function" or "path/file.py:function" -> the function object."""
    module_name, _, fn_name = target.rpartition(":")
    if not module_name or not fn_name:
        raise ConfigError(f"python reward {target!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.exists():
            raise ConfigError(f"python reward {target!r}: no file {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ConfigError(f"python reward {target!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ConfigError(f"python reward {target!r}: {module_name} has no {fn_name!r}")
    return fn


def source_from_term(term: str, **rm_kwargs) -> RewardSource:
    """One source: rm:DIR -> LearnedReward(DIR, **rm_kwargs); python:... and built-ins -> FunctionReward."""
    if term.startswith("rm:"):
        from tether.rewards.learned import LearnedReward

        return LearnedReward(term[3:], **rm_kwargs)
    if term.startswith("prm:"):  # a process reward model: Π_k p(step k correct), per-step scores kept
        from tether.rewards.prm import PRMReward

        return PRMReward(term[4:], **{k: v for k, v in rm_kwargs.items() if k in ("batch_size", "device", "dtype")})
    if term.startswith("rules:"):  # a rules file: Σ_i w_i φ_i, each proposition a component
        from tether.rewards.rules_file import rules_reward

        return rules_reward(term[len("rules:"):])
    if term.startswith("judge:"):  # direct RLAIF: the constitution's judge scores 1-10, rescaled; no reward model
        from tether.rewards.judge import JudgeReward

        return JudgeReward(term[len("judge:"):], device=rm_kwargs.get("device"))
    if term.startswith("python:"):
        fn = load_function(term[len("python:"):])
    elif term in BUILTINS:
        fn = load_function(BUILTINS[term])
    else:
        raise ConfigError(f"unknown reward {term!r}; use {_FORMS}")
    if isinstance(fn, RewardSource):
        return fn
    if not callable(fn):
        raise ConfigError(f"reward {term!r} is not callable")
    try:
        return FunctionReward(fn, name=term if term in BUILTINS else None)
    except TypeError as e:  # told before any model loads, not as a traceback after the first rollout
        raise ConfigError(f"reward {term!r} {e}") from None


def reward_from_spec(spec: str | RewardSource, **rm_kwargs) -> RewardSource:
    """A reward source from a spec string (module docstring); a RewardSource is returned as it is.

    `rm_kwargs` go to every LearnedReward of the spec (device, batch_size, dtype, ...).
    """
    if isinstance(spec, RewardSource):
        return spec
    terms = parse_spec(spec)
    sources = [(source_from_term(term, **rm_kwargs), weight) for term, weight in terms]
    if len(sources) == 1 and sources[0][1] == 1.0:
        return sources[0][0]
    from tether.rewards import WeightedSum

    named, weights = {}, {}
    for source, weight in sources:
        name, n = source.name, 1
        while name in named:
            n += 1
            name = f"{source.name}_{n}"
        named[name], weights[name] = source, weight
    return WeightedSum(named, weights)


from_spec = reward_from_spec  # the short name
