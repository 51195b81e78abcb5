"""`LLM.close()` and `with LLM(...)` give the model and the device pool back (issue 13)."""
import gc
import weakref

import pytest
import torch

from engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


def held_tensors(llm):
    """Weak references to the weights and the KV pool, which close() must release."""
    eng = llm.engine
    return [weakref.ref(t) for t in (*list(eng.model.parameters())[:3], eng.kv.pool.kv)]


def make(qwen_dir, tmp_path, device="cpu"):
    return LLM(str(qwen_dir), dtype="float32", device=device, page_size=4, chunk_size=8,
               disk_path=str(tmp_path / "pages"), cpu_memory_size_GB=0.01, num_device_blocks=64)


def test_close_releases_the_model_and_the_pool(qwen_dir, tmp_path):
    llm = make(qwen_dir, tmp_path)
    assert gc.get_freeze_count() > 0  # the engine put its startup objects out of the collector's reach
    first = llm.generate([1, 2, 3, 4, 5], GREEDY)[0].outputs[0].token_ids
    refs = held_tensors(llm)
    llm.close()
    assert gc.get_freeze_count() == 0  # ...and gave them back to it at close, so cycles are reclaimed
    gc.collect()
    assert all(r() is None for r in refs), "a closed LLM still holds its weights or pool"
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate([1, 2, 3], GREEDY)
    llm.close()  # twice is fine
    with make(qwen_dir, tmp_path) as again:  # the same disk_path is free again, too
        assert again.generate([1, 2, 3, 4, 5], GREEDY)[0].outputs[0].token_ids == first
        refs = held_tensors(again)
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_close_gives_device_memory_back(qwen_dir, tmp_path):
    torch.cuda.empty_cache()
    base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    # 5% of the free memory (several GiB): enough to see, and the other GPU tests running beside
    # this one (8 workers) keep room
    kw = dict(dtype="bfloat16", device="cuda", disk_path=None, cpu_memory_size_GB=0, utilization_percentage=0.05)
    llm = LLM(str(qwen_dir), **kw)
    llm.generate([1, 2, 3, 4, 5], GREEDY)
    assert torch.cuda.memory_allocated() > base + (1 << 30)  # the pool: GiBs
    llm.close()
    assert torch.cuda.memory_allocated() <= base + (16 << 20)
    assert torch.cuda.memory_reserved() <= base_reserved + (64 << 20)  # empty_cache gave the pool back
    with LLM(str(qwen_dir), **kw) as again:
        again.generate([1, 2, 3], GREEDY)  # a second LLM of the same size fits: the first one's memory is back
    assert torch.cuda.memory_allocated() <= base + (16 << 20)
