"""DPO family end to end on a tiny model: ln 2 at step 0 (policy = reference), reference log-probs computed once and
reused, reference-free losses load no reference, KTO runs on unpaired data, parameters move."""

import json
import math

import pytest
import torch

from tether.config import ConfigError, load_config
from tether.recipes import dpo as R
from tether.testing import save_tiny


@pytest.fixture()
def setup(tmp_path):
    save_tiny(tmp_path / "m")
    with open(tmp_path / "pairs.jsonl", "w") as f, open(tmp_path / "kto.jsonl", "w") as g:
        for i in range(16):
            f.write(json.dumps({"prompt": "the film was", "chosen": "good and great .", "rejected": "bad ."}) + "\n")
            g.write(json.dumps({"prompt": "the film was", "completion": "good ." if i % 2 else "bad .",
                                "label": bool(i % 2)}) + "\n")
    return tmp_path


def run(tmp, **kw):
    base = {"model": str(tmp / "m"), "data": str(tmp / "pairs.jsonl"), "out": str(tmp / "run"), "max_steps": 3,
            "batch_size": 4, "progress": False, "lr": 1e-2, "lr_schedule": "constant",
            "mixed_precision": "fp32"}  # the arithmetic to 1e-5: bf16 autocast is tested in test_precision.py
    return R.run(load_config(R.DPOConfig, None, {**base, **kw}))


def metrics(tmp, name="run"):
    return [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]


def test_dpo_starts_at_ln2_and_learns(setup):
    run(setup, max_steps=8)
    lines = metrics(setup)
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    assert lines[-1]["loss"] < lines[0]["loss"] and lines[-1]["rewards/accuracies"] == 1.0
    assert len(list((setup / "run").glob("reference_logps-*.pt"))) == 1 and (setup / "run" / "model" / "config.json").exists()


def test_reference_logps_are_cached_and_reused(setup, monkeypatch):
    run(setup, max_steps=2, save_every=1)
    cached = torch.load(next((setup / "run").glob("reference_logps-*.pt")))
    assert cached.shape == (16, 2) and (cached[:, 0] != cached[:, 1]).all()
    calls = []
    original = R.sequence_logps
    monkeypatch.setattr(R, "sequence_logps", lambda *a, **k: calls.append(1) or original(*a, **k))
    run(setup, max_steps=3, save_every=1, resume=True, resume_changed="max_steps")  # cache reused: one forward
    assert len(calls) == 1


def test_the_reference_cache_belongs_to_its_pairs_and_survives_a_torn_write(setup):
    run(setup, max_steps=2, save_every=1)
    swapped = setup / "swapped.jsonl"
    rows = [json.loads(x) for x in (setup / "pairs.jsonl").read_text().splitlines()]
    swapped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows))
    (setup / "run" / "checkpoints" / "step-0000002").rename(setup / "run" / "checkpoints" / ".gone")
    run(setup, max_steps=2, save_every=1, resume=True, data=str(swapped), resume_changed="data")
    assert len(list((setup / "run").glob("reference_logps-*.pt"))) == 2  # the swapped pairs got their own cache
    first = metrics(setup)
    assert first[1]["loss"] > 0  # step 1 trained on the swapped pairs with their own reference
    for cache in (setup / "run").glob("reference_logps-*.pt"):
        cache.write_bytes(b"")  # a kill during its write used to leave this, and every later run died of EOFError
    (setup / "run" / "checkpoints" / "step-0000002").rename(setup / "run" / "checkpoints" / ".gone-too")
    again = run(setup, max_steps=2, resume=True, data=str(swapped), resume_changed="data")  # step 1 again
    assert math.isfinite(again["train_loss"]) and metrics(setup)[1]["loss"] == pytest.approx(first[1]["loss"])
    fresh = run(setup, out=str(setup / "fresh"), max_steps=1, data=str(swapped))
    assert metrics(setup, "fresh")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # ln 2, not a stale cache's
    assert math.isfinite(fresh["train_loss"])


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_skip_the_reference(setup, loss, monkeypatch):
    monkeypatch.setattr(R, "reference_logps", lambda *a, **k: pytest.fail("no reference for " + loss))
    summary = run(setup, loss=loss)
    assert math.isfinite(summary["train_loss"])


@pytest.mark.parametrize("loss", ["ipo", "robust_dpo", "hinge"])
def test_other_paired_losses_run(setup, loss):
    assert math.isfinite(run(setup, loss=loss, label_smoothing=0.1)["train_loss"])


def test_kto_on_unpaired_data(setup):
    summary = run(setup, loss="kto", data=str(setup / "kto.jsonl"))
    lines = metrics(setup)
    assert math.isfinite(summary["train_loss"]) and "kl" in lines[0]
    assert lines[0]["loss"] == pytest.approx(0.5, abs=1e-5)  # r = z0 = 0 at the start: 1 − σ(0)


def test_accumulation_gives_the_same_curve(setup):
    run(setup, out=str(setup / "a"), batch_size=4, grad_accum=1)
    run(setup, out=str(setup / "b"), batch_size=2, grad_accum=2)
    assert [x["loss"] for x in metrics(setup, "a")] == pytest.approx([x["loss"] for x in metrics(setup, "b")], abs=1e-5)


def test_held_out_evals_and_the_summary_keys(setup):
    summary = run(setup, max_steps=4, task="reviews", eval_every=2, n_eval_prompts=2, eval_samples=1, max_new_tokens=4)
    evals = [json.loads(x) for x in (setup / "run" / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert evals[0]["kl_mean"] == pytest.approx(0.0, abs=1e-5)  # the start policy is the reference
    assert summary["gold_reward_end"] == evals[-1]["gold_mean"] and summary["kl_end"] == evals[-1]["kl_mean"]
    for key in ("train_loss", "reward_accuracy", "gold_reward_start", "gold_reward_end", "gold_reward_std_start",
                "kl_end", "tokens_per_second", "wall_seconds"):
        assert math.isfinite(summary[key]), key


def test_rpo_adds_alpha_times_the_chosen_nll(setup):
    """At step 0 the DPO term is ln 2 (policy = reference), so the logged loss is ln 2 + α·NLL(yw) per token."""
    run(setup, max_steps=1, rpo_alpha=0.5)
    first = metrics(setup)[0]
    assert first["nll_chosen"] > 0
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["nll_chosen"], abs=1e-5)


def test_rankings_train_as_their_pairs(setup):
    """A 3-way ranking is the C(3,2) = 3 pairs its order implies, the better completion chosen."""
    from tether.data import write_jsonl
    from tether.models import load_tokenizer

    write_jsonl(setup / "ranked.jsonl", [{"prompt": "the film was", "completions": ["bad .", "great .", "fine ."],
                                          "ranking": [1, 2, 0]}] * 4)
    cfg = load_config(R.DPOConfig, None, {"model": str(setup / "m"), "data": str(setup / "ranked.jsonl")})
    tok = load_tokenizer(setup / "m")
    examples = R.encode(cfg, tok, paired=True)
    decoded = [(tok.decode(e.chosen_ids, skip_special_tokens=True).strip(),
                tok.decode(e.rejected_ids, skip_special_tokens=True).strip()) for e in examples[:3]]
    assert len(examples) == 12 and decoded == [("great .", "fine ."), ("great .", "bad ."), ("fine .", "bad .")]
    assert math.isfinite(run(setup, data=str(setup / "ranked.jsonl"), max_steps=2)["train_loss"])


def test_pair_weights_and_margins_are_the_losses_own(setup):
    """Step 0 (policy = reference, h = 0): a pair's DPO loss is −log σ(−m) = log(1 + e^m), weighted by its weight.
    Margins [0, 1, 0, 1], weights [1, 3, 1, 3]: (2·ln 2 + 6·log(1 + e)) / 8 = (1.38629 + 7.87957) / 8 = 1.15823."""
    path = setup / "weighted.jsonl"
    rows = [{"prompt": "the film was", "chosen": "good and great .", "rejected": "bad .", "margin": float(i % 2),
             "weight": 1.0 + 2 * (i % 2)} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(setup, data=str(path), max_steps=1, batch_size=4)
    assert metrics(setup)[0]["loss"] == pytest.approx((2 * math.log(2) + 6 * math.log(1 + math.e)) / 8, abs=1e-5)
    with pytest.raises(ConfigError, match="margin.*cannot use; use loss=dpo | hinge | robust_dpo"):
        run(setup, data=str(path), loss="ipo", out=str(setup / "ipo"))


def test_held_out_pairs_are_evaluated(setup):
    summary = run(setup, max_steps=4, eval_every=2, eval_data=str(setup / "pairs.jsonl"))
    lines = metrics(setup)
    assert [("eval/loss" in x) for x in lines] == [False, True, False, True]
    assert lines[1]["eval/loss"] < math.log(2) and summary["eval_reward_accuracy"] == 1.0
    assert summary["eval_loss"] == pytest.approx(lines[-1]["eval/loss"]) and summary["eval_pairs"] == 16
