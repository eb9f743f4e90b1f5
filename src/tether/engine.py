"""The training engine: the machinery every recipe shares, once.

A recipe reads top to bottom and calls the engine for everything that is not its algorithm:

    engine = Engine(cfg, command="sft")                 # run dir, config.yaml, seeds, accelerate, metrics
    model, opt, sched = engine.setup(model, total_steps)
    start = engine.resume()                             # 0, or the step after the last checkpoint
    for step in range(start, total_steps):
        for micro in engine.micro_batches(step):        # this rank's share of the global batch
            loss = ...
            engine.backward(loss, step)                 # NaN/inf check, no_sync while accumulating
        stats = engine.optimizer_step()                 # clip, step, schedule, zero_grad
        engine.log(step, {...})                         # metrics.jsonl + TensorBoard + progress bar
        engine.maybe_checkpoint(step)                   # model, optimizer, scheduler, RNG, data position
    engine.save_model(model, tokenizer)                 # run_dir/model: a normal HF directory
    engine.finish({...})                                # summary.json

Exactness: the global batch of step s is a fixed slice of a seeded stream of epoch permutations, split into
`world_size * grad_accum` micro-batches (rank r takes micro-batches r*accum .. r*accum+accum-1). Losses are normalised
by a count over the *global* batch (`engine.all_sum`) and scaled by the world size before DDP averages gradients,
so 1 process x 8 accumulation == 8 micro-batches anywhere == 2 processes x 4. Resume restores model, optimizer,
scheduler and RNG states and recomputes the data stream, so an interrupted run continues the same loss curve.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from tether import rundir, trackers
from tether.config import ConfigError, above, at_least, between, one_of, opt
from tether.model_card import write_card
from tether.precision import resolve_precision
from tether.runfiles import strict_json, write_atomic

log = logging.getLogger(__name__)


@dataclass
class Fields:
    """A group of config keys; a recipe's config is one flat dataclass composed of the groups whose keys it reads,
    and each group checks its own keys in `validate` (cooperatively, through super())."""

    def validate(self) -> None:
        pass


@dataclass
class RunFields(Fields):
    out: str = opt("", "run directory (default runs/<command>-<timestamp>); one run per directory (README)")
    seed: int = opt(0, "random seed; process r uses seed + r*100003", check=at_least(0))
    progress: bool = opt(True, "show a progress bar")


@dataclass
class OptimizerFields(Fields):
    lr: float = opt(1e-4, "peak learning rate (AdamW)", check=above(0))
    weight_decay: float = opt(0.0, "AdamW weight decay", check=at_least(0))
    adam_eps: float = opt(1e-8, "AdamW epsilon (N+ PPO uses 1e-5)", check=above(0))
    lr_schedule: str = opt("linear", "learning-rate schedule after warmup", check=one_of("constant", "linear", "cosine"))
    warmup_steps: int = opt(0, "linear warmup steps", check=at_least(0))
    min_lr_ratio: float = opt(0.0, "final lr as a fraction of the peak (InstructGPT RM: cosine to 0.1)",
                              check=between(0, 1))
    max_grad_norm: float = opt(1.0, "gradient clipping by global norm (0 = off)", check=at_least(0))
    guard_updates: bool = opt(True, "check the gradient norm and the updated weights every step, keeping a copy of "
                                    "the trainable weights to roll a non-finite step back (memory: one such copy)")


@dataclass
class BatchFields(Fields):
    """Steps over a data set: `batch_size` examples per micro-batch, `grad_accum` micro-batches per step."""

    batch_size: int = opt(8, "micro-batch size per process", check=at_least(1))
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", check=at_least(1))
    epochs: float = opt(1.0, "passes over the training data (ignored when max_steps > 0)", check=above(0))
    max_steps: int = opt(0, "optimizer steps to run (0 = from epochs)", check=at_least(0))


@dataclass
class CheckpointFields(Fields):
    log_every: int = opt(1, "log metrics every N steps", check=at_least(1))
    save_every: int = opt(0, "checkpoint every N steps (0 = only at the end)", check=at_least(0))
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep (the newest always)", check=at_least(1))
    resume: bool = opt(False, "continue the run in `out` from its newest complete checkpoint (same settings only)")
    report_to: list[str] = opt(["tensorboard"], "where metrics go besides metrics.jsonl (TRL's names: train/, eval/)",
                               check=one_of(*trackers.NAMES))
    resume_changed: list[str] = opt([], "resume: keys whose new value is accepted though the run used another")
    overwrite: bool = opt(False, "replace the earlier run in `out` (its files are deleted first)")

    def validate(self) -> None:
        super().validate()
        if self.resume and not getattr(self, "out", ""):
            raise ConfigError("key 'resume' needs out=DIR naming the run to continue")
        if self.resume and self.overwrite:
            raise ConfigError("keys 'resume' and 'overwrite' exclude each other: continue the run or replace it")


@dataclass
class ModelFields(Fields):
    mixed_precision: str = opt("auto", "auto: bf16 autocast where bf16 is native (CUDA with bf16, a CPU with "
                                       "AVX512-BF16 or AMX), else fp32; fp32 (= no), bf16, fp16",
                               check=one_of("no", "fp32", "bf16", "fp16", "auto"))
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    padding_free: bool = opt(True, "bin-pack each micro-batch's rows into fewer rows and store a prompt shared by "
                                   "several rows once, so no forward is spent on pads (same loss: packing.py)")
    lora_r: int = opt(0, "LoRA rank (0 = full fine-tuning)", check=at_least(0))
    lora_alpha: float = opt(16.0, "LoRA alpha", check=above(0))
    lora_dropout: float = opt(0.0, "LoRA dropout", check=between(0, 1, high_open=True))
    lora_target_modules: str = opt("all-linear", "LoRA target modules: all-linear or a comma list of names")
    merge_lora: bool = opt(True, "merge LoRA adapters into the saved model")
    train_shard: str = opt("ddp", "how processes hold the model: ddp (a full copy each) or fsdp2 (parameters, "
                                  "gradients and AdamW state sharded per decoder layer: distributed/fsdp.py)",
                           check=one_of("ddp", "fsdp2"))
    fsdp_cpu_offload: bool = opt(False, "fsdp2: keep the sharded parameters, gradients and optimizer state in CPU "
                                        "memory between uses")

    def validate(self) -> None:
        super().validate()
        if self.train_shard == "fsdp2" and self.lora_r > 0:
            raise ConfigError("key 'train_shard': fsdp2 shards full fine-tuning only (lora_r=0); LoRA trains with ddp")


@dataclass
class TrainConfig(ModelFields, CheckpointFields, BatchFields, OptimizerFields, RunFields):
    """Every group: the config of a recipe that steps over a data set (SFT, RM, DPO). PPO and GRPO step over
    rollouts and compose the groups without `BatchFields` (they have no `grad_accum`)."""


class NonFiniteError(RuntimeError):
    """The loss, the gradient norm or an updated weight became NaN or inf; the run stopped after saving the last
    good weights."""


# --- learning-rate schedules: multiplier of the peak lr at `step` --------------------------------------------------
def _constant(step: int, total: int, warmup: int, floor: float) -> float:
    return 1.0


def _linear(step: int, total: int, warmup: int, floor: float) -> float:
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * max(0.0, 1.0 - progress)


def _cosine(step: int, total: int, warmup: int, floor: float) -> float:
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULES = {"constant": _constant, "linear": _linear, "cosine": _cosine}


def lr_multiplier(step: int, total: int, warmup: int, schedule: str, floor: float = 0.0) -> float:
    """Linear warmup over `warmup` steps, then the named decay from 1 to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return SCHEDULES[schedule](step, total, warmup, floor)


def step_indices(step: int, global_batch: int, n_examples: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: a slice of concatenated seeded epoch permutations."""
    start, out = step * global_batch, []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n_examples)
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[offset : offset + global_batch - len(out)].tolist())
    return out


def steps_for(n_examples: int, global_batch: int, epochs: float, max_steps: int) -> int:
    return max_steps if max_steps > 0 else max(1, math.ceil(epochs * n_examples / global_batch))


class MetricsLogger:
    """metrics.jsonl (one JSON object per logged step) and the trackers of `report_to` (trackers.py), on the main
    process only."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, trackers: list | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():  # drop lines past the checkpoint: same file as uninterrupted
            kept = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) < resume_step]
            write_atomic(self.path, "".join(ln + "\n" for ln in kept))
        self.file = self.path.open("a")
        self.trackers = trackers or []

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(strict_json({"step": step, **metrics}) + "\n")
        self.file.flush()
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def close(self) -> None:
        self.file.close()
        for tracker in self.trackers:
            tracker.close()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; a torn last line (a kill mid-write) counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _to_float(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().float().mean().item()
    return value


def fused_adamw_ok(params) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters (floating point, on a CPU or a CUDA device): the
    same update as the per-tensor loop to rounding, one kernel for all parameters (measured: 2.2 ms against 14.6 ms
    a step for a 4.3M-parameter model on 2 CPU cores)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


class Engine:
    """Run directory, accelerate, optimizer + schedule, accumulation, checkpoints, metrics: shared by all recipes."""

    def __init__(self, cfg, command: str, accelerator: Accelerator | None = None):
        self.cfg, self.command = cfg, command
        precision = resolve_precision(cfg.mixed_precision)  # auto: bf16 only where native (precision.py)
        # cpu=True without CUDA: multi-process CPU runs (torchrun, gloo) need it to form a process group
        self.accelerator = accelerator or new_accelerator(precision)
        # what the prepared model's forward autocasts to; frozen references run in it too (reference.py)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision)
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        check_launch(self.world_size)
        trackers.check(getattr(cfg, "report_to", []))  # a missing library is an error before anything runs
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.run_dir = self._resolve_run_dir(cfg.out, command)
        cfg.out = str(self.run_dir)
        self.seed = cfg.seed + self.rank * 100_003  # docs/reference.md §PPO: seed per process
        torch.manual_seed(self.seed)
        self.checkpoint_objects: list[Any] = []
        self.model = self.optimizer = self.scheduler = None
        self.sharded = False  # train_shard=fsdp2, set by setup
        self.total_steps, self.n_examples, self.resumed_from = 0, 0, 0
        self._t0, self._tokens, self._window = time.time(), 0, (time.time(), 0)
        self._progress = None
        self.logger: MetricsLogger | None = None
        self._lock, self.accepted_changes, self._snapshot, self._saved_models = None, [], None, []
        refused = [None]
        if self.is_main:  # one writer per directory, one run per directory (rundir.py)
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._lock = rundir.hold(self.run_dir, command)
                self.accepted_changes = rundir.prepare(self.run_dir, cfg, command, self.world_size)
            except rundir.RunDirError as e:
                refused = [str(e)]
        if self.world_size > 1:
            broadcast_object_list(refused)  # every process stops, not only the main one
        if refused[0] is not None:
            raise rundir.RunDirError(refused[0])

    def _resolve_run_dir(self, out: str, command: str) -> Path:
        name = [out or f"runs/{command}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if self.world_size > 1:
            broadcast_object_list(name)  # every process writes into the main process's directory
        return Path(name[0])

    # --- setup ------------------------------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, total_steps: int, n_examples: int = 0, extra_params=None):
        """AdamW over trainable parameters, warmup + decay schedule, the model wrapped for DDP when distributed."""
        cfg = self.cfg
        self.total_steps, self.n_examples = total_steps, n_examples
        if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.sharded = getattr(cfg, "train_shard", "ddp") == "fsdp2" and self.world_size > 1  # 1 process: whole
        if self.sharded:  # before the optimizer: it must hold the sharded parameters
            from tether.distributed import fsdp

            if self.command not in fsdp.COMMANDS:
                raise ConfigError(f"key 'train_shard': fsdp2 runs {', '.join(fsdp.COMMANDS)} (tested there); "
                                  f"{self.command} trains with ddp for now")

            model = fsdp.shard(model, self.accelerator.mixed_precision, cfg.fsdp_cpu_offload)
        params = [p for p in model.parameters() if p.requires_grad] + list(extra_params or [])
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                      fused=fused_adamw_ok(params))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_multiplier(s, total_steps, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio),
        )
        if not self.sharded:  # FSDP2 needs no wrapper; its checkpoints are written by torch.distributed.checkpoint
            model, optimizer = self.accelerator.prepare(model, optimizer)
        self.accelerator.register_for_checkpointing(scheduler)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        return model, optimizer, scheduler

    def full_weights(self):
        """A context in which the model holds its whole weights on every rank (FSDP2: one all-gather; DDP: a no-op),
        for sampling: ranks may then run different numbers of forwards without waiting for each other."""
        if not self.sharded:
            return nullcontext()
        from tether.distributed.fsdp import gathered

        return gathered(self.model)

    def register(self, obj: Any) -> None:
        """Checkpoint this object too (anything with state_dict/load_state_dict: a KL controller, a value model...)."""
        self.accelerator.register_for_checkpointing(obj)

    # --- data -------------------------------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        """Examples per optimizer step over all processes (a config without `grad_accum` accumulates its own way)."""
        return self.cfg.batch_size * getattr(self.cfg, "grad_accum", 1) * self.world_size

    def micro_batches(self, step: int, n_examples: int | None = None) -> list[list[int]]:
        """This process's micro-batches (lists of example indices) for optimizer step `step` (`BatchFields`)."""
        idx = step_indices(step, self.global_batch, n_examples or self.n_examples, self.cfg.seed)
        b, a = self.cfg.batch_size, self.cfg.grad_accum
        mine = idx[self.rank * a * b : (self.rank + 1) * a * b]
        return [mine[i * b : (i + 1) * b] for i in range(a)]

    def all_sum(self, local: int | float | torch.Tensor) -> float:
        """Sum a count (tokens, sequences) over all processes: the denominator of a globally normalised loss."""
        t = torch.as_tensor(local, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return float(t.item())

    # --- the step ---------------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, step: int, last_micro: bool = True) -> None:
        """Backpropagate `loss` (already divided by a global count); skip DDP's all-reduce until the last micro-batch."""
        self._step = step
        self.check_finite(loss, step, "loss")
        if self.sharded:
            self.model.set_requires_gradient_sync(last_micro)  # FSDP2's no_sync
        ctx = nullcontext() if last_micro or self.world_size == 1 or self.sharded else self.accelerator.no_sync(
            self.model)
        with ctx:
            self.accelerator.backward(loss * self.world_size)  # DDP averages over processes; the loss already sums

    def check_finite(self, value: torch.Tensor | float, step: int, what: str, rollback: bool = True) -> None:
        """Stop the run when `value` is NaN or inf on any process. A non-finite loss or weight was made by the last
        update, so with `rollback` the weights go back to before it; they are saved as model-last-good and
        NonFiniteError says where (a non-finite gradient norm keeps the weights: they gave a finite loss)."""
        value = torch.as_tensor(value, device=self.device)
        bad = torch.tensor(0.0 if torch.isfinite(value.detach()).all() else 1.0, device=self.device)
        if self.world_size > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            self._stop(step, f"the {what} became {value.detach().float().mean().item()}", rollback)

    def _stop(self, step: int, what: str, rollback: bool) -> None:
        """Roll back to the snapshot taken before the last update (that update led here), save, raise."""
        rolled = rollback and self._snapshot is not None
        if rolled:
            self._restore_snapshot()
        where = self.run_dir / "model-last-good"
        if self.model is not None:
            self.save_model(self.model, None, where, merge=False)
        state = "the weights from before the last update" if rolled else "the weights at this step"
        self.finish({"error": f"{what} at step {step}", "last_good": str(where)})
        raise NonFiniteError(f"{what} at step {step}; {state} are saved in {where}, checkpoints in "
                             f"{self.checkpoint_dir}")

    def _trainable(self) -> list[torch.Tensor]:
        """This process's trainable weights: with FSDP2 its shards (each rank checks and snapshots its own)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return [p.to_local() if hasattr(p, "to_local") else p for p in params] if self.sharded else params

    def _take_snapshot(self) -> None:
        params = self._trainable()
        if self._snapshot is None:
            self._snapshot = [p.detach().clone() for p in params]
        else:
            torch._foreach_copy_(self._snapshot, [p.detach() for p in params])

    def _restore_snapshot(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self._trainable()], self._snapshot)

    def optimizer_step(self, step: int | None = None) -> dict[str, float]:
        """Clip gradients, step the optimizer and the schedule, zero gradients; returns grad_norm and lr.

        With `guard_updates` (the default), a non-finite gradient norm stops the run before the update, and an
        update that leaves a non-finite weight is undone (from the copy taken just before it) and stops the run."""
        params = self._trainable()
        guard = getattr(self.cfg, "guard_updates", False)
        grad_norm = 0.0
        if self.sharded:
            from tether.distributed.fsdp import clip_grad_norm

            grad_norm = clip_grad_norm([p for g in self.optimizer.param_groups for p in g["params"]],
                                       self.cfg.max_grad_norm)
        elif self.cfg.max_grad_norm > 0:
            grad_norm = float(self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm))
        elif guard:
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        at = getattr(self, "_step", 0) if step is None else step
        if guard:
            self.check_finite(grad_norm, at, "gradient norm", rollback=False)
            self._take_snapshot()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if guard:
            finite = torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()
            self.check_finite(torch.tensor(0.0 if finite else float("nan")), at, "updated weights")
        return {"grad_norm": grad_norm, "lr": lr}

    def count_tokens(self, n: int) -> None:
        """Add processed tokens (this process) for the tokens/s figures."""
        self._tokens += int(n)

    def tokens_per_second(self) -> float:
        return self.all_sum(self._tokens) / max(1e-9, time.time() - self._t0)

    # --- logging ----------------------------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, Any], force: bool = False) -> None:
        """Average metrics over processes, write them (every `log_every` steps) and advance the progress bar."""
        metrics = {k: _to_float(v) for k, v in metrics.items()}
        if self.world_size > 1:
            keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
            vals = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
            vals = self.accelerator.reduce(vals, reduction="mean")
            metrics.update(zip(keys, vals.tolist()))
        now = time.time()
        t_prev, tok_prev = self._window
        metrics["tokens_per_second"] = self.all_sum(self._tokens - tok_prev) / max(1e-9, now - t_prev)
        self._window = (now, self._tokens)
        if self.is_main and (force or step % self.cfg.log_every == 0 or step == self.total_steps - 1):
            if self.logger is None:
                opened = trackers.open_trackers(getattr(self.cfg, "report_to", ["tensorboard"]), self.run_dir,
                                                self.cfg, self.command)
                self.logger = MetricsLogger(self.run_dir, self.resumed_from if self.cfg.resume else None, opened)
            self.logger.write(step, metrics)
        self._advance_progress(step, metrics)

    def _advance_progress(self, step: int, metrics: dict[str, float]) -> None:
        if not (self.cfg.progress and self.is_main):
            return
        if self._progress is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn(f"[bold]{self.command}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.command, total=self.total_steps, info="",
                                                 completed=self.resumed_from)
        shown = {k: metrics[k] for k in ("loss", "reward", "kl") if k in metrics}
        info = " ".join(f"{k}={v:.4g}" for k, v in shown.items()) + f" tok/s={metrics['tokens_per_second']:.0f}"
        self._progress.update(self._task, completed=step + 1, info=info)

    # --- checkpoints ------------------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def maybe_checkpoint(self, step: int, extra: dict | None = None, force: bool = False) -> None:
        every = self.cfg.save_every
        if force or (every > 0 and (step + 1) % every == 0 and step + 1 < self.total_steps):
            self.save_checkpoint(step + 1, extra)

    def save_checkpoint(self, next_step: int, extra: dict | None = None) -> Path:
        """Model, optimizer, scheduler, registered objects, RNG states and the data position (the next step).

        Written under a hidden partial name and renamed when complete (tether_state.json last), so a kill at any
        point leaves the earlier checkpoints and never a torn one in their place; then all but the newest
        `keep_checkpoints` complete ones are deleted."""
        final = self.checkpoint_dir / f"step-{next_step:07d}"
        partial = self.checkpoint_dir / f".step-{next_step:07d}.partial"
        if self.is_main and partial.exists():
            shutil.rmtree(partial)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        if self.sharded:
            from tether.distributed.fsdp import save_sharded

            save_sharded(self.model, self.optimizer, partial / "sharded")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            write_atomic(partial / "tether_state.json", strict_json({"next_step": next_step, "extra": extra or {}}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            complete = sorted(p for p in self.checkpoint_dir.glob("step-*") if p.is_dir())
            for old in complete[: max(0, len(complete) - self.cfg.keep_checkpoints)]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def resume(self) -> tuple[int, dict]:
        """With `resume=true`, load the newest complete checkpoint (an unreadable one is skipped for the one before
        it); returns (first step to run, extra state). Keys accepted through `resume_changed` replace the restored
        optimizer's values."""
        if not self.cfg.resume:
            return 0, {}
        for path in sorted((p for p in self.checkpoint_dir.glob("step-*") if p.is_dir()), reverse=True):
            try:
                state = json.loads((path / "tether_state.json").read_text())
                self.accelerator.load_state(str(path))
                if self.sharded:
                    from tether.distributed.fsdp import load_sharded

                    load_sharded(self.model, self.optimizer, path / "sharded")
            except Exception as e:  # a torn or foreign checkpoint: fall back to the one before it
                log.warning("checkpoint %s is unreadable (%s); trying the one before it", path, e)
                continue
            self.resumed_from = int(state["next_step"])
            self._apply_accepted_changes()
            return self.resumed_from, state.get("extra") or {}
        raise FileNotFoundError(f"resume=true but no complete checkpoint in {self.checkpoint_dir}")

    def _apply_accepted_changes(self) -> None:
        """The optimizer settings a resume accepted (`resume_changed`), over the ones the checkpoint restored."""
        changed, cfg = set(self.accepted_changes), self.cfg
        for group in self.optimizer.param_groups:
            if "weight_decay" in changed:
                group["weight_decay"] = cfg.weight_decay
            if "adam_eps" in changed:
                group["eps"] = cfg.adam_eps
        if "lr" in changed:
            sched = self.scheduler
            sched.base_lrs = [cfg.lr for _ in sched.base_lrs]
            for group, base, fn in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * fn(sched.last_epoch)
            sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # --- outputs ----------------------------------------------------------------------------------------------------
    def unwrap(self, model: torch.nn.Module, keep_autocast: bool = True) -> torch.nn.Module:
        """The model under DDP; `keep_autocast=False` also takes off the training precision's autocast (in place:
        from then on its forward runs in fp32, as a consumer that loads the saved model runs it)."""
        return self.accelerator.unwrap_model(model, keep_fp32_wrapper=keep_autocast)

    def save_model(self, model, tokenizer=None, path: str | Path | None = None, merge: bool | None = None) -> Path:
        """Save a normal HF model directory (LoRA merged unless merge_lora=false); returns its path."""
        path = Path(path or self.run_dir / "model")
        self.accelerator.wait_for_everyone()
        if self.sharded and getattr(model, "unshard", None) is not None:  # an FSDP2 module
            from tether.distributed import fsdp

            state = fsdp.full_state_dict(model)  # every rank takes part in the gather
            if self.is_main:
                fsdp.save_consolidated(model, state, path, tokenizer)
        elif self.is_main:
            from tether.models import save_pretrained

            merge = self.cfg.merge_lora if merge is None else merge
            save_pretrained(self.unwrap(model), path, tokenizer=tokenizer, merge_lora=merge)
        if self.is_main:
            write_card(path, self.command, self.cfg)  # completed with the run's figures by finish()
            self._saved_models.append(path)
        self.accelerator.wait_for_everyone()
        return path

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json (adds wall_seconds), close the logs and the progress bar."""
        summary = {k: _to_float(v) for k, v in summary.items()}
        summary.setdefault("wall_seconds", time.time() - self._t0)
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.is_main:
            summary.setdefault("world_size", self.world_size)
            for path in self._saved_models:
                write_card(path, self.command, self.cfg, summary)
            write_atomic(self.run_dir / "summary.json", strict_json(with_undefined_noted(summary), indent=2) + "\n")
            if self.logger is not None:
                self.logger.close()
                self.logger = None
            if self._lock is not None:
                self._lock.close()  # the run is over: another may take the directory
                self._lock = None
        return summary


def new_accelerator(precision: str) -> Accelerator:
    """An Accelerator for this run. A second run in one process may ask for another precision: the process-wide
    state accelerate keeps is reset for it (the process group, if any, stays)."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision) != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    atexit.unregister(_destroy_process_group)  # one entry however many runs this process makes
    atexit.register(_destroy_process_group)
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def _destroy_process_group() -> None:
    """At exit, a distributed run leaves no process group behind (torch warns of a leak otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_launch(world_size: int) -> None:
    """Fail loudly where a launcher asked for more processes than started: `accelerate launch --cpu --num_processes
    2` runs one process on a CPU (accelerate's CPU launcher is single-process), which would train as one silently."""
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    words = [w.decode(errors="replace") for w in parent]
    if not any(w.endswith("accelerate") for w in words[:2]) or "launch" not in words:
        return
    asked = next((words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--num_processes", "--num-processes")), "1")
    if asked.isdigit() and int(asked) > world_size:
        raise ConfigError(f"accelerate launch asked for {asked} processes and started {world_size} (its CPU launcher "
                          f"runs one); on a CPU use `torchrun --nproc_per_node {asked} -m tether.cli ...`")


def with_undefined_noted(summary: dict) -> dict:
    """The summary as strict JSON writes it: a figure that is NaN or inf becomes null, and `undefined` lists them
    ("no held-out accuracy without a task", a loss of a run with no step ...) under one note."""
    bad = [k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return summary
    return {**summary, "undefined": {k: f"{summary[k]!r}: not defined for this run" for k in bad}}
