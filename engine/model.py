"""Qwen3-MoE and Mixtral decoder: one module tree for both, built from ModelArgs.

Differences are data, not classes: Qwen3 has per-head q/k RMSNorm and optional dense layers and
renormalises top-k weights only with `norm_topk_prob`; Mixtral always renormalises. The forward
takes a flat batch of tokens and an AttnMetadata, and the KV pool from outside.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import add_rms_norm, use_kernels
from .layers import Attention, AttnMetadata, GatedMLP, RMSNorm, Rope
from .model_args import ModelArgs
from .moe import MoEBlock


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm,
                                   a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        if a.is_moe_layer(i):
            self.mlp = MoEBlock(a.hidden_size, a.moe_intermediate_size, a.num_experts, a.top_k,
                                a.norm_topk_prob)
        else:
            self.mlp = GatedMLP(a.hidden_size, a.intermediate_size)

    def forward(self, x, cos, sin, meta, k_cache, v_cache):
        return self.post(x, self.self_attn(self.input_layernorm(x), cos, sin, meta, k_cache, v_cache))

    def pre(self, x, cos, sin, out=None, store=None):
        """The part before attention: x [T, H] -> q [T, Hq, D], k, v [T, Hkv, D] (written into out's
        three tensors when given; k and v into the pool too with store: Attention.project)."""
        return self.self_attn.project(self.input_layernorm(x), cos, sin, out, store)

    def post(self, x, a, out=None):
        """The part after attention: residual x [T, H] and the attention's projected output a [T, H]
        -> the layer's output [T, H] (written into out when given; out may be x)."""
        norm = self.post_attention_layernorm
        if use_kernels(x, norm.backend):  # residual add + norm in one launch
            x, h = add_rms_norm(x, a, norm.weight, norm.eps)
        else:
            x = x + a
            h = norm(x)
        if isinstance(self.mlp, MoEBlock):  # the add inside the experts' last launch where it can
            return self.mlp(h, residual=x, out=out)
        return x + self.mlp(h) if out is None else torch.add(x, self.mlp(h), out=out)


class Backbone(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(a, i) for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.model = Backbone(a)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        self.rope = self.build_rope()
        if a.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def build_rope(self) -> Rope:
        return Rope(self.args.head_dim, self.args.rope_theta)

    def moe_blocks(self) -> list[MoEBlock]:
        return [l.mlp for l in self.model.layers if isinstance(l.mlp, MoEBlock)]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata, kv_layer) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, H]; kv_layer(i) gives layer i's (K, V) cache."""
        x = self.model.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.rope.cos_sin(meta.positions, x.dtype)  # [T, D]
        for i, layer in enumerate(self.model.layers):
            k_cache, v_cache = kv_layer(i)
            x = layer(x, cos, sin, meta, k_cache, v_cache)
        return self.model.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [n, vocab]
