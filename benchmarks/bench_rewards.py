"""The GRPO reward of the side-by-side benchmarks, in a file of its own so tether loads it by path
(`reward=python:benchmarks/bench_rewards.py:share_of_t3`) and TRL gets the same function object."""


def share_of_t3(prompts, completions, *args, **kwargs) -> list[float]:
    """The share of completion words equal to t3: cheap and deterministic, the same for both libraries."""
    return [c.split().count("t3") / max(1, len(c.split())) for c in completions]
