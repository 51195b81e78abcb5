"""Hash spec v1: namespaces and chained page hashes.

    root  = xxh3_128(b"kvc/v1" + canonical namespace encoding)
    h[i]  = xxh3_128(h[i-1] || tokens[i*P:(i+1)*P] as little-endian uint32),  h[-1] = root

Digests are the 16 big-endian bytes of xxh3_128 (xxhash's `digest()`). The namespace encoding is a
sequence of tagged fields, `tag_len:u8 tag value_len:u32le value`, in a fixed order; integers are
written as decimal ASCII. Nothing depends on Python's `hash()`, pickling or the process.
"""
from __future__ import annotations

import array
import ctypes
import functools
import logging
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import xxhash

from . import native

HASH_SPEC = b"kvc/v1"
log = logging.getLogger("kvc.hashing")
DIGEST_BYTES = 16


@dataclass(frozen=True)
class PageSpec:
    """The shape of one page's KV: [layers, kv_parts, page_size, kv_heads, head_dim].

    kv_parts is 2 for K and V, 1 for an MLA latent.
    """
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: str  # a torch dtype name: "float32", "bfloat16", "float16"
    kv_parts: int = 2

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size", "kv_parts"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"PageSpec.{name} must be a positive integer, got {v!r}")
        if self.kv_parts not in (1, 2):
            raise ValueError(f"PageSpec.kv_parts must be 1 (MLA latent) or 2 (K and V), got {self.kv_parts}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"PageSpec.dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")

    @property
    def layout(self) -> str:
        """"mla" (one latent part: compressed KV + rope key per token) or "kv" (per-head K and V).

        kv_parts is part of the namespace encoding, so the two layouts never share a chain root."""
        return "mla" if self.kv_parts == 1 else "kv"

    @functools.cached_property  # read per page on the put path: computed once per spec
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.kv_parts, self.page_size, self.num_kv_heads, self.head_dim)

    @functools.cached_property
    def page_bytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * DTYPE_BYTES[self.dtype]


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "uint8": 1}


@dataclass(frozen=True)
class Namespace:
    """What makes KV compatible: the model's fingerprint, the adapter and the tenant's salt."""
    architecture: str
    spec: PageSpec
    weights_digest: str = ""
    adapter: str = ""
    cache_salt: str = ""

    def encode(self) -> bytes:
        """The canonical tagged encoding (hash spec v1)."""
        items: list[tuple[str, str]] = [("architecture", self.architecture)]
        items += [(f"spec.{f.name}", str(getattr(self.spec, f.name))) for f in fields(PageSpec)]
        items += [("weights_digest", self.weights_digest), ("adapter", self.adapter),
                  ("cache_salt", self.cache_salt)]
        out = bytearray()
        for tag, value in items:
            t, v = tag.encode(), value.encode("utf-8")
            out += len(t).to_bytes(1, "little") + t + len(v).to_bytes(4, "little") + v
        return bytes(out)

    @functools.cached_property
    def root(self) -> bytes:
        """The chain root; computed once per object (it is read per page on hot paths)."""
        return namespace_root(self)

    def with_salt(self, salt: str) -> "Namespace":
        from dataclasses import replace
        return replace(self, cache_salt=salt)


def namespace_root(ns: Namespace) -> bytes:
    return xxhash.xxh3_128_digest(HASH_SPEC + ns.encode())


def tokens_bytes(tokens) -> bytes:
    """Token ids as little-endian uint32 bytes; ids outside uint32 are an error. Bytes are taken
    as that form already (an engine packs a prompt once and hands out slices)."""
    if isinstance(tokens, bytes):
        if len(tokens) % 4:
            raise ValueError(f"packed token ids must be whole uint32s, got {len(tokens)} bytes")
        return tokens
    if isinstance(tokens, np.ndarray) and tokens.dtype == np.dtype("<u4") and tokens.ndim == 1:
        return tokens.tobytes()  # already the wire form (e.g. a decoded tokens_u32le field)
    if isinstance(tokens, list) and sys.byteorder == "little":
        try:
            return array.array("I", tokens).tobytes()  # 3x faster than numpy for a list of ints
        except (OverflowError, TypeError):
            pass  # fall through for the error message (or numpy ints in the list)
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"token ids must be a flat sequence, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in uint32 (0 .. 4294967295)")
    return arr.astype("<u4").tobytes()


def chain_hash(parent: bytes, page_tokens: bytes) -> bytes:
    """One link of the chain: xxh3_128(parent || page tokens as little-endian uint32)."""
    return xxhash.xxh3_128_digest(parent + page_tokens)


def _page_hashes_python(root: bytes, raw: bytes, page_size: int) -> list[bytes]:
    step = 4 * page_size
    out: list[bytes] = []
    parent = root
    link = chain_hash
    for off in range(0, len(raw) - step + 1, step):
        parent = link(parent, raw[off:off + step])
        out.append(parent)
    return out


class _NativeChain:
    """chainhash.c's kvc_chain_hash: a run of pages in one C call. Loaded with ctypes.PyDLL, which
    keeps the GIL: the call is short (~30 ns a page), and an engine thread that let go of the GIL
    would wait a switch interval to get it back beside a busy put thread."""

    def __init__(self, path):
        lib = ctypes.PyDLL(str(path))
        fn = lib.kvc_chain_hash
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                       ctypes.c_void_p]
        fn.restype = ctypes.c_int
        self._fn = fn
        xx = ctypes.CDLL(xxhash._xxhash.__file__)  # the extension module itself: already loaded
        self._xxh3 = ctypes.cast(xx.XXH3_128bits, ctypes.c_void_p).value
        for P in (1, 16, 2048):  # short and long inputs (xxh3 has separate code paths), and the heap buffer
            raw = bytes(range(256)) * (3 * P // 64 + 1)
            raw = raw[:(len(raw) // (4 * P)) * 4 * P]
            root = xxhash.xxh3_128_digest(b"probe")
            if self(root, raw, P) != _page_hashes_python(root, raw, P):
                raise RuntimeError("kvc_chain_hash does not equal xxhash.xxh3_128_digest's chain")

    def __call__(self, root: bytes, raw: bytes, page_size: int) -> list[bytes]:
        step = 4 * page_size
        n = len(raw) // step
        if n == 0:
            return []
        out = ctypes.create_string_buffer(16 * n)
        if self._fn(root, raw, n, step, out, self._xxh3) != 0:
            raise MemoryError(f"kvc_chain_hash: no buffer for a page of {step} bytes")
        return np.frombuffer(out, dtype="V16").tolist()  # 16-byte bytes objects, 5x faster than slicing


_chain_libs: dict = {}


def _native_chain():
    cc = native.compiler()
    return native.once(_chain_libs, (cc, str(native.cache_dir())),
                       lambda: _NativeChain(native.build(Path(__file__).with_name("chainhash.c"),
                                                         "kvc_chainhash", cc)),
                       log, "hashing: native page chain unavailable",
                       "pages are hashed one xxhash call at a time")


# Below this the native call's set-up (~5 us: the library's lookup, ctypes, the output's conversion)
# costs more than the Python loop (~0.17 us a page); 2-core VM: 8 pages 1.6 / 5.6 us, 32: 5.5 / 6.4
NATIVE_MIN_PAGES = 32


def page_hashes(root: bytes, tokens, page_size: int) -> list[bytes]:
    """Chained hashes of every full page of `tokens`; a partial tail page is not hashed.

    `tokens`: ids, or their little-endian uint32 bytes. Long runs go through one native call
    (chainhash.c, built at first use; the Python loop where no compiler is)."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    raw = tokens if isinstance(tokens, bytes) else tokens_bytes(tokens)
    if len(raw) >= NATIVE_MIN_PAGES * 4 * page_size:
        lib = _native_chain()
        if lib is not None:
            return lib(root, raw, page_size)
    return _page_hashes_python(root, raw, page_size)
