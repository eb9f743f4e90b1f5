"""Every TRL dataset format, standard (strings) and conversational (turns), read and trained by tether unchanged.

- each format trains its recipe for 2 steps through the CLI (`tether sft`, `rm`, `dpo`, `dpo loss=kto`) on the tiny
  model with a chat template, and the loss is finite;
- the token ids of one conversational record of each kind, spelled out (prompt ids, completion ids, labels);
- bad conversational records name file:line:field; a chat template that rewrites earlier turns too, at encode time;
- sources: Parquet, a saved Dataset, a DatasetDict with ":split", a dataset repository folder, and a Hub ID read from
  the Hugging Face cache with HF_HUB_OFFLINE=1;
- `tether label export` writes what TRL's rule classifies as conversational exactly when the prompt is.

The tiny template renders a turn as "<role> content <eos> " and the generation prompt as "<assistant> "; the word-level
tokenizer reads "<user>" as "<unk> user <unk>".
"""

import json
import math
import os
import subprocess
import sys

import pytest

from tether import data as D
from tether.cli import main as cli_main
from tether.testing import save_tiny, tiny_tokenizer

IGN = D.IGNORE_INDEX
USER = [{"role": "user", "content": "what is 4 + 5 ?"}]
GOOD = [{"role": "assistant", "content": "9"}]
BAD = [{"role": "assistant", "content": "8"}]
SYSTEM = [{"role": "system", "content": "answer yes or no"}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(chat_template=True)


def ids(tokenizer, words: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(words.split())


# --- TRL's rule for "conversational", as trl.data_utils.is_conversational documents it ---------------------------
TRL_KEYS = ("prompt", "chosen", "rejected", "completion", "messages")


def trl_is_conversational(record: dict, key: str) -> bool:
    """TRL looks at ONE of the present keys among TRL_KEYS (whichever a set pops first): conversational when it is a
    list whose first item is a dict with "role" and "content". `key` names the one looked at."""
    value = record[key]
    return isinstance(value, list) and isinstance(value[0], dict) and {"role", "content"} <= set(value[0])


def trl_reads_as(record: dict) -> set[bool]:
    """What TRL's rule says for each key it may look at: one element when the record reads the same whichever."""
    return {trl_is_conversational(record, k) for k in TRL_KEYS if k in record} or {False}  # no key: not


# --- the formats: (TRL type, form) -> records ---------------------------------------------------------------------
def chat(*turns):
    return [t for group in turns for t in group]


FORMATS = {
    ("language modelling", "standard"): ("demonstrations", [{"text": "the film was good ."},
                                                            {"text": "the book was bad ."}]),
    ("language modelling", "conversational"): ("demonstrations", [{"messages": chat(USER, GOOD)},
                                                                  {"messages": chat(SYSTEM, USER, GOOD)}]),
    ("prompt-completion", "standard"): ("demonstrations", [{"prompt": "the film was", "completion": " good ."},
                                                           {"prompt": "the book", "completion": " was bad ."}]),
    ("prompt-completion", "conversational"): ("demonstrations", [{"prompt": USER, "completion": GOOD},
                                                                 {"prompt": chat(SYSTEM, USER), "completion": BAD}]),
    ("preference", "standard"): ("pairs", [{"prompt": "the film was", "chosen": " good .", "rejected": " bad ."},
                                           {"prompt": "the book is", "chosen": " great", "rejected": " dull"}]),
    ("preference, implicit prompt", "standard"): ("pairs", [
        {"chosen": "the film was good .", "rejected": "the film was bad ."},
        {"chosen": "yes", "rejected": "no"}]),  # no common word: an empty prompt, the whole texts compared
    ("preference", "conversational"): ("pairs", [{"prompt": USER, "chosen": GOOD, "rejected": BAD},
                                                 {"prompt": chat(SYSTEM, USER), "chosen": BAD, "rejected": GOOD}]),
    ("preference, implicit prompt", "conversational"): ("pairs", [
        {"chosen": chat(USER, GOOD), "rejected": chat(USER, BAD)},
        {"chosen": chat(SYSTEM, USER, GOOD), "rejected": chat(SYSTEM, USER, BAD)}]),
    ("unpaired preference", "standard"): ("unpaired", [
        {"prompt": "the film was", "completion": " good .", "label": True},
        {"prompt": "the film was", "completion": " bad .", "label": False}]),
    ("unpaired preference", "conversational"): ("unpaired", [{"prompt": USER, "completion": GOOD, "label": True},
                                                             {"prompt": USER, "completion": BAD, "label": False}]),
}
RECIPES = {"demonstrations": [["sft"]], "pairs": [["rm"], ["dpo"]], "unpaired": [["dpo", "loss=kto"]]}
RUNS = [(fmt, form, args) for (fmt, form), (kind, _) in FORMATS.items() for args in RECIPES[kind]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("trl") / "model", chat_template=True)


def test_each_format_reads_as_trl_reads_it():
    for (fmt, form), (_, records) in FORMATS.items():
        for record in records:
            assert trl_reads_as(record) == {form == "conversational"}, (fmt, form, record)


@pytest.mark.parametrize("fmt,form,args", RUNS, ids=[f"{a[0]}{'-kto' if len(a) > 1 else ''}-{f}-{m}"
                                                     for f, m, a in RUNS])
def test_each_format_trains_its_recipes(model_dir, tmp_path, fmt, form, args):
    kind, records = FORMATS[(fmt, form)]
    data = D.write_jsonl(tmp_path / "data.jsonl", records * 2)
    assert len(D.load_records(data, kind)) == 4
    rc = cli_main([*args, f"model={model_dir}", f"data={data}", f"out={tmp_path / 'run'}", "max_steps=2",
                   "batch_size=2", "progress=false"])
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"]), summary


def test_prompt_only_in_both_forms(tmp_path, tok):
    path = D.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the film was"}, {"prompt": USER}])
    standard, conversational = D.load_records(path, "prompts")
    assert trl_reads_as(standard) == {False} and trl_reads_as(conversational) == {True}
    assert D.encode_prompt(tok, D.prompt_of(standard))[0] == ids(tok, "the film was")
    # turns: rendered with the generation prompt, so generation continues as the assistant
    assert D.encode_prompt(tok, D.prompt_of(conversational))[0] == ids(
        tok, "<unk> user <unk> what is 4 + 5 ? <eos> <unk> assistant <unk>")


# --- token ids of conversational records, spelled out -------------------------------------------------------------
def test_conversational_ids_spelled_out(tok):
    prompt = ids(tok, "<unk> user <unk> what is 4 + 5 ? <eos> <unk> assistant <unk>")
    nine, eight = ids(tok, "9 <eos>"), ids(tok, "8 <eos>")
    assert prompt == [2, 81, 2, 79, 22, 69, 75, 70, 64, 1, 2, 82, 2] and nine == [74, 1] and eight == [73, 1]

    # prompt-completion: the completion is the template's continuation "9 <eos> ", labelled; no EOS added to it
    ex = D.encode_demonstration(tok, {"prompt": USER, "completion": GOOD})
    assert ex.input_ids == prompt + nine and ex.labels == [IGN] * 13 + nine
    # ... the same row as the whole chat in `messages` form
    whole = D.encode_demonstration(tok, {"messages": chat(USER, GOOD)})
    assert (whole.input_ids, whole.labels) == (ex.input_ids, ex.labels)
    # a completion of several turns: loss on its assistant turns only, not on the user turn between them
    again = [{"role": "user", "content": "and 1 + 1 ?"}]
    long = D.encode_demonstration(tok, {"prompt": USER, "completion": chat(GOOD, again, [
        {"role": "assistant", "content": "2"}])})
    follow = ids(tok, "<unk> user <unk> and 1 + 1 ? <eos> <unk> assistant <unk>")
    assert long.input_ids == prompt + nine + follow + ids(tok, "2 <eos>")
    assert long.labels == [IGN] * 13 + nine + [IGN] * len(follow) + ids(tok, "2 <eos>")

    # preference, explicit and implicit prompt: one prompt, the two replies
    explicit = D.encode_pair(tok, {"prompt": USER, "chosen": GOOD, "rejected": BAD})
    implicit = D.encode_pair(tok, {"chosen": chat(USER, GOOD), "rejected": chat(USER, BAD)})
    assert (explicit.prompt_ids, explicit.chosen_ids, explicit.rejected_ids) == (prompt, nine, eight)
    assert implicit == explicit
    # unpaired
    kto = D.encode_unpaired(tok, {"prompt": USER, "completion": BAD, "label": False})
    assert (kto.prompt_ids, kto.completion_ids, kto.label) == (prompt, eight, False)


def test_standard_ids_spelled_out(tok):
    # language modelling: every token labelled, EOS appended; cut from the right at max_prompt + max_completion
    text = D.encode_demonstration(tok, {"text": "the film was good"}, 8, 8)
    assert text.input_ids == text.labels == ids(tok, "the film was good <eos>")
    cut = D.encode_demonstration(tok, {"text": "the film was good"}, 2, 1)
    assert cut.input_ids == ids(tok, "the film was") and cut.completion_truncated
    # implicit prompt of strings: cut at the last space before the first difference
    pair = D.encode_pair(tok, {"chosen": "the film was good", "rejected": "the film was bad"})
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (
        ids(tok, "the film was"), ids(tok, "good <eos>"), ids(tok, "bad <eos>"))
    assert D.extract_prompt({"chosen": "The sky is blue.", "rejected": "The sky is green.", "id": 3}) == {
        "prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "id": 3}
    assert D.extract_prompt({"chosen": "yes", "rejected": "no"})["prompt"] == ""
    # the explicit string forms are encoded as before: raw completion + EOS after the prompt
    explicit = D.encode_pair(tok, {"prompt": "the film was", "chosen": "good", "rejected": "bad"})
    assert explicit == pair


# --- bad records: file:line:field ---------------------------------------------------------------------------------
BAD_CASES = [
    ("demonstrations", {"prompt": "the film", "completion": GOOD}, "completion", "prompt is a string"),
    ("demonstrations", {"prompt": USER, "completion": USER}, "completion[0].role", "must be 'assistant'"),
    ("demonstrations", {"prompt": USER, "completion": [{"role": "assistant"}]}, "completion[0].content", "missing"),
    ("demonstrations", {"prompt": USER, "completion": 3}, "completion", "a string or a list of turns"),
    ("demonstrations", {"text": ["the film"]}, "text", "must be a string, got list"),
    ("demonstrations", {"text": " "}, "text", "is empty"),
    ("pairs", {"prompt": USER, "chosen": GOOD, "rejected": "8"}, "rejected", "a list of turns like 'chosen'"),
    ("pairs", {"prompt": "p", "chosen": GOOD, "rejected": BAD}, "chosen", "prompt is a string"),
    ("pairs", {"chosen": USER + GOOD, "rejected": USER + GOOD}, "chosen", "has no turn after the 2 turn(s)"),
    ("pairs", {"chosen": GOOD, "rejected": BAD}, "chosen", "no implicit prompt"),
    ("pairs", {"chosen": USER + GOOD, "rejected": USER + USER + GOOD}, "rejected[1].role", "must be 'assistant'"),
    ("pairs", {"chosen": USER + GOOD, "rejected": "no"}, "rejected", "must be a list of turns"),
    ("pairs", {"chosen": "the film ", "rejected": "the film was"}, "chosen", "empty after the implicit prompt"),
    ("pairs", {"margin": 1}, "prompt", "implicit in 'chosen' and 'rejected'"),
    ("unpaired", {"prompt": "p", "completion": GOOD, "label": True}, "completion", "prompt is a string"),
    ("unpaired", {"prompt": USER, "completion": [], "label": True}, "completion", "is empty"),
]


@pytest.mark.parametrize("kind,bad,field,words", BAD_CASES)
def test_bad_conversational_records_name_file_line_and_field(tmp_path, kind, bad, field, words):
    good = json.dumps(FORMATS[{"demonstrations": ("prompt-completion", "conversational"),
                               "pairs": ("preference", "conversational"),
                               "unpaired": ("unpaired preference", "conversational")}[kind]][1][0])
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([good, "", json.dumps(bad), good]) + "\n")
    with pytest.raises(D.DataError) as info:
        D.load_records(path, kind)
    assert (info.value.path, info.value.line, info.value.field) == (path, 3, field)
    assert str(info.value).startswith(f"{path}:3: field '{field}': ") and words in str(info.value), str(info.value)


def test_a_template_that_rewrites_earlier_turns_is_named_at_file_line_field(tmp_path, capsys):
    # the generation prompt says "<assistant> answer " but a rendered reply follows "<assistant> ": no prefix
    model = save_tiny(tmp_path / "model", chat_template=True)
    tokenizer = tiny_tokenizer(chat_template=True)
    tokenizer.chat_template = tokenizer.chat_template.replace("'<assistant> '", "'<assistant> answer '")
    tokenizer.save_pretrained(model)
    demos = D.write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "the film", "completion": " was good"},
                                                     {"prompt": USER, "completion": GOOD}])
    pairs = D.write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": chat(USER, GOOD), "rejected": chat(USER, BAD)}])
    for args, path, field in ((["sft"], demos, "completion"), (["dpo"], pairs, "chosen")):
        assert cli_main([*args, f"model={model}", f"data={path}", f"out={tmp_path / args[0]}", "progress=false"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of save_tiny
        line = 2 if path == demos else 1
        assert err.startswith(f"tether {args[0]}: {path}:{line}: field '{field}': the chat template does not render"), err


# --- sources ------------------------------------------------------------------------------------------------------
def test_every_source_reads_the_same_records(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # load_dataset's cache
    train = FORMATS[("preference, implicit prompt", "conversational")][1] * 2
    test = train[:2]
    D.write_jsonl(tmp_path / "train.jsonl", train)
    datasets.Dataset.from_list(train).to_parquet(str(tmp_path / "train.parquet"))
    datasets.Dataset.from_list(train).save_to_disk(str(tmp_path / "saved"))
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)})
    splits.save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "repo" / "data").mkdir(parents=True)  # a dataset repository as on the Hub: data files, no script
    D.write_jsonl(tmp_path / "repo" / "data" / "train.jsonl", train)
    D.write_jsonl(tmp_path / "repo" / "data" / "test.jsonl", test)
    for source in ("train.jsonl", "train.parquet", "saved", "dict:train", "repo:train"):
        records = D.load_records(f"{tmp_path / source}", "pairs")
        assert list(records) == train and records.lines == [1, 2, 3, 4], source
    assert list(D.load_records(f"{tmp_path / 'repo'}:test", "pairs")) == test
    for source, message in (("dict", "is a DatasetDict with splits ['train', 'test']; name one as "),
                            ("repo", "is a DatasetDict with splits ['train', 'test']; name one as "),
                            ("dict:valid", "has no split 'valid'; its splits are ['train', 'test']"),
                            ("saved:train", "single dataset without splits"),
                            ("train.jsonl:train", "a file without splits")):
        with pytest.raises(D.DataError, match="^" + str(tmp_path / source.split(":")[0])) as info:
            D.load_records(f"{tmp_path / source}", "pairs")
        assert message in str(info.value), str(info.value)


def test_a_hub_id_trains_offline_from_the_cache(model_dir, tmp_path):
    """`data=org/name:train` reads through datasets.load_dataset; offline, from the cache a download leaves
    (<HF_DATASETS_CACHE>/org___name/default/0.0.0/<commit>/), built here with the json builder a download uses."""
    from datasets.packaged_modules.json.json import Json

    records = FORMATS[("preference, implicit prompt", "conversational")][1]
    D.write_jsonl(tmp_path / "train.jsonl", records * 2)
    D.write_jsonl(tmp_path / "test.jsonl", records)
    cache = tmp_path / "cache"
    builder = Json(cache_dir=str(cache), dataset_name="name", config_id="default", hash="0123abcd",
                   data_files={"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")})
    builder.download_and_prepare()
    (cache / "name").rename(cache / "org___name")
    script = (
        "import sys\nfrom tether import data as D\nfrom tether.cli import main\n"
        "print('test', len(D.load_records('org/name:test', 'pairs')))\n"
        f"print('rc', main(['dpo', 'model={model_dir}', 'data=org/name:train', 'out={tmp_path / 'run'}', "
        "'max_steps=2', 'batch_size=2', 'progress=false']))\n"
        "for bad in ('org/name', 'org/absent:train'):\n"
        "    try:\n        D.load_records(bad, 'pairs')\n    except D.DataError as e:\n        print('error', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    out = [line for line in done.stdout.splitlines() if line.startswith(("test ", "rc ", "error "))]  # not the summary
    assert done.returncode == 0 and out[:2] == ["test 2", "rc 0"], done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"])
    assert out[2] == "error org/name: is a DatasetDict with splits ['train', 'test']; name one as org/name:train"
    assert out[3].startswith("error org/absent:train: no such file or directory, and datasets.load_dataset cannot "
                             "load it as a Hugging Face dataset (ConnectionError: "), out[3]


# --- label export ------------------------------------------------------------------------------------------------
def test_label_export_writes_a_shape_trl_classifies(tmp_path, tok):
    from tether.feedback.export import export_file
    from tether.feedback.store import Store

    store = Store(tmp_path / "f.sqlite")
    store.set_meta("raters_per_item", "1")
    store.add_items([{"prompt": USER, "responses": ["9", "8"]}, {"prompt": "the film was", "responses": ["good", "bad"]}])
    rater = store.rater_for_token(store.add_rater("r")).id
    while (item := store.next_item(rater)) is not None:
        store.submit(rater, item.id, "A" if item.a in ("9", "good") else "B")
    export_file(store, tmp_path / "prefs.jsonl")
    conversational, standard = sorted(D.load_records(tmp_path / "prefs.jsonl", "pairs"), key=lambda r: r["chosen"] == "good")
    assert (conversational["prompt"], conversational["chosen"], conversational["rejected"]) == (USER, GOOD, BAD)
    assert (standard["prompt"], standard["chosen"], standard["rejected"]) == ("the film was", "good", "bad")
    assert trl_reads_as(conversational) == {True} and trl_reads_as(standard) == {False}
    pair = D.encode_pair(tok, conversational)  # the replies through the chat template
    assert (pair.chosen_ids, pair.rejected_ids) == (ids(tok, "9 <eos>"), ids(tok, "8 <eos>"))
    try:  # the bench extra
        from trl.data_utils import is_conversational
    except ImportError:
        return
    assert is_conversational(conversational) and not is_conversational(standard)


# --- HuggingFaceH4's shape: the conversation whole, plus the user's first words copied into a string `prompt` --------
def test_a_copied_string_prompt_is_dropped_from_h4_shaped_pairs_and_demonstrations(tmp_path, tok):
    question = USER[0]["content"]
    pair = {"prompt": question, "chosen": USER + GOOD, "rejected": USER + BAD, "messages": USER + GOOD,
            "score_chosen": 8.0, "score_rejected": 2.0}
    demo = {"prompt": question, "prompt_id": "a1", "messages": USER + GOOD}
    pairs, demos = tmp_path / "pairs.jsonl", tmp_path / "demos.jsonl"
    pairs.write_text(json.dumps(pair) + "\n")
    demos.write_text(json.dumps(demo) + "\n")
    [read_pair] = D.load_records(pairs, "pairs")
    assert (read_pair["prompt"], read_pair["chosen"], read_pair["rejected"]) == (USER, GOOD, BAD)
    assert "messages" not in read_pair and read_pair["score_chosen"] == 8.0
    [read_demo] = D.load_records(demos, "demonstrations")
    assert read_demo == {"prompt_id": "a1", "messages": USER + GOOD}
    # the same token ids as the conversational form TRL's own data sets use
    explicit = D.encode_pair(tok, {"prompt": USER, "chosen": GOOD, "rejected": BAD}, 64, 64)
    assert D.encode_pair(tok, read_pair, 64, 64) == explicit


def test_a_string_prompt_the_conversation_does_not_repeat_is_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "what is 2 + 2 ?", "chosen": USER + GOOD, "rejected": USER + BAD}) + "\n")
    with pytest.raises(D.DataError, match=r"pairs.jsonl:1: field 'prompt': is a string that no user turn"):
        D.load_records(path, "pairs")
