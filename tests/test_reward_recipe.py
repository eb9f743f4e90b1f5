"""`tether rm` / `rm eval` / `rm score` end to end on a tiny model, the ranking loss, exact accumulation, metrics."""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from tether import data as D
from tether.cli import main as cli_main
from tether.config import ConfigError, load_config
from tether.forward import reward_scores
from tether.models import load_reward_model, load_tokenizer
from tether.recipes import reward_eval as E
from tether.recipes.reward import (
    RewardConfig,
    normalization,
    rankings_loss,
    reference_sequences,
    run,
    split_train_eval,
)
from tether.recipes.reward_score import RMScoreConfig
from tether.recipes.reward_score import run as run_score
from tether.rewards.learned import LearnedReward, encode_for_reward, score_sequences
from tether.testing import save_tiny

POS, NEG = "good great wonderful brilliant fine".split(), "bad awful boring dull terrible".split()
SUBJECTS = ["the film", "the movie", "the plot", "the story", "the ending", "the music"]


def toy_pairs(n, seed=0):
    """A learnable taste: the completion with a positive word wins; lengths vary so the length report has buckets."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        filler = " and it was very" * (i % 3)
        out.append({"prompt": rng.choice(SUBJECTS) + " was",
                    "chosen": f"{rng.choice(POS)}{filler} {rng.choice(POS)} .",
                    "rejected": f"{rng.choice(NEG)} and {rng.choice(POS)} ."})
    return out


def toy_rankings(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        texts = [f"{rng.choice(POS)} .", f"{rng.choice(POS)} and {rng.choice(NEG)} .", f"{rng.choice(NEG)} ."]
        order = list(range(3))
        rng.shuffle(order)  # completions stored in a random order, ranking says which is best
        out.append({"prompt": rng.choice(SUBJECTS) + " was", "completions": [texts[i] for i in order],
                    "ranking": [order.index(0), order.index(1), order.index(2)]})
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    base = save_tiny(root / "base")
    D.write_jsonl(root / "pairs.jsonl", toy_pairs(200))
    (root / "pairs.meta.json").write_text(json.dumps({"bayes_accuracy": 0.93, "tau": 0.5, "n": 200}))
    D.write_jsonl(root / "demos.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]} for p in toy_pairs(30, 1)])
    D.write_jsonl(root / "rankings.jsonl", toy_rankings(40))
    return root, base


def rm_config(files_, *overrides):
    root, base = files_
    args = [f"model={base}", f"data={root / 'pairs.jsonl'}", "progress=false", "eval_batch_size=64", *overrides]
    return load_config(RewardConfig, None, args, recipe="rm")


@pytest.fixture(scope="module")
def trained(files):
    """One real run shared by the tests below: 3 epochs of 180 pairs, scale-normalised on demos.jsonl."""
    root, _ = files
    cfg = rm_config(files, f"out={root / 'run'}", "lr=3e-3", "epochs=3", "batch_size=16", "normalize_scale=true",
                    f"normalize_data={root / 'demos.jsonl'}")
    return root / "run", run(cfg)


def test_rm_learns_a_toy_preference(trained):
    run_dir, summary = trained
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == summary["steps"] == math.ceil(3 * 180 / 16)
    assert abs(losses[0] - math.log(2)) < 0.2  # small head init: r_w - r_l ~ 0 at the start
    assert sum(losses[-5:]) / 5 < 0.2 * losses[0]
    assert summary["eval_accuracy"] >= 0.9 and summary["eval_examples"] == 20  # chance is 0.5
    assert summary["bayes_accuracy"] == 0.93  # from pairs.meta.json next to the data
    for key in ("eval_loss", "ece", "reward_gain", "reward_bias", "tokens_per_second", "wall_seconds", "train_loss"):
        assert math.isfinite(summary[key]), key
    lr = [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lr[0] == pytest.approx(3e-3) and lr[-1] == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(
        math.pi * (len(lr) - 1) / len(lr)))))  # cosine towards 10% (InstructGPT)


def test_saved_rm_loads_with_automodel_and_gives_the_same_scores(trained, files):
    run_dir, summary = trained
    hf = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    assert hf.config.num_labels == 1 and hf.config.reward_raw_bias == pytest.approx(summary["reward_bias"])
    tok = load_tokenizer(run_dir / "model")
    prompts, completions = ["the film was", "the plot was"], ["good .", "awful and it was very dull ."]
    ids = D.pad_sequences([encode_for_reward(tok, p, c) for p, c in zip(prompts, completions)], tok.pad_token_id)
    mask = (ids != tok.pad_token_id).long()
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits[:, 0]  # transformers' own pooling: last non-pad
    ours = LearnedReward(run_dir, device="cpu", normalize=False)(prompts, completions, None).scores
    torch.testing.assert_close(ours, logits, atol=1e-5, rtol=1e-6)  # fp32's own rounding of a large raw score
    norm = LearnedReward(run_dir, device="cpu")(prompts, completions, None).scores
    gain = summary["reward_gain"]  # in the saved head now (models.portable_reward_model); the bias in the config
    torch.testing.assert_close(norm, logits - hf.config.reward_bias, atol=1e-5 * max(1.0, gain), rtol=1e-6)
    assert norm[0] > norm[1]  # it learned something


def test_normalisation_gives_mean_0_std_1_on_the_reference_set(trained, files):
    run_dir, summary = trained
    demos = D.load_records(files[0] / "demos.jsonl", "demonstrations")
    scores = LearnedReward(run_dir, device="cpu")([d["prompt"] for d in demos], [d["completion"] for d in demos], demos)
    assert scores.scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.scores.std().item() == pytest.approx(1.0, abs=1e-4)
    assert summary["reward_gain"] != 1.0  # the raw std was not already 1


def test_normalization_formula():
    assert normalization(torch.tensor([1.0, 2.0, 3.0]), scale=True) == (2.0, 1.0)  # std 1
    assert normalization(torch.tensor([0.0, 2.0, 4.0]), scale=True) == (2.0, 0.5)  # std 2
    assert normalization(torch.tensor([0.0, 2.0, 4.0]), scale=False) == (2.0, 1.0)
    assert normalization(torch.tensor([5.0, 5.0]), scale=True) == (5.0, 1.0)  # std 0: no scaling


def test_ranking_loss_with_k_forwards_equals_naive_pairwise(files):
    """InstructGPT: a prompt's C(K,2) pairs are one element weighted 1/C(K,2), from K forwards, not C(K,2)."""
    _, base = files
    tok, model = load_tokenizer(base), load_reward_model(base)
    records = toy_rankings(2, seed=3)
    records[1]["completions"].append("fine and very good .")  # K = 3 and K = 4 in one batch
    records[1]["ranking"] = [3] + records[1]["ranking"]
    examples = [D.encode_ranking(tok, r) for r in records]
    loss, metrics = rankings_loss(model, D.collate_rankings(examples, tok.pad_token_id), denominator=2.0)
    grad = torch.autograd.grad(loss, model.score.weight)[0]

    naive = []
    for record in records:  # every pair its own 2-row forward, averaged per prompt, then over prompts
        pair_losses = []
        for pair in D.expand_ranking(record):
            batch = D.collate_pairs([D.encode_pair(tok, pair)], tok.pad_token_id)
            chosen, rejected = reward_scores(model, batch["input_ids"], batch["attention_mask"], normalize=False)
            pair_losses.append(-F.logsigmoid(chosen - rejected))
        assert len(pair_losses) == math.comb(len(record["completions"]), 2)
        naive.append(torch.stack(pair_losses).mean())
    naive_loss = torch.stack(naive).mean()
    naive_grad = torch.autograd.grad(naive_loss, model.score.weight)[0]
    torch.testing.assert_close(loss, naive_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, naive_grad, atol=1e-6, rtol=1e-5)
    assert metrics["pairs"].item() == 3 + 6


def test_accumulation_matches_one_big_batch_with_record_weights(files, tmp_path):
    """Loss normalised over the global batch: 1 x 4 == 4 x 1 == 2 x 2 even with unequal record weights."""
    root, _ = files
    pairs = toy_pairs(8, seed=5)
    for i, p in enumerate(pairs):
        p["weight"] = [1.0, 4.0, 0.5, 2.0][i % 4]
        p["margin"] = [0.0, 0.5][i % 2]
    D.write_jsonl(tmp_path / "weighted.jsonl", pairs)

    def final_head(name, *overrides):
        cfg = rm_config(files, f"data={tmp_path / 'weighted.jsonl'}", f"out={tmp_path / name}", "max_steps=2",
                        "lr=1e-2", "lr_schedule=constant", "normalize=false", "eval_fraction=0", "mixed_precision=fp32",
                        *overrides)  # exact sums: bf16 autocast rounds differently per batch shape
        run(cfg)
        return load_reward_model(tmp_path / name / "model").score.weight.detach()

    one = final_head("one", "batch_size=4", "grad_accum=1")
    four = final_head("four", "batch_size=1", "grad_accum=4")
    two = final_head("two", "batch_size=2", "grad_accum=2")
    torch.testing.assert_close(four, one, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(two, one, atol=1e-6, rtol=1e-5)
    unweighted = final_head("unweighted", "batch_size=4", "use_margin=false")
    assert (unweighted - one).abs().max() > 1e-4  # margins matter: the comparison above can fail


def test_ensemble_on_rankings(files, tmp_path):
    root, _ = files
    cfg = rm_config(files, f"data={root / 'rankings.jsonl'}", f"out={tmp_path / 'ens'}", "ensemble=2",
                    "max_steps=3", "batch_size=8", "lr=3e-3", "eval_every=2")
    summary = run(cfg)
    logged = [json.loads(x) for x in (tmp_path / "ens" / "members" / "member-1" / "metrics.jsonl").read_text().splitlines()]
    assert [("eval_accuracy" in m) for m in logged] == [False, True, False]  # eval_every=2: after step 1
    assert summary["ensemble"] == 2 and summary["data_kind"] == "rankings" and summary["eval_examples"] == 4
    assert len(summary["reward_bias"]) == 2 and math.isfinite(summary["eval_loss"])
    for i in range(2):
        assert (tmp_path / "ens" / "model" / f"member-{i}" / "config.json").exists()
        assert (tmp_path / "ens" / "members" / f"member-{i}" / "summary.json").exists()
    prompts, completions = ["the film was"] * 2, ["good .", "awful ."]
    members = [LearnedReward(tmp_path / "ens" / "model" / f"member-{i}", device="cpu")(prompts, completions, None)
               for i in range(2)]
    out = LearnedReward(tmp_path / "ens", device="cpu")(prompts, completions, None)
    a, b = members[0].scores, members[1].scores
    torch.testing.assert_close(out.scores, (a + b) / 2)
    torch.testing.assert_close(out.std, (a - b).abs() / 2)
    assert (out.std > 0).all()  # different seeds: different heads and data order


def test_lora_rm_is_merged_and_normalised(files, tmp_path):
    cfg = rm_config(files, f"out={tmp_path / 'lora'}", "lora_r=4", "max_steps=3", "batch_size=8", "lr=1e-2",
                    "normalize_max=40")
    summary = run(cfg)
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lora" / "model")
    assert not any("lora" in name for name, _ in saved.named_parameters())  # merged into the base weights
    tok = load_tokenizer(cfg.model)
    train, _ = split_train_eval(cfg, tok)
    reference = reference_sequences(cfg, tok, train)  # default: the training comparisons' completions
    assert len(reference) == 40
    scores = score_sequences(load_reward_model(tmp_path / "lora" / "model"), reference, tok.pad_token_id)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4) and summary["reward_bias"] != 0.0


def test_rm_eval_cli_and_gold_agreement(trained, files, tmp_path):
    run_dir, summary = trained
    root, _ = files
    assert cli_main(["rm", "eval", f"model={run_dir}", f"data={root / 'pairs.jsonl'}", f"out={tmp_path}"]) == 0
    found = json.loads((tmp_path / "summary.json").read_text())
    assert found["pairs"] == 200 and found["accuracy"] >= 0.9 and found["bayes_accuracy"] == 0.93
    assert found["data_kind"] == "pairs" and 0 <= found["ece"] <= 1 and found["loss"] > 0
    assert [b["min_len"] for b in found["length_buckets"]] == [4, 5, 8, 12]  # one bucket per distinct length
    assert sum(b["n"] for b in found["length_buckets"]) == 400
    assert found["labels_prefer_longer"] == pytest.approx(2 / 3, abs=0.05)  # 2 of 3 chosen have filler

    class Task:  # a gold reward: count of positive words
        @staticmethod
        def gold_reward(prompts, completions, records=None):
            return [float(sum(w in POS for w in c.split())) for c in completions]

    tok = load_tokenizer(run_dir / "model")
    comparisons = E.load_comparisons(str(root / "pairs.jsonl"), "auto", tok, 256, 256)
    model = load_reward_model(run_dir / "model")
    got = E.evaluate_comparisons([model], comparisons, tok.pad_token_id, 64, "cpu", task=Task)
    assert got["label_gold_agreement"] == 1.0  # chosen always has more positive words
    assert got["gold_agreement"] == pytest.approx(got["accuracy"])  # gold never ties here, labels agree with gold
    assert got["accuracy"] == pytest.approx(found["accuracy"])


def test_rm_score_adds_a_reward_field(trained, files, tmp_path):
    run_dir, _ = trained
    root, _ = files
    cfg = load_config(RMScoreConfig, None, [f"model={run_dir}", f"data={root / 'demos.jsonl'}",
                                            f"out={tmp_path / 'scored.jsonl'}", "batch_size=7", "chunk=11"])
    summary = run_score(cfg)
    rows = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    demos = D.load_records(root / "demos.jsonl", "demonstrations")
    assert summary["records"] == len(rows) == 30 and all(set(r) == {"prompt", "completion", "reward"} for r in rows)
    expected = LearnedReward(run_dir, device="cpu")([d["prompt"] for d in demos], [d["completion"] for d in demos], None)
    assert [r["reward"] for r in rows] == pytest.approx(expected.scores.tolist(), abs=1e-4)  # gain ~20 here
    assert summary["reward_mean"] == pytest.approx(0.0, abs=1e-4)  # demos.jsonl was the normalisation set


def test_rm_score_reads_text_records_and_conversational_completions(trained, files, tmp_path):
    from tether.recipes.reward_score import prompt_and_completion

    user, reply = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine"}
    assert prompt_and_completion({"text": "a whole review"}) == ("", "a whole review")
    assert prompt_and_completion({"prompt": [user], "completion": [reply]}) == ([user], "fine")
    assert prompt_and_completion({"messages": [user, reply, user, reply]}) == ([user, reply, user], "fine")
    run_dir, _ = trained
    D.write_jsonl(tmp_path / "texts.jsonl", [{"text": "good good film"}, {"text": "bad film"}])
    run_score(load_config(RMScoreConfig, None, [f"model={run_dir}", f"data={tmp_path / 'texts.jsonl'}"]))
    rows = [json.loads(line) for line in (tmp_path / "texts.scored.jsonl").read_text().splitlines()]
    expected = LearnedReward(run_dir, device="cpu")(["", ""], ["good good film", "bad film"], None)
    assert [r["reward"] for r in rows] == pytest.approx(expected.scores.tolist(), abs=1e-5)
    D.write_jsonl(tmp_path / "chat.jsonl", [{"text": "fine"}, {"messages": [user, reply, user]}])
    with pytest.raises(D.DataError, match=r"chat.jsonl:2: field 'messages': ends with a 'user' turn"):
        run_score(load_config(RMScoreConfig, None, [f"model={run_dir}", f"data={tmp_path / 'chat.jsonl'}"]))


def test_data_kind_detection_ties_and_config_errors(files, tmp_path):
    root, base = files
    assert D.detect_kind(root / "pairs.jsonl") == "pairs" and D.detect_kind(root / "rankings.jsonl") == "rankings"
    D.write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(D.DataError, match="set data_kind"):
        D.detect_kind(tmp_path / "odd.jsonl")
    D.write_jsonl(tmp_path / "ties.jsonl", [{"prompt": "a", "chosen": "good", "rejected": "good"},
                                            {"prompt": "a", "chosen": "good", "rejected": "bad"}])
    ties = E.load_comparisons(str(tmp_path / "ties.jsonl"), "auto", load_tokenizer(base), None, None)
    assert ties.ties_dropped == 1 and len(ties.examples) == 1
    with pytest.raises(ConfigError, match="data_kind"):
        rm_config(files, "data_kind=triples")
    with pytest.raises(ConfigError, match="pairs only"):
        run(rm_config(files, f"data={root / 'rankings.jsonl'}", "label_smoothing=0.1", f"out={tmp_path / 'x'}"))


# --- pure metrics, hand-computed --------------------------------------------------------------------------------------
def test_preference_metrics_by_hand():
    got = E.preference_metrics(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert got["accuracy"] == 0.5
    assert got["loss"] == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2)  # 0.720095
    # both orders: (σ(2)=.8808, 1) (σ(-1)=.2689, 1) (.1192, 0) (.7311, 0), each alone in its bin
    s2, s1 = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1))
    assert got["ece"] == pytest.approx(((1 - s2) + (1 - s1) + (1 - s2) + (1 - s1)) / 4)  # 0.42515


def test_ordered_pairs_weights():
    better, worse, weight = E.ordered_pairs([torch.tensor([3.0, 2.0, 1.0]), torch.tensor([5.0, 4.0])])
    assert better.tolist() == [3, 3, 2, 5] and worse.tolist() == [2, 1, 1, 4]
    assert weight.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])


def test_length_report_and_length_preference():
    got = E.length_report(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 1.0, 2.0, 2.0]), n_buckets=4)
    assert [(b["min_len"], b["n"], b["reward_mean"]) for b in got["length_buckets"]] == [(1.0, 2, 1.5), (2.0, 2, 3.5)]
    assert got["length_correlation"] == pytest.approx(2 / math.sqrt(5))  # cov 2 / sqrt(5 * 1)
    quant = E.length_report(torch.arange(8.0), torch.arange(8.0), n_buckets=2)["length_buckets"]
    assert [(b["n"], b["reward_mean"]) for b in quant] == [(4, 1.5), (4, 5.5)]  # [0, 3.5], (3.5, 7]
    pref = E.longer_preferred(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0]),
                              torch.tensor([5, 3, 4]), torch.tensor([3, 5, 4]))
    assert pref == {"labels_prefer_longer": 0.5, "rm_prefers_longer": 1.0}  # the equal-length pair is left out


def test_order_agreement_by_hand():
    got = E.order_agreement(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 2.0, 0.0]),
                            torch.tensor([1.0, 1.0, 3.0]), torch.tensor([0.0, 0.0, 3.0]))
    assert got == 0.5  # third pair: equal gold, left out; first agrees, second does not


# --- slow: two processes, and the reviews task ------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_equal_one_with_record_weights(files, tmp_path):
    """Data parallel (torchrun, gloo): 2 processes x batch 2 == 1 process x batch 4, unequal weights included."""
    root, base = files
    pairs = toy_pairs(8, seed=5)
    for i, p in enumerate(pairs):
        p["weight"] = [1.0, 4.0, 0.5, 2.0][i % 4]
    D.write_jsonl(tmp_path / "weighted.jsonl", pairs)
    common = [f"model={base}", f"data={tmp_path / 'weighted.jsonl'}", "max_steps=2", "lr=1e-2", "progress=false",
              "lr_schedule=constant", "normalize=false", "eval_fraction=0", "mixed_precision=fp32"]  # exact sums
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "tether.cli", "rm", *common, "batch_size=2", f"out={tmp_path / 'ddp'}"], check=True, env=env, timeout=600)
    run(load_config(RewardConfig, None, [*common, "batch_size=4", f"out={tmp_path / 'one'}"]))
    ddp, one = (load_reward_model(tmp_path / name / "model").state_dict() for name in ("ddp", "one"))
    assert max((ddp[k] - one[k]).abs().max().item() for k in one) < 1e-4  # updates are ~1e-2 per step
    lines = [(tmp_path / name / "metrics.jsonl").read_text().splitlines() for name in ("ddp", "one")]
    assert [json.loads(x)["loss"] for x in lines[0]] == pytest.approx([json.loads(x)["loss"] for x in lines[1]],
                                                                      abs=1e-5)


def test_interrupted_and_resumed_rm_matches_the_uninterrupted_one(files, tmp_path, monkeypatch):
    """Kill during step 3 of 4 (after its checkpoint at 2), resume: the same losses, the same saved model's scores."""
    from tether.engine import Engine

    common = ("max_steps=4", "save_every=2", "batch_size=8", "lr=1e-3")
    whole = run(rm_config(files, f"out={tmp_path / 'whole'}", *common))
    real, steps = Engine.optimizer_step, []

    def killed_in_step_3(self, *a, **k):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(self, *a, **k)

    monkeypatch.setattr(Engine, "optimizer_step", killed_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(rm_config(files, f"out={tmp_path / 'split'}", *common))
    monkeypatch.setattr(Engine, "optimizer_step", real)
    split = run(rm_config(files, f"out={tmp_path / 'split'}", "resume=true", *common))
    read = lambda name: [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert read("split") == pytest.approx(read("whole"), abs=1e-6) and len(read("split")) == 4
    for key in ("eval_accuracy", "eval_loss", "reward_bias"):
        assert split[key] == pytest.approx(whole[key], abs=1e-6), key


# --- portable reward models: transformers' own forward gives tether's score --------------------------------------------
def base_without_pad(path, shape: str):
    """A tiny causal LM whose tokenizer has no pad token (pad = EOS once loaded, as for Llama and Qwen2.5 base):
    Llama-shaped with a full vocabulary, Qwen2-shaped with spare embedding rows and no unknown token either."""
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    from tether.testing import tiny_tokenizer

    backend = tiny_tokenizer().backend_tokenizer
    if shape == "llama":
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
        config = Qwen2Config(vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    assert tok.pad_token_id is None
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("shape", ["qwen2", "llama"])
def test_hf_plain_forward_equals_rm_score(files, tmp_path, shape, capsys):
    """AutoModelForSequenceClassification + AutoTokenizer on the saved directory, a right-padded batch of texts of
    different lengths, no tether code: the same scores as `tether rm score` (the gain is in the head; the bias, which
    no transformers decoder head can hold, is the config's reward_bias)."""
    from transformers import PreTrainedTokenizerFast

    root, _ = files
    base = base_without_pad(tmp_path / "base", shape)
    summary = run(load_config(RewardConfig, None, [
        f"model={base}", f"data={root / 'pairs.jsonl'}", f"out={tmp_path / 'rm'}", "progress=false", "max_steps=4",
        "batch_size=16", "lr=3e-3", "normalize_scale=true", f"normalize_data={root / 'demos.jsonl'}"]))
    records = [{"prompt": "the film was", "completion": "good ."},
               {"prompt": "the plot was very", "completion": "awful and it was very dull , boring and bad ."},
               {"prompt": "the music", "completion": "was fine"},
               {"prompt": "the ending was", "completion": "brilliant ! i loved it ."}]
    D.write_jsonl(tmp_path / "samples.jsonl", records)
    for name, normalize in (("scored", "true"), ("raw", "false")):
        assert cli_main(["rm", "score", f"model={tmp_path / 'rm'}", f"data={tmp_path / 'samples.jsonl'}",
                         f"out={tmp_path / name}.jsonl", f"normalize={normalize}", "device=cpu"]) == 0
    tether_score, tether_raw = (torch.tensor([r["reward"] for r in D.load_records(tmp_path / f"{name}.jsonl",
                                                                                 "demonstrations")])
                                for name in ("scored", "raw"))

    saved = tmp_path / "rm" / "model"
    hf = AutoModelForSequenceClassification.from_pretrained(saved).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(saved)  # AutoTokenizer: a word-level file rebuilt as Qwen2's BPE
    texts = [f"{r['prompt']} {r['completion']}{tok.eos_token}" for r in records]
    batch = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        hf_scores = hf(**batch).logits[:, 0]

    tether_tok = load_tokenizer(saved)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(records) and (batch["attention_mask"][:, 0] == 1).all()  # right-padded
    for i, r in enumerate(records):  # the tokens HF saw are the tokens tether scored
        ours = encode_for_reward(tether_tok, r["prompt"], r["completion"])
        assert batch["input_ids"][i, : lengths[i]].tolist() == ours
    assert tok.pad_token_id not in (tok.eos_token_id, None) and hf.config.pad_token_id == tok.pad_token_id
    rows = hf.get_input_embeddings().num_embeddings  # the new pad token needs a row only in a full vocabulary
    assert rows == {"llama": len(tok), "qwen2": len(tok) + 7}[shape] and tok.pad_token == "<|pad|>"

    gain, bias = summary["reward_gain"], summary["reward_bias"]
    assert gain != 1.0 and hf.config.reward_raw_gain == pytest.approx(gain) and hf.config.reward_gain == 1.0
    assert hf.config.reward_bias == pytest.approx(gain * bias) and hf.config.reward_normalization_in_weights == "gain"
    torch.testing.assert_close(hf_scores, tether_raw, atol=1e-5, rtol=0)  # normalize=false: the saved head as it is
    torch.testing.assert_close(hf_scores - hf.config.reward_bias, tether_score, atol=1e-5, rtol=0)
    rm = load_reward_model(saved).eval()
    ids = D.pad_sequences([encode_for_reward(tether_tok, r["prompt"], r["completion"]) for r in records], 0)
    with torch.no_grad():
        ours = reward_scores(rm, ids, (torch.arange(ids.shape[1]) < lengths[:, None]).long())
    torch.testing.assert_close(ours, tether_score, atol=1e-5, rtol=0)

    # the failure this fixes: padding with EOS and pad_token_id = EOS, HF pools at the token before each EOS
    hf.config.pad_token_id = tok.eos_token_id
    eos_padded = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, tok.eos_token_id)
    with torch.no_grad():
        wrong = hf(input_ids=eos_padded, attention_mask=batch["attention_mask"]).logits[:, 0]
    assert (wrong - hf_scores).abs().min() > 1e-4


def test_lora_rm_saved_as_adapter_scores_like_the_merged_one(files, tmp_path):
    """merge_lora=false on a tokenizer without a pad token: the adapter carries the folded head and the grown
    embedding (the new pad token's row), and loads back to the merged run's raw scores."""
    root, _ = files
    base = base_without_pad(tmp_path / "base", "llama")
    common = [f"model={base}", f"data={root / 'pairs.jsonl'}", "progress=false", "max_steps=2", "batch_size=8",
              "lr=1e-2", "lora_r=4", "normalize_scale=true", "normalize_max=40"]
    merged = run(load_config(RewardConfig, None, [*common, f"out={tmp_path / 'merged'}"]))
    adapter = run(load_config(RewardConfig, None, [*common, f"out={tmp_path / 'adapter'}", "merge_lora=false"]))
    assert (tmp_path / "adapter" / "model" / "adapter_config.json").exists() and merged["reward_gain"] != 1.0
    assert adapter["reward_gain"] == pytest.approx(merged["reward_gain"], rel=1e-5)
    prompts, completions = ["the film was", "the plot was very"], ["good .", "awful and it was very dull ."]
    scores = [LearnedReward(tmp_path / name, device="cpu", normalize=False)(prompts, completions, None).scores
              for name in ("merged", "adapter")]
    torch.testing.assert_close(scores[1], scores[0], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_trl_grpo_trains_against_a_saved_rm_directory(files, tmp_path):
    """TRL's GRPOTrainer takes the directory `tether rm` saved as `reward_funcs` (it loads it with
    AutoModelForSequenceClassification, num_labels=1, and scores right-padded batches): it trains, and the rewards it
    logs are the saved head's scores of the texts it sampled. (TRL scores prompt + completion as text, without the EOS
    tether appends; the README's "Coming from TRL" says so.)"""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    root, _ = files
    base = base_without_pad(tmp_path / "base", "qwen2")
    run(load_config(RewardConfig, None, [f"model={base}", f"data={root / 'pairs.jsonl'}", f"out={tmp_path / 'rm'}",
                                         "progress=false", "max_steps=4", "batch_size=16", "lr=3e-3"]))
    saved = tmp_path / "rm" / "model"
    seen = []

    def record(prompts, completions, **kw):  # a second reward function: sees what the RM scored, adds nothing
        seen.extend(p + c for p, c in zip(prompts, completions))
        return [0.0] * len(prompts)

    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=6, max_steps=1, report_to="none", use_cpu=True, bf16=False,
                          logging_steps=1, save_strategy="no", gradient_checkpointing=False)
    trainer = trl.GRPOTrainer(model=str(base), reward_funcs=[str(saved), record], args=args,
                              train_dataset=Dataset.from_list([{"prompt": "the film was"}] * 4))
    trainer.train()
    [logged] = [h for h in trainer.state.log_history if any(k.startswith("rewards/") for k in h)]
    [name] = [k for k in logged if k.startswith("rewards/") and k.endswith("/mean") and "record" not in k]
    tok = trainer.reward_processing_classes[0]
    hf = AutoModelForSequenceClassification.from_pretrained(saved).eval()
    with torch.no_grad():
        scores = [hf(**tok(t, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item() for t in seen]
    assert len(seen) == 4 and logged[name] == pytest.approx(sum(scores) / 4, abs=1e-4)
