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
"""
from __future__ import annotations

import torch

from .attention import kernel_attention
from .attention.triton_cache import store_kv
from .cuda_graphs import ensure_captured
from .kv_cache import KVCache
from .layers import AttnMetadata
from .model import CausalLM


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


class PrefillGraphs:
    def __init__(self, model: CausalLM, kv: KVCache, device: torch.device, max_tokens: int,
                 capture: bool = True):
        """capture=False runs the same pieces over the same static buffers without graphs (the
        tests check the split on CPU that way, under triton's interpreter)."""
        self.model, self.kv, self.device, self.capture = model, kv, device, capture
        self.sizes = buckets(max_tokens)
        a = model.args
        T = self.sizes[-1]
        dt = model.lm_head.weight.dtype
        long = dict(dtype=torch.long, device=device)
        self.ids = torch.zeros(T, **long)  # [T] static inputs
        self.positions = torch.zeros(T, **long)
        self.slots = torch.full((T,), -1, **long)
        self.x = torch.zeros(T, a.hidden_size, dtype=dt, device=device)  # [T, H] the residual stream
        self.q = torch.zeros(T, a.num_heads, a.head_dim, dtype=dt, device=device)  # [T, Hq, D]
        self.k = torch.zeros(T, a.num_kv_heads, a.head_dim, dtype=dt, device=device)  # [T, Hkv, D]
        self.v = torch.zeros_like(self.k)
        self.o = torch.zeros_like(self.q)  # [T, Hq, D] the attention's output (written eagerly)
        self.cos = torch.zeros(T, a.head_dim, dtype=dt, device=device)  # [T, D]
        self.sin = torch.zeros_like(self.cos)
        self.hidden = torch.zeros_like(self.x)  # [T, H] the final norm's output
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.pool = None
        self.disabled: str | None = None
        self.replays = 0

    def bucket(self, T: int) -> int | None:
        """The bucket a step of T tokens runs in, or None (eager)."""
        if self.disabled is not None or T > self.sizes[-1]:
            return None
        return next(s for s in self.sizes if s >= T)

    # -- the captured pieces: each reads and writes only the static buffers ----------------------
    def _before(self, i: int, B: int) -> None:
        """Layer i's part before attention over the first B rows: q, k, v, and the K/V store."""
        layer = self.model.model.layers[i]
        q, k, v = layer.pre(self.x[:B], self.cos[:B], self.sin[:B])
        self.q[:B].copy_(q)
        self.k[:B].copy_(k)
        self.v[:B].copy_(v)
        k_cache, v_cache = self.kv.pool.layer(i)
        store_kv(self.k[:B], self.v[:B], k_cache, v_cache, self.slots[:B])

    def _after(self, i: int, B: int) -> None:
        layer = self.model.model.layers[i]
        self.x[:B].copy_(layer.post(self.x[:B], layer.self_attn.out(self.o[:B])))

    def _piece(self, j: int, B: int) -> None:
        """Graph j of bucket B (module doc)."""
        L = len(self.model.model.layers)
        if j == 0:
            x = self.model.model.embed_tokens(self.ids[:B])  # [B, H]
            cos, sin = self.model.rope.cos_sin(self.positions[:B], x.dtype)
            self.x[:B].copy_(x)
            self.cos[:B].copy_(cos)
            self.sin[:B].copy_(sin)
        else:
            self._after(j - 1, B)
        if j < L:
            self._before(j, B)
        else:
            self.hidden[:B].copy_(self.model.model.norm(self.x[:B]))

    def _capture(self, B: int) -> None:
        self.ids[:B] = 0
        self.positions[:B] = 0
        self.slots[:B] = -1  # the warm-up stores nothing into the pool
        self.o[:B] = 0
        n = len(self.model.model.layers) + 1
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():  # warm-up: triton compiles, cuBLAS picks
            for j in range(n):
                self._piece(j, B)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if not all(getattr(b.experts, "capturable", False) for b in self.model.moe_blocks()):
            raise RuntimeError("the MoE experts' path syncs with the host")
        graphs = []
        with torch.inference_mode():
            for j in range(n):
                g = torch.cuda.CUDAGraph()
                # thread_local: the engine's other threads (loads, puts) keep using CUDA meanwhile
                with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
                    self._piece(j, B)
                if self.pool is None:
                    self.pool = g.pool()
                graphs.append(g)
        self.graphs[B] = graphs

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata) -> torch.Tensor | None:
        """Final hidden states [T, H] of a step (a view of a static buffer, valid until the next
        step), or None when this step must run eagerly. input_ids, meta.positions and
        meta.slot_mapping are the step's [T] device tensors."""
        T = input_ids.shape[0]
        B = self.bucket(T)
        if B is None:
            return None
        if self.capture and not ensure_captured(self, B, "prefill"):
            return None
        self.ids[:T].copy_(input_ids)
        self.positions[:T].copy_(meta.positions)
        self.slots[:T].copy_(meta.slot_mapping)
        if B > T:
            self.slots[T:B] = -1  # padding rows store nothing (their ids / positions may be stale)
        if self.capture:
            pieces = [g.replay for g in self.graphs[B]]
        else:
            pieces = [lambda j=j: self._piece(j, B) for j in range(len(self.model.model.layers) + 1)]
        pieces[0]()
        for i, layer in enumerate(self.model.model.layers):
            att = layer.self_attn
            k_cache, v_cache = self.kv.layer(i)  # after the layer's load events (KVCache.layer)
            kernel_attention(self.q[:B], self.k[:B], self.v[:B], k_cache, v_cache, meta, att.scale,
                             att.prefill_kernel, out=self.o[:B], store=False)
            pieces[i + 1]()
        self.replays += 1
        return self.hidden[:T]
