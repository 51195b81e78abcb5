"""RemoteCache: the CacheBackend protocol over gRPC, against `kvc cache-server`.

Every call has a deadline. While the service is down or unreachable the cache answers "miss"
at once (lookup: no hits, get: [], put: everything rejected), so the engine recomputes instead
of hanging; after a failure calls are skipped for a short, growing back-off, and the channel
reconnects by itself when the service is back. Caller errors (a bad page, a bad namespace) are
ValueError, as from the in-process store.

    cache = RemoteCache("grpc://127.0.0.1:50051", token="...", timeout=2.0)
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Sequence
from urllib.parse import urlsplit

import grpc
import torch
import xxhash

from . import wire
from .backend import BAD_PARENT_TAIL, LookupResult, PutResult
from .hashing import Namespace, page_hashes, tokens_bytes
from .pb import pb, pb_grpc
from . import rebase
from .rebase import Rebase
from .record import Page
from .shm import Segment

log = logging.getLogger("kvc.client")

_DOWN_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
               grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}
PUT_RPC_BYTES = 256 << 20  # payload bytes per PutPages call
TRANSFER_BYTES_PER_S = 100e6  # deadline allowance for payloads, on top of the base timeout
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
# Namespace roots whose service root a client remembers (one per cache_salt: an engine whose
# clients send a salt a request would otherwise grow the map forever), and the pairs their tenant
# maps may hold together. Past either the least recently used root is dropped: its next lookup
# learns it again (a put of pages chained from pairs dropped is refused as unplaced meanwhile).
ROOTS_KEPT = 1024
PAIRS_KEPT = 4 * rebase.CAPACITY


_PUT_FRAMES = wire.frames_field(pb.PutPagesRequest)


class _BadAnswer:
    """A GetPagesResponse that did not parse: reading its frames raises the reason (a deserializer's
    exception would end the call as INTERNAL; the pages verified before it are kept instead)."""

    def __init__(self, error: Exception):
        self.reason = f"malformed GetPagesResponse: {error}"

    @property
    def frames(self):
        raise ValueError(self.reason)


def _read_get_pages(data: bytes):
    try:
        return wire.read_message(data, pb.GetPagesResponse)
    except Exception as e:  # ValueError naming the fault; anything else is malformed too
        return _BadAnswer(e)


DOWN_LOG_EVERY_S = 30.0  # an outage is logged when it starts, then at most this often, and when it ends
WATCH_EVERY_S = 1.0  # during an outage, how often a watcher asks whether the service answers again


class ServiceDown(Exception):
    """The service cannot be reached now (internal: public methods answer a miss instead)."""


class RemoteCache:
    def __init__(self, url: str, token: str | None = None, timeout: float = 2.0,
                 shared_memory: bool = False, root_certificates: bytes | None = None,
                 max_message_bytes: int = 64 << 20, chunk_bytes: int = wire.CHUNK_BYTES, metrics=None,
                 refused_token: str = "raise"):
        u = urlsplit(url)
        if u.scheme not in ("grpc", "grpcs") or not u.hostname or not u.port:
            raise ValueError(f"cache URL {url!r} must look like grpc://host:port or grpcs://host:port")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if refused_token not in ("raise", "miss"):
            raise ValueError(f"refused_token must be 'raise' or 'miss', got {refused_token!r}")
        # a call the service refuses for the token: PermissionError ("raise"), or a miss, logged and
        # shown as an outage ("miss": an engine, whose requests must not fail for its cache)
        self.refused_token = refused_token
        self.url, self.timeout, self.chunk_bytes = url, float(timeout), chunk_bytes
        target = f"{u.hostname}:{u.port}" if ":" not in u.hostname else f"[{u.hostname}]:{u.port}"
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.enable_retries", 0),
                   # own subchannels: gRPC otherwise shares one between channels with equal options,
                   # and an older client's connect back-off makes a new one fail on a live service
                   ("grpc.use_local_subchannel_pool", 1)]
        if u.scheme == "grpcs":
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.KVCacheStub(self._channel)
        # the page-carrying calls write and read their messages by hand (kvc.wire: no payload copies
        # in protobuf); the bytes on the wire are protobuf's own
        self._get_pages_rpc = self._channel.unary_stream(
            "/kvc.v1.KVCache/GetPages", request_serializer=pb.GetPagesRequest.SerializeToString,
            response_deserializer=_read_get_pages)
        self._put_pages_rpc = self._channel.stream_unary(
            "/kvc.v1.KVCache/PutPages", request_serializer=wire.as_bytes,
            response_deserializer=pb.PutPagesResponse.FromString)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._shm_wanted = shared_memory and u.hostname in _LOOPBACK
        self._shm: Segment | None = None
        self._shm_lock = threading.Lock()
        self._down_until = 0.0
        self._backoff = 0.05
        # an outage: since when (None: up), failed calls in it, when it was last logged
        self._down_since: float | None = None
        self._down_calls, self._down_logged = 0, 0.0
        self._watcher: threading.Thread | None = None  # _watch, during an outage
        self._closed = threading.Event()
        # kvc_degraded{component="service"}: 1 while the service cannot be reached (a KvcMetrics)
        self._m_down = metrics.degraded.labels(component="service") if metrics is not None else None
        if self._m_down is not None:
            self._m_down.set(0)
        # client root -> map to the tenant's chain (None: the service keeps the root), replaced when
        # the service's root for it changes (a restart with a new tenant secret)
        self._rebases: OrderedDict[bytes, Rebase | None] = OrderedDict()  # least recently used first

    # -- plumbing ------------------------------------------------------------------------------
    def _deadline(self, nbytes: int = 0) -> float:
        return self.timeout + nbytes / TRANSFER_BYTES_PER_S

    def _check_up(self) -> None:
        if time.monotonic() < self._down_until:
            raise ServiceDown(self.url)

    def _failed(self, e: grpc.RpcError) -> Exception:
        """The exception for a failed call: ServiceDown (and a back-off) or the caller's error."""
        code = e.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return ValueError(e.details())
        if code == grpc.StatusCode.UNAUTHENTICATED and self.refused_token == "raise":
            return PermissionError(f"cache service {self.url}: {e.details()}")
        now = time.monotonic()
        self._down_until = now + self._backoff
        self._backoff = min(2.0, self._backoff * 2)
        if self._down_since is None:  # a new outage: said once, then every DOWN_LOG_EVERY_S
            self._down_since, self._down_calls, self._down_logged = now, 1, now
            log.warning("cache service %s unavailable (%s: %s); answering misses until it is back",
                        self.url, code.name, e.details())
            if self._m_down is not None:
                self._m_down.set(1)
            if code != grpc.StatusCode.UNAUTHENTICATED and (self._watcher is None or not self._watcher.is_alive()):
                self._watcher = threading.Thread(target=self._watch, name="kvc-client-watch", daemon=True)
                self._watcher.start()  # an idle client learns of the service's return too
        else:
            self._down_calls += 1
            if now - self._down_logged >= DOWN_LOG_EVERY_S:
                self._down_logged = now
                log.warning("cache service %s still unavailable after %.0f s (%d failed calls; %s: %s)",
                            self.url, now - self._down_since, self._down_calls, code.name, e.details())
        return ServiceDown(self.url)

    def _watch(self) -> None:
        """During an outage, ask the service every WATCH_EVERY_S whether it answers (probe), so an
        idle engine's kvc_degraded{component="service"} clears without waiting for a call of its
        own. Ends with the outage or the client. (Not gRPC's connectivity subscription: a channel
        closed under it raises in gRPC's polling thread.)"""
        while not self._closed.wait(WATCH_EVERY_S) and self._down_since is not None:
            try:
                if not self.probe():
                    continue  # still away
            except (PermissionError, ValueError):  # it refuses the token, or the channel closed
                continue
            if self._down_since is not None:
                self._down_until = 0.0
                self._ok()
            return

    def _ok(self) -> None:
        self._backoff = 0.05
        since = self._down_since
        if since is not None:
            self._down_since = None
            log.warning("cache service %s reachable again after %.1f s (%d failed calls)",
                        self.url, time.monotonic() - since, self._down_calls)
            if self._m_down is not None:
                self._m_down.set(0)

    def _unary(self, method, request, nbytes: int = 0):
        self._check_up()
        try:
            resp = method(request, timeout=self._deadline(nbytes), metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._failed(e) from None
        self._ok()
        return resp

    def _rebase(self, ns: Namespace, service_root: bytes | None = None) -> Rebase | None:
        """None when the service keeps this namespace's root (no tenant salt applied). service_root:
        the root the service just answered with; a different one than before replaces the map
        (the pairs learned chain from a root the service no longer uses)."""
        root = ns.root
        known = root in self._rebases
        rb = self._rebases.get(root)
        if known:
            self._rebases.move_to_end(root)
        if known and service_root is not None and service_root != (root if rb is None else rb.service_root):
            log.warning("cache service %s changed namespace root %s to %s (restarted with a new tenant "
                        "secret?); relearning its page hashes", self.url, root.hex(), service_root.hex())
            known = False
        if not known:
            if service_root is None:
                service_root = self._service_root(ns)
            rb = self._rebases[root] = None if service_root == root else Rebase(root, service_root)
            self._rebases.move_to_end(root)
            self._bound_rebases()
        return rb

    def _bound_rebases(self) -> None:
        pairs = sum(len(x) for x in self._rebases.values() if x is not None)
        while len(self._rebases) > 1 and (len(self._rebases) > ROOTS_KEPT or pairs > PAIRS_KEPT):
            _, dropped = self._rebases.popitem(last=False)
            pairs -= len(dropped) if dropped is not None else 0

    def _service_root(self, ns: Namespace) -> bytes:
        return self._unary(self._stub.Lookup, pb.LookupRequest(namespace=wire.ns_to_pb(ns))).root

    def _segment(self, nbytes: int) -> Segment:
        if self._shm is None or self._shm.size < nbytes:
            if self._shm is not None:
                self._shm.close()
            self._shm = Segment.create(max(nbytes, 64 << 20))
        return self._shm

    # -- CacheBackend --------------------------------------------------------------------------
    def lookup(self, ns: Namespace, tokens: Sequence[int] | None = None,
               hashes: Sequence[bytes] | None = None) -> LookupResult:
        if tokens is None and hashes is None:
            raise ValueError("lookup needs tokens or page hashes")
        client_hashes = None if hashes is None else wire.check_hashes(hashes)
        try:
            known = ns.root in self._rebases
            rb = self._rebases.get(ns.root) if tokens is not None else self._rebase(ns)
            send = [] if client_hashes is None else client_hashes if rb is None else rb.to_service(client_hashes)
            if tokens is not None and not (known and rb is None):
                send = []  # the service hashes the tokens itself
            req = pb.LookupRequest(namespace=wire.ns_to_pb(ns), hashes=send,
                                   tokens_u32le=b"" if tokens is None else tokens_bytes(tokens))
            r = self._unary(self._stub.Lookup, req)
            rb = self._rebase(ns, r.root)
        except ServiceDown:
            hs = client_hashes if client_hashes is not None else page_hashes(ns.root, tokens, ns.spec.page_size)
            return LookupResult(hs)
        if rb is None:
            return LookupResult(list(r.hashes), dict(r.tiers), list(r.located))
        if client_hashes is None:
            client_hashes = page_hashes(ns.root, tokens, ns.spec.page_size)
            rb.learn(client_hashes, r.hashes)
            if len(self._rebases) > 1:
                self._bound_rebases()
        return LookupResult(client_hashes, dict(r.tiers), list(r.located))

    def get_pages(self, ns: Namespace, hashes: Sequence[bytes], out: torch.Tensor | None = None) -> list[Page]:
        hashes = wire.check_hashes(hashes)
        spec = ns.spec
        if out is not None and (tuple(out.shape[1:]) != spec.shape or out.shape[0] < len(hashes)
                                or str(out.dtype) != f"torch.{spec.dtype}"):
            raise ValueError(f"out must be a tensor [>={len(hashes)}, {spec.shape}] of {spec.dtype}")
        if out is not None and out.device.type != "cpu":  # assemble on the host, then one copy
            host = torch.empty((len(hashes), *spec.shape), dtype=out.dtype)
            pages = self.get_pages(ns, hashes, out=host)
            if pages:
                out[:len(pages)].copy_(host[:len(pages)])
            return [Page(p.hash, p.parent, p.tokens, out[i]) for i, p in enumerate(pages)]
        if not hashes:
            return []
        try:
            rb = self._rebase(ns)
        except ServiceDown:
            return []
        if rb is not None:
            pages = self._get_pages(ns, rb.to_service(hashes), out)
            mapped = [rb.page_to_client(p) for p in pages]
            return mapped[:mapped.index(None)] if None in mapped else mapped
        return self._get_pages(ns, hashes, out)

    def _get_pages(self, ns: Namespace, hashes: list[bytes], out) -> list[Page]:
        if not hashes:
            return []
        nbytes = len(hashes) * ns.spec.page_bytes
        if self._shm_wanted:
            with self._shm_lock:
                seg = self._segment(nbytes)
                try:
                    return self._get(ns, hashes, out, nbytes, seg)
                except _ShmRefused:
                    self._shm_wanted = False
        return self._get(ns, hashes, out, nbytes, None)

    def _get(self, ns, hashes, out, nbytes, seg) -> list[Page]:
        try:
            self._check_up()
        except ServiceDown:
            return []
        req = pb.GetPagesRequest(namespace=wire.ns_to_pb(ns), hashes=hashes)
        if seg is not None:
            req.shm.name, req.shm.size = seg.name, seg.size
        asm = wire.PageAssembler(ns.spec, out=out, shm=None if seg is None else seg.array,
                                 max_pages=len(hashes))
        try:
            for resp in self._get_pages_rpc(req, timeout=self._deadline(nbytes), metadata=self._metadata):
                asm.add_all(resp.frames)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and seg is not None:
                raise _ShmRefused() from None
            err = self._failed(e)
            if not isinstance(err, ServiceDown):
                raise err
            return asm.pages  # the pages completed (and verified) before the failure
        except ValueError as e:  # a malformed answer: keep what verified, never wrong bytes
            log.warning("cache service %s sent a bad page: %s", self.url, e)
            return asm.pages
        self._ok()
        pages = asm.pages
        for i, (p, h) in enumerate(zip(pages, hashes)):
            if p.hash != h:
                log.warning("cache service %s answered page %s for %s", self.url, p.hash.hex(), h.hex())
                return pages[:i]
        return pages

    def put_pages(self, ns: Namespace, pages: Sequence[Page], chain_continues: bool = False) -> PutResult:
        # chain_continues is advice for an in-process store; the service orders each call's chains itself
        for i, p in enumerate(pages):
            try:
                p.check(ns.spec)
            except ValueError as e:
                raise ValueError(f"page {i}: {e}") from None
        try:
            rb = self._rebase(ns)
        except ServiceDown:
            return PutResult(rejected=len(pages), reasons=(f"cache service {self.url} unavailable",))
        if rb is not None:
            for i, p in enumerate(pages):
                if xxhash.xxh3_128_digest(p.parent + tokens_bytes(p.tokens)) != p.hash:
                    raise ValueError(f"page {i}: hash {p.hash.hex()} is not xxh3_128(parent || tokens)")
        total = self._put_pages(ns, pages, rb)
        if rb is not None and any(BAD_PARENT_TAIL in r for r in total.reasons):
            # parents the service does not know: evicted, or chained from a root it no longer uses
            try:
                fresh = self._rebase(ns, self._service_root(ns))
            except ServiceDown:
                return total
            if fresh is not rb:
                total = self._put_pages(ns, pages, fresh)
        return total

    def _put_pages(self, ns: Namespace, pages: Sequence[Page], rb: Rebase | None) -> PutResult:
        total = PutResult()
        if rb is not None:
            pages, unplaced = rb.pages_to_service(pages)
            if unplaced:
                total = PutResult(rejected=unplaced, reasons=(f"{unplaced} pages have a parent this client "
                                                              "has not seen (tenant hashes)",))
        per_call = max(1, PUT_RPC_BYTES // ns.spec.page_bytes)
        for start in range(0, len(pages), per_call):
            batch = pages[start:start + per_call]
            try:
                total += self._put(ns, batch)
            except ServiceDown:
                rest = len(pages) - start
                return total + PutResult(rejected=rest, reasons=(f"cache service {self.url} unavailable",))
        return total

    def _put(self, ns: Namespace, pages: Sequence[Page]) -> PutResult:
        nbytes = len(pages) * ns.spec.page_bytes
        if self._shm_wanted:
            with self._shm_lock:
                seg = self._segment(nbytes)
                size = ns.spec.page_bytes
                for i, p in enumerate(pages):
                    seg.array[i * size:(i + 1) * size] = p.payload()
                try:
                    return self._put_call(ns, pages, nbytes, seg)
                except _ShmRefused:
                    self._shm_wanted = False
        return self._put_call(ns, pages, nbytes, None)

    def _put_call(self, ns, pages, nbytes, seg) -> PutResult:
        def requests():
            first = pb.PutPagesRequest(namespace=wire.ns_to_pb(ns))
            offsets = None
            if seg is not None:
                first.shm.name, first.shm.size = seg.name, seg.size
                offsets = [i * ns.spec.page_bytes for i in range(len(pages))]
            yield first
            yield from wire.page_wire(pages, _PUT_FRAMES, self.chunk_bytes, offsets)

        self._check_up()
        try:
            r = self._put_pages_rpc(requests(), timeout=self._deadline(nbytes), metadata=self._metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and seg is not None:
                raise _ShmRefused() from None
            raise self._failed(e) from None
        self._ok()
        return PutResult(r.stored, r.duplicate, r.rejected, tuple(r.reasons))

    def pin(self, ns: Namespace, hashes: Sequence[bytes], ttl_s: float | None = None) -> str:
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"pin ttl_s must be positive, got {ttl_s}")
        hashes = wire.check_hashes(hashes)
        try:
            rb = self._rebase(ns)
            req = pb.PinRequest(namespace=wire.ns_to_pb(ns), ttl_s=ttl_s or 0.0,
                                hashes=hashes if rb is None else rb.to_service(hashes))
            self._check_up()
            try:
                return self._stub.Pin(req, timeout=self._deadline(), metadata=self._metadata).lease_id
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    return ""  # over the tenant's pin budget: no lease, and the service is fine
                raise self._failed(e) from None
        except ServiceDown:
            return ""  # no lease: nothing is protected, and unpin("") is False

    def unpin(self, lease_id: str) -> bool:
        try:
            return self._unary(self._stub.Unpin, pb.UnpinRequest(lease_id=lease_id)).released
        except ServiceDown:
            return False

    def delete(self, ns: Namespace, hashes: Sequence[bytes] | None = None) -> int:
        hashes = None if hashes is None else wire.check_hashes(hashes)
        try:
            rb = None if hashes is None else self._rebase(ns)
            req = pb.DeleteRequest(namespace=wire.ns_to_pb(ns), whole_namespace=hashes is None,
                                   hashes=[] if hashes is None else hashes if rb is None else rb.to_service(hashes))
            return self._unary(self._stub.Delete, req).deleted
        except ServiceDown:
            return 0

    def probe(self) -> bool:
        """One call to the service, for a start-up check: True if it answered, False if it cannot
        be reached now; PermissionError if it refused this client's token (whatever
        refused_token says). Leaves the client's outage state alone."""
        try:
            self._stub.Stats(pb.StatsRequest(), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise PermissionError(f"cache service {self.url} refused the token: {e.details()}") from None
            return False
        return True

    def stats(self) -> dict:
        from google.protobuf.json_format import MessageToDict
        try:
            r = self._unary(self._stub.Stats, pb.StatsRequest())
        except ServiceDown:
            return {"available": False, "tiers": {}}
        return wire.to_plain(MessageToDict(r.stats))

    def close(self) -> None:
        self._closed.set()
        self._channel.close()
        with self._shm_lock:
            if self._shm is not None:
                self._shm.close()
                self._shm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _ShmRefused(Exception):
    """The service does not take shared memory (server.shared_memory off or another host)."""
