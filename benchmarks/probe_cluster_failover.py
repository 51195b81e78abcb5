"""A Redis Cluster master killed under traffic (store level, CPU): how long the cluster tier misses.

Starts a local cluster (3 masters + 3 replicas, node timeout 1 s; Debian's redis-server, see
scripts/install_redis.sh), a TieredStore whose only host tier is that cluster, and a thread that
puts offers of 16 fresh pages and looks up an offer put ~20 offers before, back to back. After
--before seconds it SIGKILLs one master (its replica takes over) and goes on for --after seconds.
Printed for windows of time around the kill: puts and lookups done, their median and longest
latency, and the share of lookups that found their pages (before the kill: 1.0).

    python benchmarks/probe_cluster_failover.py [--before 3] [--after 12]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kvc.config import load_config  # noqa: E402
from kvc.store import TieredStore  # noqa: E402
from tests.kvc.conftest import NS, make_pages  # noqa: E402
from tests.redis_cluster import RedisClusterProcs, redis_missing  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=float, default=3.0)
    ap.add_argument("--after", type=float, default=12.0)
    args = ap.parse_args()
    why = redis_missing()
    if why:
        sys.exit(why)
    logging.basicConfig(level=logging.WARNING, format="  log %(relativeCreated)7.0f ms %(name)s: %(message).150s")
    root = Path(tempfile.mkdtemp(prefix="kvc-failover-"))
    with RedisClusterProcs(root / "rc") as rc:
        cfg = load_config(None, disk_path=None, cpu_memory_size_GB=0, cluster_url=rc.url).kvc
        with TieredStore(cfg) as s:
            puts, looks, chains, stop = [], [], [], threading.Event()

            def work():
                i = 0
                while not stop.is_set():
                    toks = list(range(i * 64, i * 64 + 64))
                    _, pages = make_pages(NS, toks, seed=i)
                    t = time.perf_counter()
                    s.put_pages(NS, pages)
                    s.flush()
                    puts.append((time.monotonic(), time.perf_counter() - t))
                    chains.append(toks)
                    t = time.perf_counter()
                    r = s.lookup(NS, tokens=chains[max(0, len(chains) - 20)])
                    looks.append((time.monotonic(), time.perf_counter() - t, r.num_pages == len(toks) // 4))
                    i += 1

            th = threading.Thread(target=work)
            th.start()
            time.sleep(args.before)
            victim = rc.masters()[0]
            killed = time.monotonic()
            rc.kill(victim)
            time.sleep(args.after)
            stop.set()
            th.join()
    windows = [(-1e9, 0, "before the kill"), (0, 1, "0-1 s after"), (1, 2, "1-2 s"), (2, 4, "2-4 s"),
               (4, 1e9, f"4-{args.after:g} s")]
    print(f"master :{victim} SIGKILLed after {args.before:g} s of traffic (3 masters + 3 replicas, node timeout 1 s)")
    print("| window | puts | put p50 / max ms | lookups | lookup p50 / max ms | lookups that found their pages |")
    print("|---|---|---|---|---|---|")
    for lo, hi, name in windows:
        p = [d * 1e3 for t, d in puts if lo <= t - killed < hi]
        q = [(d * 1e3, ok) for t, d, ok in looks if lo <= t - killed < hi]
        if not p or not q:
            continue
        print(f"| {name} | {len(p)} | {statistics.median(p):.1f} / {max(p):.1f} | {len(q)} | "
              f"{statistics.median(d for d, _ in q):.1f} / {max(d for d, _ in q):.1f} | "
              f"{sum(ok for _, ok in q) / len(q):.2f} |")


if __name__ == "__main__":
    main()
