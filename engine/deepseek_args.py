"""ModelArgs for DeepSeek-V2/V3 configs (model_type deepseek_v2 / deepseek_v3).

Reads both the Hub style (`rope_theta` + `rope_scaling`, `n_routed_experts`) and the transformers
v5 style (`rope_parameters`, `num_local_experts`). Rope: default or YaRN (what the real checkpoints
use); any other type is refused rather than silently computed wrong.
"""
from __future__ import annotations

from .model_args import CheckpointError, ModelArgs

_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim", "attention_factor", "truncate")


def _rope(cfg: dict, source: str) -> tuple[float, tuple[tuple[str, float], ...]]:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, ()
    if kind != "yarn":
        raise CheckpointError(f"{source}: rope type {kind!r} is not supported for DeepSeek (default or yarn)")
    if rope.get("factor") is None or rope.get("original_max_position_embeddings") is None:
        raise CheckpointError(f"{source}: yarn rope scaling needs 'factor' and 'original_max_position_embeddings'")
    pairs = tuple(sorted((k, float(rope[k])) for k in _YARN_KEYS if rope.get(k) is not None))
    return theta, pairs


def deepseek_args(cfg: dict, source: str, need) -> ModelArgs:
    arch = cfg["model_type"]
    if cfg.get("attention_bias"):
        raise CheckpointError(f"{source}: attention_bias=true is not supported")
    if int(cfg.get("moe_layer_freq", 1) or 1) != 1:
        raise CheckpointError(f"{source}: moe_layer_freq={cfg['moe_layer_freq']} is not supported (only 1)")
    layers = int(need("num_hidden_layers"))
    heads = int(need("num_attention_heads"))
    experts = int(need("n_routed_experts", "num_local_experts", "num_experts"))
    first_dense = int(cfg.get("first_k_dense_replace", 0) or 0)
    n_group = int(cfg.get("n_group") or 1)
    topk_group = int(cfg.get("topk_group") or 1)
    if experts % n_group:
        raise CheckpointError(f"{source}: n_routed_experts={experts} is not divisible by n_group={n_group}")
    if not 1 <= topk_group <= n_group:
        raise CheckpointError(f"{source}: topk_group={topk_group} must be in [1, n_group={n_group}]")
    if arch == "deepseek_v3":
        scoring, method = "sigmoid", "noaux_tc"
        if cfg.get("scoring_func", "sigmoid") != "sigmoid":
            raise CheckpointError(f"{source}: scoring_func {cfg['scoring_func']!r} is not supported for V3 (sigmoid)")
        if n_group > 1 and experts // n_group < 2:
            raise CheckpointError(f"{source}: V3 group scores need at least 2 experts per group")
    else:
        scoring, method = "softmax", str(cfg.get("topk_method") or "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise CheckpointError(f"{source}: topk_method {method!r} is not supported "
                                  f"(greedy or group_limited_greedy)")
    theta, yarn = _rope(cfg, source)
    nope, rope_dim = int(need("qk_nope_head_dim")), int(need("qk_rope_head_dim"))
    eos = cfg.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
    return ModelArgs(
        arch=arch, vocab_size=int(need("vocab_size")), hidden_size=int(need("hidden_size")), num_layers=layers,
        num_heads=heads, num_kv_heads=heads, head_dim=nope + rope_dim, num_experts=experts,
        top_k=int(need("num_experts_per_tok")), moe_intermediate_size=int(need("moe_intermediate_size")),
        intermediate_size=int(need("intermediate_size")), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        # the HF V2 router ignores norm_topk_prob (and every released V2 has it false)
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)) and arch == "deepseek_v3",
        qk_norm=False, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        dense_layers=tuple(range(min(first_dense, layers))), eos_token_ids=eos,
        q_lora_rank=int(cfg.get("q_lora_rank") or 0), kv_lora_rank=int(need("kv_lora_rank")),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, v_head_dim=int(need("v_head_dim")),
        n_shared_experts=int(cfg.get("n_shared_experts") or 0), n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0) or 1.0), scoring=scoring,
        topk_method=method,
        # V2 rotates interleaved pairs always; V3 unless rope_interleave is false
        rope_interleave=arch == "deepseek_v2" or bool(cfg.get("rope_interleave", True)),
        rope_scaling=yarn)
