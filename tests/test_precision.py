"""mixed_precision=auto (precision.py): bf16 autocast only where bf16 arithmetic is native."""

import pytest

from tether.precision import choose_precision, cpu_flags, native_bf16, resolve_precision

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})  # an AMD EPYC Rome / Intel Skylake client: no bf16 arithmetic
ZEN4 = AVX2 | {"avx512f", "avx512_bf16"}
SPR = AVX2 | {"avx512f", "amx_bf16", "amx_tile"}


@pytest.mark.parametrize("cuda, cuda_bf16, flags, want", [
    (False, False, AVX2, "no"),  # this kind of CPU: fp32
    (False, False, ZEN4, "bf16"),  # AVX512-BF16
    (False, False, SPR, "bf16"),  # AMX
    (True, True, AVX2, "bf16"),  # an A100/H100: the device decides, not the host CPU
    (True, False, ZEN4, "no"),  # a V100 (no bf16) on a bf16 host: still fp32
])
def test_auto_is_bf16_only_where_native(cuda, cuda_bf16, flags, want):
    assert native_bf16(cuda, cuda_bf16, flags) == (want == "bf16")
    assert choose_precision("auto", cuda, cuda_bf16, flags) == want


def test_explicit_choices_are_kept_and_fp32_is_no():
    assert choose_precision("fp32", True, True, SPR) == "no"
    assert [choose_precision(p, False, False, AVX2) for p in ("no", "bf16", "fp16")] == ["no", "bf16", "fp16"]


def test_this_machine_reads_its_own_flags():
    flags = cpu_flags()
    assert resolve_precision("fp32") == "no"
    want = "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "no"
    import torch

    if not torch.cuda.is_available():
        assert resolve_precision("auto") == want
