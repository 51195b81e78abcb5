"""WatchEvents fan-out: store listener callbacks (any thread) -> per-watcher asyncio queues.

Each watcher gets a bounded queue; when a slow watcher's queue is full, its events are dropped
and it receives one "overflow" event, after which a router should resync.
"""
from __future__ import annotations

import asyncio
import itertools
import threading

from kvc.pb import pb

QUEUE_EVENTS = 4096
_END = object()


class _Watcher:
    def __init__(self, root: bytes | None):
        self.root = root
        self.queue: asyncio.Queue = asyncio.Queue(QUEUE_EVENTS)
        self.overflowed = False


class EventHub:
    def __init__(self):
        self._watchers: set[_Watcher] = set()
        self._ids = itertools.count(1)
        self._id_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def attach(self, store, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        store.add_listener(self._on_event)

    def _on_event(self, kind: str, ns_root: bytes, h: bytes, parent: bytes, tier: str) -> None:
        if not self._watchers or self._loop is None:
            return
        with self._id_lock:
            eid = next(self._ids)
        ev = pb.CacheEvent(event_id=eid, kind=kind, namespace_root=ns_root, hash=h, parent=parent, tier=tier)
        try:
            self._loop.call_soon_threadsafe(self._fan_out, ev)
        except RuntimeError:  # the loop has closed: shutting down
            pass

    def _fan_out(self, ev: pb.CacheEvent) -> None:
        for w in list(self._watchers):
            if w.root is not None and w.root != ev.namespace_root:
                continue
            if w.queue.full():
                w.overflowed = True
            else:
                w.queue.put_nowait(ev)

    async def watch(self, root: bytes | None):
        if self._closed:
            return
        w = _Watcher(root)
        self._watchers.add(w)
        try:
            while True:
                ev = await w.queue.get()
                if ev is _END:
                    return
                if w.overflowed and w.queue.empty():
                    w.overflowed = False
                    yield ev
                    with self._id_lock:
                        eid = next(self._ids)
                    yield pb.CacheEvent(event_id=eid, kind="overflow")
                    continue
                yield ev
        finally:
            self._watchers.discard(w)

    def close(self) -> None:
        """End every watch stream (shutdown: they would otherwise hold the grace period)."""
        self._closed = True
        for w in list(self._watchers):
            while w.queue.full():
                w.queue.get_nowait()
            w.queue.put_nowait(_END)
