"""Record kinds and what a valid one is: DataError, SCHEMAS (a check per kind), validate_record; prompt_of,
extract_prompt, expand_ranking.

Beyond the field types of each kind (data/__init__.py lists them), a valid record has
- strings that are valid Unicode: no lone surrogate ("\\ud800" in the JSON text decodes, but tokenizers crash on it);
- pairs: `margin` finite with |margin| <= 1e4 (MAX_MARGIN), `weight` with 0 < weight <= 1e4 (MAX_WEIGHT): larger
  values give a non-finite loss; `prob` (a soft label, P(chosen preferred)) in [0, 1];
- verifiable: `tests` (each item of a list, or the one string) that compiles as Python, and a string form with at
  least one statement; nothing is run here;
- a completion given as turns (TRL's conversational format) follows a chat prompt and opens with an assistant turn;
  a pair's chosen and rejected are both strings or both turns; a pair without a prompt has it implicit in chosen and
  rejected (`extract_prompt`, which says what a valid implicit prompt is).
Validation never recurses into values and prints them in messages through `_show`, which never raises: a deeply
nested value gives a DataError (or passes), never a RecursionError.
"""

from __future__ import annotations

import ast
import math
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path


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


# --- checks, one per record kind --------------------------------------------------------------------------------------
def _type_name(value) -> str:
    """The JSON name of a Python value's type, for messages."""
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (str, "string"), ((int, float), "number"), (list, "list"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


MAX_MARGIN = 1e4  # |margin| <= MAX_MARGIN
MAX_WEIGHT = 1e4  # 0 < weight <= MAX_WEIGHT


def _is_number(value) -> bool:
    """A finite int or float, not a bool (an int is finite however long: math.isfinite would overflow on it)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _show(value, limit: int = 40) -> str:
    """repr(value) for a message, cut to `limit` characters; never raises (a value nested too deep to print gives
    its type name, an int too long to print its size)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested past the recursion limit; an int past sys.get_int_max_str_digits
        if isinstance(value, int):
            return f"an integer of about {round(value.bit_length() * math.log10(2))} digits"
        return _type_name(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _lone_surrogate(text: str) -> str | None:
    """The message for a string holding a lone surrogate (not valid Unicode, cannot be encoded), else None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"contains a lone surrogate (\\u{ord(text[e.start]):04x}) at character {e.start}, not valid Unicode"
    return None


def _text(value, name: str) -> str:
    """A non-empty string of valid Unicode, or DataError naming the field."""
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {_type_name(value)}", field=name)
    if not value.strip():
        raise DataError("is empty", field=name)
    problem = _lone_surrogate(value)
    if problem:
        raise DataError(problem, field=name)
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


def _chat_prompt(record: dict) -> bool:
    """Whether the record's prompt is chat turns (`prompt` as turns, or `messages`)."""
    return isinstance(record["prompt"], list) if "prompt" in record else "messages" in record


def _check_reply(record: dict, name: str) -> None:
    """A completion after the record's prompt: a string; after a chat prompt also turns, the first the assistant's."""
    value, chat = _required(record, name), _chat_prompt(record)
    if not isinstance(value, list):
        if chat and not isinstance(value, str):
            raise DataError(f"must be a string or a list of turns, got {_type_name(value)}", field=name)
        _text(value, name)
        return
    if not chat:
        raise DataError("is a list of turns but the prompt is a string; give the prompt as turns too (TRL's "
                        "conversational format: every field a list of turns)", field=name)
    _check_messages(value, name)
    _assistant_at(value, 0, name, "a conversational completion opens with the assistant's reply")


def _assistant_at(turns: list, i: int, name: str, why: str) -> None:
    if turns[i]["role"] != "assistant":
        raise DataError(f"must be 'assistant' ({why}), got {_show(turns[i]['role'])}", field=f"{name}[{i}].role")


def _check_demonstration(record: dict) -> None:
    if "text" in record and not any(k in record for k in ("prompt", "messages", "completion")):
        _text(record["text"], "text")  # language modelling: loss on every token
        return
    if "messages" in record and "prompt" not in record and "completion" not in record:
        turns = record["messages"]
        _check_messages(turns, "messages")
        if not any(t["role"] == "assistant" for t in turns[1:]):
            raise DataError("needs an assistant turn after the first turn (the loss is on assistant turns)",
                            field="messages")
        return
    _check_prompt(record)
    _check_reply(record, "completion")


def _check_pair(record: dict) -> None:
    if "prompt" in record or "messages" in record:
        _check_prompt(record)
        _check_reply(record, "chosen")
        _check_reply(record, "rejected")
        if isinstance(record["chosen"], list) != isinstance(record["rejected"], list):
            form = "a list of turns" if isinstance(record["chosen"], list) else "a string"
            raise DataError(f"must be {form} like 'chosen'", field="rejected")
    elif "chosen" in record or "rejected" in record:
        extract_prompt(record)  # the implicit prompt: raises naming the field when there is none to extract
    else:
        raise DataError("missing (a prompt is 'prompt' or 'messages', or implicit in 'chosen' and 'rejected')",
                        field="prompt")
    if "margin" in record:
        margin = record["margin"]
        if not _is_number(margin):
            raise DataError(f"must be a finite number, got {_type_name(margin)}", field="margin")
        if abs(margin) > MAX_MARGIN:
            raise DataError(f"must be a number with |margin| <= 1e4, got {_show(margin)}", field="margin")
    if "weight" in record:
        weight = record["weight"]
        if not (_is_number(weight) and weight > 0):
            raise DataError(f"must be a number > 0, got {_show(weight)}", field="weight")
        if weight > MAX_WEIGHT:
            raise DataError(f"must be a number with 0 < weight <= 1e4, got {_show(weight)}", field="weight")
    if "prob" in record:  # an AI soft label (tether label ai): P(chosen preferred)
        prob = record["prob"]
        if not (_is_number(prob) and 0 <= prob <= 1):
            raise DataError(f"must be a probability in [0, 1], got {_show(prob)}", field="prob")
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
            raise DataError(f"index {_show(index)} out of range for {k} completions", field=f"ranking[{i}]")
        if index in seen:
            raise DataError(f"index {_show(index)} appears twice", field=f"ranking[{i}]")
        seen.add(index)
    if len(seen) != k:
        missing = sorted(set(range(k)) - seen)
        raise DataError(f"must order all {k} completions (a permutation of 0..{k - 1}); missing {missing}",
                        field="ranking")


def _check_unpaired(record: dict) -> None:
    _check_prompt(record)
    _check_reply(record, "completion")
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
        tests = record["tests"]
        if isinstance(tests, list):
            for i, code in enumerate(_text_list(tests, "tests")):
                _check_python(code, f"tests[{i}]")
        elif not _check_python(_text(tests, "tests"), "tests").body:
            # the sandbox runs each top-level statement of a string; with none there is no test to run
            raise DataError("has no statements to run (only comments)", field="tests")


def _check_python(code: str, name: str) -> ast.Module:
    """Parse and compile `code` as a module, without running it; DataError naming the field if it is not Python."""
    try:
        with warnings.catch_warnings():  # SyntaxWarnings (e.g. an assert on a tuple) are the sandbox's to show
            warnings.simplefilter("ignore")
            tree = ast.parse(code, "<tests>")
            compile(tree, "<tests>", "exec")
    except SyntaxError as e:  # IndentationError and TabError included
        line = f" (line {e.lineno})" if e.lineno else ""
        raise DataError(f"not valid Python: {e.msg}{line}", field=name) from None
    except ValueError as e:  # a null byte, before Python 3.12
        raise DataError(f"not valid Python: {e}", field=name) from None
    except (RecursionError, MemoryError):  # the parser's own stack, on deeply nested expressions
        raise DataError("not valid Python: nested too deeply to compile", field=name) from None
    return tree


def _check_steps(record: dict) -> None:
    _check_prompt(record)
    steps = _text_list(_required(record, "steps"), "steps")
    labels = _required(record, "labels")
    if not isinstance(labels, list):
        raise DataError(f"must be a list of step labels (+1 / 0 / -1), got {_type_name(labels)}", field="labels")
    for i, label in enumerate(labels):
        if not (isinstance(label, bool) or (isinstance(label, int) and label in (-1, 0, 1))):
            raise DataError(f"must be 1, 0, -1 (PRM800K: good, neutral, wrong), true or false, got {_show(label)}",
                            field=f"labels[{i}]")
        if i and (labels[i - 1] is False or (not isinstance(labels[i - 1], bool) and labels[i - 1] == -1)):
            raise DataError(f"follows the wrong step {i - 1}: labels stop at the first wrong step",
                            field=f"labels[{i}]")
    wrong_last = bool(labels) and (labels[-1] is False or (not isinstance(labels[-1], bool) and labels[-1] == -1))
    if len(labels) > len(steps) or (len(labels) < len(steps) and not wrong_last):
        raise DataError(f"has {len(labels)} labels for {len(steps)} steps (fewer only when labelling stopped at a "
                        "wrong step, -1)", field="labels")


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


def _copied_prompt(record: dict, kind: str) -> dict:
    """A record that holds its conversation whole *and* a copy of the user's first words as a string `prompt` (the
    shape of HuggingFaceH4's ultrafeedback_binarized and ultrachat_200k) -> the same record without the copies.

    - demonstrations: `prompt` (a string) beside `messages` and no `completion` -> `messages` alone;
    - pairs: `prompt` a string, `chosen` and `rejected` turns -> the prompt the turns share (`extract_prompt`), and
      `messages` dropped when it only repeats `chosen`.
    The string must be the content of a user turn of the conversation it copies, else DataError naming `prompt`.
    Any other record comes back as it is.
    """
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        return record
    if kind == "demonstrations" and isinstance(record.get("messages"), list) and "completion" not in record:
        _check_messages(record["messages"], "messages")
        turns = record["messages"]
    elif kind == "pairs" and isinstance(record.get("chosen"), list) and isinstance(record.get("rejected"), list):
        _check_messages(record["chosen"], "chosen")
        _check_messages(record["rejected"], "rejected")
        if record.get("messages") not in (None, record["chosen"]):
            return record  # prompt and messages both meant as the prompt: _check_prompt names it
        if record["chosen"][0]["role"] == "assistant":
            return record  # the turns start at the reply: _check_reply asks for the prompt as turns
        explicit = extract_prompt({k: v for k, v in record.items() if k not in ("prompt", "messages")})
        turns = explicit["prompt"]
        record = {**explicit, "prompt": prompt}  # checked below, then replaced by the turns
    else:
        return record
    if not any(t["role"] == "user" and t["content"] == prompt for t in turns):
        raise DataError("is a string that no user turn of the conversation repeats; give the prompt as turns (or "
                        "leave it out) when the conversation is given whole", field="prompt")
    if kind == "demonstrations":
        return {k: v for k, v in record.items() if k != "prompt"}
    return {**record, "prompt": turns}


def validate_record(record, kind: str, path: str | Path = "<memory>", line: int | None = None) -> dict:
    """Check one record against the schema of `kind`; returns it (a copied string prompt dropped: `_copied_prompt`)
    or raises DataError(path, line, field)."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(RECORD_KINDS)}")
    try:
        if not isinstance(record, dict):
            hint = " (one JSON object per line, not a JSON array)" if isinstance(record, list) else ""
            raise DataError(f"expected a JSON object, got {_type_name(record)}{hint}")
        record = _copied_prompt(record, kind)
        SCHEMAS[kind](record)
    except DataError as e:
        e.path, e.line = path, line
        raise
    return record


def prompt_of(record: dict):
    """The prompt of a record: a string or a list of chat turns (of a pair with an implicit prompt: extracted)."""
    if "prompt" in record:
        return record["prompt"]
    return record["messages"] if "messages" in record else extract_prompt(record)["prompt"]


def extract_prompt(record: dict) -> dict:
    """A pair with an implicit prompt (TRL: no `prompt`, `chosen` and `rejected` hold all of it) made explicit:
    {**record, "prompt": their common start, "chosen": the rest, "rejected": the rest}. A record with a prompt
    comes back as it is. DataError naming the field when there is no prompt to extract:
    - turns: the prompt is the longest common run of first turns; it must be non-empty and, in each of chosen and
      rejected, be followed by an assistant turn (the reply the pair compares);
    - strings: the prompt ends at the last whitespace before the first difference, so that the completions start
      with it (" blue." / " green."; TRL cuts at the character, mid-word too); it may be empty.
    """
    if "prompt" in record or "messages" in record:
        return record
    chosen, rejected = _required(record, "chosen"), _required(record, "rejected")
    if isinstance(chosen, list) or isinstance(rejected, list):
        _check_messages(chosen, "chosen")
        _check_messages(rejected, "rejected")
        n = 0
        while n < min(len(chosen), len(rejected)) and _same_turn(chosen[n], rejected[n]):
            n += 1
        if n == 0:
            raise DataError("shares no first turn with 'rejected', so there is no implicit prompt; give 'prompt'",
                            field="chosen")
        for name, turns in (("chosen", chosen), ("rejected", rejected)):
            if n == len(turns):
                raise DataError(f"has no turn after the {n} turn(s) it shares with the other side (the implicit "
                                "prompt); the pair compares nothing", field=name)
            _assistant_at(turns, n, name, f"the first turn after the {n} shared turn(s) of the implicit prompt")
    else:
        _text(chosen, "chosen")
        _text(rejected, "rejected")
        common = os.path.commonprefix([chosen, rejected])
        n = max((m.start() for m in re.finditer(r"\s", common)), default=0)
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text[n:].strip():
                raise DataError("is empty after the implicit prompt (the text it shares with the other side)",
                                field=name)
    return {**record, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _same_turn(a: dict, b: dict) -> bool:
    return (a["role"], a["content"]) == (b["role"], b["content"])


def expand_ranking(record: dict) -> list[dict]:
    """All C(K, 2) pairs of a ranking record, better completion as `chosen` (InstructGPT's RM data)."""
    order, texts = record["ranking"], record["completions"]
    key = "prompt" if "prompt" in record else "messages"
    return [{key: record[key], "chosen": texts[order[i]], "rejected": texts[order[j]]}
            for i in range(len(order)) for j in range(i + 1, len(order))]

