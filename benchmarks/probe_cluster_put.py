"""Where the cluster tier's put time goes beside raw redis-py (bench_cluster's bandwidth case).

Starts a local Redis Cluster (3+3), then for --reps rounds of --pages pages of Qwen3-30B-A3B's
shape (1.5 MiB): the records built alone (kvc.record.encode), raw redis-py's pipelined SET of
those records, and a cluster-only TieredStore's put_pages (checks, checksums, records, offers)
until it returns and until flush() (the writer's pipelined SETs) is done.

    python benchmarks/probe_cluster_put.py --reps 4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cluster import SHAPES, client, cluster_store, local_cluster, make_pages, settle  # noqa: E402
from kvc.cluster_tier import page_key  # noqa: E402
from kvc.hashing import Namespace  # noqa: E402
from kvc.record import encode  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=96)
    ap.add_argument("--reps", type=int, default=4)
    a = ap.parse_args()
    spec = SHAPES["30B-A3B-MoE"]
    print("| rep | records built ms | raw SET ms | tier put_pages ms | tier put + flush ms | tier / raw time |")
    print("|---|---|---|---|---|---|")
    with local_cluster("probe_cluster_put") as procs:
        store, raw = cluster_store(procs.url), client(procs.url)
        store.lookup(Namespace("warm-up", spec), tokens=list(range(spec.page_size)))  # connects
        for rep in range(a.reps):
            ns = Namespace("probe", spec, weights_digest=f"rep{rep}")
            _, hashes, pages = make_pages(ns, a.pages, rep)
            raw.flushall()
            settle(raw)
            t = time.perf_counter()
            recs = [encode(ns.root, p) for p in pages]
            built = time.perf_counter() - t
            t = time.perf_counter()
            pipe = raw.pipeline(transaction=False)
            for h, r in zip(hashes, recs):
                pipe.set(b"raw:" + page_key(ns.root, h), r)
            pipe.execute()
            raw_s = time.perf_counter() - t
            settle(raw)  # the raw SETs' replication done before the tier's put is timed
            t = time.perf_counter()
            store.put_pages(ns, pages)
            put = time.perf_counter() - t
            store.flush()
            whole = time.perf_counter() - t
            print(f"| {rep} | {built * 1e3:.0f} | {raw_s * 1e3:.0f} | {put * 1e3:.0f} | {whole * 1e3:.0f} | "
                  f"{whole / raw_s:.2f}x |", flush=True)
        store.close()
        raw.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
