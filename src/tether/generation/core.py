"""The parts every decode backend shares: the rollout record, logit filtering, token picking and the decode loop.

A backend prefills the prompts and supplies `step(tokens, t) -> next logits`; `decode_loop` does the rest: picks a
token per row (`pick_tokens`), pads rows that have finished, stops when all have. Conventions (generation/__init__.py
says more): prompts are left-padded with explicit positions (cumsum of the mask − 1); `temperature == 0` is greedy;
a picked token's log-prob is under the tempered, unfiltered distribution log_softmax(logits / T).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded with pad_token_id
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    response_ids: torch.Tensor  # (B, T) right-padded after the first EOS (the EOS itself kept)
    response_mask: torch.Tensor  # (B, T) 1 on response tokens up to and including the first EOS
    has_eos: torch.Tensor  # (B,) bool
    logprobs: torch.Tensor | None = None  # (B, T) sampled-token log-probs under logits / T (0 where masked)

    @property
    def sequences(self) -> torch.Tensor:  # (B, P+T)
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P+T)
        return torch.cat([self.prompt_mask, self.response_mask], dim=1).long()

    def rows(self, idx: torch.Tensor) -> Rollout:
        """The rollout of rows `idx` (B',)."""
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return Rollout(pick(self.prompt_ids), pick(self.prompt_mask), pick(self.response_ids),
                       pick(self.response_mask), pick(self.has_eos), pick(self.logprobs))

    @staticmethod
    def cat(parts: list[Rollout], pad_id: int) -> Rollout:
        """Rollouts stacked row-wise, prompts left-padded and responses right-padded to the widest."""
        prompt_width = max(r.prompt_ids.shape[1] for r in parts)
        response_width = max(r.response_ids.shape[1] for r in parts)

        def widen(x, width, left, value):
            fill = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype, device=x.device)
            return torch.cat([fill, x] if left else [x, fill], 1)

        logprobs = None if any(r.logprobs is None for r in parts) else \
            torch.cat([widen(r.logprobs, response_width, False, 0.0) for r in parts])
        return Rollout(torch.cat([widen(r.prompt_ids, prompt_width, True, pad_id) for r in parts]),
                       torch.cat([widen(r.prompt_mask, prompt_width, True, 0) for r in parts]),
                       torch.cat([widen(r.response_ids, response_width, False, pad_id) for r in parts]),
                       torch.cat([widen(r.response_mask, response_width, False, 0) for r in parts]),
                       torch.cat([r.has_eos for r in parts]), logprobs)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top-k logits and the smallest set of tokens whose probability reaches top_p; others -> −inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # the mass before a token already reaches p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) last-position logits -> (tokens (B,), their log-probs under log_softmax(logits / T))."""
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    scaled = logits / temperature
    probs = filter_logits(scaled, top_k, top_p).softmax(-1)
    tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, torch.log_softmax(scaled, -1).gather(-1, tokens[:, None])[:, 0]


def stop_tensor(eos_token_id, device) -> torch.Tensor:
    """The ids a response ends at, as a tensor: one EOS id, or several (an end-of-turn token, a model's EOS list)."""
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def decode_loop(step, first_logits, batch, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p,
                generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The token loop: `step(tokens (B,), t)` runs the model on the new tokens and returns the next logits (B, V).

    Returns (response (B, T'), log-probs (B, T')), T' <= max_new_tokens: the loop stops once every row has ended
    with one of the ids in `eos_token_id` (an int or a list)."""
    device = first_logits.device
    stops = stop_tensor(eos_token_id, device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens_out, logprobs_out = [], []
    logits = first_logits
    for t in range(max_new_tokens):
        tokens, logprobs = pick_tokens(logits, temperature, top_k, top_p, generator)
        tokens = torch.where(done, torch.full_like(tokens, pad_token_id), tokens)
        tokens_out.append(tokens)
        logprobs_out.append(torch.where(done, torch.zeros_like(logprobs), logprobs))
        done = done | torch.isin(tokens, stops)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits = step(tokens, t)
    return torch.stack(tokens_out, 1), torch.stack(logprobs_out, 1)


def response_mask(response: torch.Tensor, eos_token_id) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, T): 1 up to and including the first stop id, has_eos (B,): the row ended); `eos_token_id` is an id
    or a list of them."""
    is_eos = torch.isin(response, stop_tensor(eos_token_id, response.device))
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).long(), is_eos.any(1)


def cache_keyword(model) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.24 on (`past_key_values` is deprecated there
    and goes in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
