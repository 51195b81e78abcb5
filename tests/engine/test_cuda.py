"""The engine on a CUDA device: host-tier loads through the pinned staging buffer and side stream,
prefix hits and batching, each equal to the cold path. Skipped without CUDA (run on the H200)."""
from __future__ import annotations

import pytest
import torch

from engine import LLMEngine, SamplingParams
from kvc.config import load_config
from .paged import run_to_end

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = [(i * 37 + 11) % 250 for i in range(45)]


def engine(path, cache=None, **kw):
    cfg = load_config().replace(path=str(path), dtype="float32", device="cuda", page_size=4,
                                chunk_size=16, num_device_blocks=64, gpu_only=cache is None, **kw)
    return LLMEngine(cfg, cache=cache)


def run(eng, prompts):
    return run_to_end(eng, prompts, GREEDY)


def test_cuda_prefix_and_host_hits_match_cold(model_dir, store):
    cold = run(engine(model_dir), [PROMPT])[0]
    eng = engine(model_dir, cache=store)
    first = run(eng, [PROMPT])[0]
    warm = run(eng, [PROMPT])[0]  # device hit
    eng.prefix_cache.flush()
    eng.prefix_cache.reset_device_cache()
    host = run(eng, [PROMPT])[0]  # cpu-tier hit through the staging buffer and side stream
    assert (first.num_cached_tokens, warm.num_cached_tokens, host.num_cached_tokens) == (0, 44, 44)
    for o in (first, warm, host):
        assert o.outputs[0].token_ids == cold.outputs[0].token_ids
    batched = run(eng, [PROMPT, PROMPT[:20], PROMPT[5:]])
    singles = [run(engine(model_dir), [p])[0] for p in (PROMPT, PROMPT[:20], PROMPT[5:])]
    assert [o.outputs[0].token_ids for o in batched] == [o.outputs[0].token_ids for o in singles]
    eng.close()


def test_chunk_size_auto_is_2048_on_cuda(model_dir):
    """attn.chunk_size unset: 2048-token chunks on CUDA (the size the GPU figures were measured at)."""
    eng = LLMEngine(load_config().replace(path=str(model_dir), dtype="float32", device="cuda", gpu_only=True,
                                          num_device_blocks=64))
    try:
        assert eng.scheduler.chunk == eng.prefix_cache.chunk == 2048
    finally:
        eng.close()
