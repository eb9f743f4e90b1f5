"""A learned reward model as a reward source: `LearnedReward("runs/rm")(prompts, completions, records)`.

Completions are scored the way `tether rm` trained on them: the prompt encoded by `data.encode_prompt` (plain text
with the tokenizer's special tokens, or the chat template for a list of messages), then the completion's tokens with
no special tokens and an EOS appended (`data.encode_completion`); the score is read at that last real token
(`forward.reward_scores`) with the gain/bias stored in the model's config applied, so 0 is the mean over the reference
responses of the normalisation (docs/reference.md §Reward model). The truncation lengths used in training are
stored in the config too (`reward_max_prompt_len`, `reward_max_completion_len`) and reused here.

A path may be a reward-model directory (an `AutoModelForSequenceClassification` with one label, or an unmerged LoRA
adapter of one), a Hugging Face Hub ID (`org/name` or `org/name@revision`, from the HF cache: models.resolve_model),
a `tether rm` run directory (its `model/` is used), or an ensemble: a directory holding `member-0 ... member-(K-1)`,
each a reward-model directory (`tether rm ensemble=K`). An ensemble's reward is the mean of its members' normalised
rewards and `std` their disagreement (the population std over members, per completion), which the
uncertainty-adaptive KL controller reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tether import data as D
from tether.forward import reward_scores
from tether.models import is_hub_id, load_reward_model, load_tokenizer, resolve_model
from tether.rewards import RewardOutput, RewardSource


def reward_model_dirs(name: str | Path) -> list[Path]:
    """The reward-model directories behind `name` (a directory or a Hub ID, models.resolve_model): itself, a run's
    `model/`, or an ensemble's members in order."""
    path = Path(name)
    if not path.exists() and is_hub_id(name):
        path = resolve_model(name)
    if (path / "config.json").exists() or (path / "adapter_config.json").exists():
        return [path]
    members = [p for p in path.glob("member-*") if p.name[7:].isdigit() and (p / "config.json").exists()]
    members.sort(key=lambda p: int(p.name[7:]))  # member-10 after member-9
    if members:
        return members
    if (path / "model").is_dir():
        return reward_model_dirs(path / "model")
    raise FileNotFoundError(f"{path}: not a reward model (no config.json, no member-* directories, no model/)")


def encode_for_reward(tokenizer, prompt, completion: str, max_prompt_len: int | None = None,
                      max_completion_len: int | None = None) -> list[int]:
    """prompt ids (left-truncated) + completion ids + EOS (right-truncated): the RM's training tokenisation."""
    prompt_ids, _ = D.encode_prompt(tokenizer, prompt, max_prompt_len)
    completion_ids, _ = D.encode_completion(tokenizer, completion, max_completion_len)
    return list(prompt_ids) + list(completion_ids)


@torch.no_grad()
def score_sequences(model, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32,
                    device: torch.device | str | None = None, normalize: bool = True) -> torch.Tensor:
    """(N,) rewards of token sequences, in batches of similar length (less padding), returned in input order.

    Eval mode for the forward (LoRA dropout off), the model's previous mode restored afterwards.
    """
    device = device or next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = torch.empty(len(sequences), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids = D.pad_sequences([list(sequences[i]) for i in rows], pad_id).to(device)  # (b, T) right-padded
            mask = D.pad_sequences([[1] * len(sequences[i]) for i in rows], 0).to(device)
            out[rows] = reward_scores(model, ids, mask, normalize=normalize).float().cpu()
    finally:
        model.train(was_training)
    return out


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LearnedReward(RewardSource):
    """Reward from one reward model or the mean of an ensemble (with its std as uncertainty).

    `path_or_model`: a path (see the module docstring), a loaded reward model, or a list of loaded models (then
    `tokenizer` is required). Scores are computed without gradients, `batch_size` sequences per forward.
    """

    name = "rm"

    def __init__(self, path_or_model, tokenizer=None, batch_size: int = 32, device: str | torch.device | None = None,
                 max_prompt_len: int | None = None, max_completion_len: int | None = None, normalize: bool = True,
                 dtype: str = "float32", name: str = "rm"):
        if isinstance(path_or_model, (str, Path)):
            dirs = reward_model_dirs(path_or_model)
            device = torch.device(device) if device else _default_device()
            self.models = [load_reward_model(d, dtype=dtype).to(device).eval().requires_grad_(False) for d in dirs]
            tokenizer = tokenizer or load_tokenizer(dirs[0])
        else:
            self.models = list(path_or_model) if isinstance(path_or_model, (list, tuple)) else [path_or_model]
            if tokenizer is None:
                raise ValueError("LearnedReward needs `tokenizer` when given a model instead of a path")
            device = torch.device(device) if device else next(self.models[0].parameters()).device
        config = self.models[0].config
        self.tokenizer, self.device, self.batch_size, self.normalize, self.name = (
            tokenizer, device, batch_size, normalize, name)
        self.max_prompt_len = max_prompt_len or getattr(config, "reward_max_prompt_len", None)
        self.max_completion_len = max_completion_len or getattr(config, "reward_max_completion_len", None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, prompts: Sequence, completions: Sequence[str]) -> list[list[int]]:
        return [encode_for_reward(self.tokenizer, p, c, self.max_prompt_len, self.max_completion_len)
                for p, c in zip(prompts, completions, strict=True)]

    def member_scores(self, prompts: Sequence, completions: Sequence[str]) -> torch.Tensor:
        """(M, B) rewards of each ensemble member (M = 1 for a single model)."""
        seqs = self.encode(prompts, completions)
        return torch.stack([score_sequences(m, seqs, self.pad_id, self.batch_size, self.device, self.normalize)
                            for m in self.models])

    def __call__(self, prompts: Sequence, completions: Sequence[str], records: Sequence[dict] | None = None):
        per_member = self.member_scores(prompts, completions)  # (M, B)
        scores = per_member.mean(0)
        std = per_member.std(0, correction=0) if len(self.models) > 1 else None
        return RewardOutput(scores=scores, std=std, components={self.name: scores})
