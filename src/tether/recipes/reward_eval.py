"""Evaluating a reward model on held-out comparisons: `tether rm eval`.

    tether rm eval model=runs/rm data=prefs_test.jsonl task=reviews out=runs/rm-eval

Reports, in summary.json:
- accuracy: share of held-out pairs the RM orders as the labels do (strictly; a tie counts as wrong);
- loss: the Bradley-Terry NLL of the labels, each comparison element weighted 1 (a K-way ranking's C(K,2) pairs share
  that weight, as in training); no margins or record weights, so it reads the same for every data set;
- ece: expected calibration error of p = σ(r_a − r_b) against the labels (metrics.expected_calibration_error). Each
  pair enters in both orders, (p, 1) and (1 − p, 0): orienting pairs as chosen-first would condition on the label;
- length bias: mean normalised reward per completion-length bucket (quantiles), its correlation with length, and how
  often the RM vs. the labels prefer the longer completion of a pair with different lengths;
- with `task=` (an embedded task with a gold reward): gold_agreement, the share of pairs the RM orders as the gold
  reward does (pairs with equal gold left out), and label_gold_agreement, the same share for the raters' labels;
- bayes_accuracy from the `<data stem>.meta.json` sidecar the tasks write next to their data, when present.
For step-labelled records (a PRM) or outcome-labelled ones (an ORM): step_accuracy, solution_accuracy (the product
of the step probabilities, or the final one, against the solution's correctness) and loss (rewards.prm).

Accuracy, loss and ECE use the raw head output (the gain/bias stored by the normalisation are undone), because the
Bradley-Terry probability is σ of the raw difference; the length report uses normalised rewards, the scale every
consumer sees. An ensemble directory is evaluated on the mean of its members' scores.
This module also holds what `tether rm` needs to read comparisons (`load_comparisons`) and to evaluate
(`evaluate_comparisons`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tether import data as D
from tether.config import ConfigError, at_least, one_of, opt
from tether.forward import normalized
from tether.metrics import expected_calibration_error
from tether.models import load_reward_model, load_tokenizer
from tether.rewards import prm
from tether.rewards.learned import reward_model_dirs, score_sequences
from tether.tasks import TASKS
from tether.wrappers import hf_model

log = logging.getLogger(__name__)


@dataclass
class RMEvalConfig:
    model: str = opt("", "reward model: a `tether rm` run dir, a model dir or an ensemble dir (required)")
    data: str = opt("", "held-out comparisons: pairs or rankings (JSONL, Parquet or saved dataset; required)")
    data_kind: str = opt("auto", "pairs | rankings | steps | unpaired | auto (told apart by the first record's "
                         "fields)", check=one_of("auto", "pairs", "rankings", "steps", "unpaired"))
    # "auto" and the keys of COMPARISON_KINDS
    task: str = opt("", "embedded task with a gold reward (reviews): report agreement with the gold ranking",
                    check=one_of("", *TASKS))
    out: str = opt("", "output directory for summary.json (default runs/rm-eval-<timestamp>)")
    batch_size: int = opt(32, "sequences per forward", check=at_least(1))
    max_prompt_len: int = opt(0, "prompt tokens kept (0 = as in training, stored with the model)", check=at_least(0))
    max_completion_len: int = opt(0, "completion tokens kept (0 = as in training, stored with the model)",
                                  check=at_least(0))
    length_buckets: int = opt(4, "completion-length buckets (quantiles) for the length-bias report", check=at_least(1))
    device: str = opt("", "cpu | cuda | ... (default: cuda when available)")
    skip_invalid: bool = opt(False, "skip invalid records (reported) instead of stopping at the first")

    def validate(self) -> None:
        if not self.model or not self.data:
            raise ConfigError("rm eval needs model=DIR and data=FILE")


# --- comparisons: pairs and rankings, each element's sequences ordered best -> worst --------------------------------
def _pair_texts(record: dict) -> list[str]:
    return [record["chosen"], record["rejected"]]


def _ranking_texts(record: dict) -> list[str]:
    return [record["completions"][i] for i in record["ranking"]]


def _pair_sequences(ex: D.PairExample) -> list[list[int]]:
    return [ex.prompt_ids + ex.chosen_ids, ex.prompt_ids + ex.rejected_ids]


def _ranking_sequences(ex: D.RankingExample) -> list[list[int]]:
    return [ex.prompt_ids + ex.completion_ids[i] for i in ex.ranking]


@dataclass(frozen=True)
class ComparisonKind:
    encode: object  # data.encode_pair / encode_ranking
    texts: object  # record -> completion texts, best first
    sequences: object  # example -> token sequences (prompt + completion), best first


def _labelled_texts(record: dict) -> list[str]:
    return [record["completion"]] if "completion" in record else [prm.DELIMITER.join(record["steps"])]


def _labelled_sequences(ex: prm.LabelledExample) -> list[list[int]]:
    return [ex.prompt_ids + ex.completion_ids]


COMPARISON_KINDS = {
    "pairs": ComparisonKind(D.encode_pair, _pair_texts, _pair_sequences),
    "rankings": ComparisonKind(D.encode_ranking, _ranking_texts, _ranking_sequences),
    # labelled completions, trained as classifiers (rewards.prm): step labels (a PRM), outcome labels (an ORM)
    "steps": ComparisonKind(prm.encode_steps, _labelled_texts, _labelled_sequences),
    "unpaired": ComparisonKind(prm.encode_outcome, _labelled_texts, _labelled_sequences),
}


@dataclass
class Comparisons:
    """Validated records and their encodings, ties (chosen == rejected text) dropped."""

    kind: str
    records: list[dict]
    examples: list
    truncation: dict
    ties_dropped: int


def load_comparisons(path: str, kind: str, tokenizer, max_prompt_len: int | None, max_completion_len: int | None,
                     skip_invalid: bool = False) -> Comparisons:
    kind = D.detect_kind(path) if kind == "auto" else kind
    records = D.load_records(path, kind, skip_invalid=skip_invalid)
    keep = [kind != "pairs" or r["chosen"] != r["rejected"] for r in records]  # a tie teaches nothing
    kept = D.Records([r for r, k in zip(records, keep) if k], path, kind,
                     lines=[line for line, k in zip(records.lines, keep) if k])
    examples, stats = D.encode_records(COMPARISON_KINDS[kind].encode, tokenizer, kept, max_prompt_len,
                                       max_completion_len, log)
    if len(kept) < len(records):
        log.info("%s: dropped %d tied pairs (chosen == rejected)", path, len(records) - len(kept))
    return Comparisons(kind, kept, examples, stats.as_dict(), len(records) - len(kept))


def bayes_accuracy(data_path: str | Path) -> float | None:
    """The raters' Bayes accuracy from `<stem>.meta.json` next to the data (written by the embedded tasks)."""
    path = Path(data_path)
    meta = path.with_name(path.stem + ".meta.json")
    if not meta.exists():
        return None
    value = json.loads(meta.read_text()).get("bayes_accuracy")
    return None if value is None else float(value)


# --- pure metrics ---------------------------------------------------------------------------------------------------
def ordered_pairs(group_scores: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All (better, worse) pairs of each element's scores (best first), and weights 1/C(k,2) per pair.

    Shapes: group_scores[e] (k_e,) -> better, worse, weight (P,), P = Σ_e C(k_e, 2).
    """
    better, worse, weight = [], [], []
    for s in group_scores:
        i, j = torch.triu_indices(len(s), len(s), offset=1)
        better.append(s[i])
        worse.append(s[j])
        weight.append(torch.full((len(i),), 1.0 / len(i)))
    return torch.cat(better), torch.cat(worse), torch.cat(weight)


def preference_metrics(better: torch.Tensor, worse: torch.Tensor, weight: torch.Tensor, bins: int = 10) -> dict:
    """accuracy = share of pairs with r_better > r_worse; loss = Σ w·(−log σ(r_b − r_w)) / Σ w; ece (both orders).

    Shapes: better, worse, weight (P,) -> floats.
    """
    diff = (better - worse).double()
    w = weight.double()
    p = torch.sigmoid(diff)
    ece = expected_calibration_error(torch.cat([p, 1 - p]), torch.cat([torch.ones_like(p), torch.zeros_like(p)]), bins)
    return {"accuracy": float((diff > 0).double().mean()),
            "loss": float((w * -F.logsigmoid(diff)).sum() / w.sum()),
            "ece": ece}


def length_report(scores: torch.Tensor, lengths: torch.Tensor, n_buckets: int = 4) -> dict:
    """Mean reward per completion-length bucket and the Pearson correlation of reward and length.

    Shapes: scores, lengths (N,). Buckets: one per distinct length when there are at most n_buckets of them, else
    quantile edges, bucket b holding lengths in (edge_b, edge_{b+1}] (the first includes its low edge).
    """
    lengths, scores = lengths.double(), scores.double()
    distinct = lengths.unique()
    if len(distinct) <= n_buckets:
        bounds = [(x, x) for x in distinct.tolist()]
    else:
        edges = torch.quantile(lengths, torch.linspace(0, 1, n_buckets + 1, dtype=torch.float64)).unique().tolist()
        bounds = list(zip(edges[:-1], edges[1:]))
    buckets = []
    for b, (lo, hi) in enumerate(bounds):
        sel = (lengths > lo) & (lengths <= hi) if b > 0 and lo < hi else (lengths >= lo) & (lengths <= hi)
        if sel.any():
            buckets.append({"min_len": lo, "max_len": hi, "n": int(sel.sum()), "reward_mean": float(scores[sel].mean())})
    corr = float(torch.corrcoef(torch.stack([scores, lengths]))[0, 1]) if len(scores) > 1 else float("nan")
    return {"length_buckets": buckets, "length_correlation": corr}


def longer_preferred(better: torch.Tensor, worse: torch.Tensor, better_len: torch.Tensor,
                     worse_len: torch.Tensor) -> dict:
    """Among pairs of different lengths: how often the labels and the RM prefer the longer completion.

    A RM that prefers longer completions more often than the labels do has a length bias. Shapes: (P,) each.
    """
    differ = better_len != worse_len
    if not differ.any():
        return {"labels_prefer_longer": float("nan"), "rm_prefers_longer": float("nan")}
    longer_is_better = (better_len > worse_len)[differ]
    rm_picks_better = (better > worse)[differ]
    return {"labels_prefer_longer": float(longer_is_better.double().mean()),
            "rm_prefers_longer": float((rm_picks_better == longer_is_better).double().mean())}


def order_agreement(better: torch.Tensor, worse: torch.Tensor, gold_better: torch.Tensor,
                    gold_worse: torch.Tensor) -> float:
    """Share of pairs (equal gold left out) where sign(r_better − r_worse) equals sign(gold_better − gold_worse)."""
    gold = torch.sign(gold_better.double() - gold_worse.double())
    keep = gold != 0
    return float((torch.sign(better.double() - worse.double())[keep] == gold[keep]).double().mean())


# --- scoring and the evaluation ---------------------------------------------------------------------------------------
def score_groups(models: list, comparisons: Comparisons, pad_id: int, batch_size: int, device) -> tuple[list, list]:
    """Per element, (raw, normalised) scores of its sequences best first, each the mean over ensemble members."""
    kind = COMPARISON_KINDS[comparisons.kind]
    groups = [kind.sequences(ex) for ex in comparisons.examples]
    flat = [seq for g in groups for seq in g]
    raw = torch.stack([score_sequences(m, flat, pad_id, batch_size, device, normalize=False) for m in models])
    norm = torch.stack([normalized(r, hf_model(m).config) for r, m in zip(raw, models)])
    sizes = [len(g) for g in groups]
    return list(raw.mean(0).split(sizes)), list(norm.mean(0).split(sizes))


def evaluate_comparisons(models: list, comparisons: Comparisons, pad_id: int, batch_size: int, device,
                         task=None, n_buckets: int = 4) -> dict:
    """accuracy, loss, ece, length bias and (with a task) gold agreement of reward model(s) on comparisons;
    for step or outcome labels (a PRM, an ORM) the classifier's step and solution accuracy (prm.evaluate_labelled)."""
    if not comparisons.examples:
        return {}
    if comparisons.kind in prm.LABELLED_KINDS:
        return prm.evaluate_labelled(models, comparisons.examples, comparisons.kind, pad_id, batch_size, device)
    raw, norm = score_groups(models, comparisons, pad_id, batch_size, device)
    better, worse, weight = ordered_pairs(raw)
    out = preference_metrics(better, worse, weight)
    kind = COMPARISON_KINDS[comparisons.kind]
    prompt_len = [len(ex.prompt_ids) for ex in comparisons.examples]
    lengths = [torch.tensor([len(s) - p for s in kind.sequences(ex)], dtype=torch.float64)
               for ex, p in zip(comparisons.examples, prompt_len)]
    out.update(length_report(torch.cat(norm), torch.cat(lengths), n_buckets))
    b_len, w_len, _ = ordered_pairs(lengths)
    out.update(longer_preferred(better, worse, b_len, w_len))
    if task is not None:
        texts = [kind.texts(r) for r in comparisons.records]
        prompts = [D.prompt_of(r) for r, t in zip(comparisons.records, texts) for _ in t]
        records = [r for r, t in zip(comparisons.records, texts) for _ in t]
        gold = torch.tensor(task.gold_reward(prompts, [c for t in texts for c in t], records), dtype=torch.float64)
        g_better, g_worse, _ = ordered_pairs(list(gold.split([len(t) for t in texts])))
        out["gold_agreement"] = order_agreement(better, worse, g_better, g_worse)
        out["label_gold_agreement"] = order_agreement(torch.ones_like(g_better), torch.zeros_like(g_worse),
                                                      g_better, g_worse)
    out["pairs"] = len(better)
    return out


def load_task(name: str):
    if not name:
        return None
    from tether.tasks import get_task

    try:
        return get_task(name)
    except ValueError as e:
        raise ConfigError(f"key 'task': {e}") from None


def run(cfg: RMEvalConfig) -> dict:
    t0 = time.time()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dirs = reward_model_dirs(cfg.model)
    tokenizer = load_tokenizer(dirs[0])
    models = [load_reward_model(d).to(device).eval() for d in dirs]
    config = models[0].config
    max_p = cfg.max_prompt_len or getattr(config, "reward_max_prompt_len", None)
    max_c = cfg.max_completion_len or getattr(config, "reward_max_completion_len", None)
    comparisons = load_comparisons(cfg.data, cfg.data_kind, tokenizer, max_p, max_c, cfg.skip_invalid)
    summary = evaluate_comparisons(models, comparisons, tokenizer.pad_token_id, cfg.batch_size, device,
                                   load_task(cfg.task), cfg.length_buckets)
    summary.update({"bayes_accuracy": bayes_accuracy(cfg.data), "data_kind": comparisons.kind,
                    "eval_examples": len(comparisons.examples), "ties_dropped": comparisons.ties_dropped,
                    "ensemble": len(models), "reward_gain": getattr(config, "reward_gain", 1.0),
                    "reward_bias": getattr(config, "reward_bias", 0.0), "wall_seconds": time.time() - t0})
    out = Path(cfg.out or f"runs/rm-eval-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2) + "\n")
    return summary


def _finite(obj):
    """NaN -> None so summary.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
