"""The engine's prefix cache under pressure: no stall with a small pool, aborts while LOADING,
and the load-or-recompute choice. Every output is compared with the cache-off output."""
from __future__ import annotations

import itertools
import random
import threading
import time

import pytest

from kvc.config import load_config
from kvc.store import TieredStore
from engine import LLMEngine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SHORT = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
PROMPT = [(i * 37 + 11) % 250 for i in range(29)]
VOCAB = 272


def make_engine(path, cache=None, **kw):
    kw = {"page_size": 4, "chunk_size": 64, "num_device_blocks": 64, **kw}
    cfg = load_config().replace(path=str(path), dtype="float32", device="cpu",
                                gpu_only=cache is None, **kw)
    return LLMEngine(cfg, cache=cache)


def drain(eng, done, max_steps):
    steps = 0
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
        steps += 1
        assert steps < max_steps, f"engine stalled: {describe(eng)}"
    eng.flush_commits()  # idle now: the last step's bookkeeping, as the server's loop does it
    return steps


def describe(eng) -> str:
    reqs = sorted(eng.requests.values(), key=lambda r: r.arrival)[:6]
    return "; ".join(f"{r.request_id} {r.status.value} blocks={len(r.block_table)} "
                     f"computed={r.num_computed}/{r.num_tokens}" for r in reqs)


def churn_prompts(seed: int, n: int = 80) -> list[list[int]]:
    """n prompts over 6 shared prefixes of 96-224 tokens, each with a short private suffix."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randrange(96, 225))] for _ in range(6)]
    return [rng.choice(prefixes) + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 18))]
            for _ in range(n)]


def churn(eng, prompts, seed: int, aborts: bool, max_steps: int = 3000) -> dict:
    """Waves of 4 requests every third step, stepping as LLM.generate does; with aborts, a random
    live request (whatever its state: waiting, loading or running) is aborted now and then."""
    rng = random.Random(seed + 1000)
    done, added, steps = {}, 0, 0
    while added < len(prompts) or eng.has_unfinished():
        if added < len(prompts) and steps % 3 == 0:
            for _ in range(4):
                eng.add_request(f"r{added}", prompts[added], SHORT)
                added += 1
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
        if aborts and eng.requests and rng.random() < 0.1:
            eng.abort(rng.choice(sorted(eng.requests)))
        steps += 1
        assert steps < max_steps, f"engine stalled (seed {seed}, aborts {aborts}): {describe(eng)}"
    return done


def reference(qwen_dir, prompts) -> dict[tuple, list[int]]:
    """Cache-off outputs of the distinct prompts, one batch in a pool big enough for all."""
    uniq = list(dict.fromkeys(tuple(p) for p in prompts))
    eng = make_engine(qwen_dir, page_size=16, num_device_blocks=16 * len(uniq), prefix_caching=False,
                      chunk_size=256, max_num_seqs=len(uniq), max_num_batched_tokens=1 << 16)
    for i, p in enumerate(uniq):
        eng.add_request(f"u{i}", list(p), SHORT)
    done = {}
    drain(eng, done, 1000)
    return {p: done[f"u{i}"].outputs[0].token_ids for i, p in enumerate(uniq)}


def churn_case(qwen_dir, tmp_path, seed: int, aborts: bool) -> None:
    prompts = churn_prompts(seed)
    ref = reference(qwen_dir, prompts)
    cfg = load_config().replace(cpu_memory_size_GB=0.01, disk_path=str(tmp_path / f"p{seed}{aborts}"),
                                disk_size_GB=0.05).kvc
    with TieredStore(cfg) as store:
        eng = make_engine(qwen_dir, cache=store, page_size=16, num_device_blocks=40, chunk_size=256)
        done = churn(eng, prompts, seed, aborts)
        eng.prefix_cache.flush()  # pending loads and puts end; every block is free again
        free = eng.prefix_cache.num_free_blocks
        eng.close()
    for rid, o in done.items():
        assert o.outputs[0].token_ids == ref[tuple(prompts[int(rid[1:])])], rid
    if not aborts:
        assert len(done) == len(prompts)
    assert free == 40


# seeds 2 and 3 stalled (a fresh head that could not be admitted, with requests back from
# LOADING holding blocks behind it) before the engine-side prefix cache; the slow test below
# runs 8 seeds with and without aborts (aborts hit requests waiting, loading and running)
@pytest.mark.parametrize("seed,aborts", [(2, False), (3, False), (0, True), (4, True)])
def test_churn_under_pool_pressure_never_stalls(qwen_dir, tmp_path, seed, aborts):
    churn_case(qwen_dir, tmp_path, seed, aborts)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("aborts", [False, True])
def test_churn_many_seeds(qwen_dir, tmp_path, seed, aborts):
    churn_case(qwen_dir, tmp_path, seed, aborts)


class GatedStore:
    """A real TieredStore whose gets wait until `gate` is set (a slow load on demand)."""

    def __init__(self, store: TieredStore):
        self.store = store
        self.gate, self.entered, self.returned = threading.Event(), threading.Event(), threading.Event()

    def get_pages(self, ns, hashes, out=None):
        return self._gated(self.store.get_pages, ns, hashes, out=out)

    def get_into(self, ns, hashes, out, landed=None):  # the engine's load
        return self._gated(self.store.get_into, ns, hashes, out, landed)

    def _gated(self, fn, *a, **k):
        self.entered.set()
        self.gate.wait(30)
        try:
            return fn(*a, **k)
        finally:
            self.returned.set()

    def __getattr__(self, name):
        return getattr(self.store, name)


def engine_with_prompt_in_the_host_tiers(qwen_dir, store):
    """A 10-block engine over a GatedStore whose host tiers hold PROMPT's pages and whose device
    pool does not: the next PROMPT loads, and its load waits for `gate`."""
    gated = GatedStore(store)
    eng = make_engine(qwen_dir, cache=gated, num_device_blocks=10)
    gated.gate.set()
    run_one(eng, PROMPT)
    eng.prefix_cache.flush()
    eng.prefix_cache.reset_device_cache()
    gated.gate.clear()
    gated.entered.clear()
    return eng, gated


def test_abort_while_loading_defers_the_free(qwen_dir, store):
    """The aborted request's blocks are still the loader's target: they must not be handed to
    another request before the load ends (before: the loader wrote into the new owner's KV)."""
    other = [(i * 53 + 7) % 250 for i in range(32)]  # 32 + 8 tokens: 10 blocks, the whole pool
    cold = run_one(make_engine(qwen_dir, num_device_blocks=10), other)
    eng, gated = engine_with_prompt_in_the_host_tiers(qwen_dir, store)
    eng.add_request("loads", PROMPT, GREEDY)  # 7 pages to load + 1 block for the last token
    eng.add_request("tiny", [1, 2, 3], SamplingParams(temperature=0, max_tokens=1))  # runs meanwhile
    eng.step()
    assert gated.entered.wait(10) and eng.requests["loads"].status.value == "loading"
    eng.abort("loads")
    eng.add_request("other", other, GREEDY)
    timer = threading.Timer(1.0, gated.gate.set)  # the load ends a second from now
    timer.start()
    done = {}
    for o in eng.step():  # before: "other" prefilled into the aborted request's blocks here
        done[o.request_id] = o
    assert gated.returned.wait(10)
    threading.Event().wait(0.3)  # let the loader's scatter land
    drain(eng, done, 200)
    timer.join()
    assert done["other"].outputs[0].token_ids == cold
    assert eng.prefix_cache.num_free_blocks == 10
    eng.close()


def test_flush_waits_for_the_load_of_an_aborted_request(qwen_dir, store):
    """An aborted request's load still holds its blocks (deferred free); flush() promises that
    pending loads and puts end and every block is free again. Before: it returned with the load
    running and its blocks taken (the churn test read 13 of 40 blocks held once in CI)."""
    eng, gated = engine_with_prompt_in_the_host_tiers(qwen_dir, store)
    eng.add_request("loads", PROMPT, GREEDY)
    eng.add_request("tiny", [1, 2, 3], SamplingParams(temperature=0, max_tokens=1))  # runs meanwhile
    eng.step()
    assert gated.entered.wait(10) and eng.requests["loads"].status.value == "loading"
    eng.abort("loads")
    drain(eng, {}, 20)  # "tiny" ends; the engine is idle with the aborted request's load running
    assert not gated.returned.is_set()
    timer = threading.Timer(0.5, gated.gate.set)  # the load ends half a second from now
    timer.start()
    eng.prefix_cache.flush()
    free = eng.prefix_cache.num_free_blocks
    timer.join()
    eng.close()
    assert free == 10


def test_an_idle_engine_gives_back_an_aborted_loads_blocks(qwen_dir, store):
    """The server's loop calls flush_commits while idle: once the load of a request aborted while
    LOADING has ended, its blocks are free again there, not only at the next request's step."""
    eng, gated = engine_with_prompt_in_the_host_tiers(qwen_dir, store)
    eng.add_request("loads", PROMPT, GREEDY)
    eng.add_request("tiny", [1, 2, 3], SamplingParams(temperature=0, max_tokens=1))
    eng.step()
    assert gated.entered.wait(10) and eng.requests["loads"].status.value == "loading"
    eng.abort("loads")
    drain(eng, {}, 20)  # idle now, the load still gated
    eng.flush_commits()
    held = eng.prefix_cache.num_free_blocks
    gated.gate.set()
    load = next(iter(eng.prefix_cache._loads.values()))
    load.future.result(10)
    eng.flush_commits()
    free = eng.prefix_cache.num_free_blocks
    eng.close()
    assert held < 10 and free == 10


class DownStore:
    """A real TieredStore whose put_pages fails while `down` is set (a cache service that is away)."""

    def __init__(self, store: TieredStore):
        self.store, self.down = store, True

    def put_pages(self, ns, pages, chain_continues=False):
        if self.down:
            raise ConnectionError("cache service unavailable")
        return self.store.put_pages(ns, pages, chain_continues)

    def put_steps(self, ns, pages, chain_continues=False):  # the host tier's "engine" gate drives this
        if self.down:
            raise ConnectionError("cache service unavailable")
        return (yield from self.store.put_steps(ns, pages, chain_continues))

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_pages_lost_while_the_host_was_down_are_offered_again(qwen_dir, store):
    """A prefix computed while the host tiers dropped its puts stays a device hit; when a later
    request reuses it, the host tiers get it again (before: only the request's new pages were
    offered, the store refused them for their unknown parent, and the prefix never reached it)."""
    P = 4
    prefix = PROMPT[:24]  # 6 full pages
    down = DownStore(store)
    eng = make_engine(qwen_dir, cache=down)
    run_one(eng, prefix + [5, 6, 7])
    eng.prefix_cache.flush()
    ns = eng.kv.namespace("")
    assert store.lookup(ns, tokens=prefix).num_pages == 0  # every put was lost
    down.down = False
    out = run_one(eng, prefix + [9, 9, 9, 9, 9])  # the prefix is a device hit
    eng.prefix_cache.flush()
    assert store.lookup(ns, tokens=prefix).num_pages == len(prefix) // P
    assert store.lookup(ns, tokens=prefix + [9, 9, 9, 9]).num_pages == len(prefix) // P + 1
    eng.close()
    assert out == run_one(make_engine(qwen_dir), prefix + [9, 9, 9, 9, 9])


def test_a_prefix_is_offered_again_at_most_once_per_interval(qwen_dir, store):
    """While the host stays down, requests that reuse a prefix from the device pool do not each
    copy it out again: one re-offer per prefix per REOFFER_EVERY_S."""
    prefix = PROMPT[:24]
    down = DownStore(store)
    calls = []
    eng = make_engine(qwen_dir, cache=down)
    host = eng.prefix_cache.host
    real = host.offer
    host.offer = lambda ns, hashes, *rest: (calls.append(len(hashes)), real(ns, hashes, *rest))[1]
    run_one(eng, prefix + [5, 6, 7])
    eng.prefix_cache.flush()
    calls.clear()
    for tail in ([9, 9, 9, 9, 9], [8, 8, 8, 8, 8], [7, 7, 7, 7, 7]):
        run_one(eng, prefix + tail)  # 6 device-hit pages; 29 + 8 tokens: 3 new full pages each
    eng.prefix_cache.flush()
    assert sum(calls) == 6 + 3 * 3  # the prefix once (not 3 times), plus each request's own pages
    eng.close()


def test_the_reoffer_times_stay_bounded_and_cheap_in_a_long_outage(qwen_dir, store):
    """A long outage: 40,000 prefixes reused from the device pool within REOFFER_EVERY_S. The map
    of their re-offer times stays at REOFFERS_KEPT, each call O(1) (before: past 4,096 entries the
    whole map was rebuilt on every call, none old enough to drop, and it kept growing)."""
    import time

    from engine.prefix_cache import REOFFERS_KEPT
    eng = make_engine(qwen_dir, cache=DownStore(store))
    pc = eng.prefix_cache
    hashes = [i.to_bytes(16, "little") for i in range(40_000)]
    t = time.perf_counter()
    assert all(pc._may_reoffer(h) for h in hashes)
    took = time.perf_counter() - t
    assert len(pc._reoffered) == REOFFERS_KEPT
    assert not pc._may_reoffer(hashes[-1])  # a recent one waits out its interval
    assert took < 2.0, took  # ~0.05 s; the rebuilds took minutes
    eng.close()


class BrokenLookups:
    """A backend whose lookups raise (a bug, or a service answering INVALID_ARGUMENT)."""

    def __init__(self, store):
        self.store = store

    def lookup(self, *a, **k):
        raise ValueError("namespace.spec: something the service did not accept")

    def lookup_from(self, *a, **k):
        raise ValueError("namespace.spec: something the service did not accept")

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_a_failing_lookup_is_a_miss_not_a_dead_engine(qwen_dir, store, caplog):
    """A host-tier lookup that raises is answered as a miss and logged (before: the exception left
    the scheduler and ended the server's engine loop for good)."""
    eng = make_engine(qwen_dir, cache=BrokenLookups(store))
    with caplog.at_level("WARNING", logger="kvc.engine"):
        outs = [run_one(eng, PROMPT + [i]) for i in range(3)]
    assert eng.prefix_cache.host.failed_lookups >= 1
    assert sum("lookup failed" in r.getMessage() for r in caplog.records) == 1  # logged once a while
    eng.close()
    cold = make_engine(qwen_dir)
    assert outs == [run_one(cold, PROMPT + [i]) for i in range(3)]
    cold.close()


_ids = itertools.count()


def run_one(eng, prompt) -> list[int]:
    rid = f"one{next(_ids)}"
    eng.add_request(rid, prompt, GREEDY)
    done = {}
    drain(eng, done, 500)
    return done[rid].outputs[0].token_ids


def test_planner_loads_what_pays_with_injected_rates():
    from engine.load_policy import LoadPlanner
    p = LoadPlanner("auto", page_size=16, page_bytes=1 << 20)
    assert p.plan(["disk"] * 4, 0).end == 4        # no prefill rate yet: nothing to compare, load
    p.observe_prefill(16_000, 1.0)                 # recomputing a page: 1 ms
    p.observe_load("cpu", 10 << 30, 1.0)           # loading one from cpu: 0.1 ms
    p.observe_load("disk", 1 << 29, 1.0)           # from disk: 2 ms
    assert p.plan(["cpu"] * 4, 0).end == 4         # a fast tier is used
    assert p.plan(["disk"] * 4, 0).end == 0        # a slow one is skipped
    assert p.plan(["cpu"] * 3 + ["disk"] * 5, 1).end == 3  # partial load, then recompute
    assert p.plan(["cpu"] * 3, 3).end == 3         # nothing past the device hit
    assert LoadPlanner("always", 16, 1 << 20).plan(["disk"] * 4, 1).end == 4
    assert LoadPlanner("never", 16, 1 << 20).plan(["cpu"] * 4, 1).end == 1
    with pytest.raises(ValueError, match="load_policy"):
        LoadPlanner("sometimes")
    with pytest.raises(ValueError, match="load_policy"):
        load_config().replace(load_policy="sometimes")


def test_planner_walks_tier_runs_as_the_page_by_page_plan_did():
    """plan() sums a run of one tier at once (a 32K-token hit is one run of 2,048 pages): the same
    choice as the page-by-page walk, on random mixes of fast and slow tiers."""
    from engine.load_policy import OTHER_PRIOR, PRIOR_BYTES_PER_S, LoadPlanner
    rng = random.Random(5)
    p = LoadPlanner("auto", page_size=16, page_bytes=1 << 20)
    p.observe_prefill(16_000, 1.0)
    p.observe_load("cpu", 10 << 30, 1.0)
    p.observe_load("disk", 1 << 29, 1.0)

    def by_page(located, start):
        recompute, rates = 16 / p.prefill_rate(), p.tier_rates()
        best, best_at, saving = 0.0, start, 0.0
        for i in range(start, len(located)):
            bw = rates.get(located[i]) or PRIOR_BYTES_PER_S.get(located[i], OTHER_PRIOR)
            saving += recompute - (1 << 20) / bw
            if saving > best:
                best, best_at = saving, i + 1
        return best_at
    for _ in range(300):
        located = [rng.choice(["cpu", "cpu", "disk", "cluster"]) for _ in range(rng.randrange(1, 40))]
        start = rng.randrange(len(located))
        assert p.plan(located, start).end == by_page(located, start), (located, start)


def test_a_tier_measured_slow_by_one_load_is_probed_again_at_its_next_skip(monkeypatch):
    """A tier whose only sample came from a load that met a one-off stall (run DL: a kernel compiled
    inside the first cpu hit measured the tier at 3 GB/s) is probed at the next skip, not after
    REPROBE skips; after that at most every REPROBE skips or REPROBE_S seconds."""
    import engine.load_policy as lp
    clock = [1000.0]
    monkeypatch.setattr(lp.time, "monotonic", lambda: clock[0])
    p = lp.LoadPlanner("auto", page_size=16, page_bytes=1 << 20)
    p.observe_prefill(160_000, 1.0)                # recomputing a page takes 0.1 ms
    p.observe_load("cpu", 3 << 30, 1.0)            # one load at 3 GB/s: 0.33 ms a page, skipped
    plan = p.plan(["cpu"] * 8, 0)
    assert plan.end == 0 and plan.probe == (0, 8)  # measured, never probed: probed at once
    assert [p.plan(["cpu"] * 8, 0).probe for _ in range(5)] == [None] * 5
    clock[0] += lp.REPROBE_S                       # the probe's sample did not come (still slow)
    assert p.plan(["cpu"] * 8, 0).probe == (0, 8)  # REPROBE_S after the last probe: again
    assert p.plan(["cpu"] * 8, 0).probe is None
    p.observe_load("cpu", 20 << 30, 1.0)           # a probe at 20 GB/s: the EWMA moves up
    p.observe_load("cpu", 20 << 30, 1.0)
    p.observe_load("cpu", 20 << 30, 1.0)
    assert p.plan(["cpu"] * 8, 0).end == 8         # loaded again


def test_planner_probes_an_unmeasured_tier_instead_of_loading_from_it():
    from engine.load_policy import PROBE_BYTES, REPROBE, LoadPlanner
    p = LoadPlanner("auto", page_size=16, page_bytes=1 << 20)
    p.observe_prefill(160_000, 1.0)                # a fast GPU: recomputing a page takes 0.1 ms
    plan = p.plan(["cpu"] * 2 + ["disk"] * 20, 0)  # cpu's prior (8 GB/s) is 0.13 ms a page: no load
    assert plan.end == 0 and plan.probe == (0, 2)  # ...but a probe of the cpu run, to measure it
    p.observe_load("cpu", 20 << 30, 1.0)           # the probe measured 20 GB/s
    plan = p.plan(["cpu"] * 2 + ["disk"] * 20, 0)  # disk's prior (0.25 GB/s) is 4 ms a page
    assert plan.end == 2 and plan.probe == (2, 2 + PROBE_BYTES // (1 << 20))  # cpu loaded, disk probed
    assert p.plan(["cpu"] * 2 + ["disk"] * 20, 0).probe is None  # one probe, not one per request
    p.observe_load("disk", 1 << 30, 1.0)           # the probe measured 1 GB/s: still slower than recompute
    probes = [p.plan(["disk"] * 8, 0).probe for _ in range(2 * REPROBE)]
    assert sum(x is not None for x in probes) == 2  # re-measured every REPROBE skips
    assert all(x is None or x == (0, 8) for x in probes)  # a probe never runs past the tier's pages
    slow = LoadPlanner("auto", page_size=16, page_bytes=1 << 20)
    slow.observe_prefill(1_000, 1.0)                # CPU experts: a page recomputes in 16 ms
    assert slow.plan(["disk"] * 8, 0).end == 8     # the cautious prior still says load


def test_engine_probes_an_unmeasured_tier_while_it_recomputes(qwen_dir, store, monkeypatch):
    import engine.host_tier
    monkeypatch.setattr(engine.host_tier, "MIN_SAMPLE_BYTES", 1)  # the tiny model's pages are small
    cold = run_one(make_engine(qwen_dir), PROMPT)
    cfg = load_config().replace(path=str(qwen_dir), dtype="float32", device="cpu", gpu_only=False,
                                page_size=4, chunk_size=64, num_device_blocks=64)
    eng = LLMEngine(cfg, cache=store)
    run_one(eng, PROMPT)
    eng.prefix_cache.flush()
    eng.prefix_cache.reset_device_cache()
    eng.planner.observe_prefill(10**9, 1.0)  # injected: recomputing beats the cpu tier's prior
    eng.planner.bandwidth.clear()
    eng.add_request("again", PROMPT, GREEDY)
    done = {}
    drain(eng, done, 100)
    eng.prefix_cache.host._prober.submit(lambda: None).result()  # the probe ran before this
    assert done["again"].num_cached_tokens == 0  # recomputed...
    assert done["again"].outputs[0].token_ids == cold
    assert "cpu" in eng.planner.tier_rates()     # ...and the cpu tier got measured meanwhile
    eng.close()


@pytest.mark.parametrize("cpu_bytes_per_s,loaded", [(1e3, 0), (1e13, 28)])
def test_engine_skips_a_slow_tier_and_uses_a_fast_one(qwen_dir, store, cpu_bytes_per_s, loaded):
    from prometheus_client import CollectorRegistry
    cold = run_one(make_engine(qwen_dir), PROMPT)
    cfg = load_config().replace(path=str(qwen_dir), dtype="float32", device="cpu", gpu_only=False,
                                page_size=4, chunk_size=64, num_device_blocks=64)
    reg = CollectorRegistry()
    eng = LLMEngine(cfg, cache=store, registry=reg)
    run_one(eng, PROMPT)
    eng.prefix_cache.flush()
    eng.prefix_cache.reset_device_cache()
    eng.planner.observe_prefill(1000, 1.0)  # injected: a page recomputes in 4 ms
    eng.planner.bandwidth.clear()
    eng.planner.observe_load("cpu", int(cpu_bytes_per_s), 1.0)
    eng.add_request("again", PROMPT, GREEDY)
    done = {}
    drain(eng, done, 100)
    assert done["again"].num_cached_tokens == loaded
    assert done["again"].outputs[0].token_ids == cold
    assert reg.get_sample_value("kvc_engine_prefill_tokens_per_second") == 1000
    assert reg.get_sample_value("kvc_tier_load_bytes_per_second", {"tier": "cpu"}) > 0
    # off CUDA no step leaves the engine waiting: the put thread did the first run's puts
    assert reg.get_sample_value("kvc_engine_put_pieces_total", {"where": "put_thread"}) > 0
    assert reg.get_sample_value("kvc_engine_put_pieces_total", {"where": "engine_wait"}) == 0
    eng.close()


def test_a_device_hit_asks_the_host_tiers_about_its_last_page_and_what_follows(qwen_dir, store):
    """With a device hit the host tiers are asked (lookup_from) about the hit's last page and the
    pages after it, not the whole prompt; pages the device pool lost but the host tiers hold are
    still loaded, and outputs equal the cache-off output."""
    P = 4
    prompt = PROMPT[:28]  # 7 full pages
    eng = make_engine(qwen_dir, cache=store, num_device_blocks=16)
    calls = {"lookup": 0, "from": []}
    real_lookup, real_from = store.lookup, store.lookup_from

    def lookup(*a, **k):
        calls["lookup"] += 1
        return real_lookup(*a, **k)

    def lookup_from(ns, parent, hashes, tokens):
        calls["from"].append(len(hashes))
        return real_from(ns, parent, hashes, tokens)
    store.lookup, store.lookup_from = lookup, lookup_from
    run_one(eng, prompt + [1, 2, 3])
    eng.prefix_cache.flush()
    calls.update(lookup=0, **{"from": []})
    warm = run_one(eng, prompt + [4, 5, 6] * 2)  # a device hit of 7 pages, then 1 full page
    assert calls["lookup"] == 0 and calls["from"] == [2]  # the last pool page and the one after it
    # pressure on the pool (blocks taken as other requests would): it drops the prompt's tail
    # pages first, while the host tiers keep every page
    pool, taken = eng.prefix_cache.blocks, []
    while _device_pages(eng, prompt) > 4:
        taken += pool.allocate(1)
    pool.free(taken)
    kept = _device_pages(eng, prompt)
    assert kept == 4, kept
    calls.update(lookup=0, **{"from": []})
    eng.add_request("again", prompt + [7] * 6, GREEDY)
    done = {}
    drain(eng, done, 500)
    assert done["again"].num_cached_tokens >= 7 * P  # pool pages + host pages (+ the warm run's 8th)
    assert calls["lookup"] == 0 and calls["from"] == [8 - kept + 1]
    eng.close()
    cold = make_engine(qwen_dir)
    assert warm == run_one(cold, prompt + [4, 5, 6] * 2)
    assert done["again"].outputs[0].token_ids == run_one(cold, prompt + [7] * 6)


def _device_pages(eng, prompt) -> int:
    """How many of the prompt's leading pages the device pool holds."""
    from kvc.hashing import page_hashes, tokens_bytes
    root = eng.kv.namespace("").root
    hs = page_hashes(root, prompt, eng.kv.page_size)
    return len(eng.prefix_cache.blocks.match_prefix(hs, [root] + hs[:-1], tokens_bytes(prompt)))


def test_loaded_pages_register_at_the_step_launch_and_are_never_offered_back(qwen_dir, store):
    """A load's pages enter the pool's hash map when the request's step is launched (beside the
    GPU's work, not in series before it), are not offered to the host tiers again, and a request
    dropped after its load but before its step still leaves them cached in the pool."""
    cold = run_one(make_engine(qwen_dir), PROMPT)
    eng = make_engine(qwen_dir, cache=store, load_policy="always")
    run_one(eng, PROMPT)
    pc = eng.prefix_cache
    pc.flush()
    pc.reset_device_cache()
    n_pages = (len(PROMPT) - 1) // 4  # the pages a 29-token prompt reuses (one token is computed)
    prompt_pages = store.lookup(eng.kv.namespace(""), tokens=PROMPT).hashes[:n_pages]
    offered = []
    real_offer = pc.host.offer

    def offer(ns, hashes, *a, **k):
        offered.extend(hashes)
        return real_offer(ns, hashes, *a, **k)
    pc.host.offer = offer
    seen = []
    real_launched = eng.runner.on_launched

    def launched():
        before = len(pc.blocks.hash_to_block)
        real_launched()
        seen.append((before, len(pc.blocks.hash_to_block)))
    eng.runner.on_launched = launched
    early = pc.early_loads
    assert run_one(eng, PROMPT) == cold
    if pc.early_loads == early:  # verified before the step: registered at the first step's launch
        assert seen[0] == (0, n_pages)
    else:  # went back to the queue before its checksums were done (a slow or busy host): registered
        assert seen[0][0] == 0 and seen[0][1] in (0, n_pages)  # at the launch or when verified after it
    assert not set(prompt_pages) & set(offered) and offered  # only the decoded pages go out
    assert all(h in pc.blocks.hash_to_block for h in prompt_pages)

    # loaded, then aborted before its step: the pages still match in the pool afterwards
    pc.flush()
    pc.reset_device_cache()
    eng.runner.on_launched = real_launched
    eng.add_request("dropped", PROMPT, GREEDY)
    eng.step()  # admission starts the load
    eng.scheduler.wait_for_loads()  # the load landed; the request waits for its step
    assert len(pc.blocks.hash_to_block) == 0
    eng.abort("dropped")
    assert all(h in pc.blocks.hash_to_block for h in prompt_pages) and pc.num_free_blocks == 64


class LateVerifyStore:
    """A real TieredStore whose engine loads land every page (row `bad` overwritten with garbage
    when set), report them all queued, and only then, once `gate` is set, return the count:
    `bad` when set (that page failed its checksum), else all. This is the CUDA load's order (the
    writes are queued, the checksums compared later) made slow on demand."""

    def __init__(self, store: TieredStore, bad: int | None):
        self.store, self.bad = store, bad
        self.gate = threading.Event()

    def get_into(self, ns, hashes, out, landed=None):
        n = self.store.get_into(ns, hashes, out)
        if self.bad is not None and self.bad < n:
            out[self.bad].fill_(1e4)
            n = self.bad
        if landed is not None:
            landed(0, len(hashes))  # every row's write is queued: the host tier signals on_queued
        assert self.gate.wait(30)
        return n

    def get_layers_into(self, ns, hashes, out, layer_landed):  # a CUDA load layer by layer, as above
        n = self.store.get_layers_into(ns, hashes, out, lambda layer, run: None)
        if self.bad is not None and self.bad < n:
            out[:, self.bad].fill_(1e4)
            n = self.bad
        for layer in range(out.shape[0]):
            layer_landed(layer, len(hashes))
        assert self.gate.wait(30)
        return n

    def start_layers_into(self, ns, hashes, out, layer_landed, block=True):  # queued on the engine's thread
        got = self.store.start_layers_into(ns, hashes, out, lambda layer, run: None, block=block)
        if got is None:
            return None
        n = got.run
        if self.bad is not None and self.bad < n:
            out[:, self.bad].fill_(1e4)
            n = self.bad
        for layer in range(out.shape[0]):
            layer_landed(layer, len(hashes))
        return got, n

    def finish_layers(self, started, on_verdict=None):  # on the loader thread: the verdict once gate is set
        got, n = started
        assert self.gate.wait(30)
        return min(n, self.store.finish_layers(got))

    def __getattr__(self, name):
        return getattr(self.store, name)


def early_hit(qwen_dir, store, bad):
    """A cpu-tier hit of PROMPT whose load reports its writes queued and verifies late; the
    verification ends (gate) once the engine's step read the pages. (engine, outputs, cold)."""
    cold = run_one(make_engine(qwen_dir), PROMPT)
    late = LateVerifyStore(store, bad)
    late.gate.set()
    eng = make_engine(qwen_dir, cache=late, load_policy="always")
    run_one(eng, PROMPT)
    eng.prefix_cache.flush()
    eng.prefix_cache.reset_device_cache()
    late.gate.clear()
    real_logits = eng.runner.logits

    def logits(sched):  # the step's model ran on the loaded pages: now their checksums "end"
        out = real_logits(sched)
        late.gate.set()
        return out
    eng.runner.logits = logits
    return eng, run_one(eng, PROMPT), cold


def test_an_early_load_runs_its_step_before_the_loader_verified_it(qwen_dir, store):
    eng, out, cold = early_hit(qwen_dir, store, bad=None)
    pc = eng.prefix_cache
    assert out == cold
    assert (pc.early_loads, pc.early_loads_failed) == (1, 0)
    assert _device_pages(eng, PROMPT) == len(PROMPT) // 4  # loaded (verified) and computed pages
    eng.close()


def test_a_page_that_fails_after_an_early_step_voids_the_step(qwen_dir, store):
    """The step read a page whose checksum then failed: its token is dropped and the request
    recomputes from that page (before: the garbage page's token was emitted and the page kept)."""
    eng, out, cold = early_hit(qwen_dir, store, bad=3)
    pc = eng.prefix_cache
    assert (pc.early_loads, pc.early_loads_failed) == (1, 1)
    assert out == cold
    # the pages before the bad one came from the load, the rest were recomputed: all cached again
    assert _device_pages(eng, PROMPT) == len(PROMPT) // 4  # loaded before the bad page, computed from it
    eng.close()


def test_an_early_request_freed_before_its_step_waits_for_its_load(qwen_dir, store):
    """Aborting a request that came back early (its load's writes queued, not verified) frees
    its blocks only after the load ends, and registers only what verified."""
    cold = run_one(make_engine(qwen_dir), PROMPT)
    late = LateVerifyStore(store, bad=2)
    late.gate.set()
    eng = make_engine(qwen_dir, cache=late, load_policy="always")
    run_one(eng, PROMPT)
    pc = eng.prefix_cache
    pc.flush()
    pc.reset_device_cache()
    late.gate.clear()
    eng.add_request("early", PROMPT, GREEDY)
    # admission starts the load; with nothing else to run the engine waits until its writes are
    # queued, and the request is back early, not verified
    assert eng.step() == []
    assert pc.early_loads == 1 and eng.requests["early"].status.value == "waiting"
    threading.Timer(0.3, late.gate.set).start()
    eng.abort("early")  # waits for the load's end
    assert pc.num_free_blocks == 64 and pc.early_loads_failed == 1
    assert _device_pages(eng, PROMPT) == 2  # the two pages before the bad one
    assert run_one(eng, PROMPT) == cold
    eng.close()


def first_outputs(eng) -> list:
    """Step until a step hands outputs out (with async scheduling the first returns none)."""
    for _ in range(4):
        outs = eng.step()
        if outs:
            return outs
    raise AssertionError("no outputs after 4 steps")


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_step_hands_its_tokens_out_before_its_page_bookkeeping(qwen_dir, store, async_scheduling):
    """The step that produces a request's first (here: only) token returns it before registering
    and offering the prompt's pages (its TTFT does not wait for them); the bookkeeping is done
    before the next step admits anything, so a repeat of the prompt is a full device hit, and an
    idle engine's flush_commits frees the pages and updates the gauges."""
    from prometheus_client import CollectorRegistry
    P = 4
    reg = CollectorRegistry()
    cfg = load_config().replace(path=str(qwen_dir), dtype="float32", device="cpu", gpu_only=False,
                                page_size=4, chunk_size=64, num_device_blocks=64,
                                async_scheduling=async_scheduling)
    eng = LLMEngine(cfg, cache=store, registry=reg)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def device_pages():
        return reg.get_sample_value("kvc_tier_pages", {"tier": "device"})
    eng.add_request("a", PROMPT, one)
    outs = first_outputs(eng)  # one chunk: the whole prompt, and the token
    assert [o.request_id for o in outs if o.finished] == ["a"]
    ns = eng.kv.namespace("")
    full = len(PROMPT) // P
    assert not eng.has_unfinished()  # nothing to run: a loop on has_unfinished ends here
    assert eng.prefix_cache.num_free_blocks < 64 and device_pages() > 0  # the bookkeeping is to do
    eng.add_request("b", PROMPT, one)
    out = next(o for o in first_outputs(eng) if o.request_id == "b")  # its admission follows a's bookkeeping
    assert out.finished and out.num_cached_tokens == full * P
    assert out.outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert eng.prefix_cache.num_free_blocks < 64
    eng.flush_commits()  # what an idle engine loop does; the gauges follow
    assert eng.prefix_cache.num_free_blocks == 64 and device_pages() == 0
    eng.prefix_cache.flush()
    assert store.lookup(ns, tokens=PROMPT).num_pages == full  # offered when committed
    eng.close()


def test_abort_and_close_do_the_last_steps_bookkeeping_first(qwen_dir, store):
    """A request aborted while its last step's pages await registration keeps them cached (the
    abort commits first, then frees); close offers the last step's pages to the host tiers."""
    eng = make_engine(qwen_dir, cache=store, chunk_size=8)
    eng.add_request("a", PROMPT, GREEDY)
    eng.step()
    eng.step()  # 16 tokens computed, 4 pages: registered only by the next call into the engine
    eng.abort("a")
    assert eng.prefix_cache.num_free_blocks == 64
    eng.add_request("b", PROMPT[:16] + [1, 2, 3], GREEDY)
    done = {}
    drain(eng, done, 50)
    assert done["b"].num_cached_tokens == 16
    eng.add_request("c", PROMPT[:20] + [7], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    while "c" not in done:
        done.update({o.request_id: o for o in eng.step() if o.finished})
    ns = eng.kv.namespace("")
    eng.prefix_cache.host.flush()  # the puts queued so far (not the deferred bookkeeping)
    assert store.lookup(ns, tokens=PROMPT[:20]).num_pages == 4  # a's; c's fifth page is not offered yet
    eng.close()  # closing waits for the puts it queued
    assert store.lookup(ns, tokens=PROMPT[:20]).num_pages == 5


def test_the_engine_gate_puts_on_the_engines_thread_inside_real_steps(qwen_dir, store, monkeypatch):
    """The engine's own thread does the put work in its waits for each step's samples (the "engine"
    gate), here on CPU with every step's samples made to look busy for a few polls (off CUDA no
    step leaves the engine waiting): prompts with shared prefixes run while their pages are put,
    outputs equal cache-off, the pages land in the host tiers and come back as cpu hits."""
    from engine import runner as runner_mod
    from engine.host_tier import IDLE_S

    class Busy:  # a step's samples' event that is "on the GPU" for a few polls
        def __init__(self):
            self.polls = 0

        def query(self):
            self.polls += 1
            return self.polls > 4
    monkeypatch.setattr(runner_mod.Launched, "ready", property(lambda self: Busy()))
    prompts = [PROMPT[:16 + 4 * k] + [(k * 13 + j) % 250 for j in range(9 + k)] for k in range(6)]
    off = make_engine(qwen_dir)
    cold = [run_one(off, p) for p in prompts]
    eng = make_engine(qwen_dir, cache=store)
    eng._pace_puts = True  # the engine tells the host tier when it steps, as on CUDA
    host = eng.prefix_cache.host
    assert host.put_gate == "engine"
    rids = [f"gate{k}" for k in range(len(prompts))]
    for rid, p in zip(rids, prompts):
        eng.add_request(rid, p, GREEDY)
    done: dict = {}
    drain(eng, done, 2000)
    assert [done[r].outputs[0].token_ids for r in rids] == cold
    assert host.engine_put_pieces > 0
    time.sleep(2 * IDLE_S)  # idle: the put thread finishes what is left
    eng.prefix_cache.flush()
    assert host.failed_puts == 0
    eng.prefix_cache.reset_device_cache()
    again = [run_one(eng, p) for p in prompts]
    assert again == cold
    ns = eng.kv.namespace("")
    assert store.lookup(ns, tokens=prompts[-1]).num_pages > 0
    eng.close()


def test_fresh_blocks_are_handed_out_ascending_after_churn():
    """A request's new blocks come in ascending ids even after others were freed (tail first, so
    the free queue holds them descending): a cpu-tier load into them is a few runs of consecutive
    blocks, which it copies into straight (HostTier.direct_loads)."""
    from kvc.device_pool import BlockPool
    from engine.prefix_cache import PrefixCache
    pool = BlockPool(64)
    a = pool.allocate(20)
    pool.free(a)  # back tail first: the queue now ends 19, 18, ..., 0
    pc = PrefixCache.__new__(PrefixCache)
    pc.blocks = pool

    class Req:
        block_table: list = []
    req = Req()
    req.block_table = []
    assert pc._grow(req, 50)
    assert req.block_table == sorted(req.block_table) and len(req.block_table) == 50
    assert pc._grow(req, 1) and len(req.block_table) == 51


def _hit_run(eng, rid: str, prompt: list[int], salt: str = "") -> tuple[list[int], int]:
    """(greedy tokens, device-hit tokens) of one request run alone."""
    eng.add_request(rid, prompt, SHORT, cache_salt=salt)
    req = eng.requests[rid]
    done = {}
    drain(eng, done, 500)
    return list(done[rid].outputs[0].token_ids), req.num_device_hit_tokens


def test_a_long_device_hit_is_remembered_and_matches_as_the_page_walk_does(qwen_dir, monkeypatch):
    """A device hit of MEMO_MIN_PAGES pages or more is remembered: the next prompt with that prefix
    takes its pages and hashes from the memo (no page-by-page hash or match), then matches the rest
    page by page; tokens, hit lengths and page hashes equal an engine without the memo. A memo whose
    pages were evicted (the pool reset), a prompt that leaves the prefix inside it, or another
    cache salt does not use it."""
    from engine import prefix_cache
    from kvc.hashing import page_hashes
    monkeypatch.setattr(prefix_cache, "MEMO_MIN_PAGES", 4)
    base = [(i * 13 + 5) % 250 for i in range(40)]  # 10 pages of 4
    cases = [("cold", base, ""), ("first hit", base + [1, 2, 3, 4, 5, 6], ""),  # remembered here
             ("memo", base + [7, 8, 9], ""),  # from the memo
             ("memo, longer", base + [1, 2, 3, 4, 5, 6, 11, 12, 13, 14], ""),  # memo + a page after it
             ("other salt", base + [7, 8, 9], "tenant-b"),
             ("leaves inside", base[:30] + [99] * 12, ""),
             ("reset", None, ""), ("after reset", base + [7, 8, 9], ""),  # the memo's pages gone: cold
             ("hit after reset", base + [3, 3], ""), ("memo again", base + [4, 4, 4], "")]
    results = {}
    for memo_on in (True, False):
        if not memo_on:
            monkeypatch.setattr(prefix_cache, "MEMO_MIN_PAGES", 1 << 30)
        eng = make_engine(qwen_dir)
        pc = eng.prefix_cache
        got = []
        for i, (label, prompt, salt) in enumerate(cases):
            if prompt is None:
                pc.reset_device_cache()
                continue
            before = pc.memo_hits
            rid = f"{memo_on}-{i}"
            toks, hit = _hit_run(eng, rid, prompt, salt)
            got.append((label, toks, hit))
            if memo_on:
                used = pc.memo_hits - before
                assert used == (label in ("memo", "memo, longer", "memo again")), (label, used)
        results[memo_on] = got
        eng.close()
    assert results[True] == results[False]
    hits = {label: hit for label, _, hit in results[True]}
    assert hits["memo"] == 40 and hits["memo, longer"] == 44 and hits["after reset"] == 0
    # the hashes a memo hands a request are the page hashes of its ids
    eng = make_engine(qwen_dir)
    monkeypatch.setattr(prefix_cache, "MEMO_MIN_PAGES", 4)
    _hit_run(eng, "a", base)
    _hit_run(eng, "b", base + [1, 2])
    eng.add_request("c", base + [5, 6, 7, 8, 9], SHORT)
    req = eng.requests["c"]
    drain(eng, {}, 500)
    ns = eng.kv.namespace("")
    assert eng.prefix_cache.memo_hits == 1
    assert req.hashes == page_hashes(ns.root, req.ids(0, len(req.hashes) * 4), 4)  # outputs too
    eng.close()


def _memo_on_and_off(qwen_dir, monkeypatch, prompts: list[list[int]], **engine_kw) -> tuple[list, list]:
    """Run prompts one after another on an engine with memos of 4+ pages, then on one without:
    ((tokens, hit) of each, with the memo), and how many memo hits each took (asserting that
    both engines' tokens and hits are equal)."""
    from engine import prefix_cache
    results, used = {}, []
    for memo_on in (True, False):
        monkeypatch.setattr(prefix_cache, "MEMO_MIN_PAGES", 4 if memo_on else 1 << 30)
        eng = make_engine(qwen_dir, **engine_kw)
        pc, got = eng.prefix_cache, []
        for i, p in enumerate(prompts):
            before = pc.memo_hits
            got.append(_hit_run(eng, f"{memo_on}-{i}", p))
            if memo_on:
                used.append(pc.memo_hits - before)
        results[memo_on] = got
        eng.close()
    assert results[True] == results[False]
    return results[True], used


def test_the_memo_of_a_shared_prefix_outlives_the_conversations_that_extend_it(qwen_dir, monkeypatch):
    """Chats over one long system prompt: each conversation's next turn extends its own earlier hit,
    and a new conversation starts from the system prompt alone. The memo keeps the shared prefix
    when a conversation's longer hit is remembered, and a conversation's entry when another one's
    shorter hit is (each of those once dropped the other: every new conversation and then every
    next turn hashed and matched its whole prefix page by page). Tokens and hit lengths equal an
    engine without the memo."""
    system = [(i * 13 + 5) % 250 for i in range(40)]  # 10 pages of 4
    turns = {c: [[(ord(c) * 31 + t * 7 + j) % 250 for j in range(8)] for t in range(3)] for c in "ABCDE"}

    def prompt(c, t):  # conversation c's turn t: the system prompt, then its turns so far
        return system + [x for turn in turns[c][:t + 1] for x in turn]
    order = [("A", 0), ("A", 1), ("B", 0), ("A", 2), ("B", 1), ("C", 0), ("D", 0), ("E", 0),
             ("B", 2), ("C", 1), ("D", 1), ("E", 1), ("C", 2)]
    got, used = _memo_on_and_off(qwen_dir, monkeypatch, [system] + [prompt(c, t) for c, t in order],
                                 num_device_blocks=128)
    # the first hit (A's first turn) is remembered; every later one starts from a memo
    assert used == [0, 0] + [1] * (len(order) - 1), list(zip([("cold", 0)] + order, used))
    assert [hit for _, hit in got] == [0, 40, 48, 40, 56, 48, 40, 40, 40, 56, 48, 48, 48, 56]


def test_a_memo_whose_pages_were_evicted_by_allocation_is_not_used(qwen_dir, monkeypatch):
    """Other prompts fill a small pool and evict the tail of a remembered prefix (allocate's
    eviction, not a reset): the next prompt with that prefix does not take the memo's blocks; its
    shorter hit is remembered and used by the one after. Hits and tokens equal an engine without
    the memo."""
    system = [(i * 13 + 5) % 250 for i in range(40)]  # 10 pages of 4
    others = [[(i * 7 + s) % 250 for i in range(36)] for s in (1, 2)]
    seq = [("cold", system), ("remembered", system + [1, 2, 3, 4, 5]), ("memo", system + [6, 7, 8]),
           ("other 1", others[0]), ("other 2", others[1]), ("evicted", system + [9, 9, 9]),
           ("memo again", system + [8, 8, 8])]
    got, used = _memo_on_and_off(qwen_dir, monkeypatch, [p for _, p in seq], num_device_blocks=26)
    assert dict(zip([label for label, _ in seq], used)) == {
        "cold": 0, "remembered": 0, "memo": 1, "other 1": 0, "other 2": 0, "evicted": 0, "memo again": 1}
    hits = [hit for _, hit in got]
    # the evicted prompt's hit is the prefix's head (remembered again), which the next one starts from;
    # the evicted prompt computed the tail again, so the next one's hit is whole
    assert hits[2] == 40 and 16 <= hits[5] < 40 and hits[6] == 40, hits  # 16: 4 pages, remembered
