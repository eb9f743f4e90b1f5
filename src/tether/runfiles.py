"""Files a run writes, written so that a kill at any instant leaves the old file or the new one, never a torn one.

    write_atomic(run_dir / "summary.json", text)     # temp name in the same directory, fsync, rename, fsync dir
    save_torch_atomic(tensor, run_dir / "cache.pt")
    text = strict_json({"gold": float("nan")})       # '{"gold": null}': JSON other parsers read (no NaN/Infinity)

`rename` within one directory is atomic on POSIX file systems, so readers see either version whole.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replace `path` with `data` atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_torch_atomic(obj: Any, path: str | Path) -> Path:
    """`torch.save` through `write_atomic`."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_atomic(path, buffer.getvalue())


def finite_or_none(value: Any) -> Any:
    """The value with every non-finite float (NaN, ±inf) replaced by None, through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value: Any, **kwargs) -> str:
    """json.dumps that never writes NaN or Infinity: an undefined figure becomes null (allow_nan=False checks it)."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
