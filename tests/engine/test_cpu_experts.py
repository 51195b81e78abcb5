"""Grouped CPU experts and int8 CPU experts against plain per-expert references, and in the engine."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from prometheus_client import CollectorRegistry

from kvc.config import ConfigError, load_config
from engine import LLMEngine, SamplingParams
from engine.moe import route
from engine.offload import cpu_experts
from engine.offload.grouped import CpuExpertWeights, ExpertThreads, grouped_cpu_experts, prepare, quantize_int8
from engine.tiny import make_tiny_model

E, H, I, K = 12, 32, 24, 3


@pytest.fixture(scope="module")
def pools():
    ps = {n: ExpertThreads(n) for n in (1, 3)}  # 3 > cores here too: several ranges, several threads
    yield ps
    for p in ps.values():
        p.close()


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=g) * 0.3, torch.randn(E, H, I, generator=g) * 0.3


def routings():
    """(name, x, ids, weights): random; some experts idle; one expert takes every CPU pair; none on the CPU."""
    g = torch.Generator().manual_seed(5)
    out = []
    for T in (1, 7, 40):
        ids, w = route(torch.randn(T, E, generator=g), K, True)
        out.append((f"random{T}", torch.randn(T, H, generator=g), ids.masked_fill(ids % 4 == 1, -1), w))
    ids, w = route(torch.randn(9, E, generator=g), K, True)
    out.append(("idle", torch.randn(9, H, generator=g), ids.masked_fill(ids >= 4, -1), w))  # experts 4.. idle
    ids = torch.full((17, K), -1)
    ids[:, 0] = 6  # expert 6 has all the CPU pairs
    out.append(("one", torch.randn(17, H, generator=g), ids, torch.rand(17, K, generator=g)))
    out.append(("none", torch.randn(3, H, generator=g), torch.full((3, K), -1), torch.rand(3, K, generator=g)))
    return out


def run(wt, x, ids, w, pool):
    out = torch.full((x.shape[0], H), float("nan"))
    n = grouped_cpu_experts(wt, x, ids, w, out, pool)
    assert n == int((ids >= 0).sum())
    return out


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("kernel", ["grouped_mm", "mm"])
def test_grouped_equals_the_per_expert_loop(pools, threads, kernel):
    w13, w2 = weights()
    for fmt, tol in (("float32", 1e-5), ("bfloat16", None)):
        wt = prepare(w13, w2, fmt, kernel="torch")
        assert wt.kernel == "grouped_mm"
        wt = CpuExpertWeights(fmt, kernel, wt.w13, wt.w2)
        for name, x, ids, w in routings():
            got = run(wt, x, ids, w, pools[threads])
            want = torch.empty(x.shape[0], H)
            cpu_experts(wt.w13, wt.w2, x, ids, w, want)  # same weights, same dtype, expert by expert
            if tol is None:  # bf16: both round h and the activation to bf16; allow that rounding
                tol = 2e-2 * float(want.abs().max())
            torch.testing.assert_close(got, want, atol=tol, rtol=tol if fmt == "float32" else 2e-2, msg=name)
            if name == "none":
                assert got.eq(0).all()


def test_int8_quantization_is_per_output_channel():
    w13, _ = weights()
    before = w13.clone()
    q, s = quantize_int8(w13, chunk=5)  # chunks that do not divide E
    assert torch.equal(w13, before)  # fp32 weights are not scaled in place
    assert q.dtype == torch.int8 and s.shape == (E, 2 * I) and q.abs().max() == 127
    torch.testing.assert_close(s, w13.abs().amax(-1) / 127)
    assert ((q.float() * s[..., None] - w13).abs() <= s[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("kernel", ["int_mm", "onednn"])
def test_int8_equals_a_dequantized_reference(pools, kernel):
    """w8a8: dequantized weights, activations rounded per token as the kernel does, in fp32. oneDNN's
    int8 linear saturates without VNNI (it failed this comparison on an AVX2 machine): there
    prepare refuses it, naming the CPU feature."""
    from engine.offload.grouped import cpu_has_vnni
    w13, w2 = weights(1)
    if kernel == "onednn" and not cpu_has_vnni():
        with pytest.raises(ValueError, match="VNNI"):
            prepare(w13, w2, "int8", kernel, kernel="torch")
        return
    wt = prepare(w13, w2, "int8", kernel, kernel="torch")
    assert (wt.fmt, wt.kernel, wt.w13.dtype) == ("int8", kernel, torch.int8)
    d13, d2 = wt.w13.float() * wt.s13[..., None], wt.w2.float() * wt.s2[..., None]

    def fake_quant(v):  # [n, K] per-row symmetric int8, back to fp32
        s = v.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        return torch.round(v / s).clamp(-127, 127) * s

    for name, x, ids, w in routings():
        want = torch.zeros(x.shape[0], H)
        for t, j in (ids >= 0).nonzero().tolist():
            e = int(ids[t, j])
            h = fake_quant(x[t:t + 1]) @ d13[e].T  # [1, 2I]
            a = fake_quant(F.silu(h[:, :I]) * h[:, I:])
            want[t] += w[t, j] * (a @ d2[e].T)[0]
        for threads in (1, 3):
            torch.testing.assert_close(run(wt, x, ids, w, pools[threads]), want, atol=1e-4, rtol=1e-4, msg=name)


def make_engine(path, registry=None, **kw):
    cfg = load_config().replace(path=str(path), dtype="float32", device="cpu", gpu_only=True,
                                num_device_blocks=64, page_size=4, **kw)
    return LLMEngine(cfg, registry=registry)


def greedy(eng, prompts, n):
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_int8_greedy_agrees_with_the_unquantized_model(tmp_path, arch):
    """int8 is an approximation. Next-token agreement over 16 prompts (same context on both sides) is
    the check; whole greedy continuations are printed too (one flipped near-tie changes the rest)."""
    path = make_tiny_model(tmp_path, arch, seed=2, num_hidden_layers=2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 272, (int(n),), generator=g).tolist() for n in torch.randint(4, 30, (16,), generator=g)]
    want = greedy(make_engine(path), prompts, 8)
    reg = CollectorRegistry()
    eng = make_engine(path, reg, gpu_experts_ratio=0.25, cpu_expert_dtype="int8")
    got = greedy(eng, prompts, 8)
    eng.close()
    assert reg.get_sample_value("kvc_experts_cpu_kernel", {"layer": "0", "dtype": "int8", "kernel": "native"}) == 1
    first = sum(a[0] == b[0] for a, b in zip(got, want)) / len(want)
    same = sum(a == b for ga, wa in zip(got, want) for a, b in zip(ga, wa)) / sum(map(len, want))
    print(f"\n{arch}: int8 next-token agreement {first:.0%} of {len(want)} prompts, greedy tokens {same:.0%}")
    assert first >= 0.75


@pytest.mark.parametrize("strategy", ["uniform", "frequency", "front-loading", "random"])
def test_every_strategy_runs_int8(tmp_path_factory, strategy):
    path = make_tiny_model(tmp_path_factory.mktemp("i8"), "qwen3_moe", seed=1, num_hidden_layers=2)
    prompt = [5, 17, 200, 33, 91, 4, 250, 60, 61]
    want = greedy(make_engine(path), [prompt], 4)
    reg = CollectorRegistry()
    eng = make_engine(path, reg, gpu_experts_ratio=0.5, placement_strategy=strategy, cpu_expert_dtype="int8")
    assert all(b.cpu.fmt == "int8" for b in eng.experts.backends.values())
    got = greedy(eng, [prompt], 4)
    eng.close()
    assert got[0][0] == want[0][0] and reg.get_sample_value("kvc_experts_tokens_total", {"location": "cpu"}) > 0


def test_cpu_expert_dtype_choices():
    assert load_config().replace(cpu_expert_dtype="int8").experts.cpu_expert_dtype == "int8"
    with pytest.raises(ConfigError, match="cpu_expert_dtype"):
        load_config().replace(cpu_expert_dtype="int4")


def test_cpu_has_vnni_reads_the_flags(tmp_path):
    from engine.offload.grouped import cpu_has_vnni
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert cpu_has_vnni(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert not cpu_has_vnni(str(info))
    assert not cpu_has_vnni(str(tmp_path / "missing"))
