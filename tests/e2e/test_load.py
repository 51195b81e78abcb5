"""`kvc serve` under hostile bodies and under concurrent clients.

Fuzz: valid requests with one field made wrong (types, huge values, prompts over the model length
or the device pool, too many stop strings, a long cache_salt, non-text content parts): a clear
4xx with an OpenAI error body, nothing admitted (prompt-token counter and tier pages unchanged),
/health stays ok. Load: clients with the official `openai` client, streaming and not, shared
system prompts, salts, 5% bad requests, clients that drop mid-stream: no 5xx for valid requests,
4xx for bad ones, greedy repeats identical, server RSS bounded. Seeds printed.
"""
import os
import random
import threading
import time

import httpx
import openai
import pytest

from .conftest import metric_value, start_serve

MODEL = "tiny-qwen3-moe"
SYSTEMS = ["You are a terse assistant for a hardware team. ", "You answer questions about tiered KV caches. ",
           "You are a careful reviewer of Python code and answer in one line. "]


@pytest.fixture(scope="module")
def serve(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("load")
    proc, base = start_serve(tmp, tiny_model, "load")
    yield proc, base
    proc.stop()


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) >> 10


def bad_body(rng: random.Random) -> tuple[str, dict, str]:
    """(path, body, what) for a request that must get a 4xx."""
    comp = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    cases = [
        ("comp", "max_tokens", "x"), ("comp", "max_tokens", -1), ("comp", "max_tokens", 10 ** 12),
        ("comp", "temperature", "hot"), ("comp", "temperature", 1e308), ("comp", "top_p", 0),
        ("comp", "top_k", -5), ("comp", "seed", "s"), ("comp", "n", 3), ("comp", "stop", ["a", "b", "c", "d", "e"]),
        ("comp", "stop", 5), ("comp", "cache_salt", "s" * 10_000), ("comp", "cache_salt", 7),
        ("comp", "prompt", {}), ("comp", "prompt", ""), ("comp", "prompt", [1, -2]), ("comp", "prompt", [2 ** 40]),
        ("comp", "prompt", list(range(1, 100_001))), ("comp", "prompt", [[1, 2], "x", 3]),
        ("comp", "prompt", [5] * 6000), ("comp", "model", 12), ("comp", "stream", [1]),
        ("comp", "stop_token_ids", ["a"]), ("comp", "logprobs", 5), ("comp", "echo", {"x": 1}),
        ("chat", "messages", []), ("chat", "messages", [{"role": "wizard", "content": "x"}]),
        ("chat", "messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        ("chat", "messages", [{"role": "user", "content": [{"type": "input_audio"}]}]),
        ("chat", "messages", [{"role": "user", "content": 5}]), ("chat", "messages", "hi"),
        ("chat", "max_completion_tokens", 0), ("chat", "messages", [{"content": "no role"}]),
    ]
    kind, field, value = rng.choice(cases)
    body = dict(comp if kind == "comp" else chat)
    body[field] = value
    path = "/v1/completions" if kind == "comp" else "/v1/chat/completions"
    return path, body, f"{kind}.{field}={str(value)[:40]}"


def admitted(base: str) -> tuple:
    return (metric_value(base, "kvc_request_prompt_tokens_total"),
            metric_value(base, "kvc_tier_pages", tier="cpu"), metric_value(base, "kvc_tier_pages", tier="disk"))


@pytest.mark.parametrize("cases", [40, pytest.param(600, marks=pytest.mark.slow)])
def test_http_fuzz_gets_4xx_and_admits_nothing(serve, cases):
    proc, base = serve
    seed = int(os.environ.get("KVC_FUZZ_SEED") or random.randrange(1 << 32))
    print(f"http fuzz seed={seed}")
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=60) as http:
        for i in range(cases):
            before = admitted(base)
            path, body, what = bad_body(rng)
            r = http.post(path, json=body)
            assert 400 <= r.status_code < 500, f"seed {seed} case {i} {what}: {r.status_code} {r.text[:200]}"
            err = r.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error", (what, err)
            assert admitted(base) == before, f"seed {seed} case {i} {what} was rejected but admitted work"
        for raw in (b"{", b"[]", b"null", b"\xff\xfe", b'{"model": "' + b"x" * 100_000 + b'"}'):
            r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (raw[:20], r.status_code)
        assert http.get("/health").json() == {"status": "ok"}
    print(f"http fuzz seed={seed} cases={cases} all 4xx")


def run_http_load(base: str, clients: int, seconds: float, seed: int) -> dict:
    counts = {"requests": 0, "bad": 0, "bad_not_4xx": 0, "dropped": 0, "errors": 0, "mismatch": 0}
    greedy: dict[tuple, str] = {}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int):
        rng = random.Random(seed * 1000 + k)
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
        while time.monotonic() < stop:
            r = rng.random()
            try:
                if r < 0.05:
                    path, body, what = bad_body(rng)
                    resp = httpx.post(base + path, json=body, timeout=60)
                    ok = 400 <= resp.status_code < 500
                    with lock:
                        counts["bad"] += 1
                        counts["bad_not_4xx"] += not ok
                    if not ok:
                        print(f"load: bad request {what} got {resp.status_code}")
                    continue
                system = rng.choice(SYSTEMS)
                question = f"question {rng.randrange(20)}"
                salt = rng.choice([None, "tenant-a", "tenant-b"])
                extra = {"cache_salt": salt} if salt else None
                msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
                if r < 0.15:  # a client that goes away mid-stream
                    s = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=64, temperature=0,
                                                  stream=True, extra_body=extra)
                    for i, _ in enumerate(s):
                        if i >= 2:
                            break
                    s.close()
                    with lock:
                        counts["dropped"] += 1
                    continue
                if r < 0.55:
                    s = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                                  stream=True, extra_body=extra)
                    text = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
                else:
                    text = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                                     extra_body=extra).choices[0].message.content
                key = (system, question)
                with lock:
                    counts["requests"] += 1
                    if greedy.setdefault(key, text) != text:
                        counts["mismatch"] += 1
            except (openai.APIError, httpx.HTTPError) as e:
                with lock:
                    counts["errors"] += 1
                print(f"load error: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 300)
    return counts


@pytest.mark.parametrize("clients,seconds", [(6, 8), pytest.param(64, 60, marks=pytest.mark.slow)])
def test_concurrent_openai_clients(serve, clients, seconds):
    proc, base = serve
    seed = int(os.environ.get("KVC_LOAD_SEED") or random.randrange(1 << 32))
    run_http_load(base, clients, min(seconds / 4, 10), seed)
    warm = rss_mb(proc.p.pid)
    c = run_http_load(base, clients, seconds, seed + 1)
    end = rss_mb(proc.p.pid)
    print(f"serve load seed={seed} clients={clients} seconds={seconds} requests={c['requests']} bad={c['bad']} bad_not_4xx={c['bad_not_4xx']} "
          f"dropped={c['dropped']} errors={c['errors']} greedy_mismatch={c['mismatch']} "
          f"rss_warm_mb={warm} rss_end_mb={end}")
    assert c["errors"] == 0 and c["bad_not_4xx"] == 0 and c["mismatch"] == 0
    assert c["requests"] >= clients
    assert end - warm < 256, f"RSS grew {end - warm} MiB after warm-up"
    assert httpx.get(base + "/health").json() == {"status": "ok"}
