"""The native CPU expert kernel against per-expert references, its ISA fallbacks, its build fallback, the engine."""
from __future__ import annotations

import dataclasses
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from prometheus_client import CollectorRegistry

from kvc.config import ConfigError, load_config
from engine.moe import route
from engine.offload import cpu_experts, native
from engine.offload.grouped import ExpertThreads, grouped_cpu_experts, prepare
from engine.tiny import make_tiny_model
from .test_cpu_experts import greedy, make_engine

E, H, I, K = 12, 80, 40, 3  # H, I: not multiples of the vector widths, so the masked tails run
PH, PI = 64, 48  # packed int8 needs multiples of 16
INF = float("inf")

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture(scope="module")
def pools():
    ps = {n: ExpertThreads(n) for n in (1, 3)}
    yield ps
    for p in ps.values():
        p.close()


def weights(seed=0, h=H, i=I):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * i, h, generator=g) * 0.3, torch.randn(E, h, i, generator=g) * 0.3


def routings(H=H):
    """(name, x, ids, weights) for T = 1, 8, 32, 300; an idle expert; one expert with every pair; none."""
    g = torch.Generator().manual_seed(5)
    out = []
    for T in (1, 8, 32, 300):
        ids, w = route(torch.randn(T, E, generator=g), K, True)
        ids = ids.masked_fill((ids % 4 == 1) | (ids == 5), -1)  # expert 5 never runs here
        out.append((f"random{T}", torch.randn(T, H, generator=g), ids, w))
    ids = torch.full((33, K), -1)
    ids[:, 1] = 6
    out.append(("one", torch.randn(33, H, generator=g), ids, torch.rand(33, K, generator=g)))
    out.append(("none", torch.randn(3, H, generator=g), torch.full((3, K), -1), torch.rand(3, K, generator=g)))
    return out


def reference(x, ids, w, f13, f2, act=lambda v: v, inp=lambda v: v):
    """fp32 per pair: inp(x) @ f13[e].T, act(silu(g) * u) @ f2[e].T, weighted; f13/f2 fp32 weights."""
    I = f2.shape[2]
    want = torch.zeros(x.shape[0], f2.shape[1], dtype=torch.float64)
    for t, j in (ids >= 0).nonzero().tolist():
        e = int(ids[t, j])
        h = inp(x[t:t + 1].float()) @ f13[e].T  # [1, 2I]
        a = act(F.silu(h[:, :I]) * h[:, I:])
        want[t] += float(w[t, j]) * (a @ f2[e].T)[0].double()
    return want.float()


def fake_quant(v):  # per-row symmetric int8 and back, as the w8a8 kernel rounds activations
    s = v.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(v / s).clamp(-127, 127) * s


KERNEL = {"int8_wo": "native_wo", "int8_rows": "native_unpacked"}


def native_weights(fmt, seed=0):
    """fmt: float32, bfloat16, int8_rows (w8a8 on plain rows), int8_wo (weight-only), int8 (packed w8a8)."""
    w13, w2 = weights(seed, *((PH, PI) if fmt == "int8" else (H, I)))
    wt = prepare(w13, w2, "int8" if fmt.startswith("int8") else fmt, kernel=KERNEL.get(fmt, "native"))
    assert wt.kernel == "native", "the native kernel did not build"
    # packed int8 where the build has VNNI (an AVX2-only CPU builds the scalar kernel: plain rows)
    packed = native.WF["int8_packed"] if "vnni" in native.library().isa else native.WF["int8"]
    want = {"int8": packed, "int8_rows": native.WF["int8"]}.get(fmt, native.WF.get(fmt))
    assert wt.native_wf == want
    return dataclasses.replace(wt, max_rows=INF), w13, w2


def plain(wt):
    """The int8 weights as rows (packed ones unpacked)."""
    if wt.native_wf == native.WF["int8_packed"]:
        return native.unpack16(wt.w13), native.unpack16(wt.w2)
    return wt.w13, wt.w2


def expected(fmt, wt, w13, x, ids, w):
    if fmt == "float32":
        want = torch.empty(x.shape)
        cpu_experts(w13, wt.w2, x, ids, w, want)
        return want
    if fmt == "bfloat16":
        bf = (lambda v: v.bfloat16().float())
        return reference(x, ids, w, wt.w13.float(), wt.w2.float(), act=bf, inp=bf)
    q13, q2 = plain(wt)
    d13, d2 = q13.float() * wt.s13[..., None], q2.float() * wt.s2[..., None]
    if fmt in ("int8", "int8_rows"):
        return reference(x, ids, w, d13, d2, act=fake_quant, inp=fake_quant)
    return reference(x, ids, w, d13, d2)  # int8 weight-only: fp32 activations


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "int8_rows", "int8_wo"])
def test_native_equals_the_per_expert_reference(pools, fmt):
    wt, w13, w2 = native_weights(fmt)
    for name, x, ids, w in routings(w2.shape[1]):
        want = expected(fmt, wt, w13, x, ids, w)
        for threads in (1, 3):
            out = torch.full(x.shape, float("nan"))
            assert grouped_cpu_experts(wt, x, ids, w, out, pools[threads]) == int((ids >= 0).sum())
            # fp32 sums in another order; bf16 / w8a8: one activation may round the other way
            tol = 1e-5 if fmt in ("float32", "int8_wo") else 2e-3
            torch.testing.assert_close(out, want, atol=tol * float(want.abs().max() + 1), rtol=tol,
                                       msg=f"{fmt} {name} threads {threads}")
            if name == "none":
                assert out.eq(0).all()


def test_a_layer_copy_reads_its_own_weights(pools):
    """The kernel's weight pointers are made once per weights object: a copy with other tensors
    (dataclasses.replace, as a decoder layer's own experts are made) reads its own, never the
    first object's; non-contiguous and int32 inputs are made contiguous int64 / fp32 first."""
    wt, _, _ = native_weights("float32")
    _, x, ids, w = routings()[1]
    a, b = torch.empty(x.shape), torch.empty(x.shape)
    grouped_cpu_experts(wt, x, ids, w, a, pools[3])  # wt's pointers made here
    other = dataclasses.replace(wt, w13=wt.w13 * 2, w2=wt.w2.clone())
    grouped_cpu_experts(other, x, ids, w, b, pools[3])
    assert other.native_args[4] == other.w13.data_ptr() != wt.native_args[4]
    assert not torch.allclose(a, b)
    c = torch.empty(x.shape)
    grouped_cpu_experts(wt, x.t().contiguous().t(), ids.to(torch.int32), w.double().t().contiguous().t(), c, pools[3])
    torch.testing.assert_close(c, a)


def test_bf16_activations_are_accepted_as_they_are(pools):
    """bf16 x with bf16 weights is read in place; fp32 x is rounded to bf16 first: the same result."""
    wt, _, _ = native_weights("bfloat16")
    _, x, ids, w = routings()[2]
    a, b = torch.empty(x.shape[0], H), torch.empty(x.shape[0], H)
    grouped_cpu_experts(wt, x.bfloat16(), ids, w, a, pools[3])
    grouped_cpu_experts(wt, x.bfloat16().float(), ids, w, b, pools[3])
    assert torch.equal(a, b)


def test_the_pool_counts_its_calls_and_phase_times(pools):
    """NativePool.phases: seconds per phase summed over the calls since the last read, and the call
    count (bench_offload prints them per row); reading resets them."""
    wt, _, _ = native_weights("int8")
    pool = pools[3].native()
    pool.phases()
    for _, x, ids, w in routings()[:3]:
        grouped_cpu_experts(wt, x, ids, w, torch.empty(x.shape[0], H), pools[3])
    ph = pool.phases()
    assert ph["calls"] == 3 and ph["gu"] > 0 and ph["down"] > 0, ph
    assert all(v >= 0 for v in ph.values()), ph
    assert pool.phases()["calls"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_int8_quantization_equals_torchs(dtype):
    """The w8a8 calls' per-row quantization (vectorized with AVX-512) gives the very int8 values and
    scales of grouped.quantize_rows: lengths with masked tails, exact .5 ties (round half to even),
    a zero row, a row with one nonzero value, huge and tiny magnitudes."""
    from engine.offload.grouped import quantize_rows
    g = torch.Generator().manual_seed(3)
    lib = native.library()
    for n in (1, 15, 16, 17, 80, 768, 2048 + 7):
        x = torch.randn(6, n, generator=g) * torch.tensor([1.0, 1e-30, 1e30, 0.0, 1.0, 3.0])[:, None]
        x[4] = 0
        x[4, n // 2] = -2.5
        x[5] = (torch.arange(n) % 254 - 127) + 0.5  # k + 0.5 with a max of exactly 127: scale 1, exact ties
        x[5, 0] = 127
        x = x.to(dtype)
        q, s = lib.quant_rows(x)
        want_q, want_s = quantize_rows(x)
        assert torch.equal(s, want_s), (n, s.flatten(), want_s.flatten())
        assert torch.equal(q, want_q), (n, (q != want_q).nonzero()[:5])


def test_prefill_sized_calls_go_to_the_torch_kernel(pools):
    wt, w13, _ = native_weights("float32")
    _, x, ids, w = routings()[3]  # 300 tokens: ~50 pairs per active expert
    torch_out, nat, hand = (torch.empty(x.shape[0], H) for _ in range(3))
    grouped_cpu_experts(wt.torch_kernel(), x, ids, w, torch_out, pools[3])
    grouped_cpu_experts(wt, x, ids, w, nat, pools[3])
    grouped_cpu_experts(dataclasses.replace(wt, max_rows=4.0), x, ids, w, hand, pools[3])
    assert wt.torch_kernel().kernel == "grouped_mm"
    assert torch.equal(hand, torch_out) and not torch.equal(nat, torch_out)  # the hand-off ran torch's kernel
    torch.testing.assert_close(nat, torch_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flags", [("-mno-avx512bf16", "-mno-avx512vnni"), ("-mno-avx512f",), ("-DL2_BLOCK=512",),
                                   ("-DSPLIT1=1", "-DGU_TASKS=16", "-DDOWN_TASKS=2", "-DGU_TASKS_PACKED=16", "-DDOWN_TASKS_PACKED=2", "-DPIN=1")],
                         ids=["avx512f-only", "scalar", "small-l2-blocks", "decode-task-variants"])
def test_isa_fallbacks_equal_the_native_build(tmp_path, flags):
    """The same source built without bf16/VNNI dot products, without AVX-512, with weight sub-blocks
    of a row or two (prefill's loop order, many blocks per task), or with the decode settings the
    benchmark compares (two chains for a packed 1-token dot, other task sizes): the same numbers."""
    lib, base = native.library(directory=tmp_path, flags=flags), native.library()
    assert lib is not None and base is not None and lib.path != base.path
    if base.isa == "scalar":  # a CPU without AVX-512: every build is the plain C loop
        assert lib.isa == "scalar"
    else:
        assert lib.isa == {"-mno-avx512bf16": "avx512", "-mno-avx512f": "scalar"}.get(flags[0], base.isa)
    pool = lib.pool(3)
    try:
        for fmt in ("float32", "bfloat16", "int8", "int8_rows", "int8_wo"):
            wt, w13, w2 = native_weights(fmt)
            if wt.native_wf == native.WF["int8_packed"] and "vnni" not in lib.isa:  # packed int8 is VNNI-only:
                # the call refuses it
                with pytest.raises(ValueError, match="packed int8"):
                    x, ids, w = routings(PH)[1][1:]
                    lib.moe(pool, wt.native_wf, x, ids, w, wt.w13, wt.w2, wt.s13, wt.s2, wt.rs13, wt.rs2,
                            torch.empty(x.shape), INF)
                continue
            for name, x, ids, w in [r for r in routings(w2.shape[1]) if r[0] in ("random8", "random32", "one")]:
                got = torch.empty(x.shape)  # "one": 33 pairs of one expert, several groups per weight block
                lib.moe(pool, wt.native_wf, x, ids, w, wt.w13, wt.w2, wt.s13, wt.s2, wt.rs13, wt.rs2, got, INF)
                want = expected(fmt, wt, w13, x, ids, w)
                tol = 1e-5 if fmt in ("float32", "int8_wo") else 2e-3
                torch.testing.assert_close(got, want, atol=tol * float(want.abs().max() + 1), rtol=tol,
                                           msg=f"{flags} {fmt} {name}")
    finally:
        pool.close()


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])
def test_a_failed_build_falls_back_to_torch_with_one_log_line(tmp_path, monkeypatch, caplog, cc):
    monkeypatch.setenv("KVC_NATIVE_CC", cc)
    monkeypatch.setenv("KVC_NATIVE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_libs", {})
    w13, w2 = weights()
    with caplog.at_level(logging.WARNING, logger="kvc.engine.experts"):
        wt = prepare(w13, w2, "float32")
        again = prepare(w13, w2, "int8")
    assert (wt.kernel, again.kernel) == ("grouped_mm", "int_mm")
    lines = [r.getMessage() for r in caplog.records if "native CPU expert kernel unavailable" in r.getMessage()]
    assert len(lines) == 1 and "torch kernels" in lines[0], caplog.text
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_libs", {})
    lib = native.library(directory=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0] == lib.path and files[0].suffix == ".so"
    mtime = files[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_libs", {})  # a new process: finds the file, does not rebuild
    assert native.library(directory=tmp_path).path == lib.path and lib.path.stat().st_mtime_ns == mtime


def test_native_rejects_an_expert_id_out_of_range(pools):
    wt, _, _ = native_weights("float32")
    ids = torch.tensor([[0, E, -1]])
    with pytest.raises(ValueError, match="expert id out of range"):
        grouped_cpu_experts(wt, torch.randn(1, H), ids, torch.rand(1, K), torch.empty(1, H), pools[1])


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_offloaded_model_greedy_equals_the_torch_kernel(tmp_path, arch, caplog):
    path = make_tiny_model(tmp_path, arch, seed=3, num_hidden_layers=2)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 272, (int(n),), generator=g).tolist() for n in (5, 17, 40)]
    outs = {}
    for kernel in ("torch", "auto"):
        reg = CollectorRegistry()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kvc.engine.experts"):
            eng = make_engine(path, reg, gpu_experts_ratio=0.25, cpu_expert_kernel=kernel)
        line = next(r.getMessage() for r in caplog.records if "cpu experts (dtype/kernel" in r.getMessage())
        assert ("float32/native" in line and f"native {native.library().isa}" in line) == (kernel == "auto"), line
        outs[kernel] = greedy(eng, prompts, 8)
        label = "native" if kernel == "auto" else "grouped_mm"
        assert reg.get_sample_value("kvc_experts_cpu_kernel", {"layer": "0", "dtype": "float32", "kernel": label}) == 1
        assert reg.get_sample_value("kvc_experts_tokens_total", {"location": "cpu"}) > 0
        eng.close()
    assert outs["auto"] == outs["torch"]


def test_cpu_expert_kernel_choices():
    assert load_config().replace(cpu_expert_kernel="torch").experts.cpu_expert_kernel == "torch"
    with pytest.raises(ConfigError, match="cpu_expert_kernel"):
        load_config().replace(cpu_expert_kernel="native2")
