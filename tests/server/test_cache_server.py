"""cache-server as a process: health, metrics, shutdown, single instance, restarts, crashes."""
import signal
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvc import wire
from kvc.pb import pb, pb_grpc
from tests.kvc.conftest import NS, make_pages

from .conftest import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
THROUGH = {"disk_write": "through"}


def health_status(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


def test_health_reflection_and_metrics(shared_server, client_factory):
    s = shared_server
    assert health_status(s.port) == SERVING and health_status(s.port, "kvc.v1.KVCache") == SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{s.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "kvc.v1.KVCache" in {svc.name for svc in resp.list_services_response.service}
    c = client_factory(s.url)
    c.lookup(NS, tokens=list(range(8)))
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=5).read().decode()
    assert 'kvc_rpc_duration_seconds_count{method="Lookup"}' in text
    assert "kvc_lookup_query_tokens_total" in text


def test_port_in_use_and_disk_path_held_are_refused(make_server, client_factory, tmp_path):
    a = make_server().start()
    _, pages = make_pages(NS, list(range(8)))
    client_factory(a.url).put_pages(NS, pages)
    same_port = make_server(disk_path=tmp_path / "other", grpc_port=a.port)
    with pytest.raises(RuntimeError, match="cannot listen"):
        same_port.start()
    assert same_port.proc.returncode == 1
    same_disk = make_server(disk_path=a.disk_path)
    with pytest.raises(RuntimeError, match="in use by another kvc process"):
        same_disk.start()
    assert same_disk.proc.returncode == 1
    assert health_status(a.port) == SERVING  # the first instance is unaffected
    assert client_factory(a.url).lookup(NS, tokens=list(range(8))).num_pages == 2


def in_flight(s) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=5).read().decode()
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("kvc_rpc_in_flight ")))


def test_sigterm_finishes_inflight_and_refuses_new(make_server):
    s = make_server().start()
    hashes, pages = make_pages(NS, list(range(16)))
    ch = grpc.insecure_channel(f"127.0.0.1:{s.port}")
    stub = pb_grpc.KVCacheStub(ch)
    watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=20)
    assert next(watch).status == SERVING
    sent_first = threading.Event()

    def slow_requests():  # an in-flight PutPages that is still sending when SIGTERM arrives
        yield pb.PutPagesRequest(namespace=wire.ns_to_pb(NS))
        for p in pages:
            yield from wire.page_messages([p], pb.PutPagesRequest)
            sent_first.set()
            time.sleep(0.3)

    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", stub.PutPages(slow_requests(), timeout=20)))
    t.start()
    assert sent_first.wait(10)
    deadline = time.monotonic() + 10  # the server has admitted the call (the client's first send
    while in_flight(s) < 1:  # alone does not say so: SIGTERM could beat the call to the server)
        assert time.monotonic() < deadline, "the PutPages call never reached the server"
        time.sleep(0.02)
    s.proc.send_signal(signal.SIGTERM)
    assert next(watch).status == NOT_SERVING
    watch.cancel()  # an open Watch stream would hold the grace period
    with pytest.raises(grpc.RpcError) as e:
        stub.Lookup(pb.LookupRequest(namespace=wire.ns_to_pb(NS), tokens=[1, 2, 3, 4]), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    t.join(20)
    assert result["r"].stored == 4  # the in-flight call completed
    assert s.proc.wait(20) == 0
    ch.close()


def test_two_clients_share_pages(shared_server, client_factory):
    toks = list(range(500, 540))
    hashes, pages = make_pages(NS, toks)
    assert client_factory(shared_server.url).put_pages(NS, pages).stored == 10
    other = client_factory(shared_server.url)
    r = other.lookup(NS, tokens=toks)
    assert r.num_pages == 10
    got = other.get_pages(NS, r.hashes)
    assert len(got) == 10 and all(torch.equal(a.data, b.data) for a, b in zip(got, pages))


def test_restart_serves_disk_pages_client_rides_out_a_crash(make_server, client_factory):
    s = make_server(kvc=THROUGH).start()
    c = client_factory(s.url, timeout=1.0)
    toks = list(range(40))
    hashes, pages = make_pages(NS, toks)
    assert c.put_pages(NS, pages).stored == 10
    assert s.stop() == 0  # graceful: queued disk writes are flushed
    s.start()
    assert wait_until(lambda: c.lookup(NS, tokens=toks).num_pages == 10, timeout=10)
    r = c.lookup(NS, tokens=toks)
    assert r.located == ["disk"] * 10
    got = c.get_pages(NS, r.hashes)
    assert len(got) == 10 and all(torch.equal(a.data, b.data) for a, b in zip(got, pages))
    s.stop(signal.SIGKILL)
    for _ in range(3):  # down: every call answers "miss" at once
        t0 = time.monotonic()
        assert c.lookup(NS, tokens=toks).num_pages == 0
        assert c.get_pages(NS, hashes) == []
        assert c.put_pages(NS, pages).rejected == 10
        assert c.pin(NS, hashes) == "" and c.unpin("x") is False and c.delete(NS) == 0
        assert time.monotonic() - t0 < 0.5
    s.start()  # back: the same client reconnects by itself
    assert wait_until(lambda: c.lookup(NS, tokens=toks).num_pages == 10, timeout=10)
    assert len(c.get_pages(NS, hashes)) == 10


def test_a_tenant_client_follows_a_restart_with_a_new_secret(make_server, client_factory, monkeypatch):
    """Bearer tokens and no disk tier: a restarted service has a new tenant secret, so a new root for
    every namespace. The same client stores and reads pages again, whether its first call after the
    restart is a put (rejected for parents of the old root, then the root asked again and the put
    sent again) or a lookup (whose answer carries the new root). Before, the client kept its map to
    the old root for its life: every put was rejected and every get empty."""
    monkeypatch.delenv("KVC_TENANT_SECRET", raising=False)
    s = make_server(kvc={"disk_path": None}, auth_tokens={"tok-a": "alice"}).start()
    c = client_factory(s.url, token="tok-a", timeout=5.0)
    other = NS.with_salt("other")
    for ns in (NS, other):
        toks = list(range(64))
        hashes, pages = make_pages(ns, toks)
        assert c.put_pages(ns, pages).stored == 16
        assert c.lookup(ns, tokens=toks).num_pages == 16 and len(c.get_pages(ns, hashes)) == 16
    assert s.stop() == 0
    s.start()
    assert wait_until(c.probe, timeout=10)
    toks = list(range(500, 564))
    for ns, put_first in ((NS, True), (other, False)):
        hashes, pages = make_pages(ns, toks, seed=3)
        if not put_first:
            assert c.lookup(ns, tokens=toks).num_pages == 0
        r = c.put_pages(ns, pages)
        assert r.stored == 16 and r.rejected == 0, r
        assert c.lookup(ns, tokens=toks).num_pages == 16
        got = c.get_pages(ns, hashes)
        assert len(got) == 16 and all(torch.equal(a.data, b.data) for a, b in zip(got, pages))


def test_an_outage_is_logged_once_shown_as_degraded_and_its_end_logged(make_server, client_factory, caplog):
    """A client's calls during an outage: one warning when it starts (not one per call, as before),
    kvc_degraded{component="service"} at 1 until a call succeeds, then a warning that it is back."""
    from kvc.metrics import KvcMetrics
    metrics = KvcMetrics()
    s = make_server().start()
    c = client_factory(s.url, timeout=1.0, metrics=metrics)
    down = metrics.degraded.labels(component="service")
    toks = list(range(40))
    hashes, pages = make_pages(NS, toks)
    assert c.put_pages(NS, pages).stored == 10 and down._value.get() == 0
    s.stop(signal.SIGKILL)
    with caplog.at_level("WARNING", logger="kvc.client"):
        for _ in range(6):
            assert c.lookup(NS, tokens=toks).num_pages == 0
            time.sleep(0.25)  # past the client's back-off: each call tries the service
        assert down._value.get() == 1
        said = [r.getMessage() for r in caplog.records if r.name == "kvc.client"]
        assert len(said) == 1 and "unavailable" in said[0], said
        s.start()  # no call from here on: the client's watcher sees the service answer again
        assert wait_until(lambda: down._value.get() == 0, timeout=10)
        said = [r.getMessage() for r in caplog.records if r.name == "kvc.client"]
    assert len(said) == 2 and "reachable again" in said[1], said
    assert c.lookup(NS, tokens=toks).num_pages == 0  # answered (the cpu pages died with the process)


def test_watch_events_report_stores_and_removals(shared_server, client_factory):
    s = shared_server
    c = client_factory(s.url)
    with grpc.insecure_channel(f"127.0.0.1:{s.port}") as ch:
        stream = pb_grpc.KVCacheStub(ch).WatchEvents(pb.WatchEventsRequest(namespace=wire.ns_to_pb(NS)), timeout=10)
        # the call returns before the service registers the subscriber, and a page put before
        # that is never reported: probe pages go in until the first event comes
        probes, live = set(), threading.Event()

        def until_live():
            for i in range(100):
                if live.is_set():
                    return
                h, p = make_pages(NS, list(range(2000 + 4 * i, 2004 + 4 * i)))
                probes.update(h)
                c.put_pages(NS, p)
                live.wait(0.1)
        putter = threading.Thread(target=until_live, daemon=True)
        putter.start()
        first = next(stream)
        live.set()
        putter.join()
        assert first.kind == "stored" and first.hash in probes
        hashes, pages = make_pages(NS, list(range(900, 908)))
        c.put_pages(NS, pages)
        c.put_pages(NS.with_salt("elsewhere"), make_pages(NS.with_salt("elsewhere"), list(range(8)))[1])
        c.delete(NS, hashes[1:])
        events = []
        while len(events) < 3:
            e = next(stream)
            if e.hash not in probes:  # a probe put after the first event came
                events.append(e)
        stream.cancel()
    assert [(e.kind, e.hash, e.tier) for e in events] == [
        ("stored", hashes[0], "cpu"), ("stored", hashes[1], "cpu"), ("removed", hashes[1], "cpu")]
    assert all(e.namespace_root == NS.root for e in events)
    assert events[0].event_id < events[1].event_id < events[2].event_id


def test_put_messages_assembled_on_the_loop_and_on_a_thread_store_the_same(shared_server, client_factory):
    """PutPages assembles a small message on the event loop and a large one (or shared-memory
    frames) on a worker thread: both store the pages as sent, and a bad page fails either way."""
    import dataclasses

    from server import cache_service
    _, pages = make_pages(NS, list(range(4 * 100)), seed=5)
    assert len(pages) > cache_service.INLINE_PUT_FRAMES
    for salt, chunk in (("loop", 64), ("thread", 8 << 20)):  # 64 B: a frame a message; 8 MiB: all 100 in one
        ns = dataclasses.replace(NS, cache_salt=salt)
        _, mine = make_pages(ns, list(range(4 * 100)), seed=5)
        c = client_factory(shared_server.url, chunk_bytes=chunk)
        assert c.put_pages(ns, mine).stored == 100
        got = c.get_pages(ns, [p.hash for p in mine])
        assert len(got) == 100 and all(torch.equal(g.data, p.data) for g, p in zip(got, mine))
        c.delete(ns)
    # a payload changed after its checksum was taken: refused on the loop as on a thread
    ch = grpc.insecure_channel(f"127.0.0.1:{shared_server.port}")
    stub = pb_grpc.KVCacheStub(ch)
    for chunk in (64, 8 << 20):
        msgs = [pb.PutPagesRequest(namespace=wire.ns_to_pb(NS))] + list(
            wire.page_messages(pages, pb.PutPagesRequest, chunk_bytes=chunk))
        last = msgs[-1].frames[-1]
        last.data = bytes([last.data[0] ^ 1]) + last.data[1:]
        with pytest.raises(grpc.RpcError) as e:
            stub.PutPages(iter(msgs), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "checksum" in e.value.details()
    ch.close()
