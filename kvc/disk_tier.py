"""The disk tier: page records in LMDB at `disk_path`, written by one writer thread.

Layout under disk_path: `kvc.lock` (flock: one process per disk_path) and `lmdb/` with two
databases: `data` (key -> page record) and `meta` (key -> ns_root, parent, seq, size, tokens),
where a key is the store's namespace root + page hash, from which the in-memory index is rebuilt
at start (warm restart). Settings follow DESIGN section 6: writemap off (a full disk is an error,
not SIGBUS), metasync off, map size from the budget, a startup check of the data file against
its last page (a truncated or unreadable environment is moved aside and the tier starts cold,
loudly), reader checks for killed readers.

Reads (read_run): py-lmdb's get() faults in every 4 KiB page of a value with the GIL released
before it returns, so a get *is* the disk read. A run of pages is therefore read on reader
threads, a few consecutive pages per task, each task in its own read transaction: the gets
overlap (the device sees a queue, not one 4 KiB fault at a time), and each page is copied into
the caller's buffer and checksummed from it in cache-sized pieces on the same thread. Kernel
readahead stays on: values are whole runs of contiguous overflow pages read front to back, and
with readahead off every 4 KiB fault is a synchronous read of its own (measured 0.04 GB/s).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

import lmdb
import numpy as np
import xxhash

from .batching import take_batch
from .config import ConfigError
from .gcfree import Untracked
from .record import ChecksumError, RecordError, RecordInfo, decode_header

log = logging.getLogger("kvc.disk")

_META = struct.Struct("<16s16sQQ")  # ns_root, parent, seq, record size; then tokens
LMDB_PAGE = 4096
READER_CHECK_S = 60.0
MAX_BACKLOG_BYTES = 1 << 30  # queued, uncommitted records past which put() refuses (counted)
GATE_EVERY = 16  # records between two calls of write_gate inside a commit
DEGRADED_RETRY_S = 30.0
FAIL_LOG_EVERY_S = 10.0  # failed commits are logged at most this often (the rest counted in the next line)
SHRINK_EVERY_S = 1.0  # MAP_FULL lowers the budget at most this often, unless puts were committed since
# A budget that MAP_FULL lowered rises back a twentieth of the start's budget a step, each step after
# this long without MAP_FULL; a step that meets MAP_FULL again within that time doubles the wait (up
# to RAISE_AFTER_MAX_S), so a file that stays fragmented costs a failed commit now and then, not one
# a minute
RAISE_AFTER_S = 60.0
RAISE_AFTER_MAX_S = 3600.0
# A budget capped at start to a filesystem with less room than disk_size_GB looks at the filesystem
# again this often (after a commit) and grows, map and budget, into space freed since, up to the
# configured budget; a gain under a twentieth of the budget (or 1 MiB) waits for more
REFIT_EVERY_S = 30.0
MAP_OVERHEAD = 1.10  # the LMDB map per budget byte (+ 1 MiB): room for the file to outgrow its pages
READ_PIECE = 256 << 10          # copy-then-hash piece: still in cache when hashed
READ_TASK_BYTES = 4 << 20       # pages per reader task: about this many bytes
PARALLEL_MIN_BYTES = 2 << 20    # smaller runs are read on the caller's thread


class _Truncated(Exception):
    pass


# LMDB's word that the files themselves are bad (not an LMDB file, a torn or damaged page, a
# format this build cannot read, databases that are not the tier's): the environment is moved
# aside. Any other error at start (no memory for the map, no permission, a lock, an I/O error)
# leaves the files where they are and fails the start.
_CORRUPT = (lmdb.InvalidError, lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.VersionMismatchError,
            lmdb.IncompatibleError, lmdb.BadChecksumError)


def _chains_before_ancestors(rows: list[tuple[int, bytes, DiskEntry]]) -> list[tuple[bytes, DiskEntry]]:
    """The loaded pages (sorted by write order) in eviction order, oldest first: write order, but
    every page before its ancestors, as the running tier keeps them (the store touches a chain
    deepest page first). Pages written through to disk, or with no cpu tier, were written prefix
    first: in write order a restarted tier evicted a prompt's first pages first and stranded the
    rest. One pass from the newest page: each page's ancestors not yet placed go just before it."""
    by_key = {key: e for _, key, e in rows}
    placed: set[bytes] = set()
    newest_first: list[bytes] = []
    for _, key, e in reversed(rows):
        if key in placed:
            continue
        up, walked, k = [], {key}, e.ns_root + e.parent
        while k in by_key and k not in placed and k not in walked:  # `walked`: a damaged record's loop
            up.append(k)
            walked.add(k)
            k = by_key[k].ns_root + by_key[k].parent
        newest_first += reversed(up)  # the chain's root-most unplaced page the most recent
        newest_first.append(key)
        placed.update(up)
        placed.add(key)
    return [(key, by_key[key]) for key in reversed(newest_first)]


class DiskPathLocked(ConfigError, RuntimeError):
    """Another process holds this disk_path."""


class DiskPathUnusable(ConfigError):
    """disk_path cannot be made a folder of this tier's (a file is there, a parent is missing on a
    read-only filesystem, no permission), or LMDB cannot open the files in it for a reason other
    than their corruption (no address space for the map, no permission)."""


@dataclass
class DiskEntry(Untracked):  # out of the cyclic GC (kvc.gcfree)
    ns_root: bytes
    parent: bytes
    tokens: bytes
    seq: int
    size: int  # record bytes

    @property
    def footprint(self) -> int:
        # LMDB keeps a large value in whole overflow pages; the meta record and the two 32-byte
        # keys (with their branch-page copies) are small.
        return -(-(self.size + 64) // LMDB_PAGE) * LMDB_PAGE + 256 + len(self.tokens)


class DiskTier:
    name = "disk"

    def __init__(self, path: str, capacity_bytes: int, metrics, high: float = 0.95, low: float = 0.85,
                 reader_threads: int | None = None, max_backlog_bytes: int = MAX_BACKLOG_BYTES):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.configured = int(capacity_bytes)
        self.capacity = self.configured  # lowered at start when the filesystem is smaller
        self.high, self.low = high, low
        self.metrics = metrics
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            if not os.path.isdir(self.path):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", self.path)
            self._lock_fd = self._take_lock()
        except OSError as e:
            why = ("it is a file, not a folder" if os.path.exists(self.path) and not os.path.isdir(self.path)
                   else f"{e.strerror or e} ({e.filename or self.path})")
            raise DiskPathUnusable(f"kvc.disk_path {self.path!r} cannot be used: {why}; give a folder the "
                                   f"process may create and write, or set disk_path: null to run without a "
                                   f"disk tier") from None
        self.env_path = os.path.join(self.path, "lmdb")
        self.map_size = int(self.capacity * MAP_OVERHEAD) + (1 << 20)
        self.index: OrderedDict[bytes, DiskEntry] = OrderedDict()
        self.pending: dict[bytes, bytes] = {}   # queued records, readable before their commit
        self.used = 0
        self._seq = 0
        self._lock = threading.RLock()
        self._queue: queue.Queue = queue.Queue()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        # read transactions open on the reader threads, and whether the writer waits to remap
        # (LMDB's map may only change while no transaction of this process is open)
        self._txns = 0
        self._remapping = False
        self._no_txns = threading.Condition(self._lock)
        self._queued = 0     # writes ever queued; the writer commits them in this order
        self._committed = 0  # of those, how many the writer has finished (committed or failed)
        self._failures: list[tuple[int, int]] = []  # recent failed commits as (first, last) positions
        self.degraded_until = 0.0
        # Records queued but not committed, in bytes, and the bound past which put() refuses (a
        # writer held back by write_gate must not grow memory without limit): refusals are counted
        self.backlog_bytes = 0
        self.max_backlog_bytes = int(max_backlog_bytes)
        self._m_backlog_full = metrics.store_pages.labels(tier="disk", result="backlog_full")
        # Called by the writer before each few records (it may block): an embedding engine hands in
        # its GPU-slack wait, so LMDB's puts (which hold the GIL) run when the engine's own thread
        # is not the limit. None: write at once (the cache server, tests).
        self.write_gate = None
        self.listener = None  # fn(kind, ns_root, hash, parent) on removal by the tier itself
        self._shrunk_at = None  # when _shrink last lowered the budget; None after a commit of puts
        self._map_full_at = None  # the last MAP_FULL
        self._raised_at = None  # when _recover last raised the budget (None: not since the last MAP_FULL)
        self._raise_after = RAISE_AFTER_S
        self._refit_at = time.monotonic()  # when _refit last looked at the filesystem
        # kvc_degraded{component="disk"}: 1 while the tier is bypassed after a failed commit (read
        # at each scrape: it clears when the retry window ends, with or without traffic)
        metrics.degraded.labels(component="disk").set_function(lambda: 1.0 if self.degraded else 0.0)
        self._fail_logged, self._fail_quiet = -FAIL_LOG_EVERY_S, 0  # failed commits: last logged, since
        env = None
        try:  # a failed start gives the lock back: a retry in this process must not find it held
            self.env = env = self._open()  # caps the budget and its map to the filesystem first
            self._psize = env.stat()["psize"]
            self._update_file_gauges()
            self._load_index()
        except BaseException:
            if env is not None:
                env.close()
            os.close(self._lock_fd)
            raise
        self.min_capacity = self.capacity // 2  # the floor of _shrink
        self.max_capacity = self.capacity  # the ceiling of _recover: the budget after the start's fit
        # reader threads mostly wait on the device, so there are more of them than cores
        threads = min(16, max(4, os.cpu_count() or 1)) if reader_threads is None else reader_threads
        self.reader_threads = threads
        self._readers = ThreadPoolExecutor(threads, thread_name_prefix="kvc-disk-read") if threads > 1 else None
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="kvc-disk-writer", daemon=True)
        self._writer.start()

    # -- start-up ------------------------------------------------------------------------------
    def _take_lock(self) -> int:
        fd = os.open(os.path.join(self.path, "kvc.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DiskPathLocked(f"disk_path {self.path!r} is in use by another kvc process (pid {holder}); "
                                 f"give each process its own kvc.disk_path, or share one cache-server") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _fit_filesystem(self) -> None:
        """Before the environment opens, keep the tier's file inside its filesystem: the file may
        take what it has plus the free space, less a twentieth left to others. Past that the budget
        is capped to the largest whose map fits (_shrink lowers it further if the file outgrows
        that) and the map is cut to the room, so that LMDB reports MAP_FULL (the batch is dropped,
        later ones go on) before the filesystem is full: a file that fills its filesystem can wedge
        LMDB, whose deletes need new pages too, and no eviction could then make room. (A map cut
        before the open is never mapped at its full size either.) Space freed later is taken by
        _refit."""
        limit = self._room()
        if self.map_size <= limit:
            return
        fits = max(0, int((limit - (1 << 20)) / MAP_OVERHEAD))
        if self.capacity > fits:
            log.warning("kvc.disk_size_GB (%.3f GB) is more than the filesystem under %s has room for "
                        "(%.3f GB free, %.3f GB in the tier's file); the disk tier is capped at %.3f GB",
                        self.capacity / (1 << 30), self.path, self.free_bytes() / (1 << 30),
                        self.file_bytes() / (1 << 30), fits / (1 << 30))
            self.capacity = fits
        self.map_size = max(limit, self.file_bytes())

    def _room(self) -> int:
        """What the tier's file may grow to: what it has plus the filesystem's free space, less a
        twentieth left to others."""
        room = self.file_bytes() + self.free_bytes()
        return room - room // 20

    def _refit(self) -> None:
        """After a commit, at most every REFIT_EVERY_S: a budget the start capped to its filesystem
        grows into space freed since (another process deleted files, the volume was grown), map
        first, up to the configured budget. A budget that _shrink lowered keeps its distance below
        the ceiling (_recover closes it)."""
        full_map = int(self.configured * MAP_OVERHEAD) + (1 << 20)
        if self.max_capacity >= self.configured and self.map_size >= full_map:
            return
        if time.monotonic() - self._refit_at < REFIT_EVERY_S:
            return
        self._refit_at = time.monotonic()
        try:
            limit = self._room()
        except OSError:
            return
        fits = min(self.configured, max(0, int((limit - (1 << 20)) / MAP_OVERHEAD)))
        gain = fits - self.max_capacity
        if gain < max(self.max_capacity // 20, 1 << 20) and fits < self.configured:
            return  # a few pages' worth: wait for more (each raise remaps)
        new_map = min(limit, int(fits * MAP_OVERHEAD) + (1 << 20))
        if new_map > self.map_size:
            with self._lock:  # no read transaction may be open while the map changes
                self._remapping = True
                while self._txns:
                    self._no_txns.wait()
            try:
                self.env.set_mapsize(new_map)
            except lmdb.Error as e:
                log.warning("disk tier could not grow its map to %.3f GB (%s); the budget stays %.3f GB",
                            new_map / (1 << 30), e, self.capacity / (1 << 30))
                return
            finally:
                with self._lock:
                    self._remapping = False
                    self._no_txns.notify_all()
            self.map_size = new_map
        if gain <= 0:
            return
        log.info("disk tier budget raised to %.3f GB (configured %.3f GB): its filesystem has room again",
                 (self.capacity + gain) / (1 << 30), self.configured / (1 << 30))
        self.max_capacity = fits
        self.min_capacity = fits // 2
        self.capacity += gain
        self.metrics.capacity.labels(tier="disk").set(self.capacity)

    def _open(self) -> lmdb.Environment:
        env = None
        try:
            env = self._open_env()
            problem = self._check(env)  # opens the databases once the file is known to be whole
        except _CORRUPT as e:
            problem = f"cannot be opened: {e}"
        except _Truncated as e:
            problem = str(e)
        except lmdb.Error as e:
            if env is not None:
                env.close()
            raise self._unopenable(e) from None
        if problem is None:
            return env
        if env is not None:
            env.close()
        aside = f"{self.env_path}.corrupt-{int(time.time())}"
        os.rename(self.env_path, aside)
        log.error("disk tier at %s %s; moved it aside to %s and starting cold", self.env_path, problem, aside)
        self.metrics.quarantines.labels(reason="startup_check").inc()
        try:
            env = self._open_env()
            self._open_dbs(env)
        except lmdb.Error as e:
            raise self._unopenable(e) from None
        return env

    def _open_env(self) -> lmdb.Environment:
        self._fit_filesystem()
        return lmdb.open(self.env_path, map_size=self.map_size, max_dbs=2, writemap=False,
                         metasync=False, sync=True, readahead=True, meminit=True, mode=0o700,
                         max_spare_txns=4, lock=True)

    def _unopenable(self, e: lmdb.Error) -> DiskPathUnusable:
        """The error for an environment LMDB cannot open though its files may be whole: they stay."""
        if isinstance(e, lmdb.MemoryError):
            why = (f"kvc.disk_size_GB={self.configured / (1 << 30):g} needs a {self.map_size / (1 << 30):.1f} GB "
                   f"memory map, more than this process may map ({e}); lower kvc.disk_size_GB or raise the "
                   f"process's address-space limit (ulimit -v)")
        else:
            why = (f"LMDB cannot open it ({e}); check the permissions and the filesystem of kvc.disk_path, "
                   f"or set disk_path: null to run without a disk tier")
        return DiskPathUnusable(f"the disk tier at {self.env_path} cannot start: {why}. Its files are left "
                                f"as they are")

    def _open_dbs(self, env: lmdb.Environment) -> None:
        self._data = env.open_db(b"data")
        self._meta = env.open_db(b"meta")
        env.reader_check()

    def _check(self, env: lmdb.Environment) -> str | None:
        # The size check comes before anything reads the tree: a page past the end of a
        # truncated file is a SIGBUS through the map, not an lmdb.Error.
        info, stat = env.info(), env.stat()
        need = (info["last_pgno"] + 1) * stat["psize"]
        have = os.path.getsize(os.path.join(self.env_path, "data.mdb"))
        if have < need:
            return f"is truncated (data.mdb is {have} bytes, its last page needs {need})"
        self._open_dbs(env)
        try:
            with env.begin() as txn:
                for _ in txn.cursor(self._meta):
                    pass
        except _CORRUPT as e:
            return f"is unreadable: {e}"
        return None

    def _load_index(self) -> None:
        rows, stale = [], []
        with self.env.begin() as txn:
            for key, val in txn.cursor(self._meta):
                if len(key) != 32 or len(val) < _META.size:
                    stale.append(bytes(key))  # keyed by the hash alone (an older version): unreachable
                    continue
                ns_root, parent, seq, size = _META.unpack_from(val)
                rows.append((seq, bytes(key), DiskEntry(ns_root, parent, bytes(val[_META.size:]), seq, size)))
        if stale:
            with self.env.begin(write=True) as txn:
                for key in stale:
                    txn.delete(key, db=self._data)
                    txn.delete(key, db=self._meta)
            log.info("disk tier at %s: dropped %d pages stored under the older hash-only keys",
                     self.path, len(stale))
        rows.sort(key=lambda r: r[0])
        for key, e in _chains_before_ancestors(rows):
            self.index[key] = e
            self.used += e.footprint
        self._seq = rows[-1][0] + 1 if rows else 0
        if rows:
            log.info("disk tier at %s: %d pages from the last run", self.path, len(rows))

    # -- reads ---------------------------------------------------------------------------------
    @property
    def pages(self) -> int:
        return len(self.index)

    @property
    def entries(self) -> OrderedDict[bytes, DiskEntry]:
        return self.index

    def get(self, h: bytes) -> DiskEntry | None:
        return self.index.get(h)

    def fits(self, nbytes: int) -> bool:
        return nbytes + 4096 <= self.capacity * self.low

    def read_run(self, hashes: list[bytes], dsts: list[np.ndarray], ns_root: bytes,
                 served: Callable[[int, RecordInfo], None] | None = None) -> list[RecordInfo]:
        """Read the leading run of `hashes` into `dsts` (flat uint8 arrays, one per page) and
        return the verified records of that run, in order.

        The run ends at the first page that is missing, of another namespace or size (a miss),
        or that fails its checks (dropped and counted as a checksum failure). Pages are read on
        the reader threads when the run is large; the result is the same as reading serially.
        `served(i, info)` is called on the caller's thread, in order, as soon as page i and all
        before it are verified, while later pages are still being read (the store promotes
        pages to the cpu tier there). Bytes past the run in `dsts` are unspecified.
        """
        n = len(hashes)
        if not n:
            return []
        end = _RunEnd(n)
        nbytes = sum(d.nbytes for d in dsts)
        futs = []
        if self._readers is None or nbytes < PARALLEL_MIN_BYTES:
            parts = [self._read_group(hashes, dsts, ns_root, 0, n, end)]
        else:
            per = max(1, min(-(-n // self.reader_threads), READ_TASK_BYTES * n // nbytes))
            futs = [self._readers.submit(self._read_group, hashes, dsts, ns_root, lo, min(n, lo + per), end)
                    for lo in range(0, n, per)]
            parts = (f.result() for f in futs)  # in order, each as soon as it is done
        infos = []
        try:
            for part in parts:
                for r in part:
                    if not isinstance(r, RecordInfo):
                        if isinstance(r, RecordError):
                            h = hashes[len(infos)]
                            log.warning("disk tier dropped page %s: %s", h.hex(), r)
                            self.metrics.checksum_failures.labels(tier="disk").inc()
                            self.remove([h])
                        return infos
                    infos.append(r)
                    if served is not None:
                        served(len(infos) - 1, r)
            return infos
        finally:
            wait(futs)  # tasks past the end stop early; none may write into dsts after the return

    def _read_group(self, hashes, dsts, ns_root, lo, hi, end: "_RunEnd") -> list:
        """Pages lo..hi-1 in one read transaction, stopping at the first one that is not served
        (or past a failure another task found). Each result: RecordInfo, None (a miss) or the
        RecordError that disqualified the page."""
        out, txn, began, counted = [], None, lo, False
        try:
            for i in range(lo, hi):
                if i > end.first:
                    break
                h = hashes[i]
                with self._lock:
                    rec = self.pending.get(h)
                if rec is None:
                    if txn is None:
                        if not counted:
                            with self._lock:  # the writer may be changing the map
                                while self._remapping:
                                    self._no_txns.wait()
                                self._txns += 1
                            counted = True
                        txn, began = self.env.begin(db=self._data, buffers=True), i
                    rec = txn.get(h)  # faults the whole value in, GIL released
                    if rec is None and began < i:
                        # The writer commits, then takes its pages out of `pending`: a transaction
                        # begun at an earlier page may predate the commit of a page that was no
                        # longer pending when checked just now. One that begins now sees it.
                        txn.abort()
                        txn, began = self.env.begin(db=self._data, buffers=True), i
                        rec = txn.get(h)
                r = None if rec is None else _copy_verified(h, rec, dsts[i], ns_root)
                out.append(r)
                if not isinstance(r, RecordInfo):
                    end.at(i)
                    break
        except lmdb.Error as e:
            self.metrics.disk_errors.labels(op="read", kind=_kind(e)).inc()
            out.append(None)
            end.at(lo + len(out) - 1)
        finally:
            if txn is not None:
                txn.abort()
            if counted:
                with self._lock:
                    self._txns -= 1
                    if not self._txns:
                        self._no_txns.notify_all()
        return out

    def touch(self, h: bytes) -> None:
        with self._lock:
            if h in self.index:
                self.index.move_to_end(h)

    def touch_many(self, hashes: list[bytes]) -> None:
        """touch each, in order, under one lock."""
        with self._lock:
            index = self.index
            for h in hashes:
                if h in index:
                    index.move_to_end(h)

    # -- writes --------------------------------------------------------------------------------
    def put(self, h: bytes, record: bytes, ns_root: bytes, parent: bytes, tokens: bytes) -> bool:
        """Queue a record for the writer; False when the tier is degraded or it already holds h."""
        with self._lock:
            if h in self.index or time.monotonic() < self.degraded_until:
                return False
            if self.backlog_bytes + len(record) > self.max_backlog_bytes:
                self._m_backlog_full.inc()
                return False
            self.backlog_bytes += len(record)
            e = DiskEntry(ns_root, parent, tokens, self._seq, len(record))
            self._seq += 1
            self.index[h] = e
            self.used += e.footprint
            self.pending[h] = record
            self._inflight += 1
            self._queued += 1
            self._queue.put(("put", h, record, e))
        return True

    def accepts(self, nbytes: int) -> bool:
        """Whether put() would now take records of nbytes more (not degraded, the backlog has room):
        callers skip building records the writer would refuse. A hint: put() decides."""
        return self.backlog_bytes + nbytes <= self.max_backlog_bytes and time.monotonic() >= self.degraded_until

    def refused(self, n: int) -> None:
        """Count n records a caller did not build because accepts() said no (as put() counts its own)."""
        self._m_backlog_full.inc(n)

    def over_budget(self) -> bool:
        return self.used > self.high * self.capacity

    def lru_victims(self, is_pinned) -> list[bytes]:
        """Unpinned LRU pages to drop so that usage falls to the low watermark."""
        out, freed, need = [], 0, self.used - self.low * self.capacity
        with self._lock:
            for h, e in self.index.items():
                if freed >= need:
                    break
                if not is_pinned(h):
                    out.append(h)
                    freed += e.footprint
        return out

    def remove(self, hashes) -> list[tuple[bytes, DiskEntry]]:
        removed = []
        with self._lock:
            for h in hashes:
                e = self.index.pop(h, None)
                if e is None:
                    continue
                self.used -= e.footprint
                self.pending.pop(h, None)
                removed.append((h, e))
            if removed:
                self._inflight += 1
                self._queued += 1
                self._queue.put(("del", [h for h, _ in removed]))
        return removed

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued write has been committed (or dropped)."""
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout=timeout)

    def sync(self, timeout: float = 10.0) -> bool:
        """The durability point: wait until every write queued before this call is committed.

        True when they all were (those pages now survive a kill of the process), False on a
        timeout or when one of their commits failed (those pages were dropped from the tier).
        Writes queued during the wait are not waited for, so a busy writer cannot stall it.
        """
        with self._idle:
            first, target = self._committed, self._queued
            done = self._idle.wait_for(lambda: self._committed >= target, timeout=timeout)
            return done and not any(lo <= target and hi > first for lo, hi in self._failures)

    def _write_loop(self) -> None:
        last_check = time.monotonic()
        while True:
            item = self._queue.get()
            if item is None:
                return
            # a commit takes new LMDB pages before the pages its deletes free can be reused, so
            # the file outgrows the budget by up to one batch: keep a batch small next to it
            batch = take_batch(self._queue, item, 256, max(self.capacity // 64, 1), _item_bytes)
            ok = self._commit(batch)
            self._update_file_gauges()
            with self._idle:
                self._inflight -= len(batch)
                if not ok:
                    self._failures = self._failures[-63:] + [(self._committed + 1, self._committed + len(batch))]
                self._committed += len(batch)
                self._idle.notify_all()
            if time.monotonic() - last_check > READER_CHECK_S:
                self.env.reader_check()
                last_check = time.monotonic()

    def _commit(self, batch) -> bool:
        gate, gated = self.write_gate, 0
        if gate is not None:
            gate()
        t0 = time.perf_counter()
        def stale() -> set[int]:  # puts whose page was removed or replaced since they were queued
            with self._lock:  # once for the batch (and after each gate wait), not per record
                return {id(i) for i in batch if i[0] == "put" and self.index.get(i[1]) is not i[3]}
        skip = stale()
        try:
            with self.env.begin(write=True) as txn:
                for item in batch:
                    if item[0] == "put":
                        _, h, rec, e = item
                        if id(item) in skip:
                            continue  # removed (or replaced) before it reached the disk
                        gated += 1
                        if gate is not None and gated % GATE_EVERY == 0:
                            gate()  # between puts: a write txn may stay open, readers are MVCC
                            skip = stale()  # the wait may have been long
                            if id(item) in skip:
                                continue
                        txn.put(h, rec, db=self._data)
                        txn.put(h, _META.pack(e.ns_root, e.parent, e.seq, e.size) + e.tokens, db=self._meta)
                    else:
                        for h in item[1]:
                            with self._lock:
                                if h in self.index:
                                    continue  # stored again after the removal was queued
                            txn.delete(h, db=self._data)
                            txn.delete(h, db=self._meta)
        except lmdb.Error as e:
            self._failed(batch, e)
            self._commit_deletes(batch)
            return False
        finally:
            with self._lock:
                for item in batch:
                    if item[0] == "put":
                        self.backlog_bytes -= len(item[2])
                        if self.pending.get(item[1]) is item[2]:
                            del self.pending[item[1]]
        self._refit()
        if gated:
            self._shrunk_at = None  # puts fit again: a later MAP_FULL is a new episode
            self._recover()
        self.metrics.store_bytes.labels(tier="disk").inc(sum(len(i[2]) for i in batch if i[0] == "put"))
        self.metrics.transfer_duration.labels(src="cpu", dst="disk").observe(time.perf_counter() - t0)
        return True

    def _update_file_gauges(self) -> None:
        """The map, the file's high-water mark and the filesystem's free space (after each commit)."""
        try:
            info = self.env.info()
            free = self.free_bytes()
        except (lmdb.Error, OSError):  # the writer goes on; the gauges wait for the next commit
            return
        self.metrics.lmdb_map_size.set(info["map_size"])
        self.metrics.lmdb_used.set((info["last_pgno"] + 1) * self._psize)
        self.metrics.disk_free.set(free)

    def _commit_deletes(self, batch) -> None:
        """After a failed commit, the batch's removals on their own: the index has already dropped
        those pages, and evictions are what make room in a full file, so they must not be lost
        with the puts they were batched with. In a file at its map (or on a full filesystem) even
        a delete needs new LMDB pages (copies of the leaves it changes), and LMDB reuses a freed
        page only two commits later: a large delete can fail where one of a few keys fits in the
        pages the last commits freed, and its own commit frees more. So a failed delete is split
        into smaller ones, down to single pages."""
        with self._lock:  # those stored again after the removal was queued stay
            todo = [h for item in batch if item[0] == "del" for h in item[1] if h not in self.index]
        size, err = len(todo), None
        while todo:
            part = todo[:size]
            try:
                with self.env.begin(write=True) as txn:
                    for h in part:
                        txn.delete(h, db=self._data)
                        txn.delete(h, db=self._meta)
            except lmdb.Error as e:
                err = e
                if size == 1:
                    break
                size = max(1, size // 4)
                continue
            del todo[:size]
        if todo:  # the pages stay in the file, unindexed, until the next start loads them
            self.metrics.disk_errors.labels(op="commit", kind=_kind(err)).inc()
            log.error("disk tier could not remove %d pages after a failed commit (%s)", len(todo), err)

    def _failed(self, batch, err: lmdb.Error) -> None:
        kind = _kind(err)
        if kind == "eio" and self.free_bytes() < sum(len(i[2]) for i in batch if i[0] == "put") + (1 << 20):
            kind = "enospc"  # LMDB reports a short write on a full filesystem as EIO
        self.metrics.disk_errors.labels(op="commit", kind=kind).inc()
        lost = [item[1] for item in batch if item[0] == "put"]
        now = time.monotonic()
        if now - self._fail_logged >= FAIL_LOG_EVERY_S:  # a full map fails commit after commit
            more = f" ({self._fail_quiet} more failed commits since the last report)" if self._fail_quiet else ""
            log.error("disk tier commit failed (%s: %s); %d pages not written%s%s", kind, err, len(lost),
                      "" if kind == "map_full" else f"; degraded for {DEGRADED_RETRY_S:.0f}s", more)
            self._fail_logged, self._fail_quiet = now, 0
        else:
            self._fail_quiet += 1
        if kind == "map_full":
            self._shrink()
        with self._lock:
            for h in lost:
                e = self.index.pop(h, None)
                if e is not None:
                    self.used -= e.footprint
                    if self.listener:
                        self.listener("removed", e.ns_root, h, e.parent)
            if kind != "map_full":
                self.degraded_until = time.monotonic() + DEGRADED_RETRY_S

    def _shrink(self) -> None:
        """LMDB's file reached its map while the pages it holds are under the budget: freed pages
        are reused only two commits later, and a record needs a run of contiguous pages, so with
        small records (a few LMDB pages each) under churn the file can outgrow the pages by a
        third. Hold a tenth fewer pages, down to half the budget, so that evictions leave the
        file room to reuse; _recover raises it back once MAP_FULL has stayed away."""
        now = time.monotonic()
        if self._raised_at is not None and now - self._raised_at < self._raise_after:
            self._raise_after = min(self._raise_after * 2, RAISE_AFTER_MAX_S)  # that raise was too soon
        self._map_full_at, self._raised_at = now, None
        if self._shrunk_at is not None and now - self._shrunk_at < SHRINK_EVERY_S:
            return  # once per episode: the commits queued behind the failed one fail alike
        cap = max(int(self.capacity * 0.9), self.min_capacity)
        if cap >= self.capacity:
            return
        self._shrunk_at = now
        log.warning("disk tier budget lowered to %.3f GB (from %.3f GB): its LMDB file is at its map "
                    "size, fragmented by pages of %.0f KiB", cap / (1 << 30), self.capacity / (1 << 30),
                    self.used / max(len(self.index), 1) / 1024)
        self.capacity = cap
        self.metrics.capacity.labels(tier="disk").set(cap)

    def _recover(self) -> None:
        """After a commit of puts: a budget _shrink lowered rises a twentieth of the start's budget
        once MAP_FULL has stayed away for _raise_after seconds (since it, or since the last raise),
        up to the start's budget. Evictions had freed pages inside the file; if it is still too
        fragmented for the higher budget, the next MAP_FULL lowers it again and doubles the wait."""
        if self._map_full_at is None or self.capacity >= self.max_capacity:
            return
        now = time.monotonic()
        if now - max(self._map_full_at, self._raised_at or 0.0) < self._raise_after:
            return
        cap = min(self.max_capacity, self.capacity + max(self.max_capacity // 20, 1))
        log.info("disk tier budget raised to %.3f GB (of %.3f GB): no MAP_FULL for %.0f s", cap / (1 << 30),
                 self.max_capacity / (1 << 30), now - max(self._map_full_at, self._raised_at or 0.0))
        self.capacity, self._raised_at = cap, now
        if cap >= self.max_capacity:  # whole again (a MAP_FULL soon after this raise still doubles the wait)
            self._map_full_at = None
        self.metrics.capacity.labels(tier="disk").set(cap)

    @property
    def degraded(self) -> bool:
        return time.monotonic() < self.degraded_until

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def file_bytes(self) -> int:
        try:
            return os.path.getsize(os.path.join(self.env_path, "data.mdb"))
        except FileNotFoundError:  # before the first start (or after a quarantine)
            return 0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush()
        self._queue.put(None)
        self._writer.join(timeout=30)
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        self.env.close()
        os.close(self._lock_fd)


def _item_bytes(item) -> int:
    return len(item[2]) + 128 if item[0] == "put" else 64 * len(item[1])


def _kind(e: Exception) -> str:
    if isinstance(e, lmdb.MapFullError):
        return "map_full"
    if isinstance(e, lmdb.ReadersFullError):
        return "readers_full"
    if isinstance(e, (lmdb.CorruptedError, lmdb.PanicError)):
        return "corrupt"
    code = getattr(e, "errno", None) or (e.args[0] if e.args and isinstance(e.args[0], int) else None)
    text = str(e)
    if code == errno.ENOSPC or "No space" in text:
        return "enospc"
    if code == errno.EIO or "I/O error" in text or "Input/output" in text:
        return "eio"
    return "other"


class _RunEnd:
    """The lowest page index at which some reader task found the run ends (shared by the tasks
    of one read_run, so later tasks stop early)."""

    def __init__(self, n: int):
        self.first = n
        self._lock = threading.Lock()

    def at(self, i: int) -> None:
        with self._lock:
            self.first = min(self.first, i)


def _copy_verified(h: bytes, rec, dst: np.ndarray, ns_root: bytes):
    """Copy a record's payload into dst and check it: RecordInfo when served, None when the
    record is of another namespace or size (a miss, the page stays), or the RecordError that
    makes the record unusable (bad header, another page's record, a failed checksum).

    The copy goes in cache-sized pieces, each hashed from dst while it is still in cache; numpy
    copies and xxh3 release the GIL, so reader threads run this side by side."""
    try:
        info = decode_header(rec)
        if info.ns_root + info.hash != h:  # h is the tier's key: namespace root + page hash
            raise RecordError(f"the record stored under key {h.hex()} is page {info.hash.hex()}'s")
    except RecordError as e:
        return e
    if info.payload_len != dst.nbytes or info.ns_root != ns_root:
        return None
    src = np.frombuffer(rec, dtype=np.uint8, count=info.payload_len, offset=info.payload_offset)
    digest = xxhash.xxh3_64()
    for off in range(0, info.payload_len, READ_PIECE):
        piece = dst[off:off + READ_PIECE]
        piece[:] = src[off:off + READ_PIECE]
        digest.update(piece)
    if digest.intdigest() != info.checksum:
        return ChecksumError(f"page {h.hex()} failed its checksum on disk")
    return info
