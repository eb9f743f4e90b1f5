"""Records to token ids: the Example types, chat-template rendering and masking, prompt (cut left) and completion
(cut right) encoding, TruncationStats, encode_records.

Both of TRL's formats: a string prompt is raw text with the tokenizer's special tokens and a string completion raw
text + EOS; a chat prompt is rendered by the chat template with the generation prompt, and a chat completion (turns
after a chat prompt) is what the template renders after that: prompt + completion rendered as one conversation, the
text after the prompt's rendering tokenised on its own (the same prompt ids generation starts from; the completion
ends as the template ends a turn, not with an added EOS).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tether.data.schemas import DataError, extract_prompt, prompt_of

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens without loss (torch cross-entropy's ignore_index)


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
    prob: float | None = None  # a soft label: P(chosen preferred), trained as per-pair label smoothing 1 - prob
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


def _assistant_spans(tokenizer, turns: list[dict], first: int = 1,
                     field: str = "messages") -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of the assistant turns from turns[first] on, found by rendering it
    turn by turn (by default all but an opening assistant turn, which answers nothing: context, no loss).

    Span i runs from the end of render(turns[:i], generation prompt) to the end of render(turns[:i+1]), so it holds
    the reply and whatever the template closes it with (an end-of-turn token): the model learns to stop. A template
    that does not render each turn as a continuation of the ones before gives a DataError naming `field`.
    """
    full = _render_chat(tokenizer, turns, False)
    spans = []
    for i in range(first, len(turns)):
        if turns[i]["role"] != "assistant":
            continue
        before = _render_chat(tokenizer, turns[:i], True)
        upto = _render_chat(tokenizer, turns[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(f"the chat template does not render turn {i} as a continuation of the turns before it "
                            "(it rewrites earlier turns), so assistant tokens cannot be located", field=field)
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


def _chat_reply(tokenizer, prompt: list[dict], reply: list[dict], field: str) -> tuple[list[int], list[bool]]:
    """Token ids of what the chat template renders for `reply` after `prompt`, and per token whether it lies in one
    of the reply's assistant turns (their spans, as `_assistant_spans`).

    prompt + reply is rendered as one conversation and the text after render(prompt, generation prompt) is tokenised
    alone; DataError naming `field` when the conversation does not start with that rendering (a template that
    rewrites earlier turns) or the reply renders to nothing.
    """
    head = _render_chat(tokenizer, prompt, True)
    text, spans = _assistant_spans(tokenizer, prompt + reply, len(prompt), field)
    if not text.startswith(head):
        raise DataError("the chat template does not render the prompt with this reply as it renders the prompt "
                        "alone with the generation prompt (it rewrites earlier turns)", field=field)
    ids, inside = _tokenize_with_mask(tokenizer, text[len(head):], [(a - len(head), b - len(head)) for a, b in spans])
    if not ids:
        raise DataError("the chat template renders nothing for it", field=field)
    return ids, inside


def encode_reply(tokenizer, prompt: str | list[dict], reply: str | list[dict], max_len: int | None = None,
                 field: str = "completion") -> tuple[list[int], bool]:
    """Token ids of a completion that follows `prompt`, cut from the right to max_len; returns (ids, truncated).

    A string is `encode_completion`'s raw text + EOS; turns (after a chat prompt) the chat template's continuation
    of the prompt (`_chat_reply`), ending with the template's end of turn.
    """
    if isinstance(reply, str):
        return encode_completion(tokenizer, reply, max_len)
    return _cut_right(_chat_reply(tokenizer, prompt, reply, field)[0], max_len)


def _encode_text(tokenizer, text: str, max_len: int | None) -> Example:
    """Language modelling: the text with the tokenizer's special tokens + EOS (unless it ends with one), loss on
    every token, cut from the right."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; texts end with EOS")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    ids, cut = _cut_right(ids, max_len)
    return Example(ids, list(ids), False, cut)


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
    A chat prompt with a chat completion: the completion's tokens are the template's continuation (`_chat_reply`),
    labelled on its assistant turns. A `text` record is labelled on every token and cut from the right to
    max_prompt_len + max_completion_len (the length of a prompt + completion row).
    """
    if "completion" not in record:
        if "messages" in record:
            return _encode_chat_demonstration(tokenizer, record["messages"], max_prompt_len, max_completion_len)
        total = None if max_prompt_len is None or max_completion_len is None else max_prompt_len + max_completion_len
        return _encode_text(tokenizer, record["text"], total)
    prompt, p_cut = encode_prompt(tokenizer, prompt_of(record), max_prompt_len)
    if isinstance(record["completion"], list):
        ids, inside = _chat_reply(tokenizer, prompt_of(record), record["completion"], "completion")
        ids, c_cut = _cut_right(ids, max_completion_len)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, inside)]
        return Example(prompt + ids, [IGNORE_INDEX] * len(prompt) + labels, p_cut, c_cut)
    completion, c_cut = encode_completion(tokenizer, record["completion"], max_completion_len)
    return Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, p_cut, c_cut)


def encode_pair(tokenizer, record: dict, max_prompt_len: int | None = None,
                max_completion_len: int | None = None) -> PairExample:
    """Preference pair: prompt ids once, chosen and rejected completions (`encode_reply`: strings + EOS, or turns
    through the chat template), margin (0 if absent), weight (1). An implicit prompt is extracted first."""
    record = extract_prompt(record)
    prompt = prompt_of(record)
    prompt_ids, p_cut = encode_prompt(tokenizer, prompt, max_prompt_len)
    chosen, c_cut = encode_reply(tokenizer, prompt, record["chosen"], max_completion_len, "chosen")
    rejected, r_cut = encode_reply(tokenizer, prompt, record["rejected"], max_completion_len, "rejected")
    prob = record.get("prob")
    return PairExample(prompt_ids, chosen, rejected, float(record.get("margin", 0.0)), float(record.get("weight", 1.0)),
                       None if prob is None else float(prob), p_cut, c_cut, r_cut)


def encode_ranking(tokenizer, record: dict, max_prompt_len: int | None = None,
                   max_completion_len: int | None = None) -> RankingExample:
    """Ranking: prompt ids once, each of the K completions (+ EOS), ranking best to worst as given."""
    prompt, p_cut = encode_prompt(tokenizer, prompt_of(record), max_prompt_len)
    encoded = [encode_completion(tokenizer, text, max_completion_len) for text in record["completions"]]
    return RankingExample(prompt, [ids for ids, _ in encoded], list(record["ranking"]), p_cut,
                          [cut for _, cut in encoded])


def encode_unpaired(tokenizer, record: dict, max_prompt_len: int | None = None,
                    max_completion_len: int | None = None) -> UnpairedExample:
    """Unpaired feedback: prompt ids, completion ids (`encode_reply`) and the desirable/undesirable label."""
    prompt, p_cut = encode_prompt(tokenizer, prompt_of(record), max_prompt_len)
    completion, c_cut = encode_reply(tokenizer, prompt_of(record), record["completion"], max_completion_len)
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



def encode_records(encode, tokenizer, records, max_prompt_len: int | None = None, max_completion_len: int | None = None,
                   logger: logging.Logger = log) -> tuple[list, TruncationStats]:
    """`encode(tokenizer, record, max_prompt_len, max_completion_len)` of every record, truncation counted and warned
    about once. A DataError raised while encoding (a chat template that rewrites earlier turns) names the record's
    file and line when `records` is a `readers.Records`."""
    stats, out = TruncationStats(), []
    lines = getattr(records, "lines", [])
    for i, record in enumerate(records):
        try:
            example = encode(tokenizer, record, max_prompt_len, max_completion_len)
        except DataError as e:
            e.path, e.line = getattr(records, "path", None), lines[i] if i < len(lines) else None
            raise
        stats.update(example)
        out.append(example)
    stats.warn_if_any(logger)
    return out, stats
