"""Row readers (.jsonl/.json lines, Parquet, `save_to_disk` directories, dataset repositories and Hub IDs through
`datasets.load_dataset`), load_records, detect_kind, write_jsonl.

A source is a path or a Hugging Face dataset ID, with a split after a colon where the data has splits:
    prefs.jsonl | prefs.parquet | saved_dataset/                  one table: no split
    saved_dataset_dict/:test                                      a `DatasetDict.save_to_disk` directory, split "test"
    repo_dir/:train                                               a dataset repository folder (data files, no script)
    trl-lib/ultrafeedback_binarized:train                          a Hub dataset ID (org/name), split "train"
    org/name:config:train                                         ... with a configuration (subset)
A source with splits and none named is refused with the list of its splits. Hub IDs are read by
`datasets.load_dataset(id, name=config, split=split)`: downloaded once into the Hugging Face cache, and read from
that cache with HF_HUB_OFFLINE=1. A name that exists as a path is always the path.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from tether.data.schemas import RECORD_KINDS, SCHEMAS, DataError, validate_record

log = logging.getLogger(__name__)


class Records(list):
    """A list of validated records with the source they came from, the line of each record (`lines`) and the
    (line, message) of records skipped."""

    def __init__(self, items: Iterable[dict] = (), path: str | Path | None = None, kind: str | None = None,
                 skipped: list[tuple[int, str]] | None = None, lines: list[int] | None = None):
        super().__init__(items)
        self.path, self.kind = path, kind
        self.skipped: list[tuple[int, str]] = skipped if skipped is not None else []
        self.lines: list[int] = lines if lines is not None else []


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line, parsed value) of each non-blank line; a line of bad UTF-8 or bad JSON gives a DataError as its value."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte order mark
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, DataError(f"invalid UTF-8 at byte {e.start} of the line", path, number)
                continue
            if not text.strip():
                continue
            yield number, _parse_json(text, path, number)


MAX_JSON_DEPTH = 100  # arrays/objects nested deeper than this are refused (a record needs 3 or 4 levels)
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def _nested_deeper_than(text: str, limit: int) -> bool:
    """Whether valid JSON `text` nests arrays/objects more than `limit` levels (brackets in strings not counted)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for bracket in _BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > limit:
            return True
    return False


def _parse_json(text: str, path: Path, number: int):
    """The value of one JSON line, or a DataError for it: never a JSON, int-size or recursion traceback."""
    too_deep = f"invalid JSON: nested more than {MAX_JSON_DEPTH} levels deep"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return DataError(f"invalid JSON: {e.msg} (column {e.colno})", path, number)
    except RecursionError:  # the parser recurses per level: "[" * 100000 overflows the stack
        return DataError(too_deep, path, number)
    except ValueError as e:  # Python's limit on int digits (CVE-2020-10735), sys.set_int_max_str_digits
        if "Exceeds the limit" in str(e):
            limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
            return DataError(f"invalid JSON: an integer of more than {limit} digits", path, number)
        return DataError(f"invalid JSON: {e}", path, number)
    if _nested_deeper_than(text, MAX_JSON_DEPTH):  # parsed, but would overflow the stack of whatever recurses later
        return DataError(too_deep, path, number)
    return value


def _drop_nulls(row: dict) -> dict:
    """Table rows hold None where a record lacks a column: treat those fields as absent."""
    return {k: v for k, v in row.items() if v is not None}


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file ({e})", path) from None
    number = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield number, _drop_nulls(row)


def _one_split(ds, split: str | None, source: str, saved: bool = False):
    """The table of a loaded dataset: `split` of a DatasetDict (required), a Dataset as it is (no split allowed)."""
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split is None:
            first = next(iter(ds))
            also = f" (or give the split's directory, {source}/{first})" if saved else ""
            raise DataError(f"is a DatasetDict with splits {list(ds)}; name one as {source}:{first}{also}", source)
        if split not in ds:
            raise DataError(f"has no split '{split}'; its splits are {list(ds)}", source)
        return ds[split]
    if split is not None:
        raise DataError(f"is a single dataset without splits; drop ':{split}'", source)
    return ds


def _dataset_rows(ds) -> Iterator[tuple[int, object]]:
    for number, row in enumerate(ds, start=1):
        yield number, _drop_nulls(row)


def _directory_rows(path: Path, split: str | None) -> Iterator[tuple[int, object]]:
    """A `save_to_disk` directory, else a dataset repository folder (data files) read by datasets.load_dataset."""
    import datasets

    try:
        ds = _one_split(datasets.load_from_disk(str(path)), split, str(path), saved=True)
    except FileNotFoundError:
        ds = _load_dataset(str(path), None, split, str(path), "is a directory but not a dataset saved with "
                           "`Dataset.save_to_disk`, and datasets.load_dataset cannot read it")
    yield from _dataset_rows(ds)


def _load_dataset(name: str, config: str | None, split: str | None, source: str, failure: str):
    """datasets.load_dataset(name, config, split=split): the split's table (without a split, a DataError listing the
    splits); its errors as one DataError "`failure` (<error type>: <first line>)"."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except (OSError, ValueError, RuntimeError, datasets.exceptions.DatasetsError) as e:  # ConnectionError is OSError
        if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ is not None:
            e = e.__cause__  # "An error occurred while generating the dataset": the cause says which
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"{failure} ({type(e).__name__}: {first})", source) from None
    return ds if split is not None else _one_split(ds, None, source)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def parse_source(source: str | Path) -> tuple[Path | str, str | None, str | None]:
    """(path or Hub ID, config, split) of a source "PATH", "PATH:split", "org/name[:split]" or
    "org/name:config:split" (module docstring); a name that exists as a path is that path, whole."""
    text = str(source)
    if Path(text).exists() or ":" not in text:
        return (text if _is_hub_id(text) else Path(text)), None, None
    base, _, split = text.rpartition(":")
    if Path(base).exists():
        return Path(base), None, split or None
    base, _, config = base.rpartition(":") if ":" in base else ("", "", base)
    name = base or config
    if _is_hub_id(name):
        return name, (config if base else None), split or None
    return Path(text), None, None


def _is_hub_id(text: str) -> bool:
    return bool(HUB_ID.fullmatch(text)) and not Path(text).exists() and not text.endswith(DATA_SUFFIXES)


def read_rows(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line, row) of a source (module docstring: a .jsonl/.json lines file, a .parquet file, a `save_to_disk`
    directory, a dataset repository folder or a Hub ID, with ":split" where it has splits), unvalidated. A row of
    a table is "line" number (row index + 1).

    A line that is not valid UTF-8 JSON (or nests more than MAX_JSON_DEPTH levels, or holds an integer too long
    for Python to read) comes back as a DataError value (so callers may skip it); a missing,
    unreadable or unsupported file raises DataError.
    """
    where, config, split = parse_source(path)
    if isinstance(where, str):  # a Hub dataset ID
        ds = _load_dataset(where, config, split, str(path), "no such file or directory, and datasets.load_dataset "
                           "cannot load it as a Hugging Face dataset")
        yield from _dataset_rows(ds)
        return
    path = where
    if not path.exists():
        raise DataError("no such file or directory", path)
    if path.is_dir():
        yield from _directory_rows(path, split)
    elif split is not None:
        raise DataError(f"is a file without splits; drop ':{split}'", path)
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path)
    elif path.suffix in (".jsonl", ".json"):
        yield from _jsonl_rows(path)
    else:
        raise DataError(f"unsupported format '{path.suffix}'; expected .jsonl, .json, .parquet or a saved dataset", path)


def load_records(path: str | Path, kind: str, skip_invalid: bool = False) -> Records:
    """Read and validate every record of `path` as `kind`.

    With skip_invalid=False the first invalid record raises DataError(path, line, field); with True invalid records
    are left out, listed in `.skipped` as (line, message) and summarised in one logged warning. A file without any
    (valid) record raises.
    """
    if kind not in SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(RECORD_KINDS)}")
    records = Records(path=path, kind=kind)
    for line, row in read_rows(path):
        try:
            if isinstance(row, DataError):
                raise row
            records.append(validate_record(row, kind, path, line))
            records.lines.append(line)
        except DataError as e:
            if not skip_invalid:
                raise
            records.skipped.append((line, str(e)))
    if records.skipped:
        lines = ", ".join(str(n) for n, _ in records.skipped[:10]) + (", ..." if len(records.skipped) > 10 else "")
        log.warning("%s: skipped %d invalid %s record(s) (lines %s); first: %s", path, len(records.skipped), kind,
                    lines, records.skipped[0][1])
    if not records:
        note = f"; all {len(records.skipped)} were invalid" if records.skipped else ""
        raise DataError(f"no {kind} records{note}", path)
    return records


def detect_kind(path: str | Path) -> str:
    """'rankings' when the first record has `completions`, 'pairs' when it has `chosen`, 'steps' when it has
    `steps` (a process reward model's step labels), 'unpaired' when it has `completion` and `label` (outcomes)."""
    for line, row in read_rows(path):
        if isinstance(row, dict) and "completions" in row:
            return "rankings"
        if isinstance(row, dict) and "chosen" in row:
            return "pairs"
        if isinstance(row, dict) and "steps" in row:
            return "steps"
        if isinstance(row, dict) and "label" in row and "completion" in row:
            return "unpaired"
        raise DataError("cannot tell the kind (no 'chosen', 'completions', 'steps', or 'completion' with 'label'); "
                        "set data_kind", path, line)
    raise DataError("no records", path)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """One JSON object per line, UTF-8 (non-ASCII kept as it is), strict JSON (an undefined number is null);
    written atomically (temp file, rename: a kill leaves the old file or the new one); returns the path."""
    from tether.runfiles import strict_json, write_atomic

    return write_atomic(path, "".join(strict_json(record, ensure_ascii=False) + "\n" for record in records))

