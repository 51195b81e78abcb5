"""A test helper: every prompt position's logits through the engine's paged path."""
from __future__ import annotations

import torch

from engine import LLMEngine, SamplingParams
from engine.request import Request


def all_logits(engine: LLMEngine, ids: list[int], chunk: int) -> torch.Tensor:
    """Logits [len(ids), vocab] computed in chunks of `chunk` (1 = decode) through the paged path."""
    req = Request("r", None, list(ids), SamplingParams(temperature=0))
    out = []
    while req.num_computed < len(ids):
        n = min(chunk, len(ids) - req.num_computed)
        assert engine.prefix_cache.grow(req, n)
        input_ids, meta, _ = engine.runner.prepare([(req, n)])
        out.append(engine.model.logits(engine.model(input_ids, meta, engine.kv.pool.layer)))
        req.num_computed += n
    engine.prefix_cache.free(req)
    return torch.cat(out)
