"""The `reviews` task: deterministic corpus, a gold reward that ranks hand-written examples the way people would,
raters that follow the Bradley-Terry formula, and a base model that loads as a normal HF directory."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether.data import load_records
from tether.tasks import reviews as R


def test_corpus_and_data_are_deterministic():
    assert R.corpus(50, seed=1) == R.corpus(50, seed=1) != R.corpus(50, seed=2)
    assert R.sft_demonstrations(20, 3) == R.sft_demonstrations(20, 3)


def test_gold_ranks_hand_written_examples():
    good = R.gold_score("truly wonderful ! the music was beautiful .")
    fine = R.gold_score("good .")
    bad = R.gold_score("awful and boring .")
    assert good > fine > 0 > bad
    assert R.sentiment_score("very good") == pytest.approx(1.5)  # intensifier x1.5
    assert R.sentiment_score("not good") == pytest.approx(-1.0)  # negation flips
    assert R.sentiment_score("i saw it on a sunday") == 0.0


def test_gold_punishes_repetition_rambling_and_no_ending():
    spam = "wonderful wonderful wonderful wonderful wonderful wonderful ."
    assert R.gold_score(spam) < R.gold_score("wonderful .") - 2.0  # the naive proxy's favourite is bad here
    assert R.repetition_penalty("a b a b a b") == pytest.approx(4 * (1 - 2 / 5))
    long = " ".join(["the film was good ."] * 2 + ["and then it went on"] * 5)
    assert R.rambling_penalty(long) > 0 and R.rambling_penalty("the film was good .") == 0
    assert R.ending_penalty("good") == 1.0 and R.ending_penalty("good !") == 0.0
    assert R.gold_score("good") == R.gold_score("good .") - 1.0


def test_sft_data_has_a_spread_of_gold():
    gold = torch.tensor(R.gold_reward(None, [d["completion"] for d in R.sft_demonstrations(1000)]))
    assert abs(gold.mean().item()) < 0.5 and 1.0 < gold.std().item() < 2.5


def test_rater_accuracy_follows_bradley_terry():
    rng = random.Random(0)
    ga, gb, tau, n = 1.0, 0.0, 1.0, 20000
    wins = sum(R.rater_prefers(ga, gb, tau, rng) for _ in range(n)) / n
    p = 1 / (1 + math.exp(-1.0))  # 0.7311
    assert abs(wins - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert R.bayes_accuracy(1.0, 0.0, 1.0) == pytest.approx(p)


def test_prompt_splits_are_disjoint():
    train = {p["prompt"] for p in R.prompts("train", 500)}
    test = {p["prompt"] for p in R.prompts("test", 500)}
    assert train and test and not train & test


def test_write_data_formats(tmp_path):
    files = R.write_data(tmp_path, n_sft=20, n_pairs=30, n_rankings=5)
    assert len(load_records(files["sft"], "demonstrations")) == 20
    assert len(load_records(files["prefs"], "pairs")) == 30
    ranks = load_records(files["rankings"], "rankings")
    assert sorted(ranks[0]["ranking"]) == [0, 1, 2, 3]
    meta = json.loads(files["meta"].read_text())
    assert 0.5 < meta["bayes_accuracy"] < 1.0 and meta["n"] == 30
    assert "prefs_test" not in files  # held-out comparisons only when asked for


def test_held_out_comparisons_use_the_test_prompts_and_their_own_sidecar(tmp_path):
    files = R.write_data(tmp_path, n_sft=5, n_pairs=30, n_test_pairs=40)
    train, test = load_records(files["prefs"], "pairs"), load_records(files["prefs_test"], "pairs")
    test_prompts = {p["prompt"] for p in R.prompts("test", 64)}
    assert len(test) == 40 and all(r["prompt"] in test_prompts for r in test)
    assert not {r["prompt"] for r in train} & test_prompts
    meta = json.loads((tmp_path / "prefs_test.meta.json").read_text())
    assert meta["n"] == 40 and meta["split"] == "test" and 0.5 < meta["bayes_accuracy"] < 1.0
    # the training comparisons do not depend on whether a test set is written
    again = R.write_data(tmp_path / "again", n_sft=5, n_pairs=30)
    assert load_records(again["prefs"], "pairs") == train


def test_tiny_base_builds_loads_and_generates(tmp_path):
    path = R.build_base(tmp_path / "base", corpus=400, steps=5, batch=4, vocab=200, hidden=32, layers=1)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    ids = tok("the film was", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "the film was"
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 3
    assert R.build_base(tmp_path / "base") == path  # cached: returned without rebuilding


def test_bpe_merges_by_hand():
    """aab ×3, ab ×2, b ×1 start as [a ##a ##b], [a ##b], [b]. Step 1: (a, ##a) and (##a, ##b) both count 3; the
    lexicographically smaller, (##a, ##b), wins -> ##ab. Step 2: (a, ##ab) 3 -> aab. Step 3: (a, ##b) 2 -> ab."""
    vocab, merges = R.bpe_merges({"aab": 3, "ab": 2, "b": 1}, vocab_size=100)
    assert vocab == ["##a", "##b", "a", "b", "##ab", "aab", "ab"]
    assert merges == [("##a", "##b"), ("a", "##ab"), ("a", "##b")]
    assert R.bpe_merges({"b": 1, "ab": 2, "aab": 3}, vocab_size=100) == (vocab, merges)  # insertion order is moot
    assert R.bpe_merges({"aab": 3, "ab": 2, "b": 1}, vocab_size=5)[0] == vocab[:5]  # stops at the vocabulary size


def test_tokenizer_depends_on_the_corpus_alone(tmp_path):
    texts = R.corpus(500, seed=3)
    first, again = R.train_tokenizer(texts, 300), R.train_tokenizer(list(reversed(texts)), 300)
    first.save_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    ids = first("the film was very good !").input_ids
    assert first.convert_ids_to_tokens(ids) == ["the", "film", "was", "very", "good", "!"]  # whole words
    assert first.convert_ids_to_tokens(first("zebra").input_ids)[0] == "<unk>"  # z never occurs in the corpus


def test_two_builds_are_byte_identical_whatever_the_callers_threads(tmp_path):
    """The build pins its own thread count: a caller on 1 thread and one on 3 get the same files, byte for byte."""
    small = {"corpus": 400, "steps": 4, "batch": 4, "vocab": 200, "hidden": 32, "layers": 1}
    before = torch.get_num_threads()
    try:
        for threads, name in [(1, "a"), (3, "b")]:
            torch.set_num_threads(threads)
            R.build_base(tmp_path / name, seed=1, **small)
            assert torch.get_num_threads() == threads  # restored after the build
    finally:
        torch.set_num_threads(before)
    files = {name: {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()} for name in "ab"}
    assert "model.safetensors" in files["a"] and files["a"] == files["b"]
    other = R.build_base(tmp_path / "c", seed=2, **small)
    assert (other / "model.safetensors").read_bytes() != files["a"]["model.safetensors"]  # the seed matters
