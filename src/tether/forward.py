"""Running a model over a batch: every training and scoring forward of tether goes through this module.

    out = token_outputs(model, ids, mask, temperature)               # .logprobs (N, T-1): log p(token t+1 | <= t)
    out = response_outputs(model, seqs, mask, prompt_len, T, entropy=True)  # the response columns only (N, R)
    out = token_outputs(PolicyAndValue(policy, value), ids, mask)    # + .values (N, T-1): PPO's policy and critic
    logps = sequence_logps(model, pair_batch, average=False)         # (2B,) DPO: chosen and rejected in one forward
    loss = completion_nll(model, lm_batch, n_tokens)                 # SFT's NLL of the labelled tokens
    scores = reward_scores(rm, ids, mask)                            # (N,) at the last real token, normalised

A layout comes from `packing.plan_for`: the padded batch, its rows bin-packed, or one flat row, rows with the same
prompt sharing one copy of it when `prefix_lengths` says where their prompts end. The outputs come back in the padded
layout either way, so no caller knows which layout ran. Policy, reference and old log-probs of every recipe are
`token_outputs(...).logprobs` (or its `response_outputs` slice); only the arguments differ.

Conventions: column t of the (N, T-1) outputs belongs to the prediction of token t+1 from the tokens up to t
(logprobs: of that token; entropy: of that distribution; values: V at position t, the state before token t+1).
On a packed layout, pads and each row's first real token hold 0; on the padded one, whatever the model computed
there; multiply by a mask of real predicted tokens (a response or label mask) either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tether import data as D
from tether.lm_head import head_logprobs, hidden_states_out, linear_head
from tether.losses import entropy_from_logits, logprobs_from_logits, sequence_logprobs, sft_loss
from tether.packing import (
    NO_MASK,
    Packing,
    attention_for,
    last_token_index,
    pack,
    packed_attention_mask,
    plan_for,
    position_ids_from_mask,
    unpack,
)
from tether.wrappers import hf_model


def forward_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, p: Packing | None) -> dict:
    """The keyword arguments of one forward without a cache: the padded batch (its mask, positions from the mask) or,
    with a plan, the packed one (a flat row runs inside `packing.attention_for`)."""
    if p is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "position_ids": position_ids_from_mask(attention_mask), "use_cache": False}
    if p.spans is not None:
        return {"input_ids": pack(input_ids, p), "attention_mask": NO_MASK.to(input_ids.device),
                "position_ids": p.position_ids, "use_cache": False, "tether_spans": p.spans}
    return {"input_ids": pack(input_ids, p), "attention_mask": packed_attention_mask(p, model),
            "position_ids": p.position_ids, "use_cache": False}


class PolicyAndValue(torch.nn.Module):
    """PPO's policy and value model as one module: one optimizer, one DDP wrapper and one checkpoint cover both.

    forward(**forward_inputs) -> (logits, values), per position of whatever layout it is given; `token_outputs` of
    this module (or of its DDP wrapper) returns log-probs and values of one forward of both.
    """

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False, **spans):
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=use_cache, **spans).logits
        return logits, token_values(self.value, input_ids, attention_mask, position_ids, **spans)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.policy.gradient_checkpointing_enable(**kwargs)
        self.value.gradient_checkpointing_enable(**kwargs)

    def save_pretrained(self, path, **kwargs) -> None:
        """Policy in `path`, value model in `path/value` (what the engine saves when a loss turns non-finite)."""
        self.policy.save_pretrained(path, **kwargs)
        self.value.save_pretrained(Path(path) / "value", **kwargs)


@dataclass
class TokenOutputs:
    """Per-token outputs of one forward, (N, T-1) each, in the padded layout (see the module docstring)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def columns(self, start: int) -> TokenOutputs:
        """Columns start.. of every output (`response_outputs`: the response tokens)."""
        cut = lambda x: None if x is None else x[:, start:]  # noqa: E731
        return TokenOutputs(cut(self.logprobs), cut(self.entropy), cut(self.values))


def token_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0, *,
                  prefix_lengths: torch.Tensor | None = None, entropy: bool = False, entropy_grad: bool = False,
                  padding_free: bool = True) -> TokenOutputs:
    """Log-probs of tokens 1..T-1 under logits / temperature, in one forward over the layout `plan_for` picks.

    `model`: a causal LM, or a `PolicyAndValue` (then `.values` too), either perhaps wrapped by DDP, which sees the
    call. `prefix_lengths` (N,), each row's real prompt tokens, lets rows with the same prompt share one copy of it
    (DPO's chosen and rejected, a GRPO group). With `entropy`, the entropy of each predicting distribution, with a
    gradient only when `entropy_grad` (PPO's entropy bonus); otherwise it is a detached statistic.
    Log-probs and entropy are taken on the layout's rows (packed: the real tokens only), then carried back.
    """
    inner = getattr(model, "module", model)
    members = (inner.policy, inner.value) if isinstance(inner, PolicyAndValue) else (model,)
    p = plan_for(members[0], input_ids, attention_mask, prefix_lengths, padding_free, also=members[1:])
    inputs = forward_inputs(members[0], input_ids, attention_mask, p)
    head = linear_head(members[0])  # set: the forward returns hidden states and the head runs in chunks (lm_head.py)
    with attention_for(p, *members), hidden_states_out(head):
        out = model(**inputs)
    logits, values = out if isinstance(out, tuple) else (out.logits, None)  # (N, T, V|d) padded, (R, W, V|d) packed
    ids = inputs["input_ids"]
    lp, ent = _logprobs(logits, F.pad(ids[:, 1:], (0, 1)), head, temperature, entropy, entropy_grad)
    lp = lp[:, :-1]  # the last position predicts nothing
    if p is None:
        return TokenOutputs(lp, None if ent is None else ent[:, :-1], None if values is None else values[:, :-1])
    lp = F.pad(lp, (1, 0))  # packed: column t holds the log-prob of token t, taken from slot t-1
    if p.jump_cols is not None:  # a response's first token after a shared prompt: predicted from the prompt's end
        flat = logits.reshape(-1, logits.shape[-1])
        fixed = _logprobs(flat[p.jump_parents][None], ids.reshape(-1)[p.jump_cols][None], head, temperature)[0][0]
        lp = lp.reshape(-1).index_copy(0, p.jump_cols, fixed.to(lp.dtype)).view_as(lp)
    padded = lambda x: None if x is None else unpack(x, p)[:, :-1]  # noqa: E731  (at the predicting position)
    return TokenOutputs(unpack(lp, p, skip_first=True)[:, 1:], padded(ent), padded(values))


def _logprobs(x: torch.Tensor, tokens: torch.Tensor, head, temperature: float, entropy: bool = False,
              entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs of `tokens`, entropy or None), (rows, width) each, from logits (head None) or from hidden states
    through `head` in chunks (lm_head.head_logprobs: the same numbers without a (rows, width, V) tensor)."""
    if head is not None:
        return head_logprobs(x, head, tokens, temperature, entropy=entropy, entropy_grad=entropy_grad)
    lp = logprobs_from_logits(x, tokens, temperature=temperature)
    if not entropy:
        return lp, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return lp, entropy_from_logits(x, temperature)


def response_outputs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                     temperature: float = 1.0, **kwargs) -> TokenOutputs:
    """`token_outputs` of left-padded prompts (P columns) + right-padded responses, cut to the response columns:
    (N, T) each, column t for response token t. Rows with the same prompt share one copy of it."""
    prompts = attention_mask[:, :prompt_len].sum(1)  # (N,) real prompt tokens
    out = token_outputs(model, sequences, attention_mask, temperature, prefix_lengths=prompts, **kwargs)
    return out.columns(prompt_len - 1)


def sequence_logps(model, batch: dict, average: bool, padding_free: bool = True) -> torch.Tensor:
    """(rows,) summed (or per-token mean) log-probs of the completion tokens of a `data.collate_completions`-style
    batch (a pair batch: chosen rows then rejected rows, sharing one copy of their prompt), one forward."""
    prompts = (batch["attention_mask"] - batch["response_mask"]).sum(1)  # (rows,) real prompt tokens
    token = token_outputs(model, batch["input_ids"], batch["attention_mask"], prefix_lengths=prompts,
                          padding_free=padding_free).logprobs  # (rows, T-1)
    return sequence_logprobs(token, batch["response_mask"][:, 1:].to(token.dtype), average)


def completion_nll(model, batch: dict, num_tokens: float, padding_free: bool = True) -> torch.Tensor:
    """Summed next-token NLL of the labelled tokens of a `data.collate_lm` batch / num_tokens (SFT, PPO-ptx)."""
    labels = batch["labels"][:, 1:]  # (B, T-1)
    if "position_ids" in batch:  # rows packed by pack_examples: their own positions, no mask (data.model_inputs)
        head = linear_head(model)
        with hidden_states_out(head):
            x = model(**D.model_inputs(batch)).logits[:, :-1]  # (B, T-1, V|d) predicts tokens 1..T-1
        if head is None:
            return sft_loss(x, labels, num_tokens=num_tokens)[0]
        logprobs = head_logprobs(x, head, labels.masked_fill(labels == D.IGNORE_INDEX, 0))[0]
    else:
        logprobs = token_outputs(model, batch["input_ids"], batch["attention_mask"], padding_free=padding_free).logprobs
    return -(logprobs * (labels != D.IGNORE_INDEX)).sum() / num_tokens


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True,
                  padding_free: bool = True, prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) scalar rewards read at the last real token; with `normalize`, the stored gain/bias are applied.

    A reward model's config may carry `reward_gain` and `reward_bias` (set after training so that reference
    responses score mean 0, std 1: docs/reference.md §Reward model); every consumer goes through here, so every
    consumer sees the same scale. The per-position head output is captured with a hook and gathered at
    `last_token_index`, so padding on either side and a pad id equal to the EOS id are both handled (the model's own
    pooling looks for the rightmost non-pad id, which is wrong when pad == EOS), and DDP/peft wrappers still see a
    normal forward. Rows are packed as `token_outputs` packs them (same scores).
    """
    captured: dict[str, torch.Tensor] = {}
    hf = hf_model(model)
    hook = hf.score.register_forward_hook(lambda _m, _i, out: captured.update(logits=out))  # (B, T, 1)
    p = plan_for(hf, input_ids, attention_mask, prefix_lengths, padding_free)
    try:
        with attention_for(p, hf):
            model(**forward_inputs(hf, input_ids, attention_mask, p))
    finally:
        hook.remove()
    per_token = captured["logits"] if p is None else unpack(captured["logits"], p)  # (B, T, 1)
    rows = torch.arange(len(input_ids), device=input_ids.device)
    scores = per_token[rows, last_token_index(attention_mask), 0].float()
    return normalized(scores, hf.config) if normalize else scores


def normalized(raw: torch.Tensor, config) -> torch.Tensor:
    """(raw − reward_bias) · reward_gain, the stored normalisation of a reward model (identity when absent)."""
    return (raw - getattr(config, "reward_bias", 0.0)) * getattr(config, "reward_gain", 1.0)


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                 normalize: bool = True, **forward_kwargs) -> torch.Tensor:
    """(B, T) value-head output at every position: the value model of PPO, a reward model read everywhere.

    The trunk (`base_model_prefix`, LoRA layers included) gives hidden states (B, T, d) and the score head maps each
    to a scalar. With `normalize` the stored reward gain/bias are applied as in `reward_scores`, so a value model
    initialised from a reward model starts on the scale of the rewards it has to predict (N+: value from the RM).
    `forward_kwargs` go to the trunk (a flat row's `tether_spans`).
    """
    hf = hf_model(model)
    trunk = getattr(hf, hf.base_model_prefix)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False, **forward_kwargs).last_hidden_state  # (B, T, d)
    values = hf.score(hidden).squeeze(-1).float()  # (B, T)
    return normalized(values, hf.config) if normalize else values
