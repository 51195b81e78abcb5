"""Two cache services side by side: the same stream puts, gets and lookups against each, alternately.

bench_service compares the service with Redis; this compares two builds (or two environments) of
the service itself in one run, for a change to the service's put path: each variant is a
`kvc cache-server` started from its own checkout (`--variant NAME=PATH`, PATH a git worktree of the
commit to compare) and optionally its own environment (`--env NAME:KEY=VALUE`). Per variant:

  puts / gets   --pages pages of 2 MiB (bench_service's page) through RemoteCache's gRPC stream,
                the variants alternating put by put (then get by get), --reps timed after 2
                untimed: medians of the wall time, the service's CPU seconds and its minor faults
  lookups       (--lookup-load) Lookup of a 32K-token prompt for --load-s seconds while another
                process puts 128 MiB every 0.25 s into the same service (the same put rate for
                every variant): lookups done, p50 / p99 ms

    git worktree add /tmp/before <commit>
    python benchmarks/probe_service_ab.py --variant before=/tmp/before --variant after=. --lookup-load
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import bench_service as bs  # noqa: E402
from kvc.client import RemoteCache  # noqa: E402
from kvc.hashing import Namespace  # noqa: E402

# the load beside the lookups: a process putting 64 pages (128 MiB) every 0.25 s until its time is up
PUTTER = """
import sys, time
sys.path[:0] = [sys.argv[2], sys.argv[2] + "/benchmarks"]
import bench_service as b
r = b.Remote(sys.argv[1], False, 64, 0)
if int(sys.argv[4]):
    r.c.chunk_bytes = int(sys.argv[4])
n, t0 = 0, time.time()
while time.time() - t0 < float(sys.argv[3]):
    a = time.time()
    r.clear()
    r.put()
    n += 1
    time.sleep(max(0.0, 0.25 - (time.time() - a)))
print(n)
"""


def lookups_under_load(url: str, seconds: float, chunk_bytes: int | None) -> tuple[int, float, float, int]:
    ns = Namespace("bench-lookup", bs.LOOKUP_SPEC)
    toks, pages = bs.make_pages(ns, 2048, seed=3)
    c = RemoteCache(url, timeout=30.0)
    try:
        c.put_pages(ns, pages)
        putter = subprocess.Popen([sys.executable, "-c", PUTTER, url, str(HERE.parent), str(seconds + 2.5),
                                   str(chunk_bytes or 0)],
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)  # the putter's first puts
        lat = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a = time.perf_counter()
            assert c.lookup(ns, tokens=toks).num_pages == 2048
            lat.append(time.perf_counter() - a)
        puts = int(putter.communicate(timeout=60)[0])
    finally:
        c.close()
    lat.sort()
    return len(lat), lat[len(lat) // 2] * 1e3, lat[int(0.99 * len(lat))] * 1e3, puts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", action="append", required=True, help="NAME=PATH of a checkout")
    ap.add_argument("--env", action="append", default=[], help="NAME:KEY=VALUE for that variant's service")
    ap.add_argument("--pages", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--chunk-bytes", type=int, default=None, help="the client's payload bytes a message "
                    "(every variant's; default: RemoteCache's)")
    ap.add_argument("--lookup-load", action="store_true")
    ap.add_argument("--load-s", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=2, help="lookup-load rounds (the variants alternate)")
    args = ap.parse_args()
    variants = {}
    for v in args.variant:
        name, _, path = v.partition("=")
        variants[name] = {"repo": Path(path).resolve(), "env": {}}
    for e in args.env:
        name, _, kv = e.partition(":")
        k, _, val = kv.partition("=")
        if name not in variants or not k:
            ap.error(f"--env {e!r}: want NAME:KEY=VALUE with NAME one of {sorted(variants)}")
        variants[name]["env"][k] = val
    print(f"# probe_service_ab  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {os.cpu_count()} cores")
    for name, v in variants.items():
        rev = subprocess.run(["git", "-C", str(v["repo"]), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(v["repo"]), "status", "--porcelain", "-uno"], capture_output=True,
                               text=True).stdout.strip()
        print(f"# {name}: {v['repo']} at {rev}{' + uncommitted changes' if dirty else ''} {v['env'] or ''}")
    with tempfile.TemporaryDirectory() as d:
        procs, paths, urls = {}, {}, {}
        try:
            for name, v in variants.items():
                tmp = Path(d) / name
                tmp.mkdir()
                procs[name], port = bs.start_cache_server(tmp, v["repo"], v["env"])
                urls[name] = f"grpc://127.0.0.1:{port}"
                paths[name] = bs.Remote(urls[name], False, args.pages, procs[name].pid)
                if args.chunk_bytes:
                    paths[name].c.chunk_bytes = args.chunk_bytes
            out = {n: {"put": [], "get": []} for n in variants}
            for rep in range(args.reps + 2):
                for op in ("put", "get"):
                    for name, p in paths.items():
                        if op == "put":
                            p.clear()
                        x = timed(p.put if op == "put" else p.get, p.pid)
                        if rep >= 2:
                            out[name][op].append(x)
            print(f"\n{args.pages} pages of 2 MiB a call, medians of {args.reps} (after 2 untimed), variants "
                  "alternating call by call:\n")
            print("| variant | put s | put: service CPU s | put: service minor faults | get s | get: service CPU s "
                  "| get: service minor faults |\n| --- | --- | --- | --- | --- | --- | --- |")
            for name, r in out.items():
                med = {op: [statistics.median(x[i] for x in r[op]) for i in range(3)] for op in ("put", "get")}
                print(f"| {name} | {med['put'][0]:.3f} | {med['put'][1]:.3f} | {med['put'][2]:,.0f} | "
                      f"{med['get'][0]:.3f} | {med['get'][1]:.3f} | {med['get'][2]:,.0f} |")
            for p in paths.values():
                p.close()
            if args.lookup_load:
                print(f"\nLookup of a 32K-token prompt for {args.load_s:.0f} s beside another process's stream puts "
                      "(128 MiB every 0.25 s), the variants alternating:\n")
                print("| round | variant | lookups | p50 ms | p99 ms | puts of 128 MiB beside |\n"
                      "| --- | --- | --- | --- | --- | --- |")
                for rnd in range(args.rounds):
                    for name, url in urls.items():
                        n, p50, p99, puts = lookups_under_load(url, args.load_s, args.chunk_bytes)
                        print(f"| {rnd + 1} | {name} | {n} | {p50:.2f} | {p99:.2f} | {puts} |")
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(30)


def timed(fn, pid: int) -> tuple[float, float, int]:
    """(seconds, the service's CPU seconds, the service's minor faults) of one fn()."""
    c0, f0 = bs.cpu_seconds(pid), bs.minor_faults(pid)
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    return t, bs.cpu_seconds(pid) - c0, bs.minor_faults(pid) - f0


if __name__ == "__main__":
    main()
