"""The page checksum (xxh3_64 of the payload, seed 0) computed on the GPU, in Triton.

A cpu-tier hit on CUDA copies pages from the pinned slab to the device, and every read verifies
the page checksum. Verified on the host, the checksum pass reads the slab while the copy engine
reads it too: on the H200 host the two readers share its memory bandwidth and the get ran at ~30
GB/s against 55 GB/s for the copy alone (benchmarks/probe_load_path.py). Verified here, the bytes
are read once from host memory (by the copy) and hashed where they land, at device bandwidth.

`xxh3_64_rows(rows)` hashes each row of a [n, nbytes] uint8 CUDA tensor (nbytes a multiple of 8,
more than 240: the long-input path of XXH3, which every page of a real model takes) and equals
xxhash.xxh3_64_intdigest of each row's bytes; `reference(data)` is the same algorithm in Python
(the tests check both against the xxhash package). One program hashes one row: XXH3's eight
64-bit accumulators run over 1 KiB blocks; the sixteen stripes of a block only add to them, so a
program loads G blocks at once, sums each block's sixteen stripes in parallel and then applies
the G blocks' sums and scrambles in order. Nothing is read back here; the caller compares.
"""
from __future__ import annotations

import logging

import torch
import xxhash

log = logging.getLogger("kvc.gpu_checksum")

# XXH3's default secret (xxhash.h, XXH3_kSecret), 192 bytes
_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e")
_M64 = (1 << 64) - 1
P32_1, P32_2, P32_3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
P64_1, P64_2, P64_3, P64_4, P64_5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                                     0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)
AVALANCHE = 0x165667919E3779F9
_INIT = [P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1]
BLOCK_BYTES = 1024  # 16 stripes of 64 bytes: the default secret's (192 - 64) / 8 stripes a block
MIN_BYTES = 241  # shorter inputs take other XXH3 paths (not implemented here)


def _r64(b: bytes, o: int) -> int:
    return int.from_bytes(b[o:o + 8], "little")


def _constants() -> list[int]:
    """The kernel's table, 64-bit words: [0:24) secret words (stripe s, lane i uses word s + i;
    words 16..23 scramble), [24:32) the last stripe's keys (secret + 121), [32:40) the merge keys
    (secret + 11), [40:48) the initial accumulators, [48] PRIME64_1, [49] PRIME32_1, [50] the
    avalanche multiplier."""
    return ([_r64(_SECRET, 8 * w) for w in range(24)] + [_r64(_SECRET, 121 + 8 * i) for i in range(8)]
            + [_r64(_SECRET, 11 + 8 * i) for i in range(8)] + _INIT + [P64_1, P32_1, AVALANCHE])


def reference(data: bytes) -> int:
    """XXH3_64bits(data) for len(data) >= 241 in plain Python (slow; the tests' oracle of the kernel's
    algorithm, itself checked against the xxhash package)."""
    n = len(data)
    if n < MIN_BYTES:
        raise ValueError(f"the long-input path needs >= {MIN_BYTES} bytes, got {n}")
    acc = list(_INIT)

    def stripe(o: int, so: int) -> None:
        for i in range(8):
            v = _r64(data, o + 8 * i)
            k = v ^ _r64(_SECRET, so + 8 * i)
            acc[i ^ 1] = (acc[i ^ 1] + v) & _M64
            acc[i] = (acc[i] + (k & 0xFFFFFFFF) * (k >> 32)) & _M64

    blocks = (n - 1) // BLOCK_BYTES
    for b in range(blocks):
        for s in range(16):
            stripe(b * BLOCK_BYTES + 64 * s, 8 * s)
        for i in range(8):
            a = acc[i] ^ (acc[i] >> 47) ^ _r64(_SECRET, 128 + 8 * i)
            acc[i] = (a * P32_1) & _M64
    for s in range(((n - 1) - blocks * BLOCK_BYTES) // 64):
        stripe(blocks * BLOCK_BYTES + 64 * s, 8 * s)
    stripe(n - 64, 192 - 64 - 7)
    r = (n * P64_1) & _M64
    for j in range(4):
        p = (acc[2 * j] ^ _r64(_SECRET, 11 + 16 * j)) * (acc[2 * j + 1] ^ _r64(_SECRET, 19 + 16 * j))
        r = (r + ((p & _M64) ^ (p >> 64))) & _M64
    r ^= r >> 37
    r = (r * AVALANCHE) & _M64
    return r ^ (r >> 32)


_kernel = None
_tables: dict = {}
_broken: str | None = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def _xxh3_kernel(X, Out, C, Acc, Rows, stride_x, n_words, n_blocks, last_stripes, seg_words, seg_stride,
                     b_lo, b_hi, G: tl.constexpr, LOAD_ACC: tl.constexpr, FINAL: tl.constexpr,
                     HAS_ROWS: tl.constexpr):
        """One row of X (int64 words) per program: XXH3_64bits of its n_words * 8 bytes. A row is
        segments of seg_words words (a multiple of 128: whole blocks), seg_stride words apart.
        This launch runs the row's whole blocks b_lo..b_hi (of n_blocks) from the initial
        accumulators, or from Acc [rows, 8] (LOAD_ACC: an earlier launch's); FINAL: then the tail
        and the merge into Out, else the accumulators into Acc (a later launch goes on).
        HAS_ROWS: program i hashes row Rows[i] of X (a page in a device pool's block), and writes
        Out[i] / Acc[i]."""
        row = tl.program_id(0)
        if HAS_ROWS:
            base = X + tl.load(Rows + row) * stride_x
        else:
            base = X + row.to(tl.int64) * stride_x
        lane = tl.arange(0, 8)
        st = tl.arange(0, 16)
        g = tl.arange(0, G)
        key = tl.load(C + st[:, None] + lane[None, :]).to(tl.uint64, bitcast=True)  # [16, 8]
        scr = tl.load(C + 16 + lane).to(tl.uint64, bitcast=True)
        if LOAD_ACC:
            acc = tl.load(Acc + row.to(tl.int64) * 8 + lane).to(tl.uint64, bitcast=True)
        else:
            acc = tl.load(C + 40 + lane).to(tl.uint64, bitcast=True)
        p32_1 = tl.load(C + 49).to(tl.uint64, bitcast=True)
        word = st[:, None] * 8 + lane[None, :]  # [16, 8] a block's words by (stripe, lane)
        swap = st[:, None] * 8 + (lane[None, :] ^ 1)  # lane i also adds lane i ^ 1's word
        lo32 = 0xFFFFFFFF
        for b0 in range(b_lo, b_hi, G):
            blk = b0 + g  # [G]
            live = blk < b_hi
            w0 = blk * 128  # [G] each block's first word in the row, then where it lies
            at = ((w0 // seg_words).to(tl.int64) * seg_stride + w0 % seg_words)[:, None, None]
            v = tl.load(base + at + word[None], mask=live[:, None, None], other=0).to(tl.uint64, bitcast=True)
            vs = tl.load(base + at + swap[None], mask=live[:, None, None], other=0).to(tl.uint64, bitcast=True)
            k = v ^ key[None]
            c = (k & lo32) * (k >> 32) + vs
            c = tl.where(live[:, None, None], c, 0)
            sums = tl.sum(c, axis=1)  # [G, 8]: each block's sixteen stripes
            for j in tl.static_range(G):
                add = tl.sum(tl.where(g[:, None] == j, sums, 0), axis=0)  # [8]
                a = acc + add
                a = (a ^ (a >> 47) ^ scr) * p32_1
                acc = tl.where(b0 + j < b_hi, a, acc)
        if not FINAL:
            tl.store(Acc + row.to(tl.int64) * 8 + lane, acc.to(tl.int64, bitcast=True))
            return
        # the last, partial block's stripes (no scramble), then the last stripe of the input
        w0 = n_blocks * 128  # an int where n_blocks arrives as the constant 1
        at = (w0 // seg_words).to(tl.int64) * seg_stride + w0 % seg_words  # the tail: the last segment
        sm = st[:, None] < last_stripes
        v = tl.load(base + at + word, mask=sm, other=0).to(tl.uint64, bitcast=True)
        vs = tl.load(base + at + swap, mask=sm, other=0).to(tl.uint64, bitcast=True)
        k = v ^ key
        acc += tl.sum(tl.where(sm, (k & lo32) * (k >> 32) + vs, 0), axis=0)
        w0 = n_words - 8
        tail = base + (w0 // seg_words).to(tl.int64) * seg_stride + w0 % seg_words
        v = tl.load(tail + lane).to(tl.uint64, bitcast=True)
        vs = tl.load(tail + (lane ^ 1)).to(tl.uint64, bitcast=True)
        k = v ^ tl.load(C + 24 + lane).to(tl.uint64, bitcast=True)
        acc += (k & lo32) * (k >> 32) + vs
        # merge: sum over pairs of fold64(128-bit product), then the avalanche
        m = acc ^ tl.load(C + 32 + lane).to(tl.uint64, bitcast=True)
        pair = tl.arange(0, 4)
        a = tl.sum(tl.where(lane[None, :] == 2 * pair[:, None], m[None, :], 0), axis=1)  # [4]
        b = tl.sum(tl.where(lane[None, :] == 2 * pair[:, None] + 1, m[None, :], 0), axis=1)
        al, ah, bl, bh = a & lo32, a >> 32, b & lo32, b >> 32
        ll, lh, hl, hh = al * bl, al * bh, ah * bl, ah * bh
        cross = (ll >> 32) + (lh & lo32) + (hl & lo32)
        lo = (cross << 32) | (ll & lo32)
        hi = hh + (lh >> 32) + (hl >> 32) + (cross >> 32)
        p64_1 = tl.load(C + 48).to(tl.uint64, bitcast=True)
        r = (n_words * 8).to(tl.uint64) * p64_1 + tl.sum(lo ^ hi, axis=0)
        r = r ^ (r >> 37)
        r = r * tl.load(C + 50).to(tl.uint64, bitcast=True)
        r = r ^ (r >> 32)
        tl.store(Out + row, r.to(tl.int64, bitcast=True))

    return _xxh3_kernel


def _table(device: torch.device) -> torch.Tensor:
    t = _tables.get(device)
    if t is None:
        signed = [w - (1 << 64) if w >= 1 << 63 else w for w in _constants()]
        t = torch.tensor(signed, dtype=torch.int64).to(device)
        _tables[device] = t
    return t


def supported(rows: torch.Tensor) -> bool:
    """Whether xxh3_64_rows can hash these rows: [n, nbytes] uint8 on a device Triton compiles for,
    nbytes a multiple of 8 and >= 241, 8-byte aligned rows; and the kernel has not failed before."""
    return (_broken is None and rows.dim() == 2 and rows.dtype == torch.uint8 and rows.is_cuda
            and rows.shape[1] % 8 == 0 and rows.shape[1] >= MIN_BYTES and rows.stride(1) == 1
            and rows.stride(0) % 8 == 0 and rows.data_ptr() % 8 == 0)


def xxh3_64_rows(rows: torch.Tensor, block_group: int = 2, out: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [n]: xxh3_64 of each row's bytes (the unsigned digest's bits), computed on the current
    stream without a host sync. rows: [n, nbytes] uint8, nbytes % 8 == 0 and >= 241 (on CPU too
    under TRITON_INTERPRET=1, which the CPU tests use). block_group: 1 KiB blocks loaded per step
    of a program, a power of two (on the H200 at 384 KiB pages, runs V and W: 1 / 2 / 4 / 8 took
    0.33-0.36 / 0.26-0.28 / 0.30-0.31 / 0.49-0.60 ms for 0.20 GB and 0.52-0.60 / 0.66-0.72 /
    0.99-1.02 / 1.60-1.65 ms for 0.81 GB; a get hashes in parts of a quarter). out: an int64 [n]
    tensor to write into."""
    n, nbytes = rows.shape
    if nbytes % 8 or nbytes < MIN_BYTES or rows.stride(1) != 1 or rows.stride(0) % 8:
        raise ValueError(f"rows must be [n, nbytes] with nbytes % 8 == 0 and >= {MIN_BYTES}, "
                         f"8-byte aligned; got {tuple(rows.shape)} strides {rows.stride()}")
    if out is None:
        out = torch.empty(n, dtype=torch.int64, device=rows.device)
    elif out.shape != (n,) or out.dtype != torch.int64 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int64 tensor [{n}], got {out.dtype} {tuple(out.shape)}")
    if n == 0:
        return out
    words = rows.view(torch.int64)  # [n, nbytes // 8]
    _launch(words, out, rows.stride(0) // 8, nbytes // 8, nbytes // 8, 0, block_group)
    return out


def xxh3_64_segmented(data: torch.Tensor, out: torch.Tensor, block_group: int = 2,
                      acc: torch.Tensor | None = None, first: int = 0, upto: int | None = None,
                      index: torch.Tensor | None = None) -> torch.Tensor:
    """out int64 [k]: xxh3_64 of each of the first k rows whose bytes lie in segments: data
    [S, n, seg_bytes] uint8 (contiguous, k <= n), row i = data[0, i] + data[1, i] + ... +
    data[S-1, i] back to back. A cpu-tier load copies pages layer by layer into such a layer-major
    buffer (one segment a layer), and the sums equal those of the pages' own bytes. seg_bytes a
    multiple of BLOCK_BYTES.

    In parts, as the segments land: with upto=s (first < s < S) this call hashes segments
    first..s-1 into acc (int64 [k, 8], the running accumulators; from the start when first is
    0) and leaves out alone; the call with upto None (the default) goes on from segment `first`
    (acc from the calls before it) and writes out. The parts' sums equal the whole call's.

    index (int64 [k] on data's device): row i is data[0, index[i]] + ... + data[S-1, index[i]]
    instead: pages that a load copied straight into a device pool's blocks (the pool [L, parts,
    blocks, ...] seen as [L * parts, blocks, part bytes]), hashed where they are."""
    S, n, seg = data.shape
    if data.dtype != torch.uint8 or not data.is_contiguous() or seg % BLOCK_BYTES or S * seg < MIN_BYTES:
        raise ValueError(f"data must be contiguous uint8 [S, n, seg_bytes] with seg_bytes % {BLOCK_BYTES} == 0; "
                         f"got {data.dtype} {tuple(data.shape)}")
    if out.dim() != 1 or out.shape[0] > n or out.dtype != torch.int64 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int64 tensor of at most {n} rows, got {out.dtype} {tuple(out.shape)}")
    last = S if upto is None else upto
    if not 0 <= first < last <= S or (upto is not None and upto >= S):
        raise ValueError(f"segments {first}..{last} are not a part of {S} segments (upto < {S}, or None for the last part)")
    if (first or upto is not None) and (acc is None or acc.shape != (len(out), 8) or acc.dtype != torch.int64
                                        or not acc.is_contiguous()):
        raise ValueError(f"acc must be a contiguous int64 tensor [{len(out)}, 8] to hash in parts")
    if index is not None and (index.dtype != torch.int64 or index.dim() != 1 or index.shape[0] < len(out)
                              or index.device != data.device):
        raise ValueError(f"index must be an int64 tensor of >= {len(out)} rows on {data.device}, "
                         f"got {index.dtype} {tuple(index.shape)} on {index.device}")
    if len(out):
        blocks_per_seg = seg // BLOCK_BYTES
        _launch(data.view(torch.int64), out, seg // 8, S * seg // 8, seg // 8, n * seg // 8, block_group,
                acc, first * blocks_per_seg, None if upto is None else upto * blocks_per_seg, index)
    return out


def _launch(words: torch.Tensor, out: torch.Tensor, stride_x: int, n_words: int, seg_words: int,
            seg_stride: int, block_group: int, acc: torch.Tensor | None = None, b_lo: int = 0,
            b_hi: int | None = None, rows: torch.Tensor | None = None) -> None:
    """b_lo: the first whole block to hash (from acc when > 0); b_hi: the block to stop before,
    leaving the accumulators in acc, or None: through the end, into out."""
    global _kernel
    if _kernel is None:
        _kernel = _build()
    nbytes = n_words * 8
    blocks = (nbytes - 1) // BLOCK_BYTES
    last = ((nbytes - 1) - blocks * BLOCK_BYTES) // 64
    _kernel[(len(out),)](words, out, _table(words.device), out if acc is None else acc, out if rows is None else rows,
                         stride_x, n_words, blocks, last, seg_words, seg_stride, b_lo,
                         blocks if b_hi is None else b_hi, G=block_group, LOAD_ACC=b_lo > 0, FINAL=b_hi is None,
                         HAS_ROWS=rows is not None, num_warps=4)


def warm(nbytes: int, device: torch.device, segments: int = 1, parts: int = 0) -> bool:
    """Compile the kernel for rows of nbytes on device now (start-up), not at the first cpu-tier hit
    (Triton's compile or its cache load would land on that request's TTFT, and on the load's
    measured bandwidth: run DL's first hit measured the cpu tier at 3 GB/s and the planner stopped
    loading). segments > 1: also the launches of a layered get (pages in that many segments,
    hashed whole and in two parts). parts > 0: also those of a layered get straight into a device
    pool whose layers hold `parts` tensors (K and V: 2), pages hashed in their blocks (index).
    False where the kernel cannot be used there (then gets verify on the host)."""
    rows = torch.zeros((1, nbytes), dtype=torch.uint8, device=device)
    if not supported(rows):
        return False
    want = to_signed([xxhash.xxh3_64_intdigest(bytes(nbytes))])[0]
    try:
        got = [xxh3_64_rows(rows).cpu().item()]
        if segments > 1 and nbytes % segments == 0 and (nbytes // segments) % BLOCK_BYTES == 0:
            data = rows.view(segments, 1, nbytes // segments)
            out = torch.empty(1, dtype=torch.int64, device=device)
            got.append(xxh3_64_segmented(data, out).cpu().item())
            acc = torch.empty((1, 8), dtype=torch.int64, device=device)
            xxh3_64_segmented(data, out, acc=acc, upto=segments - 1)
            got.append(xxh3_64_segmented(data, out, acc=acc, first=segments - 1).cpu().item())
            S = segments * parts
            if parts and (nbytes // S) % BLOCK_BYTES == 0 and nbytes % S == 0:
                data = rows.view(S, 1, nbytes // S)
                index = torch.zeros(1, dtype=torch.int64, device=device)
                got.append(xxh3_64_segmented(data, out, index=index).cpu().item())
                xxh3_64_segmented(data, out, acc=acc, upto=S - parts, index=index)
                got.append(xxh3_64_segmented(data, out, acc=acc, first=S - parts, index=index).cpu().item())
    except Exception as e:
        mark_broken(f"{type(e).__name__}: {e}")
        return False
    if any(g != want for g in got):
        mark_broken(f"xxh3_64 of {nbytes} zero bytes is {[hex(g) for g in got]} on the device, {want:#x} expected")
        return False
    return True


def mark_broken(reason: str) -> None:
    """Stop using the kernel in this process (a compile or launch failed): callers verify on the host."""
    global _broken
    if _broken is None:
        log.warning("GPU page checksums disabled, verifying on the host instead: %s", reason)
    _broken = reason


def to_signed(checksums) -> list[int]:
    """Unsigned 64-bit digests as the int64 values xxh3_64_rows returns."""
    return [c - (1 << 64) if c >= 1 << 63 else c for c in checksums]
