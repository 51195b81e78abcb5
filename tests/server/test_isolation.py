"""Hostile tenants against `kvc cache-server` (issue 13): grafts onto another namespace's chain,
lease ids that are not ours, pins that never end, pages too small to index."""
import stat

import grpc
import numpy as np
import pytest
import torch

from kvc import wire
from kvc.config import ConfigError, load_config
from kvc.hashing import chain_hash, page_hashes
from kvc.pb import pb, pb_grpc
from kvc.record import Page
from server.tenant_secret import load_tenant_secret
from tests.kvc.conftest import NS, make_pages

TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}
ALICE = (("authorization", "Bearer tok-alice"),)
BOB = (("authorization", "Bearer tok-bob"),)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from .conftest import CacheServer
    s = CacheServer(tmp_path_factory.mktemp("iso"), auth_tokens=TOKENS).start()
    yield s
    s.stop()


@pytest.fixture
def stub(server):
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.KVCacheStub(ch)
    ch.close()


def code_of(call, *args, **kw):
    try:
        return grpc.StatusCode.OK, call(*args, timeout=5, **kw)
    except grpc.RpcError as e:
        return e.code(), e.details()


@pytest.mark.parametrize("lease_id", ["é", "abc.é", "ü.ü", "\u2603" * 40, "a.b\x00c"])
def test_unpin_of_a_foreign_lease_id_is_not_internal(stub, lease_id):
    code, resp = code_of(stub.Unpin, pb.UnpinRequest(lease_id=lease_id), metadata=ALICE)
    assert code == grpc.StatusCode.OK and resp.released is False


def test_a_lease_works_only_for_its_tenant(stub):
    ns = wire.ns_to_pb(NS)
    lease = stub.Pin(pb.PinRequest(namespace=ns, hashes=[bytes(16)]), metadata=ALICE, timeout=5).lease_id
    assert stub.Unpin(pb.UnpinRequest(lease_id=lease), metadata=BOB, timeout=5).released is False
    assert stub.Unpin(pb.UnpinRequest(lease_id=lease), metadata=ALICE, timeout=5).released is True


def put_raw(stub, pages, metadata):
    msgs = [pb.PutPagesRequest(namespace=wire.ns_to_pb(NS)), *wire.page_messages(pages, pb.PutPagesRequest)]
    return stub.PutPages(iter(msgs), metadata=metadata, timeout=5)


def test_a_tenant_cannot_graft_a_page_onto_another_tenants_chain(server, client_factory, stub):
    alice = client_factory(server.url, token="tok-alice")
    toks = list(range(5000, 5020))  # 5 pages
    hashes, pages = make_pages(NS, toks)
    assert alice.put_pages(NS, pages[:4]).stored == 4
    # the worst case: bob has learned alice's service-side hashes
    r = stub.Lookup(pb.LookupRequest(namespace=wire.ns_to_pb(NS), tokens_u32le=np.asarray(toks, "<u4").tobytes()),
                    metadata=ALICE, timeout=5)
    assert r.located == ["cpu"] * 4
    last, tail = r.hashes[3], np.asarray(toks[16:], dtype=np.uint32)
    forged = Page(chain_hash(last, tail.astype("<u4").tobytes()), last, tail, torch.zeros(NS.spec.shape))
    resp = put_raw(stub, [forged], BOB)
    assert (resp.stored, resp.rejected) == (0, 1)
    assert alice.lookup(NS, tokens=toks).num_pages == 4  # alice counts only what alice stored
    assert alice.put_pages(NS, pages).stored == 1  # and her own fifth page is no "collision"
    got = alice.get_pages(NS, hashes)
    assert len(got) == 5 and torch.equal(got[4].data, pages[4].data)


def test_tenant_salts_are_keyed_with_the_service_secret(server, stub):
    r = stub.Lookup(pb.LookupRequest(namespace=wire.ns_to_pb(NS), tokens_u32le=bytes(64)), metadata=ALICE,
                    timeout=5)
    for guess in ("tenant:5:alice:", "alice", "tok-alice", ""):  # salts a tenant could compute
        assert NS.with_salt(guess).root != r.root
        assert page_hashes(NS.with_salt(guess).root, [0] * 16, NS.spec.page_size)[0] != r.hashes[0]
    path = server.disk_path / "tenant-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_tenant_secret_is_created_once_private_and_overridable(tmp_path):
    config = load_config(None, disk_path=str(tmp_path / "pages"))
    first = load_tenant_secret(config, environ={})
    assert load_tenant_secret(config, environ={}) == first and len(first) >= 32
    assert stat.S_IMODE((tmp_path / "pages" / "tenant-secret").stat().st_mode) == 0o600
    assert load_tenant_secret(config, environ={"KVC_TENANT_SECRET": "x" * 20}) == b"x" * 20
    with pytest.raises(ConfigError, match="at least"):
        load_tenant_secret(config, environ={"KVC_TENANT_SECRET": "short"})
    (tmp_path / "pages" / "tenant-secret").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_tenant_secret(config, environ={})
    assert load_tenant_secret(load_config(None, disk_path=None), environ={}) != first  # per process


def test_pins_over_the_tenant_budget_are_resource_exhausted(make_server, client_factory):
    s = make_server(auth_tokens=TOKENS, kvc={"pin_budget_fraction": 1e-4}).start()  # about 2 KB
    alice = client_factory(s.url, token="tok-alice")
    hashes, pages = make_pages(NS, list(range(40)))  # 10 pages of 512 B
    assert alice.put_pages(NS, pages).stored == 10
    with grpc.insecure_channel(f"127.0.0.1:{s.port}") as ch:
        stub = pb_grpc.KVCacheStub(ch)
        service_hashes = stub.Lookup(pb.LookupRequest(namespace=wire.ns_to_pb(NS), tokens=list(range(40))),
                                     metadata=ALICE, timeout=5).hashes
        pin = pb.PinRequest(namespace=wire.ns_to_pb(NS), hashes=service_hashes, ttl_s=float("inf"))
        code, details = code_of(stub.Pin, pin, metadata=ALICE)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "pin_budget_fraction" in details
        pin = pb.PinRequest(namespace=wire.ns_to_pb(NS), hashes=service_hashes[:2], ttl_s=float("inf"))
        assert code_of(stub.Pin, pin, metadata=ALICE)[0] == grpc.StatusCode.OK  # inf: cut to the ceiling
    assert alice.pin(NS, hashes) == ""  # the client: no lease, and no back-off
    assert alice.lookup(NS, tokens=list(range(40))).num_pages == 10
