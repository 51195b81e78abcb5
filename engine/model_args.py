"""ModelArgs: the normalised model description read from a Hugging Face config.json.

Accepts both key styles: transformers v5 (`rope_parameters`, `dtype`, `num_local_experts`) and the
older Hub style (`rope_theta`/`rope_scaling`, `torch_dtype`, `num_experts`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ARCHITECTURES = ("qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3")
MLA_ARCHITECTURES = ("deepseek_v2", "deepseek_v3")


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    intermediate_size: int  # dense MLP layers (Qwen3 mlp_only_layers)
    rms_norm_eps: float
    rope_theta: float
    norm_topk_prob: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    dtype: str = "float32"
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    eos_token_ids: tuple[int, ...] = ()
    # DeepSeek (MLA + shared experts + grouped routing); unused by the other architectures
    q_lora_rank: int = 0  # 0: a plain q_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    scoring: str = "softmax"  # V2 softmax, V3 sigmoid with e_score_correction_bias
    topk_method: str = "greedy"  # V2 greedy | group_limited_greedy; V3 noaux_tc
    rope_interleave: bool = False  # rotate (x0, x1), (x2, x3) pairs instead of NeoX halves
    rope_scaling: tuple[tuple[str, float], ...] = ()  # YaRN parameters, sorted (key, value) pairs

    def is_moe_layer(self, i: int) -> bool:
        return i not in self.dense_layers

    @property
    def is_mla(self) -> bool:
        return self.arch in MLA_ARCHITECTURES

    def page_spec(self, page_size: int, dtype: str):
        """The KV page this model caches: per-head K and V, or MLA's latent + rope key (one part)."""
        from kvc.hashing import PageSpec
        if self.is_mla:
            return PageSpec(self.num_layers, 1, self.kv_lora_rank + self.qk_rope_head_dim, page_size, dtype,
                            kv_parts=1)
        return PageSpec(self.num_layers, self.num_kv_heads, self.head_dim, page_size, dtype)

    @staticmethod
    def from_dict(cfg: dict, source: str = "config.json") -> "ModelArgs":
        def need(*keys):
            for k in keys:
                if cfg.get(k) is not None:
                    return cfg[k]
            raise CheckpointError(f"{source}: missing key {' or '.join(map(repr, keys))}")

        arch = cfg.get("model_type")
        if arch not in ARCHITECTURES:
            raise CheckpointError(f"{source}: model_type {arch!r} is not supported; "
                                  f"supported: {', '.join(ARCHITECTURES)}")
        if arch in MLA_ARCHITECTURES:
            from .deepseek_args import deepseek_args
            return deepseek_args(cfg, source, need)
        if cfg.get("attention_bias"):
            raise CheckpointError(f"{source}: attention_bias=true is not supported")
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported (only default)")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 1e6 if arch == "mixtral" else 1e4))
        layers = int(need("num_hidden_layers"))
        num_experts = int(need("num_local_experts", "num_experts", "n_routed_experts"))
        inter = int(need("intermediate_size"))
        if arch == "qwen3_moe":
            step = int(cfg.get("decoder_sparse_step", 1) or 1)
            only = set(cfg.get("mlp_only_layers") or [])
            dense = tuple(i for i in range(layers)
                          if i in only or num_experts == 0 or (i + 1) % step != 0)
            moe_inter = int(need("moe_intermediate_size"))
            norm_topk = bool(cfg.get("norm_topk_prob", False))
        else:
            dense, moe_inter, norm_topk = (), inter, True
        eos = cfg.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        return ModelArgs(
            arch=arch, vocab_size=int(need("vocab_size")), hidden_size=hidden, num_layers=layers,
            num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), num_experts=num_experts,
            top_k=int(need("num_experts_per_tok")), moe_intermediate_size=moe_inter,
            intermediate_size=inter, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta), norm_topk_prob=norm_topk, qk_norm=arch == "qwen3_moe",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            dense_layers=dense, eos_token_ids=eos)

    @staticmethod
    def from_dir(path: str | Path) -> "ModelArgs":
        p = Path(path) / "config.json"
        if not p.is_file():
            raise CheckpointError(f"model directory {str(path)!r} has no config.json")
        try:
            cfg = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{p}: not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{p}: must hold a JSON object")
        args = ModelArgs.from_dict(cfg, str(p))
        gen = Path(path) / "generation_config.json"
        if gen.is_file():
            try:
                g = json.loads(gen.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError) as e:
                raise CheckpointError(f"{gen}: not valid JSON: {e}") from None
            if g is not None:
                extra = tuple(g) if isinstance(g, list) else (int(g),)
                from dataclasses import replace
                args = replace(args, eos_token_ids=tuple(dict.fromkeys(args.eos_token_ids + extra)))
        return args
