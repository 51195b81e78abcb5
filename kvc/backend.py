"""CacheBackend: the one protocol both sides of the process boundary speak.

`TieredStore` implements it in-process; `kvc.client.RemoteCache` implements it over gRPC. The
engine cannot tell which one it has, and the same test suite runs against both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch

from .hashing import Namespace
from .record import Page

TIERS = ("device", "cpu", "disk", "cluster")


class PinBudgetExceeded(Exception):
    """A pin that would take its owner past kvc.pin_budget_fraction (gRPC: RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class LookupResult:
    """The answer to "how much of this prompt is cached".

    hashes:  the chained hashes of the query's full pages.
    tiers:   per tier, the number of leading pages it holds contiguously (tier -> pages).
    located: for each page of the longest contiguous hit over all tiers, the fastest tier that
             holds it; len(located) is the hit in pages.
    """
    hashes: list[bytes]
    tiers: dict[str, int] = field(default_factory=dict)
    located: list[str] = field(default_factory=list)

    @property
    def num_pages(self) -> int:
        return len(self.located)

    def hit_tokens(self, page_size: int) -> int:
        return self.num_pages * page_size


# a put's reason for a page whose parent is neither the namespace's root nor one of its pages
# (the store writes it; a tenant client reads it as "the service's root may have changed")
BAD_PARENT_TAIL = "is not a page of this namespace"
BAD_PARENT = "parent of page {} " + BAD_PARENT_TAIL


@dataclass(frozen=True)
class PutResult:
    stored: int = 0
    duplicate: int = 0
    rejected: int = 0
    reasons: tuple[str, ...] = ()

    def __add__(self, other: "PutResult") -> "PutResult":
        return PutResult(self.stored + other.stored, self.duplicate + other.duplicate,
                         self.rejected + other.rejected, self.reasons + other.reasons)


@runtime_checkable
class CacheBackend(Protocol):
    def lookup(self, ns: Namespace, tokens: Sequence[int] | None = None,
               hashes: Sequence[bytes] | None = None) -> LookupResult:
        """Per-tier contiguous hits for a prompt (tokens) or for precomputed page hashes.

        With tokens, every hit page's stored parent hash and token ids are compared with the
        query's; with hashes only, the parent chain is compared.
        """

    def get_pages(self, ns: Namespace, hashes: Sequence[bytes],
                  out: torch.Tensor | None = None) -> list[Page]:
        """The pages for `hashes`, in order, stopping at the first one it cannot return.

        A page whose checksum fails is dropped and ends the run (never wrong bytes). When `out`
        ([n, *spec.shape] on any device: a pinned staging buffer, or a CUDA buffer that the
        store fills straight from its pinned slab) is given, payloads land in out[i].
        """

    def put_pages(self, ns: Namespace, pages: Sequence[Page], chain_continues: bool = False) -> PutResult:
        """Store full pages; a page already held is a duplicate, a bad or colliding one rejected.

        chain_continues: the caller's next call carries more pages of the same chain (one offer
        cut into small calls); a store may leave the chain's LRU order to that call.
        """

    def pin(self, ns: Namespace, hashes: Sequence[bytes], ttl_s: float | None = None) -> str:
        """Protect pages from eviction until unpin or the lease's TTL; returns the lease id."""

    def unpin(self, lease_id: str) -> bool:
        """Release a lease; False when it had already expired or never existed."""

    def delete(self, ns: Namespace, hashes: Sequence[bytes] | None = None) -> int:
        """Drop the given pages, or the whole namespace when hashes is None; returns pages dropped."""

    def stats(self) -> dict:
        """Per-tier capacity, usage and page counts, and the store's counters."""

    def close(self) -> None:
        ...
