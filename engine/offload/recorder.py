"""Expert activation recorder: counts every (token, expert) routing choice per layer.

Writes the file SGLang's ExpertDistributionRecorder dumps and KTransformers reads for the
`frequency` strategy: a dict {rank, logical_count [1, num_layers, num_experts] int64,
average_utilization_rate_over_window} named expert_distribution_recorder_<unix time>.pt. The file
is rewritten atomically every `save_every` engine steps and on close, so a killed server leaves a
usable one; record, then restart with experts.init_expert_location=<file> and `frequency`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

SAVE_EVERY_STEPS = 100


class ExpertRecorder:
    def __init__(self, out_dir: str | Path, num_layers: int, num_experts: int, device: torch.device,
                 save_every: int = SAVE_EVERY_STEPS):
        out = Path(out_dir).expanduser()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"experts.record_expert_stats {str(out)!r} cannot be created: {e}") from None
        self.path = out / f"expert_distribution_recorder_{time.time():.0f}.pt"
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.long, device=device)  # [L, E]
        self.save_every, self.steps = save_every, 0

    def add(self, layer: int, ids: torch.Tensor) -> None:
        """ids [T, k]: the router's choices for this layer (no host sync)."""
        self.counts[layer] += torch.bincount(ids.reshape(-1), minlength=self.counts.shape[1])

    def step(self) -> None:
        self.steps += 1
        if self.steps % self.save_every == 0:
            self.save()

    def save(self) -> Path:
        data = {"rank": 0, "logical_count": self.counts.cpu()[None],  # [1, L, E]
                "average_utilization_rate_over_window": None}
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(data, tmp)
        os.replace(tmp, self.path)
        return self.path

    def close(self) -> None:
        self.save()


class RecordingExperts:
    """An ExpertsBackend that counts the routing of one layer, then runs the wrapped backend."""

    def __init__(self, inner, recorder: ExpertRecorder, layer: int):
        self.inner, self.recorder, self.layer = inner, recorder, layer

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        self.recorder.add(self.layer, topk_ids)
        return self.inner.forward(x, topk_ids, topk_weights)
