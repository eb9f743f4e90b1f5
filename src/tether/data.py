"""The data layer of tether: record schemas and validation, readers, tokenisation with chat templates, collation.

    records = load_records("pairs.jsonl", "pairs")               # validated dicts; DataError names file:line: field
    examples = [encode_pair(tok, r, 256, 256) for r in records]  # token ids, prompt cut left, completions cut right
    batch = collate_pairs(examples, tok.pad_token_id)            # rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected

Record kinds (one JSON object per line in .jsonl/.json; Parquet and `Dataset.save_to_disk` directories hold the same
fields; unknown extra fields are kept). A prompt is `"prompt": str`, `"prompt": [turns]` or `"messages": [turns]`,
a turn is `{"role": str, "content": str}`:
    prompts          prompt
    demonstrations   prompt + "completion": str, or "messages" alone (loss on every assistant turn)
    pairs            prompt + "chosen", "rejected": str; optional "margin": number, "weight": number > 0, "rater": str
    rankings         prompt + "completions": [str, ...] (K >= 2), "ranking": [best ... worst] a permutation of 0..K-1
    unpaired         prompt + "completion": str, "label": true|false
    verifiable       prompt + "answer": str|number and/or "tests": str|[str, ...]
    steps            prompt + "steps": [str, ...], "labels": [0|1|true|false, ...] of the same length

Choices worth knowing:
- A ranking must order all K completions. A partial ranking (a prefix) leaves the place of the unranked completions
  open (below all ranked ones? tied?), and each reading gives different pairs; drop unranked completions instead.
- Tokens: a plain prompt is tokenised with the tokenizer's special tokens (BOS where the model wants one), a chat is
  rendered by the tokenizer's chat template; a completion is raw text + EOS. Prompts are cut from the left (a leading
  BOS is kept), completions from the right (a cut completion loses its EOS). Truncation is counted by
  `TruncationStats`, never silent.
- Packing (`pack_examples`) is exact only when the model gets no 2D attention mask and no KV cache: `model_inputs`
  then passes `position_ids` alone with use_cache=False, and transformers 5 derives the block-diagonal causal mask
  from the restarts of the positions (sdpa and eager on CPU, flash-attention varlen on GPU). Passing the 2D
  attention_mask, or leaving the cache on (the default in eval mode), silently lets packed examples see each other.
  tests/test_data.py checks packed NLL == unpacked NLL on the tiny Llama for both attention implementations.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens without loss (torch cross-entropy's ignore_index)


# --- errors -----------------------------------------------------------------------------------------------------------
class DataError(ValueError):
    """Invalid data: `str()` reads "<path>:<line>: field '<field>': <message>" with the parts that are known.

    `line` is 1-based (a row index + 1 for Parquet and saved datasets) and None when the whole file is concerned.
    """

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.message, self.path, self.line, self.field = message, path, line, field

    def __str__(self) -> str:
        where = "" if self.path is None else str(self.path)
        if self.line is not None:
            where = f"{where}:{self.line}"
        parts = [where] if where else []
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        parts.append(self.message)
        return ": ".join(parts)


# --- schemas ----------------------------------------------------------------------------------------------------------
def _type_name(value) -> str:
    """The JSON name of a Python value's type, for messages."""
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (str, "string"), ((int, float), "number"), (list, "list"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(value, name: str) -> str:
    """A non-empty string, or DataError naming the field."""
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {_type_name(value)}", field=name)
    if not value.strip():
        raise DataError("is empty", field=name)
    return value


def _required(record: dict, name: str, prefix: str = ""):
    if name not in record:
        raise DataError("missing", field=prefix + name)
    return record[name]


def _text_list(value, name: str, min_len: int = 1) -> list:
    if not isinstance(value, list):
        raise DataError(f"must be a list of strings, got {_type_name(value)}", field=name)
    if len(value) < min_len:
        raise DataError(f"needs at least {min_len} item{'s' if min_len > 1 else ''}, got {len(value)}", field=name)
    for i, item in enumerate(value):
        _text(item, f"{name}[{i}]")
    return value


def _check_messages(turns, name: str) -> None:
    """A non-empty list of {"role": str, "content": non-empty str} turns."""
    if not isinstance(turns, list):
        raise DataError(f"must be a list of turns, got {_type_name(turns)}", field=name)
    if not turns:
        raise DataError("is empty", field=name)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"must be an object with 'role' and 'content', got {_type_name(turn)}", field=f"{name}[{i}]")
        _text(_required(turn, "role", f"{name}[{i}]."), f"{name}[{i}].role")
        _text(_required(turn, "content", f"{name}[{i}]."), f"{name}[{i}].content")


def _check_prompt(record: dict) -> None:
    """`prompt` (string or turns) or `messages` (turns), not both."""
    if "prompt" in record and "messages" in record:
        raise DataError("give either 'prompt' or 'messages', not both", field="messages")
    if "messages" in record:
        _check_messages(record["messages"], "messages")
    elif "prompt" not in record:
        raise DataError("missing (a prompt is 'prompt' or 'messages')", field="prompt")
    elif isinstance(record["prompt"], list):
        _check_messages(record["prompt"], "prompt")
    else:
        _text(record["prompt"], "prompt")


def _check_demonstration(record: dict) -> None:
    if "messages" in record and "prompt" not in record and "completion" not in record:
        turns = record["messages"]
        _check_messages(turns, "messages")
        if not any(t["role"] == "assistant" for t in turns[1:]):
            raise DataError("needs an assistant turn after the first turn (the loss is on assistant turns)",
                            field="messages")
        return
    _check_prompt(record)
    _text(_required(record, "completion"), "completion")


def _check_pair(record: dict) -> None:
    _check_prompt(record)
    _text(_required(record, "chosen"), "chosen")
    _text(_required(record, "rejected"), "rejected")
    if "margin" in record and not _is_number(record["margin"]):
        raise DataError(f"must be a finite number, got {_type_name(record['margin'])}", field="margin")
    if "weight" in record and not (_is_number(record["weight"]) and record["weight"] > 0):
        raise DataError(f"must be a number > 0, got {record['weight']!r}", field="weight")
    if "rater" in record:
        _text(record["rater"], "rater")


def _check_ranking(record: dict) -> None:
    _check_prompt(record)
    k = len(_text_list(_required(record, "completions"), "completions", min_len=2))
    ranking = _required(record, "ranking")
    if not isinstance(ranking, list):
        raise DataError(f"must be a list of indices, got {_type_name(ranking)}", field="ranking")
    seen = set()
    for i, index in enumerate(ranking):
        if not isinstance(index, int) or isinstance(index, bool):
            raise DataError(f"must be an integer index, got {_type_name(index)}", field=f"ranking[{i}]")
        if not 0 <= index < k:
            raise DataError(f"index {index} out of range for {k} completions", field=f"ranking[{i}]")
        if index in seen:
            raise DataError(f"index {index} appears twice", field=f"ranking[{i}]")
        seen.add(index)
    if len(seen) != k:
        missing = sorted(set(range(k)) - seen)
        raise DataError(f"must order all {k} completions (a permutation of 0..{k - 1}); missing {missing}",
                        field="ranking")


def _check_unpaired(record: dict) -> None:
    _check_prompt(record)
    _text(_required(record, "completion"), "completion")
    label = _required(record, "label")
    if not isinstance(label, bool):
        raise DataError(f"must be true or false, got {_type_name(label)}", field="label")


def _check_verifiable(record: dict) -> None:
    _check_prompt(record)
    if "answer" not in record and "tests" not in record:
        raise DataError("missing (a verifiable task needs 'answer' or 'tests')", field="answer")
    if "answer" in record:
        answer = record["answer"]
        if isinstance(answer, str):
            _text(answer, "answer")
        elif not _is_number(answer):
            raise DataError(f"must be a string or a finite number, got {_type_name(answer)}", field="answer")
    if "tests" in record:
        if isinstance(record["tests"], list):
            _text_list(record["tests"], "tests")
        else:
            _text(record["tests"], "tests")


def _check_steps(record: dict) -> None:
    _check_prompt(record)
    steps = _text_list(_required(record, "steps"), "steps")
    labels = _required(record, "labels")
    if not isinstance(labels, list):
        raise DataError(f"must be a list of 0/1 labels, got {_type_name(labels)}", field="labels")
    if len(labels) != len(steps):
        raise DataError(f"has {len(labels)} labels for {len(steps)} steps", field="labels")
    for i, label in enumerate(labels):
        if not (isinstance(label, bool) or (isinstance(label, int) and label in (0, 1))):
            raise DataError(f"must be 0, 1, true or false, got {label!r}", field=f"labels[{i}]")


SCHEMAS: dict[str, Callable[[dict], None]] = {
    "prompts": _check_prompt,
    "demonstrations": _check_demonstration,
    "pairs": _check_pair,
    "rankings": _check_ranking,
    "unpaired": _check_unpaired,
    "verifiable": _check_verifiable,
    "steps": _check_steps,
}
RECORD_KINDS: tuple[str, ...] = tuple(SCHEMAS)


def validate_record(record, kind: str, path: str | Path = "<memory>", line: int | None = None) -> dict:
    """Check one record against the schema of `kind`; returns it unchanged or raises DataError(path, line, field)."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(RECORD_KINDS)}")
    try:
        if not isinstance(record, dict):
            hint = " (one JSON object per line, not a JSON array)" if isinstance(record, list) else ""
            raise DataError(f"expected a JSON object, got {_type_name(record)}{hint}")
        SCHEMAS[kind](record)
    except DataError as e:
        e.path, e.line = path, line
        raise
    return record


def prompt_of(record: dict):
    """The prompt of a record: a string or a list of chat turns."""
    return record["prompt"] if "prompt" in record else record["messages"]


def expand_ranking(record: dict) -> list[dict]:
    """All C(K, 2) pairs of a ranking record, better completion as `chosen` (InstructGPT's RM data)."""
    order, texts = record["ranking"], record["completions"]
    key = "prompt" if "prompt" in record else "messages"
    return [{key: record[key], "chosen": texts[order[i]], "rejected": texts[order[j]]}
            for i in range(len(order)) for j in range(i + 1, len(order))]


# --- readers ------------------------------------------------------------------------------------------------------------
class Records(list):
    """A list of validated records with the file they came from and the (line, message) of records skipped."""

    def __init__(self, items: Iterable[dict] = (), path: str | Path | None = None, kind: str | None = None,
                 skipped: list[tuple[int, str]] | None = None):
        super().__init__(items)
        self.path, self.kind = path, kind
        self.skipped: list[tuple[int, str]] = skipped if skipped is not None else []


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
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as e:
                yield number, DataError(f"invalid JSON: {e.msg} (column {e.colno})", path, number)


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


def _saved_dataset_rows(path: Path) -> Iterator[tuple[int, object]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError("is a directory but not a dataset saved with `Dataset.save_to_disk`", path) from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"is a DatasetDict with splits {list(ds)}; give one split's directory, "
                        f"e.g. {path}/{next(iter(ds))}", path)
    for number, row in enumerate(ds, start=1):
        yield number, _drop_nulls(row)


def read_rows(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line, row) of a .jsonl/.json lines file, a .parquet file or a `save_to_disk` directory, unvalidated.

    A line that is not valid UTF-8 JSON comes back as a DataError value (so callers may skip it); a missing,
    unreadable or unsupported file raises DataError.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or directory", path)
    if path.is_dir():
        yield from _saved_dataset_rows(path)
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
    """'rankings' when the first record has `completions`, 'pairs' when it has `chosen`."""
    for line, row in read_rows(path):
        if isinstance(row, dict) and "completions" in row:
            return "rankings"
        if isinstance(row, dict) and "chosen" in row:
            return "pairs"
        raise DataError("cannot tell pairs from rankings (no 'chosen' or 'completions'); set data_kind",
                        path, line)
    raise DataError("no records", path)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """One JSON object per line, UTF-8 (non-ASCII kept as it is); creates parent directories; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# --- tokenisation ---------------------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One language-modelling row: `labels` is `input_ids` with IGNORE_INDEX where there is no loss.

    `position_ids` is set on packed rows only (positions restart at 0 for each packed example).
    """

    input_ids: list[int]
    labels: list[int]
    prompt_truncated: bool = False
    completion_truncated: bool = False
    position_ids: list[int] | None = None


@dataclass
class PairExample:
    """A preference pair as token ids: prompt + chosen is preferred to prompt + rejected."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0
    weight: float = 1.0
    prompt_truncated: bool = False
    chosen_truncated: bool = False
    rejected_truncated: bool = False

    @property
    def completion_truncated(self) -> bool:
        return self.chosen_truncated or self.rejected_truncated


@dataclass
class RankingExample:
    """K completions of one prompt as token ids; `ranking` lists completion indices best to worst."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    ranking: list[int]
    prompt_truncated: bool = False
    completions_truncated: list[bool] = field(default_factory=list)

    @property
    def completion_truncated(self) -> bool:
        return any(self.completions_truncated)


@dataclass
class UnpairedExample:
    """One completion with a thumbs-up (label True) or thumbs-down, as token ids (KTO)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    prompt_truncated: bool = False
    completion_truncated: bool = False


def _render_chat(tokenizer, turns: list[dict], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the record is a chat but the tokenizer has no chat template; set tokenizer.chat_template "
                        "or give plain 'prompt'/'completion' strings", field="messages")
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)


def _cut_left(ids: list[int], max_len: int | None, bos_id: int | None) -> tuple[list[int], bool]:
    """Keep the last max_len ids; a leading BOS stays in front (it marks the start of the text, not its content)."""
    if max_len is None or len(ids) <= max_len:
        return ids, False
    if max_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1, got {max_len}")
    if bos_id is not None and ids[0] == bos_id and max_len > 1:
        return [ids[0]] + ids[len(ids) - max_len + 1 :], True
    return ids[len(ids) - max_len :], True


def _cut_right(ids: list[int], max_len: int | None) -> tuple[list[int], bool]:
    if max_len is None or len(ids) <= max_len:
        return ids, False
    if max_len < 1:
        raise ValueError(f"max_completion_len must be >= 1, got {max_len}")
    return ids[:max_len], True


def encode_prompt(tokenizer, prompt: str | list[dict], max_len: int | None = None) -> tuple[list[int], bool]:
    """Token ids of a prompt, cut from the left to max_len; returns (ids, truncated).

    A string is tokenised as raw text with the tokenizer's special tokens (BOS for models that use one); a list of
    turns is rendered by the chat template with the generation prompt (e.g. "<assistant> ") appended.
    """
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        ids = tokenizer(_render_chat(tokenizer, prompt, True), add_special_tokens=False)["input_ids"]
    return _cut_left(list(ids), max_len, tokenizer.bos_token_id)


def encode_completion(tokenizer, text: str, max_len: int | None = None) -> tuple[list[int], bool]:
    """Raw-text token ids + EOS, cut from the right to max_len (a cut completion loses its EOS)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; completions end with EOS")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return _cut_right(ids, max_len)


def _assistant_spans(tokenizer, turns: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of assistant turns, found by rendering it turn by turn.

    Span i runs from the end of render(turns[:i], generation prompt) to the end of render(turns[:i+1]), so it holds
    the reply and whatever the template closes it with (an end-of-turn token): the model learns to stop.
    """
    full = _render_chat(tokenizer, turns, False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant" or i == 0:  # an opening assistant turn answers nothing: context, no loss
            continue
        before = _render_chat(tokenizer, turns[:i], True)
        upto = _render_chat(tokenizer, turns[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(f"the chat template does not render turn {i} as a continuation of the turns before it "
                            "(it rewrites earlier turns), so assistant tokens cannot be located", field="messages")
        spans.append((len(before), len(upto)))
    return full, spans


def _tokenize_with_mask(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and, per token, whether it starts inside one of the character spans."""
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        inside = [any(s <= start < e for s, e in spans) for start, _ in enc["offset_mapping"]]
        return list(enc["input_ids"]), inside
    # slow tokenizers have no offsets: tokenise the pieces between span boundaries one by one
    cuts = sorted({0, len(text), *(c for span in spans for c in span)})
    ids, inside = [], []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        ids += piece
        inside += [any(s <= a < e for s, e in spans)] * len(piece)
    return ids, inside


def _encode_chat_demonstration(tokenizer, turns, max_prompt_len, max_completion_len) -> Example:
    """Loss on the assistant turns; the prompt is everything before the first of them, the completion the rest."""
    text, spans = _assistant_spans(tokenizer, turns)
    ids, inside = _tokenize_with_mask(tokenizer, text, spans)
    first = inside.index(True) if True in inside else len(ids)
    prompt, p_cut = _cut_left(ids[:first], max_prompt_len, tokenizer.bos_token_id)
    rest, c_cut = _cut_right(ids[first:], max_completion_len)
    rest_inside = inside[first : first + len(rest)]
    labels = [IGNORE_INDEX] * len(prompt) + [t if m else IGNORE_INDEX for t, m in zip(rest, rest_inside)]
    return Example(prompt + rest, labels, p_cut, c_cut)


def encode_demonstration(tokenizer, record: dict, max_prompt_len: int | None = None,
                         max_completion_len: int | None = None) -> Example:
    """SFT row: prompt tokens (label IGNORE_INDEX) + completion tokens + EOS (labelled).

    A `messages` record is rendered by the chat template and labelled on every assistant turn after the first turn;
    the text before the first labelled turn counts as the prompt (cut left), the rest as the completion (cut right).
    """
    if "completion" not in record:
        return _encode_chat_demonstration(tokenizer, record["messages"], max_prompt_len, max_completion_len)
    prompt, p_cut = encode_prompt(tokenizer, prompt_of(record), max_prompt_len)
    completion, c_cut = encode_completion(tokenizer, record["completion"], max_completion_len)
    return Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, p_cut, c_cut)


def encode_pair(tokenizer, record: dict, max_prompt_len: int | None = None,
                max_completion_len: int | None = None) -> PairExample:
    """Preference pair: prompt ids once, chosen and rejected completions (+ EOS), margin (0 if absent), weight (1)."""
    prompt, p_cut = encode_prompt(tokenizer, prompt_of(record), max_prompt_len)
    chosen, c_cut = encode_completion(tokenizer, record["chosen"], max_completion_len)
    rejected, r_cut = encode_completion(tokenizer, record["rejected"], max_completion_len)
    return PairExample(prompt, chosen, rejected, float(record.get("margin", 0.0)), float(record.get("weight", 1.0)),
                       p_cut, c_cut, r_cut)


def encode_ranking(tokenizer, record: dict, max_prompt_len: int | None = None,
                   max_completion_len: int | None = None) -> RankingExample:
    """Ranking: prompt ids once, each of the K completions (+ EOS), ranking best to worst as given."""
    prompt, p_cut = encode_prompt(tokenizer, prompt_of(record), max_prompt_len)
    encoded = [encode_completion(tokenizer, text, max_completion_len) for text in record["completions"]]
    return RankingExample(prompt, [ids for ids, _ in encoded], list(record["ranking"]), p_cut,
                          [cut for _, cut in encoded])


def encode_unpaired(tokenizer, record: dict, max_prompt_len: int | None = None,
                    max_completion_len: int | None = None) -> UnpairedExample:
    """Unpaired feedback: prompt ids, completion ids (+ EOS) and the desirable/undesirable label."""
    prompt, p_cut = encode_prompt(tokenizer, prompt_of(record), max_prompt_len)
    completion, c_cut = encode_completion(tokenizer, record["completion"], max_completion_len)
    return UnpairedExample(prompt, completion, bool(record["label"]), p_cut, c_cut)


@dataclass
class TruncationStats:
    """How many encoded examples had their prompt (cut left) or any completion (cut right) truncated."""

    examples: int = 0
    prompts_truncated: int = 0
    completions_truncated: int = 0

    def update(self, example) -> None:
        self.examples += 1
        self.prompts_truncated += bool(example.prompt_truncated)
        self.completions_truncated += bool(example.completion_truncated)

    def as_dict(self) -> dict[str, int]:
        return {"examples": self.examples, "prompts_truncated": self.prompts_truncated,
                "completions_truncated": self.completions_truncated}

    def warn_if_any(self, logger: logging.Logger = log) -> bool:
        """Log one warning when anything was cut; returns whether it did."""
        if not (self.prompts_truncated or self.completions_truncated):
            return False
        logger.warning("truncated %d of %d prompts (from the left) and %d of %d completions (from the right); "
                       "raise max_prompt_len / max_completion_len to keep them whole", self.prompts_truncated,
                       self.examples, self.completions_truncated, self.examples)
        return True


# --- collation --------------------------------------------------------------------------------------------------------
def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """(N, T) LongTensor of the sequences padded with pad_value to the longest T; side "left" for generation prompts."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if pad_value is None:
        raise ValueError("pad_value is None: the tokenizer has no pad token (set tokenizer.pad_token)")
    if not seqs:
        raise ValueError("cannot pad an empty list of sequences")
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if side == "left":
                out[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            else:
                out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _lengths_mask(lengths: Sequence[int], side: str = "right") -> torch.Tensor:
    """(N, max length) long mask, 1 on the first (right padding) or last (left padding) `length` positions."""
    return pad_sequences([[1] * n for n in lengths], 0, side)


def collate_lm(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded language-modelling batch: input_ids, attention_mask, labels (IGNORE_INDEX on pad), all (B, T).

    Packed examples also give `position_ids` (B, T); their padding is a segment of its own (positions 0, 1, ...),
    which real tokens never see under the causal mask. Feed the model `model_inputs(batch)`.
    """
    batch = {
        "input_ids": pad_sequences([e.input_ids for e in examples], pad_id),
        "attention_mask": _lengths_mask([len(e.input_ids) for e in examples]),
        "labels": pad_sequences([e.labels for e in examples], IGNORE_INDEX),
    }
    if any(e.position_ids is not None for e in examples):
        width = batch["input_ids"].shape[1]
        batch["position_ids"] = torch.tensor([
            (e.position_ids if e.position_ids is not None else list(range(len(e.input_ids))))
            + list(range(width - len(e.input_ids))) for e in examples
        ])
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """The keyword arguments of a causal-LM training forward for a `collate_lm` batch (no KV cache).

    Packed batches get input_ids + position_ids and no attention_mask: given a 2D mask, transformers builds a plain
    causal mask over the whole row and packed examples would attend to each other; without one (and without a cache,
    hence use_cache=False) it finds the segments from the position restarts and builds the block-diagonal causal
    mask (`masking_utils.find_packed_sequence_indices`).
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def collate_completions(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                        pad_id: int) -> dict[str, torch.Tensor]:
    """Rows prompt_i + completion_i, right padded.

    Returns input_ids, attention_mask, response_mask (N, T): 1 on completion tokens at their own positions (so the
    next-token log-probs logits[:, :-1] -> tokens[:, 1:] take response_mask[:, 1:]); last_index (N,): position of the
    last real token of each row, where a reward model reads its score.
    """
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    lengths = [len(r) for r in rows]
    return {
        "input_ids": pad_sequences(rows, pad_id),
        "attention_mask": _lengths_mask(lengths),
        "response_mask": pad_sequences([[0] * len(p) + [1] * len(c) for p, c in zip(prompt_ids, completion_ids)], 0),
        "last_index": torch.tensor([n - 1 for n in lengths], dtype=torch.long),
    }


def collate_pairs(pairs: Sequence[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected in one batch for one forward: rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected.

    input_ids, attention_mask, response_mask (2B, T); last_index (2B,); margin, weight (B,) float32.
    """
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    batch = collate_completions(prompts, completions, pad_id)
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    batch["weight"] = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
    return batch


def collate_rankings(rankings: Sequence[RankingExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Every completion of every prompt as one row (N = sum of K), in completion order, for one forward.

    input_ids, attention_mask, response_mask (N, T); last_index (N,); group (N,): index of the row's example;
    rank (N,): place of the row's completion in its ranking, 0 = best.
    """
    prompts, completions, group, rank = [], [], [], []
    for g, ex in enumerate(rankings):
        place = {index: r for r, index in enumerate(ex.ranking)}
        for k, ids in enumerate(ex.completion_ids):
            prompts.append(ex.prompt_ids)
            completions.append(ids)
            group.append(g)
            rank.append(place[k])
    batch = collate_completions(prompts, completions, pad_id)
    batch["group"] = torch.tensor(group, dtype=torch.long)
    batch["rank"] = torch.tensor(rank, dtype=torch.long)
    return batch


def collate_unpaired(examples: Sequence[UnpairedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows prompt+completion as `collate_completions`, plus label (B,) bool."""
    batch = collate_completions([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id)
    batch["label"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    return batch


def collate_prompts(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation (new tokens follow the last column): input_ids, attention_mask (B, T)."""
    return {"input_ids": pad_sequences(prompt_ids, pad_id, "left"),
            "attention_mask": _lengths_mask([len(p) for p in prompt_ids], "left")}


# --- packing -------------------------------------------------------------------------------------------------------------
def pack_examples(examples: Sequence[Example], max_len: int) -> list[Example]:
    """Concatenate consecutive examples into rows of at most max_len tokens (next-fit, order kept).

    Each packed row has position_ids restarting at 0 for every example, and the label of each example's first token
    is IGNORE_INDEX: unpacked, nothing predicts that token; packed, the previous example's last token would. So the
    packed summed NLL equals the unpacked one exactly, provided the model gets `model_inputs(batch)`.
    """
    rows: list[Example] = []
    current: Example | None = None
    for ex in examples:
        n = len(ex.input_ids)
        if n > max_len:
            raise ValueError(f"an example of {n} tokens does not fit max_len={max_len}")
        if n == 0:
            continue
        if current is None or len(current.input_ids) + n > max_len:
            current = Example([], [], position_ids=[])
            rows.append(current)
        current.input_ids += ex.input_ids
        current.labels += [IGNORE_INDEX] + ex.labels[1:]
        current.position_ids += list(range(n))
        current.prompt_truncated |= ex.prompt_truncated
        current.completion_truncated |= ex.completion_truncated
    return rows


def prompt_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) real prompt tokens of each row of a collate_completions-style batch (attention minus response mask)."""
    return (batch["attention_mask"] - batch["response_mask"]).sum(1)


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-pad) tokens of a collated batch, for tokens/s."""
    return int(batch["attention_mask"].sum())
