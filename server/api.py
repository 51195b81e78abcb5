"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

Thin handlers: parse and validate the body, hand the prompt to the AsyncEngine, shape the
outputs as OpenAI responses or server-sent events. Every error a client can cause is a 400 with
an OpenAI-style body; nothing leaks a traceback.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .engine_loop import AsyncEngine, Stream
from .protocol import ChatRequest, CompletionRequest

log = logging.getLogger("kvc.server")
CHAT_DEFAULT_MAX_TOKENS = 128
COMPLETION_DEFAULT_MAX_TOKENS = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    return JSONResponse(status_code=status, content={
        "error": {"message": message, "type": type_, "param": param, "code": code}})


def _usage(out) -> dict:
    n_prompt, n_out = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def create_app(engine: AsyncEngine, model_names: list[str], registry: CollectorRegistry) -> FastAPI:
    app = FastAPI(title="kvc", docs_url=None, redoc_url=None)
    served = model_names[0]

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request")
        return _error(400, f"{where}: {msg}" if where else msg, "invalid_request_error", where or None)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.exception("request failed")
        return _error(500, "internal error; see the server log", "server_error")

    @app.get("/health")
    async def health():
        if not engine.alive:
            return _error(503, "the engine loop is not running", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": served, "object": "model", "created": int(app.state.started), "owned_by": "kvc"}]}

    app.state.started = time.time()

    def check_model(name: str) -> None:
        if name not in model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served!r}",
                           "invalid_request_error", "model", "model_not_found")

    async def submit(prompt, params, salt: str | None, http: Request) -> Stream:
        arrival = time.monotonic()  # TTFT counts from here: tokenizing is part of it
        rid = f"{uuid.uuid4().hex}"
        tok = engine.engine.tokenizer
        if isinstance(prompt, str) and tok is not None:
            # Here, on a worker thread, not on the engine's thread: a 32K-token prompt takes
            # 12-60 ms to tokenize the first time, and every running request's next step would wait
            # for it (Tokenizer.encode lets go of the GIL while it works; the pieces it has seen
            # under this cache_salt come from engine.token_cache).
            prompt = await asyncio.to_thread(tok.encode, prompt, salt or "")
        try:
            return await engine.submit(rid, prompt, params, salt or "", arrival)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def until_done(stream: Stream, http: Request):
        """The final output, or None if the client went away first (the request is aborted)."""
        task = asyncio.ensure_future(stream.final())
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await http.is_disconnected():
                task.cancel()
                stream.close()
                return None
        return task.result()

    def sampling(body, default_max: int):
        try:
            return body.sampling(default_max)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        check_model(body.model)
        params = sampling(body, COMPLETION_DEFAULT_MAX_TOKENS)
        prompts = body.prompts()
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            if len(prompts) != 1:
                raise APIError(400, "stream: true takes one prompt per request", param="prompt")
            stream = await submit(prompts[0], params, body.cache_salt, http)
            return StreamingResponse(_stream_completion(stream, cid, created, served, body.include_usage),
                                     media_type="text/event-stream")
        streams = [await submit(p, params, body.cache_salt, http) for p in prompts]
        outs = await asyncio.gather(*(until_done(s, http) for s in streams))
        if any(o is None for o in outs):
            return Response(status_code=499)
        choices = [{"index": i, "text": (p if body.echo and isinstance(p, str) else "") + o.outputs[0].text,
                    "logprobs": None, "finish_reason": o.outputs[0].finish_reason}
                   for i, (p, o) in enumerate(zip(prompts, outs))]
        usage = _usage(outs[0])
        for o in outs[1:]:
            u = _usage(o)
            for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
                usage[k] += u[k]
            usage["prompt_tokens_details"]["cached_tokens"] += u["prompt_tokens_details"]["cached_tokens"]
        return {"id": cid, "object": "text_completion", "created": created, "model": served,
                "choices": choices, "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        check_model(body.model)
        tok = engine.engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer/chat template; use /v1/completions with token ids")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        params = sampling(body, CHAT_DEFAULT_MAX_TOKENS)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream = await submit(prompt, params, body.cache_salt, http)
        if body.stream:
            return StreamingResponse(_stream_chat(stream, cid, created, served, body.include_usage),
                                     media_type="text/event-stream")
        out = await until_done(stream, http)
        if out is None:
            return Response(status_code=499)
        return {"id": cid, "object": "chat.completion", "created": created, "model": served,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.outputs[0].text},
                             "logprobs": None, "finish_reason": out.outputs[0].finish_reason}],
                "usage": _usage(out)}

    return app


async def _stream_completion(stream: Stream, cid: str, created: int, model: str, include_usage: bool):
    sent, last = 0, None
    try:
        async for out in stream:
            last = out
            text = out.outputs[0].text
            delta, sent = text[sent:], len(text)
            chunk = {"id": cid, "object": "text_completion", "created": created, "model": model,
                     "choices": [{"index": 0, "text": delta, "logprobs": None,
                                  "finish_reason": out.outputs[0].finish_reason}]}
            if delta or out.finished:
                yield _sse(chunk)
    except RuntimeError as e:
        yield _sse({"error": {"message": str(e), "type": "server_error"}})
    if include_usage and last is not None:
        yield _sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [], "usage": _usage(last)})
    yield "data: [DONE]\n\n"


async def _stream_chat(stream: Stream, cid: str, created: int, model: str, include_usage: bool):
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]})
    sent, last = 0, None
    try:
        async for out in stream:
            last = out
            text = out.outputs[0].text
            delta, sent = text[sent:], len(text)
            if delta or out.finished:
                yield _sse({**head, "choices": [{"index": 0, "delta": {"content": delta} if delta else {},
                                                 "logprobs": None,
                                                 "finish_reason": out.outputs[0].finish_reason}]})
    except RuntimeError as e:
        yield _sse({"error": {"message": str(e), "type": "server_error"}})
    if include_usage and last is not None:
        yield _sse({**head, "choices": [], "usage": _usage(last)})
    yield "data: [DONE]\n\n"
