"""Two `kvc serve` processes (own disk paths) sharing pages through a real Redis Cluster."""
import threading
import time

import httpx
import openai
import pytest
import redis

from tests.redis_cluster import RedisClusterProcs, redis_cluster, redis_missing  # noqa: F401

from .conftest import metric_value, start_serve

SYSTEM = ("System: you are the support agent of a tiered KV cache; answer from the manual. " * 6)


def complete(base, prompt, max_tokens=4):
    c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
    return c.completions.create(model="tiny-qwen3-moe", prompt=prompt, max_tokens=max_tokens, temperature=0)


def wait_keys(url: str, n: int, timeout: float = 20) -> int:
    c = redis.cluster.RedisCluster.from_url(url)
    try:
        deadline = time.monotonic() + timeout
        while (have := sum(1 for _ in c.scan_iter(match=b"kvc:v1:*"))) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        return have
    finally:
        c.close()


def test_two_servers_share_a_system_prompt_through_the_cluster(tmp_path, tiny_model, redis_cluster):
    extra = ["--cluster-url", redis_cluster.url]
    a, base_a = start_serve(tmp_path, tiny_model, "a", extra=extra)
    b, base_b = start_serve(tmp_path, tiny_model, "b", extra=extra)
    try:
        cold = complete(base_a, SYSTEM + "Question one?")
        full_pages = cold.usage.prompt_tokens // 16
        assert wait_keys(redis_cluster.url, full_pages) >= full_pages  # written behind by A
        warm = complete(base_b, SYSTEM + "Question one?")  # B has never seen it: the cluster has
        assert warm.usage.prompt_tokens_details.cached_tokens >= (full_pages - 1) * 16
        assert warm.choices[0].text == cold.choices[0].text
        assert metric_value(base_b, "kvc_lookup_hit_tokens_total", tier="cluster") >= (full_pages - 1) * 16
        assert metric_value(base_b, "kvc_transfer_bytes_total", dst="cpu", src="cluster") > 0
        # a tenant with its own cache_salt never reuses those pages
        salted = httpx.post(base_b + "/v1/completions", timeout=60, json={
            "model": "tiny-qwen3-moe", "prompt": SYSTEM + "Question one?", "max_tokens": 4,
            "temperature": 0, "cache_salt": "tenant-b"}).json()
        assert salted["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert salted["choices"][0]["text"] == cold.choices[0].text
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow
def test_master_killed_during_traffic(tmp_path, tiny_model):
    why = redis_missing()
    if why:
        pytest.skip(why)
    with RedisClusterProcs(tmp_path / "rc") as rc:
        extra = ["--cluster-url", rc.url]
        a, base_a = start_serve(tmp_path, tiny_model, "a", extra=extra)
        b, base_b = start_serve(tmp_path, tiny_model, "b", extra=extra)
        errors, answered, stop = [], [], threading.Event()

        def traffic(base, tag):
            i = 0
            while not stop.is_set():
                try:
                    complete(base, SYSTEM + f"{tag} question {i}?", max_tokens=2)
                    answered.append(1)
                except Exception as e:  # any non-200 answer
                    errors.append(repr(e))
                i += 1

        threads = [threading.Thread(target=traffic, args=(base, tag)) for base, tag in ((base_a, "a"), (base_b, "b"))]
        try:
            for t in threads:
                t.start()
            time.sleep(3)
            rc.kill(next(m for m in rc.masters() if m != rc.ports[0]))  # rc.url stays up for the checks
            time.sleep(6)
            stop.set()
            for t in threads:
                t.join(timeout=120)
            assert not errors and len(answered) > 4
            rc.wait_ok()  # a replica took over
            deadline = time.monotonic() + 30
            while True:  # reuse through the cluster resumes once kvc's back-off has passed
                prompt = f"After the failover, a new prompt {time.monotonic()}: " + "words " * 60
                cold = complete(base_a, prompt)
                wait_keys(rc.url, 1)
                time.sleep(0.5)
                warm = complete(base_b, prompt)
                assert warm.choices[0].text == cold.choices[0].text
                if warm.usage.prompt_tokens_details.cached_tokens > 0 or time.monotonic() > deadline:
                    break
            assert warm.usage.prompt_tokens_details.cached_tokens > 0
        finally:
            stop.set()
            a.stop()
            b.stop()
