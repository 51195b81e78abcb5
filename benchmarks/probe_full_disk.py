"""The disk tier on a filesystem smaller than kvc.disk_size_GB (store level, CPU, root).

Mounts a tmpfs of --fs-mb under a temporary folder and runs a TieredStore on it with a disk budget
of --budget-gb (by default far more than the filesystem, the misconfiguration this probes), a cpu
tier of --cpu-mb (write-back: pages go to disk when the cpu tier evicts them) and pages of
--page-kib. It puts --rounds offers of --per fresh pages (one-off prompts: churn), then reads the
last offer back. Printed: the disk budget the tier runs with, commit errors by kind, whether the
tier is degraded at the end, the bytes the cpu tier sent down against the bytes committed (the
close's write-back included), the disk evictions, and how many of the last offer's pages a lookup
finds on disk after a restart.

Run it with another checkout first on the path to compare code (`--repo`).

    sudo python benchmarks/probe_full_disk.py [--fs-mb 24] [--budget-gb 32] [--page-kib 8] [--repo .]
    sudo python benchmarks/probe_full_disk.py --held-mb 16 --refit-every 0.5   # room freed while serving
    python benchmarks/probe_full_disk.py --dir /var/tmp --budget-gb 0.5 --page-kib 384 --per 16 --cpu-mb 64
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fs-mb", type=int, default=24)
    ap.add_argument("--budget-gb", type=float, default=32.0)
    ap.add_argument("--cpu-mb", type=float, default=20.0)
    ap.add_argument("--page-kib", type=int, default=8, help="page payload (the tiny demo model's: 8)")
    ap.add_argument("--per", type=int, default=32, help="pages an offer")
    ap.add_argument("--rounds", type=int, default=600)
    ap.add_argument("--dir", default=None,
                    help="an ordinary folder instead of a tmpfs (no root needed): the file's size against the budget under churn")
    ap.add_argument("--raise-after", type=float, default=None,
                    help="kvc.disk_tier.RAISE_AFTER_S: seconds without MAP_FULL before a lowered budget rises "
                         "a step (default: the tier's own, 60; a huge value: the budget stays lowered, as before)")
    ap.add_argument("--held-mb", type=float, default=0.0,
                    help="another process's file takes this much of the filesystem before the store opens "
                         "(its budget is capped at start), and is deleted after --free-at of the rounds")
    ap.add_argument("--free-at", type=float, default=0.5, help="share of the rounds after which the held file goes")
    ap.add_argument("--refit-every", type=float, default=None,
                    help="kvc.disk_tier.REFIT_EVERY_S: how often a capped budget looks at the filesystem again "
                         "(default: the tier's own, 30 s)")
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent),
                    help="checkout whose kvc is imported")
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.repo))
    import logging

    import numpy as np
    import torch

    from kvc import disk_tier
    from kvc.config import load_config
    from kvc.hashing import Namespace, PageSpec, page_hashes
    from kvc.record import Page
    from kvc.store import TieredStore

    if args.raise_after is not None and hasattr(disk_tier, "RAISE_AFTER_S"):
        disk_tier.RAISE_AFTER_S = args.raise_after
    if args.refit_every is not None and hasattr(disk_tier, "REFIT_EVERY_S"):
        disk_tier.REFIT_EVERY_S = args.refit_every
    logging.basicConfig(level=logging.ERROR, format="  log: %(message).160s")
    spec = PageSpec(num_layers=2, num_kv_heads=2, head_dim=args.page_kib * 8, page_size=4, dtype="float32")
    ns = Namespace("probe", spec, weights_digest="w0")
    tmp = Path(tempfile.mkdtemp(prefix="kvc-full-", dir=args.dir))
    mnt = tmp / "fs"
    mnt.mkdir()
    if args.dir is None:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.fs_mb}m", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"cannot mount a tmpfs (run as root): {r.stderr.strip()}")

    def metric(s, name, **labels):
        return s.metrics.registry.get_sample_value(name, labels) or 0.0

    try:
        cfg = load_config(None, disk_path=str(mnt / "pages"), disk_size_GB=args.budget_gb,
                          cpu_memory_size_GB=args.cpu_mb / 1024).kvc
        g = torch.Generator().manual_seed(0)
        held = mnt / "held-by-another-process"
        if args.held_mb:
            with open(held, "wb") as f:
                f.write(b"\0" * int(args.held_mb * 2**20))
        t0 = time.perf_counter()
        with TieredStore(cfg) as s:
            budget = s.disk.capacity
            for i in range(args.rounds):
                if args.held_mb and i == int(args.rounds * args.free_at):
                    held.unlink()
                toks = list(range(i * args.per * 4, (i + 1) * args.per * 4))
                hashes, parent, pages = page_hashes(ns.root, toks, 4), ns.root, []
                for j, h in enumerate(hashes):
                    pages.append(Page(h, parent, np.asarray(toks[j * 4:(j + 1) * 4], dtype=np.uint32),
                                      torch.randn(spec.shape, generator=g)))
                    parent = h
                s.put_pages(ns, pages)
            s.flush()
            degraded = s.disk.degraded
            file_x = s.disk.file_bytes() / budget
        # closed: the cpu tier was written back; the counters include that
        errors = {k: metric(s, "kvc_disk_errors_total", op="commit", kind=k) for k in ("enospc", "eio", "map_full", "other")}
        down = metric(s, "kvc_transfer_bytes_total", src="cpu", dst="disk")
        stored = metric(s, "kvc_store_bytes_total", tier="disk")
        row = [f"{args.fs_mb} MiB" if args.dir is None else args.dir,
               f"{args.held_mb:g} MiB, freed at offer {int(args.rounds * args.free_at)}" if args.held_mb else "-",
               f"{args.budget_gb:g} GB", f"{budget / 2**20:.1f} / {s.disk.capacity / 2**20:.1f} MiB",
               " ".join(f"{k} {v:.0f}" for k, v in errors.items() if v) or "none", "yes" if degraded else "no",
               f"{down / 2**20:.0f} / {stored / 2**20:.0f} MiB",
               f"{metric(s, 'kvc_evictions_total', tier='disk', reason='capacity'):.0f}", f"{file_x:.2f}x"]
        with TieredStore(cfg) as s:  # a restart: what of the last offer the disk kept
            row.append(f"{s.lookup(ns, tokens=toks).located.count('disk')} of {len(hashes)}")
        row.append(f"{time.perf_counter() - t0:.1f} s")
    finally:
        if args.dir is None:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    head = ["filesystem", "held by another file at start", "disk_size_GB", "budget start / end", "commit errors", "degraded at the end",
            "sent down / committed", "disk evictions", "file / start budget", "last offer after a restart", "time"]
    print(f"kvc from {os.path.abspath(args.repo)}; {args.rounds} offers of {args.per} pages of {args.page_kib} KiB, "
          f"cpu tier {args.cpu_mb:g} MiB; a lowered budget rises after "
          f"{getattr(disk_tier, 'RAISE_AFTER_S', float('inf')):g} s without MAP_FULL")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
