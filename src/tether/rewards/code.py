"""Code verifier: run the program a completion writes against the record's tests in the sandbox.

    reward = FunctionReward(code_tests_reward)         # records carry {"prompt", "tests"}
    scores = code_tests_reward(prompts, completions, records)   # [1.0, 0.0, ...]

The reward is 1.0 when every test passes and the run ends cleanly, else 0.0 (the DeepSeek-R1 accuracy reward
for code); `partial=True` gives n_passed / n_total instead, still 0.0 for a run that timed out, ran out of
memory, crashed or was killed. Every score is clamped to [0, 1]. The verdicts are the parent's own: the program
never sees an expected value and can only send back data (`tether.rewards.sandbox`, which also has how tests
split into units and every isolation layer). Without bubblewrap installed code rewards raise SandboxUnavailable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tether.rewards.sandbox import SandboxLimits, SandboxResult, run_many

# ```python ... ``` (also ```py, ```python3); the closing fence may be missing when generation was cut off.
_PYTHON_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The program in a completion: the last ```python block, else the last ``` block, else the whole text.

    The last block because models usually draft first and give the final program at the end.
    """
    for pattern in (_PYTHON_FENCE, _ANY_FENCE):
        blocks = pattern.findall(completion)
        if blocks:
            return blocks[-1].strip("\n")
    return completion


def run_completions(
    completions: Sequence[str], records: Sequence[dict], limits: SandboxLimits | None = None, workers: int = 2
) -> list[SandboxResult | None]:
    """Sandbox results per completion (None where there is no code); raises on records without tests."""
    for i, record in enumerate(records):
        if "tests" not in record:
            raise ValueError(f"record {i} has no 'tests' field (code rewards need {{'prompt', 'tests'}})")
    codes = [extract_code(c) for c in completions]
    todo = [i for i, code in enumerate(codes) if code.strip()]
    done = run_many([(codes[i], records[i]["tests"]) for i in todo], limits, workers)
    results: list[SandboxResult | None] = [None] * len(codes)
    for i, r in zip(todo, done):
        results[i] = r
    return results


def code_tests_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    records: Sequence[dict],
    partial: bool = False,
    limits: SandboxLimits | None = None,
    workers: int = 2,
) -> list[float]:
    """1.0 if the completion's program passes all of `record["tests"]` (partial: the fraction), else 0.0."""
    return [score(r, partial) for r in run_completions(completions, records, limits, workers)]


def score(result: SandboxResult | None, partial: bool = False) -> float:
    """1.0 / 0.0 (partial: n_passed / n_total), 0.0 unless the run is ok; clamped to [0, 1] whatever came back."""
    if result is None or result.status != "ok" or result.n_total <= 0:
        return 0.0
    value = result.n_passed / result.n_total if partial else float(result.passed)
    return min(1.0, max(0.0, value))
