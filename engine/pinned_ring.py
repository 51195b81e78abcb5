"""PinnedRing: one pinned host buffer of page slots that offered pages are copied into.

The engine's thread takes slots for each offer (a device-to-host copy on the put stream lands
there) and the put thread gives them back after the host tiers took the bytes. Puts are handled
in the order they were offered, so the slots live in FIFO order and a ring suffices: taking and
giving are O(1), and nothing is allocated (cudaHostAlloc takes milliseconds and the driver's
lock) on the engine's thread after the first offer. When the ring is full the offer is dropped.
"""
from __future__ import annotations

import threading
from collections import deque

import torch


class PinnedRing:
    def __init__(self, pages: int, page_shape: tuple, dtype: torch.dtype, pin: bool = True):
        if pages < 1:
            raise ValueError(f"a put buffer needs at least one page, got {pages}")
        self.buf = torch.empty((pages, *page_shape), dtype=dtype, pin_memory=pin)  # [pages, *page]
        self.pages = pages
        self._head = 0  # the slot after the newest taken run
        self._live: deque[tuple[int, int]] = deque()  # taken runs (start, n), oldest first
        self._lock = threading.Lock()

    def fits(self, page_shape: tuple, dtype: torch.dtype) -> bool:
        return tuple(self.buf.shape[1:]) == tuple(page_shape) and self.buf.dtype == dtype

    def _start(self, n: int) -> int | None:
        """Where take(n) would put its run now (under the lock), or None."""
        if not self._live:
            return 0 if n <= self.pages else None
        tail, head = self._live[0][0], self._head
        if head > tail:  # free: [head, pages) and [0, tail)
            return head if self.pages - head >= n else 0 if tail >= n else None
        return head if tail - head >= n else None  # free: [head, tail); head == tail: full

    def take(self, n: int) -> int | None:
        """The first slot of n adjacent free slots, or None when the ring lacks them."""
        with self._lock:
            start = self._start(n)
            if start is None:
                return None
            self._live.append((start, n))
            self._head = start + n
            return start

    def can_take(self, n: int) -> bool:
        """Whether take(n) would succeed now. Only the put thread gives slots back meanwhile (more
        room), so for the one thread that takes, a yes stays a yes until it takes."""
        with self._lock:
            return self._start(n) is not None

    def give(self, start: int) -> None:
        """Return the oldest taken run (its first slot is `start`)."""
        with self._lock:
            if not self._live or self._live[0][0] != start:
                raise RuntimeError(f"put buffer slots returned out of order: {start}, oldest {self._live[0] if self._live else None}")
            self._live.popleft()

    def untake(self, start: int) -> None:
        """Return the newest taken run (an offer that was dropped after taking it)."""
        with self._lock:
            if not self._live or self._live[-1][0] != start:
                raise RuntimeError(f"put buffer slots untaken out of order: {start}")
            self._live.pop()
            self._head = start

    @property
    def used(self) -> int:
        with self._lock:
            return sum(n for _, n in self._live)
