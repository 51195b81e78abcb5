"""Bearer tokens and tenant isolation, TLS, bad input, oversized messages, and a wire fuzzer."""
import random
import subprocess

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvc import wire
from kvc.pb import pb, pb_grpc
from tests.kvc.conftest import NS, make_pages

TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    from .conftest import CacheServer
    s = CacheServer(tmp_path_factory.mktemp("auth"), auth_tokens=TOKENS, max_message_bytes=1 << 20).start()
    yield s
    s.stop()


@pytest.fixture
def stub(auth_server):
    ch = grpc.insecure_channel(f"127.0.0.1:{auth_server.port}")
    yield pb_grpc.KVCacheStub(ch)
    ch.close()


ALICE = (("authorization", "Bearer tok-alice"),)


def code_of(call, *args, **kw):
    try:
        call(*args, timeout=5, **kw)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_missing_or_bad_token_is_unauthenticated(auth_server, client_factory, stub):
    req = pb.LookupRequest(namespace=wire.ns_to_pb(NS), tokens=[1, 2, 3, 4])
    assert code_of(stub.Lookup, req)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub.Lookup, req, metadata=(("authorization", "Bearer nope"),))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub.Lookup, req, metadata=ALICE)[0] == grpc.StatusCode.OK
    with pytest.raises(PermissionError):
        client_factory(auth_server.url, token="wrong").lookup(NS, tokens=[1, 2, 3, 4])


def test_an_engine_with_a_refused_token_does_not_start_and_a_later_refusal_is_a_miss(auth_server, client_factory,
                                                                                    capsys):
    """`kvc serve` with a token the service refuses exits 2 naming the fix (before: it started, and
    the first request's PermissionError killed the engine loop for good). A client in the engine's
    mode answers a refusal as a miss."""
    import socket

    from server.cli import main
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rc = main(["serve", "--cache-url", auth_server.url, "--cache-token", "wrong", "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and "refused the token" in err and "--cache-token" in err, err
    good = client_factory(auth_server.url, token="tok-alice")
    assert good.probe() is True
    with pytest.raises(PermissionError):
        client_factory(auth_server.url, token="wrong", refused_token="miss").probe()
    engine_side = client_factory(auth_server.url, token="wrong", refused_token="miss")
    assert engine_side.lookup(NS, tokens=[1, 2, 3, 4]).num_pages == 0  # a miss, not an exception
    assert engine_side.put_pages(NS, make_pages(NS, list(range(8)))[1]).stored == 0
    assert client_factory("grpc://127.0.0.1:1", timeout=0.5).probe() is False  # nobody there


def test_tenants_are_isolated(auth_server, client_factory, stub):
    alice = client_factory(auth_server.url, token="tok-alice")
    bob = client_factory(auth_server.url, token="tok-bob")
    toks = list(range(3000, 3016))
    hashes, pages = make_pages(NS, toks)
    assert alice.put_pages(NS, pages).stored == 4
    r = alice.lookup(NS, tokens=toks)  # the same tenant hits ...
    assert r.num_pages == 4 and r.hashes == hashes
    got = alice.get_pages(NS, hashes)
    assert len(got) == 4 and all(torch.equal(a.data, b.data) and a.hash == b.hash for a, b in zip(got, pages))
    assert bob.lookup(NS, tokens=toks).num_pages == 0  # ... another does not
    assert bob.get_pages(NS, hashes) == []
    assert bob.delete(NS) == 0 and bob.delete(NS, hashes) == 0
    lease = alice.pin(NS, hashes)
    assert bob.unpin(lease) is False and alice.unpin(lease) is True
    # even with alice's service-side hashes on the raw API, bob reads nothing
    service_hashes = list(stub.Lookup(pb.LookupRequest(namespace=wire.ns_to_pb(NS), tokens=toks),
                                      metadata=ALICE, timeout=5).hashes)
    req = pb.GetPagesRequest(namespace=wire.ns_to_pb(NS), hashes=service_hashes)
    assert list(stub.GetPages(req, metadata=(("authorization", "Bearer tok-bob"),), timeout=5)) == []
    assert alice.lookup(NS, tokens=toks).num_pages == 4
    # a client-chosen salt cannot reach another tenant's keys either
    assert bob.lookup(NS.with_salt(NS.cache_salt), tokens=toks).num_pages == 0


def _bad_requests():
    ns = wire.ns_to_pb(NS)
    bad_spec = pb.Namespace(); bad_spec.CopyFrom(ns); bad_spec.spec.dtype = "float64"
    zero = pb.Namespace(); zero.CopyFrom(ns); zero.spec.num_layers = 0
    return [
        ("Lookup", pb.LookupRequest(tokens=[1]), "architecture"),
        ("Lookup", pb.LookupRequest(namespace=bad_spec, tokens=[1]), "dtype"),
        ("Lookup", pb.LookupRequest(namespace=zero, tokens=[1]), "num_layers"),
        ("Lookup", pb.LookupRequest(namespace=ns, hashes=[b"short"]), "16 bytes"),
        ("Pin", pb.PinRequest(namespace=ns, hashes=[b"x" * 16], ttl_s=-1), "ttl_s"),
        ("Delete", pb.DeleteRequest(namespace=ns, hashes=[b"x" * 16], whole_namespace=True), "not both"),
    ]


@pytest.mark.parametrize("method,req,reason", _bad_requests())
def test_invalid_requests_name_the_problem(stub, method, req, reason):
    code, details = code_of(getattr(stub, method), req, metadata=ALICE)
    assert code == INVALID and reason in details


def frames_of(page):
    return [f for m in wire.page_messages([page], pb.PutPagesRequest) for f in m.frames]


def _put_stream(frames_per_msg, ns=NS):
    yield pb.PutPagesRequest(namespace=wire.ns_to_pb(ns))
    for frames in frames_per_msg:
        yield pb.PutPagesRequest(frames=frames)


def test_bad_pages_are_rejected_and_change_nothing(auth_server, client_factory, stub):
    alice = client_factory(auth_server.url, token="tok-alice")
    toks = list(range(4000, 4016))
    hashes, pages = make_pages(NS, toks)
    good = [list(frames_of(p)) for p in pages]
    corrupt = [f for f in frames_of(pages[3])]
    corrupt[0].data = bytes(len(corrupt[0].data))  # payload no longer matches its checksum
    wrong_hash = list(frames_of(pages[3]))
    wrong_hash[0].header.hash = b"\1" * 16
    short = list(frames_of(pages[3]))
    short[0].data = short[0].data[:-4]
    cases = [(good[:3] + [corrupt], "checksum"), (good[:3] + [wrong_hash], "xxh3_128"),
             (good[:3] + [short], "ended inside"), ([good[0][0:1] + good[1]], None)]
    for msgs, reason in cases:
        code, details = code_of(stub.PutPages, _put_stream(msgs), metadata=ALICE)
        if reason is None:  # two headers in one message, fine: both pages are whole
            assert code == grpc.StatusCode.OK
            continue
        assert code == INVALID and reason in details, details
    assert code_of(stub.PutPages, iter([pb.PutPagesRequest(frames=good[0])]), metadata=ALICE)[0] == INVALID
    alice.delete(NS, hashes[:2])
    assert alice.lookup(NS, tokens=toks).num_pages == 0  # nothing of the rejected streams was stored


def test_oversized_message_is_resource_exhausted(stub):
    # 1.18 MB of varints: over the server's 1 MiB limit on the request itself (300,000 tokens made
    # 0.88 MB, and the refusal came from their reply instead)
    big = pb.LookupRequest(namespace=wire.ns_to_pb(NS), tokens=list(range(400_000)))
    assert code_of(stub.Lookup, big, metadata=ALICE)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_random_and_malformed_requests_leave_it_serving_and_unchanged(auth_server, client_factory):
    alice = client_factory(auth_server.url, token="tok-alice")
    toks = list(range(5000, 5032))
    hashes, pages = make_pages(NS, toks)
    alice.put_pages(NS, pages)
    before = alice.stats()
    rng = random.Random(1234)
    ch = grpc.insecure_channel(f"127.0.0.1:{auth_server.port}")
    ident = dict(request_serializer=None, response_deserializer=None)
    methods = [("Lookup", ch.unary_unary), ("Pin", ch.unary_unary), ("Unpin", ch.unary_unary),
               ("Delete", ch.unary_unary), ("Stats", ch.unary_unary), ("GetPages", ch.unary_stream),
               ("PutPages", ch.stream_unary)]
    valid_ns = wire.ns_to_pb(NS).SerializeToString()
    codes = {}
    for i in range(1000):
        name, kind = methods[i % len(methods)]
        call = kind(f"/kvc.v1.KVCache/{name}", **ident)
        body = rng.randbytes(rng.randrange(0, 200))
        if i % 3 == 0:  # a valid namespace field followed by junk
            body = b"\x0a" + bytes([len(valid_ns)]) + valid_ns + body
        md = ALICE if i % 2 else ()
        try:
            if name == "PutPages":
                call(iter([body, rng.randbytes(50)]), timeout=5, metadata=md)
            elif name == "GetPages":
                list(call(body, timeout=5, metadata=md))
            else:
                call(body, timeout=5, metadata=md)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        codes[code] = codes.get(code, 0) + 1
    ch.close()
    assert set(codes) <= {grpc.StatusCode.OK, INVALID, grpc.StatusCode.UNAUTHENTICATED}, codes
    assert codes.get(INVALID, 0) > 300  # most of them reached parsing and validation
    with grpc.insecure_channel(f"127.0.0.1:{auth_server.port}") as hc:
        st = health_pb2_grpc.HealthStub(hc).Check(health_pb2.HealthCheckRequest(service="kvc.v1.KVCache"), timeout=5)
    assert st.status == health_pb2.HealthCheckResponse.SERVING
    assert alice.stats()["tiers"] == before["tiers"]
    got = alice.get_pages(NS, hashes)
    assert len(got) == 8 and all(torch.equal(a.data, b.data) for a, b in zip(got, pages))


def test_tls(make_server, client_factory, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    s = make_server(tls_cert=str(cert), tls_key=str(key)).start()
    c = client_factory(f"grpcs://localhost:{s.port}", root_certificates=cert.read_bytes())
    hashes, pages = make_pages(NS, list(range(8)))
    assert c.put_pages(NS, pages).stored == 2
    assert len(c.get_pages(NS, hashes)) == 2
    plain = client_factory(f"grpc://127.0.0.1:{s.port}", timeout=1.0)
    assert plain.lookup(NS, tokens=list(range(8))).num_pages == 0  # a plaintext client gets nothing


def test_a_tenant_client_remembers_a_bounded_number_of_roots(auth_server, client_factory, monkeypatch):
    """One root a cache_salt: a client whose engine sees a salt a request kept every root's map (up
    to 2**18 pairs each) forever. Past the bound the least recently used is dropped, and its salt
    still hits: its next lookup learns the root again."""
    from kvc import client as client_mod
    monkeypatch.setattr(client_mod, "ROOTS_KEPT", 8)
    alice = client_factory(auth_server.url, token="tok-alice")
    toks = list(range(5000, 5008))
    first = NS.with_salt("salt-0")
    _, pages = make_pages(first, toks)
    assert alice.put_pages(first, pages).stored == 2
    for i in range(1, 30):
        alice.lookup(NS.with_salt(f"salt-{i}"), tokens=toks)
    assert len(alice._rebases) == 8
    assert first.root not in alice._rebases
    r = alice.lookup(first, tokens=toks)  # relearned
    assert r.num_pages == 2 and first.root in alice._rebases
    got = alice.get_pages(first, r.hashes)
    assert [g.hash for g in got] == [p.hash for p in pages]
    monkeypatch.setattr(client_mod, "PAIRS_KEPT", 3)  # the pairs' bound drops maps too
    alice.lookup(NS.with_salt("salt-x"), tokens=list(range(6000, 6016)))  # 4 pairs learned
    assert sum(len(x) for x in alice._rebases.values() if x is not None) <= 4
