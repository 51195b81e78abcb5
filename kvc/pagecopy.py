"""The byte work of a put: each page's checksum and its copy into the cpu slab, for a whole batch.

Beside a thread that always wants the GIL (an engine's launch-bound thread), every call that
releases the GIL costs the caller the other thread's switch interval (5 ms) to get it back. The
per-page path makes several such calls per page (torch's view ops, xxhash, numpy's copy): measured
~10-25 ms a page beside a spinning thread instead of ~65 us alone. The native path does all pages'
checksums and copies in one C call (pagecopy.c, built at first use by kvc.native, loaded with
ctypes.CDLL, which releases the GIL once for the whole call) and reads tensors by pointer, so the
Python around it makes no call that releases the GIL.

The checksum is the page contract, xxh3_64 of the payload bytes: the C code calls xxhash's own
XXH3_64bits, taken by address from the xxhash package's extension module, and the library is
checked against xxhash.xxh3_64_intdigest when loaded. Without a compiler (or if any of that fails)
one log line, and `sum_copy_python`, the per-page path, runs instead; it is also the tests' oracle.

A put can also hand its byte work over without waiting for it (`SumCopyWork` / `CopyWork`, started
with `start`): the native library runs it on a thread of its own that never takes the GIL, and the
caller polls the job's `done()` (no GIL hand-over either: those two calls are made through
ctypes.PyDLL, which keeps the GIL). `Stepping` advances a generator of such work a piece at a
time; `drive` runs one to its end on the calling thread. An engine's thread drives puts that way inside its waits for the
GPU (engine.host_tier, put_gate "engine"), so no other Python thread runs while it launches.
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import xxhash

from . import native
from .record import checksum

log = logging.getLogger("kvc.pagecopy")
SOURCE = Path(__file__).with_name("pagecopy.c")
_libs: dict = {}

# (page tensors, slab offset of each or None for checksum only, the slab or None) -> checksums
SumCopy = Callable[[Sequence[torch.Tensor], Sequence["int | None"], "np.ndarray | None"], list]


def sum_copy_python(datas: Sequence[torch.Tensor], offsets: Sequence[int | None], slab: np.ndarray | None) -> list[int]:
    """Per page: the payload as flat bytes (Page.payload), its xxh3_64, its copy into slab[off:]."""
    sums = []
    for t, off in zip(datas, offsets):
        flat = t.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy()  # [nbytes]
        sums.append(checksum(flat))
        if off is not None:
            slab[off:off + flat.nbytes] = flat
    return sums


class NativeSumCopy:
    """pagecopy.c's kvc_sum_copy: every page of a batch in one call without the GIL."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))  # CDLL: the GIL is released during calls
        fn = lib.kvc_sum_copy
        fn.argtypes = [ctypes.c_long] + [ctypes.c_void_p] * 5
        fn.restype = None
        self._fn = fn
        cp = lib.kvc_copy
        cp.argtypes = [ctypes.c_long] + [ctypes.c_void_p] * 3
        cp.restype = None
        self._copy = cp
        held = ctypes.PyDLL(str(path))  # PyDLL: these calls keep the GIL (they return at once)
        self._start = held.kvc_start
        self._start.argtypes = [ctypes.c_long] + [ctypes.c_void_p] * 6
        self._start.restype = ctypes.c_int
        self._done = held.kvc_done
        self._done.argtypes = [ctypes.c_void_p]
        self._done.restype = ctypes.c_int
        xx = ctypes.CDLL(xxhash._xxhash.__file__)  # the extension module itself: already loaded
        self._xxh3 = ctypes.cast(xx.XXH3_64bits, ctypes.c_void_p).value
        probe = torch.arange(1000, dtype=torch.int32)  # 4,000 bytes: xxh3's long-input code path
        want = xxhash.xxh3_64_intdigest(probe.numpy())
        if self([probe], [None], None) != [want]:
            raise RuntimeError(f"XXH3_64bits of {xx._name} does not equal xxhash.xxh3_64_intdigest")

    def __call__(self, datas: Sequence[torch.Tensor], offsets: Sequence[int | None],
                 slab: np.ndarray | None) -> list[int]:
        keep, src, dst, lens = self._pointers_of(datas, offsets, slab)
        return self.pointers(src, dst, lens)

    def start(self, datas: Sequence[torch.Tensor], offsets: Sequence[int | None],
              slab: np.ndarray | None) -> "NativeJob":
        """__call__'s work on a thread of its own; the job's result() is the checksums."""
        keep, src, dst, lens = self._pointers_of(datas, offsets, slab)
        return self.start_pointers(src, dst, lens, sums=True, keep=(keep, list(datas), slab))

    def start_pointers(self, src: Sequence[int], dst: Sequence[int], lens: Sequence[int], sums: bool,
                       keep=None) -> "NativeJob":
        """`pointers` (sums=True) or `copy` (sums=False) on a thread of its own. The caller keeps
        every buffer alive until the job is done; `keep` is held by the job until then too."""
        return NativeJob(self, src, dst, lens, sums, keep)

    def _pointers_of(self, datas, offsets, slab):
        base = slab.ctypes.data if slab is not None else 0
        keep, src, dst, lens = [], [], [], []  # keep: tensors made here must outlive the call
        for t, off in zip(datas, offsets):
            # data_ptr, is_contiguous and nbytes keep the GIL; a torch view op would hand it over
            if t.device.type != "cpu" or not t.is_contiguous():
                t = t.detach().contiguous().cpu()
                keep.append(t)
            src.append(t.data_ptr())
            lens.append(t.nbytes)
            if off is not None and not (0 <= off and off + t.nbytes <= slab.nbytes):  # a real check: memcpy follows
                raise ValueError(f"slot {off} + {t.nbytes} bytes is outside the slab of {slab.nbytes}")
            dst.append(0 if off is None else base + off)
        return keep, src, dst, lens

    def pointers(self, src: Sequence[int], dst: Sequence[int], lens: Sequence[int]) -> list[int]:
        """xxh3_64 of each src[i] .. src[i] + lens[i], then its copy to dst[i] where that is not 0
        (0: checksum only), in one call without the GIL. Raw addresses: for callers that own both
        buffers and have checked every range (the cpu tier's reads of its own slab)."""
        n = len(src)
        arr = ctypes.c_uint64 * n
        sums = arr()
        self._fn(n, arr(*src), arr(*dst), arr(*lens), sums, self._xxh3)
        return list(sums)

    def copy(self, src: Sequence[int], dst: Sequence[int], lens: Sequence[int]) -> None:
        """memcpy(dst[i], src[i], lens[i]) for each, in one call without the GIL (raw addresses,
        as `pointers`)."""
        n = len(src)
        arr = ctypes.c_uint64 * n
        self._copy(n, arr(*src), arr(*dst), arr(*lens))


_live: set = set()  # started jobs not yet seen done: their buffers must outlive them
_live_lock = threading.Lock()


class NativeJob:
    """Byte work running on a native thread; done() polls it without giving up the GIL."""

    def __init__(self, lib: NativeSumCopy, src, dst, lens, sums: bool, keep=None):
        n = len(src)
        arr = ctypes.c_uint64 * n
        self._args = (arr(*src), arr(*dst), arr(*lens))
        self._sums = arr() if sums else None
        self._flag = ctypes.c_int(0)
        self._keep = keep
        self._lib = lib
        with _live_lock:
            _live.add(self)
        lib._start(n, *self._args, self._sums, lib._xxh3, ctypes.byref(self._flag))

    def done(self) -> bool:
        if self._lib is None:
            return True
        if not self._lib._done(ctypes.byref(self._flag)):
            return False
        self._lib = None
        with _live_lock:
            _live.discard(self)
        return True

    def wait(self, poll_s: float = 0.0002) -> None:
        while not self.done():
            time.sleep(poll_s)

    def result(self) -> list[int] | None:
        """The checksums (None for copies); only once done."""
        assert self._lib is None, "NativeJob.result before done()"
        return list(self._sums) if self._sums is not None else None


def wait_all(timeout: float = 30.0) -> bool:
    """Wait for every started job (before the buffers they write are freed: a slab's close)."""
    end = time.monotonic() + timeout
    while True:
        with _live_lock:
            jobs = list(_live)
        if not jobs:
            return True
        for j in jobs:
            j.done()
        if time.monotonic() > end:
            return False
        time.sleep(0.001)


class Ready:
    """A Pending whose work ran already."""

    def __init__(self, value=None):
        self.value = value

    def done(self) -> bool:
        return True

    def result(self):
        return self.value


class _Failed:
    """A piece of work that failed: its error goes back into the generator (Stepping)."""

    def __init__(self, error: BaseException):
        self.error = error

    def done(self) -> bool:
        return True

    def result(self):
        raise self.error


class SumCopyWork:
    """A put's checksums and slab copies (a SumCopy call), to run now (run) or to start (start)."""

    def __init__(self, fn: SumCopy, datas: Sequence[torch.Tensor], offsets: Sequence["int | None"],
                 slab: np.ndarray | None):
        self.fn, self.datas, self.offsets, self.slab = fn, datas, offsets, slab

    def run(self) -> list[int]:
        return self.fn(self.datas, self.offsets, self.slab)

    def start(self):
        if isinstance(self.fn, NativeSumCopy):
            return self.fn.start(self.datas, self.offsets, self.slab)
        return Ready(self.run())


class CopyWork:
    """Copies between buffers its caller owns (raw addresses): NativeSumCopy.copy, now or started."""

    def __init__(self, lib: NativeSumCopy, src, dst, lens, keep=None):
        self.lib, self.src, self.dst, self.lens, self.keep = lib, src, dst, lens, keep

    def run(self) -> None:
        self.lib.copy(self.src, self.dst, self.lens)

    def start(self):
        return self.lib.start_pointers(self.src, self.dst, self.lens, sums=False, keep=self.keep)


class Stepping:
    """A generator of work items advanced one piece at a time: advance() sends the last piece's
    result in (or throws its error in), runs the generator's Python up to its next item, and
    starts that item (start=True: `start()`, e.g. on a native thread, polled by the next advance)
    or runs it here (start=False: `run()`). None is no work, a place to stop. The generator's
    return value is `value` once advance() has said "done"; an error it does not handle leaves
    advance()."""

    def __init__(self, steps):
        self.steps = steps
        self.pending = None
        self.value = None

    def advance(self, start: bool = True) -> str:
        """'ran' (some of its Python ran), 'busy' (its started work is not done) or 'done'."""
        send, exc = None, None
        if self.pending is not None:
            if not self.pending.done():
                return "busy"
            pending, self.pending = self.pending, None
            try:
                send = pending.result()
            except Exception as e:  # noqa: BLE001 - thrown into the generator, which cleans up
                exc = e
        try:
            work = self.steps.throw(exc) if exc is not None else self.steps.send(send)
        except StopIteration as stop:
            self.value = stop.value
            return "done"
        if work is not None:
            try:
                self.pending = work.start() if start else Ready(work.run())
            except Exception as e:  # noqa: BLE001 - as above
                self.pending = _Failed(e)
        return "ran"


def drive(steps, pause=None):
    """Run a generator of work items to its end on this thread (Stepping, each item run at once);
    pause(), if given, is called after each piece that did not fail. Returns the generator's
    return value."""
    stepping = Stepping(steps)
    while stepping.advance(start=False) == "ran":
        if pause is not None and not isinstance(stepping.pending, _Failed):
            pause()
    return stepping.value


def library(cc: str | None = None) -> NativeSumCopy | None:
    """The native batch, built for this CPU once per process, or None where it cannot be."""
    cc = native.compiler(cc)
    return native.once(_libs, (cc, str(native.cache_dir())),
                       lambda: NativeSumCopy(native.build(SOURCE, "kvc_pagecopy", cc)),
                       log, "pagecopy: native put path unavailable", "puts checksum and copy page by page")


def best() -> SumCopy:
    """The native batch where it builds, else the per-page path."""
    return library() or sum_copy_python
