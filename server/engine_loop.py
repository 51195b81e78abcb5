"""AsyncEngine: the engine's step loop on its own thread, with asyncio streams for the HTTP side.

The engine is not thread-safe, so every call into it (add, abort, step) happens on the loop
thread; handlers hand requests over through a queue and get their outputs back through a slot per
request on their event loop (an output not yet read is replaced by the next: each holds all so
far). A handler that goes away (a client disconnect, a cancelled submit, a closed event loop)
aborts its request, which frees its pages. A request the engine cannot take fails alone; if the
loop itself stops (an error in step(), or shutdown), every request it holds or has not yet taken
fails with it, and then, when it was an error, `on_death` is called (kvc serve exits, so that its
supervisor restarts it). While only host-tier loads are in progress, step() waits for them at most
LOAD_WAIT_S, so requests and aborts that arrive meanwhile are taken.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable

log = logging.getLogger("kvc.server")
LOAD_WAIT_S = 0.02


class EngineDead(RuntimeError):
    """The engine loop has stopped: no request can be served until the server restarts (a 503)."""


class _Outputs:
    """A request's outputs for its reader, on the reader's event loop. Each RequestOutput holds
    everything so far (the whole text, every token id), so one the reader has not taken yet is
    replaced by the next: a slow reader (a client reading a stream slowly, TCP pushing back) holds
    one output, not one per token each with the text so far (a queue of them grew quadratically
    with the output's length). A finished output or an error is never replaced."""

    def __init__(self):
        self._item = None
        self._has = False
        self._ready = asyncio.Event()

    def put_nowait(self, item) -> None:
        if self._has and (isinstance(self._item, EngineDead) or self._item.finished):
            return
        self._item, self._has = item, True
        self._ready.set()

    async def get(self):
        while not self._has:
            self._ready.clear()
            await self._ready.wait()
        item, self._item, self._has = self._item, None, False
        return item


@dataclass
class _Add:
    request_id: str
    prompt: object
    params: object
    cache_salt: str
    loop: asyncio.AbstractEventLoop
    accepted: asyncio.Future
    stream: _Outputs
    arrival: float | None = None  # time.monotonic() when the HTTP handler started


class AsyncEngine:
    def __init__(self, engine, on_death: Callable[[BaseException], None] | None = None):
        """on_death(error): called on the loop's thread once an error has stopped the loop and every
        request it held has been failed (not at stop())."""
        self.engine = engine
        self._on_death = on_death
        # step() waits at most this long for a host load when nothing else can run, so requests
        # and aborts that arrive during a slow load are taken within it (not after the load)
        engine.load_wait_s = LOAD_WAIT_S
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Add] = {}
        self._stopped = threading.Event()
        self._closed = False  # set, under _lock, by the loop as it ends; submit() checks it under _lock
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvc-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    # -- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                if not self.engine.has_unfinished():
                    self.engine.flush_commits()  # idle: the last step's pages reach the tiers now
                self._drain_inbox(block=not self.engine.has_unfinished())
                if not self.engine.has_unfinished():
                    continue
                for out in self.engine.step():
                    add = self._streams.get(out.request_id)
                    if add is None:
                        continue
                    if out.finished:
                        del self._streams[out.request_id]
                    if not _send(add, add.stream.put_nowait, out):  # its caller's event loop is gone
                        self._streams.pop(out.request_id, None)
                        self.engine.abort(out.request_id)
            error = EngineDead("the server is shutting down")
        except BaseException as e:  # the loop is dead: fail every waiting request loudly
            log.exception("engine loop failed")
            self.error = e
            error = EngineDead(f"the engine loop failed ({type(e).__name__}: {e}); see the server log")
        with self._lock:  # after this, submit() refuses: nothing reaches the inbox unanswered
            self._closed = True
            waiting = list(self._streams.values())
            while True:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Add):
                    waiting.append(item)
        for add in waiting:
            _send(add, _fail, add, error)  # (a closed event loop: nobody waits for it)
        if self.error is not None and self._on_death is not None:
            self._on_death(self.error)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, _Add):
                try:
                    self._add(item)
                except BaseException:
                    self._inbox.put(item)  # the loop ends: it fails with the rest of the inbox
                    raise
            elif item is not None:
                self.engine.abort(item)
                self._streams.pop(item, None)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, add: _Add) -> None:
        def settle(error):
            if not add.accepted.done():
                add.accepted.set_exception(error) if error else add.accepted.set_result(True)
        try:
            self.engine.add_request(add.request_id, add.prompt, add.params, add.cache_salt, arrival=add.arrival)
        except Exception as e:  # this request only (ValueError: the caller's, a 400; else a 500)
            _send(add, settle, e)
            return
        self._streams[add.request_id] = add
        if not _send(add, settle, None):  # its caller's event loop is gone: nobody reads it
            del self._streams[add.request_id]
            self.engine.abort(add.request_id)

    # -- asyncio side ----------------------------------------------------------------------------
    async def submit(self, request_id: str, prompt, params, cache_salt: str = "",
                     arrival: float | None = None) -> "Stream":
        """Hand a request to the engine; raises ValueError (a 400) if the engine refuses it,
        EngineDead if the loop has stopped, and whatever else add_request raised.
        `arrival`: when the request came in (time.monotonic()), where TTFT counts from."""
        loop = asyncio.get_running_loop()
        add = _Add(request_id, prompt, params, cache_salt, loop, loop.create_future(), _Outputs(), arrival)
        with self._lock:
            if not self.alive:
                raise EngineDead("the engine loop is not running; see the server log")
            self._inbox.put(add)
        try:
            await add.accepted
        except asyncio.CancelledError:  # the caller went away before it had a Stream to abort with:
            self.abort(request_id)  # the engine may have taken the request (a no-op if it did not)
            raise
        return Stream(self, request_id, add.stream)

    def abort(self, request_id: str) -> None:
        self._inbox.put(request_id)

    def stop(self) -> None:
        """Ask the loop to end (without waiting): the requests it still holds fail with
        EngineDead("the server is shutting down"), a stream's reader gets that as an error event."""
        self._stopped.set()
        self._inbox.put(None)

    def shutdown(self) -> None:
        self.stop()
        self._thread.join(timeout=30)


def _send(add: _Add, fn, *args) -> bool:
    """Call fn(*args) on add's event loop; False if that loop is closed (its caller is gone: an
    asyncio.run that returned with the request unread). One caller's closed loop must not end the
    engine loop for every other request."""
    try:
        add.loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def _fail(add: _Add, error: EngineDead) -> None:
    """On add's event loop: its submit() or its Stream raises `error`."""
    if not add.accepted.done():
        add.accepted.set_exception(error)
    add.stream.put_nowait(error)


class Stream:
    """The outputs of one request, in order (a reader that falls behind gets the latest: each
    holds everything so far); aborts the request if left before it finished."""

    def __init__(self, engine: AsyncEngine, request_id: str, q: _Outputs):
        self.engine, self.request_id, self._q = engine, request_id, q
        self.finished = False

    async def _next(self):
        out = await self._q.get()
        if isinstance(out, EngineDead):
            self.finished = True
            raise EngineDead(str(out))
        self.finished = out.finished
        return out

    async def __aiter__(self) -> AsyncIterator:
        try:
            while not self.finished:
                yield await self._next()
        finally:
            self.close()

    async def final(self):
        """The last output (all tokens); aborts the request if cancelled first."""
        try:
            out = None
            while not self.finished:
                out = await self._next()
            return out
        finally:
            self.close()

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)
