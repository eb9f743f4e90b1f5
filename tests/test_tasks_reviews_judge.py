"""The embedded judge's corpus: critics that measure their principle (not the gold score), revisions that fix what
their critique names, whole documents per training row."""

import random

import torch

from tether.tasks import reviews as R
from tether.tasks import reviews_judge as RJ


def test_critics_read_their_principle():
    rng = random.Random(0)
    assert RJ.kindness("the film was awful .") == -2.0 and RJ.kindness("not good and superb") == 0.5
    assert RJ.repeated_share("good good good .") == 1 - 1 / 3  # 3 words, 1 distinct
    # kindness 1 vs 0, noise N(0, 0.35) on each: the kinder one loses with P = Φ(-1 / (0.35·√2)) = 0.022
    kind = [RJ.critic_value("kind", "it was good .", rng) > RJ.critic_value("kind", "it was good and dull .", rng)
            for _ in range(2000)]
    assert 0.96 < sum(kind) / 2000 < 0.995
    assert RJ.critic_score("the film was wonderful .", rng) > RJ.critic_score("dull dull dull dull dull", rng)


def test_revisions_fix_what_the_critique_names():
    rng = random.Random(1)
    assert RJ.critique("kind", "the plot was dull and not good .") == "it says dull and good ."
    assert RJ.revise("ending", "the plot was good", rng) == "the plot was good ."
    # each word whose pair with the word kept before it was seen is dropped: (so, good) twice, then (so, so) is new
    assert RJ.revise("repeat", "so good so good so good .", rng) == "so good so so ."
    assert R.repetition_penalty("so good so so .") < R.repetition_penalty("so good so good so good .")
    assert RJ.revise("short", "a . b ! c . d .", rng) == "a . b !"
    fixed = [R.gold_score(RJ.revise("kind", "the film was awful and boring .", rng)) for _ in range(100)]
    assert sum(fixed) / 100 > R.gold_score("the film was awful and boring .") + 2


def test_corpus_is_deterministic_and_rows_hold_whole_documents():
    assert RJ.judge_corpus(50, 3) == RJ.judge_corpus(50, 3) != RJ.judge_corpus(50, 4)
    docs = [[5, 6, 1], [7, 1], [8, 9, 9, 1], [4] * 9]  # the last is longer than a block: left out
    ids, targets = RJ.whole_doc_blocks(docs, 5, pad_id=0)
    assert ids.tolist() == [[5, 6, 1, 7, 1], [8, 9, 9, 1, 0]]
    assert targets.tolist() == [[True] * 5, [True] * 4 + [False]]
    assert torch.equal(ids[~targets], torch.tensor([0]))
