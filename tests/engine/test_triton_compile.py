"""Every Triton kernel that the interpreter tests launch compiles for sm_90 (Hopper) on a machine
without a GPU (tests/aot_record.py: the launches recorded under TRITON_INTERPRET=1, then compiled
by Triton's compiler and the ptxas it ships). The interpreter runs kernels as Python and accepts
code the compiler rejects; GPU time is scarce, so CI checks the compile too."""
from __future__ import annotations

import pytest

from tests import aot_record

pytest.importorskip("triton")


def _compile_or_skip(records: list[dict]) -> list[str]:
    pytest.importorskip("triton.backends.compiler")  # the ahead-of-time compile API (GPUTarget, ASTSource)
    failures = aot_record.compile_all(records)
    if failures and all("ptxas" in f and ("No such file" in f or "not found" in f) for f in failures):
        pytest.skip(f"no ptxas in this triton: {failures[0]}")
    return failures


def _check(script: str, argv=(), least: int = 1) -> None:
    records = aot_record.record(script, argv)
    done = [r for r in records if "skip" not in r]
    assert len(done) >= least, records  # the recorder saw the launches
    failures = _compile_or_skip(records)
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(900)
def test_moe_kernels_compile_for_hopper():
    """align (one program, and two launches), the fused GEMMs, the router, every TMA variant and the
    k slots' sum."""
    from tests.engine import test_moe_kernels as t
    _check(t.INTERP + "\n" + t.INTERP_TMA, least=8)


@pytest.mark.timeout(900)  # the interpreter runs and ptxas from a cold cache: 300+ s on a slow 2-core VM
def test_attention_kernels_compile_for_hopper(qwen_dir):
    """Prefill (split-K, fixed plans), decode, merge, RMSNorm, q/k norm + RoPE, the cache store,
    as the interpreter test and its engine runs launch them."""
    from tests.engine import test_attention_kernels as t
    _check("\n".join((t.INTERP_KERNELS, t.INTERP_TMA, t.INTERP_PREFILL, t.INTERP_ENGINE)), [str(qwen_dir)], least=6)


WIDE_TMA = """
import torch
from tests.engine.test_attention_kernels import make_step
from engine.attention import prefill_inputs
from engine.attention.triton_prefill import prefill_attention
q, k, v, kc, vc, meta = make_step([(300, 5)], 32, 4, 128, 16, torch.bfloat16, "cpu", runs=-1)
tables, starts, q_lens, k_lens, max_q, max_k = prefill_inputs(meta, 16, q.device)
out = torch.zeros_like(q)
prefill_attention(q, kc, vc, out, tables, starts, q_lens, k_lens, max_q, 128 ** -0.5, max_k,
                  tiles=(128, 128, 8, 2), tma=True)
"""


def test_device_hit_attention_plan_fits_hopper_shared_memory():
    """The prefill kernel as a device hit runs it on the H200 (bf16, 32 / 4 heads of 128, 128 x 128
    tiles in 2 stages, split-K, TMA tiles) compiles for sm_90 within its shared memory: a second
    TMA loop once doubled its buffers (288 KiB) and every launch failed on the GPU (run EL)."""
    _check(WIDE_TMA)


def test_checksum_and_hostcopy_kernels_compile_for_hopper():
    from tests.kvc import test_gpu_checksum as c, test_hostcopy as h
    _check(f"SIZES = {c.SIZES!r}\n" + c.INTERP + "\n" + h.INTERP, least=2)


MLA = """
import torch
from engine.attention.triton_cache import store_rows
from engine.attention.triton_mla import mla_attention
from tests.engine.test_mla_kernel import make_pool
for H, r, dr, P, dtype in ((16, 512, 64, 16, torch.bfloat16), (128, 512, 64, 64, torch.bfloat16),
                           (16, 512, 64, 16, torch.float32)):
    pool, tables, _ = make_pool([40], P, r + dr, dtype, "cpu")
    q = torch.randn(4, H, r + dr).to(dtype)
    one = torch.ones(1, dtype=torch.int32)
    for block_m in (16, 64):
        mla_attention(q, pool, r, one * 0, one * 3, one * 40, tables, 3, 40, 0.1,
                      torch.empty(1, 3 * H, r, dtype=dtype), block_m)
    store_rows(q[:, 0].contiguous(), pool, torch.tensor([5, -1, 7, 2]))
"""


def test_mla_kernel_compiles_for_hopper():
    """The MLA latent kernel at DeepSeek-V2-Lite's and V3's sizes (r 512, dr 64; 16 and 128 heads),
    bf16 and fp32, rows in blocks of 16 and 64, its merge and the latent rows' store, within sm_90's
    shared memory."""
    _check(MLA, least=2)
