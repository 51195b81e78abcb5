"""The CacheBackend test suite: the same tests run against TieredStore and the gRPC client.

A test module subclasses `BackendSuite` and provides a `backend` fixture (a fresh, empty
CacheBackend) that the tests use through the protocol only.
"""
import numpy as np
import pytest
import torch

from kvc.backend import CacheBackend
from kvc.hashing import Namespace, PageSpec

from .conftest import NS, SPEC, make_pages


class BackendSuite:
    def test_is_a_cache_backend(self, backend):
        assert isinstance(backend, CacheBackend)

    def test_miss_on_empty(self, backend):
        r = backend.lookup(NS, tokens=list(range(20)))
        assert r.num_pages == 0 and len(r.hashes) == 5
        assert backend.get_pages(NS, r.hashes) == []

    def test_put_lookup_get_roundtrip(self, backend):
        toks = list(range(100, 122))  # 5 full pages + 2 tokens
        hashes, pages = make_pages(NS, toks)
        res = backend.put_pages(NS, pages)
        assert (res.stored, res.duplicate, res.rejected) == (5, 0, 0)
        r = backend.lookup(NS, tokens=toks)
        assert r.hashes == hashes and r.num_pages == 5
        got = backend.get_pages(NS, hashes)
        assert [p.hash for p in got] == hashes
        for a, b in zip(got, pages):
            assert torch.equal(a.data, b.data)
            assert a.parent == b.parent and list(a.tokens) == list(b.tokens)

    def test_put_twice_is_duplicate(self, backend):
        _, pages = make_pages(NS, list(range(8)))
        backend.put_pages(NS, pages)
        res = backend.put_pages(NS, pages)
        assert (res.stored, res.duplicate) == (0, 2)

    def test_lookup_by_hashes(self, backend):
        hashes, pages = make_pages(NS, list(range(16)))
        backend.put_pages(NS, pages[:3])
        r = backend.lookup(NS, hashes=hashes)
        assert r.num_pages == 3

    def test_prefix_hit_stops_at_divergence(self, backend):
        a = list(range(16))
        b = a[:8] + [999] * 8
        _, pages = make_pages(NS, a)
        backend.put_pages(NS, pages)
        assert backend.lookup(NS, tokens=b).num_pages == 2

    def test_get_into_out_buffer(self, backend):
        hashes, pages = make_pages(NS, list(range(12)))
        backend.put_pages(NS, pages)
        out = torch.zeros((4, *SPEC.shape))
        got = backend.get_pages(NS, hashes, out=out)
        assert len(got) == 3
        for i in range(3):
            assert torch.equal(out[i], pages[i].data)

    def test_get_stops_at_first_missing(self, backend):
        hashes, pages = make_pages(NS, list(range(16)))
        backend.put_pages(NS, [pages[0], pages[1], pages[3]])
        assert len(backend.get_pages(NS, hashes)) == 2

    def test_salts_are_disjoint(self, backend):
        toks = list(range(8))
        ns_a, ns_b = NS.with_salt("tenant-a"), NS.with_salt("tenant-b")
        _, pages = make_pages(ns_a, toks)
        backend.put_pages(ns_a, pages)
        assert backend.lookup(ns_a, tokens=toks).num_pages == 2
        assert backend.lookup(ns_b, tokens=toks).num_pages == 0
        assert backend.lookup(NS, tokens=toks).num_pages == 0

    def test_wrong_shape_rejected_and_nothing_stored(self, backend):
        hashes, pages = make_pages(NS, list(range(8)))
        pages[1].data = torch.zeros(3)
        with pytest.raises(ValueError, match="shape"):
            backend.put_pages(NS, pages)
        assert backend.lookup(NS, hashes=hashes).num_pages == 0

    def test_wrong_dtype_rejected(self, backend):
        _, pages = make_pages(NS, list(range(4)))
        pages[0].data = pages[0].data.to(torch.float16)
        with pytest.raises(ValueError, match="dtype"):
            backend.put_pages(NS, pages)

    def test_hash_not_matching_content_rejected(self, backend):
        _, pages = make_pages(NS, list(range(8)))
        pages[1].tokens = np.asarray([7, 7, 7, 7], dtype=np.uint32)
        with pytest.raises(ValueError, match="hash"):
            backend.put_pages(NS, pages)

    def test_bf16_pages(self, backend):
        ns = Namespace("bf16-arch", PageSpec(2, 1, 8, 4, "bfloat16"))
        hashes, pages = make_pages(ns, list(range(8)))
        backend.put_pages(ns, pages)
        got = backend.get_pages(ns, hashes)
        assert len(got) == 2 and got[0].data.dtype == torch.bfloat16
        assert torch.equal(got[1].data, pages[1].data)

    def test_delete_prefix_and_namespace(self, backend):
        hashes, pages = make_pages(NS, list(range(16)))
        backend.put_pages(NS, pages)
        other = NS.with_salt("other")
        ohashes, opages = make_pages(other, list(range(16)))
        backend.put_pages(other, opages)
        assert backend.delete(NS, hashes[2:]) == 2
        assert backend.lookup(NS, hashes=hashes).num_pages == 2
        assert backend.delete(NS) == 2
        assert backend.lookup(NS, hashes=hashes).num_pages == 0
        assert backend.lookup(other, hashes=ohashes).num_pages == 4
        # deleting another namespace's hashes under this namespace drops nothing
        assert backend.delete(NS, ohashes) == 0

    def test_pin_unpin(self, backend):
        hashes, pages = make_pages(NS, list(range(8)))
        backend.put_pages(NS, pages)
        lease = backend.pin(NS, hashes, ttl_s=30)
        assert isinstance(lease, str) and lease
        assert backend.unpin(lease) is True
        assert backend.unpin(lease) is False

    def test_stats(self, backend):
        _, pages = make_pages(NS, list(range(8)))
        backend.put_pages(NS, pages)
        st = backend.stats()
        assert st["tiers"]["cpu"]["pages"] == 2
        assert st["tiers"]["cpu"]["used_bytes"] == 2 * SPEC.page_bytes
