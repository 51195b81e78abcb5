"""Long prefill pieces through cuDNN's fused attention (PyTorch's cuDNN SDPA op, wgmma on Hopper).

Measured on the H200 at 12 layers of Qwen3-30B-A3B shapes, cuDNN's kernel takes 171 ms for a 32K
causal prefill where FA2 (flash_prefill) takes 297 ms; transformers gets it through SDPA. It takes
GQA natively, but its causal mask is top-left aligned, which is wrong for a chunk after a cached
prefix. So each piece runs as two calls whose results are merged by their log-sum-exp (one Triton
launch, `merge_two`):
- the piece's own keys (the fresh K/V, Q == K): causal;
- the cached prefix: no mask, so the keys' order does not matter; a slice of the pool where its
  pages are one run of consecutive block ids in any order (`adjacent_rows`: a prompt's chunks take
  fresh blocks in order, freed blocks come back in reverse), else gathered out of the pool (one
  index_select per K and V).
Pieces run one after another; steps with many short pieces stay on flash_prefill or the Triton kernel
(see engine.attention.prefill_backend).

cuDNN builds an execution plan for every new (query length, key length) pair; PyTorch caches plans
per shape, per thread, without bound. Measured on the H200 (bench_prefill_shapes.py, 12 layers), a
prompt whose length had not been seen took 4x its warm time (157 vs 39 ms) where FA2 took 1.45x. So
shapes are bucketed: a piece's queries (and, in the causal call, its own keys) are extended up to a
multiple of CUDNN_ALIGN rows (the rows after it in the batch, or zero rows where the batch ends:
they come after the real ones, so the top-left causal mask keeps them out of every real row, and
their outputs are dropped), and under `auto` only pieces whose
cached prefix is a multiple of CUDNN_ALIGN (every chunk of a cold chunked prefill with the default
chunk) take this path; the others go to FA2 (`cudnn_piece`). The plans are then a bounded set:
(query buckets) x (prefix lengths / CUDNN_ALIGN), each built once per engine thread.
"""
from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl

from . import adjacent_rows, key_slots, sdpa_op_usable

log = logging.getLogger(__name__)
CUDNN_MAX_PIECES = 8  # more pieces than this: one varlen launch beats a pair of calls per piece
CUDNN_ALIGN = 512  # query lengths are padded to, and (under auto) prefixes must be, a multiple of this
_broken: str | None = None  # set when the op failed once; the other kernels take over
_lse_to_e: float | None = None  # factor that turns the op's log-sum-exp into natural log
PREFIX_IN_PLACE = True  # a prefix on adjacent pages read as a slice of the pool (benchmarks set False
                        # to time the gather side by side)


def cudnn_usable(q: torch.Tensor) -> bool:
    return sdpa_op_usable(q, _broken, 128, (9, 0), "_scaled_dot_product_cudnn_attention")


def cudnn_piece(p, forced: bool = False) -> bool:
    """Whether piece p runs here: always when attn.prefill_kernel forces cudnn, else only with a
    cached prefix that is a multiple of CUDNN_ALIGN (its plans then come from a bounded set)."""
    return forced or (p.k_len - p.q_len) % CUDNN_ALIGN == 0


def _rows(x: torch.Tensor, start: int, q: int, n: int, spare: int = 0) -> torch.Tensor:
    """x[start:start + q] extended to n rows. The rows after a piece in the step's batch (the next
    pieces, or a graph bucket's padding) serve as they are: they come after every real query, so
    the top-left causal mask keeps them out of every real row, and their outputs are dropped; any
    finite values do. `spare`: rows of finite values that x's storage holds past x's last row (the
    prefill graphs' static buffers keep CUDNN_ALIGN of them), read in place the same way. Zero rows
    are appended only where both end first: F.pad is a new tensor, a fill and a copy (~10 operator
    dispatches of host time, three times a layer, in a step whose host time is its limit)."""
    if start + n <= x.shape[0]:
        return x[start:start + n]
    if q == n:
        return x[start:start + q]
    if spare and start + n <= x.shape[0] + spare and x.is_contiguous():
        return x.as_strided((n, *x.shape[1:]), x.stride(), x.storage_offset() + start * x.stride(0))
    return torch.nn.functional.pad(x[start:start + q], (0, 0, 0, 0, 0, n - q))


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[rows, heads, D] -> the op's [1, heads, rows, D], a view."""
    return x.transpose(0, 1)[None]


def _attend4(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, Hq, Q, D], k/v [1, Hkv, K, D] (_heads_first views) -> (out [1, Hq, Q, D], lse [1, Hq, Q(, 1)]
    fp32 in the op's own base)."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                               scale=scale)[:2]


def _attend(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Q, Hq, D], k/v [K, Hkv, D] -> (out [Q, Hq, D], lse [Hq, Q] fp32 in the op's own base)."""
    o, lse = _attend4(_heads_first(q), _heads_first(k), _heads_first(v), causal, scale)
    return o[0].transpose(0, 1), lse.reshape(q.shape[1], q.shape[0])


def _piece_views(p, q, k, v, out, Q: int, Qp: int, spare: int):
    """(q, own k, own v) of piece p padded to Qp rows as the op's views, and out's rows of the piece.
    With spare rows (q, k, v, out are the prefill graphs' static buffers, the same tensors for
    every layer of a step) they are made once a step and kept on the piece: ~15 operator dispatches
    a piece and layer fewer, in a step bound by its host time."""
    key = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), q.shape[0]) if spare else None
    got = p.__dict__.get("cudnn_views")
    if got is not None and got[0] == key:
        return got[1]
    s = p.q_start
    made = (*(_heads_first(_rows(x, s, Q, Qp, spare)) for x in (q, k, v)), out[s:s + Q])
    if spare:
        p.cudnn_views = (key, made)
    return made


@triton.jit
def _merge_two_kernel(O1, L1, O2, L2, Out, Q, lse_to_e, s1q, s1h, s2q, s2h, sl1, sl2, soq, soh,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr):
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    h = tl.program_id(1)
    qm = q < Q
    d = tl.arange(0, BLOCK_D)
    m2 = qm[:, None] & (d[None, :] < D)
    l1 = tl.load(L1 + h * sl1 + q, mask=qm, other=0.0).to(tl.float32) * lse_to_e  # [BQ]
    l2 = tl.load(L2 + h * sl2 + q, mask=qm, other=0.0).to(tl.float32) * lse_to_e
    m = tl.maximum(l1, l2)
    w1 = tl.exp(l1 - m)
    w2 = tl.exp(l2 - m)
    o1 = tl.load(O1 + q[:, None] * s1q + h * s1h + d[None, :], mask=m2, other=0.0).to(tl.float32)
    o2 = tl.load(O2 + q[:, None] * s2q + h * s2h + d[None, :], mask=m2, other=0.0).to(tl.float32)
    o = (o1 * w1[:, None] + o2 * w2[:, None]) / (w1 + w2)[:, None]
    tl.store(Out + q[:, None] * soq + h * soh + d[None, :], o.to(Out.dtype.element_ty), mask=m2)


def merge_two(o1, lse1, o2, lse2, out) -> None:
    """out [Q, Hq, D] = the softmax-weighted merge of two partial attentions over disjoint keys;
    o* [Q, Hq, D] (unit stride in D), lse* [Hq, Q] (unit stride in Q) in the op's base. One launch."""
    Q, Hq, D = out.shape
    o1, o2 = (o if o.stride(-1) == 1 else o.contiguous() for o in (o1, o2))
    lse1, lse2 = (l if l.stride(-1) == 1 else l.contiguous() for l in (lse1, lse2))
    BLOCK_Q = 16
    _merge_two_kernel[(triton.cdiv(Q, BLOCK_Q), Hq)](
        o1, lse1, o2, lse2, out, Q, _lse_to_e, o1.stride(0), o1.stride(1), o2.stride(0), o2.stride(1),
        lse1.stride(0), lse2.stride(0), out.stride(0), out.stride(1), D=D, BLOCK_D=triton.next_power_of_2(D),
        BLOCK_Q=BLOCK_Q, num_warps=4)


def _calibrate(device: torch.device, dtype: torch.dtype) -> None:
    """Which log base the op's log-sum-exp uses (an internal detail that has changed before)."""
    global _lse_to_e
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(64, 2, 64, device=device, dtype=dtype, generator=g) for _ in range(3))
    _, lse = _attend(q, k, v, False, 0.125)
    want = torch.logsumexp(torch.einsum("qhd,khd->hqk", q.float(), k.float()) * 0.125, -1)  # [H, Q]
    for f in (1.0, math.log(2.0)):
        if torch.allclose(lse.float() * f, want, atol=0.05, rtol=0.01):
            _lse_to_e = f
            return
    raise RuntimeError("cuDNN attention's log-sum-exp matches neither base e nor base 2")


def cudnn_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, out: torch.Tensor, pieces, scale: float, spare_rows: int = 0) -> bool:
    """Attention of every prefill piece into out's rows; q [T, Hq, D], k/v [T, Hkv, D] the step's
    fresh keys (already stored in the pool too). spare_rows: rows of finite values that q, k and v's
    storage holds past their last row (_rows). False if the op failed (the caller falls back)."""
    global _broken
    N, P, Hkv, D = k_cache.shape
    try:
        if _lse_to_e is None:
            _calibrate(q.device, q.dtype)
        Hq = q.shape[1]
        for p in pieces:
            Q = p.q_len
            Qp = -(-Q // CUDNN_ALIGN) * CUDNN_ALIGN  # bucketed: a bounded set of plans (module doc)
            q4, k4, v4, out_rows = _piece_views(p, q, k, v, out, Q, Qp, spare_rows)
            o, lse = _attend4(q4, k4, v4, True, scale)  # own keys; [1, Hq, Qp, D], pad rows dropped below
            off = p.k_len - Q
            if off > 0:  # the cached prefix: every query sees all of it
                row = p.__dict__.get("prefix_row")  # the same for every layer: found once a step
                if row is None:
                    row = p.prefix_row = adjacent_rows(p.host_table, off, P) if PREFIX_IN_PLACE else -1
                if row >= 0:  # its pages one run of the pool in some order: a view of it, nothing gathered
                    kp = k_cache.view(N * P, Hkv, D)[row:row + off]  # [off, Hkv, D]
                    vp = v_cache.view(N * P, Hkv, D)[row:row + off]
                else:
                    slots = p.__dict__.get("prefix_slots")
                    if slots is None:
                        slots = p.prefix_slots = key_slots(p.block_table, off, P)  # [off]
                    kp = k_cache.view(N * P, Hkv, D).index_select(0, slots)
                    vp = v_cache.view(N * P, Hkv, D).index_select(0, slots)
                o2, lse2 = _attend4(q4, _heads_first(kp), _heads_first(vp), False, scale)
                merge_two(o[0].transpose(0, 1)[:Q], lse.reshape(Hq, Qp)[:, :Q],
                          o2[0].transpose(0, 1)[:Q], lse2.reshape(Hq, Qp)[:, :Q], out_rows)
            else:
                out_rows.copy_(o[0, :, :Q].transpose(0, 1))
    except (RuntimeError, TypeError, NotImplementedError) as e:
        _broken = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("cuDNN prefill off, using the other kernels: %s", _broken)
        return False
    return True


# A short suffix over a long prefix whose pages are adjacent in the pool (a device hit's step).
# cuDNN parallelises over (batch, head, 128-query tile) and never splits the keys, so 64 queries of
# 32 heads would be 32 programs on 132 SMs. Here the rows of a kv head are its G query heads of
# every query, (query, head in group) pairs, as one "head" of T x G queries over that kv head's keys
# (no mask: every query sees the whole prefix), and the prefix's keys are cut into `splits` equal
# slices that run as the op's batch: Hkv x (T x G / 128) x splits programs. The slices are views of
# the pool (pages adjacent), so nothing is gathered; merge_rows combines the slices with the
# suffix's own keys (a plain causal call) by their log-sum-exps.

def rows_split_prefix(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, prefix: int,
                      splits: int, scale: float):
    """q [T, Hq, D] over the `prefix` keys at pool rows start.. (adjacent pages of k/v_cache
    [N, P, Hkv, D]; prefix a multiple of splits) -> (out [splits, Hkv, T*G, D], lse [splits, Hkv,
    T*G(, 1)]) in the op's base, row t*G + g being query t's head kv*G + g."""
    N, P, Hkv, D = k_cache.shape
    T, Hq = q.shape[0], q.shape[1]
    G = Hq // Hkv
    kps = prefix // splits
    packed = q.view(T, Hkv, G, D).permute(1, 0, 2, 3).reshape(1, Hkv, T * G, D)
    qrows = packed.expand(splits, Hkv, T * G, D).contiguous()

    def keys(cache):
        return cache.view(N * P, Hkv, D)[start:start + prefix].view(splits, kps, Hkv, D).permute(0, 2, 1, 3)
    return _attend4(qrows, keys(k_cache), keys(v_cache), False, scale)


@triton.jit
def _merge_rows_kernel(O1, L1, O2, L2, Out, T, S, lse_to_e, s1s, s1h, s1r, sl1s, sl1h, s2h, s2q, sl2h, soq, soh,
                       G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr):
    t = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    h = tl.program_id(1)
    kv = h // G
    r = t * G + h % G  # the row of (query t, head h) in the packed slices
    qm = t < T
    d = tl.arange(0, BLOCK_D)
    m2 = qm[:, None] & (d[None, :] < D)
    # the suffix's own keys first: every query sees at least its own key, so m starts finite
    m = tl.load(L2 + h * sl2h + t, mask=qm, other=0.0).to(tl.float32) * lse_to_e
    w = tl.full([BLOCK_Q], 1.0, tl.float32)
    acc = tl.load(O2 + t[:, None] * s2q + h * s2h + d[None, :], mask=m2, other=0.0).to(tl.float32)
    for s in range(0, S):
        ls = tl.load(L1 + s * sl1s + kv * sl1h + r, mask=qm, other=0.0).to(tl.float32) * lse_to_e
        os_ = tl.load(O1 + s * s1s + kv * s1h + r[:, None] * s1r + d[None, :], mask=m2, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, ls)
        a = tl.exp(m - m_new)
        b = tl.exp(ls - m_new)
        acc = acc * a[:, None] + os_ * b[:, None]
        w = w * a + b
        m = m_new
    tl.store(Out + t[:, None] * soq + h * soh + d[None, :], (acc / w[:, None]).to(Out.dtype.element_ty), mask=m2)


def merge_rows(o1, lse1, o2, lse2, out) -> None:
    """out [T, Hq, D] = rows_split_prefix's slices (o1 [S, Hkv, T*G, D], lse1 [S, Hkv, T*G(, 1)])
    merged with the suffix's own keys (o2 [T, Hq, D] view, lse2 [Hq, T]) by their log-sum-exps."""
    T, Hq, D = out.shape
    S, Hkv = o1.shape[0], o1.shape[1]
    assert o1.stride(-1) == 1 and o2.stride(-1) == 1 and lse2.stride(-1) == 1
    BLOCK_Q = 16
    _merge_rows_kernel[(triton.cdiv(T, BLOCK_Q), Hq)](
        o1, lse1, o2, lse2, out, T, S, _lse_to_e, o1.stride(0), o1.stride(1), o1.stride(2),
        lse1.stride(0), lse1.stride(1), o2.stride(1), o2.stride(0), lse2.stride(0), out.stride(0), out.stride(1),
        G=Hq // Hkv, D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_Q=BLOCK_Q, num_warps=4)


def cudnn_hit(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor, start: int,
              prefix: int, new: int, splits: int, scale: float) -> None:
    """Attention of `new` queries q [new, Hq, D] (rows of out [new, Hq, D]) over `prefix` cached keys
    and their own `new` keys, all at adjacent pool rows from `start` (the own keys at start + prefix):
    rows_split_prefix over the prefix, one causal call over the own keys, merge_rows."""
    if _lse_to_e is None:
        _calibrate(q.device, q.dtype)
    N, P, Hkv, D = k_cache.shape
    o1, l1 = rows_split_prefix(q, k_cache, v_cache, start, prefix, splits, scale)
    own = slice(start + prefix, start + prefix + new)
    o2, l2 = _attend(q, k_cache.view(N * P, Hkv, D)[own], v_cache.view(N * P, Hkv, D)[own], True, scale)
    merge_rows(o1, l1, o2, l2, out)


# DeepSeek's MLA, expanded: a long prefill piece's latents expanded through kv_b_proj to per-head K
# (nope + rope, 192 wide in V2-Lite) and V (128). SDPA's flash path needs V padded to K's width and
# is FA2; cuDNN's op takes V at its own width. The same two calls as cudnn_prefill (own keys causal,
# the cached prefix unmasked) merged by their log-sum-exps; queries (and own keys) padded to a
# multiple of CUDNN_ALIGN so the plans come from a bounded set, and only prefixes that are a
# multiple of it (every chunk of a cold chunked prefill with the default chunk) come here unless
# attn.prefill_kernel forces cuDNN (mla_cudnn_usable's `forced`: any prefix, a plan per shape).
_mla_broken: str | None = None  # set when the op refused MLA's shapes once (Qwen's path is unaffected)


def mla_cudnn_usable(q: torch.Tensor, offset: int, forced: bool = False) -> bool:
    """Whether cudnn_expanded takes a piece of queries q [Q, h, D] after `offset` cached keys: the
    op runs here, and the prefix is on the bucket unless `forced` (attn.prefill_kernel cudnn)."""
    return (forced or offset % CUDNN_ALIGN == 0) and sdpa_op_usable(q, _mla_broken, 256, (9, 0),
                                                                   "_scaled_dot_product_cudnn_attention")


def cudnn_expanded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, scale: float) -> torch.Tensor | None:
    """q [Q, h, D] the last Q of keys k [K, h, D] / values v [K, h, Dv] (offset = K - Q), causal
    -> [Q, h, Dv]; None if the op refused (logged once; the caller takes SDPA)."""
    global _mla_broken
    Q, H = q.shape[0], q.shape[1]
    Qp = -(-Q // CUDNN_ALIGN) * CUDNN_ALIGN
    try:
        if _lse_to_e is None:
            _calibrate(q.device, q.dtype)

        def own(x):  # the piece's rows padded to Qp: the pad comes after every real row (module doc)
            x = x[offset:] if x.shape[0] > Q else x
            return _heads_first(x if Qp == Q else torch.nn.functional.pad(x, (0, 0, 0, 0, 0, Qp - Q)))
        q4 = own(q)
        o, lse = _attend4(q4, own(k), own(v), True, scale)  # [1, h, Qp, Dv]
        if offset == 0:
            return o[0, :, :Q].transpose(0, 1)
        o2, lse2 = _attend4(q4, _heads_first(k[:offset]), _heads_first(v[:offset]), False, scale)
        out = q.new_empty(Q, H, v.shape[-1])
        merge_two(o[0].transpose(0, 1)[:Q], lse.reshape(H, Qp)[:, :Q], o2[0].transpose(0, 1)[:Q],
                  lse2.reshape(H, Qp)[:, :Q], out)
        return out
    except (RuntimeError, TypeError, NotImplementedError) as e:
        _mla_broken = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("cuDNN attention off for MLA pieces, using SDPA: %s", _mla_broken)
        return None
