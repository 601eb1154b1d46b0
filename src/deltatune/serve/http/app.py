"""The FastAPI app: OpenAI-compatible completions, chat completions (streaming as server-sent events), models; vLLM's
hot load/unload endpoints; health and Prometheus metrics. Every error is OpenAI's error body with a 4xx status for
anything the client sent; a response never holds a traceback."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...core.errors import DeltaNameError, DeltaTuneError, StateError
from ..engine import Engine
from .errors import APIError, error_body, not_found
from .keys import KeyEntry, KeyStore, RateLimiter
from .metrics import Metrics
from .protocol import ChatBody, CompletionBody, LoadBody, UnloadBody, chat_text, parse, sampling_of
from .registry import Registry
from .runner import Handle, Runner

log = logging.getLogger("deltatune.serve")


@dataclass
class Server:
    """Everything one running server holds."""

    engine: Engine
    tokenizer: Any
    registry: Registry
    base_name: str
    keys: KeyStore | None = None
    context: int = 2048
    default_max_tokens: int = 16
    max_body_bytes: int = 1 << 20
    max_prompts: int = 16
    drain_timeout: float = 30.0
    metrics: Metrics = field(default_factory=Metrics)
    limiter: RateLimiter = field(default_factory=RateLimiter)
    closing: bool = False
    runner: Runner = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.runner is None:
            self.runner = Runner(self.engine, self.metrics)
        self.metrics.attach(self)
        self.started = int(time.time())

    def delta_names(self) -> list[str]:
        return self.registry.names()


# --- helpers -----------------------------------------------------------------------------------------------------
def _caller(server: Server, request: Request) -> KeyEntry | None:
    """The caller's key entry; None when the server runs without keys (loopback only, everything allowed)."""
    if server.keys is None:
        return None
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    entry = server.keys.check(token.strip()) if scheme.lower() == "bearer" else None
    if entry is None:
        raise APIError(401, "Incorrect or missing API key. Pass it as `Authorization: Bearer <key>`.",
                       code="invalid_api_key")
    return entry


def _admin(server: Server, request: Request) -> KeyEntry | None:
    entry = _caller(server, request)
    if entry is not None and not entry.admin:
        raise APIError(403, "this endpoint needs an admin key", code="insufficient_permissions")
    return entry


def _may_use(server: Server, entry: KeyEntry | None, model: str) -> bool:
    if model != server.base_name and model not in server.registry.paths:
        return False
    return entry is None or entry.may_use(model, server.base_name)


async def _body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {int(length)} bytes; at most {limit} are accepted",
                       code="request_too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class _Text:
    """Text of a request's tokens as they arrive: what is safe to send now (no half character, nothing that may
    become a stop string), and the rest at the end."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.sent = 0

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self._decode(self.tokens)
        safe = len(text)
        while safe and text[safe - 1] == "\ufffd":
            safe -= 1
        for s in self.stop:
            i = text.find(s)
            if i >= 0:
                safe = min(safe, i)
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        out = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out

    def full(self, tokens: list[int], reason: str) -> str:
        text = self._decode(tokens)
        if reason == "stop":
            hits = [text.find(s) for s in self.stop if s in text]
            if hits:
                text = text[:min(hits)]
        return text

    def rest(self, tokens: list[int], reason: str) -> str:
        return self.full(tokens, reason)[self.sent:]


_FINISH = {"length": "length", "eos": "stop", "stop": "stop"}


def _failure(server: Server, req) -> APIError:
    if req.finish_reason == "cancelled":
        return APIError(503, "the server is shutting down; the request was not finished", code="shutting_down")
    if isinstance(req.error, DeltaNameError):
        return not_found(req.delta)
    log.error("request for %r failed: %s", req.delta, req.error)
    return APIError(500, f"the model `{req.delta}` could not be loaded; the server keeps serving the others",
                    code="model_load_failed")


def _sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n"


# --- the app -----------------------------------------------------------------------------------------------------
def create_app(server: Server) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.runner.start()
        try:
            yield
        finally:
            server.closing = True
            await asyncio.to_thread(server.runner.stop, server.drain_timeout)

    app = FastAPI(title="deltatune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = server.metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(422, "the request does not fit the endpoint's schema"), status_code=422)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s", request.url.path)
        return JSONResponse(error_body(500, "internal server error"), status_code=500)

    # --- operations --------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if server.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        _admin(server, request)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        entry = _caller(server, request)
        data = []
        if entry is None or entry.base:
            data.append({"id": server.base_name, "object": "model", "created": server.started, "owned_by": "deltatune",
                         "root": server.base_name, "parent": None})
        for name in server.delta_names():
            if entry is None or entry.may_use(name, server.base_name):
                data.append({"id": name, "object": "model", "created": server.registry.loaded_at.get(name, 0),
                             "owned_by": "deltatune", "root": name, "parent": server.base_name})
        return JSONResponse({"object": "list", "data": data})

    # --- admin: hot load / unload (vLLM's endpoint names) -------------------------------------------------------
    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> Response:
        _admin(server, request)
        body = parse(await _body(request, server.max_body_bytes), LoadBody)
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(server.registry.load, body.lora_name, body.lora_path)
        except (DeltaTuneError, OSError) as e:
            metrics.adapter_loads.labels("refused").inc()
            text = str(e) if isinstance(e, DeltaTuneError) else (e.strerror or "the path cannot be read")
            raise APIError(400, f"delta {body.lora_name!r} was not loaded: {text}", param="lora_path",
                           code="invalid_delta") from None
        try:  # into a device slot now, so the first request does not pay for it
            await asyncio.to_thread(server.engine.preload, body.lora_name)
        except StateError:
            pass  # every fitting slot is pinned: the first request loads it
        except (DeltaTuneError, OSError) as e:  # its tensors are bad although its header was fine
            await asyncio.to_thread(server.registry.unload, body.lora_name)
            metrics.adapter_loads.labels("refused").inc()
            text = str(e) if isinstance(e, DeltaTuneError) else (e.strerror or "the delta cannot be read")
            raise APIError(400, f"delta {body.lora_name!r} was not loaded: {text}", param="lora_path",
                           code="invalid_delta") from None
        metrics.load_latency.observe(time.perf_counter() - t0)
        metrics.adapter_loads.labels("loaded").inc()
        return PlainTextResponse(f"Success: delta '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> Response:
        _admin(server, request)
        body = parse(await _body(request, server.max_body_bytes), UnloadBody)
        try:
            await asyncio.to_thread(server.registry.unload, body.lora_name)
        except KeyError:
            raise not_found(body.lora_name) from None
        metrics.adapter_unloads.inc()
        return PlainTextResponse(f"Success: delta '{body.lora_name}' removed successfully.")

    # --- generation --------------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, chat=True)

    def _prompts(body, chat: bool) -> list[list[int]]:
        tok = server.tokenizer
        if chat:
            if getattr(tok, "chat_template", None) is None:
                raise APIError(400, "the base model's tokenizer has no chat template; use /v1/completions",
                               code="no_chat_template")
            try:
                text = tok.apply_chat_template(chat_text(body.messages), add_generation_prompt=True, tokenize=False)
            except APIError:
                raise
            except Exception as e:  # noqa: BLE001 - a template's own refusal (raise_exception) of these messages
                raise APIError(400, f"the chat template refused these messages: {str(e)[:300]}",
                               param="messages") from None
            return [tok(text, add_special_tokens=False)["input_ids"]]
        p = body.prompt
        if isinstance(p, str):
            prompts: list = [p]
        elif p and all(isinstance(t, int) for t in p):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts or len(prompts) > server.max_prompts:
            raise APIError(400, f"prompt must hold 1 to {server.max_prompts} prompts", param="prompt",
                           code="invalid_value")
        out = []
        vocab = len(tok)
        for q in prompts:
            ids = tok(q)["input_ids"] if isinstance(q, str) else list(q)
            if not ids:
                raise APIError(400, "a prompt must not be empty", param="prompt", code="invalid_value")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"a token id of the prompt is outside the vocabulary [0, {vocab})",
                               param="prompt", code="invalid_value")
            out.append(ids)
        return out

    async def _generate(request: Request, chat: bool) -> Response:
        if server.closing:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        entry = _caller(server, request)
        body = parse(await _body(request, server.max_body_bytes), ChatBody if chat else CompletionBody)
        model = body.model
        if not _may_use(server, entry, model):
            raise not_found(model)
        prompts = _prompts(body, chat)
        samplings = [sampling_of(body, len(p), server.context, server.default_max_tokens) for p in prompts]
        if body.stream and len(prompts) > 1:
            raise APIError(400, "streaming takes one prompt per request", param="prompt", code="invalid_value")
        prompt_tokens = sum(len(p) for p in prompts)
        if entry is not None:
            over = server.limiter.admit(entry, prompt_tokens)
            if over is not None:
                metrics.requests.labels(model, "rate_limited").inc()
                raise APIError(429, over, code="rate_limit_exceeded", headers={"retry-after": "60"})
        delta = None if model == server.base_name else model
        loop = asyncio.get_running_loop()
        handles = []
        for p, s in zip(prompts, samplings):
            h = Handle(loop, metrics, model)
            server.runner.submit(p, delta, s, h)
            handles.append(h)
        metrics.tokens.labels(model, "prompt").inc(prompt_tokens)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        texts = [_Text(server.tokenizer, s.stop) for s in samplings]

        def account(reqs: list, status: str) -> None:
            completion = sum(len(r.tokens) for r in reqs if r is not None)
            metrics.tokens.labels(model, "completion").inc(completion)
            metrics.requests.labels(model, status).inc()
            if entry is not None:
                server.limiter.used(entry, completion)

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(handles[0], texts[0], model, rid, created, chat, include_usage,
                                             len(prompts[0]), account),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        metrics.inflight.inc()
        try:
            done = await _wait_all(request, handles)
        finally:
            metrics.inflight.dec()
        if done is None:
            account([h.request for h in handles], "cancelled")
            return Response(status_code=499)  # nobody is listening
        for r in done:
            if isinstance(r, BaseException):
                account([], "error")
                raise APIError(500, "the request failed inside the engine", code="engine_error")
            if r.finish_reason not in _FINISH:
                account(done, "error" if r.finish_reason == "error" else "cancelled")
                raise _failure(server, r)
        account(done, "ok")
        completion = sum(len(r.tokens) for r in done)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion}
        if chat:
            r = done[0]
            choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0].full(r.tokens, r.finish_reason)},
                        "logprobs": None, "finish_reason": _FINISH[r.finish_reason]}]
            return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                                 "choices": choices, "usage": usage})
        choices = [{"index": i, "text": texts[i].full(r.tokens, r.finish_reason), "logprobs": None,
                    "finish_reason": _FINISH[r.finish_reason]} for i, r in enumerate(done)]
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": choices, "usage": usage})

    async def _wait_all(request: Request, handles: list[Handle]) -> list | None:
        """Each handle's finished Request (or exception), or None when the client disconnected first (every
        handle is then cancelled)."""
        async def one(h: Handle):
            while True:
                kind, value = await h.queue.get()
                if kind == "done":
                    return value
                if kind == "error":
                    return value

        async def gone() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        work = asyncio.ensure_future(asyncio.gather(*(one(h) for h in handles)))
        watch = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            for h in handles:
                h.cancel()
            raise
        finally:
            watch.cancel()
        if work.done():
            return work.result()
        work.cancel()
        for h in handles:
            h.cancel()
        return None

    async def _stream(h: Handle, text: _Text, model: str, rid: str, created: int, chat: bool, include_usage: bool,
                      prompt_tokens: int, account) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if piece is not None:
                    delta["content"] = piece
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return out

        finished = False
        metrics.inflight.inc()
        try:
            if chat:
                yield _sse(chunk("", None, first=True))
            while True:
                kind, value = await h.queue.get()
                if kind == "token":
                    piece = text.push(value)
                    if piece:
                        yield _sse(chunk(piece, None))
                    continue
                finished = True
                if kind == "error" or value.finish_reason not in _FINISH:
                    account([h.request], "error")
                    e = _failure(server, value) if kind == "done" else APIError(500, "the request failed inside "
                                                                                     "the engine", code="engine_error")
                    yield _sse(e.body())
                    yield _sse(b"[DONE]")
                    return
                r = value
                rest = text.rest(r.tokens, r.finish_reason)
                yield _sse(chunk(rest if rest or not chat else None, _FINISH[r.finish_reason]))
                if include_usage:
                    yield _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(r.tokens),
                                          "total_tokens": prompt_tokens + len(r.tokens)}})
                account([r], "ok")
                yield _sse(b"[DONE]")
                return
        finally:
            metrics.inflight.dec()
            if not finished:  # the client went away (or the server is stopping): free the request's slot now
                h.cancel()
                account([h.request], "cancelled")

    return app
