"""Which (MoE layer, expert) pairs live on the device: KTransformers' four strategies and the `.pt`.

A placement is a bool table [num_layers, num_experts]; True = the expert runs from a device slot.
Dense layers have no experts and their rows stay False (they are ignored). The semantics follow
kt_ep_wrapper.py (research/engine.md 2.3):
- uniform: total // n_moe per MoE layer, the first total % n_moe layers one more; ids 0..n-1.
- front-loading: fill MoE layers from the first, min(remaining, E) each; ids 0..n-1.
- random: torch.Generator seeded 42, randperm over all (MoE layer, expert) pairs, the first total.
- frequency: global top-`total` of the summed `logical_count` table (layers get unequal counts);
  ties go to the lower (layer, expert). Without a file the counts are all ones on MoE layers.
"""
from __future__ import annotations

from pathlib import Path

import torch

STRATEGIES = ("uniform", "frequency", "front-loading", "random")
RANDOM_SEED = 42


def total_device_experts(num_gpu_experts: int | None, gpu_experts_ratio: float | None, n_moe: int,
                         num_experts: int) -> int | None:
    """Device experts over all MoE layers, or None when neither knob is set (all on the device)."""
    if num_gpu_experts is not None:
        if num_gpu_experts > num_experts:
            raise ValueError(f"experts.num_gpu_experts={num_gpu_experts} is more than the {num_experts} "
                             f"experts of a layer; lower it or use experts.gpu_experts_ratio")
        return num_gpu_experts * n_moe
    if gpu_experts_ratio is not None:
        return int(n_moe * num_experts * gpu_experts_ratio)
    return None


def load_counts(path: str | Path, num_layers: int, num_experts: int) -> torch.Tensor:
    """`logical_count` [buffer, layers, experts] from a KTransformers/SGLang `.pt`, summed -> [L, E]."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"experts.init_expert_location {str(p)!r} does not exist")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds for a corrupt or foreign file
        raise ValueError(f"experts.init_expert_location {str(p)!r} is not a readable .pt file: {e}") from None
    if isinstance(data, dict):
        if "logical_count" not in data:
            raise ValueError(f"experts.init_expert_location {str(p)!r} is a dict without 'logical_count' "
                             f"(keys: {sorted(map(str, data))})")
        data = data["logical_count"]
    want = f"[buffer, {num_layers}, {num_experts}] (buffer, num_hidden_layers, experts)"
    if not isinstance(data, torch.Tensor) or data.dim() != 3 or tuple(data.shape[1:]) != (num_layers, num_experts):
        got = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"experts.init_expert_location {str(p)!r}: logical_count has shape {got}; "
                         f"this model needs {want}")
    return data.sum(0).double()  # [L, E]


def top_ids(counts: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest counts, ties to the lower index, returned in ascending order."""
    order = torch.argsort(-counts.double(), stable=True)
    return order[:n].sort().values


def place(strategy: str, total: int, moe_layers: list[int], num_layers: int, num_experts: int,
          counts: torch.Tensor | None = None) -> torch.Tensor:
    """The device table [num_layers, num_experts] bool with exactly `total` True on MoE layers."""
    if strategy not in STRATEGIES:
        raise ValueError(f"experts.placement_strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    n, E = len(moe_layers), num_experts
    assert 0 <= total <= n * E, f"total device experts {total} outside [0, {n * E}]"
    table = torch.zeros(n, E, dtype=torch.bool)  # rows: MoE layers in order
    if strategy == "uniform":
        per, extra = divmod(total, n) if n else (0, 0)
        for j in range(n):
            table[j, :per + (j < extra)] = True
    elif strategy == "front-loading":
        left = total
        for j in range(n):
            take = min(left, E)
            table[j, :take] = True
            left -= take
    elif strategy == "random":
        g = torch.Generator().manual_seed(RANDOM_SEED)
        table.view(-1)[torch.randperm(n * E, generator=g)[:total]] = True
    else:
        c = torch.ones(n, E, dtype=torch.float64) if counts is None else counts[moe_layers].double()
        table.view(-1)[top_ids(c.reshape(-1), total)] = True
    out = torch.zeros(num_layers, E, dtype=torch.bool)
    out[moe_layers] = table
    return out
