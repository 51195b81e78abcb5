"""A structure-aware fuzzer for kvc.v1.KVCache: valid requests mutated one field at a time.

Each case starts from a well-formed request (a PutPages stream of a 3-page chain, a Lookup, a
GetPages, a Pin, a Delete) and changes one thing: a spec dimension or dtype, a hash or parent
(flipped byte, wrong length, another chain's), a token (changed, dropped, added), the
checksum, payload_bytes, the data (cut, extended, flipped), the frames (swapped, duplicated,
dropped, data before header, namespace repeated), or a scalar (NaN/inf/negative TTL, odd
tokens_u32le length, hashes and whole_namespace together). The service must answer OK or a
client error, never INTERNAL / UNKNOWN / UNAVAILABLE, and a rejected call changes nothing.
"""
from __future__ import annotations

import copy
import math
import random

import grpc
import numpy as np
import torch

from kvc import wire
from kvc.hashing import Namespace, PageSpec, page_hashes
from kvc.pb import pb
from kvc.record import Page

SPEC = PageSpec(num_layers=2, num_kv_heads=2, head_dim=16, page_size=8, dtype="float16")  # 2 KiB pages
NS = Namespace("fuzz-arch", SPEC, weights_digest="w")
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND}


def chain(rng: random.Random, n: int = 3, ns: Namespace = NS) -> list[Page]:
    toks = [rng.randrange(1, 50_000) for _ in range(n * SPEC.page_size)]
    pages, parent = [], ns.root
    g = torch.Generator().manual_seed(rng.randrange(1 << 31))
    for i, h in enumerate(page_hashes(ns.root, toks, SPEC.page_size)):
        pages.append(Page(h, parent, np.asarray(toks[i * SPEC.page_size:(i + 1) * SPEC.page_size], np.uint32),
                          torch.randn(SPEC.shape, generator=g).half()))
        parent = h
    return pages


def put_messages(pages: list[Page], ns: Namespace = NS, chunk: int = 1024) -> list[pb.PutPagesRequest]:
    """A PutPages stream with one frame per message (so frames can be reordered one by one)."""
    msgs = [pb.PutPagesRequest(namespace=wire.ns_to_pb(ns))]
    for m in wire.page_messages(pages, pb.PutPagesRequest, chunk_bytes=chunk):
        for f in m.frames:
            msgs.append(pb.PutPagesRequest(frames=[f]))
    return msgs


def _flip(b: bytes, rng: random.Random) -> bytes:
    if not b:
        return b"\x01"
    i = rng.randrange(len(b))
    return b[:i] + bytes([b[i] ^ (1 << rng.randrange(8))]) + b[i + 1:]


SPEC_FIELDS = {"num_layers": [0, 1, 3, 1 << 20, 2 ** 32 - 1], "num_kv_heads": [0, 1, 3, 1 << 16],
               "head_dim": [0, 1, 15, 1 << 20], "page_size": [0, 1, 7, 16, 1 << 20],
               "dtype": ["", "float64", "int8", "bfloat16", "float32", "\u00e9", "x" * 300],
               "kv_parts": [0, 1, 3, 1 << 30]}


def mutate_put(msgs: list[pb.PutPagesRequest], rng: random.Random, other: list[Page]) -> tuple[str, list]:
    msgs = [copy.deepcopy(m) for m in msgs]
    headers = [i for i, m in enumerate(msgs) if m.frames and m.frames[0].HasField("header")]
    datas = [i for i, m in enumerate(msgs) if m.frames and m.frames[0].data]
    kind = rng.choice(["spec", "hash", "parent", "token", "checksum", "payload_bytes", "data", "order",
                       "namespace_again", "no_namespace", "shm_offset", "empty_frames", "arch"])
    h = msgs[rng.choice(headers)].frames[0].header
    if kind == "spec":
        f = rng.choice(list(SPEC_FIELDS))
        setattr(msgs[0].namespace.spec, f, rng.choice(SPEC_FIELDS[f]))
        kind = f"spec.{f}"
    elif kind == "hash":
        h.hash = rng.choice([_flip(h.hash, rng), h.hash[:15], h.hash + b"\0", b"", other[0].hash])
    elif kind == "parent":
        h.parent = rng.choice([_flip(h.parent, rng), h.parent[:8], b"", other[-1].hash, other[0].parent])
    elif kind == "token":
        op = rng.randrange(4)
        if op == 0:
            h.tokens[rng.randrange(len(h.tokens))] ^= 1 << rng.randrange(32)
        elif op == 1:
            del h.tokens[rng.randrange(len(h.tokens))]
        elif op == 2:
            h.tokens.append(rng.randrange(1 << 32))
        else:
            del h.tokens[:]
    elif kind == "checksum":
        h.checksum = rng.choice([(h.checksum + 1) % (1 << 64), 0, (1 << 64) - 1])
    elif kind == "payload_bytes":
        h.payload_bytes = rng.choice([0, h.payload_bytes - 1, h.payload_bytes + 1, 1 << 40, (1 << 64) - 1])
    elif kind == "data":
        f = msgs[rng.choice(datas)].frames[0]
        f.data = rng.choice([f.data[:-1], f.data + b"\0", _flip(f.data, rng), b"", f.data * 2])
    elif kind == "order":
        op = rng.randrange(3)
        i, j = rng.sample(range(1, len(msgs)), 2)
        if op == 0:
            msgs[i], msgs[j] = msgs[j], msgs[i]
        elif op == 1:
            msgs.insert(j, copy.deepcopy(msgs[i]))
        else:
            del msgs[i]
        kind = ["order.swap", "order.duplicate", "order.drop"][op]
    elif kind == "namespace_again":
        msgs[rng.randrange(1, len(msgs))].namespace.CopyFrom(msgs[0].namespace)
    elif kind == "no_namespace":
        msgs[0].ClearField("namespace")
    elif kind == "shm_offset":
        msgs[rng.choice(headers)].frames[0].shm_offset = rng.choice([0, 1 << 40])
    elif kind == "empty_frames":
        msgs.insert(rng.randrange(1, len(msgs)), pb.PutPagesRequest(frames=[pb.PageFrame()]))
    elif kind == "arch":
        msgs[0].namespace.architecture = rng.choice(["", "\0", "a" * 100_000])
    return kind, msgs


def unary_case(rng: random.Random, pages: list[Page]):
    """(method name, request, kind) for a mutated unary or server-streaming call."""
    nsb = wire.ns_to_pb(NS)
    hashes = [p.hash for p in pages]
    kind = rng.choice(["lookup.u32le", "lookup.both", "lookup.hashlen", "lookup.mismatch", "lookup.huge",
                       "get.hashlen", "get.many", "get.spec", "pin.ttl", "pin.hashlen", "delete.both",
                       "unpin.id", "watch.spec"])
    if kind == "lookup.u32le":
        return "Lookup", pb.LookupRequest(namespace=nsb, tokens_u32le=b"\1" * rng.choice([1, 2, 3, 5, 7])), kind
    if kind == "lookup.both":
        return "Lookup", pb.LookupRequest(namespace=nsb, tokens=[1, 2], tokens_u32le=b"\1\0\0\0"), kind
    if kind == "lookup.hashlen":
        return "Lookup", pb.LookupRequest(namespace=nsb, hashes=[h[:rng.randrange(16)] for h in hashes]), kind
    if kind == "lookup.mismatch":
        return "Lookup", pb.LookupRequest(namespace=nsb, hashes=hashes, tokens=list(range(SPEC.page_size))), kind
    if kind == "lookup.huge":
        return "Lookup", pb.LookupRequest(namespace=nsb, tokens_u32le=bytes(4 * rng.choice([1 << 16, 1 << 20]))), kind
    if kind == "get.hashlen":
        return "GetPages", pb.GetPagesRequest(namespace=nsb, hashes=[b"\0" * rng.choice([0, 1, 15, 17, 64])]), kind
    if kind == "get.many":
        return "GetPages", pb.GetPagesRequest(namespace=nsb, hashes=[_flip(hashes[0], rng)] * 5000), kind
    if kind == "get.spec":
        bad = copy.deepcopy(nsb)
        f = rng.choice(list(SPEC_FIELDS))
        setattr(bad.spec, f, rng.choice(SPEC_FIELDS[f]))
        return "GetPages", pb.GetPagesRequest(namespace=bad, hashes=hashes), kind
    if kind == "pin.ttl":
        return "Pin", pb.PinRequest(namespace=nsb, hashes=hashes,
                                    ttl_s=rng.choice([-1.0, math.nan, math.inf, 1e308, 1e-300])), kind
    if kind == "pin.hashlen":
        return "Pin", pb.PinRequest(namespace=nsb, hashes=[b"x"], ttl_s=1.0), kind
    if kind == "delete.both":
        return "Delete", pb.DeleteRequest(namespace=nsb, hashes=hashes, whole_namespace=True), kind
    if kind == "unpin.id":
        return "Unpin", pb.UnpinRequest(lease_id=rng.choice(["", ".", "\u00e9.\u00e9", "a" * 10_000 + ".b"])), kind
    bad = copy.deepcopy(nsb)
    bad.spec.page_size = 0
    return "WatchEvents", pb.WatchEventsRequest(namespace=bad), kind


def stored_state(stub) -> tuple:
    """What a rejected call must not change: the page counts of every tier."""
    from google.protobuf.json_format import MessageToDict
    tiers = MessageToDict(stub.Stats(pb.StatsRequest(), timeout=30).stats)["tiers"]
    return tuple(sorted((k, v.get("pages")) for k, v in tiers.items()))


def run_fuzz(stub, cases: int, seed: int) -> dict:
    """Returns counts by outcome; raises AssertionError naming the case on a violation."""
    rng = random.Random(seed)
    base = chain(rng)
    other = chain(rng)
    assert stub.PutPages(iter(put_messages(other)), timeout=30).stored == 3
    counts: dict[str, int] = {}
    state = stored_state(stub)
    for case in range(cases):
        if rng.random() < 0.6:
            pages = chain(rng)
            kind, msgs = mutate_put(put_messages(pages), rng, other)
            method = "PutPages"
            call = lambda: stub.PutPages(iter(msgs), timeout=30)  # noqa: E731
        else:
            method, req, kind = unary_case(rng, base)
            fn = getattr(stub, method)
            call = (lambda: list(fn(req, timeout=30))) if method in ("GetPages", "WatchEvents") else \
                (lambda: fn(req, timeout=30))
            if method == "WatchEvents":
                call = lambda: next(iter(fn(req, timeout=2)), None)  # noqa: E731
        try:
            call()
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            assert code in CLIENT_ERRORS, f"seed {seed} case {case} {method}/{kind}: {code} {e.details()}"
            assert e.details(), f"seed {seed} case {case} {method}/{kind}: {code} without a message"
        counts[f"{code.name}"] = counts.get(code.name, 0) + 1
        if method in ("PutPages", "Delete") or case % 50 == 0:
            now = stored_state(stub)
            if code != grpc.StatusCode.OK:
                assert now == state, f"seed {seed} case {case} {method}/{kind} was rejected ({code}) " \
                                     f"but changed the store: {state} -> {now}"
            state = now
    return counts
