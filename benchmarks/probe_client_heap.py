"""A RemoteCache client's stream gets with glibc's defaults and with server.heap's settings.

An engine that uses a shared cache service (`kvc serve --cache-url`) loads its hits with
RemoteCache.get_pages(out=staging): the pages land in a reused buffer, but every received message
is a fresh 1 MiB allocation, and glibc gives such buffers back to the kernel and faults them in
again on the next load. This starts one `kvc cache-server`, stores --pages pages of 2 MiB
(bench_service's page), and runs the same loads in child processes, alternately: one with glibc's
defaults, one that first calls `server.heap.retain_freed_memory(--trim-mib)` (what `kvc serve`
does when it has a cache URL). Each child times --reps loads after 2 untimed; the table gives the
medians over --rounds children of each kind: wall time a load, the child's CPU, its minor faults.

    python benchmarks/probe_client_heap.py [--pages 128] [--reps 8] [--rounds 3] [--trim-mib 256]
"""
from __future__ import annotations

import argparse
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

CHILD = """
import resource, statistics, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
import torch
import bench_service as b
from kvc.record import torch_dtype
if int(sys.argv[5]):
    from server.heap import retain_freed_memory
    assert retain_freed_memory(int(sys.argv[5]) << 20)
r = b.Remote(sys.argv[2], False, int(sys.argv[3]), 0)
out = torch.empty((len(r.hashes), *r.ns.spec.shape), dtype=torch_dtype(r.ns.spec.dtype))
rows = []
for i in range(int(sys.argv[4]) + 2):
    u0, f0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    assert len(r.c.get_pages(r.ns, r.hashes, out=out)) == len(r.hashes)
    t = time.perf_counter() - t0
    if i >= 2:
        rows.append((t, time.process_time() - u0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
print(*(statistics.median(x[k] for x in rows) for k in range(3)))
r.c.close()
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=128)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trim-mib", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        proc, port = bs.start_cache_server(Path(d))
        url = f"grpc://127.0.0.1:{port}"
        try:
            r = bs.Remote(url, False, args.pages, proc.pid)
            r.clear()
            r.put()  # the children's Remote builds the same pages (same seed) and loads them
            res = {"glibc defaults": [], f"retain_freed_memory({args.trim_mib} MiB)": []}
            for _ in range(args.rounds):
                for name, trim in zip(res, (0, args.trim_mib)):
                    got = subprocess.run([sys.executable, "-c", CHILD, str(HERE.parent), url, str(args.pages),
                                          str(args.reps), str(trim)], capture_output=True, text=True, check=True)
                    res[name].append([float(x) for x in got.stdout.split()])
            r.close()
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"# probe_client_heap  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"\nRemoteCache.get_pages(out=staging) of {args.pages} pages of 2 MiB, children alternating, "
          f"{args.rounds} each, medians of {args.reps} loads a child:\n")
    print("| client | load s (each child) | client CPU s | client minor faults |\n| --- | --- | --- | --- |")
    for name, rows in res.items():
        print(f"| {name} | " + " / ".join(f"{x[0]:.3f}" for x in rows) +
              f" | {statistics.median(x[1] for x in rows):.3f} | {statistics.median(x[2] for x in rows):,.0f} |")


if __name__ == "__main__":
    main()
