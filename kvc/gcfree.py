"""Per-page records kept out of the cyclic garbage collector's reach.

The tiers keep one small record per page (CpuTier's Entry, DiskTier's DiskEntry; the device pool's
cached-block record is a plain tuple of bytes, which CPython untracks by itself): bytes, ints, a
str, a tuple of ints. Python tracks every such instance for its cyclic collector, and a full
collection walks all tracked objects, so its pause grew with the cache (benchmarks/probe_gc.py:
3.1 ms with 32,768 cpu pages on a 2-core VM, 0.5 ms with the records untracked) and landed at
whatever allocation tripped it, in the middle of a request's admission or load. A GPU's device
pool registers far more blocks than that. These records hold no reference to
any container, so they can never be part of a reference cycle and reference counting frees them:
untracking them is safe. Where the C API is not reachable (another interpreter) this is a no-op.
"""
from __future__ import annotations

import ctypes


def _untrack_fn():
    try:
        fn = ctypes.pythonapi.PyObject_GC_UnTrack  # PyDLL: called with the GIL held
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.py_object]
    fn.restype = None
    return fn


_UNTRACK = _untrack_fn()


def untrack(obj) -> None:
    """Take obj out of the cyclic GC (obj must hold only atomic values: bytes, str, int, float,
    None, or tuples of those)."""
    if _UNTRACK is not None:
        _UNTRACK(obj)


class Untracked:
    """Mixin for dataclasses of atomic fields: each instance is untracked once built."""

    def __post_init__(self) -> None:
        untrack(self)
