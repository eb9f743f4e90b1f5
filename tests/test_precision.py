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


def test_the_reference_runs_in_the_policys_precision():
    """A frozen reference under bf16 autocast gives the policy's own bf16 log-probs to the last digit (KL 0 at step
    0), not fp32's: the difference fp32 vs bf16 is the rounding a mismatched reference would add to every KL."""
    import torch

    from tether.forward import response_outputs
    from tether.reference import ReferencePolicy
    from tether.testing import tiny_causal_lm, tiny_tokenizer
    from tether.wrappers import autocast_to, hf_model

    tok = tiny_tokenizer()
    policy = tiny_causal_lm(tok).eval()
    seqs = torch.tensor([tok("the film was good film . very")["input_ids"]] * 2)
    mask = torch.ones_like(seqs)
    with torch.no_grad(), autocast_to(torch.bfloat16, "cpu"):  # the prepared policy's forward under bf16
        policy_lp = response_outputs(policy, seqs, mask, 3).logprobs
    reference = ReferencePolicy(policy, dtype=torch.bfloat16)
    assert hf_model(reference.model) is not policy and hf_model(reference.model).config is not None
    assert torch.equal(reference.logprobs(seqs, mask, 3), policy_lp)
    fp32 = ReferencePolicy(policy).logprobs(seqs, mask, 3)
    assert (fp32 - policy_lp).abs().max() > 1e-4  # the mismatch the shared precision removes


def test_a_reward_model_trained_in_bf16_is_normalised_in_fp32(tmp_path):
    """Its consumers load it in fp32, so mean 0 / std 1 on the reference set hold there, not only under autocast."""
    from tether import data as D
    from tether.config import load_config
    from tether.recipes.reward import RewardConfig, run
    from tether.rewards.learned import LearnedReward
    from tether.testing import save_tiny

    base = save_tiny(tmp_path / "base")
    pairs = [{"prompt": "the film was", "chosen": "good ." * (1 + i % 3), "rejected": "bad and dull ." * (1 + i % 2)}
             for i in range(24)]
    demos = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    D.write_jsonl(tmp_path / "pairs.jsonl", pairs)
    D.write_jsonl(tmp_path / "demos.jsonl", demos)
    run(load_config(RewardConfig, None, [f"model={base}", f"data={tmp_path / 'pairs.jsonl'}", "progress=false",
                                         f"normalize_data={tmp_path / 'demos.jsonl'}", "max_steps=3",
                                         "mixed_precision=bf16", f"out={tmp_path / 'rm'}"]))
    scores = LearnedReward(tmp_path / "rm" / "model", device="cpu")([d["prompt"] for d in demos],
                                                                   [d["completion"] for d in demos], demos).scores
    assert abs(scores.mean().item()) < 1e-4  # mean 0 (normalize_scale=false: no std target)
