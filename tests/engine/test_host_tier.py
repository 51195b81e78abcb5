"""HostTier's put thread keeps off a busy engine: it waits while the engine steps with no launched
work pending, and catches up once the engine is idle (the CPU side of the gate; on CUDA it also
runs while a launched step is still on the GPU, which the GPU tests cover through the engine)."""
import time

import numpy as np
import pytest
import torch

import engine.host_tier
from engine.host_tier import HostTier

IDLE_S = 0.2  # the tests' idle window: wide, so a busy CI machine's scheduling hiccups stay inside it


@pytest.fixture(autouse=True)
def wide_idle_window(monkeypatch):
    monkeypatch.setattr(engine.host_tier, "IDLE_S", IDLE_S)
from kvc.hashing import Namespace, page_hashes
from kvc.record import PageSpec


def offer_pages(host: HostTier, ns: Namespace, n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 1000, n * ns.spec.page_size).tolist()
    hs = page_hashes(ns.root, toks, ns.spec.page_size)
    parents = [ns.root] + hs[:-1]
    P = ns.spec.page_size
    data = torch.randn(n, *ns.spec.shape)
    assert host.offer(ns, hs, parents, [np.array(toks[i * P:(i + 1) * P], dtype=np.uint32) for i in range(n)], data)
    return hs


def busy_engine(host: HostTier):
    """A busy engine beside the test (a step starts every few ms) from now on; returns its stop."""
    import threading
    stop = threading.Event()

    def engine_steps():
        while not stop.is_set():
            host.step_started()
            time.sleep(IDLE_S / 20)
    host.step_started()
    stepper = threading.Thread(target=engine_steps)
    stepper.start()
    return lambda: (stop.set(), stepper.join())


def test_puts_wait_while_the_engine_steps_and_run_once_it_is_idle(store):
    ns = Namespace("qwen3_moe", PageSpec(2, 2, 8, 4, "float32"), "digest")
    host = HostTier(store)
    try:
        host.step_started()
        hs = offer_pages(host, ns, 8, seed=1)
        t_end = time.monotonic() + 2 * IDLE_S
        while time.monotonic() < t_end:  # a busy engine: a step starts every few ms
            host.step_started()
            time.sleep(IDLE_S / 20)
        assert store.lookup(ns, hashes=hs).num_pages == 0  # nothing was put meanwhile
        host.flush()  # the engine stopped stepping: puts run
        assert store.lookup(ns, hashes=hs).num_pages == 8
    finally:
        host.close()


@pytest.mark.parametrize("pause", [True, False])
def test_a_put_pauses_before_publishing_while_the_engine_steps(store, pause):
    """A put that began while the engine was idle finds it stepping once its copies are done: it
    waits there (its publishing holds the GIL the engine's launches need) and publishes once the
    engine is idle again. With pause_puts off it publishes at once (the control: the check can fail)."""
    import threading
    ns = Namespace("qwen3_moe", PageSpec(2, 2, 8, 4, "float32"), "digest")
    host = HostTier(store)
    assert host.pause_puts  # an in-process store takes the pause
    host.put_gate = "gpu-queued"  # the put thread does the work (the "engine" gate: the test below)
    host.pause_puts = pause
    copied, stop = threading.Event(), threading.Event()
    real = store._sum_copy

    def sum_copy(*a):  # the engine starts stepping while the put copies
        host.step_started()
        stepper.start()
        out = real(*a)
        copied.set()
        return out

    def engine_steps():
        while not stop.is_set():
            host.step_started()
            time.sleep(IDLE_S / 20)
    stepper = threading.Thread(target=engine_steps)
    store._sum_copy = sum_copy
    try:
        hs = offer_pages(host, ns, 4, seed=7)
        assert copied.wait(5)
        time.sleep(IDLE_S / 2)  # the engine still steps
        published = store.lookup(ns, hashes=hs).num_pages
        stop.set()
        stepper.join()
        host.flush()
        assert store.lookup(ns, hashes=hs).num_pages == 4
        assert published == (0 if pause else 4)
    finally:
        stop.set()
        host.close()


@pytest.mark.parametrize("gate", ["engine", "gpu-queued"])
def test_room_says_no_when_the_queue_is_full(store, gate):
    import threading
    ns = Namespace("qwen3_moe", PageSpec(2, 2, 8, 4, "float32"), "digest")
    host = HostTier(store, max_pending_puts=1)
    host.put_gate = gate
    busy = threading.Event()

    def engine_steps():  # a busy engine: the put thread holds its item and the queue stays full
        while not busy.is_set():
            host.step_started()
            time.sleep(IDLE_S / 20)
    stepper = threading.Thread(target=engine_steps)
    host.step_started()
    stepper.start()
    try:
        # it stays queued: the put thread waits for the gate before it takes an offer (under
        # "engine" the engine's thread would take it in its waits for the GPU, and none come here)
        offer_pages(host, ns, 2, seed=2)
        time.sleep(IDLE_S)
        assert not host.room(2, on_cuda=False)
        before = host.dropped_puts
        assert not host.offer(ns, [b"x" * 16], [ns.root], [np.zeros(4, dtype=np.uint32)], torch.zeros(1, *ns.spec.shape))
        assert host.dropped_puts == before + 1
    finally:
        busy.set()
        stepper.join()
        host.close()


def test_puts_wait_while_a_load_runs(store):
    """A load is on a request's critical path: the put thread keeps off the GIL and the store's
    lock until it ends, even when the engine is otherwise idle."""
    import threading

    from kvc.device_pool import DevicePool

    ns = Namespace("qwen3_moe", PageSpec(2, 2, 8, 4, "float32"), "digest")
    gate, entered = threading.Event(), threading.Event()

    class SlowGets:  # the real store, whose gets wait for the gate
        def __getattr__(self, name):
            return getattr(store, name)

        def get_pages(self, ns, hashes, out=None):
            entered.set()
            gate.wait(10)
            return store.get_pages(ns, hashes, out=out)

        def get_into(self, ns, hashes, out, landed=None):
            entered.set()
            gate.wait(10)
            return store.get_into(ns, hashes, out, landed)

    host = HostTier(SlowGets())
    try:
        loaded = offer_pages(host, ns, 4, seed=4)
        host.flush()  # the engine is idle: these go at once
        pool = DevicePool(ns.spec, 8)
        fut = host.load(ns, loaded, pool, [0, 1, 2, 3], ["cpu"] * 4)
        assert entered.wait(5)
        hs = offer_pages(host, ns, 4, seed=5)
        time.sleep(2 * IDLE_S)  # idle engine, but a load in flight: nothing is put
        assert store.lookup(ns, hashes=hs).num_pages == 0
        gate.set()
        assert fut.result(5) == 4
        host.flush()
        assert store.lookup(ns, hashes=hs).num_pages == 4
    finally:
        gate.set()
        host.close()


def test_disk_writes_are_paced_like_puts(tmp_path):
    """pace_disk_writes hands the put thread's GPU-slack wait to an in-process store's disk writer:
    while the engine steps nothing reaches LMDB, once it is idle the writes commit; close() takes
    the gate back."""
    import threading
    from kvc.config import load_config
    from kvc.store import TieredStore
    from tests.kvc.conftest import NS, make_pages
    s = TieredStore(load_config(None, disk_path=str(tmp_path / "p"), disk_write="through",
                                cpu_memory_size_GB=0.01, disk_size_GB=0.05).kvc)
    host = HostTier(s)
    stepping = threading.Event()

    def engine():  # a busy engine: a step starts every few ms
        while not stepping.is_set():
            host.step_started()
            time.sleep(IDLE_S / 20)
    try:
        host.pace_disk_writes()
        assert s.disk.write_gate is not None
        t = threading.Thread(target=engine)
        host.step_started()
        t.start()
        hs, pages = make_pages(NS, list(range(40)))
        s.put_pages(NS, pages)  # queued for the disk writer
        time.sleep(4 * IDLE_S)
        assert s.disk._committed == 0 and s.disk.backlog_bytes > 0  # it waits for slack
        stepping.set()
        t.join()
        s.disk.flush(timeout=5)  # idle now: it writes
        assert s.disk._committed > 0 and s.disk.backlog_bytes == 0
    finally:
        stepping.set()
        host.close()
        assert s.disk.write_gate is None
        s.close()


def test_layer_groups_follow_the_loads_bytes(store):
    """A layered load's layers land in groups of at least layer_group_bytes (all its pages): a 32K
    hit at Qwen3-30B-A3B's 12-layer shapes (64 MiB a layer) one layer a group, an 8K hit four, a
    tiny load every layer in one group; 0 is one layer a group. A backend whose layered get does not
    take layer_group (a wrapper) is not asked to group."""
    host = HostTier(store)
    try:
        spec = PageSpec(num_layers=12, num_kv_heads=4, head_dim=128, page_size=16, dtype="bfloat16")
        ns = Namespace("qwen3-shapes", spec, weights_digest="w")
        assert spec.page_bytes == 384 << 10
        assert [host._layer_group(ns, n) for n in (2048, 512, 1024, 3)] == [1, 4, 2, 12]
        host.layer_group_bytes = 0
        assert host._layer_group(ns, 512) == 1
        assert host._grouping == {"start_layers_into": True, "get_layers_into": True}

        class Wrapper:  # an older backend's signature
            def start_layers_into(self, ns, hashes, out, layer_landed, block=True):
                raise AssertionError("not called here")

            def put_pages(self, ns, pages):
                return None
        other = HostTier(Wrapper())
        try:
            assert other._grouping == {"start_layers_into": False, "get_layers_into": False}
        finally:
            other.close()
    finally:
        host.close()


def test_layer_events_wait_for_each_layer_and_end_early():
    """LayerEvents (a load landing layer by layer): get(i) waits until the loader recorded layer i;
    once the loader ends (an error) the layers it never queued give None instead of blocking."""
    import threading
    import time

    from engine.host_tier import LayerEvents
    h = LayerEvents(3)
    got = []
    t = threading.Thread(target=lambda: got.extend([h.get(0), h.get(1), h.get(2)]))
    t.start()
    h.add("e0")
    time.sleep(0.05)
    assert not got and t.is_alive()  # still waiting for layer 1
    h.add("e1")
    h.end()  # the loader stopped before layer 2
    t.join(5)
    assert got == ["e0", "e1", None]


@pytest.mark.parametrize("gate", ["gpu-wait", "gpu-queued"])
def test_puts_run_while_the_engine_waits_for_the_gpu(store, gate):
    """Under the "gpu-wait" gate a busy engine's puts run only while its thread waits for a step's
    samples (gpu_wait). The default gate ("gpu-queued", with no step on a GPU here) keeps them
    held even while the engine waits: the check can fail either way."""
    ns = Namespace("qwen3_moe", PageSpec(2, 2, 8, 4, "float32"), "digest")
    host = HostTier(store)
    host.put_gate = gate
    stop_engine = busy_engine(host)
    try:
        hs = offer_pages(host, ns, 8, seed=11)
        time.sleep(2 * IDLE_S)
        assert store.lookup(ns, hashes=hs).num_pages == 0  # busy, not waiting: held
        host.gpu_wait(True)  # the engine's thread now waits for the GPU (still stepping)
        deadline = time.monotonic() + 2
        while store.lookup(ns, hashes=hs).num_pages < 8 and time.monotonic() < deadline:
            time.sleep(0.005)
        put_while_waiting = store.lookup(ns, hashes=hs).num_pages
        host.gpu_wait(False)
        assert put_while_waiting == (8 if gate == "gpu-wait" else 0)
    finally:
        stop_engine()
        host.flush()
        host.close()
    assert store.lookup(ns, hashes=hs).num_pages == 8


def test_room_says_no_when_the_put_ring_lacks_free_slots(store):
    """An offer the ring cannot take now is dropped after its gather (a GPU copy of its pages for
    nothing); room() is what lets the engine skip that gather, so it must ask about free slots, not
    only about the ring's size."""
    from engine.pinned_ring import PinnedRing
    ns = Namespace("qwen3_moe", PageSpec(2, 2, 8, 4, "float32"), "digest")
    host = HostTier(store)
    try:
        host._ring = PinnedRing(4, tuple(ns.spec.shape), torch.float32, pin=False)
        assert host.room(4, on_cuda=True)
        slot = host._ring.take(3)  # a put in flight holds three of four slots
        assert host.room(1, on_cuda=True)
        assert not host.room(2, on_cuda=True)
        host._ring.give(slot)
        assert host.room(4, on_cuda=True)
    finally:
        host.close()


class FakeReady:
    """A step's samples' CUDA event as the engine's wait sees it: query() is False `busy` times."""

    def __init__(self, busy: int):
        self.busy, self.queries = busy, 0

    def query(self) -> bool:
        self.queries += 1
        return self.queries > self.busy


def test_the_engine_gate_puts_on_the_engines_thread_only_while_it_waits(store):
    """Under the "engine" gate (the default with an in-process store) a busy engine's puts run on
    its own thread, in gpu_wait, only while the step's event has not happened, and the put thread
    does none of them meanwhile; the pages stored equal what was offered."""
    ns = Namespace("qwen3_moe", PageSpec(2, 2, 8, 4, "float32"), "digest")
    host = HostTier(store)
    assert host.put_gate == "engine"
    stop_engine = busy_engine(host)
    try:
        hs = offer_pages(host, ns, 40, seed=21)  # two batches of PUT_BATCH
        time.sleep(2 * IDLE_S)
        assert store.lookup(ns, hashes=hs).num_pages == 0 and host.thread_put_pieces == 0
        host.gpu_wait(True, FakeReady(0))  # the step is done already: no put work
        host.gpu_wait(False)
        assert host.engine_put_pieces == 0 and store.lookup(ns, hashes=hs).num_pages == 0
        ready = FakeReady(3)
        host.gpu_wait(True, ready)  # a few pieces, then the step is done
        host.gpu_wait(False)
        assert 1 <= host.engine_put_pieces <= 3 and ready.queries == 4
        deadline = time.monotonic() + 10
        while store.lookup(ns, hashes=hs).num_pages < 40 and time.monotonic() < deadline:
            host.gpu_wait(True, FakeReady(10 ** 9 if host._puts.unfinished_tasks else 0))
            host.gpu_wait(False)
        assert store.lookup(ns, hashes=hs).num_pages == 40
        assert host.thread_put_pieces == 0  # all of it on this thread
    finally:
        stop_engine()
        host.flush()
        host.close()
    got = store.get_pages(ns, hs)
    assert len(got) == 40


def test_the_engine_gate_does_no_put_work_while_a_load_runs(store):
    ns = Namespace("qwen3_moe", PageSpec(2, 2, 8, 4, "float32"), "digest")
    host = HostTier(store)
    host.step_started()
    try:
        hs = offer_pages(host, ns, 4, seed=22)
        host._loads_in_flight = 1
        host.gpu_wait(True, FakeReady(100))
        host.gpu_wait(False)
        assert host.engine_put_pieces == 0 and store.lookup(ns, hashes=hs).num_pages == 0
        host._loads_in_flight = 0
    finally:
        host.flush()  # idle now: the put thread puts them
        host.close()
    assert store.lookup(ns, hashes=hs).num_pages == 4 and host.thread_put_pieces > 0


def test_a_failing_piece_of_put_work_is_counted_and_the_work_goes_on(store, monkeypatch):
    """A piece whose byte work fails to start (here: its native start raises) fails that offer
    only: counted in failed_puts, its reserved slots given back, the next offer stored."""
    from kvc import pagecopy
    ns = Namespace("qwen3_moe", PageSpec(2, 2, 8, 4, "float32"), "digest")
    host = HostTier(store)
    calls = []
    real = pagecopy.SumCopyWork.start

    def start(self):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("no thread")
        return real(self)
    monkeypatch.setattr(pagecopy.SumCopyWork, "start", start)
    host.step_started()
    try:
        bad = offer_pages(host, ns, 4, seed=23)
        good = offer_pages(host, ns, 4, seed=24)
        for _ in range(200):
            host.gpu_wait(True, FakeReady(50))
            host.gpu_wait(False)
            if not host._puts.unfinished_tasks:
                break
        assert host.failed_puts == 1
        assert store.lookup(ns, hashes=bad).num_pages == 0 and store.lookup(ns, hashes=good).num_pages == 4
        assert store.cpu.used == 4 * ns.spec.page_bytes  # the failed offer's slots were given back
    finally:
        host.flush()
        host.close()


def test_a_layered_loads_future_is_done_at_its_verdict_before_the_bookkeeping(store):
    """The loader's part of a layer-by-layer load hands the verdict to the request's future as soon
    as the store knows it; the store's bookkeeping and the rate sample come after."""
    import threading
    from concurrent.futures import Future

    class Event:
        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1.0
    release = threading.Event()

    class Cache:
        def finish_layers(self, got, on_verdict=None):
            on_verdict(7)
            assert release.wait(10)  # the bookkeeping
            return 7
    host = HostTier(store)
    try:
        host.cache = Cache()
        fut: Future = Future()
        t = threading.Thread(target=host._finish_layers, args=(object(), Event(), Event(), 1 << 20, fut))
        t.start()
        assert fut.result(timeout=10) == 7 and t.is_alive()  # done while the bookkeeping still runs
        release.set()
        t.join(10)
        assert host.layered_loads == 1
    finally:
        release.set()
        host.cache = store
        host.close()


def test_a_host_bound_engine_does_a_bounded_share_of_put_work_past_the_gpu(store, monkeypatch):
    """Under the "engine" gate a host-bound engine (every step done before it waits) does no put
    work at first; once offers have waited STARVED_S it does a piece now and then, at most
    FORCED_SHARE of its time, so a busy engine's cache is not starved of pages."""
    from engine import host_tier
    monkeypatch.setattr(host_tier, "STARVED_S", 0.2)
    monkeypatch.setattr(host_tier, "FORCED_SHARE", 0.05)
    ns = Namespace("qwen3_moe", PageSpec(2, 2, 8, 4, "float32"), "digest")
    host = HostTier(store)
    stop_engine = busy_engine(host)
    try:
        hs = offer_pages(host, ns, 40, seed=31)
        t0 = time.monotonic()
        first = None
        while time.monotonic() - t0 < 1.5:
            host.gpu_wait(True, FakeReady(0))  # the step is always done already
            host.gpu_wait(False)
            if first is None and time.monotonic() - t0 > 0.1:
                first = host.engine_forced_pieces
            time.sleep(0.001)
        elapsed = time.monotonic() - t0
        assert first == 0  # not starved yet
        assert host.engine_forced_pieces > 0 and host.engine_put_pieces == 0 and host.thread_put_pieces == 0
        # within the share (+ one piece's overshoot; the window starts with a second's allowance)
        assert host._forced_s <= 0.05 * (elapsed + 1.0) + 0.05
        assert store.lookup(ns, hashes=hs).num_pages > 0
    finally:
        stop_engine()
        host.flush()
        host.close()


def test_a_layered_load_goes_straight_into_the_pool_only_where_its_blocks_allow(store):
    """The store takes `blocks` and copies by DMA: a load whose blocks form at most DIRECT_MAX_RUNS
    runs of consecutive ids goes straight into the pool; more runs, the kernel copy, a
    non-contiguous pool or direct_loads off take the staging buffer (no `blocks` argument)."""
    from kvc.device_pool import DevicePool
    spec = PageSpec(num_layers=4, num_kv_heads=2, head_dim=8, page_size=4, dtype="float32")
    ns = Namespace("test-arch", spec, weights_digest="w0")
    pool = DevicePool(spec, 200)
    host = HostTier(store)
    try:
        runs = engine.host_tier.DIRECT_MAX_RUNS
        few = [b for r in range(runs) for b in (10 * r, 10 * r + 1)]  # runs of two
        many = [b for r in range(runs + 1) for b in (10 * r, 10 * r + 1)]
        assert host._layered_args("start_layers_into", ns, pool, few)["blocks"] == few
        assert host._layered_args("get_layers_into", ns, pool, few)["blocks"] == few
        assert "blocks" not in host._layered_args("start_layers_into", ns, pool, many)
        assert host._layered_args("start_layers_into", ns, pool, many)["layer_group"] >= 1
        big = spec.page_bytes * len(few)
        with pytest.MonkeyPatch.context() as mp:  # a load of DIRECT_MAX_BYTES or more: staged
            mp.setattr(engine.host_tier, "DIRECT_MAX_BYTES", big)
            assert "blocks" not in host._layered_args("start_layers_into", ns, pool, few)
            mp.setattr(engine.host_tier, "DIRECT_MAX_BYTES", big + 1)
            assert "blocks" in host._layered_args("start_layers_into", ns, pool, few)
        store.layer_copy = "kernel"
        assert "blocks" not in host._layered_args("start_layers_into", ns, pool, few)
        store.layer_copy = "dma"
        host.direct_loads = False
        assert "blocks" not in host._layered_args("start_layers_into", ns, pool, few)
        host.direct_loads = True
        pool.kv = pool.kv.transpose(0, 1)
        assert "blocks" not in host._layered_args("start_layers_into", ns, pool, few)
    finally:
        host.close()


def test_a_steps_layer_waits_for_the_lagged_layer_of_each_load(monkeypatch):
    """KVCache.layer(i) waits for layer i's event of each layered load, or with layer_lag k for
    layer i + k's (at most the last): later events imply earlier layers landed (one copy stream)."""
    from engine.kv_cache import KVCache

    class Stream:
        def __init__(self):
            self.waited = []

        def wait_event(self, ev):
            self.waited.append(ev)

    class Handle:
        layers = 4

        def get(self, i):
            return f"ev{i}"
    stream = Stream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    spec = PageSpec(num_layers=4, num_kv_heads=1, head_dim=8, page_size=4, dtype="float32")
    for lag, want in ((0, ["ev0", "ev1", "ev2", "ev3"]), (2, ["ev2", "ev3", "ev3", "ev3"]), (9, ["ev3"] * 4)):
        kv = KVCache(spec, 8, torch.device("cpu"), "a", "w")
        kv.layer_lag = lag
        kv.wait_layers(Handle())
        stream.waited.clear()
        for i in range(4):
            kv.layer(i)
        assert stream.waited == want, (lag, stream.waited)
