"""Which precision `mixed_precision=auto` trains in on this machine: bf16 autocast only where bf16 is native.

    precision = resolve_precision("auto")     # "bf16" or "no" (fp32), what accelerate's Accelerator is given

Why per machine: bf16 autocast pays only where the hardware multiplies bf16 natively. A CUDA device with bf16
(compute capability 8.0 on) does; so does a CPU with AVX512-BF16 or AMX (Intel Sapphire Rapids on, AMD Zen 4 on),
where oneDNN runs bf16 matrix products at about twice the fp32 rate. Elsewhere (an AVX2 CPU) a bf16 matrix product
is emulated by converting to fp32 and back, so autocast costs time and digits and fp32 is the faster choice.
Under autocast the master weights and AdamW's state stay fp32 (autocast casts per operation; nothing is stored in
bf16), and the LM head's log-probs that ratios and KL estimators use are computed in fp32 (lm_head.py).
"""

from __future__ import annotations

from contextlib import suppress
from functools import lru_cache
from pathlib import Path

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo names of native bf16 arithmetic


def native_bf16(cuda: bool, cuda_bf16: bool, cpu_flags: frozenset[str]) -> bool:
    """Whether bf16 arithmetic is native where this run computes: the CUDA device when there is one, else the CPU."""
    if cuda:
        return cuda_bf16
    return bool(BF16_CPU_FLAGS & cpu_flags)


def choose_precision(requested: str, cuda: bool, cuda_bf16: bool, cpu_flags: frozenset[str]) -> str:
    """accelerate's mixed_precision for a requested one: auto -> "bf16" where bf16 is native, else "no"; fp32 is
    "no"; bf16, fp16 and no as given (an explicit bf16 on an AVX2 CPU is the user's choice)."""
    if requested == "auto":
        return "bf16" if native_bf16(cuda, cuda_bf16, cpu_flags) else "no"
    return "no" if requested == "fp32" else requested


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none: not Linux)."""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def resolve_precision(requested: str) -> str:
    """`choose_precision` for this machine."""
    import torch

    cuda = torch.cuda.is_available()
    return choose_precision(requested, cuda, cuda and torch.cuda.is_bf16_supported(), cpu_flags())
