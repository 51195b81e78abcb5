"""Freed buffers kept in the heap for the next call instead of given back to the OS: set once at
start by `kvc cache-server`, and by `kvc serve` when it loads from a shared cache service (each
received GetPages message is a fresh buffer there: a 256 MiB load 0.24 -> 0.19 s and 25,000 faults
-> 5, benchmarks/probe_client_heap.py). The service's case:

Every PutPages message arrives as a fresh buffer (gRPC's, then the message's bytes) and every
page is assembled into a fresh tensor before the store copies it into its slab; GetPages stages
pages the same way. By default glibc's malloc returns such freed memory to the kernel (buffers
of 32 MiB and over are unmapped, a heap's free top past a threshold that grows to twice the
largest buffer freed so far is trimmed), so the next call takes a page fault on every 4 KiB it
writes again: ~30,000 minor faults and ~0.07 s of the service's CPU (a quarter of it) per 256 MiB
put on the 2-core VM. Setting both thresholds once at start keeps freed heap memory for reuse: the
faults fall to hundreds or fewer (benchmarks/probe_service_ab.py, bench_service.py; RESULTS.md,
thirty-fourth session).

What is kept is bounded by what the service held at its busiest: the page bytes of calls in
progress (server.max_inflight_bytes, which `retain_freed_memory` takes as the trim threshold) and
gRPC's buffers. Only glibc has mallopt with these meanings; elsewhere this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger("kvc.heap")

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)


def _mallopt():
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def retain_freed_memory(trim_bytes: int) -> bool:
    """Keep freed heap memory up to trim_bytes a heap (clamped to a C int) and serve buffers under
    32 MiB from the heap, not from fresh mappings. True when glibc took both settings."""
    fn = _mallopt()
    if fn is None:
        log.info("not glibc: freed buffers go back to the OS as the C library decides")
        return False
    trim = max(0, min(int(trim_bytes), 2**31 - 1))
    ok = bool(fn(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(fn(M_TRIM_THRESHOLD, trim))
    if not ok:
        log.warning("mallopt refused the heap thresholds; freed buffers go back to the OS")
    return ok
