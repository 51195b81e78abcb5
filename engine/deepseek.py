"""DeepSeek-V2/V3 decoder: MLA attention over latent pages, MoE with shared experts.

Same outside shape as model.CausalLM (forward(input_ids, meta, kv_layer), logits, moe_blocks), so
the runner, offload and the cache tiers need not know which family runs. The MoE block is a
MoEBlock (router `gate` [E, H], stacked routed `experts`, swappable backend), so setup_experts
places and offloads the routed experts exactly as for Qwen3; the shared experts are a plain MLP
beside them and always stay on the device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import AttnMetadata, GatedMLP, RMSNorm
from .mla import MLAttention, MlaRope
from .model_args import ModelArgs
from .moe import MoEBlock


def route_deepseek(logits: torch.Tensor, a: ModelArgs, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """router logits [T, E] fp32 -> (ids [T, k], weights [T, k] fp32), DeepSeek's grouped top-k.

    V3: sigmoid scores; experts are chosen on scores + e_score_correction_bias, groups ranked by
    the sum of their top-2; weights are the unbiased scores. V2: softmax; group_limited_greedy
    ranks groups by their max. Then optional renormalisation and routed_scaling_factor.
    """
    T, E = logits.shape
    G = a.n_group
    if a.scoring == "sigmoid":
        scores = logits.sigmoid()  # [T, E]
        choice = scores + bias if bias is not None else scores
        if G > 1:
            group = choice.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)  # [T, G]
            choice = choice.masked_fill(~_group_mask(group, a.topk_group, E // G), float("-inf"))
        ids = torch.topk(choice, a.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, ids)
    else:
        scores = logits.softmax(dim=-1)
        if a.topk_method == "group_limited_greedy" and G > 1:
            group = scores.view(T, G, E // G).max(dim=-1).values  # [T, G]
            scores = scores.masked_fill(~_group_mask(group, a.topk_group, E // G), 0.0)
        weights, ids = torch.topk(scores, a.top_k, dim=-1)
    if a.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * a.routed_scaling_factor


def _group_mask(group_scores: torch.Tensor, keep: int, per_group: int) -> torch.Tensor:
    """[T, G] group scores -> [T, E] bool, True for experts in the `keep` best groups."""
    idx = torch.topk(group_scores, keep, dim=-1).indices  # [T, keep]
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, idx, True)  # [T, G]
    return mask.repeat_interleave(per_group, dim=1)  # [T, E]


class DeepseekMoE(MoEBlock):
    def __init__(self, a: ModelArgs):
        super().__init__(a.hidden_size, a.moe_intermediate_size, a.num_experts, a.top_k, a.norm_topk_prob)
        self.args = a
        if a.scoring == "sigmoid":  # registered on the router, the checkpoint's own name
            self.gate.e_score_correction_bias = nn.Parameter(torch.zeros(a.num_experts), requires_grad=False)
        self.shared_experts = (GatedMLP(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts)
                               if a.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.gate.weight.float())  # [T, E], fp32 as the reference does
        ids, weights = route_deepseek(logits, self.args, getattr(self.gate, "e_score_correction_bias", None))
        backend = self._backend if self._backend is not None else self.experts
        y = backend.forward(x, ids, weights)  # [T, H]
        return y if self.shared_experts is None else y + self.shared_experts(x)


class DeepseekLayer(nn.Module):
    def __init__(self, a: ModelArgs, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = MLAttention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = DeepseekMoE(a) if a.is_moe_layer(i) else GatedMLP(a.hidden_size, a.intermediate_size)

    def forward(self, x, rope, cos, sin, meta, cache):
        q, latent = self.pre(x, rope, cos, sin, cache, meta.slot_mapping)
        return self.post(x, self.self_attn.out(self.self_attn.attend(q, latent, rope, meta, cache)))

    def pre(self, x, rope, cos, sin, cache, slots, out=None):
        """The part before attention: x [T, H] -> q [T, h, dn + dr] and the latent rows [T, r + dr],
        stored into the pool at slots (MLAttention.project; out: the two tensors to write)."""
        return self.self_attn.project(self.input_layernorm(x), rope, cos, sin, cache, slots, out)

    def post(self, x, a, out=None):
        """The part after attention: residual x [T, H] and the attention's projected output a [T, H]
        -> the layer's output [T, H] (written into out when given; out may be x)."""
        x = x + a
        y = x + self.mlp(self.post_attention_layernorm(x))
        return y if out is None else out.copy_(y)


class _Backbone(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(DeepseekLayer(a, i) for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class DeepseekCausalLM(nn.Module):
    # kept in fp32 whatever the model dtype (routing decisions flip on bf16 rounding)
    fp32_weights = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.model = _Backbone(a)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        self.rope = self.build_rope()
        if a.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def build_rope(self) -> MlaRope:
        return MlaRope(self.args)

    def moe_blocks(self) -> list[MoEBlock]:
        return [l.mlp for l in self.model.layers if isinstance(l.mlp, MoEBlock)]

    def set_absorb(self, on: bool) -> None:
        """Decode (and short prefill pieces after cached tokens) in the absorbed form (default) or
        through the expanded oracle."""
        for l in self.model.layers:
            l.self_attn.absorb = on

    def graph_blocker(self) -> str | None:
        """Why decode steps cannot be CUDA graphs now (None: they can): a graph's padding rows have
        slot -1, which only the kernels' store skips, and the gather paths would read max_blocks pages."""
        for l in self.model.layers:
            if not l.self_attn.absorb:
                return "MLA decodes through the expanded oracle (set_absorb(False))"
            if l.self_attn.backend == "reference":
                return "MLA layers on attn.backend reference"
        return None

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata, kv_layer) -> torch.Tensor:
        """input_ids [T] -> final hidden [T, H]; kv_layer(i)[0] is layer i's latent pool [N, P, 1, r+dr]."""
        x = self.model.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.rope.cos_sin(meta.positions, x.dtype)  # [T, dr/2]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, self.rope, cos, sin, meta, kv_layer(i)[0])
        return self.model.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [n, vocab]
