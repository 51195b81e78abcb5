"""The prefix cache on CUDA: puts through the side stream under concurrent prefill, and a corrupt
cpu-tier page during a CUDA load, each equal to cache-off. Skipped without CUDA (run on the H200)."""
from __future__ import annotations

import pytest
import torch

from engine import LLMEngine, SamplingParams
from kvc.config import load_config
from .paged import run_to_end

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
BASE = [(i * 37 + 11) % 250 for i in range(64)]
PROMPTS = [BASE[:40 + 3 * k] + [(k * 7 + j) % 250 for j in range(20 + k)] for k in range(8)]


def engine(path, cache=None, **kw):
    cfg = load_config().replace(path=str(path), dtype="float32", device="cuda", page_size=4,
                                chunk_size=16, num_device_blocks=256, max_num_batched_tokens=48,
                                gpu_only=cache is None, **kw)
    return LLMEngine(cfg, cache=cache)


def run(eng, prompts):
    return run_to_end(eng, prompts, GREEDY)


@pytest.mark.parametrize("gate", ["engine", "gpu-queued"])
def test_side_stream_puts_under_concurrent_prefill_match_cache_off(qwen_dir, store, gate):
    """Under the "engine" gate (the default) the engine's thread does put work in its waits for the
    GPU (a tiny model's steps are done before the engine waits: the put thread then does it while
    the engine is idle, and the starved engine a little past the GPU); under "gpu-queued" the put
    thread does it beside the steps."""
    off = run(engine(qwen_dir, prefix_caching=False), PROMPTS)
    eng = engine(qwen_dir, cache=store)
    host = eng.prefix_cache.host
    assert host.put_gate == "engine"
    host.put_gate = gate
    first = run(eng, PROMPTS)  # pages are offered while the other prompts still prefill
    eng.prefix_cache.flush()
    assert host.failed_puts == 0  # puts are best-effort (a busy engine drops some): none may fail
    assert store.stats()["tiers"]["cpu"]["pages"] > 0
    eng.prefix_cache.reset_device_cache()
    again = run(eng, PROMPTS)  # the prefixes whose pages were put come back from the cpu tier
    assert any(o.num_cached_tokens > 0 for o in again)
    for a, b, c in zip(off, first, again):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
    eng.close()


def test_corrupt_cpu_page_ends_the_cuda_load_there(qwen_dir, store):
    prompt = BASE[:45]
    cold = run(engine(qwen_dir), [prompt])[0]
    eng = engine(qwen_dir, cache=store, load_policy="always")
    run(eng, [prompt])
    eng.prefix_cache.flush()
    eng.prefix_cache.reset_device_cache()
    ns = eng.kv.namespace("")
    req_hashes = store.lookup(ns, tokens=prompt).hashes
    e = store.cpu.get(ns.root + req_hashes[5])  # the tiers key a page by namespace root + hash
    store.cpu.slab[e.slot + 3] ^= 0xFF  # page 5's bytes no longer match its checksum
    hit = run(eng, [prompt])[0]
    assert hit.num_cached_tokens == 5 * 4
    assert hit.outputs[0].token_ids == cold.outputs[0].token_ids
    eng.close()


@pytest.mark.parametrize("layered", [True, False])
@pytest.mark.parametrize("bad", [None, 5])
def test_an_early_cuda_load_feeds_its_step_through_an_event(qwen_dir, store, bad, layered):
    """The request goes back to the queue once the load's writes are queued: its step waits for
    the load's event on the GPU (layered: layer i's attention waits for layer i's event), not for
    the loader. A page that fails after the step read it voids the step (bad=5): the request
    recomputes from there. Outputs equal cold either way."""
    from .test_prefix_cache import LateVerifyStore
    prompt = BASE[:45]
    cold = run(engine(qwen_dir), [prompt])[0]
    late = LateVerifyStore(store, bad)
    late.gate.set()
    eng = engine(qwen_dir, cache=late, load_policy="always")
    eng.prefix_cache.host.layer_loads = layered
    run(eng, [prompt])
    pc = eng.prefix_cache
    pc.flush()
    pc.reset_device_cache()
    late.gate.clear()
    real_logits = eng.runner.logits

    def logits(sched):  # the step is queued behind the load's event: now the verdict comes
        out = real_logits(sched)
        late.gate.set()
        return out
    eng.runner.logits = logits
    hit = run(eng, [prompt])[0]
    assert pc.early_loads == 1
    assert pc.host.layered_loads == int(layered) and pc.host.layer_loads_off is None
    assert pc.early_loads_failed == (bad is not None)
    assert hit.num_cached_tokens == (11 if bad is None else bad) * 4
    assert hit.outputs[0].token_ids == cold.outputs[0].token_ids
    eng.close()


def test_prefill_clock_times_the_gpu_not_the_host():
    """A prefill step that reads nothing back returns before the GPU ran it (with CUDA graphs its
    host time is a fraction of its GPU time): its rate sample must come from the GPU's timeline."""
    from engine.load_policy import LoadPlanner, PrefillClock
    planner = LoadPlanner()
    clock = PrefillClock(planner, torch.device("cuda"))
    started = clock.start()
    torch.cuda._sleep(int(3e8))  # ~150 ms of GPU work queued; the host goes on at once
    clock.stop(1000, started)
    assert planner.prefill_rate() is None  # not done yet: nothing reported, nothing waited for
    torch.cuda.synchronize()
    clock.poll()
    assert planner.prefill_rate() is not None and planner.prefill_rate() < 1000 / 0.05


def test_load_bandwidth_excludes_kernels_queued_before_it(qwen_dir, store, monkeypatch):
    """A cpu-tier load waits for the kernels queued before it (they may still touch its blocks), but
    that wait is not the tier's cost: timing it in made the planner stop loading on the H200."""
    import engine.host_tier as host_tier
    monkeypatch.setattr(host_tier, "MIN_SAMPLE_BYTES", 0)  # the tiny model's pages are small
    prompt = BASE[:45]
    eng = engine(qwen_dir, cache=store, load_policy="always")
    run(eng, [prompt])
    eng.prefix_cache.flush()
    ns = eng.kv.namespace("")
    found = store.lookup(ns, tokens=prompt)
    hashes, tiers = found.hashes[:len(found.located)], list(found.located)
    assert hashes and set(tiers) == {"cpu"}
    blocks = eng.kv.blocks.allocate(len(hashes))
    host = eng.prefix_cache.host
    samples = []
    host.observe = lambda tier, nbytes, seconds: samples.append(seconds)
    torch.cuda._sleep(int(6e8))  # ~300 ms of kernels queued on the compute stream
    fut = host.load(ns, hashes, eng.kv.pool, blocks, tiers)
    assert fut.result(timeout=60) == len(hashes)
    getattr(fut, "finished", fut).result(timeout=60)  # done at the verdict; the rate sample after it
    assert samples and max(samples) < 0.1, samples
    eng.kv.blocks.free(blocks)
    eng.close()


@pytest.mark.parametrize("layered,here,group,direct,lag", [
    (True, True, None, True, 0), (True, True, None, False, 0), (True, True, 0, True, 0), (True, False, None, True, 0),
    (True, False, 0, False, 0), (False, True, None, True, 0), (True, True, 0, False, 2)])
def test_layered_cpu_hits_under_concurrent_prefill_match_cache_off(qwen_dir, store, layered, here, group, direct,
                                                                   lag):
    """cpu-tier hits that land layer by layer (queued on the engine's thread, or on the loader's;
    in groups of layers as the default's bytes make them, here one group, or each layer alone;
    straight into the pool's blocks or through a staging buffer and a scatter; a step's layer i
    waiting for layer i + lag), or whole pages, beside other requests' prefill and puts: every
    output equals cache-off, and the hits really took that path."""
    off = run(engine(qwen_dir, prefix_caching=False), PROMPTS)
    eng = engine(qwen_dir, cache=store, load_policy="always")
    host = eng.prefix_cache.host
    host.layer_loads = layered
    host.queue_here = here
    host.direct_loads = direct
    eng.kv.layer_lag = lag
    if group is not None:
        host.layer_group_bytes = group
    run(eng, PROMPTS)
    eng.prefix_cache.flush()
    eng.prefix_cache.reset_device_cache()
    again = run(eng, PROMPTS)
    assert any(o.num_cached_tokens > 0 for o in again)
    assert (host.layered_loads > 0) == layered and host.layer_loads_off is None
    assert (host.direct_layer_loads > 0) == (layered and direct)
    assert direct or not host.direct_layer_loads
    for a, b in zip(off, again):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    eng.close()


def test_a_layered_load_failing_after_the_hand_off_voids_the_early_step(qwen_dir, store):
    """The step of a layer-by-layer load starts once its layers are queued; a loader that then
    fails fails the load, the step that read them is void, the request recomputes (output equal
    to cold), and later loads go whole pages."""
    import threading
    prompt = BASE[:45]
    cold = run(engine(qwen_dir), [prompt])[0]

    class DiesAfterQueueing:  # the real store, whose layer-by-layer get dies after its layers landed
        def __init__(self, s):
            self.s, self.gate = s, threading.Event()

        def get_layers_into(self, ns, hashes, out, layer_landed):
            self.s.get_layers_into(ns, hashes, out, lambda layer, run: None)
            for layer in range(out.shape[0]):
                layer_landed(layer, len(hashes))
            assert self.gate.wait(30)  # the engine took the request back early
            raise RuntimeError("driver gone")

        def start_layers_into(self, ns, hashes, out, layer_landed, block=True):  # queued on the engine's thread
            got = self.s.start_layers_into(ns, hashes, out, lambda layer, run: None, block=block)
            for layer in range(out.shape[0]):
                layer_landed(layer, len(hashes))
            return got

        def finish_layers(self, got, on_verdict=None):  # the loader thread's verdict
            self.s.finish_layers(got)
            assert self.gate.wait(30)  # the engine took the request back early
            raise RuntimeError("driver gone")

        def __getattr__(self, name):
            return getattr(self.s, name)
    dying = DiesAfterQueueing(store)
    eng = engine(qwen_dir, cache=dying, load_policy="always")
    run(eng, [prompt])
    pc = eng.prefix_cache
    pc.flush()
    pc.reset_device_cache()
    real_waits = pc.step_waits

    def step_waits(sched):
        early = real_waits(sched)
        if early:
            dying.gate.set()
        return early
    pc.step_waits = step_waits
    hit = run(eng, [prompt])[0]
    assert pc.early_loads == 1 and pc.early_loads_failed == 1
    assert "driver gone" in pc.host.layer_loads_off
    assert hit.outputs[0].token_ids == cold.outputs[0].token_ids
    pc.reset_device_cache()
    again = run(eng, [prompt])[0]  # whole pages now
    assert again.num_cached_tokens == 11 * 4 and again.outputs[0].token_ids == cold.outputs[0].token_ids
    eng.close()


def _loadable(eng, store, prompt):
    """The prompt's pages put in the cpu tier and dropped from the device: (ns, hashes, tiers)."""
    run(eng, [prompt])
    eng.prefix_cache.flush()
    eng.prefix_cache.reset_device_cache()
    ns = eng.kv.namespace("")
    found = store.lookup(ns, tokens=prompt)
    hashes, tiers = found.hashes[:len(found.located)], list(found.located)
    assert hashes and set(tiers) == {"cpu"}
    return ns, hashes, tiers


@pytest.mark.parametrize("busy", [False, True])
def test_a_layered_load_is_queued_before_load_returns(qwen_dir, store, busy):
    """On the engine's thread: every layer is queued and on_queued called before host.load returns,
    so the step can be launched at once; the loader's future gives the verified count, and the
    pool's blocks hold the pages. With the store's lock held by another thread (a put), the load is
    not waited for here: the loader thread takes it, and the result is the same."""
    import threading
    prompt = BASE[:45]
    eng = engine(qwen_dir, cache=store, load_policy="always")
    ns, hashes, tiers = _loadable(eng, store, prompt)
    host, pool = eng.prefix_cache.host, eng.kv.pool
    blocks = eng.kv.blocks.allocate(len(hashes))
    queued = []
    held, release = threading.Event(), threading.Event()

    def hold():
        with store._lock:
            held.set()
            release.wait(30)
    if busy:
        threading.Thread(target=hold, daemon=True).start()
        assert held.wait(10)
    fut = host.load(ns, hashes, pool, blocks, tiers, on_queued=queued.append)
    assert bool(queued) == (not busy)  # queued here unless a put held the store
    release.set()
    assert fut.result(timeout=60) == len(hashes)
    getattr(fut, "finished", fut).result(timeout=60)  # done at the verdict; the loader's count after
    assert len(queued) == 1 and queued[0].given and host.layered_loads == 1
    got = pool.gather(blocks).cpu()
    want = torch.stack([p.data for p in store.get_pages(ns, hashes)])
    assert torch.equal(got.view_as(want), want)
    eng.kv.blocks.free(blocks)
    eng.close()
