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


PROBE = "tether-end-of-turn-probe"


def end_of_turn_id(tokenizer) -> int | None:
    """The special token a chat template closes an assistant turn with (ChatML's <|im_end|>), or None: rendered
    after a probe reply, the first special token that follows it."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "u"}, {"role": "assistant", "content": PROBE}],
                                             tokenize=False)
    except Exception:  # a template that refuses this shape of chat has no end of turn we can find
        return None
    if PROBE not in text:
        return None
    after = tokenizer(text[text.rindex(PROBE) + len(PROBE):], add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return next((i for i in after if i in special), None)


def stop_ids(tokenizer, model=None) -> list[int]:
    """Every id a response may end with: the tokenizer's EOS, the model's `generation_config.eos_token_id` (an int
    or a list: chat models list their end-of-turn there) and the chat template's end-of-turn token."""
    found = [tokenizer.eos_token_id]
    config = getattr(getattr(model, "module", model), "generation_config", None)
    listed = getattr(config, "eos_token_id", None)
    found += [listed] if isinstance(listed, int) else list(listed or [])
    found.append(end_of_turn_id(tokenizer))
    return list(dict.fromkeys(i for i in found if i is not None))


def decode_responses(tokenizer, rollout: Rollout, stops: list[int] | None = None) -> list[str]:
    """Response texts without the stop token and padding."""
    stops = set(stops or [tokenizer.eos_token_id])
    texts = []
    for ids, mask in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist()):
        kept = [i for i, m in zip(ids, mask) if m and i not in stops]
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
    stops = stop_ids(tokenizer, model)
    prompts, completions, rollouts = [], [], []
    for i in range(0, len(rows), step):
        chunk = rows[i : i + step]
        ids = [D.encode_prompt(tokenizer, D.prompt_of(r), max_prompt_len)[0] for r in chunk]
        roll = sample(model, ids, max_new_tokens, eos_token_id=stops,
                      pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p,
                      generator=generator, return_logprobs=return_logprobs)
        prompts += [D.prompt_of(r) for r in chunk]
        completions += decode_responses(tokenizer, roll, stops)
        rollouts.append(roll)
    return Samples(rows, prompts, completions, rollouts)
