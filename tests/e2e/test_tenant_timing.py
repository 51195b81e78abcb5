"""Tenant timing side channel (the CVE-2025-46570 kind): the TTFT of a prompt that another tenant
(another cache_salt) cached must look like a cold prompt's, while the same tenant's own warm hit
must look faster (so the test can fail). Mann-Whitney U on interleaved samples; a leak (hit vs miss) gives p < 1e-6, so
the bar for "indistinguishable" is p > 0.001 (a false alarm in 1 run of 1000)."""
import random
import time

import httpx
import pytest
from scipy.stats import mannwhitneyu

from .conftest import start_serve

N = 24


def ttft(base: str, prompt: str, salt: str) -> float:
    t0 = time.perf_counter()
    with httpx.stream("POST", base + "/v1/completions", timeout=60, json={
            "model": "tiny-qwen3-moe", "prompt": prompt, "max_tokens": 2, "temperature": 0,
            "stream": True, "cache_salt": salt}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - t0
    raise AssertionError("no token streamed")


@pytest.mark.slow
def test_other_tenants_cache_is_indistinguishable_from_cold(tmp_path, tiny_model):
    proc, base = start_serve(tmp_path, tiny_model, "timing")
    try:
        rng = random.Random(0)
        words = "cache page tier salt tenant prefix token model engine disk".split()

        def prompt(i: int, tag: str) -> str:  # the unique part first: no shared prefix between samples
            return f"{tag} {i}: " + " ".join(rng.choice(words) for _ in range(500))

        for i in range(3):  # warm up the engine's kernels
            ttft(base, prompt(i, "warmup"), "w")
        cross, cold, own = [], [], []
        for i in range(N):
            p = prompt(i, "shared")
            ttft(base, p, "tenant-a")  # A caches p
            order = [("cross", lambda: ttft(base, p, "tenant-b")),
                     ("cold", lambda: ttft(base, prompt(i, "fresh"), "tenant-b")),
                     ("own", lambda: ttft(base, p, "tenant-a"))]
            rng.shuffle(order)
            for name, fn in order:
                {"cross": cross, "cold": cold, "own": own}[name].append(fn())
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        p_cross = mannwhitneyu(cross, cold).pvalue
        p_own = mannwhitneyu(own, cold).pvalue
        print(f"tenant timing (HTTP, n={N}): median TTFT cold {med(cold) * 1e3:.1f} ms, other tenant's "
              f"{med(cross) * 1e3:.1f} ms (p={p_cross:.3f}), own warm {med(own) * 1e3:.1f} ms (p={p_own:.2g})")
        assert p_own < 0.01 and med(own) < med(cold), "own warm hits are not faster: the test cannot tell"
        assert p_cross > 0.001, "another tenant's cached prompt is measurably faster than a cold one"
    finally:
        proc.stop()
