from __future__ import annotations

import threading

import pytest
import torch

from kvc.backend import LookupResult, PutResult
from kvc.hashing import page_hashes

from engine.tiny import make_tiny_model


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("qwen"), "qwen3_moe", seed=0)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("mixtral"), "mixtral", seed=0)


@pytest.fixture(params=["qwen3_moe", "mixtral"])
def model_dir(request, qwen_dir, mixtral_dir):
    return qwen_dir if request.param == "qwen3_moe" else mixtral_dir


class DictCache:
    """A small in-memory CacheBackend for the host-tier tests (kvc.store is not in the tree yet)."""

    def __init__(self):
        self.pages: dict[tuple[bytes, bytes], object] = {}
        self.lock = threading.Lock()
        self.gets = 0

    def lookup(self, ns, tokens=None, hashes=None):
        if hashes is None:
            hashes = page_hashes(ns.root, tokens, ns.spec.page_size)
        n = 0
        with self.lock:
            while n < len(hashes) and (ns.root, hashes[n]) in self.pages:
                n += 1
        return LookupResult(list(hashes), {"cpu": n}, ["cpu"] * n)

    def get_pages(self, ns, hashes, out=None):
        self.gets += 1
        got = []
        with self.lock:
            for h in hashes:
                p = self.pages.get((ns.root, h))
                if p is None:
                    break
                got.append(p)
        return got

    def put_pages(self, ns, pages):
        with self.lock:
            for p in pages:
                p.check(ns.spec)
                self.pages[(ns.root, p.hash)] = p
        return PutResult(stored=len(pages))

    def pin(self, ns, hashes, ttl_s=None):
        return "lease"

    def unpin(self, lease_id):
        return True

    def delete(self, ns, hashes=None):
        return 0

    def stats(self):
        return {"pages": len(self.pages)}

    def close(self):
        pass
