"""Online DPO: the pair rules by hand, the labellers, and `tether dpo online` end to end on a tiny model — pairs
sampled each round, reference log-probs from the FIXED starting policy, parameters moved, exact reuse on resume."""

import json
import math
import shutil

import pytest
import torch

from tether.config import ConfigError, load_config
from tether.forward import sequence_logps
from tether.recipes import dpo as R
from tether.recipes import online_dpo as O
from tether.rewards import FunctionReward
from tether.tasks import reviews
from tether.testing import save_tiny


def group(a, b, eos_a=True, eos_b=True, prompt="p"):
    return {"prompt": prompt, "completions": [a, b], "has_eos": [eos_a, eos_b]}


def test_pairs_from_groups_by_hand():
    groups = [group("x", "y"), group("x", "y"), group("x", "y", eos_a=False), group("x", "y", False, False),
              group("same", "same"), group("x", "y"), group("", "y")]
    labels = [True, False, True, True, True, None, False]
    pairs = O.pairs_from_groups(groups, labels)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("x", "y"),  # a wins
        ("y", "x"),  # b wins
        ("y", "x"),  # a did not end: b wins whatever the label
    ]  # dropped: neither ended, equal texts, a tie (None), an empty response


def test_score_labeler_picks_the_higher_score():
    label = O.score_labeler(FunctionReward(lambda p, c, r: [len(x) for x in c]))
    assert label(["p"] * 3, ["aa", "a", "abc"], ["a", "aa", "xyz"], [{}] * 3) == [True, False, None]


def test_rater_labeler_follows_bradley_terry():
    # gold("wonderful .") = 2, gold("awful .") = −2: the rater picks the first with σ(4/τ); τ = 1 -> 0.982, τ = 4 -> 0.731
    for tau, p in ((1.0, 1 / (1 + math.exp(-4))), (4.0, 1 / (1 + math.exp(-1)))):
        label = O.rater_labeler(reviews, tau, seed=0)
        votes = label(["p"] * 4000, ["wonderful ."] * 4000, ["awful ."] * 4000, [{}] * 4000)
        assert abs(sum(votes) / 4000 - p) < 4 * math.sqrt(p * (1 - p) / 4000)


def test_rater_labeler_needs_a_task_with_raters():
    from tether.tasks import arithmetic

    with pytest.raises(ConfigError, match="raters"):
        O.rater_labeler(arithmetic, 1.0, 0)


def test_round_prompts_cycle():
    prompts = [{"prompt": str(i)} for i in range(5)]
    assert [p["prompt"] for p in O.round_prompts(prompts, 1, 3)] == ["3", "4", "0"]


def test_online_config_checks():
    base = {"model": "m"}
    with pytest.raises(ConfigError, match="prompts"):
        load_config(O.OnlineDPOConfig, None, base)
    with pytest.raises(ConfigError, match="task"):
        load_config(O.OnlineDPOConfig, None, {**base, "prompts": "p.jsonl", "label_source": "gold"})
    with pytest.raises(ConfigError, match="samples pairs"):
        load_config(O.OnlineDPOConfig, None, {**base, "task": "reviews", "loss": "kto"})
    load_config(O.OnlineDPOConfig, None, {**base, "prompts": "p.jsonl", "label_source": "python:m:f"})  # no task
    with pytest.raises(ConfigError, match="unknown key 'rounds'"):  # offline DPO offers only the keys it uses
        load_config(R.DPOConfig, None, {"model": "m", "data": "d.jsonl", "rounds": 2})


def test_online_dpo_is_its_own_command(capsys):
    from tether.cli import main

    assert main(["dpo", "model=m", "online=true"]) == 2
    assert "tether dpo online" in capsys.readouterr().err


@pytest.fixture()
def tiny(tmp_path):
    save_tiny(tmp_path / "m")
    return tmp_path


def online(tmp, **kw):
    # 16 tokens: the random tiny model ends about one response in five, enough usable pairs per round
    base = {"model": str(tmp / "m"), "task": "reviews", "label_source": "raters", "rounds": 2,
            "pairs_per_round": 16, "max_new_tokens": 16, "max_steps": 2, "batch_size": 4, "lr": 1e-2,
            "lr_schedule": "constant", "n_eval_prompts": 4, "out": str(tmp / "run"), "progress": False,
            "mixed_precision": "fp32"}  # exact arithmetic; bf16 is test_precision.py's
    return O.run(load_config(O.OnlineDPOConfig, None, {**base, **kw}))


def test_online_dpo_end_to_end(tiny):
    summary = online(tiny)
    run = tiny / "run"
    for key in ("train_loss", "reward_accuracy", "gold_reward_start", "gold_reward_end", "gold_reward_std_start",
                "kl_end", "tokens_per_second", "wall_seconds"):
        assert math.isfinite(summary[key]), key
    assert summary["steps"] == 4 and summary["rounds"] == 2 and summary["pairs_total"] > 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 0, 1, 1]
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # round 0 starts at policy = reference
    evals = [json.loads(x) for x in (run / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4]

    from tether.models import load_causal_lm, load_tokenizer

    start, end = load_causal_lm(tiny / "m"), load_causal_lm(run / "model")
    assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), end.parameters()))
    # the reference is the STARTING policy in every round: round 1's cached log-probs are the start model's
    cfg = load_config(R.DPOConfig, None, {"model": str(tiny / "m"), "data": str(run / "rounds/round-1/pairs.jsonl")})
    tok = load_tokenizer(tiny / "m")
    examples = R.encode(cfg, tok, True)
    batch = R.collate(examples, tok.pad_token_id, True)
    with torch.no_grad():
        rows = sequence_logps(start, batch, average=False)
    cached = torch.load(next((run / "rounds/round-1").glob("reference_logps-*.pt")))
    n = len(examples)
    assert torch.allclose(cached, torch.stack([rows[:n], rows[n:]], 1), atol=1e-5)


def test_online_dpo_resume_reuses_the_sampled_pairs(tiny, monkeypatch):
    online(tiny, save_every=3)
    first = [json.loads(x)["loss"] for x in (tiny / "run" / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(tiny / "run" / "checkpoints" / "step-0000004")  # back to the middle of round 1
    monkeypatch.setattr(O, "sample_records", lambda *a, **k: pytest.fail("a resumed round must not resample"))
    online(tiny, save_every=3, resume=True)
    again = [json.loads(x)["loss"] for x in (tiny / "run" / "metrics.jsonl").read_text().splitlines()]
    assert again == pytest.approx(first, abs=1e-5)


def test_rng_of_the_raters_is_seeded():
    a = O.rater_labeler(reviews, 1.0, seed=3)(["p"] * 50, ["good ."] * 50, ["fine ."] * 50, [{}] * 50)
    b = O.rater_labeler(reviews, 1.0, seed=3)(["p"] * 50, ["good ."] * 50, ["fine ."] * 50, [{}] * 50)
    assert a == b and 0 < sum(a) < 50  # equal gold: a coin flip per pair, the same flips for the same seed
