"""Prometheus series of the expert split, on the engine's registry (names kvc_experts_*)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_CPU_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ExpertsMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.resident = Gauge("kvc_experts_resident", "MoE (layer, expert) pairs by where their weights "
                              "run from", ["location"], registry=r)
        self.cpu_seconds = Histogram("kvc_experts_cpu_seconds", "CPU expert time of one MoE layer call "
                                     "(worker compute, after its inputs landed)", buckets=_CPU_S, registry=r)
        self.tokens = Counter("kvc_experts_tokens_total", "Token-to-expert assignments (tokens x top-k) "
                              "by where the expert ran", ["location"], registry=r)
        self.layerwise = Counter("kvc_experts_layerwise_total", "MoE layer calls run fully on the device "
                                 "(CPU experts streamed in; experts.gpu_prefill_token_threshold)", registry=r)
        self.updates = Counter("kvc_experts_updates_total", "Per-layer re-picks of the device experts "
                               "(experts.dynamic_update)", registry=r)
        self.kernel = Gauge("kvc_experts_cpu_kernel", "1 for what each MoE layer's CPU experts run as: weight "
                            "dtype and kernel (experts.cpu_expert_dtype)", ["layer", "dtype", "kernel"], registry=r)

    def placement(self, on_device: int, on_cpu: int) -> None:
        self.resident.labels(location="device").set(on_device)
        self.resident.labels(location="cpu").set(on_cpu)

    def cpu_kernel(self, layer: int, dtype: str, kernel: str) -> None:
        self.kernel.labels(layer=str(layer), dtype=dtype, kernel=kernel).set(1)

    def cpu_call(self, seconds: float, cpu_pairs: int, device_pairs: int) -> None:
        self.cpu_seconds.observe(seconds)
        self.tokens.labels(location="cpu").inc(cpu_pairs)
        self.tokens.labels(location="device").inc(device_pairs)
