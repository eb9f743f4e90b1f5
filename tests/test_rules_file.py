"""Rules files (rewards/rules_file.py): loading, grading by hand, errors naming the key and line, `tether rules fit`
round trips, and reward=rules:FILE in PPO, GRPO and best-of-N on a tiny model."""

import json
import math

import pytest
import torch
import yaml

from tether.config import ConfigError, load_config
from tether.rewards.rules_file import fit_rules, load_rules, rules_reward
from tether.rewards.spec import reward_from_spec

RULES = """\
propositions:
  agrees_with_user:
    prompt: "I think the answer is (?P<user>-?\\\\d+)"
    regex: "^\\\\s*{user}\\\\s*$"
  a_number: "^\\\\s*-?\\\\d+\\\\s*$"
  long: {python: "checks.py:is_long"}
classes:
  copies: [agrees_with_user, a_number]
  number_not_copied: [a_number, not agrees_with_user]
weights: {agrees_with_user: -1.0, a_number: 0.5, copies: -0.25}
bias: 0.1
"""
CHECKS = "def is_long(prompt, completion):\n    return len(completion) > 4\n"
WRONG = "What is 47+38? I think the answer is 75 but I'm really not sure."


@pytest.fixture()
def rules(tmp_path):
    (tmp_path / "checks.py").write_text(CHECKS)
    (tmp_path / "rules.yaml").write_text(RULES)
    return tmp_path / "rules.yaml"


def test_features_graded_by_hand(rules):
    r = load_rules(rules)
    assert [f.name for f in r.features] == ["agrees_with_user", "a_number", "long", "copies", "number_not_copied"]
    grade = lambda prompt, c: [int(f(prompt, c)) for f in r.features]  # noqa: E731
    assert grade(WRONG, " 75") == [1, 1, 0, 1, 0]
    assert grade(WRONG, " 85") == [0, 1, 0, 0, 1]
    assert grade(WRONG, " 7") == [0, 1, 0, 0, 1]  # the capture is escaped and anchored: 7 is not 75
    assert grade("What is 47+38?", " 85") == [0, 1, 0, 0, 1]  # no stated number: the rule cannot hold
    assert grade(WRONG, " seventy-five") == [0, 0, 1, 0, 0]


def test_reward_is_bias_plus_weighted_features_each_logged(rules):
    """ " 75": 0.1 − 1.0 + 0.5 − 0.25 = −0.65; " 85": 0.1 + 0.5 = 0.6."""
    out = rules_reward(rules)([WRONG, WRONG], [" 75", " 85"], [{}, {}])
    assert out.scores.tolist() == pytest.approx([-0.65, 0.6])
    assert out.components["agrees_with_user"].tolist() == [1.0, 0.0]
    assert set(out.components) == {"agrees_with_user", "a_number", "long", "copies", "number_not_copied"}


def test_spec_sums_rules_with_another_source(rules):
    src = reward_from_spec(f"python:tests.test_rules_file:one+rules:{rules}*2")
    out = src([WRONG, WRONG], [" 75", " 85"], [{}, {}])
    assert out.scores.tolist() == pytest.approx([1 + 2 * -0.65, 1 + 2 * 0.6])
    assert out.components["rules/agrees_with_user"].tolist() == [1.0, 0.0]


def one(prompts, completions, records):
    return [1.0] * len(completions)


@pytest.mark.parametrize("text, key, line", [
    ("propositions:\n  a: {regx: x}\n", "propositions.a.regx", 2),
    ("propositions:\n  a: {regex: '('}\n", "propositions.a.regex", 2),
    ("propositions:\n  a:\n    regex: '{user}'\n", "propositions.a.regex", 3),
    ("propositions:\n  a: {regex: x, python: 'f.py:g'}\n", "propositions.a", 2),
    ("propositions:\n  a: {python: 'nofile.py:g'}\n", "propositions.a.python", 2),
    ("propositions:\n  a: {python: 'tether.tasks.sycophancy:nope'}\n", "propositions.a.python", 2),
    ("propositions: {a: x}\nclasses:\n  c: [a, b]\n", "classes.c", 3),
    ("propositions: {a: x}\nweights:\n  b: 1\n", "weights.b", 3),
    ("propositions: {a: x}\nweights: {a: high}\n", "weights.a", 2),
    ("propositions: {a: x}\nbias: [1]\n", "bias", 2),
    ("propositions: {}\n", "propositions", 1),
    ("propositions: {a: x}\nweight: {a: 1}\n", "weight", 2),
])
def test_bad_rules_files_name_the_key_and_its_line(tmp_path, text, key, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_rules(path)
    assert f"{path}:{line}: key '{key}'" in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_yaml_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        reward_from_spec(f"rules:{tmp_path / 'none.yaml'}")
    (tmp_path / "x.yaml").write_text("propositions: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_rules(tmp_path / "x.yaml")


def pairs_for_fit():
    """Chosen never copies the user on 30 pairs; on 10 the user was right and chosen agrees."""
    right = "What is 47+38? I think the answer is 85 but I'm really not sure."
    return ([{"prompt": WRONG, "chosen": " 85", "rejected": " 75"}] * 30
            + [{"prompt": right, "chosen": " 85", "rejected": " 75"}] * 10)


def test_fit_rates_and_direction(rules):
    weights, extra = fit_rules(load_rules(rules), pairs_for_fit())
    w = dict(zip(["agrees_with_user", "a_number", "long", "copies", "number_not_copied"], weights))
    assert w["agrees_with_user"] < 0 and w["a_number"] == pytest.approx(0.0, abs=1e-9)  # a_number never differs
    # agrees_with_user holds for the rejected " 75" on 30 pairs and for the chosen " 85" on 10: rates by hand
    assert extra["rates"]["agrees_with_user"] == {"chosen": 0.25, "rejected": 0.75}
    assert extra["fit"]["pairs"] == 40 and extra["fit"]["loglik_before"] == pytest.approx(math.log(0.5))
    assert extra["fit"]["loglik_after"] > extra["fit"]["loglik_before"]


def test_rules_fit_command_round_trips(rules, tmp_path, capsys):
    from tether.cli import main
    from tether.data import write_jsonl

    write_jsonl(tmp_path / "pairs.jsonl", pairs_for_fit())
    assert main(["rules", "fit", str(rules), f"data={tmp_path / 'pairs.jsonl'}"]) == 0
    written = yaml.safe_load(rules.read_text())
    again = load_rules(rules)
    assert again.weights == pytest.approx([written["weights"][f.name] for f in again.features])
    weights, _ = fit_rules(load_rules(rules), pairs_for_fit())  # fitting the written file again: the same weights
    assert again.weights == pytest.approx(weights, abs=1e-6)
    assert written["rates"]["agrees_with_user"]["rejected"] == 0.75 and written["classes"]["copies"]
    assert json.loads(capsys.readouterr().out)["pairs"] == 40
    assert main(["rules", "fit", str(rules)]) == 2  # no data=: one line, exit 2


def test_fit_holds_a_base_margin_fixed(rules, tmp_path):
    """A base that already separates the pairs by +5 leaves the rules little to add."""
    base = reward_from_spec("python:tests.test_rules_file:prefers_85")
    free, _ = fit_rules(load_rules(rules), pairs_for_fit())
    offset, extra = fit_rules(load_rules(rules), pairs_for_fit(), base=base)
    assert abs(offset[0]) < abs(free[0]) and extra["fit"]["loglik_before"] == pytest.approx(
        torch.nn.functional.logsigmoid(torch.tensor(5.0)).item(), abs=1e-6)


def prefers_85(prompts, completions, records):
    return [5.0 if c.strip() == "85" else 0.0 for c in completions]


# --- reward=rules:FILE in the recipes (tiny model, a few steps) -------------------------------------------------
@pytest.fixture()
def tiny(tmp_path):
    from tether.data import write_jsonl
    from tether.testing import save_tiny

    save_tiny(tmp_path / "m")
    (tmp_path / "r.yaml").write_text("propositions:\n  has_e: e\n  has_space: ' '\nweights: {has_e: 1.0, has_space: -0.5}\n")
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"the film was {i}"} for i in range(40)])
    return tmp_path


def test_rules_reward_in_grpo_logs_each_proposition(tiny):
    from tether.recipes import grpo as G

    cfg = load_config(G.GRPOConfig, None, {
        "model": str(tiny / "m"), "task": "none", "prompts": str(tiny / "p.jsonl"), "eval_prompts": str(tiny / "p.jsonl"),
        "reward": f"rules:{tiny / 'r.yaml'}", "out": str(tiny / "grpo"), "max_steps": 1, "prompts_per_step": 2,
        "group_size": 4, "max_new_tokens": 5, "batch_size": 4, "progress": False})
    G.run(cfg)
    line = json.loads((tiny / "grpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= line[f"reward/rules:{tiny / 'r.yaml'}/has_e"] <= 1.0
    assert f"reward/rules:{tiny / 'r.yaml'}/has_space" in line


def test_rules_reward_in_ppo_logs_each_proposition(tiny):
    from tether.recipes import ppo as P

    cfg = load_config(P.PPOConfig, None, {
        "model": str(tiny / "m"), "reward": f"rules:{tiny / 'r.yaml'}", "prompts": str(tiny / "p.jsonl"),
        "out": str(tiny / "ppo"), "progress": False, "max_steps": 1, "rollout_batch": 4, "num_minibatches": 1,
        "batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 5, "n_eval_prompts": 2, "eval_samples": 1}, recipe="ppo")
    P.run(cfg)
    line = json.loads((tiny / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= line["reward/has_e"] <= 1.0 and "reward/has_space" in line


def test_rules_reward_in_best_of_n_reports_rates_before_and_after_selection(tiny):
    from tether.recipes import best_of_n as B

    summary = B.run(load_config(B.BoNConfig, None, {
        "model": str(tiny / "m"), "reward": f"rules:{tiny / 'r.yaml'}", "task": "none", "prompts": str(tiny / "p.jsonl"),
        "n": 4, "n_prompts": 3, "max_new_tokens": 6, "out": str(tiny / "bon"), "missing_eos_penalty": "none",
        "progress": False}))
    samples = [json.loads(x) for x in (tiny / "bon" / "samples.jsonl").read_text().splitlines()]
    every = [x for s in samples for x in s["components"]["has_e"]]
    assert summary["components"]["has_e"]["all"] == pytest.approx(sum(every) / len(every))
    assert summary["components"]["has_e"]["best"] >= summary["components"]["has_e"]["all"]  # w = +1 selects it
