"""`tether bench` and the benchmark scripts: the command lines, the timing arithmetic, the table, and smoke runs of
benchmarks/gpu.py (every machine) and benchmarks/vs_trl.py (where TRL is installed) so they do not rot."""

import subprocess
import sys
from pathlib import Path

import pytest

from tether.bench import BenchConfig, command, run
from tether.config import ConfigError

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import vs_trl as V  # noqa: E402


def test_command_lines():
    script = str(BENCH / "vs_trl.py")
    assert command(BenchConfig()) == [sys.executable, script]
    assert command(BenchConfig(stages="dpo,grpo", repeats=5, threads=2, append=False)) == [
        sys.executable, script, "--stages", "dpo,grpo", "--repeats", "5", "--threads", "2", "--no-append"]
    assert command(BenchConfig(suite="gpu", stages="generate", smoke=True)) == [
        sys.executable, str(BENCH / "gpu.py"), "--parts", "generate", "--smoke"]
    assert command(BenchConfig(suite="gpu")) == [sys.executable, str(BENCH / "gpu.py"), "--append"]


def test_bad_suite_and_missing_checkout_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="key 'suite' must be one of"):
        BenchConfig(suite="mlperf").validate()
    with pytest.raises(FileNotFoundError, match="runs from a source checkout"):
        run(BenchConfig(benchmarks_dir=str(tmp_path)))


def test_step_time_is_the_median_gap_after_warmup_plus_amortised_extra():
    clock = V.StepClock()
    clock.stamps = [0.0, 1.0, 3.0, 4.0, 10.0]  # ends of steps 0..4: steps 1..4 took 1, 2, 1, 6 s
    assert clock.step_seconds(warmup=2) == 2.0  # steps 2..4: 2, 1, 6 -> median 2
    assert clock.step_seconds(warmup=1) == 1.5  # steps 1..4
    clock.extra = 0.25  # e.g. tether DPO's one reference pass spread over the steps
    assert clock.step_seconds(warmup=2) == 2.25
    with pytest.raises(RuntimeError, match="only 5 steps"):
        clock.step_seconds(warmup=5)


def test_tokens_per_step_and_table():
    s = V.Settings(batch=8, prompt_len=32, completion_len=64, grpo_prompts=2, group_size=8)
    assert [V.tokens_per_step(k, s) for k in V.STAGES] == [768, 1536, 1536, 1536]
    text = V.table({"dpo": {"tether": [300.0, 500.0, 400.0], "trl": [100.0, 200.0, 250.0]},
                    "sft": {"tether": [130.0], "trl": [100.0]}}, s)
    assert "| dpo | 400 (300-500) | 200 (100-250) | 2.00x |" in text  # the control only: no target column
    assert "| sft | 130 (130-130) | 100 (100-100) | 1.30x |" in text and "target" not in text
    # the headline: tether 290 over TRL-with-defaults 100 = 2.9x >= 2.0 (met); the control 290 / 58 = 5.00x
    both = V.table({"grpo": {"tether": [290.0, 280.0, 300.0], "trl-defaults": [100.0, 90.0, 120.0],
                             "trl": [58.0, 50.0, 60.0]}}, s)
    assert "| grpo | 290 (280-300) | 100 (90-120) | 2.90x | >= 2.0x (met) | 58 (50-60) | 5.00x |" in both
    low = V.table({"sft": {"tether": [140.0], "trl-defaults": [100.0]}}, s)
    assert "| sft | 140 (140-140) | 100 (100-100) | 1.40x | >= 1.5x (not met) |" in low


def test_vocab_memory_table_is_the_ratio_of_what_training_added():
    import vocab_memory as M  # benchmarks/vocab_memory.py

    found = {"dpo": {"tether": {"peak_mb": 900.0, "added_mb": 400.0},
                     "trl-defaults": {"peak_mb": 1700.0, "added_mb": 1200.0},
                     "trl": {"peak_mb": 2100.0, "added_mb": 1600.0}}}
    # 400 / 1200 = 0.33x, 400 / 1600 = 0.25x
    assert "| dpo | 900 (400) | 1,700 (1,200) | 2,100 (1,600) | 0.33x | 0.25x |" in M.table(found)


def test_benchmark_tokenizer_is_one_token_per_word_and_grpo_eos_is_outside_the_vocabulary():
    tok = V.word_tokenizer(16)
    assert tok("t3 t4 t15").input_ids == [3, 4, 15] and tok.eos_token_id == 1
    grpo = V.word_tokenizer(16, eos="<stop>")
    assert grpo.eos_token_id == 16 and grpo("t3 t4").input_ids == [3, 4]


def test_gpu_script_generation_smoke():
    out = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke", "--parts", "generate"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for backend in ("hf", "eager", "lean"):
        assert f"| generate {backend}, batch 4, 4 + 6 tokens |" in out.stdout
    assert " / hf |" in out.stdout


@pytest.mark.slow
def test_gpu_script_full_smoke():
    out = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| GRPO tether (auto), 1 prompts x 2, 4 + 6 |" in out.stdout and "| DPO tether, batch 2, 4 + 6 |" in out.stdout


@pytest.mark.slow
def test_vs_trl_smoke():
    pytest.importorskip("trl")
    out = subprocess.run([sys.executable, str(BENCH / "vs_trl.py"), "--smoke", "--no-append", "--no-trl-defaults",
                          "--no-memory"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for stage in V.STAGES:
        assert f"| {stage} |" in out.stdout


@pytest.mark.slow
def test_vocab_memory_smoke():
    pytest.importorskip("trl")
    out = subprocess.run([sys.executable, str(BENCH / "vocab_memory.py"), "--smoke", "--libs", "tether,trl"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| dpo |" in out.stdout and "| grpo |" in out.stdout and "vocabulary 2,048" in out.stdout


def test_packing_script_measures_the_run_cost():
    out = subprocess.run([sys.executable, str(BENCH / "packing.py"), "--smoke", "--run-cost"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RUN_COST" in out.stdout and "hidden 32: " in out.stdout


def test_packing_script_smoke_and_its_table():
    import packing as B  # benchmarks/packing.py

    rows = [{"shape": "s", "tokens": 10.0, "padded": 30.0, "rows": 20.0, "default": 15.0, "picked": "flat"}]
    assert "| s | 10 | 30.0 | 20.0 | 15.0 (flat) | 1.50x | 2.00x |" in B.table(rows, "h")
    out = subprocess.run([sys.executable, str(BENCH / "packing.py"), "--smoke"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for shape in B.SMOKE_SHAPES:
        assert f"| {shape} |" in out.stdout


def test_seed_table_markdown_by_cell():
    import seed_table as T  # benchmarks/seed_table.py

    from tether.acceptance import summarise

    cells = [{"figure": "dpo", "gain": g, "kl": k, "base_seed": b, "seed": s}
             for (b, s), (g, k) in {(0, 0): (1.2, 2.0), (0, 1): (0.9, 3.0), (1, 0): (1.1, 9.0)}.items()]
    text = T.markdown({"date": "d", "fingerprint": "f", "threads": 1, "cells": cells, "summary": summarise(cells)})
    assert "mean +0.067, std 0.153, worst -0.100; MISSED in some cell" in text
    assert "| 0 | +1.20 at KL 2.0 | +0.90 at KL 3.0 (missed) |" in text
    assert "| 1 | +1.10 at KL 9.0 (missed) |  |" in text  # over the KL bound; no seed 1 cell on build 1
