"""Multi-head Latent Attention (DeepSeek-V2/V3) over latent KV pages.

Per token and layer the cache holds what MLA needs and nothing more: the normalised compressed KV
c [r] and the rotated rope key k_pe [dr], one row [r + dr] (576 for the real models) in a pool
[N, P, 1, r + dr]. Two ways to attend over it:

- expanded (the oracle, and prefill): kv_b_proj(c) -> per-head k_nope [dn] and v [dv], then SDPA
  with key = [k_nope, k_pe] and query = [q_nope, q_pe];
- absorbed (decode): fold kv_b_proj's K half into the query (q_lat = q_nope @ W_UK, [H, r]) and its
  V half into the output (o = o_lat @ W_UV^T), so the scores are [q_lat, q_pe] . [c, k_pe] against
  the latent rows directly; per-head K/V of the context is never materialised. On CUDA (config
  attn.backend "auto") a Triton kernel (engine.attention.triton_mla) reads the latent rows in the
  pool through the block tables; elsewhere they are gathered and SDPA attends over them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from .attention import use_kernels
from .layers import AttnMetadata, RMSNorm
from .model_args import ModelArgs


# A prefill piece after cached tokens attends with SDPA's bottom-right causal bias, which the flash
# kernel runs without a mask; False builds the boolean [Q, K] mask instead (the path before; flash
# takes no mask): benchmarks/bench_mla_pieces.py and bench_deepseek.py --mla-paths time the paths.
LOWER_RIGHT = True
# Long expanded pieces after a cached prefix (the chunks of a long prompt after its first) run on
# CUDA through cuDNN's fused attention at V's own width (own keys causal, the prefix unmasked, merged
# by log-sum-exp: engine.attention.cudnn_prefill.cudnn_expanded) instead of SDPA's FA2 with V padded
# to K's width. Measured on an H100 (benchmarks/RESULTS.md, runs FI-FO; bench_mla_prefill.py, one
# V2-Lite layer): 0.36-0.41x SDPA's time at 2,048-8,192 queries after 8K-32K cached; a 32K prompt
# in 8K chunks 278 -> 184 ms (8 layers). Left on SDPA: pieces of fewer than CUDNN_MIN_QUERIES (1,000
# after 8K took 0.59x in run FI but 1.17x in FK, 512 after 32K 0.78x: not settled, so the bound
# keeps the measured wins; a 64-token question would be padded to 512 rows), pieces with nothing
# cached before them (0.90x in one layer, no gain in the engine's cold 8K TTFT), prefixes off the
# CUDNN_ALIGN bucket, and devices without the op. Config attn.prefill_kernel (cudnn forces it,
# flash / triton keep SDPA) and attn.backend reference apply too: MLAttention.wants_cudnn.
CUDNN_PIECES = True
CUDNN_MIN_QUERIES = 2048
# Per device type, the share of MLAttention.absorb_below (the FLOP crossover, 186 queries for
# V2-Lite's sizes) under which a short piece after cached tokens (a question after a long shared
# prefix) attends in the absorbed, latent form; device types not listed expand it as the long ones.
# CPU (over gathered rows, two GEMMs in _absorbed_piece): 2.4-7.8x quicker than expanding with
# SDPA, the crossover near the FLOP bound. CUDA (the Triton kernel over the pool; the GEMM form
# alike): on an H100, one V2-Lite layer, 0.29x / 0.58x the expanded path's time at 16 / 64 queries
# after 32K, 0.99x at 128, 1.36x at 185, 0.99-1.03x at 16-64 after 8K (run FT): half the bound,
# 93 queries for V2-Lite. The engine's TTFT of 64 new tokens after a device hit, this rule against
# every piece expanded, 15.2 -> 11.8 ms at 32K, 9.3 -> 8.7 at 8K (H100, run FW; benchmarks/RESULTS.md).
ABSORB_PIECES: dict[str, float] = {"cpu": 1.0, "cuda": 0.5}
# The latent form's fp32 scores [queries x heads, K] per pair of GEMMs (MLAttention._absorbed_piece)
PIECE_SCORE_BYTES = 128 << 20
_MM_OUT_DTYPE: list[bool] = []  # whether torch.mm takes out_dtype on this build (asked once)


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 results: a bf16 / fp16 GEMM writing fp32 (torch.mm's out_dtype, CUDA) where
    torch has it, else the GEMM in fp32."""
    if a.dtype != torch.float32 and a.is_cuda and _MM_OUT_DTYPE != [False]:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE[:] = [True]
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE[:] = [False]
    return a.float() @ b.float()


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class MlaRope(nn.Module):
    """Rotary embedding over the rope part only: default or YaRN, pairwise (interleaved) or NeoX."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        dim, base, y = a.qk_rope_head_dim, a.rope_theta, dict(a.rope_scaling)
        pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [dr/2]
        inv, factor = 1.0 / pos, 1.0
        if y:  # YaRN, as transformers' _compute_yarn_parameters (which DeepSeek's own code matches)
            factor, orig = y["factor"], y["original_max_position_embeddings"]
            fast, slow = y.get("beta_fast", 32.0), y.get("beta_slow", 1.0)

            def corr_dim(rot):
                return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

            low, high = corr_dim(fast), corr_dim(slow)
            if y.get("truncate", 1.0):
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, dim - 1)
            ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low or 0.001), 0, 1)
            extra = 1 - ramp  # [dr/2] share of the unscaled frequency
            inv = (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra
        self.register_buffer("inv_freq", inv, persistent=False)  # [dr/2]
        m, m_all = y.get("mscale"), y.get("mscale_all_dim")
        att = y.get("attention_factor")
        if att is None:
            att = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all else _yarn_mscale(factor)
        self.attention_factor = float(att) if y else 1.0  # multiplies cos and sin
        # softmax scale: (dn + dr)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN
        s = _yarn_mscale(factor, m_all) if y and m_all else 1.0
        self.softmax_scale = (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5 * s * s
        self.interleave = a.rope_interleave

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, dr/2]
        f = self.attention_factor
        return (freqs.cos() * f).to(dtype), (freqs.sin() * f).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, h, dr] -> rotated [T, h, dr]. Interleaved pairs come out de-interleaved
        ([even', odd'], as transformers V3 does); q and k share the layout, so q.k is unchanged."""
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class MLAttention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        H = a.hidden_size
        self.heads, self.r, self.dr = a.num_heads, a.kv_lora_rank, a.qk_rope_head_dim
        self.dn, self.dv = a.qk_nope_head_dim, a.v_head_dim
        qk = self.dn + self.dr
        if a.q_lora_rank:
            self.q_a_proj = nn.Linear(H, a.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank, 1e-6)  # transformers builds it with eps 1e-6
            self.q_b_proj = nn.Linear(a.q_lora_rank, self.heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(H, self.heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.r + self.dr, bias=False)
        self.kv_a_layernorm = RMSNorm(self.r, 1e-6)
        self.kv_b_proj = nn.Linear(self.r, self.heads * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(self.heads * self.dv, H, bias=False)
        self.absorb = True  # decode in the absorbed form; False runs the expanded oracle
        self.backend = "auto"  # config attn.backend: "reference" keeps the gather + SDPA forms on CUDA
        self.prefill_kernel = "auto"  # config attn.prefill_kernel: cudnn forces, flash/triton keep SDPA (wants_cudnn)
        # A prefill piece after cached tokens attends in latent space (as decode does) when that is
        # fewer FLOPs than expanding every cached latent through kv_b_proj: per key, expanding costs
        # 2 r h (dn + dv) plus 4 Q h (dn + dr) of attention, the latent form 2 Q h (2 r + dr). For
        # V2-Lite's sizes (r 512, dr 64, dn = dv 128) below 186 queries: a question or a chat turn
        # after a long cached prefix, not the chunks of a long prompt.
        per_q = 2 * self.r + self.dr - 2 * (self.dn + self.dr)
        self.absorb_below = (self.r * (self.dn + self.dv) // per_q) if per_q > 0 else 1 << 30

    def forward(self, x: torch.Tensor, rope: MlaRope, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttnMetadata, cache: torch.Tensor) -> torch.Tensor:
        """x [T, H]; cache [N, P, 1, r + dr], this step's rows written through meta.slot_mapping."""
        q, latent = self.project(x, rope, cos, sin, cache, meta.slot_mapping)
        return self.out(self.attend(q, latent, rope, meta, cache))

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """o [T, h, dv] -> [T, H]: the output projection."""
        return self.o_proj(o.reshape(o.shape[0], self.heads * self.dv))

    def project(self, x: torch.Tensor, rope: MlaRope, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
                slots: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The part before attention (engine.prefill_graphs captures it): x [T, H] -> q [T, h, dn + dr]
        (its rope part rotated) and the latent rows [T, r + dr], which are also stored into the pool
        cache [N, P, 1, r + dr] at slots (negative slots skipped where the kernels run: the padding
        rows of a CUDA-graph batch). out: the (q, latent) tensors to write."""
        T = x.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(T, self.heads, self.dn + self.dr)  # [T, h, dn + dr]
        q_nope, q_pe = q[..., :self.dn], rope.apply(q[..., self.dn:], cos, sin)
        ckv = self.kv_a_proj_with_mqa(x)  # [T, r + dr]
        c = self.kv_a_layernorm(ckv[:, :self.r])  # [T, r]
        k_pe = rope.apply(ckv[:, None, self.r:], cos, sin)[:, 0]  # [T, dr]
        q_out, lat_out = out if out is not None else (None, None)
        latent = torch.cat((c, k_pe), dim=-1, out=lat_out)  # [T, r + dr]
        N, P = cache.shape[:2]
        if use_kernels(x, self.backend):  # the store skips the padding rows (slot -1) of a CUDA-graph batch
            from .attention.triton_cache import store_rows
            store_rows(latent.to(cache.dtype).contiguous(), cache, slots)
        else:
            cache.view(N * P, self.r + self.dr).index_copy_(0, slots, latent.to(cache.dtype))
        return torch.cat((q_nope, q_pe), dim=-1, out=q_out), latent  # [T, h, dn + dr], [T, r + dr]

    def attend(self, q: torch.Tensor, latent: torch.Tensor, rope: MlaRope, meta: AttnMetadata,
               cache: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The step's attention: q [T, h, dn + dr] and latent [T, r + dr] from project (already in
        the pool) -> [T, h, dv] (written into out when given; rows no piece covers are left as they
        are)."""
        T, P = q.shape[0], cache.shape[1]
        if out is None:
            out = q.new_empty(T, self.heads, self.dv)
        scale = rope.softmax_scale
        kernels = self.absorb and use_kernels(q, self.backend)
        for p in meta.prefills:
            rows = slice(p.q_start, p.q_start + p.q_len)
            latent_form = (p.k_len > p.q_len and self.absorb
                           and p.q_len < self.absorb_below * ABSORB_PIECES.get(q.device.type, 0.0))
            if latent_form and kernels:
                out[rows] = self._kernel_piece(q[rows], cache, p, scale)
                continue
            if p.k_len == p.q_len:  # nothing cached before: this piece's own latents, no gather
                lat = latent[rows]
            else:
                nb = (p.k_len + P - 1) // P
                lat = cache[p.block_table[:nb]].reshape(nb * P, -1)[:p.k_len].to(q.dtype)  # [K, r + dr]
            if latent_form:
                out[rows] = self._absorbed_piece(q[rows], lat, scale)
            else:
                out[rows] = self._expanded(q[rows], lat, p.k_len - p.q_len, None, scale)
        if meta.decode_rows is not None and kernels:
            out[meta.decode_rows] = self._kernel_decode(q[meta.decode_rows], cache, meta, scale)
        elif meta.decode_rows is not None:
            B, nb = meta.decode_tables.shape
            lat = cache[meta.decode_tables].reshape(B, nb * P, -1).to(q.dtype)  # [B, K, r + dr]
            valid = torch.arange(nb * P, device=q.device)[None, :] < meta.decode_lens[:, None]  # [B, K]
            qd = q[meta.decode_rows]  # [B, h, dn + dr]
            if self.absorb:
                out[meta.decode_rows] = self._absorbed(qd, lat, valid, scale)
            else:
                for b in range(B):
                    out[meta.decode_rows[b]] = self._expanded(qd[b:b + 1], lat[b], 0, valid[b], scale)[0]
        return out

    def _w_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.heads, self.dn + self.dv, self.r)
        return w[:, :self.dn], w[:, self.dn:]  # W_UK [h, dn, r], W_UV [h, dv, r]

    def wants_cudnn(self, Q: int, offset: int) -> bool:
        """Whether an expanded piece of Q queries after `offset` cached tokens asks for cuDNN (where
        the op runs: cudnn_prefill.mla_cudnn_usable): under attn.prefill_kernel auto, pieces after a
        prefix of at least CUDNN_MIN_QUERIES (module note); cudnn, every piece, any prefix (plans per
        shape unbounded, as for Qwen's layers); flash or triton, none; attn.backend reference, none."""
        if not CUDNN_PIECES or self.backend == "reference":
            return False
        if self.prefill_kernel == "cudnn":
            return True
        return self.prefill_kernel == "auto" and offset > 0 and Q >= CUDNN_MIN_QUERIES

    def _expanded(self, q: torch.Tensor, lat: torch.Tensor, offset: int, valid: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
        """q [Q, h, dn+dr] over latents lat [K, r+dr] (queries start at key `offset`) -> [Q, h, dv].

        valid [K] masks padded keys (decode); otherwise causal with the offset."""
        Q, K = q.shape[0], lat.shape[0]
        kv = self.kv_b_proj(lat[:, :self.r]).view(K, self.heads, self.dn + self.dv)  # [K, h, dn + dv]
        k = torch.cat((kv[..., :self.dn], lat[:, None, self.r:].expand(K, self.heads, self.dr)), -1)  # [K, h, dn+dr]
        v = kv[..., self.dn:]  # [K, h, dv]
        if valid is None and q.is_cuda and self.wants_cudnn(Q, offset):
            from .attention import cudnn_prefill
            if cudnn_prefill.mla_cudnn_usable(q, offset, forced=self.prefill_kernel == "cudnn"):
                o = cudnn_prefill.cudnn_expanded(q, k, v, offset, scale)
                if o is not None:
                    return o
        if self.dv < self.dn + self.dr:  # pad V to the QK width so fused SDPA kernels apply
            v = F.pad(v, (0, self.dn + self.dr - self.dv))
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        if valid is not None:
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=valid[None, None, None, :], scale=scale)
        elif offset == 0:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
        elif LOWER_RIGHT:  # the queries are the keys' last Q: flash takes this without a mask
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=causal_lower_right(Q, K), scale=scale)
        else:
            rows = torch.arange(Q, device=q.device)[:, None] + offset
            mask = torch.arange(K, device=q.device)[None, :] <= rows  # [Q, K]
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
        return o[0].transpose(0, 1)[..., :self.dv]  # [Q, h, dv]

    def _absorbed_piece(self, q: torch.Tensor, lat: torch.Tensor, scale: float) -> torch.Tensor:
        """q [Q, h, dn+dr], the last Q of the latents lat [K, r+dr], causal -> [Q, h, dv], in latent
        space as decode: each query's heads are query rows of the one latent head, so no per-head
        K/V of the cached tokens is built. Two GEMMs over the scores [rows, K], materialised in fp32
        (mm_fp32) for a group of queries at a time (at most PIECE_SCORE_BYTES); only the last Q keys
        can be masked (bottom-right causal). On the 2-core VM 0.65-0.77x the time of SDPA with a
        [rows, K] boolean mask, the form before (benchmarks/RESULTS.md, thirty-ninth session)."""
        Q, K = q.shape[0], lat.shape[0]
        h, r = self.heads, self.r
        qf = self._absorb_query(q, lat.dtype).reshape(Q * h, -1)  # [Q h, r + dr]
        o = qf.new_empty(Q * h, r)
        rows = max(1, min(Q, PIECE_SCORE_BYTES // (4 * h * K))) * h  # whole queries a group
        tail = torch.arange(Q, device=q.device)  # the last Q keys, the only ones a row may not see
        for s in range(0, Q * h, rows):
            n = min(rows, Q * h - s)
            scores = mm_fp32(qf[s:s + n], lat.t())  # [n, K]
            query = torch.arange(s, s + n, device=q.device) // h
            scores[:, K - Q:].masked_fill_(tail[None, :] > query[:, None], float("-inf"))
            p = torch.softmax(scores.mul_(scale), dim=-1).to(lat.dtype)
            o[s:s + n] = p @ lat[:, :r]
        return torch.einsum("qhr,hvr->qhv", o.view(Q, h, r), self._w_kv_b()[1])  # [Q, h, dv]

    def _absorb_query(self, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """q [n, h, dn+dr] -> [n, h, r + dr] in latent space ([q_nope @ W_UK, q_pe]), contiguous."""
        q_lat = torch.einsum("nhd,hdr->nhr", q[..., :self.dn], self._w_kv_b()[0])  # [n, h, r]
        return torch.cat((q_lat, q[..., self.dn:]), dim=-1).to(dtype)

    def _kernel_piece(self, q: torch.Tensor, cache: torch.Tensor, p, scale: float) -> torch.Tensor:
        """q [Q, h, dn+dr], a piece's queries at the end of its k_len keys in the pool -> [Q, h, dv]:
        the Triton kernel over the pool's latent rows (causal, bottom-right)."""
        from .attention import triton_mla as tm
        Q, dev = q.shape[0], q.device
        qf = self._absorb_query(q, cache.dtype)  # [Q, h, r + dr]
        o = q.new_empty(1, Q * self.heads, self.r)
        zero = torch.zeros(1, dtype=torch.int32, device=dev)  # the piece's first row of qf
        tile = {}  # decode's blocks, or (rows enough) a piece's, with their fallback
        if Q * self.heads >= tm.PIECE_BLOCK_M:
            tile = dict(tm.piece_tile(cache), fallback=tm.FALLBACK_TILE)
        tm.mla_attention(qf, cache, self.r, zero, zero + Q, zero + p.k_len, p.block_table[None], Q, p.k_len, scale, o,
                         **tile)
        return torch.einsum("qhr,hvr->qhv", o.view(Q, self.heads, self.r), self._w_kv_b()[1])

    def _kernel_decode(self, q: torch.Tensor, cache: torch.Tensor, meta: AttnMetadata, scale: float) -> torch.Tensor:
        """q [B, h, dn+dr], one query per sequence after the rest of its decode_lens keys -> [B, h, dv]."""
        from .attention import triton_mla as tm
        B, dev = q.shape[0], q.device
        qf = self._absorb_query(q, cache.dtype)  # [B, h, r + dr]
        key = ("mla_decode", B, dev)
        idx = meta.scratch.get(key)
        if idx is None:  # the same for every layer of the step
            idx = meta.scratch[key] = (torch.arange(B, dtype=torch.int32, device=dev),
                                       torch.ones(B, dtype=torch.int32, device=dev))
        bound = meta.decode_max_len or meta.decode_tables.shape[1] * cache.shape[1]
        o = q.new_empty(B, self.heads, self.r)
        tm.mla_attention(qf, cache, self.r, idx[0], idx[1], meta.decode_lens, meta.decode_tables, 1, bound, scale, o,
                         **tm.decode_tile(cache), fallback=tm.DECODE_FALLBACK,
                         target_programs=tm.DECODE_TARGET_PROGRAMS)
        return torch.einsum("bhr,hvr->bhv", o, self._w_kv_b()[1])

    def _absorbed(self, q: torch.Tensor, lat: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B, h, dn+dr] over lat [B, K, r+dr] with valid [B, K] -> [B, h, dv], in latent space."""
        qf = self._absorb_query(q, q.dtype)  # [B, h, r + dr]
        # the heads act as query rows of one shared key/value head: no GQA expansion of the context
        o = F.scaled_dot_product_attention(qf[:, None], lat[:, None], lat[:, None, :, :self.r],
                                           attn_mask=valid[:, None, None, :], scale=scale)  # [B, 1, h, r]
        return torch.einsum("bhr,hvr->bhv", o[:, 0], self._w_kv_b()[1])  # [B, h, dv]
