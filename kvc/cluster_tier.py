"""The cluster tier: page records in a Redis Cluster (or one plain Redis) shared by many kvc processes.

It sits below disk: lookups and gets ask it only for what the local tiers lack. Keys are
`kvc:v1:<namespace root hex>:<page hash hex>` (tenant salts and weight digests give different
roots, so namespaces never share a key); values are page records (kvc/record.py). Every value is
verified on read (decodable record, key hash, namespace, dtype and shape, xxh3_128(parent ||
tokens) == hash, and for gets the payload checksum): anything else is a miss, counted, and the key
is deleted. Writes are write-behind: the store offers pages, one writer thread pipelines SETs from
a bounded queue (full: the page is dropped and counted), so no request ever waits for the cluster.
A call that fails or passes its deadline (socket timeouts of `kvc.cluster_timeout_s`) is a miss;
the tier then backs off (0.25 s doubling to 5 s) and retries by itself; a Cluster node that fails
a get, lookup or put backs off alone (its keys miss, the other nodes' are read), and meanwhile the
slot map is read again once a second, so that a failover's promoted replica takes its keys. Memory
is the cluster's business (maxmemory + allkeys-lru): kvc never relies on a key staying there.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from typing import Callable, Sequence
from urllib.parse import urlsplit

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from . import hashing, respread
from .batching import take_batch
from .hashing import Namespace
from .record import RecordError, RecordInfo, checksum, decode_header, header_bytes

log = logging.getLogger("kvc.cluster")

BACKOFF_MIN_S = 0.25
BACKOFF_MAX_S = 5.0
REFRESH_S = 1.0  # while a node backs off, the slot map is read again at most this often
WRITE_BATCH_BYTES = 32 << 20
# bytes a receive may take: redis-py reads replies 64 KiB at a time by default, and every receive
# hands the GIL over; beside a thread that wants it all the time (an engine's), a 144 MB get took
# ~3.9 s at 64 KiB, 1.3 s at 1 MiB, 0.75 s at 4 MiB (~0.27 s alone; benchmarks/probe_cluster_get.py)
SOCKET_READ_BYTES = 4 << 20
WRITE_BATCH_ITEMS = 256  # records read from the cpu tier at write time count as a page each
KNOWN_PAGES = 1 << 16
KNOWN_S = 30.0  # how long a written page counts as held for duplicate puts (Redis may evict it)
PASSWORD_ENV = "KVC_CLUSTER_PASSWORD"
AUTH_HINT = f"Redis refused the password: set it in kvc.cluster_url (redis://:PASSWORD@host:port) or {PASSWORD_ENV}"


def page_key(ns_root: bytes, h: bytes) -> bytes:
    return b"kvc:v1:" + ns_root.hex().encode() + b":" + h.hex().encode()


def check_url(url: str) -> None:
    """Raise ValueError naming kvc.cluster_url unless url is redis://host:port or rediss://host:port."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"kvc.cluster_url must be redis://host:port or rediss://host:port (TLS), got {url!r}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"kvc.cluster_url has a bad port: {url!r}") from None


def redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _kind(e: BaseException) -> str:
    # redis-py's AuthenticationError is a ConnectionError; a RedisCluster that no node let in raises
    # RedisClusterException from it
    if isinstance(e, redis.exceptions.AuthenticationError) or isinstance(e.__cause__,
                                                                          redis.exceptions.AuthenticationError):
        return "auth"
    if isinstance(e, (redis.exceptions.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(e, (redis.exceptions.ConnectionError, OSError)):
        return "connection"
    if isinstance(e, (redis.exceptions.ClusterDownError, redis.exceptions.RedisClusterException)):
        return "cluster_down"
    if isinstance(e, redis.exceptions.ResponseError):
        return "response"
    return "other"


def _why(kind: str, e: BaseException) -> str:
    return f"{AUTH_HINT} ({e})" if kind == "auth" else str(e)


_AGAIN = object()  # _direct: ask this key again through redis-py


class ClusterTier:
    name = "cluster"
    capacity = used = pages = 0  # the cluster's memory is the operator's; kvc does not count it

    def __init__(self, url: str, metrics, timeout_s: float = 0.2, queue_pages: int = 4096,
                 password: str | None = None):
        check_url(url)
        self.url = url
        self.metrics = metrics
        self.timeout_s = timeout_s
        self._password = password if password is not None else os.environ.get(PASSWORD_ENV)
        self._client = None
        self.mode = "unconnected"
        self._connect_lock = threading.Lock()
        self._down_until = 0.0
        self._backoff = 0.0
        self._nodes_down: dict[str, tuple[float, float]] = {}  # node name -> (back-off end, back-off)
        self._refresh_lock = threading.Lock()
        self._refreshed = 0.0  # monotonic time of the last slot map read
        self._lock = threading.Lock()
        self.pending: dict[bytes, bytes] = {}   # key -> queued record, readable before it is written
        # recently written pages: hash -> (ns_root, parent, tokens, monotonic time written)
        self.known: OrderedDict[bytes, tuple[bytes, bytes, bytes, float]] = OrderedDict()
        # [(ns_root, hash)] -> their records from the cpu tier (None: the page left it), one call a batch
        self.source: Callable[[list[tuple[bytes, bytes]]], list] | None = None
        self.listener = None  # fn(kind, ns_root, hash, parent)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_pages)
        self._queued: dict[bytes, tuple[bytes, bytes, bytes] | None] = {}  # hash -> as in known, None: from cpu
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        # the labelled series, up front (as KvcMetrics does for cpu and disk); only where the tier exists
        metrics.lookup_hit_tokens.labels(tier="cluster")
        metrics.checksum_failures.labels(tier="cluster")
        metrics.store_bytes.labels(tier="cluster")
        for result in ("stored", "dropped"):
            metrics.store_pages.labels(tier="cluster", result=result)
        metrics.transfer_bytes.labels(src="cluster", dst="cpu")
        metrics.transfer_bytes.labels(src="cpu", dst="cluster")
        for op in ("lookup", "get", "put", "delete"):
            metrics.cluster_calls.labels(op=op)
            metrics.cluster_errors.labels(op=op, kind="timeout")
            metrics.cluster_errors.labels(op=op, kind="connection")
        # kvc_degraded{component="cluster"}: 1 during a back-off (read at each scrape: it clears
        # when the back-off ends, with or without traffic; the next call tries the cluster again)
        metrics.degraded.labels(component="cluster").set_function(lambda: 1.0 if self.degraded else 0.0)
        self._writer = threading.Thread(target=self._write_loop, name="kvc-cluster-writer", daemon=True)
        self._writer.start()

    # -- connection and failures ---------------------------------------------------------------
    def _conn(self):
        """The client, connecting on first use; None while backing off (callers treat it as a miss)."""
        if time.monotonic() < self._down_until:
            return None
        if self._client is not None:
            return self._client
        with self._connect_lock:
            if self._client is None:
                try:
                    self._client = self._open()
                except Exception as e:  # unreachable at start: misses until it answers
                    self._failed("connect", e)
                    return None
        return self._client

    def _open(self):
        kw = dict(socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                  retry=Retry(NoBackoff(), 1), socket_read_size=SOCKET_READ_BYTES)
        if self._password and urlsplit(self.url).password is None:
            kw["password"] = self._password
        probe = redis.Redis.from_url(self.url, **kw)
        try:
            enabled = probe.info("cluster").get("cluster_enabled", 0)
        except Exception:
            probe.close()
            raise
        if not enabled:
            self.mode = "standalone"
            log.info("cluster tier: standalone Redis at %s", redacted(self.url))
            return probe
        probe.close()
        client = RedisCluster.from_url(self.url, require_full_coverage=False, **kw)
        self.mode = "cluster"
        log.info("cluster tier: Redis Cluster at %s (%d nodes)", redacted(self.url), len(client.get_nodes()))
        return client

    def _failed(self, op: str, e: BaseException) -> None:
        kind = _kind(e)
        self.metrics.cluster_errors.labels(op=op, kind=kind).inc()
        self._backoff = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, 2 * self._backoff))
        self._down_until = time.monotonic() + self._backoff
        log.warning("cluster tier %s failed (%s: %s); misses for %.2fs", op, kind, _why(kind, e), self._backoff)
        if kind != "timeout" and self._client is not None and self.mode == "standalone":
            self._client = None  # reconnect (a restarted standalone server) after the back-off

    def _node_failed(self, op: str, node: str, e: BaseException) -> None:
        """One Cluster node's keys failed: that node backs off (its keys miss), the others go on."""
        kind = _kind(e)
        self.metrics.cluster_errors.labels(op=op, kind=kind).inc()
        backoff = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, 2 * self._nodes_down.get(node, (0.0, 0.0))[1]))
        self._nodes_down[node] = (time.monotonic() + backoff, backoff)
        log.warning("cluster tier %s failed on node %s (%s: %s); its keys miss for %.2fs", op, node, kind,
                    _why(kind, e), backoff)

    def _ok(self) -> None:
        if self._backoff:
            self._backoff = 0.0

    def _refresh(self, client) -> None:
        """While a node backs off, read the slot map again (at most every REFRESH_S): a failover
        gives a failed master's slots to its replica, which redis-py's cached map does not know."""
        now = time.monotonic()
        if not self._nodes_down or now - self._refreshed < REFRESH_S:
            return
        if not self._refresh_lock.acquire(blocking=False):  # another thread reads it
            return
        try:
            self._refreshed = now
            client.nodes_manager.initialize()
        except Exception as e:  # no node answered: the map stays as it was
            log.warning("cluster tier: reading the slot map failed (%s: %s)", _kind(e), e)
        finally:
            self._refresh_lock.release()
        for name in list(self._nodes_down):
            if name not in client.nodes_manager.nodes_cache:  # a failed-over master: no slots left
                self._nodes_down.pop(name, None)

    @property
    def degraded(self) -> bool:
        now = time.monotonic()
        return now < self._down_until or any(now < until for until, _ in list(self._nodes_down.values()))

    def _pipeline(self, op: str, build) -> list | None:
        """Run build(pipe) as one pipeline (grouped by node in cluster mode); results or None."""
        client = self._conn()
        if client is None:
            return None
        t0 = time.perf_counter()
        try:
            pipe = client.pipeline(transaction=False)
            build(pipe)
            out = pipe.execute(raise_on_error=False)
        except Exception as e:
            self._failed(op, e)
            return None
        self.metrics.cluster_calls.labels(op=op).observe(time.perf_counter() - t0)
        err = next((r for r in out if isinstance(r, Exception)), None)
        if err is not None:
            self._failed(op, err)  # the other results stand
        else:
            self._ok()
        return [None if isinstance(r, Exception) else r for r in out]

    # -- reads ---------------------------------------------------------------------------------
    def lookup(self, ns: Namespace, hashes: Sequence[bytes], parent: bytes, raw: bytes | None) -> int:
        """Leading pages of `hashes` held and verified (header and tokens only; payload at get).

        parent: the hash before hashes[0]; raw: the query's token bytes from hashes[0] on, or None.
        """
        if not hashes:
            return 0
        root, spec = ns.root, ns.spec
        step = 4 * spec.page_size
        with self._lock:
            queued = [self.pending.get(page_key(root, h)) for h in hashes]
        ask = [i for i, q in enumerate(queued) if q is None]
        hdr = header_bytes(spec)
        if ask:
            keys = [page_key(root, hashes[i]) for i in ask]
            got, failed = self._fetch("lookup", keys, hdr, lambda k: ("GETRANGE", k, 0, hdr - 1))
            if failed:
                return 0
            missed = []
            for i, v in zip(ask, got):
                queued[i] = v or None  # GETRANGE of a missing key: empty
                if not v:
                    missed.append(hashes[i])
            if missed:  # not held after all (the cluster evicted them, or restarted empty):
                with self._lock:  # a put of them writes them again (holds() said "held" for KNOWN_S)
                    for h in missed:
                        self.known.pop(h, None)
        n = 0
        for i, (h, buf) in enumerate(zip(hashes, queued)):
            if buf is None:
                break
            info = self._verify(ns, h, buf, partial=True)
            if info is None or info.parent != parent or (
                    raw is not None and info.tokens.astype("<u4").tobytes() != raw[i * step:(i + 1) * step]):
                if info is not None:
                    self.metrics.collisions.inc()
                break
            parent = h
            n += 1
        return n

    def get(self, ns: Namespace, hashes: Sequence[bytes],
            check_payload: bool = True) -> dict[bytes, tuple[RecordInfo, bytes]]:
        """Verified records of the leading pages of `hashes` that the cluster holds (hash -> info, record).
        check_payload=False: everything but the payload's checksum, which the caller then checks
        (as it copies the payload) and reports with `reject` where it differs."""
        if not hashes:
            return {}
        root = ns.root
        with self._lock:
            bufs = [self.pending.get(page_key(root, h)) for h in hashes]
        ask = [i for i, b in enumerate(bufs) if b is None]
        if ask:
            keys = [page_key(root, hashes[i]) for i in ask]
            got, _ = self._fetch("get", keys, header_bytes(ns.spec) + ns.spec.page_bytes, lambda k: ("GET", k))
            for i, v in zip(ask, got):
                bufs[i] = v
        out = {}
        for h, buf in zip(hashes, bufs):
            if buf is None:
                break
            info = self._verify(ns, h, buf, partial=False, check_payload=check_payload)
            if info is None:
                break
            out[h] = (info, buf)
        return out

    def _fetch(self, op: str, keys: list[bytes], cap: int, command: Callable[[bytes], tuple],
               native: bool = True) -> tuple[list, bool]:
        """command(key)'s reply for every key (a GET, a GETRANGE, a SET): _direct, and redis-py's
        pipeline (which follows MOVED / ASK) for the keys _direct left to it. Returns the replies
        (None where missing or not read) and whether that pipeline failed."""
        got = self._direct(op, keys, cap, command, native)
        again = range(len(keys)) if got is None else [j for j, v in enumerate(got) if v is _AGAIN]
        if got is None:
            got = [None] * len(keys)
        if not again:
            return got, False
        more = self._pipeline(op, lambda p: [p.execute_command(*command(keys[j])) for j in again])
        for j, v in zip(again, more or [None] * len(again)):
            got[j] = v
        return got, more is None

    def _direct(self, op: str, keys: list[bytes], cap: int, command: Callable[[bytes], tuple],
                native: bool = True) -> list | None:
        """command(key) for every key (a GET, a GETRANGE: a bulk-string reply; a SET), sent per node
        and the replies read by respread (each node's in one native call, without the GIL) into
        rows of cap bytes (a get: the namespace's record size; a lookup: its header's), or where
        that cannot read them (TLS, hiredis, no compiler; native=False: a put's simple-string
        replies) through the connection's parser: a memoryview of its row (or bytes) for each, None
        where the key is missing or its node's read failed (counted as `op`, as _pipeline does: a
        node that stops answering fails its keys within about the socket timeout, the other nodes'
        stand, and that node backs off: its keys are None without asking it until then), _AGAIN
        where redis-py must ask (an error reply such as MOVED or OOM, a reply longer than cap).
        None: this path is unavailable (no client, a node without a connection pool)."""
        lib = respread.library() if native else None
        client = self._conn()
        if client is None:
            return None
        got: list = [_AGAIN] * len(keys)
        if self.mode == "cluster":
            self._refresh(client)
            now = time.monotonic()
            groups: dict[str, tuple] = {}
            for j, k in enumerate(keys):
                try:
                    node = client.get_node_from_key(k)
                except redis.exceptions.SlotNotCoveredError:  # a failed master's slots, mid-failover
                    got[j] = None
                    continue
                if node is None or node.redis_connection is None:
                    return None
                if now < self._nodes_down.get(node.name, (0.0, 0.0))[0]:
                    got[j] = None
                    continue
                groups.setdefault(node.name, (node.name, node.redis_connection.connection_pool, []))[2].append(j)
            targets = list(groups.values())
        else:
            targets = [(None, client.connection_pool, list(range(len(keys))))]
        t0 = time.perf_counter()
        sent, failed = [], []
        for name, pool, idx in targets:  # every node's commands out first, then each node's replies
            try:
                conn, direct = respread.send(pool, [command(keys[j]) for j in idx])
            except Exception as e:  # this node's keys fail; the other nodes' go on
                failed.append((name, e))
                for j in idx:
                    got[j] = None
                continue
            if conn is not None:  # else these keys are left to redis-py's pipeline
                sent.append((name, pool, conn, direct and lib is not None, idx))
        for name, pool, conn, direct, idx in sent:
            try:
                if direct:
                    rows = np.empty((len(idx), cap), dtype=np.uint8)
                    lens = respread.read(lib, pool, conn, rows, self.timeout_s)
                    replies = [memoryview(rows[r, :n]) if n >= 0 else n for r, n in enumerate(lens.tolist())]
                else:
                    replies = respread.read_parsed(pool, conn, len(idx), cap)
                self._nodes_down.pop(name, None)
            except Exception as e:  # the connection is closed: this node's keys fail, the others' stand
                failed.append((name, e))
                replies = [respread.MISSING] * len(idx)
            for j, v in zip(idx, replies):
                if not isinstance(v, int):
                    got[j] = v
                elif v == respread.MISSING:
                    got[j] = None
        for name, e in failed:
            if name is None:
                self._failed(op, e)
            else:
                self._node_failed(op, name, e)
        if targets and not failed:
            self.metrics.cluster_calls.labels(op=op).observe(time.perf_counter() - t0)
            self._ok()
        return got

    def _verify(self, ns: Namespace, h: bytes, buf: bytes, partial: bool,
                check_payload: bool = True) -> RecordInfo | None:
        spec = ns.spec
        try:
            info = decode_header(buf, partial=partial)
            if info.hash != h or info.ns_root != ns.root:
                raise RecordError("the record is not this key's page")
            if info.dtype != spec.dtype or info.shape != spec.shape or len(info.tokens) != spec.page_size:
                raise RecordError(f"record holds {info.dtype} {info.shape}, the namespace needs "
                                  f"{spec.dtype} {spec.shape}")
            if hashing.chain_hash(info.parent, info.tokens.astype("<u4").tobytes()) != h:
                raise RecordError("xxh3_128(parent || tokens) is not the key's hash")
            if not partial and check_payload and checksum(memoryview(buf)[info.payload_offset:]) != info.checksum:
                raise RecordError("payload checksum mismatch")
        except RecordError as e:
            self.reject(ns, h, str(e))
            return None
        return info

    def reject(self, ns: Namespace, h: bytes, why: str) -> None:
        """A record that failed its checks: counted, forgotten and deleted from the cluster."""
        log.warning("cluster tier dropped page %s: %s", h.hex(), why)
        self.metrics.checksum_failures.labels(tier="cluster").inc()
        with self._lock:
            self.known.pop(h, None)
        self._pipeline("delete", lambda p: p.delete(page_key(ns.root, h)))

    def holds(self, h: bytes) -> tuple[bytes, bytes, bytes] | None:
        """(ns_root, parent, tokens) of a page this process queued or wrote in the last KNOWN_S seconds
        (a hint for duplicate puts, not a promise: the cluster may have evicted it since)."""
        with self._lock:
            k = self.known.get(h)
            if k is not None and time.monotonic() - k[3] < KNOWN_S:
                return k[:3]
            return self._queued.get(h)

    # -- writes --------------------------------------------------------------------------------
    def offer(self, ns_root: bytes, h: bytes, record: bytes | None = None) -> bool:
        """Queue a page for the writer: its record, or None to read it from `source` when written."""
        key = page_key(ns_root, h)
        with self._lock:
            if h in self._queued:
                return True
            try:
                self._queue.put_nowait((ns_root, h, record))
            except queue.Full:
                self.metrics.store_pages.labels(tier="cluster", result="dropped").inc()
                return False
            if record is not None:
                self.pending[key] = record
                info = decode_header(record)
                self._queued[h] = (ns_root, info.parent, info.tokens.astype("<u4").tobytes())
            else:
                self._queued[h] = None
            self._inflight += 1
        return True

    def _write_loop(self) -> None:
        self._conn()  # connect now, so that the first lookup does not pay for it
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = take_batch(self._queue, item, WRITE_BATCH_ITEMS, WRITE_BATCH_BYTES, _queued_bytes)
            try:
                self._write(batch)
            except Exception:  # never let the writer die
                log.exception("cluster tier writer failed")
            finally:
                with self._idle:
                    for r, h, rec in batch:
                        self._queued.pop(h, None)
                        if rec is not None:
                            self.pending.pop(page_key(r, h), None)
                    self._inflight -= len(batch)
                    self._idle.notify_all()

    def _write(self, batch) -> None:
        want = [(r, h) for r, h, rec in batch if rec is None] if self.source is not None else []
        sourced = iter(self.source(want) if want else [])  # None: the page left the cpu tier before its turn
        rows = []
        for ns_root, h, rec in batch:
            if rec is None and self.source is not None:
                rec = next(sourced)
            if rec is not None:
                rows.append((ns_root, h, rec))
        if len(rows) < len(batch):
            self.metrics.store_pages.labels(tier="cluster", result="dropped").inc(len(batch) - len(rows))
        if not rows:
            return
        t0 = time.perf_counter()
        keys = [page_key(r, h) for r, h, _ in rows]
        recs = {k: rec for k, (_, _, rec) in zip(keys, rows)}
        # each node's SETs sent and their replies read as a get's (a stalled node fails its own keys
        # within the socket timeout); MOVED / ASK / OOM replies asked again through redis-py
        got, _ = self._fetch("put", keys, 64, lambda k: ("SET", k, recs[k]), native=False)
        out = [v is True or (v is not None and bytes(v) == b"OK") for v in got]
        if not all(out):
            self.metrics.store_pages.labels(tier="cluster", result="dropped").inc(out.count(False))
        stored = 0
        for (r, h, rec), ok in zip(rows, out):
            if not ok:
                continue
            stored += len(rec)
            info = decode_header(rec)
            with self._lock:
                self.known[h] = (r, info.parent, info.tokens.astype("<u4").tobytes(), time.monotonic())
                self.known.move_to_end(h)
                if len(self.known) > KNOWN_PAGES:
                    self.known.popitem(last=False)
            if self.listener:
                self.listener("stored", r, h, info.parent)
        m = self.metrics
        m.store_pages.labels(tier="cluster", result="stored").inc(sum(1 for ok in out if ok))
        m.store_bytes.labels(tier="cluster").inc(stored)
        m.transfer_bytes.labels(src="cpu", dst="cluster").inc(stored)
        m.transfer_duration.labels(src="cpu", dst="cluster").observe(time.perf_counter() - t0)

    def delete(self, ns: Namespace, hashes: Sequence[bytes] | None) -> set[bytes]:
        """Drop this namespace's pages (all of them when hashes is None); the hashes dropped."""
        self.flush()
        root = ns.root
        if hashes is None:
            client = self._conn()
            if client is None:
                return set()
            prefix = page_key(root, b"")
            try:
                keys = list(client.scan_iter(match=prefix + b"*", count=1000))
            except Exception as e:
                self._failed("delete", e)
                return set()
            hashes = [bytes.fromhex(k[len(prefix):].decode()) for k in keys]
        hashes = list(hashes)
        out = self._pipeline("delete", lambda p: [p.delete(page_key(root, h)) for h in hashes]) or []
        dropped = {h for h, n in zip(hashes, out) if n}
        with self._lock:
            for h in hashes:
                self.known.pop(h, None)
        for h in dropped:
            if self.listener:
                self.listener("removed", root, h, b"")
        return dropped

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued page has been written (or dropped)."""
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout=timeout)

    def stats(self) -> dict:
        return {"url": redacted(self.url), "mode": self.mode, "degraded": self.degraded,
                "queued_pages": self._queue.qsize()}

    def close(self) -> None:
        self.flush(timeout=5.0)
        self._queue.put(None)
        self._writer.join(timeout=5)
        if self._client is not None:
            self._client.close()


class NullCluster:
    """No cluster tier (kvc.cluster_url unset): holds nothing, asks nothing."""
    name = "cluster"
    capacity = used = pages = 0
    source = listener = None

    def lookup(self, ns, hashes, parent, raw) -> int:
        return 0

    def get(self, ns, hashes, check_payload=True) -> dict:
        return {}

    def holds(self, h):
        return None

    def offer(self, ns_root, h, record=None) -> bool:
        return False

    def delete(self, ns, hashes) -> set:
        return set()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _queued_bytes(item) -> int:
    """A queued write's record size; 0 when the writer reads it from the cpu tier (counted by items)."""
    rec = item[2]
    return len(rec) if rec is not None else 0
