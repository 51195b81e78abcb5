"""Wire form of namespaces and pages for the kvc.v1.KVCache gRPC API (client and service).

A page travels as frames: the first carries its header (hash, parent, tokens, checksum, size),
and the frames' data concatenate to the payload; a message holds at most `chunk_bytes` of data,
so a page larger than gRPC's message limit spans several messages. With shared memory the
payload lies in a /dev/shm segment and the header frame carries its offset instead.
Everything received is checked here; a bad frame raises ValueError naming the problem.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import xxhash

from .hashing import DIGEST_BYTES, Namespace, PageSpec
from .pb import pb
from .record import Page, as_tokens, checksum, torch_dtype

CHUNK_BYTES = 1 << 20  # payload bytes per message, well under gRPC's default 4 MiB limit
MAX_PAGE_BYTES = 1 << 30


def ns_to_pb(ns: Namespace) -> pb.Namespace:
    s = ns.spec
    return pb.Namespace(architecture=ns.architecture, weights_digest=ns.weights_digest,
                        adapter=ns.adapter, cache_salt=ns.cache_salt,
                        spec=pb.PageSpec(num_layers=s.num_layers, num_kv_heads=s.num_kv_heads,
                                         head_dim=s.head_dim, page_size=s.page_size, dtype=s.dtype,
                                         kv_parts=s.kv_parts))


def ns_from_pb(msg: pb.Namespace) -> Namespace:
    """The namespace of a request; ValueError naming the field when it is missing or invalid."""
    if not msg.architecture:
        raise ValueError("namespace.architecture is required")
    if not msg.HasField("spec"):
        raise ValueError("namespace.spec is required")
    s = msg.spec
    try:
        spec = PageSpec(num_layers=s.num_layers, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                        page_size=s.page_size, dtype=s.dtype, kv_parts=s.kv_parts)
    except ValueError as e:
        raise ValueError(f"namespace.spec: {e}") from None
    if spec.page_bytes > MAX_PAGE_BYTES:
        raise ValueError(f"namespace.spec describes pages of {spec.page_bytes} bytes, "
                         f"more than the {MAX_PAGE_BYTES} allowed")
    return Namespace(msg.architecture, spec, msg.weights_digest, msg.adapter, msg.cache_salt)


def lookup_tokens(req: pb.LookupRequest) -> np.ndarray:
    """The prompt of a LookupRequest, from `tokens` or `tokens_u32le` (not both)."""
    if req.tokens_u32le:
        if req.tokens:
            raise ValueError("give tokens or tokens_u32le, not both")
        if len(req.tokens_u32le) % 4:
            raise ValueError(f"tokens_u32le is {len(req.tokens_u32le)} bytes, not a multiple of 4")
        return np.frombuffer(req.tokens_u32le, dtype="<u4")
    return np.asarray(req.tokens, dtype=np.uint32)


def check_hashes(hashes: Iterable[bytes], what: str = "hashes") -> list[bytes]:
    out = [bytes(h) for h in hashes]
    for i, h in enumerate(out):
        if len(h) != DIGEST_BYTES:
            raise ValueError(f"{what}[{i}] is {len(h)} bytes; page hashes are {DIGEST_BYTES} bytes")
    return out


def _header(page: Page, payload: np.ndarray, into: pb.PageHeader) -> None:
    into.hash, into.parent = page.hash, page.parent
    into.tokens.extend(as_tokens(page.tokens).tolist())
    into.checksum, into.payload_bytes = checksum(payload), payload.nbytes


def page_messages(pages: Sequence[Page], new_message, chunk_bytes: int = CHUNK_BYTES,
                  shm_offsets: Sequence[int] | None = None, max_frames: int = 256) -> Iterator:
    """Messages (from `new_message()`, with a repeated `frames` field) carrying the pages.

    Each message holds at most chunk_bytes of payload: small pages share a message, a large page
    spans several. With shm_offsets the payloads are already in shared memory at those offsets,
    and each page is one header frame. Frames are built in place (no intermediate copies).
    """
    msg, size = new_message(), 0
    for i, page in enumerate(pages):
        payload = page.payload()
        if shm_offsets is not None:
            if len(msg.frames) >= max_frames:
                yield msg
                msg = new_message()
            f = msg.frames.add()
            _header(page, payload, f.header)
            f.shm_offset = shm_offsets[i]
            continue
        for off in range(0, max(payload.nbytes, 1), chunk_bytes):
            n = min(chunk_bytes, payload.nbytes - off)
            if len(msg.frames) and (size + n > chunk_bytes or len(msg.frames) >= max_frames):
                yield msg
                msg, size = new_message(), 0
            f = msg.frames.add()
            if off == 0:
                _header(page, payload, f.header)
            f.data = payload[off:off + n].tobytes()
            size += n
    if len(msg.frames):
        yield msg


class PageAssembler:
    """Turns received frames back into verified pages of one namespace.

    Each completed page is checked: header fields, payload size, xxh3_64 checksum, and
    hash == xxh3_128(parent || tokens). `out` ([n, *shape]) receives the payloads in place.
    `shm` is a uint8 numpy view of a shared-memory segment for frames that carry offsets.
    """

    def __init__(self, spec: PageSpec, out: torch.Tensor | None = None, shm: np.ndarray | None = None,
                 max_pages: int | None = None):
        self.spec = spec
        self.out = out
        self.shm = shm
        self.max_pages = max_pages
        self.pages: list[Page] = []
        self._cur: tuple[pb.PageHeader, np.ndarray, torch.Tensor] | None = None
        self._filled = 0
        self.bytes = 0

    def _start(self, header: pb.PageHeader) -> None:
        i = len(self.pages)
        spec = self.spec
        if self.max_pages is not None and i >= self.max_pages:
            raise ValueError(f"more pages than the {self.max_pages} requested")
        if len(header.hash) != DIGEST_BYTES or len(header.parent) != DIGEST_BYTES:
            raise ValueError(f"page {i}: hash and parent must be {DIGEST_BYTES} bytes")
        if len(header.tokens) != spec.page_size:
            raise ValueError(f"page {i}: {len(header.tokens)} token ids, page_size is {spec.page_size}")
        if header.payload_bytes != spec.page_bytes:
            raise ValueError(f"page {i}: payload of {header.payload_bytes} bytes, the namespace's "
                             f"pages are {spec.page_bytes} bytes")
        if self.out is not None:
            data = self.out[i]
        else:
            data = torch.empty(spec.shape, dtype=torch_dtype(spec.dtype))
        self._cur = (header, data.view(torch.uint8).reshape(-1).numpy(), data)
        self._filled = 0

    def add(self, frame: pb.PageFrame) -> None:
        if frame.HasField("header"):
            if self._cur is not None:
                raise ValueError(f"page {len(self.pages)}: a new page began before its payload was complete")
            self._start(frame.header)
        elif self._cur is None:
            raise ValueError("a data frame arrived before any page header")
        header, flat, _ = self._cur
        if frame.HasField("shm_offset"):
            if self.shm is None:
                raise ValueError("a frame names a shared-memory offset, but no segment was given")
            off, n = frame.shm_offset, flat.nbytes
            if frame.data or off + n > self.shm.nbytes:
                raise ValueError(f"page {len(self.pages)}: shared-memory slice [{off}, {off + n}) "
                                 f"is outside the {self.shm.nbytes}-byte segment")
            flat[:] = self.shm[off:off + n]
            self._filled = n
        elif frame.data:
            n = len(frame.data)
            if self._filled + n > flat.nbytes:
                raise ValueError(f"page {len(self.pages)}: more payload than its {flat.nbytes} bytes")
            flat[self._filled:self._filled + n] = np.frombuffer(frame.data, dtype=np.uint8)
            self._filled += n
        if self._filled == flat.nbytes:
            self._finish()

    def add_all(self, frames: Iterable[pb.PageFrame]) -> None:
        for f in frames:
            self.add(f)

    def _finish(self) -> None:
        header, flat, data = self._cur
        i = len(self.pages)
        if checksum(flat) != header.checksum:
            raise ValueError(f"page {i} ({header.hash.hex()}): payload fails its xxh3_64 checksum")
        tokens = np.asarray(header.tokens, dtype=np.uint32)
        if xxhash.xxh3_128_digest(header.parent + tokens.astype("<u4").tobytes()) != header.hash:
            raise ValueError(f"page {i}: hash {header.hash.hex()} is not xxh3_128(parent || tokens)")
        self.pages.append(Page(header.hash, header.parent, tokens, data))
        self.bytes += flat.nbytes
        self._cur = None

    def finish(self) -> list[Page]:
        if self._cur is not None:
            raise ValueError(f"page {len(self.pages)}: stream ended inside its payload "
                             f"({self._filled} of {self._cur[1].nbytes} bytes)")
        return self.pages


def to_plain(value):
    """A Struct value back to Python: integral floats become ints (Struct numbers are doubles)."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value

