"""evaluate_policy on a tiny model and a fake task: every number present, KL to itself is 0, accuracy is greedy."""

import pytest
import torch

from tether.evaluate import evaluate_policy
from tether.models import frozen_copy
from tether.testing import tiny_causal_lm, tiny_tokenizer


class LengthTask:
    """Gold reward = number of words; the verifiable flavour counts an exact answer."""

    @staticmethod
    def gold_reward(prompts, completions, records=None):
        return [float(len(c.split())) for c in completions]


@pytest.fixture(scope="module")
def lm():
    tok = tiny_tokenizer()
    return tok, tiny_causal_lm(tok, seed=2, hidden=64).eval()


def test_all_numbers_and_zero_kl_to_itself(lm):
    tok, model = lm
    records = [{"prompt": "the film was"}, {"prompt": "i watched this movie and"}]
    out = evaluate_policy(model, tok, LengthTask, records, n_samples=3, max_new_tokens=6, ref_model=frozen_copy(model))
    assert out["n_samples"] == 6 and out["kl_mean"] == pytest.approx(0.0, abs=1e-5)
    for key in ("gold_mean", "gold_std", "length_mean", "eos_rate", "distinct_1", "distinct_2", "repetition_rate"):
        assert key in out, key
    assert 0 < out["length_mean"] <= 6 and 0 <= out["distinct_2"] <= 1
    assert len(out["samples"]) == 2 and "gold" in out["samples"][0]


def test_kl_to_another_model_is_positive(lm):
    tok, model = lm
    other = frozen_copy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(8.0)  # a much sharper reference: KL(policy || ref) is clearly positive
    out = evaluate_policy(model, tok, None, [{"prompt": "the film was"}], n_samples=32, max_new_tokens=8,
                          ref_model=other)
    assert out["kl_mean"] > 0.5 and "gold_mean" not in out


def test_accuracy_is_greedy_exact_match(lm):
    tok, model = lm
    records = [{"prompt": "the film was", "answer": "x"}] * 3

    class Exact:
        calls = []

        @staticmethod
        def gold_reward(prompts, completions, records=None):
            Exact.calls.append(completions)
            return [1.0] * len(completions)

    out = evaluate_policy(model, tok, Exact, records, n_samples=2, max_new_tokens=4)
    assert out["accuracy"] == 1.0
    greedy = Exact.calls[-1]
    assert len(greedy) == 3 and len(set(greedy)) == 1  # greedy: the same completion for the same prompt
    assert torch.is_tensor(torch.tensor(out["gold_mean"]))
