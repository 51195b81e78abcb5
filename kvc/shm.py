"""Shared-memory segments for page payloads between a client and a cache service on one host.

The client owns a segment (a file under /dev/shm named "kvc-shm-" + 128 random bits, mode 0600)
and names it in GetPages / PutPages; the service maps it and copies payloads in or out, so the
bytes never pass through protobuf. The name is unguessable, and the service maps only names of
that form, as regular files, without following links.
"""
from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
import threading
from collections import OrderedDict

import numpy as np

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^kvc-shm-[0-9a-f]{32}$")


class Segment:
    """A mapped /dev/shm file: `array` is its bytes as a uint8 numpy array."""

    def __init__(self, name: str, size: int, create: bool):
        if not _NAME.match(name):
            raise ValueError(f"shared-memory name {name!r} is not of the form kvc-shm-<32 hex digits>")
        self.name, self.size, self.owner = name, size, create
        path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise ValueError(f"cannot open shared-memory segment {name!r}: {e.strerror} "
                             "(client and service must share a host and user)") from None
        try:
            if create:
                os.ftruncate(fd, size)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < size or size <= 0:
                raise ValueError(f"shared-memory segment {name!r} is not a regular file of {size} bytes")
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.array = np.frombuffer(self._mm, dtype=np.uint8)

    @classmethod
    def create(cls, size: int) -> "Segment":
        return cls("kvc-shm-" + secrets.token_hex(16), size, create=True)

    def close(self) -> None:
        self.array = None
        try:
            self._mm.close()
        except BufferError:  # a view is still alive; the mapping goes with it
            pass
        if self.owner:
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass


class SegmentCache:
    """The service's mappings of client segments, the most recently used few kept open."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._segs: OrderedDict[str, Segment] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str, size: int) -> Segment:
        with self._lock:
            return self._get(name, size)

    def _get(self, name: str, size: int) -> Segment:
        seg = self._segs.get(name)
        if seg is not None and seg.size == size:
            self._segs.move_to_end(name)
            return seg
        seg = Segment(name, size, create=False)
        old = self._segs.pop(name, None)
        if old is not None:
            old.close()
        self._segs[name] = seg
        while len(self._segs) > self.capacity:
            self._segs.popitem(last=False)[1].close()
        return seg

    def close(self) -> None:
        with self._lock:
            segs = list(self._segs.values())
        for seg in segs:
            seg.close()
        self._segs.clear()
