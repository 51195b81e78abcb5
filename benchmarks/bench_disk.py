"""bench_disk: a disk-tier hit against the same device's sequential read (issue 10, item 4).

Writes a prompt's pages to a disk tier (TieredStore with cpu_memory_size_GB: 0, LMDB under --dir)
and a plain file of the same number of bytes, then reads both, with the OS page cache dropped
(`sync; echo 3 > /proc/sys/vm/drop_caches`, needs root) and from the page cache:

  seq read        the file, 8 MiB reads into one buffer (buffered, and with O_DIRECT)
  disk get        TieredStore.get_pages(out=staging) of the whole prompt, in a freshly opened store
                  (a new process's view: nothing of the file mapped yet), bytes checked afterwards
  ... 1 thread    the same read on the caller's thread only (no reader threads)
  ... + promote   with a cpu tier, so every disk hit is also copied into the cpu slab
  LMDB get only   raw py-lmdb get() of every record on one thread (the read itself: get() faults
                  the whole value in), with kernel readahead on and off (the tier's old setting)

Target: cold disk get >= 0.70 of the cold sequential read (the better of buffered and O_DIRECT).
A cold number needs the drop to work; when it does not (not root, a container), the script says
so and prints the warm rows only. --dir must be on the device under test (default: a folder in
the current directory, not /tmp, which may be tmpfs); the filesystem is printed.
Pages: the 12-layer Qwen3-30B-A3B shapes by default (12 x 2 x 16 x 4 x 128 bf16 = 384 KiB).
"""
from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
import tempfile
import time

import lmdb
import numpy as np
import torch
import xxhash

from kvc import disk_tier
from kvc.config import KvcConfig
from kvc.hashing import Namespace, PageSpec, page_hashes
from kvc.record import Page, torch_dtype
from kvc.store import TieredStore, keys_of

GB = 1e9
MiB = 1 << 20
CHUNK = 8 * MiB
TARGET = 0.70


def drop_caches() -> str | None:
    """Drop the OS page cache; None when done, else why not."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return None
    except OSError as e:
        return f"cannot drop the page cache ({e.strerror}: {e.filename}); cold rows skipped"


def where(path: str) -> str:
    """The mount (device, fstype) that holds path, and the device's readahead."""
    best = ("?", "?", "")
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[2]):
                best = (dev, fstype, mnt)
    st = os.stat(path)
    ra = "?"
    for q in (f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/queue/read_ahead_kb",
              f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/../queue/read_ahead_kb"):
        try:
            ra = open(q).read().strip() + " KiB"
            break
        except OSError:
            pass
    return f"{best[0]} ({best[1]} on {best[2]}), readahead {ra}"


def build(path: str, ns: Namespace, n: int, seed: int) -> tuple[list[bytes], list[int], int, int]:
    """Store n pages of a random prompt; (hashes, per-page xxh3 of the payload, data.mdb bytes,
    the disk tier's reader threads)."""
    spec = ns.spec
    toks = np.random.default_rng(seed).integers(0, 150_000, n * spec.page_size, dtype=np.uint32)
    hashes = page_hashes(ns.root, toks, spec.page_size)
    g = torch.Generator().manual_seed(seed)
    sums, parent = [], ns.root
    cfg = KvcConfig(cpu_memory_size_GB=0, disk_path=path, disk_size_GB=n * spec.page_bytes * 1.5 / 2**30 + 0.25)
    with TieredStore(cfg) as s:
        for lo in range(0, n, 64):
            batch = []
            for i in range(lo, min(n, lo + 64)):
                data = torch.empty(spec.page_bytes // 8, dtype=torch.int64).random_(generator=g)
                sums.append(xxhash.xxh3_64_intdigest(data.numpy()))
                batch.append(Page(hashes[i], parent, toks[i * spec.page_size:(i + 1) * spec.page_size],
                                  data.view(torch_dtype(spec.dtype)).reshape(spec.shape)))
                parent = hashes[i]
            assert s.put_pages(ns, batch).stored == len(batch)
        s.flush()
        threads = getattr(s.disk, "reader_threads", 1)  # 1: a version without reader threads
    return hashes, sums, os.path.getsize(os.path.join(path, "lmdb", "data.mdb")), threads


def write_file(path: str, nbytes: int) -> None:
    buf = np.random.default_rng(1).integers(0, 255, CHUNK, dtype=np.uint8)
    with open(path, "wb") as f:
        for off in range(0, nbytes, CHUNK):
            f.write(memoryview(buf)[:min(CHUNK, nbytes - off)])
        f.flush()
        os.fsync(f.fileno())


def seq_read(path: str, direct: bool) -> float:
    """Seconds to read the whole file with 8 MiB reads into one (page-aligned) buffer."""
    buf = mmap.mmap(-1, CHUNK)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        t0 = time.perf_counter()
        while os.readv(fd, [buf]) > 0:
            pass
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()


def disk_get(path: str, ns: Namespace, hashes, sums, out: torch.Tensor, cold: bool, serial: bool = False,
             cpu_gb: float = 0.0) -> float:
    """Seconds for one get_pages of the whole prompt in a freshly opened store; bytes checked."""
    spec = ns.spec
    cfg = KvcConfig(cpu_memory_size_GB=cpu_gb, disk_path=path,
                    disk_size_GB=len(hashes) * spec.page_bytes * 1.5 / 2**30 + 0.25)
    old = getattr(disk_tier, "PARALLEL_MIN_BYTES", None)
    if serial:
        disk_tier.PARALLEL_MIN_BYTES = 1 << 62
    try:
        with TieredStore(cfg) as s:
            if cpu_gb:
                s.cpu.slab_np.fill(0)  # a long-running process's slab: no first-touch faults
            if cold:
                drop_caches()
            t0 = time.perf_counter()
            pages = s.get_pages(ns, hashes, out=out)
            dt = time.perf_counter() - t0
    finally:
        if old is not None:
            disk_tier.PARALLEL_MIN_BYTES = old
    assert len(pages) == len(hashes), f"disk tier served {len(pages)} of {len(hashes)} pages"
    flat = out.view(torch.uint8).reshape(len(hashes), -1).numpy()
    assert [xxhash.xxh3_64_intdigest(flat[i]) for i in range(len(hashes))] == sums, "wrong bytes"
    return dt


def lmdb_gets(path: str, keys, readahead: bool, cold: bool) -> float:
    """Seconds for a raw get() of each record (keys: the tiers' namespaced keys) on one thread (no
    copy, no checksum)."""
    env = lmdb.open(os.path.join(path, "lmdb"), max_dbs=2, readonly=True, lock=False, readahead=readahead)
    try:
        db = env.open_db(b"data", create=False)
        if cold:
            drop_caches()
        t0 = time.perf_counter()
        with env.begin(db=db, buffers=True) as txn:
            for k in keys:
                assert txn.get(k) is not None, "a page the store wrote is not in LMDB under its key"
        return time.perf_counter() - t0
    finally:
        env.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768], help="prompt lengths")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=3, help="repeats per row (best is printed)")
    ap.add_argument("--old-pages", type=int, default=64,
                    help="pages for the readahead-off row (it reads 4 KiB at a time: slow)")
    ap.add_argument("--dir", default=None, help="where the disk tier and the file go (default: ./.bench_disk-*)")
    args = ap.parse_args(argv)
    spec = PageSpec(num_layers=args.layers, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                    page_size=args.page_size, dtype=args.dtype)
    ns = Namespace("bench-disk", spec, weights_digest="bench")
    if args.dir and not os.path.isdir(args.dir):
        ap.error(f"--dir {args.dir}: no such directory (the disk to measure is the one it is on)")
    base = tempfile.mkdtemp(prefix=".bench_disk-", dir=args.dir or ".")
    why = drop_caches()
    cold_ok = why is None
    print(f"dir {base}: {where(base)}; {os.cpu_count()} cpus; "
          f"page {spec.shape} {spec.dtype} = {spec.page_bytes / 1024:.0f} KiB")
    print("page cache: drop works (cold rows are cold)" if cold_ok else f"page cache: {why}")
    t_start = time.perf_counter()
    try:
        for n_tok in args.tokens:
            n = n_tok // spec.page_size
            path = os.path.join(base, f"pages-{n_tok}")
            hashes, sums, mdb, threads = build(path, ns, n, seed=n_tok)
            nbytes = n * spec.page_bytes
            file = os.path.join(base, f"seq-{n_tok}.bin")
            write_file(file, nbytes)
            out = torch.empty((n, *spec.shape), dtype=torch_dtype(spec.dtype))
            out.view(torch.uint8).fill_(0)  # touch: the staging buffer is not what is measured
            rows = []  # (case, cache, seconds over bytes)

            def best(fn, cold, b=nbytes):
                ts = []
                for _ in range(args.reps):
                    if cold:
                        drop_caches()
                    ts.append(fn())
                return b / min(ts) / GB

            for cold in ([True] if cold_ok else []) + [False]:
                cache = "dropped" if cold else "page cache"
                if not cold:
                    seq_read(file, False)  # bring it in
                seq = best(lambda: seq_read(file, False), cold)
                rows.append(("seq read, 8 MiB reads, buffered", cache, seq, None))
                try:
                    seq_d = best(lambda: seq_read(file, True), cold)
                    rows.append(("seq read, 8 MiB reads, O_DIRECT", cache, seq_d, None))
                except OSError as e:  # e.g. tmpfs, some overlay filesystems
                    print(f"O_DIRECT read not possible here ({e.strerror}); buffered read is the reference")
                    seq_d = 0.0
                ref = max(seq, seq_d)
                rows.append(("disk get_pages(out=staging)", cache,
                             best(lambda: disk_get(path, ns, hashes, sums, out, cold), False), ref))
                rows.append(("  ... on 1 thread (no reader threads)", cache,
                             best(lambda: disk_get(path, ns, hashes, sums, out, cold, serial=True), False), ref))
                rows.append(("  ... + promote to a cpu tier", cache,
                             best(lambda: disk_get(path, ns, hashes, sums, out, cold,
                                                   cpu_gb=nbytes * 1.3 / 2**30 + 0.1), False), ref))
                rows.append(("LMDB get() only, 1 thread, readahead on", cache,
                             best(lambda: lmdb_gets(path, keys_of(ns.root, hashes), True, cold), False), ref))
                k = min(n, args.old_pages)
                rows.append((f"LMDB get() only, 1 thread, readahead off ({k} pages)", cache,
                             best(lambda: lmdb_gets(path, keys_of(ns.root, hashes[:k]), False, cold), False,
                                  k * spec.page_bytes), ref))
            print(f"\n{n_tok} tokens = {n} pages = {nbytes / MiB:.0f} MiB (data.mdb {mdb / MiB:.0f} MiB), "
                  f"{threads} disk reader threads   "
                  f"[load average {os.getloadavg()[0]:.2f}]")
            head = f"{'case':<50} {'cache':<11} {'GB/s':>7} {'ratio to seq':>13} {'target':>7} {'result':>6}"
            print(head)
            print("-" * len(head))
            for case, cache, v, ref in rows:
                is_target = case.startswith("disk get_pages") and cache == "dropped"
                ratio = f"{v / ref:.2f}x" if ref else "-"
                verdict = ("PASS" if v / ref >= TARGET else "FAIL") if is_target else "-"
                print(f"{case:<50} {cache:<11} {v:7.2f} {ratio:>13} {f'>={TARGET:.2f}x' if is_target else '-':>7} "
                      f"{verdict:>6}")
            sys.stdout.flush()
            shutil.rmtree(path)
            os.unlink(file)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nratio: to the better of the buffered and O_DIRECT sequential read with the same cache state; "
          f"{time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
