"""Process supervision in the recipes: GRPO with reward=prm:DIR uses the process-supervision advantage
(DeepSeekMath §4.1.3) at the token ends of each response's steps; the steps task's labels and outcome."""

import json

import pytest
import torch

from tests.test_prm import toy_steps
from tether import data as D
from tether.config import ConfigError, load_config
from tether.generation import Rollout
from tether.recipes import grpo as G
from tether.recipes.reward import RewardConfig
from tether.recipes.reward import run as run_rm
from tether.tasks import steps as S
from tether.testing import tiny_causal_lm


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ps")
    tok = S.char_tokenizer()
    for name, seed in (("policy", 3), ("base", 0)):
        model = tiny_causal_lm(tok, seed=seed, hidden=32)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    D.write_jsonl(root / "steps.jsonl", toy_steps(64))
    run_rm(load_config(RewardConfig, None, [f"model={root / 'base'}", f"data={root / 'steps.jsonl'}",
                                            f"out={root / 'prm'}", "progress=false", "max_steps=3",
                                            "batch_size=16"], recipe="rm"))
    D.write_jsonl(root / "prompts.jsonl", [{"prompt": f"What is {a}+{a + 1}+3?", "answer": 2 * a + 4}
                                           for a in range(10, 18)])
    return root


def test_step_token_ends_by_hand():
    tok = S.char_tokenizer()
    ids = tok("1+2=3\n3+3=6").input_ids + [tok.eos_token_id, tok.pad_token_id]
    roll = Rollout(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long),
                   torch.tensor([ids]), torch.tensor([[1] * 12 + [0]]), torch.tensor([True]))
    assert G.step_token_ends(tok, roll, [2]) == [[4, 10]]  # "3" of step 1 is token 4, "6" of step 2 token 10
    with pytest.raises(ValueError, match="scored 3 steps but the response has 2"):
        G.step_token_ends(tok, roll, [3])


def grpo_cfg(files, **kw):
    base = {"model": str(files / "policy"), "task": "none", "prompts": str(files / "prompts.jsonl"),
            "eval_prompts": str(files / "prompts.jsonl"), "reward": f"prm:{files / 'prm'}", "out": str(files / "g"),
            "max_steps": 2, "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 16, "batch_size": 8,
            "progress": False, "lr": 1e-2, "beta": 0.0}
    return load_config(G.GRPOConfig, None, {**base, **kw})


def test_grpo_with_a_prm_uses_the_process_advantage(files, monkeypatch):
    seen = []
    real = G.process_advantages

    def recording(step_rewards, ends, mask, group_size):
        out = real(step_rewards, ends, mask, group_size)
        seen.append((step_rewards, ends, out))
        return out

    monkeypatch.setattr(G, "process_advantages", recording)
    summary = G.run(grpo_cfg(files))
    assert summary["steps"] == 2 and len(seen) == 2
    step_rewards, ends, adv = seen[0]
    assert len(step_rewards) == 8 and all(len(r) == len(e) for r, e in zip(step_rewards, ends))
    # a token after the last step end has advantage 0; a token at the first step end sums every step's term
    for i, e in enumerate(ends):
        if e and e[-1] + 1 < adv.shape[1]:
            assert adv[i, e[-1] + 1 :].abs().sum() == 0
    assert any(e for e in ends)  # some responses had steps


def test_process_supervision_refuses_what_it_cannot_combine(files):
    with pytest.raises(ConfigError, match="estimator=grpo"):
        G.run(grpo_cfg(files, estimator="rloo", out=str(files / "g2")))
    summary = G.run(grpo_cfg(files, process=False, out=str(files / "g3")))  # outcome advantage of Π p_k
    assert summary["steps"] == 2


def test_steps_task_labels_and_outcome():
    ops = [23, 45, 19]
    assert S.step_labels(ops, ["23+45=68", "68+19=87"]) == [1, 1]
    assert S.step_labels(ops, ["23+45=58", "58+19=77"]) == [-1]  # stops at the first wrong step
    assert S.step_labels(ops, ["23+45=68", "68+18=86"]) == [1, -1]  # the wrong operand
    assert S.step_labels(ops, ["23+45=68"]) == [1]  # right so far, unfinished
    records = [{"prompt": S.question(ops), "answer": 87, "operands": ops}] * 3
    done = [" 23+45=68\n68+19=87", "23+45=58\n58+19=77", "23+45=68"]
    assert S.gold_reward(None, done, records) == [1.0, 0.0, 0.0]
    assert S.step_accuracy(None, done, records) == [1.0, 0.0, 0.0]
    prm, orm = S.labelled_samples(records, done)
    assert [r["labels"] for r in prm] == [[1, 1], [-1], [1]]
    assert [r["label"] for r in orm] == [True, False, False]
    for r in prm:
        D.validate_record(r, "steps")
    # the worked examples' errors: a forgotten carry (23+48: 61 instead of 71) then carrying on from it
    import random

    got = S.worked_steps([23, 48, 10], random.Random(0), p_error=1.0)
    assert got == ["23+48=61", "61+10=71"]


def test_prompts_split_by_question_and_carry_operands():
    train, test = S.prompts("train", 50), S.prompts("test", 20)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert all(r["answer"] == sum(r["operands"]) and r["prompt"] == S.question(r["operands"]) for r in train)
    assert json.dumps(train[0])  # plain JSON records


def test_ppo_step_rewards_by_hand():
    from tether.recipes.ppo import step_rewards

    tok = S.char_tokenizer()
    ids = tok("1+2=3\n3+3=6").input_ids + [tok.eos_token_id, tok.pad_token_id]
    rows = torch.tensor([ids, ids])
    roll = Rollout(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), rows,
                   torch.tensor([[1] * 12 + [0], [1] * 13]), torch.tensor([True, False]))
    got = step_rewards(tok, roll, [[0.9, 0.2], [0.9, 0.2]])
    expected = torch.zeros(2, 13)
    expected[0, 4], expected[0, 10] = 0.9, 0.2  # each step's probability at its last token; the row without EOS: 0
    assert torch.equal(got, expected)


def test_ppo_with_a_prm_trains_on_step_rewards(files, monkeypatch):
    from tether.recipes import ppo as P

    seen = []
    real = P.compute_advantages

    def recording(cfg, batch, beta):
        seen.append(None if batch.step_rewards is None else batch.step_rewards.clone())
        return real(cfg, batch, beta)

    monkeypatch.setattr(P, "compute_advantages", recording)
    cfg = load_config(P.PPOConfig, None, {
        "model": str(files / "policy"), "reward": f"prm:{files / 'prm'}", "prompts": str(files / "prompts.jsonl"),
        "eval_prompts": str(files / "prompts.jsonl"), "out": str(files / "ppo"), "progress": False, "max_steps": 2, "rollout_batch": 8, "num_minibatches": 2,
        "batch_size": 4, "max_new_tokens": 16, "n_eval_prompts": 4, "eval_samples": 1, "lr": 3e-3}, recipe="ppo")
    summary = P.run(cfg)
    assert len(seen) == 2 and all(s is not None and s.shape[0] == 8 for s in seen)
    assert all(0 <= float(s.min()) and float(s.max()) <= 1 for s in seen)  # probabilities at step ends
    assert summary["steps"] == 2


def test_best_of_n_ranks_by_the_prm(files):
    from tether.recipes import best_of_n as B

    cfg = load_config(B.BoNConfig, None, {"model": str(files / "policy"), "reward": f"prm:{files / 'prm'}",
                                          "prompts": str(files / "prompts.jsonl"), "n_prompts": 4, "n": 4,
                                          "max_new_tokens": 16, "missing_eos_penalty": None,
                                          "out": str(files / "bon"), "progress": False}, recipe="bon")
    summary = B.run(cfg)
    samples = [json.loads(x) for x in (files / "bon" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(0 <= p <= 1 for s in samples for p in s["proxy"])  # Π_k p_k
    assert summary["table"][-1]["n"] == 4
