"""The DeepSeek half of make_tiny_model: configs and Hub-named random weights for deepseek_v2/v3."""
from __future__ import annotations

import torch

BASE = {
    "deepseek_v3": dict(vocab_size=272, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                        num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True,
                        rms_norm_eps=1e-6, max_position_embeddings=4096, rope_theta=10000.0,
                        rope_scaling=None),
    "deepseek_v2": dict(vocab_size=272, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                        num_experts_per_tok=2, n_shared_experts=2, n_group=1, topk_group=1,
                        topk_method="greedy", first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=1.0,
                        norm_topk_prob=False, rms_norm_eps=1e-6, max_position_embeddings=4096,
                        rope_theta=10000.0, rope_scaling=None),
}

# DeepSeek-V2-Lite's shapes (layers chosen by the caller): for GPU benchmarks with random weights.
PRESETS = {
    "deepseek-v2-lite-shapes": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                                    moe_intermediate_size=1408, num_attention_heads=16, num_key_value_heads=16,
                                    n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
                                    first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
                                    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                                    max_position_embeddings=163840, rope_theta=10000.0,
                                    rope_scaling={"type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1,
                                                  "mscale": 0.707, "mscale_all_dim": 0.707,
                                                  "original_max_position_embeddings": 4096}),
}


def finish_config(cfg: dict, arch: str) -> None:
    """Hub-style keys in place: rope_theta + rope_scaling stay top-level, as released checkpoints have."""
    cfg.update(model_type=arch, architectures=["DeepseekV3ForCausalLM" if arch == "deepseek_v3"
                                               else "DeepseekV2ForCausalLM"],
               hidden_act="silu", moe_layer_freq=1, attention_bias=False)
    if arch == "deepseek_v3":
        cfg.update(scoring_func="sigmoid", topk_method="noaux_tc", rope_interleave=True)
    else:
        cfg.update(scoring_func="softmax")


def weights(cfg: dict, rnd, norm) -> dict[str, torch.Tensor]:
    """Per-layer tensors with the checkpoint's own names; rnd(*shape) and norm(n) draw them."""
    H, L, nh = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    r, dr, dn, dv = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    E, I, qr = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["q_lora_rank"]
    w = {}
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(H)
        w[p + "post_attention_layernorm.weight"] = norm(H)
        a = p + "self_attn."
        if qr:
            w[a + "q_a_proj.weight"], w[a + "q_a_layernorm.weight"] = rnd(qr, H), norm(qr)
            w[a + "q_b_proj.weight"] = rnd(nh * (dn + dr), qr)
        else:
            w[a + "q_proj.weight"] = rnd(nh * (dn + dr), H)
        w[a + "kv_a_proj_with_mqa.weight"], w[a + "kv_a_layernorm.weight"] = rnd(r + dr, H), norm(r)
        w[a + "kv_b_proj.weight"], w[a + "o_proj.weight"] = rnd(nh * (dn + dv), r), rnd(H, nh * dv)
        if i < cfg["first_k_dense_replace"]:
            Id = cfg["intermediate_size"]
            w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = rnd(Id, H), rnd(Id, H)
            w[p + "mlp.down_proj.weight"] = rnd(H, Id)
            continue
        w[p + "mlp.gate.weight"] = rnd(E, H).float()  # fp32: the router runs in fp32 anyway
        if cfg["model_type"] == "deepseek_v3":
            w[p + "mlp.gate.e_score_correction_bias"] = (rnd(E) * 0.5).float()
        for e in range(E):
            q = p + f"mlp.experts.{e}."
            w[q + "gate_proj.weight"], w[q + "up_proj.weight"], w[q + "down_proj.weight"] = \
                rnd(I, H), rnd(I, H), rnd(H, I)
        Is = I * cfg["n_shared_experts"]
        if Is:
            q = p + "mlp.shared_experts."
            w[q + "gate_proj.weight"], w[q + "up_proj.weight"], w[q + "down_proj.weight"] = \
                rnd(Is, H), rnd(Is, H), rnd(H, Is)
    return w
