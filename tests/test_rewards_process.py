"""Process rewards: step splitting, PRM aggregation, step -> token positions, the (B, T) reward layout."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tether.rewards.process import (
    ProcessReward,
    prm_min_score,
    prm_solution_score,
    scatter_step_scores,
    split_steps,
    step_end_positions,
    step_spans,
)
from tether.testing import tiny_tokenizer


def test_split_steps_skips_blank_lines_and_strips():
    text = "  a = 1\nb = a + 1\n\n   \nso b = 2\n"
    assert split_steps(text) == ["a = 1", "b = a + 1", "so b = 2"]
    # "  a = 1\n" is chars 0-7, "b = a + 1\n" 8-17, "\n" 18, "   \n" 19-22, "so b = 2" 23-30
    assert step_spans(text) == [(2, 7), (8, 17), (23, 31)]
    assert split_steps("one. two. three", delimiter=". ") == ["one", "two", "three"]
    assert split_steps("") == [] and split_steps("\n\n") == []
    with pytest.raises(ValueError, match="delimiter"):
        split_steps("a", delimiter="")


def test_prm_aggregates_hand_numbers():
    assert prm_solution_score([0.9, 0.8, 0.5]) == pytest.approx(0.36)  # 0.9 * 0.8 * 0.5
    assert prm_solution_score(torch.tensor([0.5, 0.5])) == pytest.approx(0.25)
    assert prm_solution_score([]) == 1.0  # empty product
    assert prm_min_score([0.9, 0.8, 0.5]) == 0.5


def test_process_reward_scores_and_step_scores():
    def scorer(prompt, steps, record):  # a toy PRM: steps with "=" look like valid algebra
        return [0.9 if "=" in s else 0.5 for s in steps]

    completions = ["a = 1\nb = 2", "a = 1\nmaybe 3\nc = 4", ""]
    out = ProcessReward(scorer)(["p"] * 3, completions, [{}] * 3)
    assert out.step_scores == [[0.9, 0.9], [0.9, 0.5, 0.9], []]
    # 0.9 * 0.9 = 0.81;  0.9 * 0.5 * 0.9 = 0.405;  no steps -> 0
    assert torch.allclose(out.scores, torch.tensor([0.81, 0.405, 0.0]))
    assert torch.equal(out.components["process"], out.scores)
    out_min = ProcessReward(scorer, aggregate="min")(["p"] * 3, completions, [{}] * 3)
    assert torch.allclose(out_min.scores, torch.tensor([0.9, 0.5, 0.0]))


def test_process_reward_checks_scorer_and_aggregate():
    with pytest.raises(ValueError, match="2 scores for 3 steps"):
        ProcessReward(lambda p, s, r: [1.0, 1.0])(["p"], ["a\nb\nc"], [{}])
    with pytest.raises(ValueError, match="unknown aggregate"):
        ProcessReward(lambda p, s, r: [], aggregate="mean")


def test_step_end_positions_word_tokenizer_hand_numbers():
    # tokens: the film was good . i liked it . the end   (decoded with single spaces)
    #  index:  0   1    2   3   4 5   6   7  8  9   10
    # step 1 "the film was good" ends in token 3, step 2 "i liked it" in token 7, step 3 "the end" in token 10
    tok = tiny_tokenizer()
    ids = tok("the film was good . i liked it . the end", add_special_tokens=False)["input_ids"]
    assert len(ids) == 11
    assert step_end_positions(tok, ids, delimiter=".") == [3, 7, 10]
    # trailing EOS and padding are skipped when decoding: positions do not move
    padded = torch.tensor(ids + [tok.eos_token_id, tok.pad_token_id])
    assert step_end_positions(tok, padded, delimiter=".") == [3, 7, 10]
    assert step_end_positions(tok, [], delimiter=".") == []


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["x = 3\ny = x + 4\nso y = 7\n", "first step\nsecond step\n\nthe answer is 7\n"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_step_end_positions_byte_level_newlines():
    tok = _byte_level_tokenizer()
    text = "x = 3\ny = x + 4\n\nso y = 7\nthe answer is 7"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    positions = step_end_positions(tok, ids)
    assert len(positions) == 4 and positions == sorted(positions) and positions[-1] == len(ids) - 1
    # each position is the first token whose prefix reaches the end of its step
    for (_, end), k in zip(step_spans(text), positions):
        assert len(tok.decode(ids[: k + 1])) >= end > len(tok.decode(ids[:k]))


def test_scatter_step_scores_hand_numbers():
    out = scatter_step_scores([[0.5, -1.0], [2.0], []], [[1, 3], [0], []], length=4)
    assert out.tolist() == [[0.0, 0.5, 0.0, -1.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    # two steps ending in the same token: their scores add up
    assert scatter_step_scores([[1.0, 2.0]], [[2, 2]], 3).tolist() == [[0.0, 0.0, 3.0]]


def test_scatter_then_reverse_cumsum_is_process_advantage():
    # DeepSeekMath process supervision, one sequence: normalised step rewards 1 and -1 end at tokens 1 and 3;
    # the advantage of token t sums the steps ending at or after t: tokens 0, 1: 1 - 1 = 0; tokens 2, 3: -1
    r = scatter_step_scores([[1.0, -1.0]], [[1, 3]], 4)
    adv = r.flip(-1).cumsum(-1).flip(-1)
    assert adv.tolist() == [[0.0, 0.0, -1.0, -1.0]]


def test_scatter_step_scores_validates():
    with pytest.raises(ValueError, match="2 step scores but 1 positions"):
        scatter_step_scores([[1.0, 2.0]], [[0]], 3)
    with pytest.raises(ValueError, match="outside"):
        scatter_step_scores([[1.0]], [[3]], 3)
