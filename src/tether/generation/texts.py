"""From records to texts: repeat each record n times, encode its prompt, sample, decode — the one sampling loop of
PPO, GRPO, best-of-N, online DPO and evaluation.

    s = sample_records(model, tok, records, 4, max_new_tokens=48, generator=g, batch_size=64)
    s.completions            # 4 texts per record, record by record
    s.groups(4)              # [{"record", "prompt", "completions": [4], "has_eos": [4]}] per record
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tether import data as D
from tether.generation.core import Rollout
from tether.generation.dispatch import sample


@dataclass
class Samples:
    records: list[dict]  # each record repeated n times, in order
    prompts: list  # the prompt of each row: a string or chat turns
    completions: list[str]  # each row's response text, EOS and padding removed
    rollouts: list[Rollout]  # one per sampling batch, in row order

    @property
    def rollout(self) -> Rollout:
        """The one rollout of rows sampled in a single batch (`batch_size=None`)."""
        if len(self.rollouts) != 1:
            raise ValueError(f"{len(self.rollouts)} sampling batches; use `rollouts`")
        return self.rollouts[0]

    @property
    def has_eos(self) -> list[bool]:
        return [bool(x) for r in self.rollouts for x in r.has_eos.tolist()]

    def groups(self, n: int) -> list[dict]:
        """The n rows of each record as one group (the layout of best-of-N and online DPO)."""
        eos = self.has_eos
        return [{"record": self.records[j], "prompt": self.prompts[j], "completions": self.completions[j : j + n],
                 "has_eos": eos[j : j + n]} for j in range(0, len(self.records), n)]


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Response texts without EOS and padding."""
    texts = []
    for ids, mask in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist()):
        kept = [i for i, m in zip(ids, mask) if m and i != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return texts


@torch.no_grad()
def sample_records(model, tokenizer, records: list[dict], n: int, *, max_new_tokens: int, temperature: float = 1.0,
                   top_p: float = 1.0, generator: torch.Generator | None = None, max_prompt_len: int | None = None,
                   batch_size: int | None = None, return_logprobs: bool = False) -> Samples:
    """n responses per record (rows of a record contiguous), sampled `batch_size` rows at a time (None: all at
    once); prompts cut from the left to `max_prompt_len` tokens (None: kept whole)."""
    rows = [r for r in records for _ in range(n)]
    step = batch_size or max(1, len(rows))
    prompts, completions, rollouts = [], [], []
    for i in range(0, len(rows), step):
        chunk = rows[i : i + step]
        ids = [D.encode_prompt(tokenizer, D.prompt_of(r), max_prompt_len)[0] for r in chunk]
        roll = sample(model, ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p,
                      generator=generator, return_logprobs=return_logprobs)
        prompts += [D.prompt_of(r) for r in chunk]
        completions += decode_responses(tokenizer, roll)
        rollouts.append(roll)
    return Samples(rows, prompts, completions, rollouts)
