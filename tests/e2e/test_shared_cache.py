"""Two `kvc serve` processes sharing one `kvc cache-server`: reuse across engines, outage, return."""
import signal
import time

import openai

from .conftest import Proc, free_port, metric_value, start_serve, wait_port

PROMPT = ("Shared document for retrieval: the cache keeps pages of KV for prompts that repeat. " * 4)

CACHE_YAML = """
kvc: {{cpu_memory_size_GB: 0.125, disk_path: {disk}, disk_size_GB: 0.25}}
server: {{host: 127.0.0.1, grpc_port: {port}, metrics_port: {mport}, rpc_timeout_s: 1.0}}
"""


def start_cache(tmp, port, mport):
    cfg = tmp / "cache.yaml"
    cfg.write_text(CACHE_YAML.format(disk=tmp / "cache-pages", port=port, mport=mport))
    proc = Proc(["cache-server", "--config", str(cfg)], tmp / "cache.log")
    wait_port(port, proc)
    deadline = time.monotonic() + 30
    while "serving" not in proc.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc


def complete(base, prompt):
    c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
    return c.completions.create(model="tiny-qwen3-moe", prompt=prompt, max_tokens=4, temperature=0)


def wait_pages(mbase, n, timeout=20):
    deadline = time.monotonic() + timeout
    while metric_value(mbase, "kvc_tier_pages", tier="cpu") < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return metric_value(mbase, "kvc_tier_pages", tier="cpu")


def test_two_engines_share_pages_and_survive_an_outage(tmp_path, tiny_model):
    port, mport = free_port(), free_port()
    mbase = f"http://127.0.0.1:{mport}"
    cache = start_cache(tmp_path, port, mport)
    url = f"grpc://127.0.0.1:{port}"
    a, base_a = start_serve(tmp_path, tiny_model, "a", extra=["--cache-url", url])
    b, base_b = start_serve(tmp_path, tiny_model, "b", extra=["--cache-url", url])
    try:
        first = complete(base_a, PROMPT)
        full_pages = first.usage.prompt_tokens // 16
        assert wait_pages(mbase, full_pages) >= full_pages
        second = complete(base_b, PROMPT)  # B's device pool is empty: the hit comes from the service
        assert second.usage.prompt_tokens_details.cached_tokens >= (full_pages - 1) * 16
        assert second.choices[0].text == first.choices[0].text

        cache.stop(signal.SIGKILL)  # the service goes away mid-run: recompute, no 5xx
        t0 = time.monotonic()
        down = complete(base_b, "A new prompt while the cache service is down. " * 3)
        assert down.usage.prompt_tokens_details.cached_tokens == 0
        assert time.monotonic() - t0 < 20

        cache = start_cache(tmp_path, port, mport)  # back, on the same disk path
        again = "Another new prompt after the service came back. " * 3
        deadline = time.monotonic() + 20
        while True:  # the client reconnects after its backoff
            complete(base_a, again + str(time.monotonic()))
            if metric_value(mbase, "kvc_tier_pages", tier="cpu") > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        prompt2 = again * 2
        r1 = complete(base_a, prompt2)
        wait_pages(mbase, metric_value(mbase, "kvc_tier_pages", tier="cpu") + r1.usage.prompt_tokens // 16 - 1)
        r2 = complete(base_b, prompt2)
        assert r2.usage.prompt_tokens_details.cached_tokens > 0
        assert r2.choices[0].text == r1.choices[0].text
    finally:
        for p in (a, b):
            p.stop()
        cache.stop()
