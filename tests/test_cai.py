"""Direct RLAIF (`reward=judge:FILE.yaml`) and `tether cai` (SL-CAI) end to end on tiny in-process models."""

import json

import pytest
import torch
import yaml

from tether import data as D
from tether.config import load_config
from tether.recipes import best_of_n as B
from tether.recipes import cai as C
from tether.rewards.constitution import parse_constitution
from tether.rewards.judge import Judge, JudgeReward, LocalBackend
from tether.rewards.spec import reward_from_spec
from tether.testing import save_tiny

torch.set_num_threads(1)
TEMPLATES = {"comparison": "{prompt} a : {a} b : {b} {question} answer :", "options": [" a", " b"],
             "score": "{prompt} {response} . answer :", "score_options": [" 1", " 2", " 3", " 4", " 5"],
             "critique": "{prompt} {response} . what is bad ?", "revision": "{context} {critique} . {request} :",
             "revision_direct": "{prompt} {response} . {request} :"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cai")
    save_tiny(tmp / "policy")
    save_tiny(tmp / "judge", seed=1)
    path = tmp / "constitution.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "judge": {"model": str(tmp / "judge"), "max_new_tokens": 6},
        "principles": [{"name": "good", "comparison": "which is good ?", "critique": "what is bad ?",
                        "revision": "say it better"},
                       {"name": "short", "comparison": "which is short ?", "weight": 2.0}],
        "templates": TEMPLATES}))
    return tmp, path


def test_judge_spec_is_direct_rlaif(tiny):
    tmp, path = tiny
    reward = reward_from_spec(f"judge:{path}")
    assert isinstance(reward, JudgeReward)
    out = reward(["the film was", "it"], ["good .", "bad"], [{}, {}])
    want = Judge(LocalBackend(tmp / "judge"), parse_constitution(yaml.safe_load(path.read_text()))).score(
        ["the film was", "it"], ["good .", "bad"])
    assert out.scores.tolist() == pytest.approx(want, abs=1e-6)
    assert all(-1 <= s <= 1 for s in want)
    weighted = reward_from_spec(f"judge:{path}*0.5+reviews")  # a term of a weighted sum like any other
    assert set(weighted(["it"], ["good ."], [{}]).components) == {"judge", "reviews"}


def test_best_of_n_picks_by_the_judge(tiny):
    tmp, path = tiny
    summary = B.run(load_config(B.BoNConfig, None, {
        "model": str(tmp / "policy"), "reward": f"judge:{path}", "task": "reviews", "n": 2, "n_prompts": 2,
        "max_new_tokens": 4, "out": str(tmp / "bon"), "missing_eos_penalty": "none", "progress": False}))
    samples = [json.loads(x) for x in (tmp / "bon" / "samples.jsonl").read_text().splitlines()]
    judge = JudgeReward(path)
    for s in samples:  # the proxy column is the judge's score of each sample
        assert s["proxy"] == pytest.approx(judge([s["prompt"]] * 2, s["completions"], [{}, {}]).scores.tolist(),
                                           abs=1e-5)
    assert summary["n"] == 2


def test_revise_rounds_follow_the_constitution(tiny):
    import random

    tmp, path = tiny
    c = parse_constitution(yaml.safe_load(path.read_text()))
    judge = Judge(LocalBackend(tmp / "judge"), c)
    history = C.revise_rounds(judge, c, ["the film was"], ["good ."], 2, False, random.Random(0), 6)[0]
    assert [h["principle"] for h in history] == ["good", "good"]  # only `good` has critique and revision wording
    critique = judge.generate(["the film was good . . what is bad ?"], 6)[0].strip()
    assert history[0]["critique"] == critique
    revision = judge.generate([f"the film was good . . what is bad ? {critique} . say it better :"], 6)[0]
    assert history[0]["revision"] == (C.strip_prompt(revision, "the film was") or "good .")
    direct = C.revise_rounds(judge, c, ["the film was"], ["good ."], 1, True, random.Random(0), 6)[0]
    assert direct[0]["critique"] is None
    assert C.strip_prompt("the film was very good .", "the film was") == "very good ."


def test_cai_end_to_end(tiny):
    tmp, path = tiny
    summary = C.run(load_config(C.CAIConfig, None, {
        "model": str(tmp / "policy"), "constitution": str(path), "task": "reviews", "n_prompts": 4, "rounds": 2,
        "response_tokens": 5, "revision_tokens": 5, "out": str(tmp / "cai"), "batch_size": 2, "progress": False,
        "n_eval_prompts": 3, "eval_samples": 2}))
    rows = [json.loads(x) for x in (tmp / "cai" / "rounds.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["rounds"]) == 2 for r in rows)
    revisions = list(D.load_records(tmp / "cai" / "revisions.jsonl", "demonstrations"))
    assert [r["completion"] for r in revisions] == [r["rounds"][-1]["revision"] for r in rows]
    assert {"gold_round_0", "gold_round_1", "gold_round_2", "sft_train_loss"} <= set(summary)
    assert (tmp / "cai" / "sft" / "model" / "config.json").exists()
    # the starting and the SL-CAI policy, evaluated alike on the task's held-out prompts
    from tether.evaluate import evaluate_policy
    from tether.models import load_causal_lm, load_tokenizer
    from tether.tasks import reviews

    assert summary["kl_start"] == 0.0 and summary["eval_end"]["n_samples"] == 6 and summary["kl_end"] > 0
    end = load_causal_lm(tmp / "cai" / "sft" / "model").eval()
    again = evaluate_policy(end, load_tokenizer(tmp / "policy"), reviews, reviews.prompts("test", 3, 0), n_samples=2,
                            max_new_tokens=5, temperature=1.0, ref_model=load_causal_lm(tmp / "policy").eval(), seed=0)
    assert summary["gold_end"] == pytest.approx(again["gold_mean"]) and summary["kl_end"] == pytest.approx(
        again["kl_mean"])


def test_demo_cai_stages_are_wired(tmp_path):
    from tether.recipes import demo

    cfg = load_config(demo.DemoConfig, None, {"out": str(tmp_path), "stages": "cai"})
    assert cfg.stage_list() == demo.CAI_STAGES and cfg.cai_rounds == 2 and cfg.cai_epochs == 1
    assert demo.CAI_STAGES == ["sft", "rm", "ppo", "cai", "rm_human", "ppo_human", "rm_ai", "ppo_ai", "ppo_judge"]
    assert demo.stage_overrides(cfg, "rm_human")["data"] == str(tmp_path / "data" / "prefs.jsonl")
    assert demo.stage_overrides(cfg, "ppo_human") == {"reward": f"rm:{tmp_path / 'rm_human'}"}
    assert demo.stage_overrides(cfg, "cai") == {"model": str(tmp_path / "sft" / "model"), "task": "reviews"}
    assert demo.stage_overrides(cfg, "ppo_ai") == {"reward": f"rm:{tmp_path / 'rm_ai'}"}
    assert demo.stage_overrides(cfg, "ppo_judge") == {"reward": "judge:reviews", "kl_coef": 0.0, "max_steps": 120}
    # other stages named beside cai run after it (they need its SFT model); overopt adds the weak proxy's run
    more = load_config(demo.DemoConfig, None, {"out": str(tmp_path), "stages": "dpo,cai", "overopt": True})
    assert more.stage_list() == demo.CAI_STAGES + ["dpo", "ppo_nokl"]
    assert demo.DEMO_STAGES["rm_ai"].module == "tether.recipes.reward"
