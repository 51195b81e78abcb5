"""Strided host-to-device copies (cuMemcpy2DAsync), which torch does not issue.

A cpu-tier load on CUDA copies each layer of its pages separately, so the model's first layers can
run while the last layers' bytes are still on their way. In the slab a page is one run of bytes,
layer after layer; one layer of a run of adjacent slab pages is therefore a 2D region: `height`
rows of `width` bytes, `src_pitch` (the page size) apart. torch's `copy_` from such a strided
pinned view first makes a contiguous pageable copy on the host (then a synchronous upload); the
CUDA driver's cuMemcpy2DAsync moves it in one DMA operation, asynchronously on a stream.

Bound with ctypes to libcuda (the driver, present wherever CUDA runs), not to a CUDA runtime
library: torch's runtime may be linked statically or under a versioned name. The driver works in
the calling thread's current context; torch's first CUDA call on a thread makes the device's primary
context current there, and `copy2d` makes sure of it with torch.cuda.set_device. Where the driver
cannot be loaded (no GPU, another platform) `available()` is False and callers keep their 1D
copies.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

import torch

log = logging.getLogger("kvc.cudacopy")

_HOST, _DEVICE = 1, 2  # CUmemorytype


class _Memcpy2D(ctypes.Structure):  # CUDA_MEMCPY2D (cuda.h)
    _fields_ = [
        ("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
        ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
        ("srcPitch", ctypes.c_size_t),
        ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
        ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
        ("dstPitch", ctypes.c_size_t),
        ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t),
    ]


_lib = None
_lock = threading.Lock()
_failed: str | None = None
_local = threading.local()


def _driver():
    """libcuda with the two calls bound, or None (remembered) where it cannot be loaded."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is None and _failed is None:
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("cuda") or "libcuda.so.1")
                lib.cuMemcpy2DAsync_v2.argtypes = [ctypes.POINTER(_Memcpy2D), ctypes.c_void_p]
                lib.cuMemcpy2DAsync_v2.restype = ctypes.c_int
                lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
                lib.cuCtxGetCurrent.restype = ctypes.c_int
                lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
                lib.cuGetErrorName.restype = ctypes.c_int
                _lib = lib
            except (OSError, AttributeError) as e:
                _failed = f"{type(e).__name__}: {e}"
                log.info("strided host-to-device copies unavailable (%s): loads copy whole pages", _failed)
    return _lib


def available() -> bool:
    """Whether copy2d can run here (a CUDA driver is loaded and torch sees a GPU)."""
    return torch.cuda.is_available() and _driver() is not None


def _check(lib, rc: int, what: str) -> None:
    if rc:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(rc, ctypes.byref(name))
        raise RuntimeError(f"{what} failed: CUDA driver error {rc} ({(name.value or b'?').decode()})")


def _ensure_context(lib, device: torch.device) -> None:
    """Make the device's primary context current on this thread (once per thread and device)."""
    seen = getattr(_local, "devices", None)
    if seen is None:
        seen = _local.devices = set()
    if device in seen:
        return
    ctx = ctypes.c_void_p()
    _check(lib, lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:
        torch.cuda.set_device(device)  # the runtime makes the primary context current
        _check(lib, lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            raise RuntimeError(f"no CUDA context current on this thread for {device}")
    seen.add(device)


def copy2d(dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int,
           stream: torch.cuda.Stream) -> None:
    """Queue on `stream` a copy of `height` rows of `width` bytes from host address `src` (rows
    `src_pitch` apart; page-locked memory, else the driver stages it synchronously) to device
    address `dst` (rows `dst_pitch` apart). Raises RuntimeError naming the driver's error."""
    copy2d_many([(dst, dst_pitch, src, src_pitch, width, height)], stream)


def copy2d_many(copies, stream: torch.cuda.Stream) -> None:
    """copy2d for each (dst, dst_pitch, src, src_pitch, width, height) of `copies`, in order, on one
    stream: the context check once and one parameter block reused (a layered load queues one copy
    per layer and slab run: 160 at 32K tokens)."""
    lib = _driver()
    if lib is None:
        raise RuntimeError(f"strided copies unavailable: {_failed}")
    _ensure_context(lib, stream.device)
    p = _Memcpy2D(srcMemoryType=_HOST, dstMemoryType=_DEVICE)
    ref, handle, call = ctypes.byref(p), stream.cuda_stream, lib.cuMemcpy2DAsync_v2
    for dst, dst_pitch, src, src_pitch, width, height in copies:
        if width > src_pitch or width > dst_pitch:
            raise ValueError(f"row width {width} exceeds a pitch (src {src_pitch}, dst {dst_pitch})")
        p.srcHost, p.srcPitch, p.dstDevice, p.dstPitch = src, src_pitch, dst, dst_pitch
        p.WidthInBytes, p.Height = width, height
        _check(lib, call(ref, handle), "cuMemcpy2DAsync")

