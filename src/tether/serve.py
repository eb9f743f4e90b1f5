"""`tether serve model=DIR port=8000`: an OpenAI-compatible server for any tether / Hugging Face model directory.

    tether serve model=runs/judge                          # prints the token; TETHER_SERVE_TOKEN=... to choose it
    tether serve model=runs/rm port=8001                   # a reward model: POST /score
    from openai import OpenAI; OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=TOKEN).completions.create(...)

Routes (all need `Authorization: Bearer TOKEN`, else 401):
    GET  /v1/models             the one model, under `name` (default: the directory's name)
    POST /v1/completions        prompt (a string or a list), max_tokens, temperature, top_p, n, seed, stop, echo,
                                logprobs (top-k, 0..20): tokens, token_logprobs, top_logprobs, text_offset as the
                                OpenAI legacy API (and vLLM) give them; echo + max_tokens=0 scores a text
    POST /v1/chat/completions   messages through the tokenizer's chat template; logprobs + top_logprobs (0..20)
    POST /score                 reward models: {"query": [text, ...]} (OpenRLHF's remote reward model shape) or
                                {"prompts": [...], "responses": [...]} -> {"rewards": [...], "scores": [...]}
Log-probs are of the model's own distribution (temperature 1), float32, on the tokens of the text as the tokenizer
splits it with its special tokens. A bad request is a 400 with {"error": {"message", "type", "param"}}; the server
listens on 127.0.0.1 unless host= says otherwise (plain HTTP: put TLS in front of it beyond this machine).
One request at a time touches the model (a lock): the server is for judges, reward models and tests, not a
high-throughput engine (use vLLM or SGLang for that; the judge talks to them the same way).
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from tether.config import ConfigError, at_least, between, opt

MAX_TOP = 20  # most top log-probs a request may ask for (OpenAI's limit)


@dataclass
class ServeConfig:
    model: str = opt("", "model directory or Hub ID: a causal LM (completions, chat) or a reward model (/score)")
    host: str = opt("127.0.0.1", "interface to listen on")
    port: int = opt(8000, "port to listen on (0: any free port)", check=between(0, 65535))
    name: str = opt("", "model name the API reports and accepts (default: the directory's name)")
    device: str = opt("cpu", "device the model runs on")
    batch_size: int = opt(32, "texts scored at once", check=at_least(1))
    max_tokens_limit: int = opt(1024, "largest max_tokens a request may ask for", check=at_least(1))

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("serve needs model=DIR")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Served:
    """The model behind the routes: a causal LM (complete, chat) or a reward model (score)."""

    def __init__(self, model_dir: str, name: str = "", device: str = "cpu", batch_size: int = 32,
                 max_tokens_limit: int = 1024):
        from transformers import AutoConfig

        from tether.models import load_causal_lm, load_reward_model, load_tokenizer, resolve_model

        path = Path(model_dir) if Path(model_dir).exists() else resolve_model(model_dir)
        config = AutoConfig.from_pretrained(str(path))
        self.is_reward = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        self.tokenizer = load_tokenizer(path)
        self.model = (load_reward_model(path) if self.is_reward else load_causal_lm(path)).to(device).eval()
        self.name = name or Path(str(model_dir).rstrip("/")).name
        self.device, self.batch_size, self.max_tokens_limit = device, batch_size, max_tokens_limit
        self.max_len = getattr(self.model.config, "max_position_embeddings", None)
        self.lock = threading.Lock()

    # --- scoring texts ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def echo_logprobs(self, text: str, k: int) -> dict:
        """OpenAI's legacy logprobs object for a whole text: the first token has None (nothing predicts it)."""
        enc = self.tokenizer(text, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [s for s, _ in enc["offset_mapping"]]
        self._check_length(len(ids), "prompt")
        tokens = [self.tokenizer.decode([i]) for i in ids]
        logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1)  # (T-1, V)
        chosen = logp.gather(1, torch.tensor(ids[1:], device=self.device)[:, None])[:, 0].tolist()
        tops = [None]
        if k:
            values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
            for v, i in zip(values.tolist(), indices.tolist()):
                tops.append({self.tokenizer.decode([t]): x for t, x in zip(i, v)})
        return {"tokens": tokens, "token_logprobs": [None] + chosen, "top_logprobs": tops if k else None,
                "text_offset": offsets}

    def _check_length(self, n: int, param: str) -> None:
        if self.max_len and n > self.max_len:
            raise BadRequest(f"{n} tokens, more than the model's {self.max_len} positions", param)

    def generate(self, prompt_text: str, max_tokens: int, temperature: float, top_p: float, n: int,
                 seed: int | None, stop: list[str]) -> list[tuple[str, str, list[int]]]:
        """n (text, finish_reason, token ids) continuations of a prompt; "stop" at EOS (its id kept last) or a stop
        string, else "length"."""
        from tether.generation import sample_records

        self._check_length(len(self.tokenizer(prompt_text)["input_ids"]) + max_tokens, "max_tokens")
        generator = torch.Generator(self.device).manual_seed(int(time.time_ns()) % 2**31 if seed is None else seed)
        s = sample_records(self.model, self.tokenizer, [{"prompt": prompt_text}], n, max_new_tokens=max_tokens,
                           temperature=temperature, top_p=top_p, generator=generator)
        ids = [[i for i, m in zip(row, mask) if m] for roll in s.rollouts
               for row, mask in zip(roll.response_ids.tolist(), roll.response_mask.tolist())]
        out = []
        for text, eos, row in zip(s.completions, s.has_eos, ids):
            cut = min([text.find(x) for x in stop if x and x in text], default=-1)
            if cut >= 0:
                out.append((text[:cut], "stop", row))
            else:
                out.append((text, "stop" if eos else "length", row))
        return out

    @torch.no_grad()
    def continuation_logprobs(self, prompt_text: str, ids: list[int], k: int) -> list[dict]:
        """Chat's logprobs content: each generated token (an EOS that ended the reply included) with its log-prob
        and the top-k of the distribution it was drawn from (temperature 1)."""
        prompt = self.tokenizer(prompt_text)["input_ids"]
        full = torch.tensor([prompt + ids], device=self.device)
        logp = torch.log_softmax(self.model(input_ids=full).logits[0, len(prompt) - 1:-1].float(), -1)  # (R, V)
        content = []
        for row, i in zip(logp, ids):
            values, indices = row.topk(min(k, row.shape[-1]))
            tok = self.tokenizer.decode([i])
            content.append({"token": tok, "logprob": row[i].item(), "bytes": list(tok.encode()),
                            "top_logprobs": [{"token": self.tokenizer.decode([t]), "logprob": v,
                                              "bytes": list(self.tokenizer.decode([t]).encode())}
                                             for v, t in zip(values.tolist(), indices.tolist())]})
        return content

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[float]:
        from tether.rewards.learned import score_sequences

        ids = [self.tokenizer(t)["input_ids"] + ([] if self.tokenizer(t)["input_ids"][-1:] ==
                                                  [self.tokenizer.eos_token_id] else [self.tokenizer.eos_token_id])
               for t in texts]
        return score_sequences(self.model, ids, self.tokenizer.pad_token_id, self.batch_size, self.device).tolist()


# --- request parsing -------------------------------------------------------------------------------------------------
def _number(body: dict, key: str, default, low, high, kind=float):
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise BadRequest(f"'{key}' must be a number", key)
    if not low <= value <= high:
        raise BadRequest(f"'{key}' must be in [{low}, {high}], got {value}", key)
    return kind(value)


def _stops(body: dict) -> list[str]:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings", "stop")
    return stop


def completions(served: Served, body: dict) -> dict:
    prompts = body.get("prompt")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("'prompt' must be a string or a non-empty list of strings (token ids are not accepted)",
                         "prompt")
    max_tokens = _number(body, "max_tokens", 16, 0, served.max_tokens_limit, int)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 1e-6, 1.0)
    n = _number(body, "n", 1, 1, 16, int)
    k = _number(body, "logprobs", 0, 0, MAX_TOP, int)
    wants_logprobs = body.get("logprobs") is not None
    seed = None if body.get("seed") is None else _number(body, "seed", 0, 0, 2**31 - 1, int)
    echo, stop = bool(body.get("echo", False)), _stops(body)
    if max_tokens == 0 and not echo:
        raise BadRequest("max_tokens=0 only makes sense with echo=true (scoring the prompt)", "max_tokens")
    choices = []
    for prompt in prompts:
        outs = [("", "length", [])] * n if max_tokens == 0 else served.generate(prompt, max_tokens, temperature, top_p,
                                                                             n, seed, stop)
        for text, finish, _ in outs:
            full = prompt + text if echo else text
            logprobs = None
            if wants_logprobs:
                whole = served.echo_logprobs(prompt + text, k)
                if not echo:  # only the generated tokens, offsets relative to the generated text
                    keep = [i for i, off in enumerate(whole["text_offset"]) if off >= len(prompt)]
                    whole = {key: (None if v is None else [v[i] for i in keep]) for key, v in whole.items()}
                    whole["text_offset"] = [off - len(prompt) for off in whole["text_offset"]]
                logprobs = whole
            choices.append({"index": len(choices), "text": full, "logprobs": logprobs, "finish_reason": finish})
    return {"id": f"cmpl-{secrets.token_hex(8)}", "object": "text_completion", "created": int(time.time()),
            "model": served.name, "choices": choices}


def chat_text(served: Served, messages) -> str:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise BadRequest("'messages' must be a non-empty list of {role, content} with string content", "messages")
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(served.tokenizer, "chat_template", None):
        return served.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return "\n".join(f"{m['role']}: {m['content']}" for m in turns) + "\nassistant:"


def chat_completions(served: Served, body: dict) -> dict:
    prompt = chat_text(served, body.get("messages"))
    max_tokens = _number(body, "max_tokens", body.get("max_completion_tokens") or 64, 1, served.max_tokens_limit,
                         int)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 1e-6, 1.0)
    n = _number(body, "n", 1, 1, 16, int)
    k = _number(body, "top_logprobs", 0, 0, MAX_TOP, int)
    seed = None if body.get("seed") is None else _number(body, "seed", 0, 0, 2**31 - 1, int)
    choices = []
    for text, finish, ids in served.generate(prompt, max_tokens, temperature, top_p, n, seed, _stops(body)):
        logprobs = {"content": served.continuation_logprobs(prompt, ids, k)} if body.get("logprobs") else None
        choices.append({"index": len(choices), "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs, "finish_reason": finish})
    return {"id": f"chatcmpl-{secrets.token_hex(8)}", "object": "chat.completion", "created": int(time.time()),
            "model": served.name, "choices": choices}


def score(served: Served, body: dict) -> dict:
    if "query" in body:
        texts = body["query"]
    elif "prompts" in body and "responses" in body:
        if not (isinstance(body["prompts"], list) and isinstance(body["responses"], list)
                and len(body["prompts"]) == len(body["responses"])):
            raise BadRequest("'prompts' and 'responses' must be lists of one length", "responses")
        texts = [f"{p} {r}" for p, r in zip(body["prompts"], body["responses"])]
    else:
        raise BadRequest("send {'query': [text, ...]} or {'prompts': [...], 'responses': [...]}", "query")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise BadRequest("'query' must be a non-empty list of non-empty strings", "query")
    rewards = served.score(texts)
    return {"rewards": rewards, "scores": rewards}


# --- the app ---------------------------------------------------------------------------------------------------------
def create_app(served: Served, token: str):
    app = FastAPI(title="tether serve", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)

    @app.middleware("http")
    async def bearer(request: Request, call_next):
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
            return error(401, "missing or wrong bearer token", "authentication_error")
        return await call_next(request)

    def route(fn, kind: str):
        async def handler(request: Request):
            try:
                body = json.loads(await request.body() or b"{}")
            except ValueError:
                return error(400, "the body is not JSON", "invalid_request_error")
            if not isinstance(body, dict):
                return error(400, "the body must be a JSON object", "invalid_request_error")
            if kind == "lm" and served.is_reward:
                return error(400, f"{served.name} is a reward model: use POST /score", "invalid_request_error")
            if kind == "rm" and not served.is_reward:
                return error(400, f"{served.name} is a causal LM, not a reward model", "invalid_request_error")
            def locked():
                with served.lock:
                    return fn(served, body)
            try:
                return JSONResponse(await run_in_threadpool(locked))
            except BadRequest as e:
                return error(400, str(e), "invalid_request_error", e.param)
        return handler

    app.post("/v1/completions")(route(completions, "lm"))
    app.post("/v1/chat/completions")(route(chat_completions, "lm"))
    app.post("/score")(route(score, "rm"))

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "owned_by": "tether"}]}

    return app


def serve_token() -> tuple[str, bool]:
    """(token, generated): TETHER_SERVE_TOKEN, or a fresh random one."""
    token = os.environ.get("TETHER_SERVE_TOKEN", "")
    return (token, False) if token else (secrets.token_urlsafe(24), True)


def run(cfg: ServeConfig) -> dict:
    import uvicorn

    served = Served(cfg.model, cfg.name, cfg.device, cfg.batch_size, cfg.max_tokens_limit)
    token, generated = serve_token()
    print(json.dumps({"serving": f"http://{cfg.host}:{cfg.port}/v1", "model": served.name,
                      "kind": "reward model" if served.is_reward else "causal LM"}), flush=True)
    if generated:
        print(f"token (set TETHER_SERVE_TOKEN to choose one): {token}", flush=True)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print("note: plain HTTP beyond this machine; put TLS in front of it", file=sys.stderr)
    uvicorn.run(create_app(served, token), host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
    return {}
