"""Hostile tenants against `kvc cache-server` (issue 13): grafts onto another namespace's chain,
lease ids that are not ours, pins that never end, pages too small to index."""
import grpc
import pytest

from kvc import wire
from kvc.pb import pb, pb_grpc
from tests.kvc.conftest import NS

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
