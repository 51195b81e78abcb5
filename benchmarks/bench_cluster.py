#!/usr/bin/env python
"""bench_cluster: the cluster tier (Redis Cluster) beside raw redis-py on the same cluster (issue 12).

Measured in one run:

  bandwidth   put: TieredStore(cluster only).put_pages + flush() (records built, pipelined SETs by
              the writer thread) vs raw redis-py pipelined SET of the same record bytes;
              get: get_pages(out=staging) (pipelined GETs, every record verified: header, hash
              chain, checksum; payload copied into the buffer) vs raw pipelined GET of the same
              keys. GB/s of page payload (1e9 B/s); best of --reps. Target: tier >= 0.8x raw.
  ttft        the builtin tiny model on CPU, two engines with their own stores (two "machines"):
              A computes a prompt cold, B (fresh, empty device pool / cpu / disk) then gets its
              prefix from the cluster. Median of --ttft-reps prompts; outputs must be equal.
  lookup      store.lookup(ns, tokens) of a --lookup-tokens prompt (default 32K) whose pages are
              all in the cluster only (header reads, pipelined): p50 / p99.

Without --url it starts a local cluster (3 masters + 3 replicas of Debian's redis-server on
127.0.0.1, scripts/install_redis.sh installs it) in a temp dir and stops it at the end.

    python benchmarks/bench_cluster.py                    # ~1-2 minutes on a 2-core VM
    python benchmarks/bench_cluster.py --quick            # seconds-long smoke run
    python benchmarks/bench_cluster.py --url redis://10.0.0.5:7000 --sections bandwidth,lookup
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from redis.utils import HIREDIS_AVAILABLE

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvc.cluster_tier import page_key  # noqa: E402
from kvc.config import load_config  # noqa: E402
from kvc.hashing import Namespace, PageSpec, page_hashes  # noqa: E402
from kvc.record import Page, encode  # noqa: E402
from kvc.store import TieredStore  # noqa: E402

GB = 1e9
SHAPES = {
    "30B-A3B-MoE": PageSpec(num_layers=48, num_kv_heads=4, head_dim=128, page_size=16, dtype="bfloat16"),
    "small": PageSpec(num_layers=4, num_kv_heads=2, head_dim=64, page_size=16, dtype="bfloat16"),
}


def make_pages(ns: Namespace, n: int, seed: int) -> tuple[list[int], list[bytes], list[Page]]:
    g = torch.Generator().manual_seed(seed)
    P = ns.spec.page_size
    toks = torch.randint(0, 50000, (n * P,), generator=g).tolist()
    hashes = page_hashes(ns.root, toks, P)
    pages, parent = [], ns.root
    for i, h in enumerate(hashes):
        data = torch.randn(ns.spec.shape, generator=g).to(torch.bfloat16)
        pages.append(Page(h, parent, np.asarray(toks[i * P:(i + 1) * P], dtype=np.uint32), data))
        parent = h
    return toks, hashes, pages


def cluster_store(url: str) -> TieredStore:
    return TieredStore(load_config(None, cpu_memory_size_GB=0, disk_path=None, cluster_url=url,
                                   cluster_timeout_s=5.0).kvc)


def client(url: str):
    import redis
    c = redis.Redis.from_url(url)
    enabled = c.info("cluster").get("cluster_enabled", 0)
    c.close()
    return redis.cluster.RedisCluster.from_url(url) if enabled else redis.Redis.from_url(url)


@contextlib.contextmanager
def local_cluster(tool: str):
    """A local 3+3 cluster in a temp dir for a probe script, stopped after; exits 2 without redis."""
    from tests.redis_cluster import RedisClusterProcs, redis_missing
    if redis_missing():
        print(f"{tool}: {redis_missing()}", file=sys.stderr)
        raise SystemExit(2)
    with tempfile.TemporaryDirectory() as tmp:
        procs = RedisClusterProcs(Path(tmp) / "redis", maxmemory="1gb").start()
        try:
            yield procs
        finally:
            procs.stop()


def settle(c, timeout: float = 10.0) -> bool:
    """Wait until every master's replicas are online and at its replication offset (True), or
    timeout (False); a server without replicas is settled at once."""
    import redis
    deadline = time.monotonic() + timeout
    while True:
        if isinstance(c, redis.cluster.RedisCluster):
            got = c.info("replication", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
            infos = [got] if "role" in got else list(got.values())
        else:
            infos = [c.info("replication")]
        if all(v.get("state") == "online" and v.get("offset") == i.get("master_repl_offset")
               for i in infos for k, v in i.items() if k.startswith("slave") and isinstance(v, dict)):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


def _raw_put(c, keys, records) -> None:
    pipe = c.pipeline(transaction=False)
    for k, rec in zip(keys, records):
        pipe.set(k, rec)
    pipe.execute()


def _tier_put(store, ns, pages, n) -> None:
    assert store.put_pages(ns, pages).stored == n
    store.flush()


def _raw_get(c, keys, records) -> None:
    pipe = c.pipeline(transaction=False)
    for k in keys:
        pipe.get(k)
    got = pipe.execute()
    assert all(v is not None and len(v) == len(r) for v, r in zip(got, records))


def _tier_get(store, ns, hashes, out, n) -> None:
    got = len(store.get_pages(ns, hashes, out=out))
    assert got == n, f"the tier returned {got} of {n} pages"


def bandwidth(url: str, spec: PageSpec, n_pages: int, reps: int) -> list[tuple]:
    raw_client = client(url)
    payload = n_pages * spec.page_bytes
    rows = {"put": {"tier": [], "raw": []}, "get": {"tier": [], "raw": []}}
    store = cluster_store(url)
    store.lookup(Namespace("warm-up", spec), tokens=list(range(spec.page_size)))  # connects
    # the gets' destination, its pages faulted in once (an engine's staging buffer is reused too)
    out = torch.zeros((n_pages, *spec.shape), dtype=torch.bfloat16)
    for rep in range(reps):
        ns = Namespace("bench-cluster", spec, weights_digest=f"rep{rep}")
        _, hashes, pages = make_pages(ns, n_pages, seed=rep)
        records = [encode(ns.root, p) for p in pages]
        raw_keys = [b"raw:" + page_key(ns.root, h) for h in hashes]
        raw_client.flushall()
        # raw redis-py and the tier take turns going first; before each timed op the replicas have
        # caught up (a master's writes still on their way to its replica cost the next op CPU)
        ops = [("raw", lambda: _raw_put(raw_client, raw_keys, records)),
               ("tier", lambda: _tier_put(store, ns, pages, n_pages))]
        for who, op in (ops if rep % 2 == 0 else ops[::-1]):
            if not settle(raw_client):
                print("bench_cluster: replicas still behind after 10 s; timing anyway", file=sys.stderr)
            t0 = time.perf_counter()
            op()
            rows["put"][who].append(time.perf_counter() - t0)
        ops = [("raw", lambda: _raw_get(raw_client, raw_keys, records)),
               ("tier", lambda: _tier_get(store, ns, hashes, out, n_pages))]
        for who, op in (ops if rep % 2 == 0 else ops[::-1]):
            if not settle(raw_client):
                print("bench_cluster: replicas still behind after 10 s; timing anyway", file=sys.stderr)
            t0 = time.perf_counter()
            op()
            rows["get"][who].append(time.perf_counter() - t0)
        assert torch.equal(out[-1], pages[-1].data)
    store.close()
    raw_client.flushall()
    raw_client.close()
    table = []
    for op in ("put", "get"):
        tier, raw = min(rows[op]["tier"]), min(rows[op]["raw"])
        table.append((op, n_pages, spec.page_bytes / (1 << 20), payload / tier / GB, payload / raw / GB, raw / tier))
    return table


def lookup_latency(url: str, n_tokens: int, reps: int) -> tuple[float, float, int]:
    spec = SHAPES["small"]
    ns = Namespace("bench-cluster-lookup", spec)
    toks, hashes, pages = make_pages(ns, n_tokens // spec.page_size, seed=7)
    with cluster_store(url) as writer:
        writer.put_pages(ns, pages)
        writer.flush()
    times = []
    with cluster_store(url) as store:
        store.lookup(ns, tokens=toks)  # connects; not counted
        for _ in range(reps):
            t0 = time.perf_counter()
            r = store.lookup(ns, tokens=toks)
            times.append(time.perf_counter() - t0)
            assert r.num_pages == len(hashes), f"lookup found {r.num_pages} of {len(hashes)} pages"
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))], len(hashes)


def ttft(url: str, tmp: Path, prompt_tokens: int, reps: int) -> tuple[float, float, int, int]:
    from engine import LLM, SamplingParams
    common = dict(device="cpu", dtype="float32", cluster_url=url, cpu_memory_size_GB=0.25, disk_size_GB=0.5)
    a = LLM("builtin:tiny-qwen3-moe", disk_path=str(tmp / "a"), **common)
    b = LLM("builtin:tiny-qwen3-moe", disk_path=str(tmp / "b"), **common)
    greedy = SamplingParams(temperature=0, max_tokens=1)
    cold, warm, cached = [], [], []
    try:
        g = torch.Generator().manual_seed(11)
        for rep in range(reps + 1):  # the first pair warms both engines up and is not counted
            prompt = torch.randint(3, 260, (prompt_tokens,), generator=g).tolist()
            t0 = time.perf_counter()
            ra = a.generate(prompt, greedy)[0]
            t_cold = time.perf_counter() - t0
            a.engine.prefix_cache.flush()  # the engine has offered its pages
            a._store.flush()  # and the write-behind has reached the cluster
            t0 = time.perf_counter()
            rb = b.generate(prompt, greedy)[0]
            t_warm = time.perf_counter() - t0
            assert rb.outputs[0].token_ids == ra.outputs[0].token_ids, "cluster hit changed the output"
            if rep:
                cold.append(t_cold)
                warm.append(t_warm)
                cached.append(rb.num_cached_tokens)
    finally:
        a.close()
        b.close()
    return statistics.median(cold), statistics.median(warm), min(cached), prompt_tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="redis://host:port of an existing cluster (default: start a local one)")
    ap.add_argument("--sections", default="bandwidth,ttft,lookup")
    ap.add_argument("--shape", default="30B-A3B-MoE", choices=sorted(SHAPES))
    ap.add_argument("--pages", type=int, default=96, help="pages per bandwidth rep")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lookup-tokens", type=int, default=32768)
    ap.add_argument("--lookup-reps", type=int, default=50)
    ap.add_argument("--ttft-tokens", type=int, default=1024)
    ap.add_argument("--ttft-reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.pages, args.reps, args.lookup_tokens, args.lookup_reps = 8, 1, 2048, 5
        args.ttft_tokens, args.ttft_reps = 128, 1
    sections = set(args.sections.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        tmp = Path(tmp)
        procs = None
        url = args.url
        if url is None:
            from tests.redis_cluster import RedisClusterProcs, redis_missing
            why = redis_missing()
            if why:
                print(f"bench_cluster: {why}", file=sys.stderr)
                return 2
            procs = RedisClusterProcs(tmp / "redis", maxmemory="1gb").start()
            url = procs.url
        try:
            print(f"# bench_cluster  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
                  f"{platform.node()}  {os.cpu_count()} cores  torch {torch.__version__}  "
                  f"cluster {'local 3+3 redis-server' if procs else url}  hiredis parser: {HIREDIS_AVAILABLE}")
            if "bandwidth" in sections:
                spec = SHAPES[args.shape]
                print(f"\n## bandwidth ({args.shape}, best of {args.reps})")
                print("| op | pages | MiB/page | tier GB/s | raw redis-py GB/s | tier / raw |")
                print("|---|---|---|---|---|---|")
                for op, n, mib, t, r, ratio in bandwidth(url, spec, args.pages, args.reps):
                    print(f"| {op} | {n} | {mib:.2f} | {t:.2f} | {r:.2f} | {ratio:.2f} |")
            if "ttft" in sections:
                cold, warm, cached, n = ttft(url, tmp, args.ttft_tokens, args.ttft_reps)
                print(f"\n## TTFT, builtin tiny model on CPU ({n}-token prompt, median of {args.ttft_reps})")
                print("| case | TTFT ms | cached tokens |")
                print("|---|---|---|")
                print(f"| cold (engine A) | {cold * 1e3:.1f} | 0 |")
                print(f"| prefix from the cluster (engine B) | {warm * 1e3:.1f} | {cached} |")
            if "lookup" in sections:
                p50, p99, pages = lookup_latency(url, args.lookup_tokens, args.lookup_reps)
                print(f"\n## lookup of a {args.lookup_tokens}-token prompt held only by the cluster "
                      f"({pages} pages, {args.lookup_reps} lookups)")
                print(f"| p50 ms | p99 ms |\n|---|---|\n| {p50 * 1e3:.2f} | {p99 * 1e3:.2f} |")
        finally:
            if procs is not None:
                procs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
