"""What a Redis Cluster master that stops answering (SIGSTOP) does to the cluster tier's calls.

Starts a local Redis Cluster (3+3), then for each way the tier can read replies: a get of 24 pages
(1.5 MiB each) that the cluster holds, and a write batch of 24 new pages (the writer's own `_write`
on the records the store offers, so that the batch holds all 24), each with the master that holds
some of that call's pages paused for the call. Paths: respread's native reader (the tier's default); each
node's replies read through the connection's parser (`respread.read_parsed`: TLS, hiredis, no C
compiler, and every put); redis-py's cluster pipeline for the whole call (how gets without the
native reader and every put went before the forty-third session; here by turning `_direct` off).
The tier's timeout is kvc.cluster_timeout_s's default (0.2 s). Prints a table: ms a call, pages
got / stored / dropped against the pages the paused node holds.

    python benchmarks/probe_cluster_stall.py
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cluster import SHAPES, client, local_cluster, make_pages, settle  # noqa: E402
from kvc import respread  # noqa: E402
from kvc.cluster_tier import page_key  # noqa: E402
from kvc.config import load_config  # noqa: E402
from kvc.hashing import Namespace  # noqa: E402
from kvc.store import TieredStore  # noqa: E402

PAGES = 24


def sample(store, name: str, **labels) -> float:
    return store.metrics.registry.get_sample_value(name, labels) or 0.0


def paused(procs, port: int, fn):
    """fn() with the node at port paused; (ms, its result)."""
    pid = procs.procs[port].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        t = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t) * 1e3, out
    finally:
        os.kill(pid, signal.SIGCONT)


def one_path(procs, raw, name: str, seed: int) -> str:
    store = TieredStore(load_config(None, cpu_memory_size_GB=0, disk_path=None, cluster_url=procs.url).kvc)
    real = respread.library
    try:
        ns = Namespace(f"probe-stall-{seed}", SHAPES["30B-A3B-MoE"])
        _, hashes, pages = make_pages(ns, PAGES, seed)
        assert store.put_pages(ns, pages).stored == PAGES
        store.flush()
        settle(raw)
        c = store.cluster._conn()
        node = {h: c.get_node_from_key(page_key(ns.root, h)).port for h in hashes}
        port = node[hashes[PAGES // 2]]
        on_node = sum(1 for p in node.values() if p == port)
        if name == "parsed":
            respread.library = lambda cc=None: None
        elif name == "pipeline":
            store.cluster._direct = lambda *a, **k: None
        get_ms, got = paused(procs, port, lambda: store.get_pages(ns, hashes))
        deadline = time.monotonic() + 10
        while store.cluster.degraded and time.monotonic() < deadline:
            time.sleep(0.05)
        _, new_hashes, new_pages = make_pages(ns, PAGES, seed + 1000)
        batch = []
        offer = store.cluster.offer
        store.cluster.offer = lambda root, h, rec=None: batch.append((root, h, rec)) or True
        store.put_pages(ns, new_pages)
        store.cluster.offer = offer
        assert len(batch) == PAGES
        new_node = [c.get_node_from_key(page_key(ns.root, h)).port for h in new_hashes]
        port = new_node[PAGES // 2]  # the master holding some of the batch
        new_on_node = new_node.count(port)
        before = {r: sample(store, "kvc_store_pages_total", tier="cluster", result=r) for r in ("stored", "dropped")}
        put_ms, _ = paused(procs, port, lambda: store.cluster._write(batch))
        after = {r: sample(store, "kvc_store_pages_total", tier="cluster", result=r) - before[r] for r in before}
        return (f"| {name} | {get_ms:.0f} | {len(got)} of {PAGES} ({on_node} on the paused node) | {put_ms:.0f} | "
                f"{after['stored']:.0f} / {after['dropped']:.0f} ({new_on_node} on the paused node) |")
    finally:
        respread.library = real
        store.close()


def main() -> int:
    paths = ["native", "parsed", "pipeline"] if respread.library() is not None else ["parsed", "pipeline"]
    print("# a master paused for each call; kvc.cluster_timeout_s 0.2; native reader: "
          f"{'built' if respread.library() is not None else 'not built (its row skipped)'}")
    print("| replies read by | get ms | pages got (the leading run) | put batch ms | stored / dropped |")
    print("|---|---|---|---|---|")
    with local_cluster("probe_cluster_stall") as procs:
        raw = client(procs.url)
        for i, name in enumerate(paths):
            print(one_path(procs, raw, name, seed=10 * i + 1), flush=True)
        raw.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
