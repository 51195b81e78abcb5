"""Pages and page records: the unit that crosses tiers, disk and wire.

A record is a fixed header, the token ids and the payload:

    magic b"KVCP" | version u16 | ns_root 16B | hash 16B | parent 16B | checksum u64 (xxh3_64 of
    payload) | n_tokens u32 | dtype (u8 length + ascii) | ndim u8 | shape u32 x ndim |
    payload_len u64 | tokens u32le x n_tokens | payload
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from .hashing import DIGEST_BYTES, DTYPE_BYTES, PageSpec

MAGIC = b"KVCP"
VERSION = 1
_FIXED = struct.Struct("<4sH16s16s16sQI")


class RecordError(ValueError):
    """A record that cannot be decoded or whose checksum does not match."""


class ChecksumError(RecordError):
    pass


def torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or name not in DTYPE_BYTES:
        raise ValueError(f"unsupported KV dtype {name!r}; use one of {sorted(DTYPE_BYTES)}")
    return dt


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def dtype_name(dt: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dt)  # per page on the put path
    if name is None:
        name = _DTYPE_NAMES[dt] = str(dt).removeprefix("torch.")
    return name


@dataclass
class Page:
    """The KV of one full page: its chained hash, its parent's hash, its token ids and the data.

    data is a CPU tensor shaped PageSpec.shape ([layers, kv_parts, page_size, kv_heads, head_dim]).
    """
    hash: bytes
    parent: bytes
    tokens: np.ndarray  # uint32, length page_size
    data: torch.Tensor

    def payload(self) -> np.ndarray:
        """The payload as a flat uint8 numpy view (no copy when data is contiguous on CPU)."""
        return self.data.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy()

    def check(self, spec: PageSpec) -> None:
        """Raise ValueError naming the problem when this page does not fit `spec`."""
        if len(self.hash) != DIGEST_BYTES or len(self.parent) != DIGEST_BYTES:
            raise ValueError(f"page hash and parent must be {DIGEST_BYTES} bytes")
        if len(self.tokens) != spec.page_size:
            raise ValueError(f"page has {len(self.tokens)} token ids, the namespace's page_size is {spec.page_size}")
        data = self.data
        if data.shape != spec.shape:  # torch.Size is a tuple
            raise ValueError(f"page data has shape {tuple(data.shape)}, expected {spec.shape}")
        if dtype_name(data.dtype) != spec.dtype:
            raise ValueError(f"page data has dtype {dtype_name(data.dtype)}, expected {spec.dtype}")


def as_tokens(tokens) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.dtype != np.uint32:
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
            raise ValueError("token ids must fit in uint32")
        arr = arr.astype(np.uint32)
    return arr


def checksum(payload) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def encode_header(ns_root: bytes, page: Page, payload: np.ndarray, csum: int | None = None) -> bytes:
    if csum is None:
        csum = checksum(payload)
    return pack_header(ns_root, page.hash, page.parent, csum, as_tokens(page.tokens).astype("<u4").tobytes(),
                       dtype_name(page.data.dtype), tuple(page.data.shape), payload.nbytes)


def record_len(tokens: bytes, dtype: str, shape: tuple[int, ...], payload_len: int) -> int:
    """len(pack_header(...)) + payload_len: a record's size, without building it."""
    return _FIXED.size + 2 + len(dtype.encode()) + 4 * len(shape) + 8 + len(tokens) + payload_len


def pack_header(ns_root: bytes, h: bytes, parent: bytes, csum: int, tokens: bytes, dtype: str,
                shape: tuple[int, ...], payload_len: int) -> bytes:
    """A record's header and token ids (tokens: little-endian uint32 bytes), from plain values: no
    tensor is made (torch's view ops hand the GIL over, which a put path beside a busy thread avoids)."""
    dt = dtype.encode()
    head = _FIXED.pack(MAGIC, VERSION, ns_root, h, parent, csum, len(tokens) // 4)
    head += struct.pack("<B", len(dt)) + dt + struct.pack("<B", len(shape))
    head += struct.pack(f"<{len(shape)}I", *shape) + struct.pack("<Q", payload_len)
    return head + tokens


def encode(ns_root: bytes, page: Page) -> bytes:
    """The page as one record (header + tokens + payload)."""
    payload = page.payload()
    return encode_header(ns_root, page, payload) + payload.tobytes()


@dataclass
class RecordInfo:
    ns_root: bytes
    hash: bytes
    parent: bytes
    checksum: int
    tokens: np.ndarray
    dtype: str
    shape: tuple[int, ...]
    payload_offset: int
    payload_len: int


def decode_header(buf, partial: bool = False) -> RecordInfo:
    """The record's header and tokens. partial: buf may stop after the tokens (a header-only read)."""
    mv = memoryview(buf)
    if len(mv) < _FIXED.size:
        raise RecordError(f"record is {len(mv)} bytes, shorter than its fixed header")
    magic, version, ns_root, h, parent, csum, n_tok = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise RecordError("not a kvc page record (bad magic)")
    if version != VERSION:
        raise RecordError(f"page record version {version} is not supported (this is {VERSION})")
    off = _FIXED.size
    try:
        (dlen,) = struct.unpack_from("<B", mv, off)
        dtype = bytes(mv[off + 1:off + 1 + dlen]).decode("ascii")
        off += 1 + dlen
        (ndim,) = struct.unpack_from("<B", mv, off)
        shape = struct.unpack_from(f"<{ndim}I", mv, off + 1)
        off += 1 + 4 * ndim
        (plen,) = struct.unpack_from("<Q", mv, off)
        off += 8
    except (struct.error, UnicodeDecodeError) as e:
        raise RecordError(f"truncated or malformed record header: {e}") from None
    if dtype not in DTYPE_BYTES:
        raise RecordError(f"record has unsupported dtype {dtype!r}")
    expected = DTYPE_BYTES[dtype]
    for d in shape:
        expected *= d
    if plen != expected:
        raise RecordError(f"record payload is {plen} bytes, but shape {shape} of {dtype} needs {expected}")
    tok_end = off + 4 * n_tok
    if len(mv) != tok_end + plen and not (partial and len(mv) >= tok_end):
        raise RecordError(f"record is {len(mv)} bytes, its header says {tok_end + plen}")
    if len(mv) < tok_end:
        raise RecordError(f"record is {len(mv)} bytes, its tokens end at {tok_end}")
    tokens = np.frombuffer(mv[off:tok_end], dtype="<u4").astype(np.uint32)
    return RecordInfo(ns_root, h, parent, csum, tokens, dtype, tuple(shape), tok_end, plen)


def decode(buf, verify: bool = True) -> tuple[RecordInfo, Page]:
    """Decode a record into a Page that owns a copy of the payload; raises ChecksumError on mismatch."""
    info = decode_header(buf)
    payload = memoryview(buf)[info.payload_offset:]
    if verify and checksum(payload) != info.checksum:
        raise ChecksumError(f"page {info.hash.hex()} failed its checksum")
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    data = data.view(torch_dtype(info.dtype)).reshape(info.shape)
    return info, Page(info.hash, info.parent, info.tokens, data)


def header_bytes(spec: PageSpec) -> int:
    """Bytes before the payload in a record of a page of `spec` (header and token ids)."""
    return _FIXED.size + 1 + len(spec.dtype) + 1 + 4 * len(spec.shape) + 8 + 4 * spec.page_size
