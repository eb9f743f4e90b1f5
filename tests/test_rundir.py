"""Run directories: one writer, one run, resume only of the same run, state files that survive a kill, a guard
that keeps only finite weights, strict JSON. Each case is a reproduction of a way the directory used to break."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tether import rundir
from tether.cli import main as cli_main
from tether.config import ConfigError, load_config
from tether.engine import Engine
from tether.recipes.sft import SFTConfig, run
from tether.testing import save_tiny


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir")
    save_tiny(root / "model", seed=0)
    with open(root / "demos.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": "the film was", "completion": ["good .", "bad .", "fine ."][i % 3]}) + "\n")
    return root


def config(workdir, out, **kw):
    base = {"model": str(workdir / "model"), "data": str(workdir / "demos.jsonl"), "out": str(out),
            "progress": False, "eval_fraction": 0.0, "lr": 3e-3, "lr_schedule": "constant", "batch_size": 4}
    return load_config(SFTConfig, None, {**base, **kw})


def losses(out) -> list[float]:
    return [json.loads(x)["loss"] for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_a_second_writer_is_refused_naming_the_holder(workdir, tmp_path):
    first = Engine(config(workdir, tmp_path / "r"), "sft")
    with pytest.raises(rundir.RunDirError, match=rf"in use by pid {os.getpid()} \(tether sft\)"):
        Engine(config(workdir, tmp_path / "r", overwrite=True), "sft")
    first.finish({})  # the run is over: the directory is free again
    Engine(config(workdir, tmp_path / "r", overwrite=True), "sft").finish({})


def test_an_earlier_run_is_refused_unless_resumed_or_overwritten(workdir, tmp_path):
    run(config(workdir, tmp_path / "r", max_steps=4, save_every=2))
    with pytest.raises(ConfigError, match=r"holds an earlier run \(run.json, config.yaml, summary.json, metrics.jsonl, "
                                          r"2 checkpoints\); resume=true continues it, overwrite=true replaces it"):
        run(config(workdir, tmp_path / "r", max_steps=2))
    run(config(workdir, tmp_path / "r", max_steps=2, overwrite=True))
    assert len(losses(tmp_path / "r")) == 2  # nothing of the 4-step run is left
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step-0000002"]


def test_resume_refuses_other_settings_and_data_unless_accepted(workdir, tmp_path):
    run(config(workdir, tmp_path / "r", max_steps=4, save_every=2))
    with pytest.raises(ConfigError, match=r"lr: 0.003 -> 0.001; max_steps: 4 -> 6.*resume_changed=lr,max_steps"):
        run(config(workdir, tmp_path / "r", max_steps=6, lr=1e-3, resume=True))
    changed = tmp_path / "other.jsonl"
    changed.write_text((workdir / "demos.jsonl").read_text().replace("good", "great"))
    with pytest.raises(ConfigError, match=r"data: .*demos.jsonl' -> .*other.jsonl'"):
        run(config(workdir, tmp_path / "r", max_steps=4, resume=True, data=str(changed)))
    engine = Engine(config(workdir, tmp_path / "r", max_steps=6, lr=1e-3, resume=True,
                           resume_changed="lr,max_steps"), "sft")
    assert engine.accepted_changes == ["lr", "max_steps"]
    engine.finish({})


def test_an_accepted_lr_is_the_lr_the_restored_optimizer_trains_at(workdir, tmp_path):
    run(config(workdir, tmp_path / "r", max_steps=4, save_every=2))
    (tmp_path / "r" / "checkpoints" / "step-0000004").rename(tmp_path / "r" / "checkpoints" / ".gone")
    run(config(workdir, tmp_path / "r", max_steps=4, save_every=2, resume=True, lr=1e-3, resume_changed="lr"))
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([3e-3, 3e-3, 1e-3, 1e-3])  # steps 2 and 3 ran after the resume, at the new lr


def test_a_torn_newest_checkpoint_falls_back_to_the_one_before(workdir, tmp_path):
    full = tmp_path / "full"
    run(config(workdir, full, max_steps=6, save_every=2, keep_checkpoints=3))
    out = tmp_path / "r"
    run(config(workdir, out, max_steps=6, save_every=2, keep_checkpoints=3))
    (out / "checkpoints" / "step-0000006" / "tether_state.json").write_text("")  # a kill at its first write
    (out / "checkpoints" / "step-0000004" / "tether_state.json").write_bytes(b"{\"next_")  # and a torn one
    run(config(workdir, out, max_steps=6, save_every=2, keep_checkpoints=3, resume=True))
    assert losses(out) == pytest.approx(losses(full), abs=1e-6)  # resumed from step 2: the same curve


def test_a_kill_while_a_checkpoint_is_written_leaves_the_earlier_ones(workdir, tmp_path, monkeypatch):
    from accelerate import Accelerator

    out = tmp_path / "r"
    real = Accelerator.save_state
    calls = []

    def dies_on_the_second(self, path, *a, **k):
        calls.append(path)
        real(self, path, *a, **k)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed after the files, before the checkpoint was complete

    monkeypatch.setattr(Accelerator, "save_state", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run(config(workdir, out, max_steps=4, save_every=1))
    monkeypatch.setattr(Accelerator, "save_state", real)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000001"]
    summary = run(config(workdir, out, max_steps=4, save_every=1, resume=True))
    assert summary["steps"] == 4 and len(losses(out)) == 4


def test_an_interrupted_state_file_write_keeps_the_old_file(tmp_path, monkeypatch):
    from tether import runfiles

    path = tmp_path / "summary.json"
    runfiles.write_atomic(path, "old")

    def killed(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runfiles.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        runfiles.write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.mark.parametrize("lr", ["1e30", "1e10"])
def test_a_non_finite_step_keeps_only_finite_weights_and_no_bad_checkpoint(workdir, tmp_path, lr, capsys):
    out = tmp_path / "r"
    code = cli_main(["sft", f"model={workdir / 'model'}", f"data={workdir / 'demos.jsonl'}", f"out={out}",
                     f"lr={lr}", "max_grad_norm=0", "max_steps=6", "save_every=1", "batch_size=4",
                     "eval_fraction=0", "progress=false", "lr_schedule=constant"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "stopped:" in err[0] and "at step" in err[0], err
    assert "model-last-good" in err[0]
    from transformers import AutoModelForCausalLM

    good = AutoModelForCausalLM.from_pretrained(out / "model-last-good")
    assert all(torch.isfinite(p).all() for p in good.parameters())
    for ckpt in (out / "checkpoints").glob("step-*"):  # what a checkpoint holds is finite too
        from safetensors.torch import load_file

        weights = load_file(next(ckpt.glob("*.safetensors")))
        assert all(torch.isfinite(t).all() for t in weights.values()), ckpt
    summary = json.loads((out / "summary.json").read_text())
    assert "at step" in summary["error"]


def test_keep_checkpoints_zero_is_refused():
    with pytest.raises(ConfigError, match="key 'keep_checkpoints' must be >= 1"):
        load_config(SFTConfig, None, {"model": "m", "data": "d.jsonl", "keep_checkpoints": 0})


def test_a_read_only_run_directory_is_one_line(workdir, tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "ro"
    real_open = open

    def read_only(path, *a, **k):  # what a read-only mount answers (root ignores chmod, so it is injected)
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", read_only)
    code = cli_main(["sft", f"model={workdir / 'model'}", f"data={workdir / 'demos.jsonl'}", f"out={out}",
                     "max_steps=1", "progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"tether sft: cannot write {out / '.lock'}: Read-only file system"]


def test_two_processes_on_one_directory(workdir, tmp_path):
    """A second `tether sft` into a directory a running one holds exits 2 at once, naming the first one's pid."""
    import subprocess
    import sys
    import time

    out = tmp_path / "r"
    args = [sys.executable, "-m", "tether.cli", "sft", f"model={workdir / 'model'}",
            f"data={workdir / 'demos.jsonl'}", f"out={out}", "progress=false", "eval_fraction=0", "batch_size=4"]
    first = subprocess.Popen([*args, "max_steps=100000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:  # the first run is training
            time.sleep(0.2)
        second = subprocess.run([*args, "max_steps=2", "overwrite=true"], capture_output=True, text=True,
                                timeout=120)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert f"in use by pid {first.pid} (tether sft)" in second.stderr.strip().splitlines()[-1]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines[:-1]] == list(range(len(lines) - 1))  # one run's lines only


def test_a_full_disk_is_one_line(workdir, tmp_path, capsys, monkeypatch):
    import errno

    from tether import runfiles

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r" / "run.json"))

    monkeypatch.setattr(runfiles.tempfile, "mkstemp", full)
    code = cli_main(["sft", f"model={workdir / 'model'}", f"data={workdir / 'demos.jsonl'}", f"out={tmp_path / 'r'}",
                     "max_steps=1", "progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"tether sft: cannot write {tmp_path / 'r' / 'run.json'}: No space left on device"]


def test_summary_and_metrics_are_strict_json(tmp_path):
    from tether.engine import MetricsLogger, with_undefined_noted
    from tether.runfiles import strict_json

    text = strict_json(with_undefined_noted({"accuracy_start": math.nan, "loss": 1.5, "best": math.inf}))
    assert json.loads(text) == {"accuracy_start": None, "loss": 1.5, "best": None,
                                "undefined": {"accuracy_start": "nan: not defined for this run",
                                              "best": "inf: not defined for this run"}}
    logger = MetricsLogger(tmp_path)
    logger.write(0, {"kl": math.nan, "loss": 0.5})
    logger.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and json.loads(line) == {"step": 0, "kl": None, "loss": 0.5}


def test_run_json_records_who_ran_it(workdir, tmp_path):
    run(config(workdir, tmp_path / "r", max_steps=1))
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert manifest["world_size"] == 1 and manifest["versions"]["torch"] and manifest["versions"]["transformers"]
    assert manifest["git_commit"] is None or len(manifest["git_commit"].split("+")[0]) == 40
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["world_size"] == 1


def test_a_second_run_in_one_process_may_use_another_precision(workdir, tmp_path):
    run(config(workdir, tmp_path / "a", max_steps=1, mixed_precision="no"))
    summary = run(config(workdir, tmp_path / "b", max_steps=1, mixed_precision="bf16"))
    assert math.isfinite(summary["train_loss"])


def test_accelerate_launch_asking_for_more_processes_than_started_fails_loudly(monkeypatch, tmp_path):
    from tether import engine

    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"\0".join([b"/venv/bin/python", b"/venv/bin/accelerate", b"launch", b"--cpu",
                                     b"--num_processes", b"2", b"-m", b"tether.cli"]) + b"\0")
    real = engine.Path
    monkeypatch.setattr(engine, "Path", lambda p: real(cmdline) if str(p).startswith("/proc/") else real(p))
    with pytest.raises(ConfigError, match=r"asked for 2 processes and started 1.*torchrun --nproc_per_node 2"):
        engine.check_launch(1)
    engine.check_launch(2)  # as many as asked: fine


def test_trackers_log_under_trls_names_and_wandb_runs_offline(workdir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "r"
    run(config(workdir, out, max_steps=2, report_to="tensorboard,wandb"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/grad_norm", "train/lr"} <= set(events.Tags()["scalars"])
    offline = list((out / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))  # the run's own file, written offline
    run(config(workdir, tmp_path / "quiet", max_steps=1, report_to="none"))
    assert not (tmp_path / "quiet" / "tensorboard").exists()


def test_a_missing_tracker_library_is_an_error_before_anything_runs(workdir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"report_to=mlflow needs the mlflow package \(pip install mlflow\)"):
        run(config(workdir, tmp_path / "r", max_steps=1, report_to="mlflow"))
    assert not (tmp_path / "r").exists()


def test_every_saved_model_has_a_card_with_the_runs_figures(workdir, tmp_path):
    summary = run(config(workdir, tmp_path / "r", max_steps=2))
    card = (tmp_path / "r" / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- tether\n- sft\n---")
    assert "| max_steps | `2` |" in card and f"| train_loss | {summary['train_loss']:.4g} |" in card
