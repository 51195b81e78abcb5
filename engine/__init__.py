"""The kvc inference engine: Qwen3-MoE and Mixtral over a paged device pool and kvc's host tiers."""
from .llm import LLM
from .llm_engine import LLMEngine
from .model_args import CheckpointError, ModelArgs
from .request import CompletionOutput, RequestOutput
from .sampling import SamplingParams
from .tiny import make_tiny_model

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "ModelArgs",
           "CheckpointError", "make_tiny_model"]
