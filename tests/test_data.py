"""Tests of tether.data: validation messages (file, line, field), readers, tokenisation and truncation, chat-template
masking, collation layouts and the exactness of packing on the tiny Llama."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from tether import data as D
from tether.testing import tiny_causal_lm, tiny_tokenizer

IGN = D.IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return tiny_tokenizer(chat_template=True)


def ids(tokenizer, words: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(words.split())


def write_lines(path, lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


GOOD_PAIR = json.dumps({"prompt": "the film", "chosen": "was good", "rejected": "was bad"})


# --- errors -----------------------------------------------------------------------------------------------------------
def test_data_error_message_has_the_known_parts():
    assert str(D.DataError("is empty", "a.jsonl", 3, "prompt")) == "a.jsonl:3: field 'prompt': is empty"
    assert str(D.DataError("no records", "a.jsonl")) == "a.jsonl: no records"
    assert str(D.DataError("invalid JSON", "a.jsonl", 7)) == "a.jsonl:7: invalid JSON"
    assert str(D.DataError("is empty", field="prompt")) == "field 'prompt': is empty"
    e = D.DataError("m", "p", 2, "f")
    assert (e.path, e.line, e.field, e.message) == ("p", 2, "f", "m") and isinstance(e, ValueError)


# (kind, bad line, field, words of the message); the bad record is line 3 after a good line and a blank line
ERROR_CASES = [
    ("pairs", '{"prompt": "the film", "chosen": "was good"}', "rejected", "missing"),
    ("pairs", '{"prompt": "the film", "chosen": 3, "rejected": "bad"}', "chosen", "must be a string, got number"),
    ("pairs", '{"prompt": "", "chosen": "good", "rejected": "bad"}', "prompt", "is empty"),
    ("pairs", '{"prompt": " \\t ", "chosen": "good", "rejected": "bad"}', "prompt", "is empty"),
    ("pairs", '{"prompt": "p", "chosen": "good", "rejected": "bad", "weight": 0}', "weight", "must be a number > 0"),
    ("pairs", '{"prompt": "p", "chosen": "good", "rejected": "bad", "margin": "big"}', "margin", "finite number"),
    ("pairs", '{"prompt": "p", "messages": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"}',
     "messages", "not both"),
    ("prompts", '{"messages": [{"role": "user"}]}', "messages[0].content", "missing"),
    ("prompts", '{"messages": "hello"}', "messages", "must be a list of turns, got string"),
    ("prompts", '{"text": "hello"}', "prompt", "missing"),
    ("demonstrations", '{"messages": [{"role": "user", "content": "hi"}]}', "messages", "needs an assistant turn"),
    ("demonstrations", '{"prompt": "hi"}', "completion", "missing"),
    ("rankings", '{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 3, 1]}', "ranking[1]",
     "index 3 out of range for 3 completions"),
    ("rankings", '{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 2, 1]}', "ranking[1]",
     "index 2 appears twice"),
    ("rankings", '{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0]}', "ranking", "missing [1]"),
    ("rankings", '{"prompt": "p", "completions": ["a"], "ranking": [0]}', "completions", "at least 2 items, got 1"),
    ("rankings", '{"prompt": "p", "completions": ["a", "b"], "ranking": [0, true]}', "ranking[1]", "integer"),
    ("unpaired", '{"prompt": "p", "completion": "c", "label": 1}', "label", "true or false, got number"),
    ("verifiable", '{"prompt": "p"}', "answer", "needs 'answer' or 'tests'"),
    ("verifiable", '{"prompt": "p", "tests": ["assert f(1) == 2", ""]}', "tests[1]", "is empty"),
    ("steps", '{"prompt": "p", "steps": ["a", "b"], "labels": [1]}', "labels", "has 1 labels for 2 steps"),
    ("steps", '{"prompt": "p", "steps": ["a", "b"], "labels": [1, 2]}', "labels[1]", "must be 1, 0, -1 (PRM800K"),
    ("steps", '{"prompt": "p", "steps": ["a", "b"], "labels": [-1, 1]}', "labels[1]",
     "follows the wrong step 0: labels stop at the first wrong step"),
    ("steps", '{"prompt": "p", "steps": ["a"], "labels": [1, 1]}', "labels", "has 2 labels for 1 steps"),
    # whole-line errors carry no field
    ("pairs", '{"prompt": "p", "chosen": ', None, "invalid JSON"),
    ("pairs", '["p", "good", "bad"]', None, "expected a JSON object, got list (one JSON object per line"),
    ("pairs", '"just a string"', None, "expected a JSON object, got string"),
    ("pairs", b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', None, "invalid UTF-8 at byte 15"),
]


@pytest.mark.parametrize("kind,bad,field,words", ERROR_CASES)
def test_each_error_names_file_line_and_field(tmp_path, kind, bad, field, words):
    good = {"pairs": GOOD_PAIR, "prompts": '{"prompt": "hi"}', "demonstrations": '{"prompt": "a", "completion": "b"}',
            "rankings": '{"prompt": "p", "completions": ["a", "b"], "ranking": [1, 0]}',
            "unpaired": '{"prompt": "p", "completion": "c", "label": false}', "verifiable": '{"prompt": "p", "answer": 4}',
            "steps": '{"prompt": "p", "steps": ["a"], "labels": [true]}'}[kind]
    path = write_lines(tmp_path / "data.jsonl", [good, "   ", bad, good])
    with pytest.raises(D.DataError) as info:
        D.load_records(path, kind)
    e = info.value
    assert (e.path, e.line, e.field) == (path, 3, field)
    prefix = f"{path}:3: field '{field}': " if field else f"{path}:3: "
    assert str(e).startswith(prefix) and words in str(e), str(e)


def test_empty_and_missing_files(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(D.DataError) as info:
        D.load_records(empty, "pairs")
    assert str(info.value) == f"{empty}: no pairs records" and info.value.line is None
    with pytest.raises(D.DataError, match="no such file"):
        D.load_records(tmp_path / "absent.jsonl", "pairs")
    with pytest.raises(D.DataError, match="unsupported format '.csv'"):
        D.load_records(write_lines(tmp_path / "a.csv", ["x"]), "pairs")
    with pytest.raises(D.DataError, match="not a readable Parquet file"):
        D.load_records(write_lines(tmp_path / "a.parquet", ["x"]), "pairs")
    with pytest.raises(D.DataError, match="not a dataset saved"):
        D.load_records(tmp_path, "pairs")
    with pytest.raises(ValueError, match="unknown record kind 'pair'"):
        D.load_records(empty, "pair")


def test_validate_record_in_memory():
    record = {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1, "weight": 0.5, "rater": "r7", "id": 9}
    assert D.validate_record(record, "pairs") is record  # extra field "id" kept, record unchanged
    with pytest.raises(D.DataError) as info:
        D.validate_record({"prompt": "p", "chosen": "a", "rejected": "b", "weight": -1.0}, "pairs", line=4)
    assert str(info.value) == "<memory>:4: field 'weight': must be a number > 0, got -1.0"
    with pytest.raises(D.DataError, match="finite"):
        D.validate_record({"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")}, "pairs")


def test_valid_records_of_every_kind():
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    valid = {
        "prompts": [{"prompt": "hi"}, {"messages": turns[:1]}],
        "demonstrations": [{"prompt": "a", "completion": "b"}, {"messages": turns}, {"prompt": turns[:1],
                                                                                   "completion": "b"}],
        "pairs": [{"messages": turns[:1], "chosen": "a", "rejected": "b"}, {"prompt": turns[:1], "chosen": "a",
                                                                             "rejected": "b"}],
        "rankings": [{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]}],
        "unpaired": [{"prompt": "p", "completion": "c", "label": True}],
        "verifiable": [{"prompt": "p", "answer": "85"}, {"prompt": "p", "answer": 2.5}, {"prompt": "p", "tests": "t"},
                       {"prompt": "p", "tests": ["t1", "t2"]}],
        "steps": [{"prompt": "p", "steps": ["a", "b", "c"], "labels": [1, 0, True]},
                  {"prompt": "p", "steps": ["a", "b", "c"], "labels": [1, -1]}],  # labelling stopped at step 1
    }
    assert set(valid) == set(D.RECORD_KINDS)
    for kind, records in valid.items():
        for record in records:
            assert D.validate_record(record, kind) is record


def test_skip_invalid_reports_lines_and_warns(tmp_path, caplog):
    bad_weight = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "weight": 0})
    path = write_lines(tmp_path / "p.jsonl", [GOOD_PAIR, "{oops", GOOD_PAIR, bad_weight, GOOD_PAIR, b"\xff"])
    with caplog.at_level(logging.WARNING, logger="tether.data"):
        records = D.load_records(path, "pairs", skip_invalid=True)
    assert len(records) == 3 and records.path == path and records.kind == "pairs"
    assert [line for line, _ in records.skipped] == [2, 4, 6]
    assert records.skipped[1][1] == f"{path}:4: field 'weight': must be a number > 0, got 0"
    assert "skipped 3 invalid pairs record(s) (lines 2, 4, 6)" in caplog.text
    with pytest.raises(D.DataError, match=r":2: invalid JSON"):  # without skip_invalid the first error raises
        D.load_records(path, "pairs")
    with pytest.raises(D.DataError, match="no pairs records; all 2 were invalid"):
        D.load_records(write_lines(tmp_path / "q.jsonl", ["{oops", bad_weight]), "pairs", skip_invalid=True)


PAIR_HEAD = '{"prompt": "p", "chosen": "a", "rejected": "b"'
# (kind, offending line, its exact message after "<path>:2: "): lines that gave a traceback or passed bad values
HOSTILE_CASES = [
    ("pairs", PAIR_HEAD + ', "margin": ' + "1" * 5000 + "}", "invalid JSON: an integer of more than 4300 digits"),
    ("pairs", "[" * 100000 + "]" * 100000, "invalid JSON: nested more than 100 levels deep"),  # RecursionError
    ("pairs", PAIR_HEAD + ', "meta": ' + "[" * 150 + "]" * 150 + "}", "invalid JSON: nested more than 100 levels deep"),
    ("pairs", '{"prompt": "p\\ud800", "chosen": "a", "rejected": "b"}',
     "field 'prompt': contains a lone surrogate (\\ud800) at character 1, not valid Unicode"),
    ("pairs", '{"messages": [{"role": "user", "content": "h\\u00e9 \\udc00"}], "chosen": "a", "rejected": "b"}',
     "field 'messages[0].content': contains a lone surrogate (\\udc00) at character 3, not valid Unicode"),
    ("rankings", '{"prompt": "p", "completions": ["a", "\\udbff"], "ranking": [1, 0]}',
     "field 'completions[1]': contains a lone surrogate (\\udbff) at character 0, not valid Unicode"),
    ("pairs", PAIR_HEAD + ', "margin": 1e308}', "field 'margin': must be a number with |margin| <= 1e4, got 1e+308"),
    ("pairs", PAIR_HEAD + ', "margin": -10000.5}', "field 'margin': must be a number with |margin| <= 1e4, got -10000.5"),
    ("pairs", PAIR_HEAD + ', "margin": 1' + "0" * 400 + "}",  # an int too big for math.isfinite (OverflowError)
     "field 'margin': must be a number with |margin| <= 1e4, got 1" + "0" * 36 + "..."),
    ("pairs", PAIR_HEAD + ', "weight": 1e308}', "field 'weight': must be a number with 0 < weight <= 1e4, got 1e+308"),
    ("verifiable", '{"prompt": "p", "tests": "def ("}', "field 'tests': not valid Python: invalid syntax (line 1)"),
    ("verifiable", '{"prompt": "p", "tests": ["assert f(1) == 2", "x = 1\\n  y = 2"]}',
     "field 'tests[1]': not valid Python: unexpected indent (line 2)"),
    ("verifiable", '{"prompt": "p", "tests": "return 1"}',  # parses, but does not compile
     "field 'tests': not valid Python: 'return' outside function (line 1)"),
    ("verifiable", '{"prompt": "p", "tests": ["' + "+1" * 100000 + '"]}',
     "field 'tests[0]': not valid Python: nested too deeply to compile"),
    ("verifiable", '{"prompt": "p", "tests": "# todo"}', "field 'tests': has no statements to run (only comments)"),
]


@pytest.mark.parametrize("kind,bad,message", HOSTILE_CASES)
def test_hostile_lines_give_one_line_errors_and_are_skipped(tmp_path, kind, bad, message):
    good = {"pairs": GOOD_PAIR, "rankings": '{"prompt": "p", "completions": ["a", "b"], "ranking": [1, 0]}',
            "verifiable": '{"prompt": "p", "tests": "assert 1 + 1 == 2"}'}[kind]
    path = write_lines(tmp_path / "data.jsonl", [good, bad, good])
    with pytest.raises(D.DataError) as info:
        D.load_records(path, kind)
    assert str(info.value) == f"{path}:2: {message}" and info.value.line == 2
    records = D.load_records(path, kind, skip_invalid=True)
    assert len(records) == 2 and records.skipped == [(2, f"{path}:2: {message}")]


def test_bounds_and_checks_pass_what_is_valid(tmp_path):
    for margin, weight in ((1e4, 1e4), (-1e4, 1e-9), (10000, 1)):
        D.validate_record({"prompt": "p", "chosen": "a", "rejected": "b", "margin": margin, "weight": weight}, "pairs")
    # brackets inside strings are not nesting; a surrogate pair written in JSON is one valid character; tests are
    # compiled, never run (this one would end the test)
    lines = [PAIR_HEAD + ', "meta": "' + "[{" * 500 + '"}', '{"prompt": "\\ud83d\\ude00", "chosen": "a", "rejected": "b"}',
             PAIR_HEAD + ', "meta": ' + "[" * 99 + "]" * 99 + "}"]  # 100 levels with the object
    assert len(D.load_records(write_lines(tmp_path / "ok.jsonl", lines), "pairs")) == 3
    D.validate_record({"prompt": "p", "tests": "raise SystemExit(3)"}, "verifiable")
    D.validate_record({"prompt": "p", "tests": ["# a list item is one test, comments alone pass"]}, "verifiable")


def test_validation_never_raises_recursion_or_overflow_in_memory():
    deep = 0
    for _ in range(100000):
        deep = [deep]
    with pytest.raises(D.DataError) as info:
        D.validate_record({"prompt": "p", "steps": ["a"], "labels": [deep]}, "steps")
    assert str(info.value) == ("<memory>: field 'labels[0]': must be 1, 0, -1 (PRM800K: good, neutral, wrong), true or false, "
                               "got list")
    with pytest.raises(D.DataError, match=r"field 'weight': must be a number with 0 < weight <= 1e4, got an integer of about 5000 digits$"):
        D.validate_record({"prompt": "p", "chosen": "a", "rejected": "b", "weight": 10**5000}, "pairs")
    with pytest.raises(D.DataError, match=r"field 'weight': must be a number > 0, got list$"):
        D.validate_record({"prompt": "p", "chosen": "a", "rejected": "b", "weight": deep}, "pairs")
    assert D.validate_record({"prompt": "p", "answer": 10**400}, "verifiable")  # a long int answer is finite


# --- readers ------------------------------------------------------------------------------------------------------------
RECORDS = [
    {"prompt": "the film", "chosen": "was good", "rejected": "was bad", "margin": 1.5, "rater": "r1"},
    {"prompt": "café ☕", "chosen": "fine", "rejected": "awful", "weight": 2.0},
    {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "no"},
]


def test_jsonl_round_trip_keeps_extra_fields_and_unicode(tmp_path):
    path = D.write_jsonl(tmp_path / "sub" / "pairs.jsonl", [{**r, "id": i} for i, r in enumerate(RECORDS)])
    assert "café ☕" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    records = D.load_records(path, "pairs")
    assert list(records) == [{**r, "id": i} for i, r in enumerate(RECORDS)]
    bom = tmp_path / "bom.json"  # .json lines files with a byte order mark read the same
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert list(D.load_records(bom, "pairs")) == list(records)


def test_parquet_round_trip_and_row_lines(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    columns = {key: [r.get(key) for r in RECORDS[:2]] for key in ("prompt", "chosen", "rejected", "margin", "rater",
                                                                  "weight")}
    pq.write_table(pa.Table.from_pydict(columns), path)
    # a table holds null where a record lacks a field; those read back as absent
    assert list(D.load_records(path, "pairs")) == RECORDS[:2]
    bad = tmp_path / "bad.parquet"
    datasets.Dataset.from_list([RECORDS[0], {**RECORDS[0], "chosen": " "}]).to_parquet(str(bad))
    with pytest.raises(D.DataError) as info:
        D.load_records(bad, "pairs")
    assert str(info.value) == f"{bad}:2: field 'chosen': is empty"


def test_saved_dataset_round_trip_and_row_lines(tmp_path):
    import datasets

    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [{"messages": turns}, {"messages": turns + [{"role": "user", "content": "and ?"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert list(D.load_records(tmp_path / "ds", "demonstrations")) == rows
    datasets.Dataset.from_list(rows + [{"messages": turns[:1]}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(D.DataError) as info:
        D.load_records(tmp_path / "bad", "demonstrations")
    assert info.value.line == 3 and info.value.field == "messages"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(D.DataError, match="DatasetDict.*dd/train"):
        D.load_records(tmp_path / "dd", "demonstrations")


def test_expand_ranking_gives_all_pairs_best_first():
    record = {"prompt": "p", "completions": ["x", "y", "z"], "ranking": [2, 0, 1], "rater": "r"}  # z > x > y
    assert D.expand_ranking(record) == [
        {"prompt": "p", "chosen": "z", "rejected": "x"},
        {"prompt": "p", "chosen": "z", "rejected": "y"},
        {"prompt": "p", "chosen": "x", "rejected": "y"},
    ]


# --- tokenisation -------------------------------------------------------------------------------------------------------
def test_encode_prompt_and_completion(tok):
    assert ids(tok, "the film was good") == [6, 11, 21, 28]
    assert D.encode_prompt(tok, "the film was good") == ([6, 11, 21, 28], False)
    # prompt cut from the LEFT: the last 2 tokens stay
    assert D.encode_prompt(tok, "the film was good", max_len=2) == ([21, 28], True)
    # completion: raw text + EOS (id 1), cut from the RIGHT; a cut completion loses its EOS
    assert D.encode_completion(tok, "was good") == ([21, 28, 1], False)
    assert D.encode_completion(tok, "was good", max_len=3) == ([21, 28, 1], False)
    assert D.encode_completion(tok, "was good", max_len=2) == ([21, 28], True)


def test_prompt_cut_keeps_a_leading_bos():
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok.add_special_tokens({"bos_token": "<bos>"})
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    bos = tok.bos_token_id
    assert D.encode_prompt(tok, "the film was good") == ([bos, 6, 11, 21, 28], False)  # BOS from the tokenizer
    assert D.encode_prompt(tok, "the film was good", max_len=3) == ([bos, 21, 28], True)
    assert D.encode_completion(tok, "good") == ([28, 1], False)  # no BOS inside a completion


def test_demonstration_labels_and_truncation_counts(tok, caplog):
    record = {"prompt": "the film was", "completion": "very good"}
    ex = D.encode_demonstration(tok, record, 8, 8)
    assert ex.input_ids == [6, 11, 21, 25, 28, 1]
    assert ex.labels == [IGN, IGN, IGN, 25, 28, 1]
    assert (ex.prompt_truncated, ex.completion_truncated) == (False, False)
    cut = D.encode_demonstration(tok, record, 2, 1)  # prompt keeps "film was", completion keeps "very"
    assert cut.input_ids == [11, 21, 25] and cut.labels == [IGN, IGN, 25]
    stats = D.TruncationStats()
    for example in (ex, cut, D.encode_demonstration(tok, record, 2, 8)):
        stats.update(example)
    assert stats.as_dict() == {"examples": 3, "prompts_truncated": 2, "completions_truncated": 1}
    with caplog.at_level(logging.WARNING):
        assert stats.warn_if_any(logging.getLogger("t")) is True
    assert "truncated 2 of 3 prompts (from the left) and 1 of 3 completions (from the right)" in caplog.text
    assert D.TruncationStats().warn_if_any(logging.getLogger("t")) is False


CHAT = [
    {"role": "system", "content": "hi"},
    {"role": "user", "content": "what is 4 + 5 ?"},
    {"role": "assistant", "content": "9"},
    {"role": "user", "content": "and 1 + 1 ?"},
    {"role": "assistant", "content": "2"},
]


def test_chat_masking_labels_exactly_the_assistant_turns(chat_tok):
    ex = D.encode_demonstration(chat_tok, {"messages": CHAT})
    tokens = chat_tok.convert_ids_to_tokens(ex.input_ids)
    # the template: "<role> content <eos> " per turn; "<user>" is split into <unk> user <unk>
    assert " ".join(tokens) == (
        "<unk> system <unk> hi <eos> <unk> user <unk> what is 4 + 5 ? <eos> <unk> assistant <unk> 9 <eos> "
        "<unk> user <unk> and 1 + 1 ? <eos> <unk> assistant <unk> 2 <eos>")
    labelled = [(i, tokens[i]) for i, label in enumerate(ex.labels) if label != IGN]
    # loss on both replies and the end-of-turn token that closes each, nothing else
    assert labelled == [(18, "9"), (19, "<eos>"), (32, "2"), (33, "<eos>")]
    assert all(ex.labels[i] == ex.input_ids[i] for i, _ in labelled)
    # the prompt part is exactly what the same chat gives as a generation prompt
    assert ex.input_ids[:18] == D.encode_prompt(chat_tok, CHAT[:2])[0]


def test_chat_truncation_cuts_prompt_left_and_rest_right(chat_tok):
    ex = D.encode_demonstration(chat_tok, {"messages": CHAT}, max_prompt_len=5, max_completion_len=4)
    assert chat_tok.convert_ids_to_tokens(ex.input_ids) == ["?", "<eos>", "<unk>", "assistant", "<unk>",
                                                            "9", "<eos>", "<unk>", "user"]
    assert ex.labels[5:7] == ids(chat_tok, "9 <eos>") and ex.labels[:5] + ex.labels[7:] == [IGN] * 7
    assert (ex.prompt_truncated, ex.completion_truncated) == (True, True)


def test_chat_masking_without_offsets_matches(chat_tok):
    class SlowView:  # the same tokenizer seen as one without offset mapping
        is_fast = False

        def __getattr__(self, name):
            return getattr(chat_tok, name)

        def __call__(self, *args, **kwargs):
            return chat_tok(*args, **kwargs)

    slow, fast = D.encode_demonstration(SlowView(), {"messages": CHAT}), D.encode_demonstration(chat_tok, {"messages": CHAT})
    assert (slow.input_ids, slow.labels) == (fast.input_ids, fast.labels)


def test_chat_errors(tok, chat_tok):
    with pytest.raises(D.DataError, match="no chat template") as info:
        D.encode_demonstration(tok, {"messages": CHAT})
    assert info.value.field == "messages"
    with pytest.raises(D.DataError, match="no chat template"):
        D.encode_prompt(tok, CHAT[:2])
    reverse = tiny_tokenizer(chat_template=True)  # a template that rewrites earlier turns cannot be masked by prefix
    reverse.chat_template = "{% for m in messages|reverse %}{{ m['content'] + ' <eos> ' }}{% endfor %}"
    with pytest.raises(D.DataError, match="turn 2"):
        D.encode_demonstration(reverse, {"messages": CHAT})


def test_encode_pair_ranking_unpaired(tok, chat_tok):
    pair = D.encode_pair(tok, {"prompt": "the film", "chosen": "was good", "rejected": "was very bad",
                               "margin": 2, "weight": 0.5}, 8, 3)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == ([6, 11], [21, 28, 1], [21, 25, 33])
    assert (pair.margin, pair.weight) == (2.0, 0.5) and pair.rejected_truncated and pair.completion_truncated
    default = D.encode_pair(tok, {"prompt": "a", "chosen": "b", "rejected": "c"})
    assert (default.margin, default.weight, default.completion_truncated) == (0.0, 1.0, False)
    chat_pair = D.encode_pair(chat_tok, {"messages": CHAT[1:2], "chosen": "9", "rejected": "8"})
    assert chat_tok.convert_ids_to_tokens(chat_pair.prompt_ids)[-4:] == ["<eos>", "<unk>", "assistant", "<unk>"]
    ranking = D.encode_ranking(tok, {"prompt": "the", "completions": ["good", "very bad"], "ranking": [1, 0]}, 8, 2)
    assert ranking.completion_ids == [[28, 1], [25, 33]] and ranking.completions_truncated == [False, True]
    assert ranking.ranking == [1, 0] and ranking.completion_truncated
    unpaired = D.encode_unpaired(tok, {"prompt": "the", "completion": "good", "label": False})
    assert (unpaired.prompt_ids, unpaired.completion_ids, unpaired.label) == ([6], [28, 1], False)


# --- collation ---------------------------------------------------------------------------------------------------------
def test_pad_sequences_both_sides():
    assert D.pad_sequences([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert D.pad_sequences([[1, 2, 3], [4]], 0, side="left").tolist() == [[1, 2, 3], [0, 0, 4]]
    assert D.pad_sequences([[5], []], 9).tolist() == [[5], [9]] and D.pad_sequences([[5]], 0).dtype == torch.long
    with pytest.raises(ValueError, match="side"):
        D.pad_sequences([[1]], 0, side="middle")
    with pytest.raises(ValueError, match="no pad token"):
        D.pad_sequences([[1]], None)


def test_collate_lm_masks_padding():
    a, b = D.Example([5, 6, 7], [IGN, 6, 7]), D.Example([8, 9], [IGN, 9])
    batch = D.collate_lm([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGN, 6, 7], [IGN, 9, IGN]]
    assert "position_ids" not in batch and D.count_tokens(batch) == 5
    assert set(D.model_inputs(batch)) == {"input_ids", "attention_mask", "use_cache"}


def test_collate_pairs_layout():
    # pair 0: prompt [5, 6], chosen [7, 1], rejected [8, 9, 1]; pair 1: prompt [4], chosen [3, 1], rejected [2, 1]
    p0 = D.PairExample([5, 6], [7, 1], [8, 9, 1], margin=1.0, weight=2.0)
    p1 = D.PairExample([4], [3, 1], [2, 1])
    batch = D.collate_pairs([p0, p1], pad_id=0)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 1, 0],  # row 0: prompt 0 + chosen 0
        [4, 3, 1, 0, 0],  # row 1: prompt 1 + chosen 1
        [5, 6, 8, 9, 1],  # row 2 = B + 0: prompt 0 + rejected 0
        [4, 2, 1, 0, 0],  # row 3 = B + 1: prompt 1 + rejected 1
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert batch["last_index"].tolist() == [3, 2, 4, 2]
    assert batch["margin"].tolist() == [1.0, 0.0] and batch["weight"].tolist() == [2.0, 1.0]


def test_split_pairs_halves_rows():
    x = torch.arange(12).reshape(4, 3)  # B = 2: rows 0-1 chosen, rows 2-3 rejected
    chosen, rejected = D.split_pairs(x)
    assert chosen.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert rejected.tolist() == [[6, 7, 8], [9, 10, 11]]
    with pytest.raises(ValueError, match="even number of rows.*got 3"):
        D.split_pairs(torch.zeros(3, 2))


def test_split_pairs_of_collate_pairs_gives_chosen_and_rejected_rows():
    p0 = D.PairExample([5, 6], [7, 1], [8, 9, 1])
    p1 = D.PairExample([4], [3, 1], [2, 1])
    batch = D.collate_pairs([p0, p1], pad_id=0)
    chosen, rejected = D.split_pairs(batch["input_ids"])
    assert chosen.tolist() == [[5, 6, 7, 1, 0], [4, 3, 1, 0, 0]]  # prompt i + chosen i, padded to T = 5
    assert rejected.tolist() == [[5, 6, 8, 9, 1], [4, 2, 1, 0, 0]]  # prompt i + rejected i
    last_chosen, last_rejected = D.split_pairs(batch["last_index"])  # (2B,) per-row values split the same way
    assert (last_chosen.tolist(), last_rejected.tolist()) == ([3, 2], [4, 2])


def test_collate_rankings_groups_and_ranks():
    r0 = D.RankingExample([5], [[7, 1], [8, 1], [9, 1]], ranking=[2, 0, 1])  # completion 2 best, 1 worst
    r1 = D.RankingExample([4, 4], [[3, 1], [2, 2, 1]], ranking=[1, 0])
    batch = D.collate_rankings([r0, r1], pad_id=0)
    assert batch["input_ids"].tolist() == [
        [5, 7, 1, 0, 0], [5, 8, 1, 0, 0], [5, 9, 1, 0, 0],  # example 0, completions 0, 1, 2
        [4, 4, 3, 1, 0], [4, 4, 2, 2, 1],  # example 1, completions 0, 1
    ]
    assert batch["group"].tolist() == [0, 0, 0, 1, 1]
    assert batch["rank"].tolist() == [1, 2, 0, 1, 0]  # place of completions 0, 1, 2 in [2, 0, 1]; then in [1, 0]
    assert batch["last_index"].tolist() == [2, 2, 2, 3, 4]
    assert batch["response_mask"][4].tolist() == [0, 0, 1, 1, 1]


def test_collate_unpaired_and_prompts():
    batch = D.collate_unpaired([D.UnpairedExample([5], [7, 1], True), D.UnpairedExample([4, 4], [1], False)], 0)
    assert batch["input_ids"].tolist() == [[5, 7, 1], [4, 4, 1]] and batch["label"].tolist() == [True, False]
    assert batch["response_mask"].tolist() == [[0, 1, 1], [0, 0, 1]]
    prompts = D.collate_prompts([[5, 6, 7], [8]], pad_id=0)  # left padded: generation continues every row at T
    assert prompts["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert prompts["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


# --- packing -------------------------------------------------------------------------------------------------------------
def test_pack_examples_layout():
    a, b, c = D.Example([5, 6, 7], [IGN, 6, 7]), D.Example([8, 9], [8, 9]), D.Example([3, 4, 2, 2], [IGN, IGN, 2, 2])
    rows = D.pack_examples([a, b, c], max_len=5)  # next fit: [a b] (5 tokens), [c]
    assert [r.input_ids for r in rows] == [[5, 6, 7, 8, 9], [3, 4, 2, 2]]
    assert [r.position_ids for r in rows] == [[0, 1, 2, 0, 1], [0, 1, 2, 3]]
    assert rows[0].labels == [IGN, 6, 7, IGN, 9]  # b's first token is predicted by nothing once unpacked
    batch = D.collate_lm(rows, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]  # padding is a segment of its own
    assert set(D.model_inputs(batch)) == {"input_ids", "position_ids", "use_cache"}
    with pytest.raises(ValueError, match="does not fit"):
        D.pack_examples([c], max_len=3)


def summed_nll(model, batch):
    logits = model(**D.model_inputs(batch)).logits[:, :-1]  # (B, T-1, V) predicts tokens 1..T-1
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGN, reduction="sum")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_nll_equals_unpacked(tok, attn):
    records = [
        {"prompt": "the film was", "completion": "very good and i loved it"},
        {"prompt": "a book", "completion": "boring"},
        {"prompt": "what is 4 + 5 ?", "completion": "9"},
        {"prompt": "i watched the movie", "completion": "it was bad , not good"},
    ]
    examples = [D.encode_demonstration(tok, r) for r in records]  # 10, 4, 8, 11 tokens
    model = tiny_causal_lm(tok, seed=0)
    model.config._attn_implementation = attn
    model.eval()
    packed = D.pack_examples(examples, max_len=20)
    assert [len(r.input_ids) for r in packed] == [14, 19]
    with torch.no_grad():
        unpacked_nll = summed_nll(model, D.collate_lm(examples, tok.pad_token_id))
        packed_batch = D.collate_lm(packed, tok.pad_token_id)
        packed_nll = summed_nll(model, packed_batch)
        # the same packed batch with its 2D attention mask lets examples see each other: a different number
        leaky = model(input_ids=packed_batch["input_ids"], attention_mask=packed_batch["attention_mask"],
                      position_ids=packed_batch["position_ids"]).logits[:, :-1]
        leaky_nll = F.cross_entropy(leaky.flatten(0, 1), packed_batch["labels"][:, 1:].flatten(), ignore_index=IGN,
                                    reduction="sum")
    assert packed_nll.item() == pytest.approx(unpacked_nll.item(), rel=1e-5)
    assert abs(leaky_nll.item() - unpacked_nll.item()) > 1e-3


# --- TRL's formats and sources (tests/test_trl_formats.py trains each) ------------------------------------------------
def test_parse_source_splits_paths_and_hub_ids(tmp_path):
    (tmp_path / "dd").mkdir()
    (tmp_path / "odd:name.jsonl").write_text("")  # a name that exists is the path, colon and all
    assert D.parse_source(tmp_path / "dd") == (tmp_path / "dd", None, None)
    assert D.parse_source(f"{tmp_path / 'dd'}:test") == (tmp_path / "dd", None, "test")
    assert D.parse_source(tmp_path / "odd:name.jsonl") == (tmp_path / "odd:name.jsonl", None, None)
    assert D.parse_source("org/name") == ("org/name", None, None)
    assert D.parse_source("org/name:train") == ("org/name", None, "train")
    assert D.parse_source("org/name:cfg:train") == ("org/name", "cfg", "train")
    # not Hub IDs: a data file's name, a relative path with more parts, a missing file with a split
    from pathlib import Path

    assert D.parse_source("data/prefs.jsonl") == (Path("data/prefs.jsonl"), None, None)
    assert D.parse_source("a/b/c") == (Path("a/b/c"), None, None)
    assert D.parse_source("absent.jsonl:train") == (Path("absent.jsonl:train"), None, None)
    with pytest.raises(D.DataError, match="^data/prefs.jsonl: no such file or directory$"):
        D.load_records("data/prefs.jsonl", "pairs")


def test_encode_records_names_the_line_of_a_record_that_fails_to_encode(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", ['{"prompt": "a", "completion": "b"}', "",
                                              json.dumps({"messages": CHAT[1:3]})])
    records = D.load_records(path, "demonstrations")
    assert records.lines == [1, 3]
    with pytest.raises(D.DataError) as info:  # a chat, and this tokenizer has no chat template
        D.encode_records(D.encode_demonstration, tok, records, 8, 8)
    assert (info.value.path, info.value.line, info.value.field) == (path, 3, "messages")
    examples, stats = D.encode_records(D.encode_demonstration, tok, records[:1], 8, 8)  # a plain list: no lines
    assert examples == [D.encode_demonstration(tok, records[0], 8, 8)] and stats.examples == 1


def test_new_forms_validate_and_old_messages_stay(tmp_path):
    user, reply = CHAT[1:2], CHAT[2:3]
    valid = {
        "demonstrations": [{"text": "the film"}, {"prompt": user, "completion": reply}],
        "pairs": [{"prompt": user, "chosen": reply, "rejected": CHAT[4:5]}, {"chosen": "a b", "rejected": "a c"},
                  {"chosen": user + reply, "rejected": user + CHAT[4:5]}],
        "unpaired": [{"prompt": user, "completion": reply, "label": False}],
    }
    for kind, records in valid.items():
        for record in records:
            assert D.validate_record(record, kind) is record
    # a record without 'completion' or 'messages' is still asked for them, not for 'text'
    with pytest.raises(D.DataError, match="field 'completion': missing"):
        D.validate_record({"prompt": "hi"}, "demonstrations")
    assert D.prompt_of({"chosen": user + reply, "rejected": user + CHAT[4:5]}) == user
