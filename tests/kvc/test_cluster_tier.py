"""The cluster tier against a real Redis Cluster (3 masters + 3 replicas on 127.0.0.1)."""
import time

import pytest
import redis
import torch

from kvc import cluster_tier
from kvc.cluster_tier import page_key, redacted
from kvc.config import ConfigError, load_config
from kvc.store import TieredStore
from tests.redis_cluster import redis_cluster  # noqa: F401  (the module's cluster fixture)
from tests.redis_cluster import _free_ports, redis_missing

from .backend_suite import BackendSuite
from .conftest import NS, SPEC, kvc_config, make_pages


def cluster_only(url: str):
    return load_config(None, cpu_memory_size_GB=0, disk_path=None, cluster_url=url).kvc


def metric(store, name, **labels):
    v = store.metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


@pytest.fixture
def client(redis_cluster):
    c = redis.cluster.RedisCluster.from_url(redis_cluster.url)
    c.flushall()  # every test starts from an empty cluster
    yield c
    c.close()


@pytest.fixture
def backend(redis_cluster, client):
    store = TieredStore(cluster_only(redis_cluster.url))
    yield store
    store.close()


class TestClusterOnlySuite(BackendSuite):
    """The CacheBackend suite with the cluster as the only host tier (no cpu, no disk)."""

    def test_stats(self, backend):
        _, pages = make_pages(NS, list(range(8)))
        backend.put_pages(NS, pages)
        backend.flush()  # the writer connects on its first batch
        st = backend.stats()
        assert st["tiers"]["cpu"]["pages"] == 0 and st["tiers"]["disk"]["pages"] == 0
        assert st["tiers"]["cluster"]["mode"] == "cluster" and st["tiers"]["cluster"]["degraded"] is False


def test_second_process_reads_what_the_first_wrote(redis_cluster, client, tmp_path):
    """A store with cpu + disk writes behind to the cluster; another store (own disk) hits it,
    verifies, promotes to its cpu tier, and counts tier="cluster" hits and bytes."""
    toks = list(range(1000, 1030))  # 7 full pages
    hashes, pages = make_pages(NS, toks)
    with TieredStore(kvc_config(tmp_path / "a", cluster_url=redis_cluster.url)) as a:
        assert a.put_pages(NS, pages).stored == 7
        a.flush()
        assert metric(a, "kvc_store_bytes_total", tier="cluster") > 7 * SPEC.page_bytes
    assert client.exists(page_key(NS.root, hashes[0])) == 1
    with TieredStore(kvc_config(tmp_path / "b", cluster_url=redis_cluster.url)) as b:
        r = b.lookup(NS, tokens=toks)
        assert r.located == ["cluster"] * 7
        got = b.get_pages(NS, hashes)
        assert len(got) == 7 and all(torch.equal(x.data, p.data) for x, p in zip(got, pages))
        assert metric(b, "kvc_lookup_hit_tokens_total", tier="cluster") == 7 * SPEC.page_size
        assert metric(b, "kvc_transfer_bytes_total", src="cluster", dst="cpu") == 7 * SPEC.page_bytes
        assert b.lookup(NS, tokens=toks).located == ["cpu"] * 7  # promoted


def test_garbage_values_are_misses_counted_and_deleted(backend, client):
    toks = list(range(16))
    hashes, pages = make_pages(NS, toks)
    backend.put_pages(NS, pages)
    backend.flush()
    good = client.get(page_key(NS.root, hashes[1]))
    client.set(page_key(NS.root, hashes[2]), b"garbage" * 10)  # not a record
    flipped = bytearray(good)
    flipped[-1] ^= 0xFF  # a record whose payload no longer matches its checksum
    client.set(page_key(NS.root, hashes[1]), bytes(flipped))
    assert backend.lookup(NS, tokens=toks).num_pages == 2  # header of page 2 is garbage
    assert metric(backend, "kvc_checksum_failures_total", tier="cluster") == 1
    got = backend.get_pages(NS, hashes)
    assert len(got) == 1 and torch.equal(got[0].data, pages[0].data)  # page 1's payload fails
    assert metric(backend, "kvc_checksum_failures_total", tier="cluster") == 2
    assert client.exists(page_key(NS.root, hashes[1])) == 0 and client.exists(page_key(NS.root, hashes[2])) == 0
    # another namespace's record copied under this key (same length, valid checksum) is rejected too
    other_hashes, other = make_pages(NS.with_salt("x"), toks)
    client.set(page_key(NS.root, hashes[1]), client.get(page_key(NS.with_salt("x").root, other_hashes[1])) or b"")
    assert backend.lookup(NS, hashes=hashes).num_pages == 1


def test_tenants_never_share_pages(redis_cluster, client, tmp_path):
    toks = list(range(500, 532))
    a, b = NS.with_salt("tenant-a"), NS.with_salt("tenant-b")
    ha, pa = make_pages(a, toks)
    with TieredStore(kvc_config(tmp_path / "a", cluster_url=redis_cluster.url)) as s:
        s.put_pages(a, pa)
        s.flush()
    with TieredStore(cluster_only(redis_cluster.url)) as other:
        assert other.lookup(b, tokens=toks).num_pages == 0
        assert other.lookup(NS, tokens=toks).num_pages == 0
        assert other.get_pages(b, ha) == []  # a's hashes under b's namespace: other keys
        assert other.lookup(a, tokens=toks).num_pages == 8
    keys = {k for k in client.scan_iter(match=b"kvc:v1:*")}
    assert keys == {page_key(a.root, h) for h in ha}


def test_unreachable_cluster_is_misses_and_backs_off(tmp_path):
    from tests.e2e.conftest import free_port
    cfg = kvc_config(tmp_path, cluster_url=f"redis://127.0.0.1:{free_port()}", cluster_timeout_s=0.1)
    with TieredStore(cfg) as s:
        toks = list(range(12))
        hashes, pages = make_pages(NS, toks)
        assert s.put_pages(NS, pages).stored == 3  # the cpu tier takes them; the cluster write is dropped
        s.flush()
        other = list(range(100, 112))
        assert s.lookup(NS, tokens=other).num_pages == 0
        assert s.lookup(NS, tokens=toks).num_pages == 3
        assert s.cluster.degraded
        assert metric(s, "kvc_degraded", component="cluster") == 1
        assert sum(metric(s, "kvc_cluster_errors_total", op="connect", kind=k)
                   for k in ("connection", "timeout")) >= 1
        # no traffic: the gauge clears when the back-off ends (before: it stayed 1 until a call
        # succeeded, so an idle engine kept KvcTierDegraded firing)
        deadline = time.monotonic() + cluster_tier.BACKOFF_MAX_S + 2
        while metric(s, "kvc_degraded", component="cluster") == 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(s, "kvc_degraded", component="cluster") == 0 and not s.cluster.degraded


def test_a_refused_password_is_an_auth_error_that_names_the_setting(tmp_path, monkeypatch, caplog):
    """A Redis with requirepass and a wrong or missing password: kvc_cluster_errors_total counts
    kind="auth" (redis-py's AuthenticationError is a ConnectionError: it was counted "connection",
    and the log said "HELLO must be called with the client already authenticated"), and the log
    names the settings that give the password; KVC_CLUSTER_PASSWORD with the right one connects."""
    import subprocess
    why = redis_missing()
    if why:
        pytest.skip(why)
    port = _free_ports(1)[0]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--requirepass", "s3cret", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True).stdout
            if "NOAUTH" in out or "PONG" in out:
                break
            time.sleep(0.1)
        monkeypatch.delenv(cluster_tier.PASSWORD_ENV, raising=False)
        for url in (f"redis://:wrong@127.0.0.1:{port}", f"redis://127.0.0.1:{port}"):
            caplog.clear()
            with TieredStore(cluster_only(url)) as s:
                deadline = time.monotonic() + 5
                while metric(s, "kvc_cluster_errors_total", op="connect", kind="auth") == 0 \
                        and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert metric(s, "kvc_cluster_errors_total", op="connect", kind="auth") >= 1, url
                assert metric(s, "kvc_cluster_errors_total", op="connect", kind="connection") == 0
            said = [r.getMessage() for r in caplog.records]
            assert any("connect failed (auth: Redis refused the password" in m and "kvc.cluster_url" in m
                       and cluster_tier.PASSWORD_ENV in m for m in said), said
        monkeypatch.setenv(cluster_tier.PASSWORD_ENV, "s3cret")
        toks = list(range(4 * SPEC.page_size))
        _, pages = make_pages(NS, toks)
        with TieredStore(cluster_only(f"redis://127.0.0.1:{port}")) as s:
            assert s.put_pages(NS, pages).stored == 4
            s.flush()
            assert s.lookup(NS, tokens=toks).num_pages == 4 and s.cluster.mode == "standalone"
    finally:
        proc.kill()
        proc.wait()


def test_bad_cluster_url_names_the_key():
    with pytest.raises(ConfigError, match="kvc.cluster_url"):
        load_config(None, cluster_url="http://10.0.0.5:7000")
    assert redacted("rediss://user:s3cret@10.0.0.5:7000") == "rediss://user:***@10.0.0.5:7000"  # logs, stats


def test_admission_gates_the_cluster(redis_cluster, client, tmp_path):
    toks = list(range(300, 316))
    hashes, pages = make_pages(NS, toks)
    with TieredStore(kvc_config(tmp_path, cluster_url=redis_cluster.url, disk_admission_hits=2)) as s:
        s.put_pages(NS, pages)
        s.flush()
        assert client.exists(*[page_key(NS.root, h) for h in hashes]) == 0  # one use: not admitted
        s.get_pages(NS, hashes[:2])
        s.flush()
        assert [client.exists(page_key(NS.root, h)) for h in hashes] == [1, 1, 0, 0]


def test_cluster_events_reach_listeners(backend):
    events = []
    backend.add_listener(lambda kind, ns_root, h, parent, tier: events.append((kind, ns_root, h, parent, tier)))
    hashes, pages = make_pages(NS, list(range(8)))
    backend.put_pages(NS, pages)
    backend.flush()
    assert [e for e in events if e[4] == "cluster"] == [
        ("stored", NS.root, hashes[0], NS.root, "cluster"), ("stored", NS.root, hashes[1], hashes[0], "cluster")]
    backend.delete(NS, hashes[1:])
    assert events[-1][:3] == ("removed", NS.root, hashes[1]) and events[-1][4] == "cluster"


def test_a_page_the_cluster_evicted_is_stored_and_written_again(redis_cluster, client, tmp_path):
    """kvc never relies on a key staying: a page that left cpu and was evicted by Redis is a new put."""
    cfg = kvc_config(tmp_path, cpu_memory_size_GB=4 * SPEC.page_bytes / (1 << 30), disk_path=None,
                     high_watermark=0.99, low_watermark=0.1, cluster_url=redis_cluster.url)
    with TieredStore(cfg) as s:
        ha, pa = make_pages(NS, list(range(16)))
        _, pb = make_pages(NS, list(range(900, 916)), seed=9)
        s.put_pages(NS, pa)
        s.flush()
        s.put_pages(NS, pb)  # A leaves the cpu tier
        s.flush()
        assert all(s.cpu.get(NS.root + h) is None for h in ha)
        client.delete(*[page_key(NS.root, h) for h in ha])  # as maxmemory + allkeys-lru would
        assert s.put_pages(NS, pa).stored == 4
        s.flush()
        assert [client.exists(page_key(NS.root, h)) for h in ha] == [1, 1, 1, 1]


def test_a_lookup_miss_forgets_the_written_hint(backend, client):
    """Pages this process wrote count as held for duplicate puts for KNOWN_S; a cluster that lost
    them (a restart empty, an eviction) and a lookup that misses them must not keep a put of the
    same pages from writing them again (with no cpu tier nothing else would)."""
    ha, pa = make_pages(NS, list(range(16)))
    backend.put_pages(NS, pa)
    backend.flush()
    client.delete(*[page_key(NS.root, h) for h in ha])  # as a node restarted empty would
    assert backend.lookup(NS, hashes=ha).num_pages == 0
    backend.put_pages(NS, pa)
    backend.flush()
    assert [client.exists(page_key(NS.root, h)) for h in ha] == [1, 1, 1, 1]
    assert backend.lookup(NS, hashes=ha).num_pages == 4


def test_cluster_fixture_restarts_a_node_whose_port_was_taken(tmp_path):
    """CI once saw a node never answer: its port, drawn from the ephemeral range, went to another
    socket before redis-server bound it. The helper now draws ports below that range and starts a
    node that exits on another port."""
    import socket

    from tests.redis_cluster import RedisClusterProcs, _ephemeral_low, _free_ports, redis_missing
    if redis_missing():
        pytest.skip(redis_missing())
    port = _free_ports(1)[0]
    assert port + 10000 < _ephemeral_low()
    rc = RedisClusterProcs(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen(1)
        try:
            got = rc._start_node(port)
            assert got != port
            assert rc.cli(got, "ping").strip() == "PONG"
        finally:
            rc.stop()


def test_replicas_synced_reads_info_replication():
    from tests.redis_cluster import replicas_synced
    head = "# Replication\r\nrole:master\r\nconnected_slaves:1\r\n"
    online = head + "slave0:ip=127.0.0.1,port=7001,state=online,offset=500,lag=0\r\nmaster_repl_offset:500\r\n"
    assert replicas_synced(online, 1)
    assert not replicas_synced(online, 2)  # fewer replicas than the cluster was made with
    assert not replicas_synced(online.replace("offset=500", "offset=420"), 1)  # writes on their way
    assert not replicas_synced(online.replace("state=online", "state=wait_bgsave"), 1)  # first sync pending
    assert replicas_synced("# Replication\r\nrole:master\r\nconnected_slaves:0\r\nmaster_repl_offset:0\r\n")


def test_cluster_starts_with_its_replicas_synced(tmp_path):
    """A replica's first sync (a fork of its master and a full copy, 5 s after the cluster formed
    by Redis's default) landed inside bench_cluster's timed reps: start() now returns after it."""
    from tests.redis_cluster import RedisClusterProcs, redis_missing, replicas_synced
    if redis_missing():
        pytest.skip(redis_missing())
    with RedisClusterProcs(tmp_path) as rc:
        masters = rc.masters()
        assert len(masters) == 3
        for port in masters:
            assert replicas_synced(rc.cli(port, "info", "replication"), 1), port


def test_bench_cluster_quick_runs_to_its_tables(tmp_path):
    """benchmarks/bench_cluster.py --quick (its own local cluster): every section prints its table,
    with the replicas settled before each timed op."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.redis_cluster import redis_missing
    if redis_missing():
        pytest.skip(redis_missing())
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_cluster.py"), "--quick"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    for row in ("| put |", "| get |", "prefix from the cluster (engine B)", "| p50 ms | p99 ms |"):
        assert row in r.stdout, row
    assert "replicas still behind" not in r.stderr


def _counting_library(monkeypatch):
    """pagecopy.library() with its `pointers` calls counted (None where no compiler built it)."""
    from kvc import pagecopy
    lib = pagecopy.library()
    if lib is None:
        return None
    calls = []
    real = lib.pointers

    class Counted:
        def __getattr__(self, name):
            return getattr(lib, name)

        def pointers(self, src, dst, lens):
            calls.append(len(src))
            return real(src, dst, lens)
    monkeypatch.setattr(pagecopy, "library", lambda cc=None: Counted())
    return calls


def test_payloads_checked_as_they_are_copied_into_out(redis_cluster, client, tmp_path, monkeypatch):
    """get_pages(out=...) copies cluster payloads into out's rows and checksums them in the same
    pass: the rows equal the pages put, after cpu-tier pages too; a payload that fails its checksum
    ends the run there, is counted and deleted, as on the path without out."""
    toks = list(range(2000, 2000 + 8 * SPEC.page_size))
    hashes, pages = make_pages(NS, toks)
    with TieredStore(cluster_only(redis_cluster.url)) as a:
        assert a.put_pages(NS, pages).stored == 8
        a.flush()
    calls = _counting_library(monkeypatch)
    with TieredStore(kvc_config(tmp_path / "b", cluster_url=redis_cluster.url)) as b:
        assert len(b.get_pages(NS, hashes[:3])) == 3  # promoted: the next get starts in the cpu tier
        out = torch.full((8, *SPEC.shape), 7, dtype=pages[0].data.dtype)
        got = b.get_pages(NS, hashes, out=out)
        assert len(got) == 8
        for i, p in enumerate(pages):
            assert torch.equal(out[i], p.data) and torch.equal(got[i].data, p.data), i
        if calls is not None:
            assert 5 in calls  # pages 3-7 from the cluster in one native pass (the cpu reads make their own)
    good = client.get(page_key(NS.root, hashes[5]))
    flipped = bytearray(good)
    flipped[-1] ^= 0xFF
    client.set(page_key(NS.root, hashes[5]), bytes(flipped))
    with TieredStore(cluster_only(redis_cluster.url)) as c:
        out = torch.zeros((8, *SPEC.shape), dtype=pages[0].data.dtype)
        got = c.get_pages(NS, hashes, out=out)
        assert len(got) == 5 and all(torch.equal(out[i], pages[i].data) for i in range(5))
        assert metric(c, "kvc_checksum_failures_total", tier="cluster") == 1
        assert client.exists(page_key(NS.root, hashes[5])) == 0


def test_the_tier_reads_replies_in_large_receives(redis_cluster, client):
    """Every receive of a reply hands the GIL over: at redis-py's default 64 KiB a 144 MB get beside
    a busy Python thread took ~3.9 s (0.75 s at 4 MiB). The tier's connections read SOCKET_READ_BYTES
    at a time."""
    with TieredStore(cluster_only(redis_cluster.url)) as s:
        c = s.cluster._conn()
        assert s.cluster.mode == "cluster"
        pools = [n.redis_connection.connection_pool for n in c.get_nodes() if n.redis_connection is not None]
        assert pools
        for pool in pools:
            assert pool.connection_kwargs["socket_read_size"] == cluster_tier.SOCKET_READ_BYTES >= 1 << 20


@pytest.mark.parametrize("native", [True, False], ids=["native", "parsed"])
def test_gets_read_each_nodes_replies_in_one_call(redis_cluster, client, monkeypatch, native):
    """Each node's GET replies (and a lookup's GETRANGEs) are read in one call and equal the pages
    put: one respread call (without the GIL, straight into rows), or without the native reader
    (TLS, hiredis, no compiler) one read_parsed call through the connection's parser, not redis-py's
    cluster pipeline (which sends each unanswered command again on its own). Where the client
    routes a key to the wrong node, the node's MOVED reply sends that key through redis-py's
    pipeline, which follows it."""
    from kvc import respread
    calls = []
    if native:
        lib = respread.library()
        if lib is None:
            pytest.skip("no C compiler")
        real = lib.bulks
        monkeypatch.setattr(lib, "bulks", lambda *a: calls.append(len(a[2])) or real(*a))
    else:
        monkeypatch.setattr(respread, "library", lambda cc=None: None)
        parsed = respread.read_parsed
        monkeypatch.setattr(respread, "read_parsed", lambda pool, conn, n, cap: calls.append(n) or parsed(
            pool, conn, n, cap))
    toks = list(range(3000, 3000 + 24 * SPEC.page_size))
    hashes, pages = make_pages(NS, toks)
    with TieredStore(cluster_only(redis_cluster.url)) as a:
        assert a.put_pages(NS, pages).stored == 24
        a.flush()
    assert sum(calls) == (0 if native else 24)  # a put's SET replies: parsed, a node's in one call
    calls.clear()
    with TieredStore(cluster_only(redis_cluster.url)) as b:
        assert b.lookup(NS, tokens=toks).located == ["cluster"] * 24  # the headers' GETRANGEs
        assert 2 <= len(calls) <= 3 and sum(calls) == 24, calls  # one call a node holding keys
        calls.clear()
        got = b.get_pages(NS, hashes)
        assert len(got) == 24 and all(torch.equal(x.data, p.data) for x, p in zip(got, pages))
        assert 2 <= len(calls) <= 3 and sum(calls) == 24, calls
        c = b.cluster._conn()
        first = c.get_primaries()[0]
        monkeypatch.setattr(c, "get_node_from_key", lambda key, replica=False: first)
        calls.clear()
        got = b.get_pages(NS, hashes)
        assert calls == [24]
        assert len(got) == 24 and all(torch.equal(x.data, p.data) for x, p in zip(got, pages))
        assert b.lookup(NS, tokens=toks).num_pages == 24 and calls == [24, 24]
        assert metric(b, "kvc_cluster_errors_total", op="get", kind="connection") == 0
        assert not b.cluster.degraded


def paused_get_is_a_timed_out_miss(store, proc, hashes, pages) -> None:
    """With proc (a Redis server holding some of the pages) paused (SIGSTOP), a get of the pages
    returns within 1 s (the 0.2 s socket timeout) missing some, counted as one timeout; once proc
    answers again and the back-off ends, the next get is whole."""
    import os
    import signal
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        t = time.perf_counter()
        got = store.get_pages(NS, hashes)
        took = time.perf_counter() - t
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert len(got) < len(hashes) and took < 1.0, (len(got), took)
    assert metric(store, "kvc_cluster_errors_total", op="get", kind="timeout") == 1
    deadline = time.monotonic() + 10
    while store.cluster.degraded and time.monotonic() < deadline:
        time.sleep(0.05)
    got = store.get_pages(NS, hashes)
    assert len(got) == len(hashes) and all(torch.equal(x.data, p.data) for x, p in zip(got, pages))


@pytest.mark.parametrize("native", [True, False], ids=["native", "parsed"])
def test_a_node_that_stops_answering_mid_get_is_a_timed_out_miss(redis_cluster, client, monkeypatch, native):
    """A master paused (SIGSTOP) while a get waits for its replies: the get returns misses within
    about the socket timeout (no hang), counted as a timeout, the tier backs off; once the node
    answers again and the back-off ends, the next get is whole (the half-read connection was closed,
    not reused). With the native reader and without it (the replies read by redis-py's parser: TLS,
    hiredis, no compiler; through redis-py's cluster pipeline, which sends each unanswered command
    again on its own, this get took ~3 s)."""
    from kvc import respread
    if not native:
        monkeypatch.setattr(respread, "library", lambda cc=None: None)
    elif respread.library() is None:
        pytest.skip("the native reply reader is not built here")
    toks = list(range(5000, 5000 + 24 * SPEC.page_size))
    hashes, pages = make_pages(NS, toks)
    with TieredStore(cluster_only(redis_cluster.url)) as s:
        assert s.put_pages(NS, pages).stored == 24
        s.flush()
        c = s.cluster._conn()
        port = next(n.port for n in c.get_primaries() if any(
            c.get_node_from_key(page_key(NS.root, h)).port == n.port for h in hashes))
        paused_get_is_a_timed_out_miss(s, redis_cluster.procs[port], hashes, pages)


def test_puts_go_out_per_node_and_fail_fast_against_a_stalled_node(redis_cluster, client, monkeypatch):
    """The writer sends each node's SETs itself and reads their replies in one call a node: with a
    master paused (SIGSTOP), a batch of 24 pages fails that node's pages within about the socket
    timeout, counted dropped and the error a timeout, while the other nodes' pages are stored
    (through redis-py's cluster pipeline such a batch took 2.65 s, benchmarks/probe_cluster_stall.py); once the node
    answers and the back-off ends, the rest are stored. A MOVED reply (the client routing every key
    to one node) is followed through redis-py. The batch is the writer's own _write on the records
    the store offered, so that it holds all 24 pages (the writer thread batches what has arrived)."""
    import os
    import signal
    toks = list(range(11000, 11000 + 24 * SPEC.page_size))
    hashes, pages = make_pages(NS, toks)
    with TieredStore(cluster_only(redis_cluster.url)) as s:
        c = s.cluster._conn()
        port = next(n.port for n in c.get_primaries() if any(
            c.get_node_from_key(page_key(NS.root, h)).port == n.port for h in hashes))
        proc = redis_cluster.procs[port]
        stalled = [page_key(NS.root, h) for h in hashes if c.get_node_from_key(page_key(NS.root, h)).port == port]
        batch = []
        monkeypatch.setattr(s.cluster, "offer", lambda root, h, rec=None: batch.append((root, h, rec)) or True)
        s.put_pages(NS, pages)
        monkeypatch.undo()
        assert len(batch) == 24 and all(rec is not None for _, _, rec in batch)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            t = time.perf_counter()
            s.cluster._write(batch)
            took = time.perf_counter() - t
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert took < 1.0, took  # 0.2 s timeout
        assert metric(s, "kvc_cluster_errors_total", op="put", kind="timeout") == 1
        assert metric(s, "kvc_store_pages_total", tier="cluster", result="dropped") == len(stalled) < 24
        assert metric(s, "kvc_store_pages_total", tier="cluster", result="stored") == 24 - len(stalled)
        assert client.exists(*[page_key(NS.root, h) for h in hashes]) == 24 - len(stalled)
        assert client.exists(*stalled) == 0
        deadline = time.monotonic() + 10
        while s.cluster.degraded and time.monotonic() < deadline:
            time.sleep(0.05)
        first = c.get_primaries()[0]
        monkeypatch.setattr(c, "get_node_from_key", lambda key, replica=False: first)
        s.put_pages(NS, pages)
        s.flush()
        assert metric(s, "kvc_store_pages_total", tier="cluster", result="stored") >= 24
    assert client.exists(*[page_key(NS.root, h) for h in hashes]) == 24


def test_a_full_cluster_drops_the_puts_and_says_why(redis_cluster, client):
    """Masters at maxmemory with noeviction answer SET with an OOM error: the pages are counted
    dropped, the error as a response error (asked again through redis-py, which gets the same
    answer), and nothing is stored."""
    toks = list(range(13000, 13000 + 6 * SPEC.page_size))
    hashes, pages = make_pages(NS, toks)
    masters = [n.redis_connection for n in client.get_primaries()]
    before = [(r.config_get("maxmemory")["maxmemory"], r.config_get("maxmemory-policy")["maxmemory-policy"])
              for r in masters]
    try:
        for r in masters:
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", 1)
        with TieredStore(cluster_only(redis_cluster.url)) as s:
            s.put_pages(NS, pages)
            s.flush()
            assert metric(s, "kvc_store_pages_total", tier="cluster", result="dropped") == 6
            assert metric(s, "kvc_store_pages_total", tier="cluster", result="stored") == 0
            assert metric(s, "kvc_cluster_errors_total", op="put", kind="response") >= 1
    finally:
        for r, (mem, policy) in zip(masters, before):
            r.config_set("maxmemory", mem)
            r.config_set("maxmemory-policy", policy)
    assert client.exists(*[page_key(NS.root, h) for h in hashes]) == 0
