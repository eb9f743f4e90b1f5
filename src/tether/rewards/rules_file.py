"""Rules files: rule-based rewards (rewards/rules.py) written as YAML, used as `reward=rules:FILE`.

    propositions:                       # binary facts about one response (OpenAI 2024, RBR §4)
      agrees_with_user:                 # the prompt's capture fills {user}: a rule may read the user's number
        prompt: "I think the answer is (?P<user>-?\\d+)"
        regex: "^\\s*{user}\\s*$"
      a_number: {regex: "^\\s*-?\\d+\\s*$"}
      polite: {python: "checks.py:is_polite"}     # f(prompt, completion) -> bool; the path is the file's neighbour
    classes:                            # conjunctions of propositions, "not NAME" negated: features of their own
      copies_user: [agrees_with_user, a_number]
    weights: {agrees_with_user: -0.7}   # written by `tether rules fit` (a feature without one weighs 0)
    bias: 0.0

R = bias + Σ_i w_i φ_i over the features (propositions, then classes); `reward=rm:DIR+rules:FILE` adds the reward
model's score: R = R_rm + Σ_i w_i φ_i (docs/reference.md §AI feedback and rules). Each feature is logged under its
name. A proposition with a `prompt` pattern is false when the pattern does not match the prompt (no number stated).
Every error names the file, the key and its line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from tether.config import ConfigError
from tether.rewards.rules import Proposition, RuleReward

PROPOSITION_KEYS = {"regex", "prompt", "python"}
TOP_KEYS = {"propositions", "classes", "weights", "bias", "rates", "fit"}


class _Where:
    """Line numbers of keys in a YAML file, read from its node tree: where(("propositions", "x", "regex"))."""

    def __init__(self, path: Path, text: str):
        self.path = path
        try:
            self.root = yaml.compose(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None

    def line(self, keys: tuple) -> int | None:
        node, line = self.root, None
        for key in keys:
            if not isinstance(node, yaml.MappingNode):
                break
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        return line

    def error(self, keys: tuple, message: str) -> ConfigError:
        line = self.line(keys)
        return ConfigError(f"{self.path}{f':{line}' if line else ''}: key '{'.'.join(map(str, keys))}' {message}")


def _pattern(where: _Where, keys: tuple, text) -> re.Pattern:
    if not isinstance(text, str):
        raise where.error(keys, f"must be a regular expression (a string), got {type(text).__name__}")
    try:
        return re.compile(text)
    except re.error as e:
        raise where.error(keys, f"is not a valid regular expression: {e}") from None


def regex_test(completion_re: str, prompt_re: re.Pattern | None):
    """f(prompt, completion) -> bool: `completion_re` searched in the completion, its {name} fields filled (escaped)
    with the named groups `prompt_re` captures in the prompt; False when `prompt_re` does not match."""

    def test(prompt, completion) -> bool:
        pattern = completion_re
        if prompt_re is not None:
            m = prompt_re.search(prompt if isinstance(prompt, str) else str(prompt))
            if m is None:
                return False
            pattern = completion_re.format(**{k: re.escape(v or "") for k, v in m.groupdict().items()})
        return re.search(pattern, completion) is not None

    return test


def _python_function(module: str, fn: str):
    """`fn` of a file (path.py) or an importable module. (rewards.spec.load_function reads reward functions the same
    way; spec imports this module, so it cannot be imported back.)"""
    import importlib
    import importlib.util

    if module.endswith(".py"):
        if not Path(module).exists():
            raise OSError(f"no file {module}")
        spec = importlib.util.spec_from_file_location(Path(module).stem, module)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
    else:
        loaded = importlib.import_module(module)
    if not hasattr(loaded, fn):
        raise AttributeError(f"{module} has no {fn!r}")
    return getattr(loaded, fn)


def _proposition(where: _Where, name: str, spec, base_dir: Path) -> Proposition:
    keys = ("propositions", name)
    if isinstance(spec, str):
        spec = {"regex": spec}
    if not isinstance(spec, dict):
        raise where.error(keys, f"must be a mapping with regex, prompt or python, got {type(spec).__name__}")
    unknown = sorted(set(spec) - PROPOSITION_KEYS)
    if unknown:
        raise where.error(keys + (unknown[0],), f"is not a proposition key; use {sorted(PROPOSITION_KEYS)}")
    if ("regex" in spec) == ("python" in spec):
        raise where.error(keys, "needs exactly one of regex or python")
    if "python" in spec:
        if "prompt" in spec:
            raise where.error(keys + ("prompt",), "goes with regex; a python test reads the prompt itself")
        target = spec["python"]
        if not isinstance(target, str) or ":" not in target:
            raise where.error(keys + ("python",), "must be FILE.py:FUNCTION or MODULE:FUNCTION")
        file, _, fn = target.rpartition(":")
        if file.endswith(".py") and not Path(file).is_absolute():
            file = str(base_dir / file)
        try:
            test = _python_function(file, fn)
        except (ImportError, OSError, AttributeError) as e:
            raise where.error(keys + ("python",), f"cannot load {target!r}: {e}") from None
        if not callable(test):
            raise where.error(keys + ("python",), f"names {target!r}, which is not callable")
        return Proposition(name, test)
    prompt_re = _pattern(where, keys + ("prompt",), spec["prompt"]) if "prompt" in spec else None
    fields = set(re.findall(r"(?<!\{)\{(\w+)\}(?!\})", spec["regex"])) if isinstance(spec["regex"], str) else set()
    missing = sorted(fields - set(prompt_re.groupindex if prompt_re else ()))
    if missing:
        raise where.error(keys + ("regex",), f"uses {{{missing[0]}}}, which no named group of 'prompt' captures")
    _pattern(where, keys + ("regex",), re.sub(r"(?<!\{)\{\w+\}(?!\})", "x", spec["regex"]))
    return Proposition(name, regex_test(spec["regex"], prompt_re))


def class_test(parts: list[tuple[Proposition, bool]]):
    """f(prompt, completion) -> bool: every proposition holds (or, negated, does not)."""
    return lambda prompt, completion: all(p(prompt, completion) != negated for p, negated in parts)


@dataclass
class RulesFile:
    path: Path
    data: dict  # the parsed YAML, as written
    features: list[Proposition]  # propositions, then classes
    weights: list[float]
    bias: float

    def reward(self, base=None) -> RuleReward:
        return RuleReward(self.features, self.weights, base=base, bias=self.bias)

    def write(self, weights: list[float], extra: dict) -> None:
        """The file again with fitted weights and whatever `extra` adds (rates, fit statistics)."""
        data = {**self.data, "weights": {f.name: round(float(w), 6) for f, w in zip(self.features, weights)},
                **extra}
        self.path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def load_rules(path: str | Path) -> RulesFile:
    """Parse and check a rules file (module docstring); ConfigError naming file:line and key on any mistake."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"rules file {path}: no such file")
    text = path.read_text()
    where = _Where(path, text)
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping with 'propositions' (and classes, weights, bias)")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise where.error((unknown[0],), f"is not a rules-file key; use {sorted(TOP_KEYS)}")
    props = data.get("propositions")
    if not isinstance(props, dict) or not props:
        raise where.error(("propositions",), "must map at least one name to a proposition")
    features = [_proposition(where, str(name), spec, path.parent) for name, spec in props.items()]
    by_name = {p.name: p for p in features}
    classes = data.get("classes") or {}
    if not isinstance(classes, dict):
        raise where.error(("classes",), "must map class names to lists of proposition names")
    for name, members in classes.items():
        keys = ("classes", name)
        if name in by_name:
            raise where.error(keys, "is already a proposition's name")
        if not isinstance(members, list) or not members:
            raise where.error(keys, "must be a non-empty list of proposition names ('not NAME' negates)")
        parts = []
        for m in members:
            negated = isinstance(m, str) and m.startswith("not ")
            ref = m[4:].strip() if negated else m
            if ref not in by_name:
                raise where.error(keys, f"names {m!r}, which is not a proposition")
            parts.append((by_name[ref], negated))
        features.append(Proposition(str(name), class_test(parts)))
    names = [f.name for f in features]
    if "base" in names:
        raise where.error(("propositions", "base"), "is reserved (the base reward's component)")
    weights = data.get("weights") or {}
    if not isinstance(weights, dict):
        raise where.error(("weights",), "must map feature names to numbers")
    for name, w in weights.items():
        if name not in names:
            raise where.error(("weights", name), f"is not a proposition or class; features: {names}")
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise where.error(("weights", name), f"must be a number, got {w!r}")
    bias = data.get("bias", 0.0)
    if isinstance(bias, bool) or not isinstance(bias, (int, float)):
        raise where.error(("bias",), f"must be a number, got {bias!r}")
    return RulesFile(path, data, features, [float(weights.get(n, 0.0)) for n in names], float(bias))


def rules_reward(path: str | Path, base=None) -> RuleReward:
    """The reward source of a rules file: `reward=rules:FILE`."""
    return load_rules(path).reward(base)


def fit_rules(rules: RulesFile, pairs: list[dict], base=None, l2: float = 1e-2) -> tuple[list[float], dict]:
    """Bradley-Terry weights of a rules file's features on preference pairs (rules.fit_rule_weights, the base
    reward's margin r(y_w) − r(y_l) held fixed when `base` is given), and what to write back: each feature's rate
    among chosen and rejected responses, and the fit's pairs, accuracy and mean log-likelihood before and after."""
    import torch

    from tether.data import prompt_of
    from tether.rewards.rules import fit_rule_weights, grade

    prompts = [prompt_of(p) for p in pairs]
    chosen, rejected = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    phi_w, phi_l = grade(rules.features, prompts, chosen), grade(rules.features, prompts, rejected)  # (N, K)
    margin = None
    if base is not None:
        margin = (base(prompts, chosen, pairs).scores - base(prompts, rejected, pairs).scores).double()  # (N,)
    w = fit_rule_weights(phi_w, phi_l, margin, l2=l2)
    m0 = torch.zeros(len(pairs), dtype=torch.float64) if margin is None else margin
    fitted = m0 + (phi_w - phi_l).double() @ w  # (N,) the chosen response's logit margin
    loglik = lambda m: torch.nn.functional.logsigmoid(m).mean().item()  # noqa: E731
    rates = {f.name: {"chosen": round(phi_w[:, i].mean().item(), 6), "rejected": round(phi_l[:, i].mean().item(), 6)}
             for i, f in enumerate(rules.features)}
    fit = {"pairs": len(pairs), "accuracy": round((fitted > 0).double().mean().item(), 6),
           "loglik_before": round(loglik(m0), 6), "loglik_after": round(loglik(fitted), 6), "l2": l2}
    return w.tolist(), {"rates": rates, "fit": fit}
