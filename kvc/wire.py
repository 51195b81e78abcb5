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
from google.protobuf.message import DecodeError

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


# Page-carrying messages (GetPagesResponse, PutPagesRequest) are written and read here by hand, in
# protobuf's own encoding: through protobuf a payload byte was copied five times on its way (out of
# the page, into the message, into its serialisation; into the parsed message, out of it on every
# read of the field; benchmarks/probe_wire.py times both paths). By hand a message is one join
# of its small parts with views of the payloads, and a received payload is a view of the received
# bytes. Any protobuf library reads what this writes and writes what this reads (tests compare both
# ways, byte for byte, and on corrupted input).

MAX_GROUP_DEPTH = 100  # nested unknown groups a message may hold (protobuf's own recursion limit)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(field: int, n: int) -> bytes:
    """The key and length of a length-delimited field of n bytes."""
    return _varint(field << 3 | 2) + _varint(n)


def as_bytes(message) -> bytes:
    """A gRPC serializer for calls whose messages are written by hand (page_wire) or by protobuf."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def frames_field(message_type) -> int:
    """The field number of a page-carrying message type's repeated `frames`."""
    return message_type.DESCRIPTOR.fields_by_name["frames"].number


def page_wire(pages: Sequence[Page], field: int, chunk_bytes: int = CHUNK_BYTES,
              shm_offsets: Sequence[int] | None = None, max_frames: int = 256) -> Iterator[bytes]:
    """Serialised messages of one type whose repeated `frames` (field number `field`) carry the
    pages, and nothing else: at most chunk_bytes of payload a message (small pages share one, a
    large page spans several), at most max_frames frames. With shm_offsets the payloads are already
    in shared memory at those offsets and each page is one header frame. Each message is one copy
    of its payloads (the bytes equal protobuf's serialisation of the same message: tested)."""
    parts: list = []
    frames = size = 0
    hkey, dkey, okey = _varint(1 << 3 | 2), _varint(2 << 3 | 2), _varint(3 << 3 | 0)
    for i, page in enumerate(pages):
        payload = page.payload()
        h = pb.PageHeader()
        _header(page, payload, h)
        hb = h.SerializeToString()
        head = hkey + _varint(len(hb)) + hb
        if shm_offsets is not None:
            if frames >= max_frames:
                yield b"".join(parts)
                parts, frames = [], 0
            body = head + okey + _varint(shm_offsets[i])
            parts += [_len_field(field, len(body)), body]
            frames += 1
            continue
        flat = payload.reshape(-1).data
        for off in range(0, max(payload.nbytes, 1), chunk_bytes):
            n = min(chunk_bytes, payload.nbytes - off)
            if frames and (size + n > chunk_bytes or frames >= max_frames):
                yield b"".join(parts)
                parts, frames, size = [], 0, 0
            first = head if off == 0 else b""
            data = dkey + _varint(n) if n else b""  # proto3 leaves an empty bytes field out
            parts += [_len_field(field, len(first) + len(data) + n), first, data, flat[off:off + n]]
            frames += 1
            size += n
    if frames:
        yield b"".join(parts)


def page_messages(pages: Sequence[Page], new_message, chunk_bytes: int = CHUNK_BYTES,
                  shm_offsets: Sequence[int] | None = None, max_frames: int = 256) -> Iterator:
    """page_wire's messages built field by field through protobuf, as objects of type new_message
    (GetPagesResponse or PutPagesRequest): for callers that build requests for a generated stub
    (tests, tools), and the reference page_wire is tested against (their serialisations are equal)."""
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


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise ValueError("message ends inside a varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
        if shift >= 70:
            raise ValueError("a varint longer than 10 bytes")


def _fields(buf: memoryview, pos: int, end: int, group: int = 0, depth: int = 0):
    """(field number, wire type, value) of each field of buf[pos:end]: an int for varint and fixed
    fields, (start, stop) for length-delimited ones; groups (unused by this API) are skipped as
    protobuf skips unknown ones. ValueError names what is malformed."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wt = key >> 3, key & 7
        if field == 0 or key > 0xFFFFFFFF:
            raise ValueError(f"invalid field key {key}")
        if wt == 0:
            v, pos = _read_varint(buf, pos, end)
        elif wt in (1, 5):
            w = 8 if wt == 1 else 4
            if pos + w > end:
                raise ValueError("message ends inside a fixed-width field")
            v = int.from_bytes(buf[pos:pos + w], "little")
            pos += w
        elif wt == 2:
            n, pos = _read_varint(buf, pos, end)
            if n > end - pos:
                raise ValueError(f"field {field}: {n} bytes, past the end of its message")
            v = (pos, pos + n)
            pos += n
        elif wt == 3:  # an unknown group: skip to its end
            if depth >= MAX_GROUP_DEPTH:
                raise ValueError(f"groups nested deeper than {MAX_GROUP_DEPTH}")
            pos = _skip_group(buf, pos, end, field, depth + 1)
            continue
        elif wt == 4:
            if field != group:
                raise ValueError(f"end of group {field} outside it")
            yield field, wt, pos
            return
        else:
            raise ValueError(f"field {field}: invalid wire type {wt}")
        yield field, wt, v
    if group:
        raise ValueError(f"message ends inside group {group}")


def _skip_group(buf: memoryview, pos: int, end: int, field: int, depth: int) -> int:
    for f, wt, v in _fields(buf, pos, end, field, depth):
        if wt == 4:
            return v
    raise ValueError(f"message ends inside group {field}")


class WireFrame:
    """A received PageFrame: its header (a pb.PageHeader, None when absent), its data (a view of
    the received bytes, no copy) and its shm_offset (None when absent); HasField as protobuf's."""
    __slots__ = ("header", "data", "shm_offset")

    def __init__(self, header, data, shm_offset):
        self.header, self.data, self.shm_offset = header, data, shm_offset

    def HasField(self, name: str) -> bool:
        return getattr(self, name) is not None


class WireMessage:
    """A received page-carrying message: `frames` (WireFrames) and its other message fields parsed
    by protobuf (`HasField`, attributes by name; an absent one reads as its empty message)."""

    def __init__(self, message_type, frames: list[WireFrame], others: dict):
        self._type, self.frames, self._others = message_type, frames, others

    def HasField(self, name: str) -> bool:
        return name in self._others

    def __getattr__(self, name: str):
        fd = self.__dict__["_type"].DESCRIPTOR.fields_by_name.get(name)
        if fd is None or fd.message_type is None:
            raise AttributeError(name)
        got = self.__dict__["_others"].get(name)
        return got if got is not None else getattr(pb, fd.message_type.name)()


def _read_frame(buf: memoryview, pos: int, end: int) -> WireFrame:
    header = data = offset = None
    for f, wt, v in _fields(buf, pos, end):
        if f == 1 and wt == 2:  # a message field seen twice merges: its parts concatenate
            header = (header or []) + [buf[v[0]:v[1]]]
        elif f == 2 and wt == 2:
            data = buf[v[0]:v[1]]  # the last one wins, as protobuf's
        elif f == 3 and wt == 0:
            offset = v
    if header is not None:
        header = _parse(pb.PageHeader, b"".join(header))
    return WireFrame(header, data if data is not None else buf[0:0], offset)


def read_message(data: bytes, message_type) -> WireMessage:
    """A serialised GetPagesResponse or PutPagesRequest, read without copying its payloads (the
    frames' data are views of `data`). Its other fields are embedded messages, parsed by protobuf.
    ValueError names what is malformed."""
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    want = frames_field(message_type)
    names = {fd.number: fd.name for fd in message_type.DESCRIPTOR.fields if fd.message_type is not None}
    frames, others = [], {}
    for f, wt, v in _fields(buf, 0, len(buf)):
        if wt != 2:
            continue  # a known field of another wire type is an unknown field to protobuf too
        if f == want:
            frames.append(_read_frame(buf, v[0], v[1]))
        elif f in names:
            others.setdefault(names[f], []).append(buf[v[0]:v[1]])
    parsed = {name: _parse(getattr(pb, message_type.DESCRIPTOR.fields_by_name[name].message_type.name),
                           b"".join(chunks)) for name, chunks in others.items()}
    return WireMessage(message_type, frames, parsed)


def _parse(message_type, data: bytes):
    try:
        return message_type.FromString(data)
    except DecodeError as e:
        raise ValueError(f"{message_type.DESCRIPTOR.name}: {e}") from None


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
        else:
            data = frame.data  # each read of a bytes field is a new copy of it (upb): read once
            n = len(data)
            if self._filled + n > flat.nbytes:
                raise ValueError(f"page {len(self.pages)}: more payload than its {flat.nbytes} bytes")
            if n:
                flat[self._filled:self._filled + n] = np.frombuffer(data, dtype=np.uint8)
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

