"""Math verifier: answer extraction precedence, exact/numeric/sympy comparison, and garbage scoring 0."""

import random
import time
from fractions import Fraction

import pytest

from tether.rewards import FunctionReward
from tether.rewards.math import (
    answers_match,
    extract_answer,
    math_accuracy,
    normalize_answer,
    parse_number,
    sympy_available,
    sympy_equivalent,
    to_sympy_syntax,
)

needs_sympy = pytest.mark.skipif(not sympy_available(), reason="sympy not installed")

# --- extraction ---------------------------------------------------------------------------------------------


def test_answer_tag_wins_over_boxed_and_answer_line():
    text = "<think>maybe \\boxed{3}</think><answer>4</answer>\nAnswer: 5"
    assert extract_answer(text) == "4"


def test_last_answer_tag_and_boxed_inside_tag():
    assert extract_answer("<answer>1</answer> wait <answer> 2 </answer>") == "2"
    assert extract_answer("<answer>so it is \\boxed{\\frac{1}{2}}.</answer>") == "\\frac{1}{2}"


def test_boxed_with_nested_braces_wins_over_answer_line():
    text = "First \\boxed{1}, then \\boxed{\\frac{\\sqrt{2}}{2}}\nAnswer: 7"
    assert extract_answer(text) == "\\frac{\\sqrt{2}}{2}"
    assert extract_answer("\\fbox{12}") == "12"


def test_trailing_answer_line_forms():
    assert extract_answer("2 + 2 = 4\nAnswer: 4") == "4"
    assert extract_answer("work\n**Final Answer:** 1,000\n\n") == "1,000"
    assert extract_answer("Answer: 4\nbut then more text") is None  # only the last non-empty line counts


def test_no_answer_found():
    for text in ["the answer is 5", "", "<answer></answer>", "<answer>5", "\\boxed{5", "Answer:"]:
        assert extract_answer(text) is None, text


# --- normalisation and numbers ------------------------------------------------------------------------------


def test_normalize_strips_wrappers_and_spacing():
    assert normalize_answer("$\\boxed{ 3 + x }$") == "3+x"
    assert normalize_answer("\\left( 1 , 2 \\right)") == "(1,2)"
    assert normalize_answer("5 \\text{ cm}.") == "5 cm"
    assert normalize_answer("90^\\circ") == "90"
    assert normalize_answer("\\dfrac{1}{2}") == "\\frac{1}{2}"


@pytest.mark.parametrize(
    "text,value",
    [("1/2", Fraction(1, 2)), ("0.5", Fraction(1, 2)), ("2/4", Fraction(1, 2)),
     ("\\frac{1}{2}", Fraction(1, 2)), ("\\frac12", Fraction(1, 2)), ("-\\frac{3}{4}", Fraction(-3, 4)),
     ("\\dfrac{-1}{2}", Fraction(-1, 2)), ("1,000", Fraction(1000)), ("1,234,567.5", Fraction(2469135, 2)),
     ("007", Fraction(7)), ("+5", Fraction(5)), ("-0.50", Fraction(-1, 2)), (" 42 ", Fraction(42)),
     ("50%", Fraction(50)), ("1e3", Fraction(1000)), (".25", Fraction(1, 4)), ("$12$", Fraction(12))],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["1,2", "12,34", "1/0", "x", "1e999999999", "9" * 5000, "1.2.3", "--1", ""])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


def test_answers_match_exact_and_numeric():
    assert answers_match("1/2", "0.5") and answers_match("2/4", "\\frac{1}{2}")
    assert answers_match("1,000", "1000")
    assert answers_match("007", "7") and answers_match("+5", "5") and answers_match("-0.5", "-1/2")
    assert answers_match("(1, 2)", "(1,2)", use_sympy=False)  # equal text after normalisation
    assert not answers_match("0.333", "1/3") and not answers_match("1,2", "12", use_sympy=False)
    assert not answers_match(None, "1") and not answers_match("", "")
    assert not answers_match("5", "-5") and not answers_match("3", "2")


# --- sympy --------------------------------------------------------------------------------------------------


def test_sympy_syntax_whitelist():
    assert to_sympy_syntax("x^2-1") == "x^2-1"
    assert to_sympy_syntax("\\frac{\\sqrt{2}}{2}") == "((sqrt(2))/(2))"
    bad_inputs = ["__import__('os')", "exec(chr(49))", "x.real", "lambda:1", "a[0]", "\\unknown{1}", "'s'"]
    for bad in bad_inputs + ["1;2"]:
        assert to_sympy_syntax(bad) is None, bad


@needs_sympy
def test_sympy_equivalence():
    assert answers_match("x^2 - 1", "(x-1)(x+1)")
    assert answers_match("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")
    assert answers_match("2\\pi", "\\pi \\cdot 2")
    assert answers_match("\\sqrt[3]{8}", "2")
    assert not answers_match("x^2", "2x")
    assert sympy_equivalent("exec(chr(49))", "1") is None  # never parsed


@needs_sympy
def test_sympy_hang_is_cut_off_and_worker_recovers():
    start = time.monotonic()
    assert sympy_equivalent("9^9^9^9", "1", timeout=1.0) is None
    assert time.monotonic() - start < 5.0
    assert sympy_equivalent("x+x", "2x", timeout=10.0) is True  # a fresh worker answers afterwards


# --- the reward ---------------------------------------------------------------------------------------------


def test_math_accuracy_scores():
    completions = ["<think>7*6</think><answer>42</answer>", "\\boxed{42.0}", "Answer: 41", "forty-two", ""]
    records = [{"prompt": "p", "answer": 42}] * 5
    assert math_accuracy(["p"] * 5, completions, records) == [1.0, 1.0, 0.0, 0.0, 0.0]
    out = FunctionReward(math_accuracy)(["p"] * 5, completions, records)
    assert out.scores.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0] and "math_accuracy" in out.components


def test_math_accuracy_missing_answer_field_raises():
    with pytest.raises(ValueError, match="'answer'"):
        math_accuracy(["p"], ["<answer>1</answer>"], [{"prompt": "p"}])


def test_garbage_scores_zero_without_exceptions():
    rng = random.Random(0)
    alphabet = list("0123456789{}\\$^_()[]/.,+-*!<>= abcxyz")
    alphabet += ["\\boxed{", "\\frac", "<answer>", "</answer>", "\\sqrt", "Answer:", "\n", "\\text{"]
    completions = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(200)]
    # inputs that make naive brace matching or backtracking regexes quadratic (minutes, not milliseconds)
    completions += ["{" * 10000, "\\boxed{" * 20000, "<answer>" * 20000, "9" * 20000 + "x",
                    "Answer:" + " " * 20000 + "x" + " " * 20000 + "!", "<answer>" + "9" * 10000 + "</answer>",
                    "\x00\xff\ud800"]
    n = len(completions)
    start = time.monotonic()
    scores = math_accuracy(["p"] * n, completions, [{"prompt": "p", "answer": "17/3"}] * n, use_sympy=False)
    assert scores == [0.0] * len(completions)
    assert time.monotonic() - start < 10.0
