"""Engine-side Prometheus metrics (DESIGN section 11) and the device tier's gauges.

The device tier's `kvc_tier_*{tier="device"}` series go on the store's KvcMetrics when one is
given (it owns those names); otherwise the engine registers the gauges itself.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvc.metrics import KvcMetrics

_TTFT = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None, kvc_metrics: KvcMetrics | None):
        r = registry if registry is not None else CollectorRegistry()
        self.prompt_tokens = Counter("kvc_request_prompt_tokens_total", "Prompt tokens of admitted requests", registry=r)
        self.cached_tokens = Counter("kvc_request_cached_tokens_total",
                                     "Prompt tokens whose KV was reused (device or host tiers)", registry=r)
        self.ttft = Histogram("kvc_time_to_first_token_seconds", "Arrival to first output token",
                              buckets=_TTFT, registry=r)
        self.tpot = Histogram("kvc_time_per_output_token_seconds", "Time between output tokens",
                              buckets=_TPOT, registry=r)
        self.preemptions = Counter("kvc_engine_preemptions_total", "Requests preempted (recompute)", registry=r)
        if kvc_metrics is not None:
            self.capacity, self.used, self.pages = kvc_metrics.capacity, kvc_metrics.used, kvc_metrics.pages
            hits = kvc_metrics.lookup_hit_tokens
        else:
            self.capacity = Gauge("kvc_tier_capacity_bytes", "Configured budget of a tier", ["tier"], registry=r)
            self.used = Gauge("kvc_tier_used_bytes", "Bytes held by a tier", ["tier"], registry=r)
            self.pages = Gauge("kvc_tier_pages", "Pages held by a tier", ["tier"], registry=r)
            hits = Counter("kvc_lookup_hit_tokens", "Contiguous prefix tokens found, by the fastest tier "
                           "holding them", ["tier"], registry=r)
        # Prompt tokens the device pool already held at admission (the engine's own lookup; the
        # host tiers count theirs in the store, from page 0, which may overlap these).
        self.device_hit_tokens = hits.labels(tier="device")
        # The rates behind kvc.load_policy: auto (engine.load_policy), measured online.
        self.prefill_rate = Gauge("kvc_engine_prefill_tokens_per_second",
                                  "Measured prefill rate (EWMA over steps of mostly prefill)", registry=r)
        # Puts are best-effort: an offer is dropped when the put queue or the pinned ring is full.
        self.dropped_puts = Counter("kvc_engine_dropped_put_pages_total",
                                    "Pages offered to the host tiers and dropped (put queue or buffer full)", registry=r)
        self._dropped_seen = 0
        # Who did the put work (engine.host_tier's "engine" gate): the engine's thread in its waits
        # for the GPU, the same thread past the GPU when starved, or the put thread.
        pieces = Counter("kvc_engine_put_pieces_total", "Pieces of put work (up to 32 pages of the host "
                         "tiers' bookkeeping each), by the thread and the time they ran in", ["where"], registry=r)
        self._pieces = {w: (pieces.labels(where=w), [0]) for w in ("engine_wait", "engine_forced", "put_thread")}
        requests = Gauge("kvc_engine_requests", "Requests in the engine by state: waiting (admitted, no "
                         "pages yet), loading (their prefix coming from a host tier), running", ["state"], registry=r)
        self._requests = tuple(requests.labels(state=s) for s in ("waiting", "loading", "running"))
        self.load_rate = Gauge("kvc_tier_load_bytes_per_second",
                               "Measured bandwidth of loads from a host tier into the device pool (EWMA)",
                               ["tier"], registry=r)

    def requests(self, waiting: int, loading: int, running: int) -> None:
        for g, n in zip(self._requests, (waiting, loading, running)):
            g.set(n)

    def device_tier(self, capacity_bytes: int, used_pages: int, page_bytes: int) -> None:
        self.capacity.labels(tier="device").set(capacity_bytes)
        self.used.labels(tier="device").set(used_pages * page_bytes)
        self.pages.labels(tier="device").set(used_pages)

    def dropped(self, total: int) -> None:
        """The host tier's running count of dropped pages."""
        if total > self._dropped_seen:
            self.dropped_puts.inc(total - self._dropped_seen)
            self._dropped_seen = total

    def put_pieces(self, engine_wait: int, engine_forced: int, put_thread: int) -> None:
        """The host tier's running counts of pieces of put work."""
        for w, total in (("engine_wait", engine_wait), ("engine_forced", engine_forced), ("put_thread", put_thread)):
            counter, seen = self._pieces[w]
            if total > seen[0]:
                counter.inc(total - seen[0])
                seen[0] = total

    def rates(self, prefill: float | None, tiers: dict[str, float]) -> None:
        if prefill is not None:
            self.prefill_rate.set(prefill)
        for tier, bw in tiers.items():
            self.load_rate.labels(tier=tier).set(bw)
