"""The HTTP API against requests that broke it: a tiny temperature, huge token ids, a failing engine
loop, stop strings split across a stream, a batch with a bad prompt, malformed bodies, echo, vLLM
options kvc does not do, giant prompts. In-process: a tiny engine, the app through httpx's ASGI
transport, every call under a deadline (a request that hangs fails the test instead)."""
import asyncio
import json
import logging
import threading
import time

import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry

from engine import LLMEngine
from engine.sampling import SamplingParams, sample
from engine.tiny import make_tiny_model, trained_bpe
from engine.tokenizer import Tokenizer
from kvc.config import load_config
from server.api import create_app
from server.engine_loop import AsyncEngine

from .conftest import free_port, wait_until

PROMPT = "Hello world, this is a test of the"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    make_tiny_model(path, "qwen3_moe", num_hidden_layers=1)
    return path


class Api:
    """The app through httpx's ASGI transport, on one event loop in a thread of its own (as under
    uvicorn: the engine loop hands outputs to the loop its requests came from). Every call has a
    deadline: a request that hangs fails the test."""

    def __init__(self, app):
        self.app = app
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    async def _call(self, method, url, **kw) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://kvc") as c:
            return await c.request(method, url, **kw)  # the whole body, a stream's included

    def call(self, method, url, timeout=20.0, **kw) -> httpx.Response:
        done = asyncio.run_coroutine_threadsafe(self._call(method, url, **kw), self._loop)
        try:
            return done.result(timeout)
        finally:
            done.cancel()

    def post(self, url, body, **kw) -> httpx.Response:
        return self.call("POST", url, json=body, **kw)

    def completion(self, **body) -> httpx.Response:
        return self.post("/v1/completions", {"model": "tiny", **body})

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _serve(model_dir):
    cfg = load_config().replace(path=str(model_dir), dtype="float32", device="cpu", gpu_only=True,
                                page_size=4, chunk_size=64, num_device_blocks=256)
    eng = LLMEngine(cfg)
    loop = AsyncEngine(eng)
    api = Api(create_app(loop, ["tiny"], CollectorRegistry()))
    yield api, eng, loop
    loop.shutdown()
    eng.close()
    api.close()


@pytest.fixture
def served(model_dir):
    """An engine of this test's own (it breaks it, or patches it)."""
    yield from _serve(model_dir)


@pytest.fixture(scope="module")
def shared(model_dir):
    yield from _serve(model_dir)


def streamed_text(r: httpx.Response, chat: bool = False) -> tuple[str, str]:
    text, finish = "", None
    for line in r.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for c in json.loads(line[6:])["choices"]:
            text += c["delta"].get("content", "") if chat else c["text"]
            finish = c["finish_reason"] or finish
    return text, finish


def error(r: httpx.Response) -> dict:
    assert set(r.json()) == {"error"}, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, r.text
    return err


# -- 1. a tiny temperature ------------------------------------------------------------------------

def test_tiny_positive_temperature_samples_greedily():
    p = SamplingParams(temperature=1e-320)
    assert p.greedy and SamplingParams(temperature=0).greedy and not SamplingParams(temperature=1e-4).greedy
    logits = torch.tensor([[0.5, 3.0, -1.0], [2.0, 0.0, 1.0]])
    assert sample(logits, [p, SamplingParams(temperature=1e-38)], [None, None]) == [1, 0]
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        SamplingParams(temperature=float("nan"))  # NaN < 0 is false: it passed, and NaN'd the logits


def test_tiny_temperature_request_is_served_and_the_server_lives(served):
    api, _, _ = served
    body = {"max_tokens": 4, "prompt": PROMPT, "ignore_eos": True}
    r = api.completion(temperature=1e-320, **body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == api.completion(temperature=0, **body).json()["choices"][0]["text"]
    assert api.call("GET", "/health").status_code == 200


# -- 2. a dead engine loop, huge token ids, admission errors --------------------------------------

def test_a_dead_engine_loop_answers_503(served, monkeypatch):
    api, eng, loop = served

    def broken_step():
        raise RuntimeError("boom")
    monkeypatch.setattr(eng, "step", broken_step)
    r = api.completion(prompt=[1, 2, 3], max_tokens=2)  # in flight when the loop dies
    assert r.status_code == 503 and "boom" in error(r)["message"], r.text
    assert wait_until(lambda: not loop.alive)
    r = api.completion(prompt=[1, 2, 3], max_tokens=2)
    err = error(r)
    assert r.status_code == 503 and err["type"] == "server_error" and "engine loop" in err["message"]
    assert api.call("GET", "/health").status_code == 503


def test_requests_waiting_in_the_inbox_fail_when_the_loop_dies(served, monkeypatch):
    _, eng, loop = served
    entered, release = threading.Event(), threading.Event()

    def stuck_step():
        entered.set()
        release.wait(10)
        raise RuntimeError("boom")
    monkeypatch.setattr(eng, "step", stuck_step)

    async def go():
        first = await loop.submit("a", [1, 2, 3], SamplingParams(max_tokens=2))
        await asyncio.to_thread(entered.wait, 10)
        second = asyncio.ensure_future(loop.submit("b", [4, 5, 6], SamplingParams(max_tokens=2)))
        await asyncio.sleep(0.1)  # "b" waits in the inbox while step() runs
        release.set()
        with pytest.raises(RuntimeError, match="boom"):
            await first.final()
        with pytest.raises(RuntimeError, match="boom"):
            await second
        with pytest.raises(RuntimeError):
            await loop.submit("c", [7], SamplingParams(max_tokens=2))
    asyncio.run(asyncio.wait_for(go(), 20))


def test_huge_token_ids_are_a_400_naming_the_field(shared):
    api, eng, loop = shared
    for prompt in ([10 ** 30], [[1, 2], [2 ** 63]], [-1]):
        r = api.completion(prompt=prompt, max_tokens=2)
        err = error(r)
        assert r.status_code == 400 and err["param"] == "prompt" and "token ids" in err["message"], r.text
    r = api.completion(prompt=[1], max_tokens=2, stop_token_ids=[2 ** 40])
    assert r.status_code == 400 and error(r)["param"] == "stop_token_ids", r.text
    with pytest.raises(ValueError, match="token ids"):  # the engine's own check, without the API's
        eng.add_request("x", [1, 10 ** 30], SamplingParams())
    assert loop.alive


def test_any_admission_error_fails_only_its_request(served, monkeypatch):
    api, eng, loop = served
    add = eng.add_request
    calls = []

    def add_once_broken(*a, **k):
        calls.append(a[0])
        if len(calls) == 1:
            raise KeyError("broken")
        return add(*a, **k)
    monkeypatch.setattr(eng, "add_request", add_once_broken)
    r = api.completion(prompt=[1, 2, 3], max_tokens=2)
    assert r.status_code == 500 and error(r)["type"] == "server_error", r.text
    assert loop.alive
    assert api.completion(prompt=[1, 2, 3], max_tokens=2).status_code == 200


def test_a_500_is_logged_once(served, monkeypatch, caplog):
    """Starlette raises a handled 500 on to the server, which logs it: the handler does not too."""
    import uvicorn
    api, eng, _ = served

    def broken(*a, **k):
        raise KeyError("broken")
    monkeypatch.setattr(eng, "add_request", broken)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started)
        with caplog.at_level(logging.ERROR):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=20,
                           json={"model": "tiny", "prompt": [1, 2], "max_tokens": 2})
            assert r.status_code == 500
            time.sleep(0.2)
    finally:
        server.should_exit = True
        thread.join(10)
    tracebacks = [rec for rec in caplog.records if rec.exc_info and isinstance(rec.exc_info[1], KeyError)]
    assert len(tracebacks) == 1, [rec.getMessage() for rec in caplog.records]


# -- 3. stop strings in streams -------------------------------------------------------------------

def test_streams_do_not_leak_the_start_of_a_stop_string(shared):
    """A stop string that arrives over several tokens: the stream must not have sent its start
    (the non-streamed text is cut before it); streamed text equals non-streamed text."""
    api, _, _ = shared
    base = {"model": "tiny", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    for url, extra, key in (("/v1/completions", {"prompt": PROMPT}, "text"),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}, "content")):
        def text(r):
            c = r.json()["choices"][0]
            return (c["message"]["content"] if key == "content" else c["text"]), c["finish_reason"]
        full, _ = text(api.post(url, {**base, **extra}))
        k = len(full) // 2
        cut, why = text(api.post(url, {**base, **extra, "stop": full[k:k + 2]}))
        assert cut == full[:full.index(full[k:k + 2])] and why == "stop"
        for stop in (full[k:k + 2], [full[k:k + 3], "\x00never"], full[k] + "\x00", [full[-2:], full[k:k + 4]]):
            for inc in (False, True):
                body = {**base, **extra, "stop": stop, "include_stop_str_in_output": inc}
                streamed = streamed_text(api.post(url, {**body, "stream": True}), chat=key == "content")
                assert streamed == text(api.post(url, body)), (url, stop, inc)


def test_include_stop_str_in_output(shared):
    api, _, _ = shared
    base = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    full = api.completion(**base).json()["choices"][0]["text"]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    without = api.completion(stop=stop, **base).json()["choices"][0]["text"]
    with_ = api.completion(stop=stop, include_stop_str_in_output=True, **base).json()["choices"][0]["text"]
    assert with_ == without + stop


# -- 4. a batch with a refused prompt -------------------------------------------------------------

def test_a_refused_prompt_in_a_batch_aborts_the_ones_before_it(served, monkeypatch):
    api, eng, _ = served
    added, aborted = [], []
    add, abort = eng.add_request, eng.abort

    def record_add(rid, *a, **k):
        add(rid, *a, **k)
        added.append(rid)

    def record_abort(rid):
        aborted.append(rid)
        return abort(rid)
    monkeypatch.setattr(eng, "add_request", record_add)
    monkeypatch.setattr(eng, "abort", record_abort)
    r = api.completion(prompt=[[1, 2, 3], [1000000]], max_tokens=1000, ignore_eos=True, temperature=0)
    assert r.status_code == 400, r.text
    assert len(added) == 1
    assert wait_until(lambda: added[0] in aborted and not eng.has_unfinished())


# -- 5. error bodies ------------------------------------------------------------------------------

@pytest.mark.parametrize("method,url,kw,status,needle", [
    ("POST", "/v1/chat/completions", {"content": b'{"model": "tiny", ', "headers": JSON},
     400, "the request body is not valid JSON: Expecting property name enclosed in double quotes at character 18"),
    ("POST", "/v1/chat/completions", {"content": b'{"model":"tiny","messages":"\xff"}', "headers": JSON},
     400, "not UTF-8"),
    ("POST", "/v1/chat/completions", {"content": b"[" * 100000 + b"]" * 100000, "headers": JSON},
     400, "nested too deeply"),
    ("POST", "/v1/chat/completions", {"content": b'{"model":"tiny","messages":[]}'},
     400, "Content-Type: application/json"),
    ("POST", "/v1/chat/completions", {"content": b"", "headers": JSON}, 400, "the request body is empty"),
    ("POST", "/v1/chat/completions", {"json": [1]}, 400, "must be a JSON object"),
    ("POST", "/v1/embeddings", {"json": {}}, 404, "Invalid URL (POST /v1/embeddings)"),
    ("GET", "/v1/chat/completions", {}, 405, "method GET is not allowed on /v1/chat/completions (allowed: POST)"),
])
def test_error_bodies_are_openai_shaped_and_clear(shared, method, url, kw, status, needle):
    api, _, _ = shared
    r = api.call(method, url, **kw)
    err = error(r)
    assert r.status_code == status and needle in err["message"], r.text
    assert err["param"] is None and err["type"] == "invalid_request_error"


def test_a_lone_surrogate_is_a_400(shared):
    api, _, _ = shared
    r = api.call("POST", "/v1/completions", content=b'{"model":"tiny","prompt":"a\\ud800b","max_tokens":2}',
                 headers=JSON)
    assert r.status_code == 400 and error(r)["param"] == "prompt" and "surrogate" in error(r)["message"], r.text


# -- 6. echo --------------------------------------------------------------------------------------

def test_echo_token_ids_and_streams(shared):
    api, eng, _ = shared
    base = {"max_tokens": 3, "temperature": 0, "ignore_eos": True, "echo": True}
    plain = api.completion(prompt=[69, 67, 72, 79], **{**base, "echo": False}).json()["choices"][0]["text"]
    r = api.completion(prompt=[69, 67, 72, 79], **base)
    assert r.json()["choices"][0]["text"] == "ECHO" + plain, r.text
    r = api.completion(prompt=[[69, 67], [257, 72]], **base)
    texts = [c["text"] for c in r.json()["choices"]]
    assert texts[0].startswith("EC") and texts[1].startswith("<|im_start|>H"), texts
    streamed, _ = streamed_text(api.completion(prompt="ECHOME", stream=True, **base))
    assert streamed == api.completion(prompt="ECHOME", **base).json()["choices"][0]["text"]
    assert streamed.startswith("ECHOME")
    chat = {"model": "tiny", "echo": True, "messages": [{"role": "user", "content": "x"}]}
    r = api.post("/v1/chat/completions", chat)
    assert r.status_code == 400 and error(r)["param"] == "echo", r.text


# -- 7. vLLM options kvc does not do --------------------------------------------------------------

@pytest.mark.parametrize("name,refused,default", [
    ("skip_special_tokens", False, True),
    ("add_generation_prompt", False, True),
    ("continue_final_message", True, False),
    ("chat_template", "{{ messages }}", None),
    ("chat_template_kwargs", {"enable_thinking": False}, {}),
    ("truncate_prompt_tokens", 5, None),
    ("spaces_between_special_tokens", False, True),
])
def test_vllm_options_that_change_the_output_are_refused(shared, name, refused, default):
    api, _, _ = shared
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    r = api.post("/v1/chat/completions", {**body, name: refused})
    err = error(r)
    assert r.status_code == 400 and err["param"] == name and name in err["message"], r.text
    assert api.post("/v1/chat/completions", {**body, name: default}).status_code == 200


# -- 8. giant prompts -----------------------------------------------------------------------------

def test_a_prompt_too_big_for_any_tokenization_is_refused_before_tokenizing(served, monkeypatch):
    api, eng, _ = served
    limit = eng.tokenizer.max_text_bytes(eng.max_model_len)
    encoded = []
    encode = Tokenizer.encode

    def record(self, text, cache_salt="", add_special_tokens=False):
        encoded.append(len(text))
        return encode(self, text, cache_salt, add_special_tokens)
    monkeypatch.setattr(Tokenizer, "encode", record)
    r = api.completion(prompt="x" * (limit + 1), max_tokens=1)
    err = error(r)
    assert r.status_code == 400 and err["param"] == "prompt" and "bytes" in err["message"], r.text
    r = api.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "é" * limit}]})
    assert r.status_code == 400 and error(r)["param"] == "messages", r.text
    assert encoded == []
    r = api.completion(prompt="x" * (eng.max_model_len + 10), max_tokens=1)  # under the bound: tokenized
    assert r.status_code == 400 and "tokens" in error(r)["message"] and encoded, r.text


@pytest.mark.parametrize("text", ["hello world " * 50, "漢字かな交じり文 " * 40, "🙂🚀" * 60,
                                  "\u1100\u1161\u11a8" * 80, "Ａ𝐀\u212a" * 60, " " * 500, "\x00\x01" * 100],
                         ids=["ascii", "cjk", "emoji", "hangul-jamo", "nfkc-shrinks", "spaces", "controls"])
def test_the_byte_bound_never_refuses_a_prompt_that_fits(tmp_path, model_dir, text):
    """Every text of n tokens has at most n x (bound per token) bytes, for the byte-level tokenizer
    and a trained BPE with Qwen2's NFC normalizer (which composes Hangul jamo: 9 bytes to 3)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, 漢字 かな 🙂 \u1100\u1161\u11a8 ＡＢＣ " * 200)
    (tmp_path / "bpe").mkdir()
    trained_bpe([str(corpus)], 400).save(str(tmp_path / "bpe" / "tokenizer.json"))
    for tok in (Tokenizer(model_dir), Tokenizer(tmp_path / "bpe")):
        per_token = tok.max_text_bytes(1)
        assert per_token is not None
        assert len(text.encode()) <= len(tok.encode(text)) * per_token


def test_no_byte_bound_for_a_tokenizer_that_may_drop_text(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, normalizers, pre_tokenizers
    for setup in (lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Whitespace()),
                  lambda t: setattr(t, "normalizer", normalizers.Strip())):
        hf = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
        setup(hf)
        hf.save(str(tmp_path / "tokenizer.json"))
        assert Tokenizer(tmp_path).max_text_bytes(100) is None
