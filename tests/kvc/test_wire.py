"""kvc.wire's hand-written encoding of the page-carrying messages against protobuf's own (its
page_messages builds them field by field through protobuf): the bytes it writes equal protobuf's
serialisation, what it reads equals protobuf's parse, on valid messages, unknown and repeated
fields, and corrupted ones (truncated, bytes changed)."""
import random

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError

from kvc import wire
from kvc.pb import pb
from tests.kvc.conftest import NS, make_pages


def pages_of(n, seed=0):
    toks = random.Random(seed).sample(range(1, 50_000), n * NS.spec.page_size)
    return make_pages(NS, toks)[1]


@pytest.mark.parametrize("cls", [pb.GetPagesResponse, pb.PutPagesRequest])
@pytest.mark.parametrize("chunk_bytes,max_frames,shm,messages", [
    (wire.CHUNK_BYTES, 256, False, 1),  # several pages a message
    (200, 256, False, 21),  # a page over several messages, a tail frame in each
    (4096, 2, False, 4),  # max_frames closes messages
    (wire.CHUNK_BYTES, 256, True, 1),
    (wire.CHUNK_BYTES, 3, True, 3),
])
def test_written_bytes_equal_protobufs(cls, chunk_bytes, max_frames, shm, messages):
    pages = pages_of(7)
    offsets = [i * 4096 + 7 for i in range(len(pages))] if shm else None
    ours = list(wire.page_wire(pages, wire.frames_field(cls), chunk_bytes, offsets, max_frames))
    ref = [m.SerializeToString() for m in wire.page_messages(pages, cls, chunk_bytes, offsets, max_frames)]
    assert len(ref) == messages
    assert ours == ref


def same(w: wire.WireMessage, m) -> None:
    """A message read by kvc.wire equals protobuf's parse of the same bytes."""
    assert len(w.frames) == len(m.frames)
    for a, b in zip(w.frames, m.frames):
        assert a.HasField("header") == b.HasField("header")
        if b.HasField("header"):
            assert a.header == b.header
        assert bytes(a.data) == b.data
        assert a.HasField("shm_offset") == b.HasField("shm_offset")
        if b.HasField("shm_offset"):
            assert a.shm_offset == b.shm_offset
    for fd in type(m).DESCRIPTOR.fields:
        if fd.name != "frames":
            assert w.HasField(fd.name) == m.HasField(fd.name)
            assert getattr(w, fd.name) == getattr(m, fd.name)


def put_request_bytes(pages, chunk=3000, shm=False):
    first = pb.PutPagesRequest(namespace=wire.ns_to_pb(NS))
    if shm:
        first.shm.name, first.shm.size = "kvc-x", 1 << 20
    body = b"".join(wire.page_wire(pages, wire.frames_field(pb.PutPagesRequest), chunk,
                                   [i * 100 for i in range(len(pages))] if shm else None))
    return first.SerializeToString() + body  # several messages concatenated: one message, merged


def test_reads_what_protobuf_reads():
    pages = pages_of(3, seed=1)
    for data in (put_request_bytes(pages), put_request_bytes(pages, shm=True)):
        same(wire.read_message(data, pb.PutPagesRequest), pb.PutPagesRequest.FromString(data))
    for data in wire.page_wire(pages, 1, 2000):
        same(wire.read_message(data, pb.GetPagesResponse), pb.GetPagesResponse.FromString(data))
    # unknown fields of every wire type (a group too), a header sent in two parts (merged), data
    # twice (the last wins), a known field with another wire type (unknown to protobuf), out of order
    frame = (b"\x12\x03abc" + b"\x0a\x12\x0a\x10" + b"h" * 16 + b"\x12\x02xy" + b"\x0a\x04\x20\x05\x28\x09"
             + b"\x18\x07" + b"\x08\x05" + b"\x19" + b"\0" * 8 + b"\x25" + b"\0" * 4 + b"\x3b\x08\x01\x3c"
             + b"\xa2\x06\x01z")
    data = (b"\x1a" + bytes([len(frame)]) + frame + b"\x08\x01" + b"\x0a\x05\x0a\x03abc" + b"\x1a\x00"
            + b"\x0a\x04\x22\x02xy")
    m = pb.PutPagesRequest.FromString(data)
    assert m.frames[0].header.payload_bytes == 9 and m.frames[0].data == b"xy" and m.frames[0].shm_offset == 7
    same(wire.read_message(data, pb.PutPagesRequest), m)


def test_nested_groups_past_the_limit_are_malformed():
    deep = b"\x0b" * (wire.MAX_GROUP_DEPTH + 1) + b"\x0c" * (wire.MAX_GROUP_DEPTH + 1)  # field 1 groups
    ok = b"\x0b" * wire.MAX_GROUP_DEPTH + b"\x0c" * wire.MAX_GROUP_DEPTH
    with pytest.raises(ValueError, match="nested deeper"):
        wire.read_message(b"\x7b" + deep[1:] + b"\x7c", pb.GetPagesResponse)  # under field 15
    assert wire.read_message(b"\x7b" + ok[1:-1] + b"\x7c", pb.GetPagesResponse).frames == []


def outcome(fn):
    try:
        return fn()
    except (ValueError, DecodeError) as e:
        return e


def test_corrupted_messages_read_as_protobuf_reads_them():
    """Every prefix of a message and random byte changes: kvc.wire raises ValueError exactly where
    protobuf's parser fails, and reads what it reads elsewhere."""
    data = put_request_bytes(pages_of(2, seed=2), chunk=200)
    rng = random.Random(5)
    cases = [data[:n] for n in range(len(data))]
    for _ in range(3000):
        b = bytearray(data[:rng.randrange(1, len(data) + 1)])
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(bytes(b))
    for case in cases:
        ref = outcome(lambda: pb.PutPagesRequest.FromString(case))
        got = outcome(lambda: wire.read_message(case, pb.PutPagesRequest))
        assert isinstance(got, Exception) == isinstance(ref, Exception), (case, ref, got)
        if isinstance(got, Exception):
            assert isinstance(got, ValueError)
        else:
            same(got, ref)


def test_assembled_pages_equal_the_sent_ones():
    pages = pages_of(5, seed=3)
    out = torch.empty((5, *NS.spec.shape), dtype=pages[0].data.dtype)
    for target in (None, out):
        asm = wire.PageAssembler(NS.spec, out=target, max_pages=5)
        for data in wire.page_wire(pages, 1, 1500):
            asm.add_all(wire.read_message(data, pb.GetPagesResponse).frames)
        got = asm.finish()
        assert [p.hash for p in got] == [p.hash for p in pages]
        assert all(torch.equal(a.data, b.data) for a, b in zip(got, pages))
        assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(got, pages))
    assert torch.equal(out, torch.stack([p.data for p in pages]))


def test_client_keeps_the_pages_before_a_malformed_answer(caplog):
    """A service whose GetPages answers one good message and then bytes that do not parse: the
    client returns the verified pages before them and logs the fault (no exception, no INTERNAL)."""
    from concurrent import futures

    import grpc

    from kvc.client import RemoteCache
    pages = pages_of(3, seed=4)

    def lookup(request, context):
        return pb.LookupResponse(root=NS.root)

    def get_pages(request, context):
        yield next(wire.page_wire(pages[:2], wire.frames_field(pb.GetPagesResponse)))
        yield b"\x0a\x7f\x0a"  # a frame of 127 bytes in a 3-byte message

    handlers = {"Lookup": grpc.unary_unary_rpc_method_handler(
                    lookup, request_deserializer=pb.LookupRequest.FromString,
                    response_serializer=pb.LookupResponse.SerializeToString),
                "GetPages": grpc.unary_stream_rpc_method_handler(
                    get_pages, request_deserializer=pb.GetPagesRequest.FromString, response_serializer=wire.as_bytes)}
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("kvc.v1.KVCache", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = RemoteCache(f"grpc://127.0.0.1:{port}", timeout=5.0)
        got = client.get_pages(NS, [p.hash for p in pages])
        client.close()
    finally:
        server.stop(0)
    assert [p.hash for p in got] == [p.hash for p in pages[:2]]
    assert all(torch.equal(a.data, b.data) for a, b in zip(got, pages))
    assert "malformed GetPagesResponse" in caplog.text
