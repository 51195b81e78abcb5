"""Load a Hugging Face-format MoE checkpoint (config.json + safetensors) without transformers.

Accepts one `model.safetensors` or shards listed in `model.safetensors.index.json`, per-expert
names (`mlp.experts.{e}.gate_proj`, Mixtral's `block_sparse_moe.experts.{e}.w1`) and the fused v5
names (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]). Unknown keys
(MTP layers, quantisation scales) are ignored; a missing weight is an error naming it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError, safe_open

from .deepseek import DeepseekCausalLM
from .layers import Attention
from .model import CausalLM
from .model_args import CheckpointError, ModelArgs

_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_MIXTRAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _normalise(name: str) -> str:
    name = name.replace(".block_sparse_moe.", ".mlp.")
    m = re.search(r"\.experts\.(\d+)\.(w1|w2|w3)\.", name)
    if m:
        name = name.replace(f".{m.group(2)}.", f".{_MIXTRAL[m.group(2)]}.")
    return name


def shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} lists shard {f.name!r}, which is missing")
        return files
    if single.is_file():
        return [single]
    raise CheckpointError(f"model directory {str(path)!r} has neither model.safetensors "
                          f"nor model.safetensors.index.json")


def weights_digest(path: Path, files: list[Path]) -> str:
    """A fingerprint of the weights for cache namespaces: config.json and every byte of every shard.

    KV computed with other weights is wrong KV, so a fine-tune that changes any tensor must get a
    new namespace; sampling parts of the files would miss that. xxh3 runs at ~7-10 GB/s on one
    core, and the loader reads the same bytes right after (from the page cache).
    """
    h = xxhash.xxh3_128()
    h.update((path / "config.json").read_bytes())
    for f in files:
        h.update(f.name.encode() + f.stat().st_size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)
    return h.hexdigest()


def _read_tensors(files: list[Path], args: ModelArgs) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for raw in st.keys():
                    name = _normalise(raw)
                    if (m := _EXPERT.fullmatch(name)):
                        experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = st.get_tensor(raw)
                    elif (m := _FUSED.fullmatch(name)):
                        key = "w13" if m[2] == "gate_up_proj" else "w2"
                        out[f"model.layers.{m[1]}.mlp.experts.{key}"] = st.get_tensor(raw)
                    elif name.startswith(("model.", "lm_head.")):
                        out[name] = st.get_tensor(raw)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file: {e}") from None
    for layer in {l for l, _ in experts}:
        parts = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            got = experts.get((layer, proj), {})
            missing = [e for e in range(args.num_experts) if e not in got]
            if missing:
                raise CheckpointError(f"checkpoint lacks model.layers.{layer}.mlp.experts.{missing[0]}.{proj}.weight")
            parts[proj] = torch.stack([got[e] for e in range(args.num_experts)])  # [E, ., .]
        out[f"model.layers.{layer}.mlp.experts.w13"] = torch.cat((parts["gate_proj"], parts["up_proj"]), 1)
        out[f"model.layers.{layer}.mlp.experts.w2"] = parts["down_proj"]
    return out


def model_class(args: ModelArgs) -> type:
    return DeepseekCausalLM if args.is_mla else CausalLM


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               experts_device: str | torch.device | None = None) -> tuple[CausalLM, ModelArgs, str]:
    """(model in eval mode on `device`, its args, a weights digest); dtype None keeps config's.

    experts_device puts the MoE expert weights elsewhere (CPU memory, for offload)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model path {str(path)!r} is not a directory")
    args = ModelArgs.from_dir(path)
    files = shard_files(path)
    tensors = _read_tensors(files, args)
    if dtype is None:
        dtype = getattr(torch, args.dtype, torch.float32)
    with torch.device("meta"):
        model = model_class(args)(args)
    expected = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state = {}
    fp32 = getattr(model, "fp32_weights", ())
    for name, p in expected.items():
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"checkpoint in {str(path)!r} lacks weight {name!r}")
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"weight {name!r} has shape {tuple(t.shape)}, config.json implies {tuple(p.shape)}")
        dev = experts_device if experts_device is not None and ".mlp.experts." in name else device
        dt = torch.float32 if name.endswith(fp32) else dtype
        state[name] = torch.nn.Parameter(t.to(device=dev, dtype=dt), requires_grad=False)
    model.load_state_dict(state, strict=False, assign=True)
    state.clear()  # the model holds the weights now: each layer's q/k/v is freed as it is fused
    for m in model.modules():  # q, k and v projections as one GEMM (their weights views of one tensor)
        if isinstance(m, Attention):
            m.fuse_qkv()
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope = model.build_rope().to(device)  # its buffers were built on the meta device
    return model.eval(), args, weights_digest(path, files)
