"""The kvc.v1.KVCache servicer: thin methods over a TieredStore (from_pb -> store call -> to_pb).

`_rpc` is the one place that admits a call (serving state, bearer token) and maps exceptions to
status codes. Store calls run in a thread pool (the store is thread-safe), so the event loop
only moves messages. With tokens configured, every namespace's cache_salt is replaced by one
derived from the caller's tenant and the service's secret (server.tenant_secret_file), so tenants
share no keys on any tier and none can compute another's.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import inspect
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch
from google.protobuf import struct_pb2

from kvc import wire
from kvc.backend import PinBudgetExceeded
from kvc.config import ServerConfig
from kvc.hashing import Namespace
from kvc.metrics import KvcMetrics
from kvc.pb import pb, pb_grpc
from kvc.record import torch_dtype
from kvc.shm import SegmentCache
from server.cache_events import EventHub

log = logging.getLogger("kvc.cache_service")

MAX_PUT_RPC_BYTES = 1 << 30  # payload bytes one PutPages stream may carry
MAX_GET_BATCH_BYTES = 64 << 20  # payload bytes fetched from the store per step of GetPages
# A PutPages message with at most this much payload in at most this many data frames is assembled
# on the event loop (a copy and the checksums of ~1 MiB, ~0.2 ms); larger ones, and shared-memory
# frames, on a worker thread. The hand-off to a thread and back cost more than the work: a 256 MiB
# stream put 0.184 -> 0.169 s, and a Lookup beside a steady put load p50 3.5 -> 2.1 ms but p99
# 8.3 -> 10.5 ms (benchmarks/probe_service_ab.py; RESULTS.md, thirty-fourth session, 2-core VM).
INLINE_PUT_BYTES, INLINE_PUT_FRAMES = 2 << 20, 32
GET_FRAMES = wire.frames_field(pb.GetPagesResponse)
STATS_SYNC_S = 10.0  # the longest Stats waits for queued disk writes
# the most a LookupResponse takes per page of the query: its hash (1 + 1 + 16 bytes) and, for a hit,
# its tier's name (1 + 1 + len("cluster")); and for the rest (root, tiers)
LOOKUP_PAGE_BYTES, LOOKUP_BASE_BYTES = 27, 256


class NotServing(Exception):
    pass


class Unauthenticated(Exception):
    pass


class TooLarge(Exception):
    pass


class ShmUnavailable(Exception):
    pass


_CODES = ((NotServing, grpc.StatusCode.UNAVAILABLE), (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
          (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED), (PinBudgetExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
          (ShmUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
          (ValueError, grpc.StatusCode.INVALID_ARGUMENT))


class Malformed:
    """A request whose bytes did not parse (the deserializer cannot abort; the method does)."""

    def __init__(self, type_name: str, error: Exception):
        self.reason = f"malformed {type_name}: {error}"


def _safe_parser(cls, read=None):
    read = read or cls.FromString

    def parse(data: bytes):
        try:
            return read(data)
        except Exception as e:  # DecodeError and friends: never a traceback, never UNKNOWN
            return Malformed(cls.DESCRIPTOR.name, e)
    return parse


def add_to_server(service: "CacheService", server) -> None:
    """Register the servicer with request parsers that turn undecodable bytes into INVALID_ARGUMENT."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["KVCache"].methods:
        req, resp = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(m.client_streaming, m.server_streaming)]
        # PutPages: payloads as views of the received bytes (kvc.wire)
        parse = _safe_parser(req, (lambda data: wire.read_message(data, pb.PutPagesRequest))
                             if req is pb.PutPagesRequest else None)
        # GetPages yields its messages already serialised (kvc.wire.page_wire)
        serialize = wire.as_bytes if resp is pb.GetPagesResponse else resp.SerializeToString
        handlers[m.name] = kind(getattr(service, m.name), request_deserializer=parse,
                                response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("kvc.v1.KVCache", handlers),))


def _parsed(request):
    if isinstance(request, Malformed):
        raise ValueError(request.reason)
    return request


def tenant_salt(secret: bytes, tenant: str, client_salt: str) -> str:
    """The salt the service applies for a tenant (the client's own salt partitions further).

    Keyed with the service's secret: without it no tenant can compute another's namespace root,
    so none can compute (and squat or graft onto) another's page hashes."""
    tag = hmac.new(secret, f"kvc-tenant\0{tenant}".encode(), hashlib.sha256).hexdigest()[:32]
    return f"tenant:{tag}:{client_salt}"


@dataclass(frozen=True)
class Caller:
    tenant: str | None
    secret: bytes = b""

    def namespace(self, msg: pb.Namespace) -> Namespace:
        ns = wire.ns_from_pb(msg)
        return ns if self.tenant is None else ns.with_salt(tenant_salt(self.secret, self.tenant, ns.cache_salt))


def _rpc(fn):
    """Admit the call, time it, and turn exceptions into status codes (unary and server streams)."""
    name = fn.__name__

    async def fail(self, context, e: BaseException):
        if isinstance(e, (asyncio.CancelledError, grpc.aio.AbortError)):
            raise e
        for exc, code in _CODES:
            if isinstance(e, exc):
                await context.abort(code, str(e) or exc.__name__)
        log.exception("%s failed", name)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}")

    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def stream(self, request, context):
            t0 = time.perf_counter()
            try:
                caller = self._admit(context)
                with self.metrics.rpc_in_flight.track_inprogress():
                    async for item in fn(self, _parsed(request), context, caller):
                        yield item
            except BaseException as e:
                await fail(self, context, e)
            finally:
                self.metrics.rpc_duration.labels(method=name).observe(time.perf_counter() - t0)
        return stream

    @functools.wraps(fn)
    async def unary(self, request, context):
        t0 = time.perf_counter()
        try:
            caller = self._admit(context)
            with self.metrics.rpc_in_flight.track_inprogress():
                return await fn(self, request if fn.__name__ == "PutPages" else _parsed(request), context, caller)
        except BaseException as e:
            await fail(self, context, e)
        finally:
            self.metrics.rpc_duration.labels(method=name).observe(time.perf_counter() - t0)
    return unary


def _pages_view(flat: torch.Tensor, spec, n: int) -> torch.Tensor:
    """n pages' bytes (a flat uint8 tensor) as the [n, *shape] tensor of spec's dtype over them."""
    return flat.view(torch_dtype(spec.dtype)).view(n, *spec.shape)


class CacheService(pb_grpc.KVCacheServicer):
    def __init__(self, config: ServerConfig, metrics: KvcMetrics, workers: int = 4,
                 tenant_secret: bytes | None = None):
        self.config = config
        self.metrics = metrics
        self.store = None  # set by serve() once the store is open
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvc-rpc")
        self._local = threading.local()  # a worker's GetPages staging buffer (<= MAX_GET_BATCH_BYTES)
        self.events = EventHub()
        self.segments = SegmentCache()
        self._tokens = {t.encode(): tenant for t, tenant in (config.auth_tokens or {}).items()}
        self._lease_key = secrets.token_bytes(32)
        self._tenant_secret = tenant_secret or secrets.token_bytes(32)  # per process unless kept
        self._stopping = False
        self.inflight_bytes = 0  # page bytes held by PutPages / GetPages calls (event loop only)

    # -- lifecycle (called by server.cache_server) ---------------------------------------------
    def serve(self, store) -> None:
        self.store = store
        self.events.attach(store, asyncio.get_running_loop())

    def begin_shutdown(self) -> None:
        self._stopping = True
        self.events.close()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.segments.close()

    # -- admission -----------------------------------------------------------------------------
    def _admit(self, context) -> Caller:
        if self.store is None or self._stopping:
            raise NotServing("the cache service is " + ("shutting down" if self._stopping else "starting"))
        if not self._tokens:
            return Caller(None)
        auth = dict(context.invocation_metadata() or ()).get("authorization", "")
        given = auth[7:].encode() if auth.startswith("Bearer ") else b""
        tenant = None
        for token, name in self._tokens.items():  # compare against every token, in constant time
            if hmac.compare_digest(token, given):
                tenant = name
        if tenant is None:
            raise Unauthenticated("a valid bearer token is required" if given else
                                  "missing bearer token (metadata 'authorization: Bearer <token>')")
        return Caller(tenant, self._tenant_secret)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _reserve(self, nbytes: int, method: str) -> int:
        """Count nbytes against server.max_inflight_bytes, or refuse before holding them."""
        budget = self.config.max_inflight_bytes
        if self.inflight_bytes + nbytes > budget:
            self.metrics.inflight_refused.labels(method=method).inc()
            raise TooLarge(f"the service holds {self.inflight_bytes} page bytes for calls in progress and "
                           f"{method} needs {nbytes} more (server.max_inflight_bytes = {budget}); retry later")
        self.inflight_bytes += nbytes
        return nbytes

    def _segment(self, msg: pb.SharedMemory):
        if not self.config.shared_memory:
            raise ShmUnavailable("shared memory is off on this service (server.shared_memory)")
        return self.segments.get(msg.name, msg.size)

    def _lease_mac(self, caller: Caller, lease: str) -> str:
        return hmac.new(self._lease_key, f"{caller.tenant}\0{lease}".encode(), hashlib.sha256).hexdigest()[:24]

    # -- methods -------------------------------------------------------------------------------
    @_rpc
    async def Lookup(self, request, context, caller):
        ns = caller.namespace(request.namespace)
        hashes = wire.check_hashes(request.hashes) or None
        tokens = wire.lookup_tokens(request)
        tokens = tokens if len(tokens) or hashes is None else None
        if hashes is not None and tokens is not None and len(tokens) // ns.spec.page_size != len(hashes):
            raise ValueError(f"{len(hashes)} hashes given for {len(tokens) // ns.spec.page_size} full pages of tokens")
        self._check_lookup_reply(len(hashes) if tokens is None else len(tokens) // ns.spec.page_size)
        r = await self._run(self.store.lookup, ns, tokens, hashes)
        return pb.LookupResponse(hashes=r.hashes, tiers=r.tiers, located=r.located, root=ns.root)

    def _check_lookup_reply(self, pages: int) -> None:
        """Refuse, before any hashing, a Lookup whose answer could pass server.max_message_bytes
        (gRPC would fail it only once computed, as "Sent message larger than max")."""
        limit = self.config.max_message_bytes
        if LOOKUP_BASE_BYTES + pages * LOOKUP_PAGE_BYTES > limit:
            most = (limit - LOOKUP_BASE_BYTES) // LOOKUP_PAGE_BYTES
            raise TooLarge(f"a Lookup of {pages} pages could answer more than server.max_message_bytes = {limit} "
                           f"bytes ({LOOKUP_PAGE_BYTES} a page); look up at most {most} pages a call")

    @_rpc
    async def GetPages(self, request, context, caller):
        ns = caller.namespace(request.namespace)
        hashes = wire.check_hashes(request.hashes)
        seg = self._segment(request.shm) if request.HasField("shm") else None
        # a batch is a quarter of the in-flight budget at most, so a small budget still serves big gets
        per_batch = max(1, min(MAX_GET_BATCH_BYTES, self.config.max_inflight_bytes // 4) // ns.spec.page_bytes)
        if seg is not None and len(hashes) * ns.spec.page_bytes > seg.size:
            raise ValueError(f"shared-memory segment of {seg.size} bytes is too small for "
                             f"{len(hashes)} pages of {ns.spec.page_bytes} bytes")
        for start in range(0, len(hashes), per_batch):
            if context.time_remaining() is not None and context.time_remaining() <= 0:
                return
            batch = hashes[start:start + per_batch]
            held = self._reserve(0 if seg is not None else len(batch) * ns.spec.page_bytes, "GetPages")
            try:
                messages, complete = await self._run(self._get_batch, ns, batch, seg, start)
                for m in messages:
                    yield m
            finally:
                self.inflight_bytes -= held
            if not complete:
                return

    def _get_batch(self, ns: Namespace, hashes, seg, first: int):
        """The store's pages straight into the caller's shared-memory segment, or into this worker
        thread's staging buffer and from there into the messages' bytes. (Fresh tensors a batch
        cost a page fault every 4 KiB: the store's get into them ran at ~3 GB/s on the 2-core VM,
        into a reused buffer at ~14, bench_tiers.)"""
        spec = ns.spec
        size, n = spec.page_bytes, len(hashes)
        if seg is not None:
            out = _pages_view(torch.from_numpy(seg.array[first * size:(first + n) * size]), spec, n)
            pages = self.store.get_pages(ns, hashes, out=out)
            offsets = [(first + i) * size for i in range(len(pages))]
            messages = list(wire.page_wire(pages, GET_FRAMES, shm_offsets=offsets))
        else:
            buf = getattr(self._local, "staging", None)
            if buf is None or buf.numel() < n * size:  # the largest batch so far, per worker thread
                buf = self._local.staging = torch.empty(n * size, dtype=torch.uint8)
            pages = self.store.get_pages(ns, hashes, out=_pages_view(buf[:n * size], spec, n))
            messages = list(wire.page_wire(pages, GET_FRAMES))  # serialised: the payloads copied out
        return messages, len(pages) == n

    @_rpc
    async def PutPages(self, requests, context, caller):
        held = []  # bytes reserved per message, released when the call ends however it ends
        try:
            return await self._put_pages(requests, caller, held)
        finally:
            self.inflight_bytes -= sum(held)

    async def _put_pages(self, requests, caller, held: list[int]):
        assembler = ns = None
        async for req in requests:
            req = _parsed(req)
            nbytes = sum(len(f.data) for f in req.frames)
            held.append(self._reserve(nbytes, "PutPages"))
            if assembler is None:
                if not req.HasField("namespace"):
                    raise ValueError("the first PutPages message must carry the namespace")
                ns = caller.namespace(req.namespace)
                seg = self._segment(req.shm) if req.HasField("shm") else None
                assembler = wire.PageAssembler(ns.spec, shm=None if seg is None else seg.array)
            elif req.HasField("namespace") or req.HasField("shm"):
                raise ValueError("only the first PutPages message may carry namespace and shm")
            if req.frames:
                if (nbytes <= INLINE_PUT_BYTES and len(req.frames) <= INLINE_PUT_FRAMES
                        and all(f.shm_offset is None for f in req.frames)):
                    assembler.add_all(req.frames)
                else:
                    await self._run(assembler.add_all, req.frames)
            if assembler.bytes > MAX_PUT_RPC_BYTES:
                raise TooLarge(f"PutPages carried more than {MAX_PUT_RPC_BYTES} payload bytes; "
                               "split the pages over several calls")
        if assembler is None:
            return pb.PutPagesResponse()
        pages = assembler.finish()
        r = await self._run(self.store.put_pages, ns, pages)
        return pb.PutPagesResponse(stored=r.stored, duplicate=r.duplicate, rejected=r.rejected,
                                   reasons=list(r.reasons))

    @_rpc
    async def Pin(self, request, context, caller):
        ns = caller.namespace(request.namespace)
        hashes = wire.check_hashes(request.hashes)
        if request.ttl_s < 0 or request.ttl_s != request.ttl_s:
            raise ValueError(f"ttl_s must be positive (or 0 for the default), got {request.ttl_s}")
        lease = await self._run(self.store.pin, ns, hashes, request.ttl_s or None, caller.tenant)
        return pb.PinResponse(lease_id=f"{lease}.{self._lease_mac(caller, lease)}")

    @_rpc
    async def Unpin(self, request, context, caller):
        lease, _, mac = request.lease_id.rpartition(".")
        # bytes: compare_digest raises TypeError on a str that is not ASCII
        if not lease or not hmac.compare_digest(mac.encode(), self._lease_mac(caller, lease).encode()):
            return pb.UnpinResponse(released=False)  # not a lease this caller was given
        return pb.UnpinResponse(released=await self._run(self.store.unpin, lease))

    @_rpc
    async def Delete(self, request, context, caller):
        ns = caller.namespace(request.namespace)
        hashes = wire.check_hashes(request.hashes)
        if request.whole_namespace and hashes:
            raise ValueError("Delete takes hashes or whole_namespace, not both")
        n = await self._run(self.store.delete, ns, None if request.whole_namespace else hashes)
        return pb.DeleteResponse(deleted=n)

    @_rpc
    async def Stats(self, request, context, caller):
        # Stats is the durability point: the answer comes once the disk writes queued before
        # the call are committed (tiers.disk.synced), so a client that sees a page on the disk
        # tier in a Lookup made before Stats knows it survives a crash of the service.
        synced = await self._run(self.store.sync, STATS_SYNC_S)
        stats = await self._run(self.store.stats)
        if "disk" in stats["tiers"]:
            stats["tiers"]["disk"]["synced"] = synced
        msg = struct_pb2.Struct()
        msg.update(stats)
        return pb.StatsResponse(stats=msg)

    @_rpc
    async def WatchEvents(self, request, context, caller):
        root = None
        if request.HasField("namespace"):
            root = caller.namespace(request.namespace).root
        elif caller.tenant is not None:
            raise ValueError("WatchEvents needs a namespace when bearer tokens are configured")
        async for ev in self.events.watch(root):
            yield ev
