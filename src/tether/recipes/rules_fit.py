"""`tether rules fit RULES.yaml data=pairs.jsonl [base=SPEC]`: fit a rules file's weights on preference pairs.

    tether rules fit rules.yaml data=pairs.jsonl                        # the rules alone (no offset)
    tether rules fit rules.yaml data=pairs.jsonl base=rm:runs/rm        # on top of a reward model (RBR, OpenAI 2024)

The weights are the Bradley-Terry fit of rewards/rules.py (`fit_rule_weights`: Newton's method on the pairs'
log-likelihood, the base reward's margin a fixed offset, an L2 term); they are written back into the file with each
feature's rate among chosen and rejected responses and the fit's statistics, so `reward=rules:FILE` (or
`rm:DIR+rules:FILE` with the same base) uses them at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tether.config import ConfigError, above, opt


@dataclass
class RulesFitConfig:
    POSITIONAL: ClassVar[str] = "rules"  # `tether rules fit FILE` reads FILE as rules=FILE
    rules: str = opt("", "the rules file (YAML) to fit and write back (required)")
    data: str = opt("", "preference pairs {prompt, chosen, rejected} (JSONL, ...; required)")
    base: str = opt("", "reward spec whose margin is held fixed, e.g. rm:runs/rm (empty: none)")
    l2: float = opt(1e-2, "L2 penalty on the weights (keeps them finite when a rule separates the pairs)",
                    check=above(0))
    out: str = opt("", "write the fitted file here instead of over `rules`")

    def validate(self) -> None:
        if not self.rules:
            raise ConfigError("rules fit needs a rules file: `tether rules fit FILE.yaml data=pairs.jsonl`")
        if not self.data:
            raise ConfigError("rules fit needs data=pairs.jsonl")


def run(cfg: RulesFitConfig) -> dict:
    from pathlib import Path

    from tether import data as D
    from tether.rewards.rules_file import fit_rules, load_rules

    rules = load_rules(cfg.rules)
    pairs = list(D.load_records(cfg.data, "pairs"))
    base = None
    if cfg.base:
        from tether.rewards.spec import reward_from_spec

        base = reward_from_spec(cfg.base)
    weights, extra = fit_rules(rules, pairs, base, cfg.l2)
    if cfg.out:
        rules.path = Path(cfg.out)
    rules.write(weights, extra)
    return {"rules": str(rules.path), **{f"weight/{f.name}": w for f, w in zip(rules.features, weights)},
            **extra["fit"]}
