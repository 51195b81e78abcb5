"""The kvc side's Prometheus metrics (names: DESIGN section 11, prefix `kvc_`, base units).

One `KvcMetrics` per store, on a registry that the caller owns (the servers expose it). Hit rate
is a PromQL ratio of the two lookup counters, never a gauge.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BYTES_BUCKETS = None  # default latency buckets are fine for seconds
_LAT_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
                0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class KvcMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.lookup_requests = Counter("kvc_lookup_requests_total", "Prefix lookups by result",
                                       ["result"], registry=r)
        self.lookup_query_tokens = Counter("kvc_lookup_query_tokens_total",
                                           "Prompt tokens asked for in lookups (hit-rate denominator)",
                                           registry=r)
        self.lookup_hit_tokens = Counter("kvc_lookup_hit_tokens_total",
                                         "Contiguous prefix tokens found, by the fastest tier holding them",
                                         ["tier"], registry=r)
        self.store_pages = Counter("kvc_store_pages_total", "Page admissions by tier and result",
                                   ["tier", "result"], registry=r)
        self.store_bytes = Counter("kvc_store_bytes_total", "Bytes written per tier", ["tier"], registry=r)
        self.capacity = Gauge("kvc_tier_capacity_bytes", "Configured budget of a tier", ["tier"], registry=r)
        self.used = Gauge("kvc_tier_used_bytes", "Bytes held by a tier", ["tier"], registry=r)
        self.pages = Gauge("kvc_tier_pages", "Pages held by a tier", ["tier"], registry=r)
        self.evictions = Counter("kvc_evictions_total", "Pages evicted", ["tier", "reason"], registry=r)
        self.transfer_bytes = Counter("kvc_transfer_bytes_total", "Bytes moved between tiers",
                                      ["src", "dst"], registry=r)
        self.transfer_duration = Histogram("kvc_transfer_duration_seconds", "Per-batch move latency",
                                           ["src", "dst"], buckets=_LAT_BUCKETS, registry=r)
        self.checksum_failures = Counter("kvc_checksum_failures_total",
                                         "Pages that failed verification (served as a miss)",
                                         ["tier"], registry=r)
        self.collisions = Counter("kvc_hash_collisions_total",
                                  "Puts or hits whose key matched but parent or tokens did not", registry=r)
        self.disk_errors = Counter("kvc_disk_errors_total", "LMDB and filesystem failures",
                                   ["op", "kind"], registry=r)
        self.degraded = Gauge("kvc_degraded", "1 while a tier is bypassed", ["component"], registry=r)
        self.lmdb_map_size = Gauge("kvc_lmdb_map_size_bytes", "The disk tier's LMDB map (the file's limit)",
                                   registry=r)
        self.lmdb_used = Gauge("kvc_lmdb_used_bytes", "The disk tier's LMDB file up to its last used page "
                               "(its high-water mark: freed pages inside are reused, the file never shrinks)",
                               registry=r)
        self.disk_free = Gauge("kvc_disk_filesystem_free_bytes", "Free space of the filesystem under kvc.disk_path",
                               registry=r)
        self.quarantines = Counter("kvc_quarantines_total", "Disk tier moved aside", ["reason"], registry=r)
        self.pinned_pages = Gauge("kvc_pinned_pages", "Pages held by leases", registry=r)
        self.forced_unpins = Counter("kvc_forced_unpins_total", "Leases released by their TTL", registry=r)
        self.rpc_duration = Histogram("kvc_rpc_duration_seconds", "Server handling time per RPC",
                                      ["method"], buckets=_LAT_BUCKETS, registry=r)
        self.rpc_in_flight = Gauge("kvc_rpc_in_flight", "Cache-server calls admitted and not finished",
                                   registry=r)
        self.inflight_refused = Counter("kvc_inflight_refused_total",
                                        "Calls refused at server.max_inflight_bytes", ["method"], registry=r)
        self.lookup_duration = Histogram("kvc_lookup_duration_seconds", "In-process lookup latency",
                                         buckets=_LAT_BUCKETS, registry=r)
        self.cluster_calls = Histogram("kvc_cluster_call_duration_seconds",
                                       "Cluster tier round trips (one pipeline per call)", ["op"],
                                       buckets=_LAT_BUCKETS, registry=r)
        self.cluster_errors = Counter("kvc_cluster_errors_total",
                                      "Cluster tier failures and timeouts (served as misses)", ["op", "kind"],
                                      registry=r)
        # Create the labelled series up front so that rate() sees their first event after a start.
        for tier in ("cpu", "disk"):  # the cluster tier creates its own series when configured
            self.lookup_hit_tokens.labels(tier=tier)
            self.checksum_failures.labels(tier=tier)
            self.evictions.labels(tier=tier, reason="capacity")
            self.store_bytes.labels(tier=tier)
        for result in ("hit", "partial", "miss"):
            self.lookup_requests.labels(result=result)
        self.transfer_bytes.labels(src="disk", dst="cpu")
        self.transfer_bytes.labels(src="cpu", dst="disk")
