"""`kvc serve` driven by the official openai client: the API, reuse, salts, restart, errors."""
import time

import httpx
import openai
import pytest

from .conftest import metric_value, start_serve

SYSTEM = ("You are a careful assistant for a team of engineers. Answer in one short sentence, cite the "
          "document you used, and never invent facts. ")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("serve")
    proc, base = start_serve(tmp, tiny_model, "a")
    yield proc, base, tmp
    proc.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, messages, salt=None, **kw):
    extra = {"cache_salt": salt} if salt else None
    return client.chat.completions.create(model="tiny-qwen3-moe", messages=messages, max_tokens=6,
                                          temperature=0, extra_body=extra, **kw)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny-qwen3-moe"]


def test_completion_and_second_request_reuses(client):
    prompt = SYSTEM * 2 + "Question one?"
    a = client.completions.create(model="tiny-qwen3-moe", prompt=prompt, max_tokens=5, temperature=0)
    b = client.completions.create(model="tiny-qwen3-moe", prompt=prompt, max_tokens=5, temperature=0)
    assert a.usage.completion_tokens == 5 and a.choices[0].finish_reason == "length"
    assert b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens - 16
    assert b.choices[0].text == a.choices[0].text  # greedy output is the same cold and warm


def test_streaming_matches_non_streaming(client):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "stream test"}]
    full = chat(client, msgs)
    chunks = list(chat(client, msgs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_streaming_completion(client):
    parts = list(client.completions.create(model="tiny-qwen3-moe", prompt="stream me", max_tokens=4,
                                           temperature=0, stream=True))
    assert parts[-1].choices[0].finish_reason == "length"


def test_multi_turn_cached_tokens_grow(client):
    msgs = [{"role": "system", "content": SYSTEM + "Conversation test."}]
    cached = []
    for turn in range(4):
        msgs.append({"role": "user", "content": f"turn {turn}: tell me more about item {turn}."})
        r = chat(client, msgs)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        msgs.append({"role": "assistant", "content": r.choices[0].message.content})
    assert cached[0] == 0 or cached[0] < cached[1]
    assert all(b > a for a, b in zip(cached, cached[1:])), cached


def test_cache_salts_do_not_share(client):
    msgs = [{"role": "system", "content": SYSTEM + "Salt test."}, {"role": "user", "content": "hi"}]
    a1 = chat(client, msgs, salt="tenant-a")
    a2 = chat(client, msgs, salt="tenant-a")
    b1 = chat(client, msgs, salt="tenant-b")
    assert a1.usage.prompt_tokens_details.cached_tokens == 0
    assert a2.usage.prompt_tokens_details.cached_tokens > 0
    assert b1.usage.prompt_tokens_details.cached_tokens == 0
    assert b1.choices[0].message.content == a1.choices[0].message.content


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "tiny-qwen3-moe", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny-qwen3-moe", "prompt": "x", "n": 2}, 400, "n must be 1"),
    ({"model": "tiny-qwen3-moe", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny-qwen3-moe", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny-qwen3-moe", "prompt": [1, 2, 99999]}, 400, "token ids"),
    ({"model": "tiny-qwen3-moe"}, 400, "prompt"),
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"model": "tiny-qwen3-moe", "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"model": "tiny-qwen3-moe", "prompt": "x", "max_tokens": 10 ** 12}, 400, "max_tokens"),
    # what kvc's sampler does not do is refused, not ignored (the output would not be what was asked)
    ({"model": "tiny-qwen3-moe", "prompt": "x", "frequency_penalty": 0.5}, 400, "penalties are not supported"),
    ({"model": "tiny-qwen3-moe", "prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"model": "tiny-qwen3-moe", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": "tiny-qwen3-moe", "prompt": "x", "suffix": "end"}, 400, "suffix"),
])
def test_bad_requests_get_openai_errors(server, body, status, needle):
    r = httpx.post(server[1] + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra,needle", [
    ({"response_format": {"type": "json_object"}}, "JSON mode"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
      "tool_choice": "required"}, "guided decoding"),
    ({"presence_penalty": 1.0}, "penalties"),
])
def test_chat_options_kvc_does_not_do_are_refused(server, extra, needle):
    body = {"model": "tiny-qwen3-moe", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], **extra}
    r = httpx.post(server[1] + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    # their defaults are accepted, as the official clients send them
    defaults = {"response_format": {"type": "text"}, "tools": [], "presence_penalty": 0, "tool_choice": "none",
                "frequency_penalty": 0.0, "logit_bias": {}, "user": "u"}
    r = httpx.post(server[1] + "/v1/chat/completions", json={**body, **{k: defaults[k] for k in extra}, **defaults},
                   timeout=30)
    assert r.status_code == 200, r.text


def test_malformed_json_and_chat_errors(server):
    r = httpx.post(server[1] + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server[1] + "/v1/chat/completions", json={"model": "tiny-qwen3-moe", "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(server[1] + "/v1/chat/completions", json={
        "model": "tiny-qwen3-moe", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-qwen3-moe", prompt="x", max_tokens=-5)


def _generated(base: str) -> float:
    """Output tokens the engine has produced so far (one TPOT sample per token after the first)."""
    return metric_value(base, "kvc_time_per_output_token_seconds_count")


def _assert_aborted(base: str, long_run_s: float, started: float) -> None:
    """The engine stops producing tokens and frees the request's device pages within a few
    seconds, while the request (sent at `started`, time.monotonic()), left alone, would still be
    running: it needs `long_run_s` at this server's measured rate. (A fixed bound on long_run_s
    failed on a faster machine although the abort worked: what matters is that the checks end
    before the request would have.)"""
    deadline = time.monotonic() + 5
    while metric_value(base, "kvc_tier_used_bytes", tier="device") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric_value(base, "kvc_tier_used_bytes", tier="device") == 0
    before = _generated(base)
    time.sleep(1.0)
    assert _generated(base) == before, "the engine kept generating for a client that went away"
    checked = time.monotonic() - started
    assert checked < long_run_s, (f"the checks took {checked:.1f} s, the request needs only {long_run_s:.1f} s: "
                                  "it may have finished rather than been aborted")


def _rate(base: str) -> float:
    """Tokens per second of this server on one request (to size a request that outlives the test)."""
    t0, n0 = time.monotonic(), _generated(base)
    httpx.post(base + "/v1/completions", timeout=60, json={
        "model": "tiny-qwen3-moe", "prompt": "rate", "max_tokens": 64, "temperature": 0, "ignore_eos": True})
    return (_generated(base) - n0) / (time.monotonic() - t0)


def test_disconnect_aborts_and_frees_pages(server):
    base = server[1]
    max_tokens = 3000
    long_run_s = max_tokens / _rate(base)
    started = time.monotonic()
    with httpx.stream("POST", base + "/v1/completions", timeout=60, json={
            "model": "tiny-qwen3-moe", "prompt": SYSTEM, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    _assert_aborted(base, long_run_s, started)


def test_non_streaming_client_that_goes_away_is_aborted(server):
    """The 499 path: a non-streaming request whose client times out is aborted, not finished."""
    base = server[1]
    max_tokens = 3000
    long_run_s = max_tokens / _rate(base)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", timeout=1.5, json={
            "model": "tiny-qwen3-moe", "prompt": SYSTEM, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True})
    _assert_aborted(base, long_run_s, started)


def test_metrics_and_health(server, client):
    chat(client, [{"role": "user", "content": "metrics"}])
    base = server[1]
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert metric_value(base, "kvc_request_prompt_tokens_total") > 0
    assert metric_value(base, "kvc_request_cached_tokens_total") > 0
    assert metric_value(base, "kvc_time_to_first_token_seconds_count") > 0
    assert metric_value(base, "kvc_tier_capacity_bytes", tier="cpu") == 0.125 * (1 << 30)


def test_restarted_server_reuses_disk_pages(tmp_path, tiny_model):
    prompt = SYSTEM * 3 + "restart test"
    proc, base = start_serve(tmp_path, tiny_model, "r")
    try:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        first = c.completions.create(model="tiny-qwen3-moe", prompt=prompt, max_tokens=4, temperature=0)
    finally:
        assert proc.stop() == 0
    proc, base = start_serve(tmp_path, tiny_model, "r")
    try:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        again = c.completions.create(model="tiny-qwen3-moe", prompt=prompt, max_tokens=4, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16
        assert again.choices[0].text == first.choices[0].text
        assert metric_value(base, "kvc_lookup_hit_tokens_total", tier="disk") > 0
    finally:
        proc.stop()
