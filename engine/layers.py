"""Shared layers: RMSNorm, NeoX RoPE, gated MLP and paged attention over the device pool.

`paged_attention` runs the Triton kernels of engine.attention on CUDA (they read the pool in
place) and otherwise the reference path (always with config attn.backend "reference", which
`set_attention_backend` hands to every norm and attention layer of a model): write the step's K/V into the pool through
`slot_mapping`, then gather each sequence's pages and run SDPA. Decodes are batched into one padded
SDPA call; prefill pieces run one SDPA each with a causal mask offset by the cached prefix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import kernel_attention, qk_norm_rope, rms_norm, use_kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.backend = "auto"  # attn.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernels(x, self.backend):  # one launch instead of seven (decode steps are launch-bound)
            return rms_norm(x, self.weight, self.eps)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, cast back to the input dtype, then scale (as transformers does)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rope(nn.Module):
    """NeoX-style rotary embedding over the full head_dim."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)  # [D/2]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Piece:
    """One request's share of a step: q_len new tokens after k_len - q_len cached ones."""
    q_start: int  # first row in the flat batch
    q_len: int
    k_len: int
    block_table: torch.Tensor  # [num_blocks] long, device
    host_table: Sequence[int] | None = None  # the same block ids on the host (None: not known)


@dataclass
class AttnMetadata:
    positions: torch.Tensor  # [T] long
    slot_mapping: torch.Tensor  # [T] long: block * page_size + offset
    prefills: list[Piece]  # pieces with q_len > 1, one SDPA each
    decode_rows: torch.Tensor | None  # [B] rows of single-token pieces
    decode_tables: torch.Tensor | None  # [B, max_blocks] long, padded with 0
    decode_lens: torch.Tensor | None  # [B] long, keys per decode
    # Packed prefill pieces for the kernels (None: derived from `prefills` when needed)
    prefill_tables: torch.Tensor | None = None  # [Np, max_blocks] int32, padded with 0
    prefill_q_starts: torch.Tensor | None = None  # [Np] int32, first row of each piece
    prefill_q_lens: torch.Tensor | None = None  # [Np] int32 (pieces need not be adjacent rows)
    prefill_k_lens: torch.Tensor | None = None  # [Np] int32, cached + new keys per piece
    prefill_max_q: int = 0  # longest piece's q_len
    prefill_max_k: int = 0  # longest piece's k_len (0: unknown, no split-K for short suffixes)
    decode_max_len: int = 0  # host bound on decode_lens (0: decode_tables' width * page size)
    scratch: dict = field(default_factory=dict)  # kernels' buffers shared by the step's layers


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttnMetadata, scale: float, backend: str = "auto",
                    prefill: str = "auto") -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], caches [N, P, Hkv, D] -> out [T, Hq, D]; backend and prefill
    are attn.backend and attn.prefill_kernel."""
    if use_kernels(q, backend):
        return kernel_attention(q, k, v, k_cache, v_cache, meta, scale, prefill)
    return paged_attention_reference(q, k, v, k_cache, v_cache, meta, scale)


def paged_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, meta: AttnMetadata, scale: float) -> torch.Tensor:
    """Gather + SDPA; the CPU path and the kernels' oracle. Shapes as paged_attention."""
    N, P, Hkv, D = k_cache.shape
    k_cache.view(N * P, Hkv, D).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(N * P, Hkv, D).index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    for p in meta.prefills:
        qs = q[p.q_start:p.q_start + p.q_len]  # [Q, Hq, D]
        if p.k_len == p.q_len:  # nothing cached before this piece: attend to its own K/V, causal
            ks, vs = k[p.q_start:p.q_start + p.q_len], v[p.q_start:p.q_start + p.q_len]
            o = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                               vs.transpose(0, 1)[None], is_causal=True, scale=scale,
                                               enable_gqa=True)  # [1, Hq, Q, D]
            out[p.q_start:p.q_start + p.q_len] = o[0].transpose(0, 1)
            continue
        nb = (p.k_len + P - 1) // P
        keys = k_cache[p.block_table[:nb]].reshape(nb * P, Hkv, D)[:p.k_len]  # [K, Hkv, D]
        vals = v_cache[p.block_table[:nb]].reshape(nb * P, Hkv, D)[:p.k_len]
        off = p.k_len - p.q_len
        rows = torch.arange(p.q_len, device=q.device)[:, None] + off
        mask = torch.arange(p.k_len, device=q.device)[None, :] <= rows  # [Q, K]
        o = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                           vals.transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                           enable_gqa=True)  # [1, Hq, Q, D]
        out[p.q_start:p.q_start + p.q_len] = o[0].transpose(0, 1)
    if meta.decode_rows is not None:
        B, nb = meta.decode_tables.shape
        keys = k_cache[meta.decode_tables].reshape(B, nb * P, Hkv, D).transpose(1, 2)  # [B, Hkv, K, D]
        vals = v_cache[meta.decode_tables].reshape(B, nb * P, Hkv, D).transpose(1, 2)
        mask = torch.arange(nb * P, device=q.device)[None, :] < meta.decode_lens[:, None]  # [B, K]
        qs = q[meta.decode_rows][:, :, None, :]  # [B, Hq, 1, D]
        o = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask[:, None, None, :],
                                           scale=scale, enable_gqa=True)  # [B, Hq, 1, D]
        out[meta.decode_rows] = o[:, :, 0, :]
    return out


FUSED_QKV = True  # one GEMM for q, k and v where fuse_qkv ran (benchmarks set False to time the three
                  # projections side by side)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)
        else:
            self.q_norm = self.k_norm = None
        self.backend, self.prefill_kernel = "auto", "auto"  # attn.backend, attn.prefill_kernel
        self.register_buffer("qkv_weight", None, persistent=False)  # set by fuse_qkv

    def fuse_qkv(self) -> bool:
        """Put the q, k and v projections' weights in one [(Hq + 2 Hkv) D, hidden] tensor, the three
        Linear weights becoming views of its rows (no second copy), so that project() runs one GEMM
        for the three: at 2,048 rows, k's and v's own GEMMs (N = Hkv D, 512 for Qwen3-30B-A3B) run
        at a fraction of q's rate, and two launches fewer a layer. Not for biased projections or
        weights on different devices or dtypes (returns False, the projections stay three)."""
        ws = [m.weight for m in (self.q_proj, self.k_proj, self.v_proj)]
        if (any(m.bias is not None for m in (self.q_proj, self.k_proj, self.v_proj))
                or len({(w.device, w.dtype) for w in ws}) != 1 or ws[0].is_meta):
            return False
        fused = torch.cat([w.detach() for w in ws])
        rows = 0
        for m, w in zip((self.q_proj, self.k_proj, self.v_proj), ws):
            m.weight = nn.Parameter(fused[rows:rows + w.shape[0]], requires_grad=False)
            rows += w.shape[0]
        self.qkv_weight = fused  # a buffer: model.to() moves it with the (then separate) weights
        return True

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttnMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        if use_kernels(x, self.backend):  # the K/V store inside the RoPE launch (project), not after it
            q, k, v = self.project(x, cos, sin, store=(k_cache, v_cache, meta.slot_mapping))
            o = kernel_attention(q, k, v, k_cache, v_cache, meta, self.scale, self.prefill_kernel, store=False)
        else:
            q, k, v = self.project(x, cos, sin)
            o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, self.backend,
                                self.prefill_kernel)  # [T, Hq, D]
        return self.out(o)

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """o [T, Hq, D] -> [T, hidden]: the output projection."""
        return self.o_proj(o.reshape(o.shape[0], self.heads * self.head_dim))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out=None, store=None):
        """x [T, hidden] -> q [T, Hq, D], k, v [T, Hkv, D]: projections, q/k norms and RoPE (the part
        before attention; engine.prefill_graphs captures it). After fuse_qkv the three projections are
        one GEMM and, with the kernels, the RoPE kernel copies v out of its output beside q and k.
        out: the (q, k, v) tensors to write (prefill_graphs' static buffers: with the kernels the RoPE
        kernel (and, unfused, v's projection) write them in place, ~4 copies a layer fewer, 3.2 ms of
        a 32K chunked prefill in run EH). store (k_cache, v_cache, slots): k and v also written into
        the paged pool at slots (negative: skipped), by the RoPE kernel where it runs fused, else
        by store_kv after it."""
        T = x.shape[0]
        kernels = use_kernels(x, self.backend)
        fused = FUSED_QKV and self.qkv_weight is not None and self.qkv_weight.dtype == x.dtype
        if fused:  # one GEMM (fuse_qkv); q, k and v are column views of its output
            nq, nk = self.heads * self.head_dim, self.kv_heads * self.head_dim
            q, k, v = torch.mm(x, self.qkv_weight.t()).split((nq, nk, nk), dim=1)
            q = q.view(T, self.heads, self.head_dim)
            k, v = k.view(T, self.kv_heads, self.head_dim), v.view(T, self.kv_heads, self.head_dim)
        else:
            q = self.q_proj(x).view(T, self.heads, self.head_dim)  # [T, Hq, D]
            k = self.k_proj(x).view(T, self.kv_heads, self.head_dim)  # [T, Hkv, D]
            if out is not None and kernels and self.v_proj.bias is None:
                v = torch.mm(x, self.v_proj.weight.t(), out=out[2].view(T, -1)).view(T, self.kv_heads, self.head_dim)
            else:
                v = self.v_proj(x).view(T, self.kv_heads, self.head_dim)
        if kernels:  # norms and RoPE of q and k (and, fused, v's copy out of the GEMM's output): one launch
            qn, kn = self.q_norm, self.k_norm
            got = qk_norm_rope(q, k, None if qn is None else qn.weight, None if kn is None else kn.weight,
                               0.0 if qn is None else qn.eps, cos, sin,
                               None if out is None else (out if fused else out[:2]), v if fused else None,
                               store if fused else None)
            q, k = got[:2]
            v = got[2] if fused else v
            store = None if fused else store
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope_reference(q, cos, sin), apply_rope_reference(k, cos, sin)
            v = v.contiguous()
        if out is not None:
            for dst, src in zip(out, (q, k, v)):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
            q, k, v = out
        if store is not None:
            from .attention.triton_cache import store_kv
            store_kv(k, v, *store)
        return (q, k, v) if out is None else out


def set_attention_backend(model: nn.Module, backend: str = "auto", prefill_kernel: str = "auto",
                          moe_kernel: str = "auto") -> None:
    """Hand config attn.backend, attn.prefill_kernel and attn.moe_kernel to every norm, attention
    and expert layer of `model` (MLA layers take `backend` and `prefill_kernel`: cudnn or SDPA for
    their long expanded pieces, MLAttention.wants_cudnn)."""
    from .mla import MLAttention
    from .moe import StackedExperts
    for m in model.modules():
        if isinstance(m, MLAttention):
            m.backend, m.prefill_kernel = backend, prefill_kernel
        if isinstance(m, StackedExperts):
            m.backend, m.kernel = backend, moe_kernel
        if isinstance(m, (RMSNorm, Attention)):
            m.backend = backend
        if isinstance(m, Attention):
            m.prefill_kernel = prefill_kernel
