"""kill -9 of the service in the middle of PutPages, then restart: never a partial or wrong page."""
import random
import signal
import threading
import time

import grpc
import pytest
import torch

from kvc import wire
from kvc.hashing import Namespace, PageSpec
from kvc.pb import pb, pb_grpc
from tests.kvc.conftest import make_pages

BIG = Namespace("crash-arch", PageSpec(num_layers=4, num_kv_heads=4, head_dim=64, page_size=16, dtype="float32"))


def _check_served(client, ns, toks, pages) -> int:
    """Every page the service serves for this prompt is byte-exact; returns how many it has."""
    r = client.lookup(ns, tokens=toks)
    got = client.get_pages(ns, r.hashes[:r.num_pages])
    assert len(got) == r.num_pages
    for a, b in zip(got, pages):
        assert a.hash == b.hash and a.parent == b.parent and list(a.tokens) == list(b.tokens)
        assert torch.equal(a.data, b.data)
    return r.num_pages


@pytest.mark.parametrize("rounds", [2, pytest.param(10, marks=pytest.mark.slow)])
def test_kill_during_put_never_serves_partial_or_wrong_pages(make_server, client_factory, rounds):
    rng = random.Random(7)
    s = make_server(kvc={"disk_write": "through"}).start()
    done = {}
    for it in range(rounds):
        acked_toks = list(range(it * 1000, it * 1000 + 64))
        _, acked = make_pages(BIG, acked_toks, seed=it)
        c = client_factory(s.url, timeout=5.0)
        assert c.put_pages(BIG, acked).stored == 4
        assert c.stats()["tiers"]["disk"]["synced"] is True  # the durability point: these must survive
        done[it] = (acked_toks, acked)
        # a slow stream that the kill interrupts: its pages must never appear
        cut_toks = list(range(50_000 + it * 1000, 50_000 + it * 1000 + 16 * 12))
        _, cut = make_pages(BIG, cut_toks, seed=100 + it)
        kill_after = rng.randrange(1, len(cut))
        sent = threading.Event()

        def stream():
            yield pb.PutPagesRequest(namespace=wire.ns_to_pb(BIG))
            for i, p in enumerate(cut):
                yield from wire.page_messages([p], pb.PutPagesRequest, chunk_bytes=64 << 10)
                if i + 1 == kill_after:
                    sent.set()
                time.sleep(0.02)

        ch = grpc.insecure_channel(f"127.0.0.1:{s.port}")
        errors = []
        t = threading.Thread(target=lambda: _call(pb_grpc.KVCacheStub(ch).PutPages, stream(), errors))
        t.start()
        assert sent.wait(10)
        s.stop(signal.SIGKILL)
        t.join(10)
        ch.close()
        assert errors and errors[0] == grpc.StatusCode.UNAVAILABLE
        s.start()
        c = client_factory(s.url, timeout=5.0)
        assert _check_served(c, BIG, cut_toks, cut) == 0
        for toks, pages in done.values():  # acked and synced before the kill: present and exact
            assert _check_served(c, BIG, toks, pages) == len(pages)


def _call(fn, it, errors):
    try:
        fn(it, timeout=20)
        errors.append(grpc.StatusCode.OK)
    except grpc.RpcError as e:
        errors.append(e.code())
