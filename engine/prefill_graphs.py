"""Steps with prefill pieces as piecewise CUDA graphs: everything but attention replayed, attention eager.

A 2048-token chunk of a long prompt used to be bound by kernel launches from Python (about 20 a
layer, ~27 us of host time each on the H200: more host time than GPU time per chunk). Attention
cannot be captured as it is: its pieces' lengths, prefixes and kernels (cuDNN plans, FA2, the Triton
kernel) change from step to step. Everything else in a layer depends only on the number of tokens:
so a step of T tokens is padded to the smallest bucket >= T and runs as

    graph 0:    embedding, RoPE tables, layer 0's norm, q/k/v projections, q/k norms + RoPE, K/V store
    attention 0 (eager: engine.attention.kernel_attention, store=False, into a static output)
    graph i:    layer i-1's output projection, residual add + norm, MoE (router + fused experts),
                residual, then layer i's part before attention as in graph 0
    ...
    graph L:    the last layer's part after attention and the final norm

that is L + 1 graph launches and L eager attention calls instead of ~20 L launches. Padding rows
have slot -1 (the K/V store skips them), token 0 and position 0; no attention piece covers them and
their hidden states are never read (logits come from real rows only). Every graph reads and writes
static buffers (ids, positions, slots, the residual, q/k/v, the attention output), so all buckets
share one memory pool and a bucket costs only its temporaries (~100 MB at 2048 tokens for
Qwen3-30B-A3B shapes). Buckets are captured lazily, the first time a step needs one, after one eager
warm-up (Triton compiles, cuBLAS picks). Models and settings that keep decode eager
(engine.cuda_graphs.graphs_supported) keep prefill eager too; so does config
`model.prefill_graph_tokens: 0` or `model.enforce_eager`. Steps of more tokens than the largest
bucket run eagerly: they are compute-bound, launches do not matter there.

Short steps of prefill pieces only (a prefix hit's suffix, below FLASH_MIN_Q tokens, no decode
rows, at most MAX_PIECES pieces) capture the attention too: the Triton prefill kernel and its
split-K merge read the pieces from static device buffers (tables, query starts and lengths, key
lengths) with a plan fixed per bucket (engine.attention.triton_prefill.fixed_plan: each piece
splits its own keys), so graph j runs layer j-1's attention first and the step is L + 1 graph
launches. Each eager attention call (kernel + merge through Triton's Python launcher) took
0.05-0.26 ms of host time against 0.02-0.13 ms of GPU time on the H200; captured, a 32K device
hit took 0.4-1.2 ms less (runs BB, BG: most of those launches had hidden behind the GPU). Where the
device and the pool allow (triton_prefill.tma_usable), the captured kernel reads key tiles whose
pages are adjacent in the pool as TMA boxes (checked per program in the kernel, so one graph
serves any block layout; 19% less GPU time at 32K + 64 in run DZ). A step's
pieces pick the graphs for one piece or for up to MAX_PIECES (pieces past the step's have no
queries and return at once); config `attn.prefill_kernel` other than auto/triton keeps
attention eager.
"""
from __future__ import annotations

import torch

from .attention import kernel_attention, use_kernels
from .cuda_graphs import ensure_captured, warm_and_capture
from .kv_cache import KVCache
from .layers import AttnMetadata
from .model import CausalLM


# rows of q / k / v past the largest bucket (finite: zeros, or an earlier step's): cudnn_prefill's
# CUDNN_ALIGN (not imported: that module needs triton; with fewer, its pieces would pad again)
SPARE_ROWS = 512


def buckets(max_tokens: int) -> list[int]:
    """Token-count buckets: powers of two from 16 to 512, then multiples of 512, up to max_tokens
    (included even when it is not on that grid)."""
    out, b = [], 16
    while b < min(512, max_tokens):
        out.append(b)
        b *= 2
    b = 512
    while b < max_tokens:
        out.append(b)
        b += 512
    return out + [max_tokens]


MAX_PIECES = 8  # prefill pieces a step with captured attention may have


class PrefillGraphs:
    def __init__(self, model: CausalLM, kv: KVCache, device: torch.device, max_tokens: int,
                 capture: bool = True, max_model_len: int | None = None):
        """capture=False runs the same pieces over the same static buffers without graphs (the
        tests check the split on CPU that way, under triton's interpreter). max_model_len (default:
        the model's max_position_embeddings) bounds a piece's keys in captured attention."""
        self.model, self.kv, self.device, self.capture = model, kv, device, capture
        self.sizes = buckets(max_tokens)
        a = model.args
        T = self.sizes[-1]
        P = kv.page_size
        self.max_k = max_model_len or a.max_position_embeddings
        self.max_blocks = (self.max_k + P - 1) // P
        from .attention.flash_prefill import FLASH_MIN_Q  # the eager path's Triton range
        self.attn_sizes = {s for s in self.sizes if s < FLASH_MIN_Q} if use_kernels(torch.empty(0, device=device)) \
            else set()
        self.tables = torch.zeros(MAX_PIECES, self.max_blocks, dtype=torch.int32, device=device)
        self.spans = torch.zeros(3, MAX_PIECES, dtype=torch.int32, device=device)  # q_starts, q_lens, k_lens
        self.plans: dict[int, tuple] = {}  # bucket -> (fixed plan, its split buffers)
        dt = model.lm_head.weight.dtype
        long = dict(dtype=torch.long, device=device)
        self.ids = torch.zeros(T, **long)  # [T] static inputs
        self.positions = torch.zeros(T, **long)
        self.slots = torch.full((T,), -1, **long)
        self.x = torch.zeros(T, a.hidden_size, dtype=dt, device=device)  # [T, H] the residual stream
        self.spare_rows = SPARE_ROWS  # (benchmarks set 0 to time the padding copies and per-layer views)
        self._attention_buffers(T, dt)
        self.hidden = torch.zeros_like(self.x)  # [T, H] the final norm's output
        # (bucket, pieces, tma): pieces 0 = attention eager between the graphs, 1 or MAX_PIECES
        # captured, with the kernel's TMA tiles (tma) or its pointer loads only
        self.graphs: dict[tuple[int, int, bool], list[torch.cuda.CUDAGraph]] = {}
        # captured attention reads key tiles on adjacent pages as TMA boxes (triton_prefill.launch's
        # tma) where the device and the pool allow it; None: decided at the first capture
        # (benchmarks set False to time the pointer loads side by side)
        self.attn_tma: bool | None = None
        self.pool = None
        self.disabled: str | None = None
        self.replays = 0
        self.attention_replays = 0  # steps whose attention ran inside the graphs

    def _attention_buffers(self, T: int, dt: torch.dtype) -> None:
        """The static tensors around attention for steps of up to T tokens."""
        a, device = self.model.args, self.device
        # q, k, v keep SPARE_ROWS zero rows past the largest bucket: the eager cuDNN path reads a
        # piece's padding up to its CUDNN_ALIGN bucket in place there (cudnn_prefill._rows)
        self.q = torch.zeros(T + SPARE_ROWS, a.num_heads, a.head_dim, dtype=dt, device=device)  # [T+, Hq, D]
        self.k = torch.zeros(T + SPARE_ROWS, a.num_kv_heads, a.head_dim, dtype=dt, device=device)  # [T+, Hkv, D]
        self.v = torch.zeros_like(self.k)
        self.o = torch.zeros(T, a.num_heads, a.head_dim, dtype=dt, device=device)  # the attention's output (eager)
        self.cos = torch.zeros(T, a.head_dim, dtype=dt, device=device)  # [T, D]
        self.sin = torch.zeros_like(self.cos)

    def bucket(self, T: int) -> int | None:
        """The bucket a step of T tokens runs in, or None (eager)."""
        if self.disabled is not None or T > self.sizes[-1]:
            return None
        return next(s for s in self.sizes if s >= T)

    # -- the captured pieces: each reads and writes only the static buffers ----------------------
    def _before(self, i: int, B: int) -> None:
        """Layer i's part before attention over the first B rows: q, k, v, and the K/V store."""
        layer = self.model.model.layers[i]
        k_cache, v_cache = self.kv.pool.layer(i)  # the store inside the RoPE kernel where it runs fused
        layer.pre(self.x[:B], self.cos[:B], self.sin[:B], out=(self.q[:B], self.k[:B], self.v[:B]),
                  store=(k_cache, v_cache, self.slots[:B]))

    def _after(self, i: int, B: int) -> None:
        layer = self.model.model.layers[i]
        layer.post(self.x[:B], layer.self_attn.out(self.o[:B]), out=self.x[:B])

    def _attend_eager(self, i: int, B: int, meta: AttnMetadata) -> None:
        """Layer i's attention between graphs i and i + 1, over the step's pieces into o."""
        att = self.model.model.layers[i].self_attn
        k_cache, v_cache = self.kv.layer(i)  # after the layer's load events (KVCache.layer)
        kernel_attention(self.q[:B], self.k[:B], self.v[:B], k_cache, v_cache, meta, att.scale,
                         att.prefill_kernel, out=self.o[:B], store=False, spare_rows=self.spare_rows)

    def _attend(self, i: int, B: int, n: int, tma: bool) -> None:
        """Layer i's attention over the first B rows, n pieces from the static buffers."""
        from .attention.triton_prefill import launch
        plan, bufs = self.plans[B]
        att = self.model.model.layers[i].self_attn
        k_cache, v_cache = self.kv.pool.layer(i)
        launch(plan, self.q[:B], k_cache, v_cache, self.o[:B], self.tables[:n], self.spans[0, :n],
               self.spans[1, :n], self.spans[2, :n], B, att.scale, bufs, tma=tma)

    def _tma(self, B: int) -> bool:
        """Whether bucket B's captured attention takes the TMA tiles (attn_tma, decided once)."""
        if self.attn_tma is None:
            from .attention.triton_prefill import tma_usable
            self._plan(B)
            k_cache, v_cache = self.kv.pool.layer(0)
            self.attn_tma = tma_usable(self.q[:B], k_cache, v_cache, self.plans[B][0].block_d)
        return self.attn_tma

    def _piece(self, j: int, B: int, pieces: int = 0, tma: bool = False) -> None:
        """Graph j of bucket B (module doc); pieces > 0: layer j-1's attention over that many
        pieces first (tma: with the kernel's TMA tiles)."""
        L = len(self.model.model.layers)
        if j == 0:
            x = self.model.model.embed_tokens(self.ids[:B])  # [B, H]
            cos, sin = self.model.rope.cos_sin(self.positions[:B], x.dtype)
            self.x[:B].copy_(x)
            self.cos[:B].copy_(cos)
            self.sin[:B].copy_(sin)
        else:
            if pieces:
                self._attend(j - 1, B, pieces, tma)
            self._after(j - 1, B)
        if j < L:
            self._before(j, B)
        else:
            self.hidden[:B].copy_(self.model.model.norm(self.x[:B]))

    def _plan(self, B: int) -> None:
        from .attention.triton_prefill import fixed_plan, split_buffers
        if B not in self.plans:
            a = self.model.args
            plan = fixed_plan(self.q[:B], a.num_kv_heads, B, self.max_k)
            bufs = split_buffers(B, a.num_heads, plan, self.device) if plan.splits > 1 else None
            self.plans[B] = (plan, bufs)

    def _capture(self, key: tuple[int, int, bool]) -> None:
        B, pieces, tma = key
        self.ids[:B] = 0
        self.positions[:B] = 0
        self.slots[:B] = -1  # the warm-up stores nothing into the pool
        self.o[:B] = 0
        self.spans.zero_()  # the warm-up's attention has no pieces (every program returns at once)
        if pieces:
            self._plan(B)
        n = len(self.model.model.layers) + 1

        def check() -> None:
            if not all(getattr(b.experts, "capturable", False) for b in self.model.moe_blocks()):
                raise RuntimeError("the MoE experts' path syncs with the host")
        graphs, _ = warm_and_capture(self.device, self.pool, lambda j: self._piece(j, B, pieces, tma), n, check)
        if self.pool is None:
            self.pool = graphs[0].pool()
        self.graphs[key] = graphs

    def _pieces(self, B: int, meta: AttnMetadata) -> int:
        """1 or MAX_PIECES: the captured-attention graphs this step can run; 0: attention eager."""
        n = len(meta.prefills)
        if (B not in self.attn_sizes or meta.decode_rows is not None or not 0 < n <= MAX_PIECES
                or meta.prefill_tables is None or meta.prefill_tables.shape[1] > self.max_blocks
                or meta.prefill_max_k > self.max_k
                or any(layer.self_attn.prefill_kernel not in ("auto", "triton") for layer in self.model.model.layers)):
            return 0
        return 1 if n == 1 else MAX_PIECES

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata) -> torch.Tensor | None:
        """Final hidden states [T, H] of a step (a view of a static buffer, valid until the next
        step), or None when this step must run eagerly. input_ids, meta.positions and
        meta.slot_mapping are the step's [T] device tensors."""
        T = input_ids.shape[0]
        B = self.bucket(T)
        if B is None:
            return None
        pieces = self._pieces(B, meta)
        tma = bool(pieces) and self._tma(B)
        key = (B, pieces, tma)
        if self.capture and not ensure_captured(self, key, "prefill"):
            return None
        self.ids[:T].copy_(input_ids)
        self.positions[:T].copy_(meta.positions)
        self.slots[:T].copy_(meta.slot_mapping)
        if B > T:
            self.slots[T:B] = -1  # padding rows store nothing (their ids / positions may be stale)
        if pieces:
            n, w = meta.prefill_tables.shape
            self.tables[:n, :w].copy_(meta.prefill_tables)  # entries past a piece's keys are never read
            if n < pieces:
                self.spans[:, n:pieces] = 0  # pieces past the step's have no queries
            self.spans[0, :n].copy_(meta.prefill_q_starts)
            self.spans[1, :n].copy_(meta.prefill_q_lens)
            self.spans[2, :n].copy_(meta.prefill_k_lens)
            if not self.capture:
                self._plan(B)
        if self.capture:
            run = [g.replay for g in self.graphs[key]]
        else:
            run = [lambda j=j: self._piece(j, B, pieces, tma) for j in range(len(self.model.model.layers) + 1)]
        run[0]()
        for i in range(len(self.model.model.layers)):
            if pieces:  # graph i + 1 runs layer i's attention: first the layer's load events
                self.kv.layer(i)
            else:
                self._attend_eager(i, B, meta)  # (which waits for them itself)
            run[i + 1]()
        self.replays += 1
        self.attention_replays += pieces > 0
        return self.hidden[:T]


class MlaPrefillGraphs(PrefillGraphs):
    """engine.deepseek.DeepseekCausalLM's steps as the same piecewise graphs, attention always eager.

    A layer splits as DeepseekLayer.pre (norm, q and latent projections, RoPE, the latent rows'
    store into the pool) / MLAttention.attend (eager: the expanded, cuDNN or latent-kernel paths,
    whatever the step's pieces need) / MLAttention.out + DeepseekLayer.post (output projection,
    residual, norm, router, experts, shared experts; the base class's _after). Before, a DeepSeek
    prefill step was eager throughout: a 64-token step of 8 V2-Lite layers was ~400 launches, 4.0
    ms of GPU work in a 15.3 ms span on an H100 (benchmarks/RESULTS.md, thirty-ninth session)."""

    def _attention_buffers(self, T: int, dt: torch.dtype) -> None:
        a, device = self.model.args, self.device
        self.attn_sizes = set()  # no captured attention: its pieces' paths change with their lengths
        self.q = torch.zeros(T, a.num_heads, a.qk_nope_head_dim + a.qk_rope_head_dim, dtype=dt, device=device)
        self.lat = torch.zeros(T, a.kv_lora_rank + a.qk_rope_head_dim, dtype=dt, device=device)  # [T, r + dr]
        self.o = torch.zeros(T, a.num_heads, a.v_head_dim, dtype=dt, device=device)  # [T, h, dv]
        self.cos = torch.zeros(T, a.qk_rope_head_dim // 2, dtype=dt, device=device)  # [T, dr / 2]
        self.sin = torch.zeros_like(self.cos)

    def _before(self, i: int, B: int) -> None:
        layer = self.model.model.layers[i]
        layer.pre(self.x[:B], self.model.rope, self.cos[:B], self.sin[:B], self.kv.pool.layer(i)[0],
                  self.slots[:B], out=(self.q[:B], self.lat[:B]))

    def _attend_eager(self, i: int, B: int, meta: AttnMetadata) -> None:
        att = self.model.model.layers[i].self_attn
        cache = self.kv.layer(i)[0]  # after the layer's load events (KVCache.layer)
        att.attend(self.q[:B], self.lat[:B], self.model.rope, meta, cache, out=self.o[:B])

    def _pieces(self, B: int, meta: AttnMetadata) -> int:
        return 0

    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata) -> torch.Tensor | None:
        # a layer put on the reference path stores its latent rows by index_copy_, which the
        # padding rows' slot -1 would fail: such steps run eagerly
        if any(layer.self_attn.backend == "reference" for layer in self.model.model.layers):
            return None
        return super().forward(input_ids, meta)
