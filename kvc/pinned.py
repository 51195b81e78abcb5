"""Small host-to-device uploads (block indices, a step's token ids, expected checksums) and small
downloads (a load's checksum verdicts) through page-locked buffers allocated once per thread and
reused.

A non_blocking upload needs a page-locked (pinned) source; from pageable memory the copy first
waits for everything queued on the stream. Pinning a fresh tensor per upload (`pin_memory()`,
torch's caching host allocator) falls through to cudaHostAlloc whenever no cached block of that
size is free, and a block stays busy until the work its stream had queued by its release is done.

A download into pageable memory (`tensor.cpu()`) is a synchronous copy, and while one thread waited
in it for a 32K-token load's copies, another thread's non-blocking upload did not return either:
in run AB's stack samples (probe_cpu_hit.py, benchmarks/RESULTS.md) the engine's upload of a step's
ids ended on the same sample as the loader's `.cpu()` of its checksum verdicts, 10.5 ms later.
`download` reads through a pinned slot and waits on an event instead. (Run AA had first ruled out
the per-call pinning as that stall's cause; the uploads keep their rings all the same.)

Here each thread owns a ring of buffers. A slot is reused once the copy that last used it is done
(an event, normally long done), and grows (one allocation, to the next power of two) when a copy
is larger than it: after warm-up no copy allocates page-locked memory.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

# per thread. A slot is reused only once the copy that last used it is done; a step that uploads
# more than the ring holds (an offer's index per request whose page filled: 48 in one decode step of
# a 48-request batch) waited there for its own earlier copies, queued behind the step's kernels
# (6% of the engine thread's samples in run AK's throughput row)
SLOTS = 128
MIN_SLOT_BYTES = 64 << 10


class _Ring:
    def __init__(self, slots: int):
        self.bufs: list[torch.Tensor | None] = [None] * slots
        self.events: list[torch.cuda.Event | None] = [None] * slots
        self.next = 0
        self.allocations = 0  # page-locked allocations made (warm-up and growth)

    def _slot(self, like: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The next slot, free (the copy that last used it is done), as a pinned tensor shaped
        and typed like `like`; and its index (record its event after queuing the copy)."""
        nbytes = like.numel() * like.element_size()
        i = self.next
        self.next = (i + 1) % len(self.bufs)
        event = self.events[i]
        if event is not None:
            event.synchronize()  # the copy that last used this slot is done: it may be overwritten
        buf = self.bufs[i]
        if buf is None or buf.numel() < nbytes:
            size = max(MIN_SLOT_BYTES, 1 << (nbytes - 1).bit_length())
            buf = self.bufs[i] = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self.allocations += 1
        return buf[:nbytes].view(like.dtype).view(like.shape), i

    def _record(self, i: int, device: torch.device) -> torch.cuda.Event:
        event = self.events[i]
        if event is None:
            event = self.events[i] = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event

    def upload(self, src: torch.Tensor, device: torch.device) -> torch.Tensor:
        src = src.contiguous()
        if src.numel() == 0:
            return torch.empty(src.shape, dtype=src.dtype, device=device)
        staged, i = self._slot(src)
        staged.copy_(src)
        out = staged.to(device, non_blocking=True)
        self._record(i, device)
        return out

    def download(self, src: torch.Tensor) -> torch.Tensor:
        """src (on CUDA) as a new CPU tensor, through a slot: an asynchronous copy and a wait for
        its event, not a copy into pageable memory (a synchronous cudaMemcpy into pageable memory
        held every other thread's copies for as long as it waited: run AB's stack samples)."""
        src = src.contiguous()
        if src.numel() == 0:
            return torch.empty(src.shape, dtype=src.dtype)
        staged, i = self._slot(src)
        staged.copy_(src, non_blocking=True)
        self._record(i, src.device).synchronize()  # releases the GIL; holds no lock copies need
        return staged.clone()


class PinnedUploader:
    """upload(src, device): src (a CPU tensor) on `device`, queued on the current stream without
    waiting for it (CUDA) or as is (other devices). The result is a new device tensor; src may be
    changed as soon as the call returns."""

    def __init__(self, slots: int = SLOTS):
        self.slots = slots
        self._local = threading.local()
        self._rings: list[_Ring] = []
        self._lock = threading.Lock()

    def upload(self, src: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        device = torch.device(device)
        if device.type != "cuda":
            return src.to(device)
        return self._ring().upload(src, device)

    def download(self, src: torch.Tensor) -> torch.Tensor:
        """src as a new CPU tensor; from CUDA through this thread's ring (see _Ring.download)."""
        if src.device.type != "cuda":
            return src.to("cpu", copy=True)
        return self._ring().download(src)

    def _ring(self) -> _Ring:
        ring = getattr(self._local, "ring", None)
        if ring is None:
            ring = self._local.ring = _Ring(self.slots)
            with self._lock:
                self._rings.append(ring)
        return ring

    @property
    def allocations(self) -> int:
        """Page-locked buffers allocated so far, all threads (tests: no growth after warm-up)."""
        with self._lock:
            return sum(r.allocations for r in self._rings)


UPLOADER = PinnedUploader()  # the process's: engine, loader and put threads each get their own ring


def upload(src: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return UPLOADER.upload(src, device)


def upload_ids(ids, device: torch.device | str) -> torch.Tensor:
    """A sequence of ints (block ids) as an int64 tensor on `device`, through upload (no host wait)."""
    return UPLOADER.upload(torch.from_numpy(np.asarray(ids, dtype=np.int64)), device)


def download(src: torch.Tensor) -> torch.Tensor:
    return UPLOADER.download(src)
