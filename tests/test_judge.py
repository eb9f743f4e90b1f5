"""The judge: hand-computed label arithmetic, the constitution file's errors, a local HF judge's exact option
log-probs, swap averaging, principle sampling, chain-of-thought clamping, hard labels and the on-disk cache."""

import math
import random

import pytest
import torch

from tether.config import ConfigError
from tether.rewards import judge as J
from tether.rewards.constitution import load_constitution, parse_constitution
from tether.testing import save_tiny

torch.set_num_threads(1)


def test_option_probs_normalise_the_two_options():
    # log p = ln 0.2, ln 0.6 -> 0.25, 0.75 (RL-CAI's normalised soft label)
    assert J.option_probs([math.log(0.2), math.log(0.6)]) == pytest.approx([0.25, 0.75])
    assert J.option_probs([-1000.0, -1000.0]) == pytest.approx([0.5, 0.5])  # no underflow
    assert J.option_probs([-math.inf, -math.inf]) == [0.5, 0.5]


def test_swap_average_and_position_consistency():
    # a shown first: P(a) = 0.9; a shown second: P(a) = 0.3 (the judge just likes the first slot) -> 0.6
    assert J.swap_average(0.9, 0.3) == pytest.approx(0.6)
    assert not J.position_consistent(0.9, 0.3)  # the first *position* won both times
    assert J.position_consistent(0.9, 0.7) and J.position_consistent(0.2, 0.4)


def test_cot_clamp_and_direct_rlaif_score():
    assert J.clamp_cot(0.97) == 0.6 and J.clamp_cot(0.01) == 0.4 and J.clamp_cot(0.55) == 0.55
    probs = [0.0] * 10
    probs[6], probs[9] = 0.5, 0.5  # P(7) = P(10) = 1/2 -> s = 8.5 -> (8.5 - 5.5)/4.5 = 2/3
    assert J.expected_score(probs) == pytest.approx(8.5)
    assert J.rescale_score(8.5) == pytest.approx(2 / 3)
    assert J.rescale_score(1.0) == -1.0 and J.rescale_score(10.0) == 1.0


def test_pointwise_prob_is_bradley_terry_on_the_two_scores():
    # s_a = 7.0, s_b = 5.0: σ(2) = 1 / (1 + e^-2) = 0.880797; at 2 points per logit σ(1) = 0.731059
    assert J.pointwise_prob(7.0, 5.0) == pytest.approx(0.880797, abs=1e-6)
    assert J.pointwise_prob(7.0, 5.0, scale=2.0) == pytest.approx(0.731059, abs=1e-6)
    assert J.pointwise_prob(5.0, 7.0) == pytest.approx(1 - 0.880797, abs=1e-6) and J.pointwise_prob(3.0, 3.0) == 0.5
    assert J.pointwise_prob(-800.0, 800.0) == 0.0 and J.pointwise_prob(800.0, -800.0) == 1.0  # no overflow


def test_hard_choice_reads_the_option_named_first():
    assert J.hard_choice(" (B) because it is kinder than (A)", [" (A)", " (B)"]) == 1
    assert J.hard_choice("I cannot say", [" (A)", " (B)"]) is None


CONSTITUTION = {
    "principles": [{"name": "good", "comparison": "which is good ?", "weight": 3.0},
                   {"name": "short", "comparison": "which is short ?", "weight": 1.0}],
    "sampling": "all",
    "templates": {"comparison": "{prompt} a : {a} b : {b} {question} answer :", "options": [" a", " b"],
                  "score": "{prompt} {response} . answer :", "score_options": [" 1", " 2", " 3"],
                  "cot": "{question_prompt} because", "cot_answer": " {rationale} . answer :"},
}


def test_constitution_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"principles\[0\].weight: must be a number > 0"):
        parse_constitution({"principles": [{"name": "x", "comparison": "q", "weight": -1}]}, "c.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml: principles\[1\].comparison"):
        parse_constitution({"principles": [{"name": "x", "comparison": "q"}, {"name": "y"}]}, "c.yaml")
    with pytest.raises(ConfigError, match="sampling: must be one of per_comparison | all"):
        parse_constitution({**CONSTITUTION, "sampling": "some"}, "c.yaml")
    with pytest.raises(ConfigError, match=r"templates.comparison: bad placeholder 'conversation'"):
        parse_constitution({**CONSTITUTION, "templates": {"comparison": "{conversation}"}}, "c.yaml")
    with pytest.raises(ConfigError, match="templates.options: must be exactly two"):
        parse_constitution({**CONSTITUTION, "templates": {"options": [" a", " b", " c"]}}, "c.yaml")
    with pytest.raises(ConfigError, match="labels: must be one of pairwise | pointwise, got 'both'"):
        parse_constitution({**CONSTITUTION, "labels": "both"}, "c.yaml")
    with pytest.raises(ConfigError, match="c.yaml: pointwise_scale: must be a number > 0, got 0"):
        parse_constitution({**CONSTITUTION, "pointwise_scale": 0}, "c.yaml")
    with pytest.raises(ConfigError, match="judge.modle: unknown key"):
        parse_constitution({**CONSTITUTION, "judge": {"modle": "x"}}, "c.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("principles: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: line"):
        load_constitution(bad)
    with pytest.raises(ConfigError, match="packaged constitution"):
        load_constitution("no-such-constitution")


def test_packaged_constitutions_load():
    reviews, hhh = load_constitution("reviews"), load_constitution("hhh")
    assert [p.name for p in reviews.principles] == ["kind", "repeat", "ending", "short"]
    assert reviews.sampling == "all" and reviews.judge["model"] == "builtin:reviews-judge"
    assert {p.name for p in hhh.principles} >= {"harmless", "helpful", "honest"} and hhh.judge["base_url"]
    text = hhh.comparison_prompt("Human: hi", "Hello!", "Go away.", hhh.principles[0])
    assert text.startswith("Consider the following conversation") and text.endswith("The answer is:")


def test_per_comparison_sampling_follows_the_weights():
    c = parse_constitution({**CONSTITUTION, "sampling": "per_comparison"})
    rng = random.Random(0)
    names = [c.pick(rng)[0].name for _ in range(4000)]
    assert abs(names.count("good") / 4000 - 0.75) < 0.03  # weights 3 : 1
    assert [p.name for p in parse_constitution(CONSTITUTION).pick(rng)] == ["good", "short"]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return J.LocalBackend(save_tiny(tmp_path_factory.mktemp("judge") / "m"), batch_size=3)


def brute_logprob(backend, context: str, option: str) -> float:
    """log p(option | context) by the chain rule, one token at a time with a fresh forward each (the slow oracle)."""
    tok, model = backend.tokenizer, backend.model
    ctx, full = tok(context)["input_ids"], tok(context + option)["input_ids"]
    assert full[:len(ctx)] == ctx
    total = 0.0
    with torch.no_grad():
        for t in range(len(ctx), len(full)):
            logits = model(input_ids=torch.tensor([full[:t]])).logits[0, -1]
            total += torch.log_softmax(logits.float(), -1)[full[t]].item()
    return total


def test_local_option_logprobs_are_exact_over_the_whole_option(local):
    contexts = ["the film was", "a very good story , the answer is", "it"]
    options = [" good", " not very good ."]  # a multi-token option: every token counts
    got = local.option_logprobs(contexts, options)  # batched (batch_size 3 over 6 texts), padded
    for c, row in zip(contexts, got):
        for o, lp in zip(options, row):
            assert lp == pytest.approx(brute_logprob(local, c, o), abs=1e-5)


def test_compare_swaps_and_averages_principles(local):
    c = parse_constitution(CONSTITUTION)
    judge = J.Judge(local, c)
    v = judge.compare(["the film was"], ["good ."], ["bad ."])[0]

    def p_first(a, b, q):
        la = local.option_logprobs([f"the film was a : {a} b : {b} {q} answer :"], [" a", " b"])[0]
        return J.option_probs(la)[0]

    # weights 3 (good) and 1 (short); the second order reads P(option B) as P(a)
    ab = (3 * p_first("good .", "bad .", "which is good ?") + p_first("good .", "bad .", "which is short ?")) / 4
    ba = (3 * (1 - p_first("bad .", "good .", "which is good ?")) + (1 - p_first("bad .", "good .",
                                                                                 "which is short ?"))) / 4
    assert v.prob_ab == pytest.approx(ab, abs=1e-6) and v.prob_ba == pytest.approx(ba, abs=1e-6)
    assert v.prob == pytest.approx((ab + ba) / 2, abs=1e-6) and v.principle == "good+short" and not v.hard
    one = J.Judge(local, parse_constitution({**CONSTITUTION, "swap": False})).compare(["the film was"], ["good ."],
                                                                                       ["bad ."])[0]
    assert one.prob == pytest.approx(ab, abs=1e-6) and one.prob_ba is None


def test_cot_labels_are_clamped(local):
    c = parse_constitution({**CONSTITUTION, "cot": True, "cot_clamp": [0.45, 0.55]})
    verdicts = J.Judge(local, c).compare(["the film was"] * 3, ["good .", "bad .", "fine ."],
                                         ["bad .", "awful .", "good ."])
    for v in verdicts:
        assert 0.45 <= v.prob_ab <= 0.55 and 0.45 <= v.prob_ba <= 0.55


def test_score_is_the_rescaled_expected_score(local):
    c = parse_constitution(CONSTITUTION)
    got = J.Judge(local, c).score(["the film was"], ["good"])[0]
    probs = J.option_probs(local.option_logprobs(["the film was good . answer :"], [" 1", " 2", " 3"])[0])
    s = 1 * probs[0] + 2 * probs[1] + 3 * probs[2]
    assert got == pytest.approx(2 * (s - 1) / 2 - 1, abs=1e-6)


def test_pointwise_labels_compare_the_two_expected_scores(local):
    c = parse_constitution({**CONSTITUTION, "labels": "pointwise", "pointwise_scale": 0.5})
    judge = J.Judge(local, c)
    v = judge.compare(["the film was", "it"], ["good", "fine ."], ["bad", "fine ."])

    def s(response):  # the expected 1-3 score of the score prompt, by hand
        probs = J.option_probs(local.option_logprobs([f"the film was {response} . answer :"], [" 1", " 2", " 3"])[0])
        return probs[0] + 2 * probs[1] + 3 * probs[2]

    want = 1 / (1 + math.exp(-(s("good") - s("bad")) / 0.5))
    assert v[0].prob == pytest.approx(want, abs=1e-6) and v[0].prob_ab == v[0].prob
    assert v[0].prob_ba is None and v[0].consistent is None and v[0].principle == "score"
    assert v[1].prob == pytest.approx(0.5, abs=1e-9)  # the same response twice: no preference


class NoLogprobs:
    """A backend that, like a server without log-probs, only writes text: always names option b."""

    name = "text-only"

    def __init__(self):
        self.calls = 0

    def option_logprobs(self, contexts, options):
        self.calls += 1
        return [None] * len(contexts)

    def generate(self, contexts, max_new_tokens=48, temperature=0.0, seed=0):
        return [" b , clearly"] * len(contexts)


def test_a_backend_without_logprobs_gives_flagged_hard_labels():
    c = parse_constitution({**CONSTITUTION, "sampling": "per_comparison"})
    v = J.Judge(NoLogprobs(), c).compare(["p"], ["x"], ["y"])[0]
    # "b" both times: a loses with a first (0), a wins with a second (1): a pure position preference -> 0.5
    assert v.hard and v.prob_ab == 0.0 and v.prob_ba == 1.0 and v.prob == 0.5 and v.consistent is False


def test_cache_is_keyed_by_backend_and_prompt(local, tmp_path):
    c = parse_constitution(CONSTITUTION)
    first = J.Judge(local, c, cache=tmp_path / "cache.sqlite").compare(["the film was"], ["good ."], ["bad ."])

    class Counting:
        name, calls = local.name, 0

        def option_logprobs(self, contexts, options):
            Counting.calls += 1
            return local.option_logprobs(contexts, options)

    again = J.Judge(Counting(), c, cache=tmp_path / "cache.sqlite").compare(["the film was"], ["good ."], ["bad ."])
    assert Counting.calls == 0 and again[0].prob == first[0].prob  # all four prompts came from the cache
    J.Judge(Counting(), c, cache=tmp_path / "cache.sqlite").compare(["the film was"], ["good ."], ["fine ."])
    assert Counting.calls == 1  # a new pair is a new prompt
    Counting.name = "another-model"
    J.Judge(Counting(), c, cache=tmp_path / "cache.sqlite").compare(["the film was"], ["good ."], ["bad ."])
    assert Counting.calls == 2  # the same prompt to another backend is not a cache hit


def test_generated_text_is_cut_at_the_first_stop():
    assert J.cut_at("it says dull . revision request : rewrite", ["revision request :", "review :"]) == "it says dull . "
    assert J.cut_at("no stop here", ["\nHuman:"]) == "no stop here"
    with pytest.raises(ConfigError, match="templates.stop: must be a list of non-empty strings"):
        parse_constitution({**CONSTITUTION, "templates": {"stop": [""]}}, "c.yaml")
