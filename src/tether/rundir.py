"""A run directory belongs to one run: one writer at a time, never two runs mixed, resume only of the same run.

    lock = hold(run_dir, "sft")                 # refuses while another process holds it, naming that process
    prepare(run_dir, cfg, "sft")                # a fresh run, `overwrite=true`, or a resume checked against run.json

What a run directory guarantees (README, "Run directories"):
- one writer: `hold` takes an exclusive lock (`flock` on run_dir/.lock) for the life of the process; a second run
  into the directory stops at once with the holder's pid and command. The kernel drops the lock when the holder dies
  (kill -9 included), so a crash leaves no stale lock.
- no mixing: a directory that holds an earlier run (config.yaml, run.json or checkpoints) is refused unless the new
  run resumes it (`resume=true`) or replaces it (`overwrite=true`, which empties the directory first).
- resume of the same run only: run.json records the command, every config key and a fingerprint of every input file
  or directory the config names (of a Hub ID: the commit it stands for in the local cache, `hub_commit`); `resume=true` refuses any difference in them except the keys `resume_changed`
  lists (and the keys that cannot change a result: output, logging and checkpoint cadence).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from tether.config import ConfigError, config_to_dict, save_config
from tether.runfiles import strict_json, write_atomic

# keys a resumed run may change freely: where it writes, how often it logs, evaluates and checkpoints
FREE_ON_RESUME = frozenset({"out", "resume", "resume_changed", "overwrite", "progress", "log_every", "save_every",
                            "keep_checkpoints", "eval_every"})
WHOLE_FILE_LIMIT = 512 * 2**20  # inputs up to this size are hashed whole; larger ones by size and modification time


class RunDirError(ConfigError):
    """The run directory cannot take this run: in use, holding another run, or resumed with other settings."""


def hold(run_dir: Path, command: str):
    """The exclusive lock of `run_dir` (an open file; keep it for the run's life). RunDirError naming the holder."""
    path = Path(run_dir) / ".lock"
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirError(f"{run_dir} is in use by {holder}; wait for it, or give another out=DIR") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} (tether {command})\n")
    handle.flush()
    return handle


def earlier_run(run_dir: Path) -> str | None:
    """What of an earlier run `run_dir` holds ("config.yaml, 2 checkpoints"), or None."""
    found = [name for name in ("run.json", "config.yaml", "summary.json", "metrics.jsonl") if (run_dir / name).exists()]
    checkpoints = list((run_dir / "checkpoints").glob("step-*"))
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint{'s' if len(checkpoints) > 1 else ''}")
    return ", ".join(found) or None


def clear(run_dir: Path) -> None:
    """Empty `run_dir` (its lock file stays: the caller holds it)."""
    for entry in run_dir.iterdir():
        if entry.name == ".lock":
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def fingerprint(path: Path) -> str:
    """sha256 of a file's bytes (size and mtime beyond WHOLE_FILE_LIMIT), or of a directory's listing with sizes and
    modification times: what changes when an input changes."""
    h = hashlib.sha256()
    if path.is_file():
        stat = path.stat()
        if stat.st_size > WHOLE_FILE_LIMIT:
            return f"size {stat.st_size}, mtime {stat.st_mtime_ns}"
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
        return h.hexdigest()[:16]
    for entry in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = entry.stat()
        h.update(f"{entry.relative_to(path)} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def hub_commit(name: str) -> str | None:
    """The commit a Hub ID `org/name[@revision]` stands for in the local Hugging Face cache (a model's or a data
    set's), read from the cache's refs without the network; a 40-hex revision is its own commit; None when the ID is
    not cached (yet) or `name` is not a Hub ID."""
    from huggingface_hub import constants

    repo_id, _, revision = name.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        return None
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    for kind in ("models", "datasets"):
        ref = Path(constants.HF_HUB_CACHE) / f"{kind}--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
        if ref.is_file():
            return ref.read_text().strip() or None
    return None


def manifest(cfg, command: str, world_size: int = 1) -> dict:
    """run.json: the command, every config key, a fingerprint of every key whose value names a file or dir, and
    what ran it (world size, versions, the source's git commit)."""
    settings = config_to_dict(cfg)
    inputs = {}
    for key, value in settings.items():
        if key in FREE_ON_RESUME or not isinstance(value, str) or not value:
            continue
        source = value if Path(value).exists() else value.split(":")[0]  # a DatasetDict's "DIR:split"
        if source and Path(source).exists():
            inputs[key] = fingerprint(Path(source))
        elif source and hub_commit(source):
            inputs[key] = f"hub {hub_commit(source)}"
    return {"command": command, "config": settings, "inputs": inputs, "world_size": world_size,
            "versions": versions(), "git_commit": source_commit()}


def versions() -> dict:
    import platform
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in ("tether", "torch", "transformers", "accelerate", "peft"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def source_commit() -> str | None:
    """The git commit of the tether source this runs from (with "+changes" when the tree differs), or None."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+changes" if dirty else "")


def changes(stored: dict, now: dict, accepted: list[str]) -> list[str]:
    """"key: old -> new" for every difference between two manifests that a resume may not make silently."""
    out = []
    if stored.get("command") != now["command"]:
        out.append(f"command: {stored.get('command')} -> {now['command']}")
    if stored.get("world_size", 1) != now.get("world_size", 1) and "world_size" not in accepted:
        out.append(f"world_size: {stored.get('world_size', 1)} -> {now.get('world_size', 1)}")  # another data split
    old, new = stored.get("config", {}), now["config"]
    for key in sorted(set(old) | set(new)):
        if key in FREE_ON_RESUME or key in accepted:
            continue
        if old.get(key, "(absent)") != new.get(key, "(absent)"):
            out.append(f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}")
    for key in sorted(set(stored.get("inputs", {})) | set(now["inputs"])):
        first_cached = key not in stored.get("inputs", {}) and now["inputs"][key].startswith("hub ")
        if key not in accepted and key not in FREE_ON_RESUME and not first_cached and \
                stored.get("inputs", {}).get(key) != now["inputs"].get(key) and old.get(key) == new.get(key):
            out.append(f"{key}: the contents of {new.get(key)} changed")
    return out


def prepare(run_dir: Path, cfg, command: str, world_size: int = 1) -> list[str]:
    """Check `run_dir` can take this run (module docstring), then write run.json and config.yaml atomically.
    Returns the accepted changes of a resume (keys of `resume_changed` that did change)."""
    now = manifest(cfg, command, world_size)
    accepted: list[str] = []
    if getattr(cfg, "resume", False):
        stored_file = run_dir / "run.json"
        if stored_file.exists():
            stored = json.loads(stored_file.read_text())
            found = changes(stored, now, list(getattr(cfg, "resume_changed", [])))
            if found:
                raise RunDirError(f"resume: {run_dir} was run with other settings ({'; '.join(found)}); "
                                  f"resume_changed={','.join(f.split(':')[0] for f in found)} continues it anyway")
            everything = changes(stored, now, [])
            accepted = [f.split(":")[0] for f in everything]
    else:
        held = earlier_run(run_dir)
        if held and not getattr(cfg, "overwrite", False):
            raise RunDirError(f"{run_dir} holds an earlier run ({held}); resume=true continues it, overwrite=true "
                              "replaces it, or give another out=DIR")
        if held:
            clear(run_dir)
    write_atomic(run_dir / "run.json", strict_json(now, indent=2) + "\n")
    save_config(cfg, run_dir / "config.yaml")
    return accepted


def replaced_keys(cfg, accepted: list[str]) -> dict:
    """The accepted changed values, by key (for the engine to apply to a restored optimizer)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in accepted}
