"""Test helpers that drive an LLMEngine directly: run prompts to the end, or take every prompt
position's logits through the paged path."""
from __future__ import annotations

import itertools

import torch

from engine import LLMEngine, SamplingParams
from engine.request import Request, RequestOutput

_ids = itertools.count()


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


def run_to_end(engine: LLMEngine, prompts: list, params: SamplingParams, salt: str = "") -> list[RequestOutput]:
    """Add the prompts, step until all finish; the final outputs in prompt order."""
    ids = [f"t{next(_ids)}" for _ in prompts]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params, salt)
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    engine.flush_commits()  # as LLM.generate: the last step's pages are cached on return
    return [done[r] for r in ids]
