"""scheduler.async_scheduling: the next step is launched before the last one is read back. Every
output must equal the synchronous engine's: tokens, text, finish reasons, with stops on tokens
and strings, seeded sampling, chunked prefill, preemption, aborts and host-tier hits."""
from __future__ import annotations

import pytest
import torch

from kvc.config import load_config
from engine import LLMEngine, SamplingParams

PROMPTS = [[(i * 37 + 11 + j) % 250 for i in range(n)] for j, n in enumerate((45, 20, 33, 7, 60, 16, 29, 3))]


def make_engine(path, async_scheduling: bool, device="cpu", **kw):
    kw = {"page_size": 4, "chunk_size": 16, "num_device_blocks": 96, "max_num_batched_tokens": 40, **kw}
    cfg = load_config().replace(path=str(path), dtype="float32", device=device, gpu_only=True,
                                async_scheduling=async_scheduling, **kw)
    return LLMEngine(cfg)


def run(eng, prompts, params) -> list:
    """Final outputs in prompt order, and the schedule of every launch along the way."""
    launches = []
    real = eng.runner.launch
    eng.runner.launch = lambda sched: launches.append(sched) or real(sched)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(f"r{i}", p, sp)
    done, steps = {}, 0
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
        steps += 1
        assert steps < 2000
    eng.flush_commits()
    return [done[f"r{i}"] for i in range(len(prompts))], launches


def summary(outs) -> list[tuple]:
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


def params_for(free) -> list[SamplingParams]:
    """Per prompt: stops on a token and on a string taken from the free run, seeded sampling,
    EOS honoured, and plain lengths (1 token included)."""
    tok = free[0].outputs[0].token_ids[2]
    text = free[1].outputs[0].text
    stop = text[3:5] if len(text) >= 5 else None
    ps = [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tok], ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=12, stop=[stop] if stop else None, ignore_eos=True),
          SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=9),
          SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=14),
          SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=6, stop_token_ids=[tok]),
          SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[tok], ignore_eos=True)]
    return ps


@pytest.mark.parametrize("blocks", [96, 22], ids=["roomy", "preempting"])
def test_async_equals_sync(qwen_dir, blocks):
    free_params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * len(PROMPTS)
    free, _ = run(make_engine(qwen_dir, False), PROMPTS, free_params)
    params = params_for(free)
    sync_eng = make_engine(qwen_dir, False, num_device_blocks=blocks)
    sync, _ = run(sync_eng, PROMPTS, params)
    async_eng = make_engine(qwen_dir, True, num_device_blocks=blocks)
    got, _ = run(async_eng, PROMPTS, params)
    assert summary(got) == summary(sync)
    assert any(o.outputs[0].finish_reason == "stop" for o in sync)  # the stops were exercised
    if blocks == 22:
        assert async_eng.scheduler.num_preemptions > 0 and sync_eng.scheduler.num_preemptions > 0
    for eng in (sync_eng, async_eng):
        assert eng.prefix_cache.num_free_blocks == blocks  # nothing leaked
        assert not eng.requests and eng._in_flight is None
        eng.close()


def test_async_launches_the_next_step_before_reading_one_back(qwen_dir):
    """Two prompts of one chunk each: the synchronous engine hands the first tokens out after
    one launch, the asynchronous one after two (the decode of those tokens is already queued,
    its ids patched in from the first step's samples on the device)."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for async_scheduling, launches_before in ((False, 1), (True, 2)):
        eng = make_engine(qwen_dir, async_scheduling, max_num_batched_tokens=256, chunk_size=64)
        count = []
        real = eng.runner.launch
        eng.runner.launch = lambda sched: count.append(sched) or real(sched)
        for i, p in enumerate(PROMPTS[:2]):
            eng.add_request(f"a{i}", p, params)
        outs = []
        while not outs:
            outs = eng.step()
        assert len(count) == launches_before
        assert {o.request_id for o in outs} == {"a0", "a1"}
        assert all(len(o.outputs[0].token_ids) == 1 for o in outs)
        if async_scheduling:  # the second launch decodes both pending tokens
            assert [n for _, n in count[1]] == [1, 1]
        eng.close()


def test_a_token_that_ends_a_request_by_length_is_not_decoded_further(qwen_dir):
    """max_tokens 1 and 2: no launch computes past the last token a request may have."""
    eng = make_engine(qwen_dir, True, max_num_batched_tokens=256, chunk_size=64)
    params = [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)]
    outs, launches = run(eng, PROMPTS[:2], params)
    pieces = {}
    for sched in launches:
        for req, n in sched:
            pieces.setdefault(req.request_id, []).append(n)
    assert pieces["r0"] == [len(PROMPTS[0])]
    assert pieces["r1"] == [len(PROMPTS[1]), 1]
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 2]
    eng.close()


def test_abort_with_a_step_in_flight(qwen_dir):
    """Aborting requests whose step is in flight: nothing unfinished is left, every block comes
    back, and the engine goes on with new requests whose outputs equal a fresh engine's."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    eng = make_engine(qwen_dir, True, max_num_batched_tokens=256, chunk_size=64)
    for i, p in enumerate(PROMPTS[:3]):
        eng.add_request(f"x{i}", p, params)
    eng.step()
    eng.step()  # a decode in flight, the prefill read back
    assert eng._in_flight is not None
    for i in range(3):
        eng.abort(f"x{i}")
    assert not eng.has_unfinished()
    assert eng.step() == []  # reads the in-flight step back, hands nothing out
    eng.flush_commits()
    assert eng.prefix_cache.num_free_blocks == 96
    outs, _ = run(eng, PROMPTS[3:5], [params] * 2)
    ref, _ = run(make_engine(qwen_dir, False, max_num_batched_tokens=256, chunk_size=64), PROMPTS[3:5], [params] * 2)
    assert summary(outs) == summary(ref)
    eng.close()


def test_async_with_host_tier_hits_equals_sync(qwen_dir, tmp_path):
    """Prompts sharing prefixes through a real store (device pool small enough that hits come from
    the host tiers): the asynchronous engine's outputs equal the synchronous one's."""
    from kvc.store import TieredStore
    shared = [(i * 13 + 5) % 250 for i in range(40)]
    prompts = [shared + [j, j + 1, j + 2] for j in range(6)] * 2
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)] * len(prompts)
    results = []
    for async_scheduling in (False, True):
        cfg = load_config().replace(cpu_memory_size_GB=0.01, disk_path=str(tmp_path / f"d{async_scheduling}"),
                                    disk_size_GB=0.05).kvc
        with TieredStore(cfg) as store:
            kc = load_config().replace(path=str(qwen_dir), dtype="float32", device="cpu", gpu_only=False,
                                       page_size=4, chunk_size=16, num_device_blocks=40,
                                       max_num_batched_tokens=40, async_scheduling=async_scheduling)
            eng = LLMEngine(kc, cache=store)
            outs, _ = run(eng, prompts, params)
            eng.prefix_cache.flush()
            assert eng.prefix_cache.num_free_blocks == 40
            assert sum(o.num_cached_tokens for o in outs) > 0
            results.append(summary(outs))
            eng.close()
    assert results[0] == results[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_async_equals_sync_on_cuda(qwen_dir, eager):
    """On the GPU the pending ids are patched in on the device, into the decode graphs' and the
    prefill graphs' static inputs (or the eager step's): outputs equal the synchronous engine's."""
    free_params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * len(PROMPTS)
    free, _ = run(make_engine(qwen_dir, False, device="cuda", enforce_eager=True), PROMPTS, free_params)
    params = params_for(free)
    sync, _ = run(make_engine(qwen_dir, False, device="cuda", enforce_eager=eager), PROMPTS, params)
    eng = make_engine(qwen_dir, True, device="cuda", enforce_eager=eager)
    got, launches = run(eng, PROMPTS, params)
    assert summary(got) == summary(sync)
    if not eager:
        assert eng.runner.graphs is not None and eng.runner.graphs.replays > 0
    assert any(all(n == 1 for _, n in s) for s in launches)  # decode-only steps ran (graphs when on)
    eng.close()
