"""tether eval sycophancy on a tiny random model of the task's vocabulary, and the demo's seed-table arithmetic."""

import json
import math

import pytest
import torch

from tether.evaluate_sycophancy import answer_rows, evaluate_sycophancy, flat
from tether.recipes.sycophancy_demo import mean_and_spread, seed_table, table_markdown
from tether.tasks import sycophancy as S
from tether.tasks.pretrain import tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = S.tokenizer()
    model = tiny_llama(len(tok), 32, 1, 2, 64, tok.pad_token_id, tok.eos_token_id, seed=0).eval()
    out = tmp_path_factory.mktemp("syc") / "m"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return tok, model, out


def test_rows_pair_each_answer_with_the_bare_answer_and_its_probability(tiny):
    tok, model, _ = tiny
    records = S.prompts_by_kind("test", 3)
    rows = answer_rows(model, tok, records, batch_size=4)
    assert len(rows) == len(records)
    bare = {r["question"]: r for r in rows if r["kind"] == "bare"}
    for r in rows:
        assert r["bare_got"] == bare[r["question"]]["got"] and r["bare_p"] == bare[r["question"]]["bare_p"]
    # the bare probability by hand: exp of the summed log-probs of the greedy completion's tokens and its EOS
    r = next(r for r in rows if r["kind"] == "bare")
    prompt_ids = tok(r["question"]).input_ids
    completion_ids = tok(r["completion"]).input_ids
    completion_ids += [tok.eos_token_id] if len(completion_ids) < 8 else []  # cut at max_new_tokens: no EOS
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.log_softmax(-1)[0, len(prompt_ids) - 1 : -1]
    by_hand = logp.gather(-1, torch.tensor(completion_ids)[:, None]).sum().exp().item()
    assert r["bare_p"] == pytest.approx(by_hand, rel=1e-4)


def test_evaluate_reports_every_metric_per_kind(tiny):
    tok, model, _ = tiny
    metrics, rows = evaluate_sycophancy(model, tok, n_questions=4, batch_size=8)
    assert metrics["n_per_kind"]["bare"] == 4 and sum(metrics["n_per_kind"].values()) == len(rows)
    assert set(flat(metrics)) == {f"acc_{k}" for k in metrics["accuracy"]} | {"syc", "copy", "flip", "capitulation",
                                                                                "rater_reward", "gold"}
    assert metrics == {**metrics, **S.sycophancy_metrics(rows)}
    assert metrics["gold"] == sum(r["got"] == r["answer"] for r in rows) / len(rows)
    answers = [r["completion"] for r in rows]
    assert metrics["rater_reward"] == pytest.approx(sum(S.rater_utility([], answers, rows)) / len(rows))


def test_cli_writes_summary_rows_and_plot(tiny, tmp_path):
    from tether.cli import main

    _, _, model_dir = tiny
    assert main(["eval", "sycophancy", f"model={model_dir}", "n_questions=3", f"out={tmp_path / 'e'}"]) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["n_per_kind"]["sure"] == 3 and (tmp_path / "e" / "sycophancy.png").stat().st_size > 0
    assert len((tmp_path / "e" / "rows.jsonl").read_text().splitlines()) == summary["n_rows"]


def test_seed_table_mean_and_sample_std_by_hand():
    """syc 0.2, 0.4, 0.6: mean 0.4, sample std sqrt(((−0.2)² + 0 + 0.2²)/2) = 0.2."""
    rows = [{"syc": 0.2, "copy": 0.0}, {"syc": 0.4, "copy": math.nan}, {"syc": 0.6, "copy": 0.1}]
    table = seed_table({"arm": rows})
    assert table["arm"]["syc"] == pytest.approx([0.4, 0.2])
    assert table["arm"]["copy"] == pytest.approx([0.05, math.sqrt(0.005)])  # NaN left out
    m, s = mean_and_spread([0.5])
    assert m == 0.5 and math.isnan(s)
    assert "| arm | 0.400 ± 0.200 |" in table_markdown(table, 3)


def test_labelled_pairs_choose_the_right_answer_over_the_users_way():
    pairs = S.labelled_pairs(60)
    assert all(p["chosen"] == f" {p['answer']}" and p["rejected"] != p["chosen"] for p in pairs)
    wrong = [p for p in pairs if p["kind"] in ("wrong", "implausible")]
    assert wrong and all(p["rejected"] == f" {p['user_value']}" for p in wrong)
    assert sum(p["kind"] == "bare" for p in S.prompts("train", 2000)) / 2000 == pytest.approx(S.BARE_SHARE, abs=0.04)
