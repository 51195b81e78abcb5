"""Reliability of `kvc cache-server`: kill -9 cycles and concurrent load; prints one table.

    PYTHONPATH=$PWD python3 benchmarks/bench_reliability.py --cycles 100 --clients 64 --seconds 60

Runs the same code as tests/server/test_crash_loops.py and tests/server/test_load.py (their
slow versions are these sizes): kill -9 at random points (seed printed) while writers, readers
and a durability tracker run, then restart and check every page; then `--clients` threads of
puts, gets and lookups for `--seconds`, with RSS after warm-up and at the end.
"""
from __future__ import annotations

import argparse
import datetime
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.server.conftest import CacheServer  # noqa: E402
from tests.server.crashloop import run_cycles  # noqa: E402
from tests.server.test_load import MiB, rss_kb, run_mixed_load  # noqa: E402


def crash_rows(cycles: int, seed: int) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        results = run_cycles(CacheServer(Path(tmp), kvc={"disk_size_GB": 0.25}), cycles, seed,
                             report=lambda line: print(line, file=sys.stderr))
    problems = [e for r in results for e in r.errors]
    if problems:
        print("problems:", *problems[:10], sep="\n  ", file=sys.stderr)
    last, lost = results[-1], [r.lost_pages for r in results]
    return [("kill -9 cycles survived", f"{len(results) - bool(problems)} / {cycles}"),
            ("pages read and byte-checked", str(last.reads_checked)),
            ("wrong bytes served", str(last.wrong_bytes)),
            ("durable pages lost", str(last.durable_lost)),
            ("acked pages per cycle (mean)", f"{sum(r.acked_pages for r in results) / len(results):.0f}"),
            ("unflushed pages lost per cycle (mean / max)", f"{sum(lost) / len(lost):.1f} / {max(lost)}")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=100, help="kill -9 cycles (0: only the load)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    if args.cycles:
        rows += crash_rows(args.cycles, seed)
    with tempfile.TemporaryDirectory() as tmp:
        s = CacheServer(Path(tmp), kvc={"cpu_memory_size_GB": 0.05, "disk_size_GB": 0.3},
                        max_inflight_bytes=64 * MiB).start()
        try:
            run_mixed_load(s.port, args.clients, min(args.seconds / 4, 10), seed)
            warm = rss_kb(s.proc.pid), rss_kb(s.proc.pid, "RssAnon")
            c = run_mixed_load(s.port, args.clients, args.seconds, seed + 1,
                               report=lambda line: print(line, file=sys.stderr))
            end = rss_kb(s.proc.pid), rss_kb(s.proc.pid, "RssAnon")
        finally:
            s.stop()
        rows += [(f"load: {args.clients} clients x {args.seconds:.0f} s requests", str(c["requests"])),
                 ("load: errors / refused (RESOURCE_EXHAUSTED)", f"{c['errors']} / {c['refused']}"),
                 ("load: RSS after warm-up -> end (MiB)", f"{warm[0] >> 10} -> {end[0] >> 10}"),
                 ("load: anonymous RSS (not the LMDB map) (MiB)", f"{warm[1] >> 10} -> {end[1] >> 10}")]
    print(f"\nkvc reliability, seed {seed}, {date}, commit {commit}\n")
    print(f"| {'measure':<46} | {'value':>16} |\n|{'-' * 48}|{'-' * 18}|")
    for k, v in rows:
        print(f"| {k:<46} | {v:>16} |")


if __name__ == "__main__":
    main()
