"""MoE experts split between the device and CPU memory (KTransformers-style), and the recorder."""
from .experts import OffloadedExperts, device_experts
from .placement import STRATEGIES, load_counts, place, top_ids, total_device_experts
from .recorder import ExpertRecorder, RecordingExperts
from .runtime import ExpertsRuntime, apply_experts, approximate_experts, experts_load_device, moe_blocks, setup_experts
from .worker import cpu_experts

__all__ = ["ExpertRecorder", "apply_experts", "approximate_experts", "ExpertsRuntime", "OffloadedExperts", "RecordingExperts", "STRATEGIES",
           "cpu_experts", "device_experts", "experts_load_device", "load_counts", "moe_blocks", "place",
           "setup_experts", "top_ids", "total_device_experts"]
