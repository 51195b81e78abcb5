"""The native CPU expert kernel: experts.c (with pool.h, dot.h) compiled at first use, loaded with ctypes.

One call per MoE layer (`kvc_moe`): it sorts the (token, expert) pairs, then a pthread pool runs
gate/up with silu * up fused, then down, writing out [T, H] fp32; each weight row is read once per
call and every thread streams its own rows (details in experts.c). ctypes releases the GIL for the
call, so the worker thread holds no lock while the kernel runs. The pool is the kernel's own
threads, not torch's OpenMP pool: torch's threads of the calling thread sit idle during the call.

Build: kvc.native's builder, `cc -O3 -march=native` (the compiler enables exactly the extensions the
CPU has: AVX-512, avx512_bf16 dpbf16, avx512_vnni dpbusd; scalar C where it has none), cached under
a name keyed by the source and headers, the compiler's version and the CPU's flags. A missing
compiler or a failed build logs one line and returns None: the callers then use the torch kernels.

int8: w8a8 (per-channel int8 weights, per-row int8 activations as u8 with zero point 128, VNNI
dpbusd: 64 multiply-adds per instruction) is the default over weight-only int8 (int8 -> fp32
converts + FMA: 16 per instruction plus 2 converts, so more compute per weight byte). Measured on
the H200 host (one layer, 64 CPU experts): w8a8 0.68 / 1.89 / 2.99 ms at 1 / 8 / 32 tokens against
0.75 / 2.15 / 3.95 weight-only, and 57 against 169 ms at 2048 (benchmarks/RESULTS.md, "Native CPU
expert kernel"). w8a8 also quantizes exactly as the torch int8 path does, so the two agree.
Where the CPU has VNNI and the sizes are multiples of 16, the int8 copy is stored packed for dpbusd
(`pack16`: 16 rows x 4 bytes per vector; no horizontal sums, a vector epilogue): 1.2-1.4x faster
than plain rows at decode on the 2-core VM, slower at prefill there (300-2048 tokens: 1.2-1.3x), and
the torch int8 kernels cannot read it, so packed int8 runs native at every size.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from kvc import native as kvc_native

log = logging.getLogger("kvc.engine.experts")

SOURCE = Path(__file__).with_name("experts.c")
WF = {"float32": 0, "bfloat16": 1, "int8": 2, "int8_wo": 3, "int8_packed": 4}  # experts.c weight formats
_libs: dict[tuple, "NativeLib | None"] = {}


class NativeLib:
    """The loaded kernel: `moe` one layer call, `pool` a thread pool for it."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))  # CDLL: the GIL is released during calls
        P, I32, F64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
        lib.kvc_pool_new.argtypes, lib.kvc_pool_new.restype = [I32], P
        lib.kvc_pool_free.argtypes, lib.kvc_pool_free.restype = [P], None
        lib.kvc_moe.argtypes = [P, I32, P, I32, I32, I32, I32, I32, I32, P, P, P, P, P, P, P, P, P, F64]
        lib.kvc_moe.restype = ctypes.c_long
        lib.kvc_isa.restype = I32
        lib.kvc_pool_phases.argtypes, lib.kvc_pool_phases.restype = [P, P], None
        lib.kvc_quant_rows.argtypes, lib.kvc_quant_rows.restype = [P, I32, I32, I32, P, P], None
        self._lib = lib
        isa = lib.kvc_isa()
        self.isa = "+".join(n for b, n in ((1, "avx512"), (2, "bf16"), (4, "vnni")) if isa & b) or "scalar"

    def pool(self, threads: int) -> "NativePool":
        return NativePool(self, threads)

    def moe(self, pool: "NativePool", wf: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
            w13: torch.Tensor, w2: torch.Tensor, s13, s2, rs13, rs2, out: torch.Tensor, max_rows: float) -> int:
        """out [T, H] fp32 over the pairs ids >= 0; the pair count, or -2 when rows per expert > max_rows."""
        return self.moe_bound(pool, weight_args(wf, w13, w2, s13, s2, rs13, rs2), x, ids, weights, out, max_rows)

    def moe_bound(self, pool: "NativePool", wargs: tuple, x: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor, out: torch.Tensor, max_rows: float) -> int:
        """`moe` with a layer's weight arguments made once (`weight_args`): a decode step's call then
        reads four pointers (its Python and ctypes took ~20 us of a ~210 us 1-token int8 call on the
        H200 host, run BZ). x [T, H] fp32/bf16, ids [T, k] int64, weights [T, k] fp32 and out
        [T, H] fp32, all contiguous (the caller's contract; the kernel reads them by pointer)."""
        T, k = ids.shape
        wf, E, H, I, w13, w2, s13, s2, rs13, rs2 = wargs
        n = self._lib.kvc_moe(pool.handle, wf, x.data_ptr(), 1 if x.dtype == torch.bfloat16 else 0, T, H, I, k, E,
                              ids.data_ptr(), weights.data_ptr(), w13, w2, s13, s2, rs13, rs2, out.data_ptr(), max_rows)
        if n == -1:
            raise ValueError(f"expert id out of range (>= {E}) in the CPU expert ids")
        if n == -4:
            raise ValueError("packed int8 CPU experts need a VNNI build and hidden / intermediate sizes divisible by 16")
        if n == -3:
            raise MemoryError("native CPU experts: scratch allocation failed")
        return n

    def quant_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's per-row int8 quantization of x [T, H] (fp32 or bf16): (int8 [T, H], fp32
        scales [T, 1]), as engine.offload.grouped.quantize_rows computes them."""
        x = x.contiguous()
        T, H = x.shape
        q = torch.empty(T, H, dtype=torch.uint8)
        s = torch.empty(T, 1, dtype=torch.float32)
        self._lib.kvc_quant_rows(x.data_ptr(), 1 if x.dtype == torch.bfloat16 else 0, T, H, q.data_ptr(), s.data_ptr())
        return (q.to(torch.int16) - 128).to(torch.int8), s


def weight_args(wf: int, w13: torch.Tensor, w2: torch.Tensor, s13, s2, rs13, rs2) -> tuple:
    """A layer's constant arguments of kvc_moe: (wf, E, H, I, then the pointers of w13, w2, s13, s2,
    rs13, rs2, None where absent). The caller keeps the tensors alive while it uses them."""
    E, H, I = w2.shape
    ptr = (lambda t: None if t is None else t.data_ptr())
    return (wf, E, H, I, w13.data_ptr(), w2.data_ptr(), ptr(s13), ptr(s2), ptr(rs13), ptr(rs2))


class NativePool:
    """The kernel's thread pool; `lib` the NativeLib it runs (a layer call reaches the kernel
    through it, not through library(), whose cache key costs a directory glob: ~60 us a call on the
    2-core VM, a tenth of a 1-token int8 layer)."""

    def __init__(self, lib: NativeLib, threads: int):
        self.lib, self.threads = lib, threads
        self.handle = lib._lib.kvc_pool_new(threads)
        if not self.handle:
            raise MemoryError("native CPU experts: pool allocation failed")

    def phases(self) -> dict[str, float]:
        """Seconds per phase of the kernel's calls since the last read (setup: pair sorting; x: the
        input rows converted or quantized; gu: gate/up; q: the activations quantized (w8a8); down),
        summed, and "calls"; reading resets them."""
        out = (ctypes.c_double * 6)()
        self.lib._lib.kvc_pool_phases(self.handle, out)
        return dict(zip(("setup", "x", "gu", "q", "down", "calls"), out))

    def close(self) -> None:
        if self.handle:
            self.lib._lib.kvc_pool_free(self.handle)
            self.handle = None


def pack16(q: torch.Tensor) -> torch.Tensor:
    """int8 [E, N, K] (N % 16 == 0, K % 4 == 0) -> the same shape holding blocks [N/16][K/4][16][4]:
    one 64-byte vector is 4 bytes of 16 rows, what dpbusd multiplies with 4 broadcast activation bytes."""
    E, N, K = q.shape
    return q.view(E, N // 16, 16, K // 4, 4).permute(0, 1, 3, 2, 4).contiguous().view(E, N, K)


def unpack16(p: torch.Tensor) -> torch.Tensor:
    """The inverse of pack16: the plain [E, N, K] rows."""
    E, N, K = p.shape
    return p.view(E, N // 16, K // 4, 16, 4).permute(0, 1, 3, 2, 4).contiguous().view(E, N, K)


def library(cc: str | None = None, directory: Path | None = None, flags: tuple[str, ...] = ()) -> NativeLib | None:
    """The kernel built for this CPU (once per process and arguments), or None when it cannot be built."""
    cc = kvc_native.compiler(cc)
    directory = Path(directory) if directory is not None else kvc_native.cache_dir()
    headers = sorted(SOURCE.parent.glob("*.h"))  # experts.c's headers: part of the build's key
    return kvc_native.once(
        _libs, (cc, str(directory), flags),
        lambda: NativeLib(kvc_native.build(SOURCE, "kvc_experts", cc, directory, ("-pthread", *flags),
                                           headers, ("-lm",))),
        log, "experts: native CPU expert kernel unavailable", "CPU experts use the torch kernels")
