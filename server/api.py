"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

Thin handlers: parse and validate the body, hand the prompt to the AsyncEngine, shape the
outputs as OpenAI responses or server-sent events. Every error a client can cause is a 400 with
an OpenAI-style body; nothing leaks a traceback. Every error body, 404 and 405 included, has
OpenAI's shape: {"error": {"message", "type", "param", "code"}}; a dead engine loop is a 503.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException

from kvc.config import ServerConfig

from .engine_loop import AsyncEngine, EngineDead, Stream
from .protocol import ChatRequest, CompletionRequest
from .tool_parser import ToolCallStream, chat_finish_reason, chat_message, template_tool_format

CHAT_DEFAULT_MAX_TOKENS = 128
COMPLETION_DEFAULT_MAX_TOKENS = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers, content={
        "error": {"message": message, "type": type_, "param": param, "code": code}})


def _body_error(request: Request, first: dict) -> str | None:
    """What is wrong with the body as a whole (not JSON, empty, not an object), or None."""
    loc, kind = tuple(first.get("loc", ())), first.get("type")
    if kind == "json_invalid":  # loc: ("body", character offset)
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error')} at character {loc[-1]}"
    if loc != ("body",) or kind not in ("missing", "model_attributes_type", "dict_type"):
        return None
    if kind == "missing":
        return "the request body is empty; send a JSON object"
    if isinstance(first.get("input"), bytes):  # FastAPI parses JSON only under a JSON content type
        ctype = request.headers.get("content-type")
        return (f"the request body must be a JSON object sent with Content-Type: application/json "
                f"(got {f'Content-Type: {ctype}' if ctype else 'no Content-Type'})")
    return f"the request body must be a JSON object, got {type(first.get('input')).__name__}"


def _http_error(request: Request, e: HTTPException) -> str:
    """Starlette's own errors (no route, wrong method, a body it could not read) in words."""
    cause = e.__cause__  # FastAPI raises "There was an error parsing the body" from json.loads' error
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid JSON: not UTF-8 ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the request body is nested too deeply to read as JSON"
    if e.status_code == 404:
        return f"Invalid URL ({request.method} {request.url.path})"
    if e.status_code == 405:
        allowed = {k.lower(): v for k, v in (e.headers or {}).items()}.get("allow")
        return f"method {request.method} is not allowed on {request.url.path} (allowed: {allowed})"
    return str(e.detail)


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets a 413 before the app sees any of it.

    uvicorn reads bodies without a limit. Every route here reads its body whole anyway, so the body
    is read here, counted as it arrives (a Content-Length over the limit is refused before a byte
    of it is read; a chunked body as soon as it passes the limit), and handed to the app in one
    message. Later receive() calls (the app's disconnect checks) go to the server as before.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, f"the request body is {int(declared)} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: the app sees that
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, f"the request body passed {self.max_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        first = [message]

        async def replay():
            return first.pop() if first else await receive()
        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, what: str) -> None:
        response = _error(413, f"{what}; this server takes at most {self.max_bytes} bytes a request "
                               f"(server.max_request_bytes)", "invalid_request_error",
                          code="request_too_large", headers={"connection": "close"})
        await response(scope, receive, send)


def _usage(out) -> dict:
    n_prompt, n_out = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def create_app(engine: AsyncEngine, model_names: list[str], registry: CollectorRegistry,
               max_request_bytes: int = ServerConfig.max_request_bytes) -> FastAPI:
    app = FastAPI(title="kvc", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    served = model_names[0]

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(EngineDead)
    async def _dead(_, e: EngineDead):
        return _error(503, str(e), "server_error")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error(e.status_code, _http_error(request, e), type_, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        whole = _body_error(request, first)
        if whole is not None:
            return _error(400, whole, "invalid_request_error")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        param = (first.get("ctx") or {}).get("param")
        # a message that starts with the field's name already says where (tools[1].function.name ...)
        said = f"{where}: {msg}" if where and not msg.startswith(where) else msg
        return _error(400, said, "invalid_request_error", param or where or None)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        # not logged here: Starlette raises it on to the server, which logs it (uvicorn: "Exception
        # in ASGI application" and the traceback), once
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

    tok = engine.engine.tokenizer
    max_model_len = engine.engine.max_model_len
    # the tool-call format the model's template teaches it (None: kvc cannot read its calls)
    tool_format = template_tool_format(tok) if tok is not None else None
    max_prompt_bytes = tok.max_text_bytes(max_model_len) if tok is not None else None

    def check_text(text: str, param: str) -> None:
        """Refuse a text that is not Unicode, or too long for any tokenization of it to fit, before
        tokenizing it (a 24 MB message took 48 s and 4.5 GB to tokenize, to be refused after)."""
        try:
            size = len(text.encode())
        except UnicodeEncodeError as e:
            raise APIError(400, f"{param}: not valid Unicode: a lone surrogate {text[e.start]!r} "
                           f"at character {e.start}", param=param) from None
        if max_prompt_bytes is not None and size > max_prompt_bytes:
            raise APIError(400, f"{param}: the prompt is {size} bytes of UTF-8, more than {max_model_len} "
                           f"tokens (scheduler.max_model_len) can hold with this tokenizer "
                           f"(at most {max_prompt_bytes} bytes)", param=param)

    async def submit(prompt, params, salt: str | None, param: str, specials: bool = False) -> Stream:
        arrival = time.monotonic()  # TTFT counts from here: tokenizing is part of it
        rid = f"{uuid.uuid4().hex}"
        if isinstance(prompt, str) and tok is not None:
            check_text(prompt, param)
            # Here, on a worker thread, not on the engine's thread: a 32K-token prompt takes
            # 12-60 ms to tokenize the first time, and every running request's next step would wait
            # for it (Tokenizer.encode lets go of the GIL while it works; the pieces it has seen
            # under this cache_salt come from engine.token_cache).
            prompt = await asyncio.to_thread(tok.encode, prompt, salt or "", specials)
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

    def echoed(prompt) -> str:
        """The prompt as text, for echo: the text sent, or the token ids decoded."""
        if isinstance(prompt, str):
            return prompt
        if tok is None:
            raise APIError(400, "echo: this model has no tokenizer to decode a token-id prompt with",
                           param="echo")
        return tok.decode(prompt, skip_special_tokens=False)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        check_model(body.model)
        params = sampling(body, COMPLETION_DEFAULT_MAX_TOKENS)
        prompts = body.prompts()
        echo = [echoed(p) if body.echo else "" for p in prompts]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            if len(prompts) != 1:
                raise APIError(400, "stream: true takes one prompt per request", param="prompt")
            stream = await submit(prompts[0], params, body.cache_salt, "prompt", body.add_special_tokens)
            return StreamingResponse(_stream_completion(stream, cid, created, served, body.include_usage,
                                                        _hold(params), echo[0]),
                                     media_type="text/event-stream")
        streams = []
        try:
            for p in prompts:
                streams.append(await submit(p, params, body.cache_salt, "prompt", body.add_special_tokens))
        except BaseException:  # a later prompt refused: the earlier ones would run for nobody
            for s in streams:
                s.close()
            raise
        outs = await asyncio.gather(*(until_done(s, http) for s in streams))
        if any(o is None for o in outs):
            return Response(status_code=499)
        choices = [{"index": i, "text": e + o.outputs[0].text,
                    "logprobs": None, "finish_reason": o.outputs[0].finish_reason}
                   for i, (e, o) in enumerate(zip(echo, outs))]
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
        if body.parse_tools and tool_format is None:
            raise APIError(400, "tools: this model's chat template has no tool-call format kvc can read "
                           "(kvc reads Hermes-style <tool_call> blocks, which Qwen2.5, Qwen3 and Hermes "
                           'templates ask for); send tool_choice "none" to only show the model the tools',
                           param="tools")
        # the tools as sent, as transformers and vLLM hand them to the template (with tool_choice
        # "none" too: the model still sees them)
        tools = {"tools": body.tools} if body.tools else {}
        try:
            messages = [m.for_template() for m in body.messages]
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, **tools)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        params = sampling(body, CHAT_DEFAULT_MAX_TOKENS)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream = await submit(prompt, params, body.cache_salt, "messages", body.add_special_tokens)
        if body.stream:
            return StreamingResponse(_stream_chat(stream, cid, created, served, body.include_usage, _hold(params),
                                                  body.parse_tools),
                                     media_type="text/event-stream")
        out = await until_done(stream, http)
        if out is None:
            return Response(status_code=499)
        message, finish = chat_message(out.outputs[0].text, out.outputs[0].finish_reason, body.parse_tools)
        return {"id": cid, "object": "chat.completion", "created": created, "model": served,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": _usage(out)}

    return app


def _hold(params) -> int:
    """Characters a stream holds back until its request ends: up to one less than a stop string,
    which may have begun there (the engine cuts it off only once all of it has come)."""
    return max((len(s) for s in params.stop_strings), default=1) - 1


async def _deltas(stream: Stream, hold: int):
    """(new text, output) per output of `stream`, its last `hold` characters held back until the end."""
    sent = 0
    async for out in stream:
        text = out.outputs[0].text
        end = len(text) if out.finished else max(sent, len(text) - hold)
        yield text[sent:end], out
        sent = end


async def _stream_completion(stream: Stream, cid: str, created: int, model: str, include_usage: bool,
                             hold: int, echo: str):
    last = None
    if echo:
        yield _sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": echo, "logprobs": None, "finish_reason": None}]})
    try:
        async for delta, out in _deltas(stream, hold):
            last = out
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


async def _stream_chat(stream: Stream, cid: str, created: int, model: str, include_usage: bool, hold: int,
                       parse_tools: bool = False):
    """The chat stream's events; parse_tools: with the reply's tool calls read out of its text
    (ToolCallStream: content and calls add up to the unstreamed reply's)."""
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]})
    last = None
    calls = ToolCallStream() if parse_tools else None
    try:
        async for delta, out in _deltas(stream, hold):
            last = out
            finish = out.outputs[0].finish_reason
            if calls is None:
                deltas = [{"content": delta}] if delta else []
            else:
                deltas = calls.feed(delta, out.finished)
                finish = chat_finish_reason(finish, calls.calls > 0)
            if out.finished and not deltas:
                deltas = [{}]  # the finish_reason's own chunk
            for i, d in enumerate(deltas):
                yield _sse({**head, "choices": [{"index": 0, "delta": d, "logprobs": None,
                                                 "finish_reason": finish if i == len(deltas) - 1 else None}]})
    except RuntimeError as e:
        yield _sse({"error": {"message": str(e), "type": "server_error"}})
    if include_usage and last is not None:
        yield _sse({**head, "choices": [], "usage": _usage(last)})
    yield "data: [DONE]\n\n"
