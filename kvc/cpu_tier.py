"""The cpu tier: one preallocated slab of page slots (pinned where CUDA is present).

The slab is cut into extents; an extent is given to one page size (a size class) when that size
first needs room, and carved into slots. Pages of several models can then share one budget. The
tier never holds more bytes than its slab. A slab under 512 MiB still has MIN_EXTENTS extents
(a page larger than one goes to disk instead), so one page size cannot take the whole tier. Slots are handed
out from a bump pointer per extent, so the index grows with the pages stored, not with the
slots an extent could hold. Eviction order is the LRU order of `entries`
(front = next victim); the store decides what is evicted and where it goes.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

import xxhash

from . import pagecopy
from .gcfree import Untracked
from .record import checksum

EXTENT_BYTES = 64 << 20
MIN_EXTENTS = 8
MIN_EXTENT_BYTES = 1 << 20
READ_PIECE = 256 << 10
MADV_POPULATE_WRITE = 23  # Linux >= 5.14


@dataclass
class Entry(Untracked):  # out of the cyclic GC (kvc.gcfree)
    """What a tier keeps about a page besides its payload."""
    ns_root: bytes
    parent: bytes
    tokens: bytes          # little-endian uint32 ids
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: int
    slot: int = -1         # byte offset in the slab (cpu tier only)


@dataclass
class _SizeClass:
    size: int
    free: list[int] = field(default_factory=list)            # released slot offsets
    extents: dict[int, int] = field(default_factory=dict)    # extent index -> used slots
    fresh: dict[int, int] = field(default_factory=dict)      # extent index -> next never-used offset


class CpuTier:
    name = "cpu"

    def __init__(self, capacity_bytes: int, pin: bool | None = None, reader_threads: int | None = None):
        assert capacity_bytes > 0, "use NullTier for a cpu tier of size 0"
        if pin is None:
            pin = torch.cuda.is_available()
        self.capacity = int(capacity_bytes)
        self.slab = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=pin)  # [capacity]
        self.slab_np = self.slab.numpy()
        # at least MIN_EXTENTS extents, none under MIN_EXTENT_BYTES (a tiny tier is one extent)
        self.extent_bytes = min(EXTENT_BYTES, self.capacity,
                                max(self.capacity // MIN_EXTENTS, MIN_EXTENT_BYTES))
        self.free_extents = list(range(self.capacity // self.extent_bytes))
        self.classes: dict[int, _SizeClass] = {}
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.used = 0
        # a core is left for the caller: it reads a part of each read_many itself (a 2-core
        # machine reads on two threads, one of them the caller's, instead of one)
        threads = min(16, (os.cpu_count() or 1) - 1) if reader_threads is None else reader_threads
        self._readers = ThreadPoolExecutor(threads, thread_name_prefix="kvc-cpu-read") if threads > 0 else None
        # A lazily mapped slab makes the first put into every page pay a page fault (half the put
        # time measured). Populate it in the background, in the order extents are handed out;
        # MADV_POPULATE_WRITE maps pages without changing their bytes, so puts can run meanwhile.
        self._stop = threading.Event()
        self._populator = None
        if not pin and sys.platform.startswith("linux"):
            self._populator = threading.Thread(target=self._populate, name="kvc-cpu-populate", daemon=True)
            self._populator.start()

    def _populate(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            return
        page = mmap.PAGESIZE
        base = self.slab.data_ptr()
        for ext in reversed(range(len(self.free_extents))):
            if self._stop.is_set():
                return
            lo = -(-(base + ext * self.extent_bytes) // page) * page
            hi = (base + (ext + 1) * self.extent_bytes) // page * page
            if hi > lo and libc.madvise(lo, hi - lo, MADV_POPULATE_WRITE) != 0:
                return  # an older kernel (< 5.14) or a refusal: pages fault in on first use

    def close(self) -> None:
        self._stop.set()
        if self._populator is not None:
            self._populator.join()
        if self._readers is not None:
            self._readers.shutdown(wait=True)

    @property
    def pages(self) -> int:
        return len(self.entries)

    def get(self, h: bytes) -> Entry | None:
        return self.entries.get(h)

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.extent_bytes

    # -- allocation -----------------------------------------------------------------------------
    def _class(self, nbytes: int) -> _SizeClass:
        c = self.classes.get(nbytes)
        if c is None:
            c = self.classes[nbytes] = _SizeClass(nbytes)
        return c

    def _has_room(self, c: _SizeClass) -> bool:
        return bool(c.free or c.fresh or self.free_extents)

    def free_slots(self, nbytes: int) -> int:
        """How many pages of nbytes the tier can take without evicting: its size class's free and
        fresh slots and the free extents'."""
        c = self._class(nbytes)
        E = self.extent_bytes
        fresh = sum(((ext + 1) * E - off) // nbytes for ext, off in c.fresh.items())
        return len(c.free) + fresh + len(self.free_extents) * (E // nbytes)

    def _alloc(self, nbytes: int) -> int | None:
        c = self._class(nbytes)
        if c.free:
            off = c.free.pop()
        else:
            if not c.fresh:
                if not self.free_extents:
                    return None
                ext = self.free_extents.pop()
                c.extents[ext] = 0
                c.fresh[ext] = ext * self.extent_bytes
            ext, off = next(iter(c.fresh.items()))
            if off + 2 * nbytes > (ext + 1) * self.extent_bytes:
                del c.fresh[ext]  # the extent's last slot
            else:
                c.fresh[ext] = off + nbytes
        c.extents[off // self.extent_bytes] += 1
        return off

    def _release(self, off: int, nbytes: int) -> None:
        c = self.classes[nbytes]
        ext = off // self.extent_bytes
        c.extents[ext] -= 1
        c.free.append(off)
        if c.extents[ext] == 0:  # a whole extent is free again: any size class may take it
            del c.extents[ext]
            c.fresh.pop(ext, None)
            lo, hi = ext * self.extent_bytes, (ext + 1) * self.extent_bytes
            c.free = [o for o in c.free if not lo <= o < hi]
            self.free_extents.append(ext)

    def victims_for(self, nbytes: int, is_pinned) -> list[bytes] | None:
        """LRU pages whose removal makes room for one page of nbytes; None if pins prevent it."""
        if self._has_room(self._class(nbytes)):
            return []
        for h, e in self.entries.items():  # same size class first: frees a slot directly
            if e.nbytes == nbytes and not is_pinned(h):
                return [h]
        for h, e in self.entries.items():  # else empty the extent of the oldest other page
            if is_pinned(h):
                continue
            ext = e.slot // self.extent_bytes
            lo, hi = ext * self.extent_bytes, (ext + 1) * self.extent_bytes
            group = [g for g, f in self.entries.items() if lo <= f.slot < hi]
            if not any(is_pinned(g) for g in group):
                return group
        return None

    # -- data -----------------------------------------------------------------------------------
    def put(self, h: bytes, entry: Entry, payload: np.ndarray) -> bool:
        """Copy a payload (flat uint8) into a free slot; False when no slot is free."""
        assert payload.nbytes == entry.nbytes, "payload size does not match its entry"
        off = self.reserve(entry.nbytes)
        if off is None:
            return False
        self.slab_np[off:off + entry.nbytes] = payload  # numpy copy: see read_into
        self.commit(h, entry, off)
        return True

    def reserve(self, nbytes: int) -> int | None:
        """A free slot for a page of nbytes (its offset in the slab), counted as used but in no
        entry: nobody reads it until commit; None when no slot is free. A batch of puts reserves
        every slot first, fills them all in one native call, then commits."""
        off = self._alloc(nbytes)
        if off is not None:
            self.used += nbytes
        return off

    def commit(self, h: bytes, entry: Entry, off: int) -> None:
        """Publish a reserved slot whose bytes are in place."""
        entry.slot = off
        self.entries[h] = entry

    def cancel(self, off: int, nbytes: int) -> None:
        """Give back a reserved slot that will not be committed."""
        self._release(off, nbytes)
        self.used -= nbytes

    def view(self, h: bytes) -> np.ndarray:
        e = self.entries[h]
        return self.slab_np[e.slot:e.slot + e.nbytes]

    def read_into(self, h: bytes, dst: "torch.Tensor | np.ndarray") -> bool:
        """Copy the page into dst (flat uint8 cpu tensor or numpy array) and verify the bytes delivered.

        The copy goes in cache-sized pieces, each hashed from the destination while it is still in
        cache, so checking costs little more than the copy; a mismatch returns False.
        """
        src = self.view(h)
        out = dst if isinstance(dst, np.ndarray) else dst.numpy()
        digest = xxhash.xxh3_64()
        for off in range(0, src.nbytes, READ_PIECE):
            end = off + READ_PIECE
            out[off:end] = src[off:end]  # numpy: one thread, no OpenMP stalls on a busy machine
            digest.update(out[off:end])
        return digest.intdigest() == self.entries[h].checksum

    def slab_view(self, h: bytes) -> torch.Tensor:
        """The page's bytes in the slab as a tensor (pinned when CUDA is present): no copy."""
        e = self.entries[h]
        return self.slab[e.slot:e.slot + e.nbytes]

    def verify_entries(self, entries: list[Entry]) -> list[bool]:
        """Checksums of pages in place in the slab, spread over the reader threads (xxh3 releases the
        GIL); one bool per entry."""
        return self.start_verify(entries)()

    def start_verify(self, entries: list[Entry]) -> Callable[[], list[bool]]:
        """verify_entries started on the reader threads; the returned call waits for its answer (the
        caller does its own work meanwhile). The slots must not change until then."""
        slab = self.slab_np
        lib = pagecopy.library()
        if lib is not None:  # one native call per thread: no GIL hand-off per page
            def check(part: list[Entry]) -> list[bool]:
                return self._native_sums(lib, part, [0] * len(part))
        else:
            def check(part: list[Entry]) -> list[bool]:
                return [checksum(slab[e.slot:e.slot + e.nbytes]) == e.checksum for e in part]
        return self._in_parts(check, entries)

    def _native_sums(self, lib, entries: list[Entry], dsts: list[int]) -> list[bool]:
        """Whether each entry's slab bytes match its checksum, and their copies to dsts (addresses;
        0: checksum only), in one native call without the GIL."""
        base = self.slab_np.ctypes.data
        sums = lib.pointers([base + e.slot for e in entries], dsts, [e.nbytes for e in entries])
        return [s == e.checksum for s, e in zip(sums, entries)]

    def _in_parts(self, fn: Callable[[list], list], items: list, caller: bool = False) -> Callable[[], list]:
        """fn over items in one part per reader thread (fn(part) -> one result per item), started
        now; the returned call waits and gives the results in order. With `caller` the calling
        thread takes the last part itself inside the returned call (a caller that only waits: the
        native byte work releases the GIL, so the parts run side by side)."""
        if len(items) <= 1 or self._readers is None:
            return lambda: fn(items)
        parts = self._readers._max_workers + caller
        step = -(-len(items) // parts)  # one task per thread, not per page
        cuts = list(range(0, len(items), step))
        own = items[cuts.pop():] if caller else None
        futs = [self._readers.submit(fn, items[i:i + step]) for i in cuts]
        if not caller:
            return lambda: [r for f in futs for r in f.result()]

        def run() -> list:
            mine = fn(own)
            return [r for f in futs for r in f.result()] + mine
        return run

    def touch_many(self, hashes: list[bytes]) -> None:
        """touch each, in order (the last becomes the most recent)."""
        move = self.entries.move_to_end
        for h in hashes:
            move(h)

    def read_many(self, hashes: list[bytes], dsts: list[torch.Tensor]) -> list[bool]:
        """read_into for a batch (dsts: flat uint8 cpu tensors), spread over the tier's reader
        threads; one bool per page. Where kvc.pagecopy's native batch builds, each thread makes one
        call that checksums its pages in the slab and copies them (~15 us of Python a page
        otherwise: a 32K-token prompt's 2,048 small pages took 30 ms); else numpy copies and
        xxh3, which release the GIL too."""
        lib = pagecopy.library()
        entries = [self.entries[h] for h in hashes]
        if lib is not None and all(d.device.type == "cpu" and d.is_contiguous() and d.nbytes == e.nbytes
                                   for d, e in zip(dsts, entries)):
            def copy(part: list[tuple[Entry, int]]) -> list[bool]:
                return self._native_sums(lib, [e for e, _ in part], [d for _, d in part])
            return self._in_parts(copy, [(e, d.data_ptr()) for e, d in zip(entries, dsts)], caller=True)()
        if len(hashes) == 1 or self._readers is None:
            return [self.read_into(h, d) for h, d in zip(hashes, dsts)]
        return list(self._readers.map(self.read_into, hashes, dsts))

    def touch(self, h: bytes) -> None:
        self.entries.move_to_end(h)

    def detach(self, h: bytes) -> Entry:
        """Take the page out of the index but keep its slot taken (its bytes are still being
        copied out): give the slot back with cancel(entry.slot, entry.nbytes) when done."""
        return self.entries.pop(h)

    def remove(self, h: bytes) -> Entry:
        e = self.entries.pop(h)
        self._release(e.slot, e.nbytes)
        self.used -= e.nbytes
        return e


class NullTier:
    """A tier that holds nothing (cpu_memory_size_GB: 0, or no disk_path)."""

    def __init__(self, name: str):
        self.name = name
        self.capacity = 0
        self.used = 0
        self.pages = 0
        self.entries: dict = {}

    def get(self, h: bytes) -> None:
        return None

    def fits(self, nbytes: int) -> bool:
        return False

    def touch(self, h: bytes) -> None:
        pass

    def verify_entries(self, entries) -> list[bool]:
        return [False] * len(entries)  # holds nothing, so verifies nothing (a CUDA get asks with [])

    def start_verify(self, entries):
        return lambda: self.verify_entries(entries)

    def touch_many(self, hashes) -> None:
        pass

    def reader(self) -> "NullTier":
        return self

    def read(self, h: bytes, sink) -> None:
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def close(self) -> None:
        pass

    def sync(self, timeout: float = 10.0) -> bool:
        return True

    def flush(self) -> None:
        pass
