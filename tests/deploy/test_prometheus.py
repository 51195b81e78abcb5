"""The shipped scrape config, alert rules and dashboard against a live kvc serve + cache-server
scraped by a real Prometheus (all on 127.0.0.1)."""
from __future__ import annotations

import math
import random
import subprocess
import sys
import time

import httpx
import pytest

from .promql import ROOT, alert_exprs, dashboard_targets, exported_names, metric_names, panel_expr, selectors

pytestmark = pytest.mark.prometheus

P = 16  # attn.page_size in the stack's serve config
HIT_PANEL = "Hit rate (token-weighted, 5m)"
BY_TIER_PANEL = "Hit rate: overall and by host tier"

rng = random.Random(7)
SHARED = [rng.randrange(256) for _ in range(10 * P)]  # a 10-page prefix that requests share


def complete(base: str, ids: list[int]) -> dict:
    r = httpx.post(base + "/v1/completions", timeout=60, json={
        "model": "tiny-qwen3-moe", "prompt": ids, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def counter(text: str, name: str, **labels) -> float:
    """The sum of a counter's samples on a /metrics page that carry the given labels."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line[len(name)] not in " {":
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(cond, what: str, timeout: float = 20.0, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def push_out_of_device_pool(base: str) -> None:
    """Three unrelated 19-page requests: the 24-page device pool evicts the shared prefix."""
    for _ in range(3):
        usage = complete(base, [rng.randrange(256) for _ in range(300)])
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0


RAW = {  # the raw counters the hit-rate panels are made of: (query for Prometheus, page, name, labels)
    "prompt": ("sum(kvc_request_prompt_tokens_total)", 0, "kvc_request_prompt_tokens_total", {}),
    "cached": ("sum(kvc_request_cached_tokens_total)", 0, "kvc_request_cached_tokens_total", {}),
    "lookup": ("sum(kvc_lookup_query_tokens_total)", 1, "kvc_lookup_query_tokens_total", {}),
    "hit_cpu": ('sum(kvc_lookup_hit_tokens_total{tier="cpu"}) or vector(0)', 1, "kvc_lookup_hit_tokens_total",
                {"tier": "cpu"}),
}


def settled(stack) -> dict[str, float]:
    """Wait until Prometheus's latest samples equal a direct scrape of both servers; those values."""
    def same():
        pages = stack.scrape()
        direct = {k: counter(pages[page], name, **labels) for k, (_, page, name, labels) in RAW.items()}
        seen = {k: stack.prom.value(q) for k, (q, *_rest) in RAW.items()}
        return direct if seen == direct else None
    return wait_until(same, "Prometheus to scrape the latest counter values")


@pytest.fixture(scope="module")
def driven(stack):
    """Traffic with a shared prefix: device-pool hits, then (twice) hits from the cache-server's cpu tier."""
    prom = stack.prom
    # Both targets up and the engine counters seen at zero before any request, so that rate() over
    # the dashboard's window covers every request.
    wait_until(lambda: prom.value('count(up{job=~"kvc-serve|kvc-cache-server"} == 1)') == 2, "both targets up")
    wait_until(lambda: prom.value("sum(kvc_request_prompt_tokens_total)") == 0.0, "a scrape at zero")

    first = complete(stack.serve_base, SHARED + [rng.randrange(256) for _ in range(20)])
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    second = complete(stack.serve_base, SHARED + [rng.randrange(256) for _ in range(20)])
    assert second["prompt_tokens_details"]["cached_tokens"] == len(SHARED)  # from the device pool
    wait_until(lambda: counter(stack.scrape()[1], "kvc_tier_pages", tier="cpu") >= len(SHARED) // P,
               "the shared prefix's pages in the cache-server")
    for round_ in range(2):
        push_out_of_device_pool(stack.serve_base)
        usage = complete(stack.serve_base, SHARED + [rng.randrange(256) for _ in range(20)])
        assert usage["prompt_tokens_details"]["cached_tokens"] == len(SHARED), f"round {round_}: {usage}"
        # kvc_lookup_hit_tokens_total{tier="cpu"} is born with its first hit: let Prometheus see it
        # before the second, so that rate() has an increase to show.
        settled(stack)
    return settled(stack)


def test_dashboard_hit_rate_equals_the_raw_counters(stack, driven):
    expr = panel_expr(HIT_PANEL)
    assert expr == panel_expr(BY_TIER_PANEL, "overall (engines)")
    hit_rate = stack.prom.value(expr)
    after = settled(stack)
    assert after == driven, "counters moved while the query ran"
    direct = driven["cached"] / driven["prompt"]
    assert driven["cached"] >= 3 * len(SHARED), driven  # one device-pool hit and two cpu-tier hits
    assert hit_rate is not None and hit_rate > 0, hit_rate
    assert math.isclose(hit_rate, direct, rel_tol=1e-6), (hit_rate, direct, driven)


def test_dashboard_hit_rate_by_tier(stack, driven):
    prom, now = stack.prom, time.time()  # both queries at one instant: the same window
    by_tier = {r["metric"]["tier"]: float(r["value"][1])
               for r in prom.query(panel_expr(BY_TIER_PANEL, "host tier {{tier}}"), at=now)}
    all_tiers = prom.value(panel_expr(BY_TIER_PANEL, "host tiers, all"), at=now)
    assert driven["hit_cpu"] >= 2 * len(SHARED), driven
    # nothing reached the disk tier (its series exists from the start, at 0)
    assert set(by_tier) <= {"cpu", "disk"} and by_tier.get("disk", 0) == 0, by_tier
    assert 0 < by_tier["cpu"] <= 1, by_tier
    assert math.isclose(sum(by_tier.values()), all_tiers, rel_tol=1e-9), (by_tier, all_tiers)
    device = prom.value(panel_expr(BY_TIER_PANEL, "device pool"), at=now)
    if 'kvc_lookup_hit_tokens_total{tier="device"}' in stack.scrape()[0]:
        # the device pool's share of prompt tokens: the second request's prefix, at most all reuse
        overall = prom.value(panel_expr(HIT_PANEL), at=now)
        assert device is not None and 0 < device <= overall, (device, overall)


def test_every_dashboard_and_alert_query_runs(stack, driven):
    """Each expression parses and evaluates in Prometheus; a query whose selectors all have
    series in Prometheus shows data."""
    now = time.time()
    has_data = {}
    shown = 0
    for title, expr in dashboard_targets():
        res = stack.prom.query(expr, at=now)
        for sel in selectors(expr):
            if sel not in has_data:
                has_data[sel] = bool(stack.prom.query(f"count({sel})", at=now))
        if all(has_data[sel] for sel in selectors(expr)):
            assert res, f"panel {title!r} shows no data: {expr}"
            shown += 1
    assert shown >= 20, f"only {shown} dashboard queries had data to show"
    for name, expr in alert_exprs():
        stack.prom.query(expr)


def test_alert_rules_load_and_evaluate(stack, driven):
    def healthy():
        groups = httpx.get(stack.prom.base + "/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r["health"] == "ok" for r in rules) else None
    rules = wait_until(healthy, "every alert rule evaluated without error")
    assert sorted(r["name"] for r in rules) == sorted(name for name, _ in alert_exprs())
    firing = [r["name"] for r in rules if r["state"] != "inactive"]
    assert firing == [], f"alerts pending or firing on a healthy stack: {firing}"


def test_dashboard_names_only_exported_metrics(stack, driven):
    exported = set().union(*(exported_names(page) for page in stack.scrape()))
    for title, expr in dashboard_targets():
        missing = metric_names(expr) - exported
        assert not missing, f"panel {title!r} uses metrics no server exports: {sorted(missing)}"
    for name, expr in alert_exprs():
        missing = metric_names(expr) - exported - {"up"}  # `up` is Prometheus's own
        assert not missing, f"alert {name} uses metrics no server exports: {sorted(missing)}"


def test_container_healthcheck_script(stack):
    script = str(ROOT / "deploy" / "healthcheck.py")

    def run(*args):
        return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=30)
    assert run("grpc", f"127.0.0.1:{stack.cache_port}").returncode == 0
    assert run("http", stack.serve_base + "/health").returncode == 0
    from tests.e2e.conftest import free_port
    dead = free_port()
    assert run("grpc", f"127.0.0.1:{dead}").returncode == 1
    assert run("http", f"http://127.0.0.1:{dead}/health").returncode == 1
