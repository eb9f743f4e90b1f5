"""`tether label ai` and soft labels: agreement and calibration by hand, labelled records in label export's format
plus prob, both orders and principle, and `prob` trained as per-pair label smoothing by the BT and DPO losses."""

import json
import math

import pytest
import torch
import yaml

from tether import data as D
from tether.cli import main
from tether.config import ConfigError
from tether.feedback import ai_labels as A
from tether.losses import bradley_terry_loss, dpo_sigmoid_loss, soft_label_smoothing
from tether.rewards.judge import Verdict
from tether.tasks import reviews as R
from tether.testing import save_tiny, tiny_tokenizer

torch.set_num_threads(1)


def test_agreement_counts_an_undecided_judge_half():
    assert A.agreement([0.9, 0.2, 0.5, 0.7], [True, True, True, False]) == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert math.isnan(A.agreement([], []))


def test_expected_calibration_error_by_hand():
    # bin [0.9, 1): probs 0.9, 0.95 (mean 0.925), outcomes 1, 0 (0.5) -> |0.425|, weight 2/4
    # bin [0.6, 0.7): prob 0.6, outcome 1 -> 0.4, weight 1/4; bin [0.7, 0.8): 0.7, outcome 1 -> 0.3, weight 1/4
    ece = A.expected_calibration_error([0.9, 0.95, 0.6, 0.7], [True, False, True, True])
    assert ece == pytest.approx(0.5 * 0.425 + 0.25 * 0.4 + 0.25 * 0.3)
    assert A.expected_calibration_error([1.0, 1.0], [True, True]) == 0.0  # p = 1 falls in the last bin


def test_human_calibration_error_does_not_depend_on_which_response_is_a():
    # confidences 0.9, 0.8, 0.6, 0.7; the human agrees with the judge's pick in pairs 1, 3 and 4:
    # bins [0.9]: |0.9 − 1| = 0.1; [0.8]: |0.8 − 0| = 0.8; [0.6]: |0.6 − 1|; [0.7]: |0.7 − 1| -> mean 0.375
    p_a, human = [0.9, 0.2, 0.6, 0.3], [True, True, True, False]
    assert A.human_calibration_error(p_a, human) == pytest.approx((0.1 + 0.8 + 0.4 + 0.3) / 4)
    flipped = A.human_calibration_error([1 - p for p in p_a], [not h for h in human])
    assert flipped == pytest.approx(A.human_calibration_error(p_a, human))


class FixedJudge:
    """Stands in for the judge's output only, to check how verdicts become records (the judge is tested elsewhere)."""

    def __init__(self, verdicts):
        self.verdicts = verdicts

    def compare(self, prompts, a, b):
        return self.verdicts


def test_records_put_the_judges_choice_first():
    pairs = [{"prompt": "p", "a": "x", "b": "y", "human": True}, {"prompt": "q", "a": "u", "b": "v", "human": None}]
    verdicts = [Verdict(0.3, 0.4, 0.2, "kind"), Verdict(0.8, 0.9, 0.7, "kind+short", hard=True)]
    out = A.label_pairs(FixedJudge(verdicts), pairs, "reviews")
    assert out[0] == {"prompt": "p", "chosen": "y", "rejected": "x", "prob": pytest.approx(0.7), "rater": "ai:reviews",
                      "principle": "kind", "prob_orders": [pytest.approx(0.6), pytest.approx(0.8)],
                      "human_agrees": False}
    assert out[1]["chosen"] == "u" and out[1]["prob"] == 0.8 and out[1]["hard"] and "human_agrees" not in out[1]
    D.validate_record(out[0], "pairs")  # what tether rm and tether dpo read
    s = A.summarise(pairs, out)
    assert s["agreement_human"] == 0.0 and s["agreement_human_one_order"] == 0.0 and s["hard_labels"] == 1
    assert s["position_consistency"] == 1.0  # both verdicts kept their side in both orders


def test_gold_agreement_and_bayes_ceiling_on_the_reviews_task():
    good, bad = "the film was wonderful .", "the film was awful ."
    pairs = [{"prompt": "p", "a": good, "b": bad, "human": True}, {"prompt": "p", "a": bad, "b": good, "human": True}]
    out = A.label_pairs(FixedJudge([Verdict(0.9, 0.9, 0.9, "k"), Verdict(0.6, 0.7, 0.5, "k")]), pairs, "r")
    s = A.summarise(pairs, out, R, tau=1.0)
    assert s["agreement_gold"] == 0.5 and s["human_agreement_gold"] == 0.5 and s["position_consistency"] == 0.5
    gap = R.gold_score(good) - R.gold_score(bad)  # 4: the ceiling is σ(4) for both pairs
    assert s["bayes_ceiling"] == pytest.approx(1 / (1 + math.exp(-gap)))


def test_prob_is_validated_and_collated():
    with pytest.raises(D.DataError, match="prob.*must be a probability in"):
        D.validate_record({"prompt": "p", "chosen": "a", "rejected": "b", "prob": 1.5}, "pairs", "x.jsonl", 3)
    t = tiny_tokenizer()
    pairs = [D.encode_pair(t, {"prompt": "the", "chosen": "good", "rejected": "bad", "prob": 0.8}),
             D.encode_pair(t, {"prompt": "the", "chosen": "good", "rejected": "bad"})]
    batch = D.collate_pairs(pairs, t.pad_token_id)
    assert batch["prob"][0].item() == pytest.approx(0.8) and math.isnan(batch["prob"][1].item())


def test_soft_labels_are_per_pair_label_smoothing():
    eps = soft_label_smoothing(torch.tensor([math.nan, 0.8]), 0.1)
    assert eps.tolist() == pytest.approx([0.1, 0.2])
    assert soft_label_smoothing(torch.tensor([math.nan]), 0.05) == 0.05
    # r_w − r_l = 0 and ln 3 (σ = 0.75); ε = 0.1, 0.2:
    # ℓ0 = ln 2; ℓ1 = −0.8 ln 0.75 − 0.2 ln 0.25 = 0.23014 + 0.27726 = 0.50740; mean 0.60027
    loss, _ = bradley_terry_loss(torch.tensor([0.0, math.log(3)]), torch.zeros(2), label_smoothing=eps)
    assert loss.item() == pytest.approx((math.log(2) + 0.8 * -math.log(0.75) - 0.2 * math.log(0.25)) / 2, abs=1e-5)
    # DPO, β = 1, h = ln 3: the same −0.8 ln σ(h) − 0.2 ln σ(−h)
    dpo, _ = dpo_sigmoid_loss(torch.tensor([math.log(3)]), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0,
                              label_smoothing=eps[1:])
    assert dpo.item() == pytest.approx(0.50740, abs=1e-4)


def test_dpo_refuses_soft_labels_a_loss_cannot_use():
    from tether.losses import PREFERENCE_LOSSES
    from tether.recipes.dpo import pair_fields

    ex = [D.PairExample([4], [5, 1], [6, 1], prob=0.7)]
    assert pair_fields(PREFERENCE_LOSSES["dpo"], ex) == (False, False)
    with pytest.raises(ConfigError, match="'prob' fields .* which loss ipo_loss cannot use"):
        pair_fields(PREFERENCE_LOSSES["ipo"], ex)


def test_label_ai_end_to_end_with_a_local_judge(tmp_path, capsys):
    judge_dir = save_tiny(tmp_path / "judge")
    constitution = tmp_path / "c.yaml"
    constitution.write_text(yaml.safe_dump({
        "name": "tiny", "judge": {"model": str(judge_dir)}, "sampling": "all",
        "principles": [{"name": "good", "comparison": "which is good ?"},
                       {"name": "short", "comparison": "which is short ?", "weight": 2}],
        "templates": {"comparison": "{prompt} a : {a} b : {b} {question} answer :", "options": [" a", " b"]}}))
    pairs = [{"prompt": "the film was", "chosen": "good .", "rejected": "bad ."},
             {"prompt": "it", "chosen": "fine", "rejected": "very dull !"}]
    D.write_jsonl(tmp_path / "prefs.jsonl", pairs)
    D.write_jsonl(tmp_path / "cand.jsonl", [{"prompt": "the film", "responses": ["good", "bad", "fine"]}])
    assert main(["label", "ai", f"constitution={constitution}", f"data={tmp_path / 'prefs.jsonl'}",
                 f"out={tmp_path / 'ai.jsonl'}", "task=reviews", f"cache={tmp_path / 'cache.sqlite'}"]) == 0
    records = list(D.load_records(tmp_path / "ai.jsonl", "pairs"))
    assert len(records) == 2 and all(r["rater"] == "ai:tiny" and r["principle"] == "good+short" for r in records)
    assert all(0.5 <= r["prob"] <= 1 and r["prob"] == pytest.approx(sum(r["prob_orders"]) / 2) for r in records)
    meta = json.loads((tmp_path / "ai.meta.json").read_text())
    assert {"agreement_human", "agreement_gold", "bayes_ceiling", "position_consistency", "ece_human"} <= set(meta)
    assert main(["label", "ai", f"constitution={constitution}", f"data={tmp_path / 'cand.jsonl'}",
                 f"out={tmp_path / 'ai2.jsonl'}"]) == 0
    assert len(list(D.load_records(tmp_path / "ai2.jsonl", "pairs"))) == 3  # every pair of three responses
    assert main(["label", "ai", f"data={tmp_path / 'prefs.jsonl'}"]) == 2
    assert "label ai needs data=FILE and out=FILE" in capsys.readouterr().err


def test_summary_reads_a_human_label_for_either_side():
    # the human preferred b in the second pair; the judge agrees on both, so agreement is 1 in both orders' terms
    pairs = [{"prompt": "p", "a": "x", "b": "y", "human": True}, {"prompt": "p", "a": "u", "b": "v", "human": False}]
    out = A.label_pairs(FixedJudge([Verdict(0.8, 0.9, 0.7, "k"), Verdict(0.3, 0.4, 0.2, "k")]), pairs, "r")
    s = A.summarise(pairs, out)
    assert s["agreement_human"] == 1.0 and s["agreement_human_one_order"] == 1.0
    assert [r["human_agrees"] for r in out] == [True, True]
