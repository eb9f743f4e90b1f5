"""Batched sampling with a KV cache: the rollout engine of PPO, GRPO, best-of-N, online DPO and evaluation.

    out = sample(model, prompt_ids, max_new_tokens=64, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                 temperature=1.0, generator=torch.Generator().manual_seed(0), return_logprobs=True)
    out.sequences        # (B, P+T) left-padded prompt + right-padded response
    out.response_mask    # (B, T) 1 on response tokens up to and including the first EOS
    texts = decode_responses(tok, out)

Why not `model.generate`: it is general (beam search, stopping criteria, logits processors, cache classes) and pays
for it on every step; RL sampling needs one thing — prefill once, then one token per step for every row — and the
per-step overhead dominates at the small batch shapes of RLHF on a CPU. The loop below does exactly that.

Backends (`BACKENDS`, picked by name):
- "eager": the loop with transformers' dynamic KV cache (what "auto" picks for a model "lean" does not cover).
- "lean": the same loop over the Llama-family decoder written out layer by layer with a preallocated cache
  (generation_lean.py): the model's own submodules without the per-call machinery of its forward; "auto" picks it
  for Llama, Qwen2, Qwen3 and Mistral models. Same token picking as "eager", so the same tokens for a seed wherever
  the logits agree to rounding.
- "static": the same loop over a preallocated `StaticCache` of length P+T, so every decode step has the same shapes —
  the form a CUDA graph (or `torch.compile(mode="reduce-overhead")`) can capture on a GPU. On a CPU it runs eagerly
  and is tested to give the same tokens as "eager".
- "graph": the fast path (generation_graph.py): the decode step over preallocated buffers (StaticCache, 4D mask,
  token/position/output buffers) with sampling on the device, captured in a CUDA graph and replayed on a GPU; on a
  CPU the same step runs uncaptured and is tested to give the same greedy tokens as "eager" and "hf", and samples
  equal in distribution (it samples by the exponential race, so its draws differ from "eager" for one seed).
- "hf": `model.generate`, kept as the reference the tests compare against.
- "vllm": vLLM's engine when it is installed (optional, never required): the policy's weights are loaded into a
  colocated `vllm.LLM` before each call; log-probs come from one recomputation forward, as for "hf".
"auto" is "lean" where it applies and "eager" elsewhere, on a CPU and a GPU alike, until "graph" has been measured on
a GPU (benchmarks/gpu.py); a CUDA model that asks for "graph" falls back to "eager", with a warning, if the capture
fails for that model.

Conventions: prompts are left-padded and get explicit `position_ids` (cumsum of the mask − 1), so a padded row gives
exactly what it gives alone. `temperature == 0` is greedy. The returned `logprobs` are log-probs of the sampled tokens
under the *tempered, unfiltered* distribution (log_softmax(logits / T)) — the quantity PPO recomputes in
`sequence_logprobs`; top-k / top-p only decide which token is drawn.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tether.data import pad_sequences
from tether.models import position_ids_from_mask

log = logging.getLogger(__name__)


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


def _decode_loop(step, first_logits, batch, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p,
                 generator):
    """Shared token loop: `step(tokens (B,), t)` runs the model on the new tokens and returns next logits (B, V)."""
    device = first_logits.device
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens_out, logprobs_out = [], []
    logits = first_logits
    for t in range(max_new_tokens):
        tokens, logprobs = pick_tokens(logits, temperature, top_k, top_p, generator)
        tokens = torch.where(done, torch.full_like(tokens, pad_token_id), tokens)
        tokens_out.append(tokens)
        logprobs_out.append(torch.where(done, torch.zeros_like(logprobs), logprobs))
        done = done | (tokens == eos_token_id)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits = step(tokens, t)
    return torch.stack(tokens_out, 1), torch.stack(logprobs_out, 1)


def cache_keyword(model) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.24 on (`past_key_values` is deprecated there
    and goes in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def _sample_eager(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p, generator):
    positions = position_ids_from_mask(mask)
    key = cache_keyword(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    state = {"past": _returned_cache(out), "mask": mask, "pos": positions[:, -1:] + 1}

    def step(tokens, t):
        state["mask"] = torch.cat([state["mask"], torch.ones_like(tokens[:, None])], dim=1)
        o = model(input_ids=tokens[:, None], attention_mask=state["mask"], position_ids=state["pos"],
                  use_cache=True, **{key: state["past"]})
        state["past"], state["pos"] = _returned_cache(o), state["pos"] + 1
        return o.logits[:, -1]

    return _decode_loop(step, out.logits[:, -1], len(ids), max_new_tokens, eos_token_id, pad_token_id,
                        temperature, top_k, top_p, generator)


def _sample_static(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p,
                   generator):
    """Fixed-shape decode: a preallocated cache and a full-length attention mask, updated in place each step."""
    from transformers import StaticCache

    batch, prompt_len = ids.shape
    total = prompt_len + max_new_tokens
    cache = StaticCache(config=model.config, max_cache_len=total)
    full_mask = torch.zeros(batch, total, dtype=mask.dtype, device=ids.device)
    full_mask[:, :prompt_len] = mask
    positions = position_ids_from_mask(mask)
    key = cache_keyword(model)
    out = model(input_ids=ids, attention_mask=full_mask[:, :prompt_len], position_ids=positions, use_cache=True,
                cache_position=torch.arange(prompt_len, device=ids.device), **{key: cache})
    pos = positions[:, -1:] + 1

    def step(tokens, t):
        nonlocal pos
        index = prompt_len + t
        full_mask[:, index] = 1
        o = model(input_ids=tokens[:, None], attention_mask=full_mask, position_ids=pos, use_cache=True,
                  cache_position=torch.tensor([index], device=ids.device), **{key: cache})
        pos = pos + 1
        return o.logits[:, -1]

    return _decode_loop(step, out.logits[:, -1], batch, max_new_tokens, eos_token_id, pad_token_id,
                        temperature, top_k, top_p, generator)


def _sample_hf(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p, generator):
    """`model.generate` (reference path). Log-probs come from one recomputation forward."""
    if generator is not None:  # generate draws from the global RNG: derive its seed from the generator
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    kwargs = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature,
                                                              "top_k": top_k or None, "top_p": top_p}
    seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                          pad_token_id=pad_token_id, min_new_tokens=0, **kwargs)
    response = seqs[:, ids.shape[1]:]
    attention = torch.cat([mask, torch.ones_like(response)], dim=1)
    logprobs = sequence_logprobs(model, torch.cat([ids, response], 1), attention, ids.shape[1], temperature or 1.0)
    return response, logprobs


def _sample_graph(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p,
                  generator):
    from tether.generation_graph import sample_graph

    return sample_graph(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p,
                        generator)


def _sample_lean(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p, generator):
    from tether.generation_lean import sample_lean

    return sample_lean(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p,
                       generator)


def _sample_vllm(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p, generator):
    """vLLM (colocated, same GPU): weights synced from `model` each call; log-probs recomputed in one forward."""
    try:
        import vllm
    except ImportError:
        raise ImportError("generation backend 'vllm' needs vLLM (pip install vllm); the built-in backends "
                          "eager, static, graph and hf need nothing more") from None
    llm = _VLLM_ENGINES.get(model)
    if llm is None:
        import tempfile

        path = tempfile.mkdtemp(prefix="tether-vllm-")
        model.save_pretrained(path)
        llm = vllm.LLM(model=path, skip_tokenizer_init=True, dtype=str(next(model.parameters()).dtype)[6:],
                       gpu_memory_utilization=0.3)
        _VLLM_ENGINES[model] = llm
    llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(model.named_parameters())
    llm.reset_prefix_cache()
    seed = int(torch.randint(0, 2**31, (1,), generator=generator)) if generator is not None else None
    params = vllm.SamplingParams(n=1, temperature=temperature, top_k=top_k or -1, top_p=top_p, seed=seed,
                                 max_tokens=max_new_tokens, stop_token_ids=[eos_token_id])
    rows = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(ids, mask)]
    outputs = llm.generate(rows, params, use_tqdm=False)
    response = pad_sequences([list(o.outputs[0].token_ids) for o in outputs], pad_token_id).to(ids.device)
    attention = torch.cat([mask, torch.ones_like(response)], dim=1)
    logprobs = sequence_logprobs(model, torch.cat([ids, response], 1), attention, ids.shape[1], temperature or 1.0)
    return response, logprobs


_VLLM_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one colocated vLLM engine per policy
BACKENDS = {"eager": _sample_eager, "lean": _sample_lean, "static": _sample_static, "graph": _sample_graph,
            "hf": _sample_hf, "vllm": _sample_vllm}
_GRAPH_FAILED: weakref.WeakSet = weakref.WeakSet()  # models whose graph capture failed: they decode "eager"


def _auto_backend(model, device: torch.device, total_len: int = 0) -> str:
    """The backend "auto" means for this model: "lean" where it applies, else "eager" (see the module docstring)."""
    from tether.generation_lean import supported

    return "lean" if supported(model, total_len) else "eager"


def _response_mask(response: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first EOS; has_eos per row."""
    is_eos = response == eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).long(), is_eos.any(1)


@torch.no_grad()
def sample(model, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int, *, eos_token_id: int,
           pad_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, return_logprobs: bool = False, backend: str = "auto",
           prompt_mask: torch.Tensor | None = None) -> Rollout:
    """Sample one response per prompt (repeat prompts for several); see the module docstring."""
    device = next(model.parameters()).device
    if isinstance(prompts, torch.Tensor):
        ids = prompts.to(device)
        mask = (prompt_mask if prompt_mask is not None else torch.ones_like(ids)).to(device).long()
    else:
        ids = pad_sequences(prompts, pad_token_id, side="left").to(device)
        mask = pad_sequences([[1] * len(p) for p in prompts], 0, side="left").to(device)
    fallback = backend in ("auto", "graph")
    if backend == "auto":
        backend = _auto_backend(model, device, ids.shape[1] + max_new_tokens)
    if backend == "graph" and model in _GRAPH_FAILED:
        backend = "eager"
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
    args = (ids, mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p, generator)
    was_training = model.training
    model.eval()
    try:
        try:
            response, logprobs = BACKENDS[backend](model, *args)
        except RuntimeError as e:
            if not (fallback and backend == "graph" and device.type == "cuda"):
                raise
            log.warning("CUDA-graph decoding failed for this model (%s); using backend 'eager' from now on", e)
            _GRAPH_FAILED.add(model)
            response, logprobs = _sample_eager(model, *args)
    finally:
        model.train(was_training)
    response_mask, has_eos = _response_mask(response, eos_token_id)
    response = response.masked_fill(response_mask == 0, pad_token_id)
    logprobs = logprobs.float() * response_mask if return_logprobs else None
    return Rollout(ids, mask, response, response_mask, has_eos, logprobs)


def sequence_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                      temperature: float = 1.0, padding_free: bool = True) -> torch.Tensor:
    """(B, T) log-probs of the response tokens sequences[:, prompt_len:] under logits / T, in one forward (the rows
    bin-packed when that saves some, rows with the same prompt sharing one copy of it: packing.py).

    Masked (padding) positions hold no meaningful value; multiply by the response mask.
    """
    from tether.packing import token_logprobs

    prompts = attention_mask[:, :prompt_len].sum(1)  # rows with the same prompt (a GRPO group) share one copy
    lp = token_logprobs(model, sequences, attention_mask, temperature, padding_free, prompts)  # (B, P+T-1)
    return lp[:, prompt_len - 1 :]


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Response texts without EOS and padding."""
    texts = []
    for ids, mask in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist()):
        kept = [i for i, m in zip(ids, mask) if m and i != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return texts
