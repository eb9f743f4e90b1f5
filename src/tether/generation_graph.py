"""The fast decode path (backend "graph"): one decode step over preallocated buffers, captured in a CUDA graph on a GPU.

    rollout = sample(model, prompts, 256, eos_token_id=..., pad_token_id=..., backend="graph")

Why: on a GPU the eager decode step of a small model is bound by the CPU launching hundreds of kernels (about 80 ms
per step for a 0.5B model, benchmarks/RESULTS.md); replaying them as one CUDA graph removes that cost. A graph
replays fixed kernels on fixed addresses, so the step is written over buffers that never move:
- a `StaticCache` of length P+T (transformers keeps its write position in a device tensor it advances in place);
- a 4D additive attention mask (B, 1, 1, P+T), opened one slot per step with `index_fill_` at a device counter;
- the last tokens (B,), their positions (B, 1), the done flags (B,), and the outputs (B, T) written with
  `index_copy_` at the same counter;
- sampling on the device: the exponential race (`draw`), no host synchronisation inside the step.
`build_step` returns that step as a plain function; `decode` runs it T−1 times, either called directly (CPU, or
`capture=False`) or recorded once into a `torch.cuda.CUDAGraph` after two real warm-up steps and replayed. The CPU
tests run exactly the code that is captured on a GPU, only without the capture. All rows run until every row has
finished; that is checked on the host every `CHECK_EVERY` steps only, so a GPU never waits for the CPU per token.

Needs an attention implementation that takes a 4D mask (eager or sdpa, the transformers defaults). A model whose
forward accelerate wrapped in autocast (fp32 weights, mixed precision) is run through its original forward, in its
own dtype: autocast's cache of cast weights must not be used inside a CUDA graph (the PyTorch CUDA-graph notes), so
give the graph path a model in its compute dtype (bf16) for speed.
"""

from __future__ import annotations

import torch

from tether.generation import cache_keyword, filter_logits
from tether.models import position_ids_from_mask

CHECK_EVERY = 8  # decode steps between host checks of "every row has finished"
WARMUP_STEPS = 2  # real steps run on a side stream before capture (allocator and lazy initialisation)


def draw(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
         generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits -> (tokens (B,), log-probs under log_softmax(logits / T)), with no host synchronisation.

    Sampling by the exponential race: with E_i ~ Exp(1) independent, argmax_i p_i / E_i = k with probability
    p_k / Σ p (E_i / p_i ~ Exp(p_i) and the smallest of independent exponentials is index k with that probability),
    so the tokens follow the same distribution as `torch.multinomial(p, 1)` while staying device-side and capturable.
    temperature == 0 is greedy (argmax, like the other backends).
    """
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    scaled = logits / temperature
    probs = filter_logits(scaled, top_k, top_p).softmax(-1)  # (B, V), 0 on filtered tokens
    race = torch.empty_like(probs).exponential_(generator=generator)
    tokens = (probs / race).argmax(-1)
    return tokens, torch.log_softmax(scaled, -1).gather(-1, tokens[:, None])[:, 0]


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int):
    """Run the prompts into a fresh StaticCache of length P+T; returns (cache, last-position logits (B, V))."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + max_new_tokens)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True,
                **{cache_keyword(model): cache})
    return cache, out.logits[:, -1]


def build_step(model, cache, mask: torch.Tensor, first: torch.Tensor, first_logprobs: torch.Tensor,
               max_new_tokens: int, eos_token_id: int, pad_token_id: int, temperature: float, top_k: int,
               top_p: float, generator: torch.Generator | None):
    """(step, buffers): `step()` decodes one token for every row, reading and writing only `buffers` in place.

    `first` (B,) is the token picked from the prefill logits (column 0 of the response). Step s (0-based) feeds the
    token of column s at cache slot P+s and writes column s+1.
    """
    batch, prompt_len = mask.shape
    device = mask.device
    dtype = next(model.parameters()).dtype
    closed = torch.finfo(dtype).min
    attn = torch.full((batch, 1, 1, prompt_len + max_new_tokens), closed, dtype=dtype, device=device)
    attn[:, 0, 0, :prompt_len].masked_fill_(mask.bool(), 0.0)  # (B, 1, 1, P+T): 0 = visible
    done = first == eos_token_id
    buffers = {
        "tokens": first.clone(),  # (B,) the input of the next step
        "position": position_ids_from_mask(mask)[:, -1:] + 1,  # (B, 1)
        "slot": torch.tensor([prompt_len], device=device),  # (1,) cache slot of `tokens`
        "done": done,  # (B,)
        "attn": attn,
        "response": torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device),
        "logprobs": torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device),
    }
    buffers["response"][:, 0] = first
    buffers["logprobs"][:, 0] = torch.where(done, torch.zeros_like(first_logprobs), first_logprobs)
    b = buffers
    forward = getattr(model, "_original_forward", None) or model  # accelerate's autocast wrapper left out

    def step() -> None:
        b["attn"].index_fill_(3, b["slot"], 0.0)  # the incoming token becomes visible
        logits = forward(input_ids=b["tokens"][:, None], attention_mask=b["attn"], position_ids=b["position"],
                       use_cache=True, **{cache_keyword(model): cache}).logits[:, -1]
        tokens, logprobs = draw(logits, temperature, top_k, top_p, generator)
        finished = b["done"]
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        logprobs = torch.where(finished, torch.zeros_like(logprobs), logprobs)
        column = b["slot"] - (prompt_len - 1)  # (1,) response column written by this step
        b["response"].index_copy_(1, column, tokens[:, None])
        b["logprobs"].index_copy_(1, column, logprobs[:, None])
        b["done"].logical_or_(tokens == eos_token_id)
        b["tokens"].copy_(tokens)
        b["position"].add_(1)
        b["slot"].add_(1)

    return step, buffers


def capture(step, generator: torch.Generator | None, warmup: int) -> tuple:
    """Run `warmup` real steps on a side stream, then record one step into a CUDA graph; returns (replay, steps run)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    if generator is not None and generator.device.type == "cuda":
        graph.register_generator_state(generator)  # a user generator, not only the default one, advances per replay
    with torch.cuda.graph(graph):
        step()  # recorded, not run
    return graph.replay, warmup


def decode(step, buffers: dict, max_new_tokens: int, use_graph: bool, generator=None) -> tuple[torch.Tensor, ...]:
    """Run `step` for columns 1..T−1 (replayed from a CUDA graph when `use_graph`), stopping once every row is done.

    Returns (response (B, T'), logprobs (B, T')) with T' <= T the columns written.
    """
    n_steps, ran, run = max_new_tokens - 1, 0, step
    if use_graph and n_steps > 0:
        run, ran = capture(step, generator, min(WARMUP_STEPS, n_steps))
    while ran < n_steps and not (ran % CHECK_EVERY == 0 and bool(buffers["done"].all())):
        run()
        ran += 1
    width = ran + 1
    return buffers["response"][:, :width], buffers["logprobs"][:, :width]


def sample_graph(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p, generator,
                 use_graph: bool | None = None):
    """Backend "graph" of `generation.sample`: captured on CUDA, the same buffers called step by step elsewhere."""
    if use_graph is None:
        use_graph = ids.device.type == "cuda"
    cache, logits = prefill(model, ids, mask, max_new_tokens)
    first, first_logprobs = draw(logits, temperature, top_k, top_p, generator)
    step, buffers = build_step(model, cache, mask, first, first_logprobs, max_new_tokens, eos_token_id, pad_token_id,
                               temperature, top_k, top_p, generator)
    return decode(step, buffers, max_new_tokens, use_graph, generator)
