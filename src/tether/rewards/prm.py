"""Process reward models (PRMs) and outcome reward models (ORMs): trained by `tether rm`, used as `reward=prm:DIR`.

    tether rm model=BASE data=steps.jsonl out=runs/prm       # {"prompt", "steps": [...], "labels": [+1, 0, -1]}
    tether rm model=BASE data=outcomes.jsonl out=runs/orm    # {"prompt", "completion", "label": true|false}
    tether rm eval model=runs/prm data=steps_test.jsonl      # step_accuracy, solution_accuracy
    reward = PRMReward("runs/prm")                           # RewardOutput(scores = Π p_k, step_scores = [[p_k]])

Both are one `AutoModelForSequenceClassification` with one label, trained as a binary classifier (Lightman et al.
2023, "Let's Verify Step by Step", §2.4-2.6): the head's logit at a position is log-odds(correct).
- PRM: the steps are joined by the delimiter ("\\n") into the completion (+ EOS); step k's logit is read at the token
  right after the step, i.e. the delimiter that ends it (the EOS for the last step). Labels follow PRM800K: +1 good,
  0 neutral (counted as correct, as Lightman counts it for the solution score), -1 wrong; labelling stops at the
  first wrong step, so steps after it carry no label and no loss. Solution score = Π_k p(step k correct) over all
  steps (`process.prm_solution_score`).
- ORM: the outcome label (the final answer right or not) at the last token (the EOS) of the completion, Lightman's
  ORM; its solution score is that probability.
Loss: binary cross-entropy with logits, summed over labelled positions and divided by their count over the global
batch (`step_classification_loss`). No reward normalisation: the logit is a log-odds and must stay one.

At scoring time a completion is split into steps (`process.split_steps`: non-blank pieces between delimiters,
stripped) and re-joined by the delimiter, the exact text layout of training, so stray spaces do not move the scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tether import data as D
from tether.data import DataError
from tether.forward import token_values
from tether.rewards import RewardOutput, RewardSource
from tether.rewards.process import split_steps, step_end_positions

DELIMITER = "\n"
LABELLED_KINDS = ("steps", "unpaired")  # record kinds trained as classifiers (PRM, ORM)


@dataclass
class LabelledExample:
    """A completion with binary targets at some positions (indices into completion_ids).

    `positions`/`targets`: the labelled positions; `score_positions`: every position that enters the solution score
    (all steps of a PRM, the EOS of an ORM); `solution_label`: whether the solution is correct (all steps labelled and
    none wrong; the ORM's label)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    positions: list[int]
    targets: list[float]
    score_positions: list[int]
    solution_label: bool
    prompt_truncated: bool = False
    completion_truncated: bool = False


def step_targets(labels: Sequence) -> list[float]:
    """PRM800K labels -> binary targets: +1, 0 (neutral) and true -> 1.0; -1 and false -> 0.0."""
    return [0.0 if (label is False or (not isinstance(label, bool) and label == -1)) else 1.0 for label in labels]


def delimiter_positions(tokenizer, completion_ids: list[int], delimiter: str = DELIMITER) -> list[int]:
    """Per step of the decoded completion, the position where its score is read: the token after the step's last
    token (the delimiter, or the EOS for the last step), or the step's last token when nothing follows it."""
    ends = step_end_positions(tokenizer, completion_ids, delimiter)
    return [min(end + 1, len(completion_ids) - 1) for end in ends]


def encode_steps(tokenizer, record: dict, max_prompt_len: int | None = None,
                 max_completion_len: int | None = None, delimiter: str = DELIMITER) -> LabelledExample:
    """A steps record: prompt ids, delimiter.join(steps) + EOS, one target per labelled step still in the cut."""
    for i, step in enumerate(record["steps"]):
        if len(split_steps(step, delimiter)) != 1:
            raise DataError(f"holds the step delimiter {delimiter!r}; one step per item", field=f"steps[{i}]")
    prompt, p_cut = D.encode_prompt(tokenizer, D.prompt_of(record), max_prompt_len)
    completion, c_cut = D.encode_completion(tokenizer, delimiter.join(s.strip() for s in record["steps"]),
                                            max_completion_len)
    where = delimiter_positions(tokenizer, completion, delimiter)  # fewer than the steps when cut
    labels = record["labels"]
    targets = step_targets(labels)
    k = min(len(targets), len(where))
    correct = len(labels) == len(record["steps"]) and all(t == 1.0 for t in targets)
    return LabelledExample(prompt, completion, where[:k], targets[:k], where, correct, p_cut, c_cut)


def encode_outcome(tokenizer, record: dict, max_prompt_len: int | None = None,
                   max_completion_len: int | None = None) -> LabelledExample:
    """An unpaired record as an ORM example: the outcome label at the completion's last token."""
    prompt, p_cut = D.encode_prompt(tokenizer, D.prompt_of(record), max_prompt_len)
    completion, c_cut = D.encode_reply(tokenizer, D.prompt_of(record), record["completion"], max_completion_len)
    last = [len(completion) - 1]
    label = bool(record["label"])
    return LabelledExample(prompt, completion, last, [float(label)], last, label, p_cut, c_cut)


def collate_labelled(examples: list[LabelledExample], pad_id: int) -> dict:
    """Right-padded prompt+completion rows and the flat (row, column, target) of every labelled position.

    Shapes: input_ids, attention_mask (B, T); rows, cols, targets (N,), N = Σ labelled positions."""
    seqs = [ex.prompt_ids + ex.completion_ids for ex in examples]
    rows = [b for b, ex in enumerate(examples) for _ in ex.positions]
    cols = [len(ex.prompt_ids) + p for ex in examples for p in ex.positions]
    return {"input_ids": D.pad_sequences(seqs, pad_id), "attention_mask": D.pad_sequences([[1] * len(s) for s in seqs], 0),
            "rows": torch.tensor(rows, dtype=torch.long), "cols": torch.tensor(cols, dtype=torch.long),
            "targets": torch.tensor([t for ex in examples for t in ex.targets], dtype=torch.float32)}


def step_classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Σ_k BCE(σ(z_k), y_k) = Σ_k −[y_k log σ(z_k) + (1 − y_k) log σ(−z_k)] over labelled positions (a sum: the
    caller divides by the global count), and the share classified right (z > 0 iff y = 1).

    Shapes: logits, targets (N,) -> loss (), metrics {"accuracy": ()}."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum")
    accuracy = ((logits > 0).float() == targets).float().mean() if len(targets) else logits.new_zeros(())
    return loss, {"accuracy": accuracy.detach()}


def labelled_loss(model, batch: dict, denominator: float, *_unused, **_also_unused):
    """`tether rm`'s loss for a collate_labelled batch: one forward, logits at the labelled positions."""
    logits = token_values(model, batch["input_ids"], batch["attention_mask"], normalize=False)  # (B, T)
    loss, metrics = step_classification_loss(logits[batch["rows"], batch["cols"]], batch["targets"])
    return loss / denominator, metrics


# --- evaluation -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def position_probs(models: list, examples: list[LabelledExample], which: str, pad_id: int, batch_size: int,
                   device) -> list[list[float]]:
    """p(correct) at each example's `which` positions ("positions" or "score_positions"), the ensemble's mean."""
    out: list[list[float]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        seqs = [ex.prompt_ids + ex.completion_ids for ex in chunk]
        ids = D.pad_sequences(seqs, pad_id).to(device)  # (b, T)
        mask = D.pad_sequences([[1] * len(s) for s in seqs], 0).to(device)
        probs = torch.stack([torch.sigmoid(token_values(m.eval(), ids, mask, normalize=False)) for m in models]).mean(0)
        out += [[float(probs[b, len(ex.prompt_ids) + p]) for p in getattr(ex, which)] for b, ex in enumerate(chunk)]
    return out


def labelled_metrics(step_probs: list[list[float]], step_targets_: list[list[float]], solution_probs: list[float],
                     solution_labels: list[bool]) -> dict:
    """step_accuracy: share of labelled positions with (p > 0.5) == target; loss: their mean BCE; solution_accuracy:
    share of solutions with (score > 0.5) == correct, score the product of all step probabilities (PRM) or the
    final probability (ORM)."""
    p = torch.tensor([x for row in step_probs for x in row], dtype=torch.float64)
    y = torch.tensor([x for row in step_targets_ for x in row], dtype=torch.float64)
    s = torch.tensor(solution_probs, dtype=torch.float64)
    c = torch.tensor(solution_labels, dtype=torch.bool)
    eps = 1e-12
    bce = -(y * torch.log(p.clamp(min=eps)) + (1 - y) * torch.log((1 - p).clamp(min=eps)))
    return {"step_accuracy": float(((p > 0.5).double() == y).double().mean()) if len(p) else math.nan,
            "loss": float(bce.mean()) if len(p) else math.nan,
            "solution_accuracy": float(((s > 0.5) == c).double().mean()) if len(s) else math.nan,
            "solutions_correct": float(c.double().mean()) if len(c) else math.nan,
            "steps_labelled": len(p), "solutions": len(s)}


def evaluate_labelled(models: list, examples: list[LabelledExample], kind: str, pad_id: int, batch_size: int,
                      device) -> dict:
    """`tether rm eval` for PRMs and ORMs; "accuracy" is the step accuracy (the ORM's: its outcome accuracy)."""
    if not examples:
        return {}
    step_p = position_probs(models, examples, "positions", pad_id, batch_size, device)
    score_p = position_probs(models, examples, "score_positions", pad_id, batch_size, device)
    solution = [math.prod(ps) if kind == "steps" else ps[-1] for ps in score_p]
    out = labelled_metrics(step_p, [ex.targets for ex in examples], solution, [ex.solution_label for ex in examples])
    return {"accuracy": out["step_accuracy"], **out}


def majority_answer(answers: Sequence, rng=None):
    """Majority vote (self-consistency, Wang et al. 2022; Lightman et al.'s baseline): the most common final answer,
    None answers left out; ties broken by `rng.choice` (random.Random), or by first occurrence without one."""
    counts: dict = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return None
    top = max(counts.values())
    tied = [a for a in counts if counts[a] == top]  # in order of first occurrence
    return rng.choice(tied) if rng is not None and len(tied) > 1 else tied[0]


# --- the reward source ------------------------------------------------------------------------------------------------
class PRMReward(RewardSource):
    """`reward=prm:DIR`: each step's p(correct) from a PRM (or the final one from an ORM directory), the solution
    score Π_k p_k; `step_scores` carries the per-step probabilities for process advantages and per-step PPO rewards.
    A completion with no step scores 0 with step_scores []."""

    name = "prm"

    def __init__(self, path, batch_size: int = 32, device: str | torch.device | None = None, dtype: str = "float32",
                 name: str = "prm"):
        from tether.models import load_reward_model, load_tokenizer
        from tether.rewards.learned import reward_model_dirs

        dirs = reward_model_dirs(path)
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models = [load_reward_model(d, dtype=dtype).to(self.device).eval().requires_grad_(False) for d in dirs]
        self.tokenizer = load_tokenizer(dirs[0])
        config = self.models[0].config
        self.kind = getattr(config, "reward_kind", "prm")
        self.delimiter = getattr(config, "prm_delimiter", DELIMITER)
        self.max_prompt_len = getattr(config, "reward_max_prompt_len", None)
        self.max_completion_len = getattr(config, "reward_max_completion_len", None)
        self.batch_size, self.name = batch_size, name

    def encode(self, prompt, completion: str) -> LabelledExample:
        steps = split_steps(completion, self.delimiter)
        p, _ = D.encode_prompt(self.tokenizer, prompt, self.max_prompt_len)
        c, _ = D.encode_completion(self.tokenizer, self.delimiter.join(steps), self.max_completion_len)
        where = delimiter_positions(self.tokenizer, c, self.delimiter) if steps else []
        if self.kind != "prm":
            where = [len(c) - 1]
        return LabelledExample(p, c, where, [], where, False)

    def __call__(self, prompts, completions, records=None) -> RewardOutput:
        examples = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        has_steps = [bool(split_steps(c, self.delimiter)) for c in completions]
        probs = position_probs(self.models, examples, "score_positions", self.tokenizer.pad_token_id,
                               self.batch_size, self.device)
        step_scores = [ps if ok else [] for ps, ok in zip(probs, has_steps)]
        scores = [math.prod(ps) if ps else 0.0 for ps in step_scores]
        out = torch.tensor(scores, dtype=torch.float32)
        per_step = step_scores if self.kind == "prm" else None  # an ORM scores the outcome only
        return RewardOutput(scores=out, components={self.name: out}, step_scores=per_step)
