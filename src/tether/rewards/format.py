"""Format rewards: DeepSeek-R1's `<think>..</think><answer>..</answer>` layout; DAPO's soft overlong penalty.

    FunctionReward(think_answer_format)           # 1.0 when the completion is exactly <think>..<answer>..
    FunctionReward(think_answer_format_lenient)   # 1.0 when such a pair appears anywhere
    soft_overlong_penalty(lengths, max_len=20480, cache_len=4096)    # (B,) penalties in [-1, 0]

Strict: the whole completion (surrounding whitespace ignored) is one think block followed by one answer block,
separated only by whitespace, each tag exactly once and both blocks non-empty. Lenient: some
`<think>...</think>` is followed (after anything) by some `<answer>...</answer>`. Strict is what R1-style
training asks for; lenient is a softer shaping signal early on, when the strict one is almost always 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

_STRICT = re.compile(r"\s*<think>(.+)</think>\s*<answer>(.+)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def is_think_answer(completion: str, strict: bool = True) -> bool:
    """Does `completion` follow the think/answer layout (strict or lenient, see the module docstring)?

    Plain string scans and a regex run only once each tag is known to occur once: the obvious lazy regexes
    are quadratic on completions that repeat a tag thousands of times.
    """
    if not strict:
        pos = 0
        for tag in _TAGS:  # the earliest occurrence of each tag, in order, is the best witness
            pos = completion.find(tag, pos)
            if pos < 0:
                return False
            pos += len(tag)
        return True
    if any(completion.count(tag) != 1 for tag in _TAGS):
        return False
    m = _STRICT.fullmatch(completion)
    return m is not None and all(part.strip() for part in m.groups())


def think_answer_format(
    prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict]
) -> list[float]:
    """1.0 per completion in the strict think/answer layout, else 0.0."""
    return [float(is_think_answer(c, strict=True)) for c in completions]


def think_answer_format_lenient(
    prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict]
) -> list[float]:
    """1.0 per completion that contains a think block followed by an answer block, else 0.0."""
    return [float(is_think_answer(c, strict=False)) for c in completions]


def soft_overlong_penalty(
    lengths: torch.Tensor | Sequence[int], max_len: int, cache_len: int
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, §3.4), added to the task reward.

        R(y) = 0                              if |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
             = -1                             if |y| > L_max

    The middle piece falls linearly from 0 to -1 over the last `cache_len` tokens: the penalty is continuous.

    Args: lengths (B,) response lengths in tokens; max_len L_max; cache_len L_cache, 0 < L_cache <= L_max.
    Returns: (B,) float32 penalties in [-1, 0].
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    lengths = torch.as_tensor(lengths, dtype=torch.float32)  # (B,)
    expected = max_len - cache_len
    ramp = (expected - lengths) / cache_len
    penalty = torch.where(lengths <= expected, torch.zeros_like(lengths), ramp)
    return torch.where(lengths > max_len, torch.full_like(lengths, -1.0), penalty)
