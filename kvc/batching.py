"""The writer threads' batching: one item, then whatever else their queue holds right now."""
from __future__ import annotations

import queue
from typing import Callable


def take_batch(q: queue.Queue, first, max_items: int, max_bytes: int, size: Callable[[object], int]) -> list:
    """`first` and the items queued behind it, up to max_items items or max_bytes (by `size`).
    A stop marker (None) ends the batch and is put back, so the writer's loop sees it next."""
    batch, total = [first], size(first)
    while len(batch) < max_items and total < max_bytes:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            q.put(None)
            break
        batch.append(nxt)
        total += size(nxt)
    return batch
