"""rewards.learned (a reward model as a reward source) and rewards.spec (reward specs), on tiny in-process models."""

import math

import pytest
import torch

from tether import data as D
from tether.config import ConfigError
from tether.forward import reward_scores
from tether.models import load_reward_model, load_tokenizer
from tether.rewards import FunctionReward, RewardOutput, WeightedSum
from tether.rewards.learned import LearnedReward, encode_for_reward, reward_model_dirs, score_sequences
from tether.rewards.spec import parse_spec, reward_from_spec
from tether.testing import save_tiny, tiny_tokenizer

PROMPTS = ["the film was", "i watched this movie and", "the plot", "it was", "the music was very"]
COMPLETIONS = ["good .", "it was awful , very awful !", "was dull", "great", "good and the ending was fine ."]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A tiny reward model saved as a normal HF directory, with a stored gain/bias."""
    base = save_tiny(tmp_path_factory.mktemp("base"))
    model = load_reward_model(base)
    model.config.reward_bias, model.config.reward_gain = 0.3, 2.0
    out = tmp_path_factory.mktemp("rm")
    model.save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)
    return out


def one_at_a_time(model, tok, prompts, completions, normalize=True):
    """Reference: each sequence alone, no padding at all."""
    out = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([encode_for_reward(tok, p, c)])
        out.append(reward_scores(model, ids, torch.ones_like(ids), normalize=normalize).item())
    return torch.tensor(out)


def test_batched_scores_equal_unpadded_scores_with_gain_and_bias(rm_dir):
    model, tok = load_reward_model(rm_dir), load_tokenizer(rm_dir)
    raw = one_at_a_time(model, tok, PROMPTS, COMPLETIONS, normalize=False)
    out = LearnedReward(model, tok, batch_size=2)(PROMPTS, COMPLETIONS, [{}] * 5)
    assert isinstance(out, RewardOutput) and out.std is None
    # batches of 2 sorted by length, right padded, returned in input order; (raw - 0.3) * 2 applied
    torch.testing.assert_close(out.scores, (raw - 0.3) * 2.0, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.components["rm"], out.scores)
    assert len(set(out.scores.tolist())) == 5  # distinct completions, distinct scores: the order check means something
    raw_again = LearnedReward(model, tok, normalize=False)(PROMPTS, COMPLETIONS, None).scores
    torch.testing.assert_close(raw_again, raw, atol=1e-5, rtol=0)


def test_tokenisation_is_the_training_tokenisation(rm_dir):
    tok = load_tokenizer(rm_dir)
    record = {"prompt": "i watched this movie and", "chosen": "it was awful , very awful !", "rejected": "good"}
    pair = D.encode_pair(tok, record, max_prompt_len=3, max_completion_len=4)
    ids = encode_for_reward(tok, record["prompt"], record["chosen"], max_prompt_len=3, max_completion_len=4)
    assert ids == pair.prompt_ids + pair.chosen_ids
    assert len(ids) == 7 and ids[-1] != tok.eos_token_id  # cut completion: no EOS, as in training
    full = encode_for_reward(tok, "the film was", "good")
    assert full == tok("the film was good").input_ids + [tok.eos_token_id]


def test_chat_prompts_use_the_chat_template(rm_dir):
    tok = tiny_tokenizer(chat_template=True)
    messages = [{"role": "user", "content": "hello"}]
    ids = encode_for_reward(tok, messages, "hi")
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<assistant> ")  # the generation prompt is there, then the completion and EOS
    expected = tok(rendered, add_special_tokens=False).input_ids + tok("hi", add_special_tokens=False).input_ids
    assert ids == expected + [tok.eos_token_id]


def test_stored_truncation_lengths_are_reused(rm_dir, tmp_path):
    model, tok = load_reward_model(rm_dir), load_tokenizer(rm_dir)
    model.config.reward_max_completion_len = 2
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    source = LearnedReward(tmp_path, device="cpu")
    assert source.max_completion_len == 2 and source.max_prompt_len is None
    got = source(["the film was"], ["very good and fine ."], None).scores
    cut = torch.tensor([tok("the film was").input_ids + tok("very good", add_special_tokens=False).input_ids])
    expected = reward_scores(model, cut, torch.ones_like(cut))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_ensemble_mean_and_std(rm_dir, tmp_path):
    tok = load_tokenizer(rm_dir)
    a = load_reward_model(rm_dir)
    b = load_reward_model(save_tiny(tmp_path / "other", seed=1))  # other trunk, fresh head: different scores
    sa, sb = (LearnedReward(m, tok)(PROMPTS, COMPLETIONS, None).scores for m in (a, b))
    out = LearnedReward([a, b], tok)(PROMPTS, COMPLETIONS, None)
    torch.testing.assert_close(out.scores, (sa + sb) / 2)
    torch.testing.assert_close(out.std, (sa - sb).abs() / 2)  # population std of two values
    assert (out.std > 0).all()


def test_reward_model_dirs_layouts(rm_dir, tmp_path):
    assert reward_model_dirs(rm_dir) == [rm_dir]
    run = tmp_path / "run"
    for i in (0, 1, 2, 10, 9):
        (run / "model" / f"member-{i}").mkdir(parents=True)
        (run / "model" / f"member-{i}" / "config.json").write_text("{}")
    (run / "model" / "member-x").mkdir()  # not a member
    names = [p.name for p in reward_model_dirs(run)]  # a run dir resolves to its model/
    assert names == ["member-0", "member-1", "member-2", "member-9", "member-10"]
    with pytest.raises(FileNotFoundError, match="not a reward model"):
        reward_model_dirs(tmp_path / "nothing")


def test_score_sequences_restores_training_mode(rm_dir):
    model, tok = load_reward_model(rm_dir), load_tokenizer(rm_dir)
    model.train()
    seqs = [encode_for_reward(tok, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    scores = score_sequences(model, seqs, tok.pad_token_id, batch_size=3)
    assert model.training and scores.shape == (5,) and torch.isfinite(scores).all()


# --- specs ------------------------------------------------------------------------------------------------------------
def test_parse_spec():
    assert parse_spec("rm:runs/a") == [("rm:runs/a", 1.0)]
    assert parse_spec("rm:runs/a*2+format*-0.5") == [("rm:runs/a", 2.0), ("format", -0.5)]
    assert parse_spec("python:m:f*1e+3 + math") == [("python:m:f", 1000.0), ("math", 1.0)]  # 1e+3 is not a split
    with pytest.raises(ConfigError, match="not a number"):
        parse_spec("format*heavy")


def brevity(prompts, completions, records):
    return [-len(c.split()) for c in completions]


def test_python_function_specs(tmp_path, monkeypatch):
    module = tmp_path / "my_rewards.py"
    module.write_text("def shout(prompts, completions, records):\n    return [c.count('!') for c in completions]\n")
    from_file = reward_from_spec(f"python:{module}:shout")
    assert isinstance(from_file, FunctionReward)
    assert from_file(["p", "p"], ["a ! !", "b"], [{}, {}]).scores.tolist() == [2.0, 0.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert reward_from_spec("python:my_rewards:shout")(["p"], ["!"], [{}]).scores.tolist() == [1.0]
    with pytest.raises(ConfigError, match="has no 'nope'"):
        reward_from_spec("python:my_rewards:nope")
    with pytest.raises(ConfigError, match="cannot import"):
        reward_from_spec("python:no_such_module_here:f")


def test_builtin_and_weighted_sum_specs(tmp_path):
    fmt = reward_from_spec("format")
    good, bad = "<think>x</think><answer>1</answer>", "1"
    assert fmt.name == "format" and fmt(["p", "p"], [good, bad], [{}, {}]).scores.tolist() == [1.0, 0.0]
    total = reward_from_spec(f"format*2+python:{__file__}:brevity*-0.5")
    assert isinstance(total, WeightedSum)
    out = total(["p", "p"], [good, "a b c"], [{}, {}])
    # good: 2*1 + (-0.5)*(-1) = 2.5; "a b c": 2*0 + (-0.5)*(-3) = 1.5
    assert out.scores.tolist() == [2.5, 1.5]
    assert out.components["format"].tolist() == [1.0, 0.0] and out.components["brevity"].tolist() == [-1.0, -3.0]
    twice = reward_from_spec("format+format*3")  # repeated names get a suffix
    assert sorted(twice.sources) == ["format", "format_2"]
    assert twice(["p"], [good], [{}]).scores.tolist() == [4.0]
    assert reward_from_spec(fmt) is fmt
    with pytest.raises(ConfigError, match="unknown reward 'gold'"):
        reward_from_spec("gold")


def test_rm_spec_loads_a_learned_reward(rm_dir):
    source = reward_from_spec(f"rm:{rm_dir}", device="cpu", batch_size=4)
    assert isinstance(source, LearnedReward) and source.batch_size == 4
    direct = LearnedReward(rm_dir, device="cpu")(PROMPTS, COMPLETIONS, None).scores
    torch.testing.assert_close(source(PROMPTS, COMPLETIONS, None).scores, direct)
    mixed = reward_from_spec(f"rm:{rm_dir}*0.5+format")
    out = mixed(PROMPTS, COMPLETIONS, [{}] * 5)
    torch.testing.assert_close(out.scores, 0.5 * direct)  # no completion has the think/answer format
    assert not math.isnan(out.scores.sum().item())
