"""Requests within server.max_message_bytes whose answer would not be."""
import grpc
import pytest

from kvc import wire
from kvc.hashing import Namespace, PageSpec
from kvc.pb import pb, pb_grpc

ONE_TOKEN_PAGES = Namespace("test-arch", PageSpec(num_layers=2, num_kv_heads=2, head_dim=4, page_size=1,
                                                  dtype="float32"), weights_digest="w0")


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    from .conftest import CacheServer
    s = CacheServer(tmp_path_factory.mktemp("limits"), max_message_bytes=1 << 20).start()
    yield s
    s.stop()


def lookup(server, n_tokens: int):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        req = pb.LookupRequest(namespace=wire.ns_to_pb(ONE_TOKEN_PAGES), tokens_u32le=b"\1\0\0\0" * n_tokens)
        return pb_grpc.KVCacheStub(ch).Lookup(req, timeout=30)


def test_a_lookup_whose_answer_could_pass_the_message_limit_is_refused_up_front(small_server):
    """60,000 one-token pages (a 240 KB request) answer at least 18 bytes a page: more than the
    1 MiB limit. The service refuses it before hashing (RESOURCE_EXHAUSTED, as for a request over
    the limit), naming the page count and the setting, with no traceback in its log (before: it
    hashed them all, failed to send "Sent message larger than max" and logged a traceback). A
    lookup of 30,000 is answered."""
    assert len(lookup(small_server, 30_000).hashes) == 30_000
    with pytest.raises(grpc.RpcError) as e:
        lookup(small_server, 60_000)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "60000 pages" in e.value.details() and "server.max_message_bytes = 1048576" in e.value.details()
    small_server.stop()
    assert "Traceback" not in small_server.log.read_text()
