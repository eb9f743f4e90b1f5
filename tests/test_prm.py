"""Process and outcome reward models (rewards/prm.py): step labels to targets at the step delimiters, the loss and
metrics by hand, `tether rm` / `rm eval` on step-labelled and outcome-labelled records, `reward=prm:DIR`."""

import json
import math
import random

import pytest
import torch

from tether import data as D
from tether.cli import main as cli_main
from tether.config import load_config
from tether.recipes.reward import RewardConfig, run
from tether.rewards.prm import (
    PRMReward,
    encode_steps,
    labelled_metrics,
    majority_answer,
    step_classification_loss,
    step_targets,
)
from tether.rewards.spec import reward_from_spec
from tether.tasks.steps import char_tokenizer
from tether.testing import tiny_causal_lm


def toy_steps(n, seed=0):
    """Steps "a+b=c" with a, b in 1..4; a wrong step writes 9 (never a right sum), so wrong steps are easy to see.
    Labels stop at the first wrong step (PRM800K)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        steps, labels = [], []
        for _ in range(rng.randint(1, 3)):
            a, b = rng.randint(1, 4), rng.randint(1, 4)
            right = rng.random() < 0.7
            steps.append(f"{a}+{b}={a + b if right else 9}")
            if not labels or labels[-1] != -1:
                labels.append(rng.choice([1, 0]) if right else -1)
        out.append({"prompt": "What is 1+2?", "steps": steps, "labels": labels})
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prm")
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, seed=0, hidden=32)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    records = toy_steps(240)
    D.write_jsonl(root / "steps.jsonl", records)
    outcomes = [{"prompt": r["prompt"], "completion": "\n".join(r["steps"]), "label": -1 not in r["labels"]}
                for r in records]
    D.write_jsonl(root / "outcomes.jsonl", outcomes)
    return root


def test_step_targets_neutral_counts_as_correct():
    assert step_targets([1, 0, -1]) == [1.0, 1.0, 0.0]
    assert step_targets([True, False]) == [1.0, 0.0]


def test_encode_steps_reads_each_step_at_its_delimiter():
    tok = char_tokenizer()
    # completion "1+2=3\n3+3=6" + EOS: "\n" is token 5, the EOS token 11
    ex = encode_steps(tok, {"prompt": "What is 1+2+3?", "steps": ["1+2=3", "3+3=6"], "labels": [1, 0]})
    assert ex.completion_ids[5] == tok.convert_tokens_to_ids("\n") and ex.completion_ids[11] == tok.eos_token_id
    assert (ex.positions, ex.targets, ex.score_positions, ex.solution_label) == ([5, 11], [1.0, 1.0], [5, 11], True)
    wrong = encode_steps(tok, {"prompt": "What is 1+2+3?", "steps": ["1+2=4", "4+3=7"], "labels": [-1]})
    assert (wrong.positions, wrong.targets, wrong.score_positions, wrong.solution_label) == ([5], [0.0], [5, 11], False)


def test_step_classification_loss_by_hand():
    # z = (0, ln 3), y = (1, 0): BCE = −log σ(0) − log σ(−ln 3) = ln 2 + ln 4 = 3 ln 2; both on the wrong side of 0
    loss, metrics = step_classification_loss(torch.tensor([0.0, math.log(3.0)]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(3 * math.log(2), abs=1e-6)
    assert metrics["accuracy"].item() == 0.0


def test_labelled_metrics_by_hand():
    # steps: p = (0.9, 0.2 | 0.6), y = (1, 0 | 0): right, right, wrong -> 2/3
    # solutions: scores 0.18 (said wrong, is wrong: right), 0.6 (said right, is wrong: wrong) -> 1/2
    out = labelled_metrics([[0.9, 0.2], [0.6]], [[1.0, 0.0], [0.0]], [0.9 * 0.2, 0.6], [False, False])
    assert out["step_accuracy"] == pytest.approx(2 / 3) and out["solution_accuracy"] == 0.5
    assert out["loss"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3)
    assert (out["steps_labelled"], out["solutions"], out["solutions_correct"]) == (3, 2, 0.0)


@pytest.fixture(scope="module")
def prm_run(files):
    cfg = load_config(RewardConfig, None, [f"model={files / 'base'}", f"data={files / 'steps.jsonl'}",
                                           f"out={files / 'prm'}", "progress=false", "lr=3e-3", "epochs=4",
                                           "batch_size=16"], recipe="rm")
    return run(cfg)


def test_prm_learns_step_labels_and_loads_as_a_reward(files, prm_run):
    assert prm_run["data_kind"] == "steps"  # told apart by its fields
    losses = [json.loads(line)["loss"] for line in (files / "prm" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]
    assert prm_run["eval_step_accuracy"] >= 0.9 and prm_run["eval_solution_accuracy"] >= 0.85
    config = json.loads((files / "prm" / "model" / "config.json").read_text())
    assert config["reward_kind"] == "prm" and config["prm_delimiter"] == "\n" and config["reward_bias"] == 0.0
    reward = reward_from_spec(f"prm:{files / 'prm'}", device="cpu")
    assert isinstance(reward, PRMReward)
    out = reward(["What is 1+2?"] * 3, [" 1+2=3\n3+4=7", "1+2=3\n3+4=9", ""], [{}] * 3)
    assert [len(s) for s in out.step_scores] == [2, 2, 0]
    assert out.scores[0].item() == pytest.approx(math.prod(out.step_scores[0]), rel=1e-6)  # Π_k p_k (Lightman)
    assert out.scores[2].item() == 0.0
    assert out.step_scores[1][1] < 0.5 < out.step_scores[1][0]  # the "=9" step is the wrong one
    assert out.scores[0] > out.scores[1]


def test_rm_eval_reports_step_and_solution_accuracy(files, prm_run, capsys):
    D.write_jsonl(files / "held.jsonl", toy_steps(60, seed=5))
    code = cli_main(["rm", "eval", f"model={files / 'prm'}", f"data={files / 'held.jsonl'}", f"out={files / 'ev'}",
                     "device=cpu"])
    assert code == 0
    summary = json.loads((files / "ev" / "summary.json").read_text())
    assert summary["data_kind"] == "steps" and summary["step_accuracy"] >= 0.9
    assert 0 <= summary["solution_accuracy"] <= 1 and summary["solutions"] == 60


def test_orm_trains_on_outcomes_and_scores_the_final_token(files, tmp_path):
    cfg = load_config(RewardConfig, None, [f"model={files / 'base'}", f"data={files / 'outcomes.jsonl'}",
                                           f"out={tmp_path / 'orm'}", "progress=false", "lr=3e-3", "epochs=4",
                                           "batch_size=16"], recipe="rm")
    summary = run(cfg)
    assert summary["data_kind"] == "unpaired" and summary["eval_solution_accuracy"] >= 0.8
    reward = PRMReward(tmp_path / "orm", device="cpu")
    out = reward(["What is 1+2?"] * 2, ["1+2=3\n3+4=7", "1+2=3\n3+4=9"], [{}, {}])
    assert out.step_scores is None and out.scores[0] > 0.5 > out.scores[1]


def test_bad_step_records_name_file_line_and_field(files, tmp_path, capsys):
    good = json.dumps({"prompt": "p", "steps": ["1+1=2"], "labels": [1]})
    bad = json.dumps({"prompt": "p", "steps": ["1+1=2", "2+1=3"], "labels": [-1, 1]})
    (tmp_path / "bad.jsonl").write_text(good + "\n" + bad + "\n")
    code = cli_main(["rm", f"model={files / 'base'}", f"data={tmp_path / 'bad.jsonl'}", f"out={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl:2: field 'labels[1]': follows the wrong step 0" in err
    inner = json.dumps({"prompt": "p", "steps": ["1+1=2\n2+1=3"], "labels": [1]})
    (tmp_path / "inner.jsonl").write_text(good + "\n" + inner + "\n")
    code = cli_main(["rm", f"model={files / 'base'}", f"data={tmp_path / 'inner.jsonl'}", f"out={tmp_path / 's'}"])
    assert code == 2 and "inner.jsonl:2: field 'steps[0]': holds the step delimiter" in capsys.readouterr().err


def test_majority_answer():
    assert majority_answer([3, 5, 3, None, None, None]) == 3  # None (no answer) never wins
    assert majority_answer([5, 3, 3, 5]) == 5  # a tie: the first seen
    assert majority_answer([None]) is None
    assert majority_answer([5, 3], random.Random(0)) in (5, 3)
