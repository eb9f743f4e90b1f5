"""The `arithmetic` task: the systematic error, the verifier's edge cases, disjoint splits, a loadable base model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether.tasks import arithmetic as A


@pytest.mark.parametrize("a,b,op,wrong", [(47, 38, "+", 75), (99, 99, "+", 88), (12, 34, "+", 46),
                                          (52, 37, "-", 25), (37, 52, "-", -25), (50, 50, "-", 0)])
def test_forgot_carry(a, b, op, wrong):
    assert A.forgot_carry(a, b, op) == wrong


@pytest.mark.parametrize("text,answer,score", [
    (" 85", 85, 1.0), ("85", 85, 1.0), (" 085 ", 85, 1.0), (" +85", 85, 1.0), (" -43", -43, 1.0), ("- 43", -43, 1.0),
    (" 43", -43, 0.0), (" 86", 85, 0.0), ("85 apples", 85, 0.0), ("", 85, 0.0), ("eighty-five", 85, 0.0),
    (" 8 5", 85, 0.0), ("\x00", 85, 0.0),
])
def test_verify_edge_cases(text, answer, score):
    assert A.verify(text, answer) == score


def test_format_and_gold_needs_records():
    assert A.format_ok(" 12") and not A.format_ok("12?")
    assert A.gold_reward(["q"], [" 3"], [{"answer": 3}]) == [1.0]
    with pytest.raises(ValueError, match="records"):
        A.gold_reward(["q"], [" 3"])


def test_splits_disjoint_and_answers_right():
    train = A.prompts("train", 300)
    test = A.prompts("test", 100)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in test[:20]:
        a, op, b = r["prompt"][8:-1].partition("+") if "+" in r["prompt"] else r["prompt"][8:-1].partition("-")
        assert r["answer"] == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_tokenizer_round_trip_and_tiny_build(tmp_path):
    tok = A.char_tokenizer()
    assert tok.decode(tok("What is 47+38? 85").input_ids) == "What is 47+38? 85"
    path = A.build_base(tmp_path / "b", examples=200, steps=3, batch=8, hidden=32, layers=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("What is 12+34?", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0).shape[1] == ids.shape[1] + 2


def test_two_builds_are_byte_identical_whatever_the_callers_threads(tmp_path):
    small = {"examples": 200, "steps": 4, "batch": 8, "hidden": 32, "layers": 1}
    before = torch.get_num_threads()
    try:
        for threads, name in [(1, "a"), (3, "b")]:
            torch.set_num_threads(threads)
            A.build_base(tmp_path / name, seed=1, **small)
    finally:
        torch.set_num_threads(before)
    files = {name: {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()} for name in "ab"}
    assert "model.safetensors" in files["a"] and files["a"] == files["b"]


def test_lr_schedule_by_hand():
    from tether.tasks.pretrain import lr_factor

    assert [lr_factor(s, warmup=4, decay_start=6, decay_steps=4) for s in range(11)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.5 * (1 + 0.5 ** 0.5), 0.5, 0.5 * (1 - 0.5 ** 0.5), 0.0])


def test_training_until_the_loss_is_low_stops_after_the_cooldown():
    """until_loss above any loss: the mean of the first 100 steps is under it, so 100 steps + 5 of cool-down run."""
    from tether.tasks.pretrain import pretrain, tiny_llama

    model = tiny_llama(8, 16, 1, 2, 16, 0, 1, seed=0)
    blocks = torch.randint(2, 8, (32, 8), generator=torch.Generator().manual_seed(0))
    assert len(pretrain(model, blocks, steps=1000, batch_size=4, lr=1e-3, seed=0, log_every=0, until_loss=100.0,
                        cooldown=5, warmup=10)) == 105
    assert len(pretrain(model, blocks, steps=50, batch_size=4, lr=1e-3, seed=0, log_every=0, until_loss=0.0,
                        cooldown=5, warmup=10)) == 50  # never learnt: the cap
