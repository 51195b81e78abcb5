"""The MLA latent-attention kernel (engine.attention.triton_mla) against a float64 reference over
gathered rows, and the DeepSeek engine with it against the gather + SDPA path: random block tables,
cached lengths that end mid-page, decodes of different lengths in one launch, pieces whose (query,
head) rows straddle the kernel's row blocks, splits past a row's last key.

On CUDA (`-m gpu`) at DeepSeek-V2-Lite's sizes; on CPU under triton's interpreter (TRITON_INTERPRET=1,
in a subprocess because the flag is read when the kernels are defined) at small ones.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def make_pool(seqs: list[int], P: int, W: int, dtype, device, seed=0):
    """A latent pool [N, P, 1, W] with each sequence's k_len rows in scattered blocks.
    Returns the pool, the block tables [B, max_blocks] (padded with 0) and the gathered rows per sequence."""
    g = torch.Generator().manual_seed(seed)
    need = [(k + P - 1) // P for k in seqs]
    N = sum(need) + 3
    pool = torch.randn(N, P, 1, W, generator=g).to(dtype).to(device)
    perm = torch.randperm(N, generator=g).tolist()
    tables = torch.zeros(len(seqs), max(need), dtype=torch.int32)
    rows = []
    for b, (k, nb) in enumerate(zip(seqs, need)):
        ids = [perm.pop() for _ in range(nb)]
        tables[b, :nb] = torch.tensor(ids, dtype=torch.int32)
        rows.append(pool[ids].reshape(nb * P, W)[:k])
    return pool, tables.to(device), rows


def reference(qf: torch.Tensor, lat: torch.Tensor, r: int, scale: float) -> torch.Tensor:
    """qf [Q, H, W], the last Q of lat [K, W]'s positions, causal -> [Q, H, r] (float64)."""
    Q, K = qf.shape[0], lat.shape[0]
    s = torch.einsum("qhw,kw->qhk", qf.double(), lat.double()) * scale
    last = torch.arange(K - Q, K, device=qf.device)
    s = s.masked_fill(torch.arange(K, device=qf.device)[None, None, :] > last[:, None, None], float("-inf"))
    return torch.einsum("qhk,kr->qhr", s.softmax(-1), lat[:, :r].double())


def check_kernel(H: int, r: int, dr: int, P: int, decodes: list[int], pieces: list[tuple[int, int]], dtype,
                 device, tol: float, block_m: int | None = None, bound: int = 0, **tile) -> None:
    """decodes: key counts of single-query sequences (one launch); pieces: (q_len, k_len), one launch each;
    block_m: the kernel's rows a program (None: its default); bound: the decodes' host bound on keys
    (default a few past the longest; CUDA graphs hand max_model_len); tile: block_n / num_warps /
    num_stages / target_programs."""
    from engine.attention.triton_mla import mla_attention
    W = r + dr
    scale = W ** -0.5
    g = torch.Generator().manual_seed(1)
    if decodes:
        pool, tables, rows = make_pool(decodes, P, W, dtype, device)
        B = len(decodes)
        qf = torch.randn(B + 2, H, W, generator=g).to(dtype).to(device)  # rows 1..B used, out of order
        starts = torch.arange(B, 0, -1, dtype=torch.int32, device=device)
        out = torch.full((B, H, r), float("nan"), dtype=dtype, device=device)
        ones = torch.ones(B, dtype=torch.int32, device=device)
        k_lens = torch.tensor(decodes, dtype=torch.int32, device=device)
        mla_attention(qf, pool, r, starts, ones, k_lens, tables, 1, bound or max(decodes) + 5, scale, out, block_m,
                      **tile)
        for b, k in enumerate(decodes):
            want = reference(qf[B - b:B - b + 1], rows[b], r, scale)[0]
            torch.testing.assert_close(out[b].double(), want, atol=tol, rtol=tol)
    for Q, K in pieces:
        pool, tables, rows = make_pool([K], P, W, dtype, device, seed=Q)
        qf = torch.randn(Q + 3, H, W, generator=g).to(dtype).to(device)
        start = torch.tensor([3], dtype=torch.int32, device=device)
        out = torch.full((1, Q * H, r + 7), float("nan"), dtype=dtype, device=device)  # wider than r: a view
        mla_attention(qf, pool, r, start, start * 0 + Q, start * 0 + K, tables, Q, K, scale, out, block_m, **tile)
        want = reference(qf[3:], rows[0], r, scale)
        torch.testing.assert_close(out[0, :, :r].view(Q, H, r).double(), want, atol=tol, rtol=tol)
        assert out[0, :, r:].isnan().all()  # columns past r untouched


INTERP = r"""
import sys, torch
from tests.engine.test_mla_kernel import check_kernel, engine_tokens
# r not a power of two (masked columns), dr below 16 (padded), 3 heads (rows straddle blocks of 16)
check_kernel(3, 48, 8, 4, [1, 5, 37, 70], [(7, 30), (6, 6), (1, 9)], torch.float32, "cpu", 1e-4)
check_kernel(16, 64, 16, 16, [33, 200], [(20, 150)], torch.float32, "cpu", 1e-4)
check_kernel(3, 48, 8, 4, [9], [(30, 70), (5, 40)], torch.float32, "cpu", 1e-4, block_m=64)  # 64-row blocks
# key tiles of 16 and 64 (pages of 4 and 16: a tile of many pages, a page of many tiles), other launches
check_kernel(3, 48, 8, 4, [9, 70], [(30, 70), (5, 300)], torch.float32, "cpu", 1e-4, block_m=64, block_n=64,
             num_warps=4, num_stages=3)
check_kernel(16, 64, 16, 16, [33], [(20, 150)], torch.float32, "cpu", 1e-4, block_m=32, block_n=16, num_stages=1)
from engine.attention import triton_merge
triton_merge.MERGE_HEADS = 40  # merges in launches of 40 rows (CUDA caps a launch's grid y)
check_kernel(3, 48, 8, 4, [9, 20], [(30, 70)], torch.float32, "cpu", 1e-4)
triton_merge.MERGE_HEADS = 32768
check_kernel(16, 64, 16, 16, [130], [(9, 130)], torch.float16, "cpu", 3e-3)  # the interpreter mishandles bf16 dots
# a bound far past the keys (CUDA graphs: max_model_len): most slices empty, each sequence's at least
# MIN_SPLIT_KEYS; with a split target
check_kernel(3, 48, 8, 4, [9, 70, 600, 1], [], torch.float32, "cpu", 1e-4, bound=20000)
check_kernel(3, 48, 8, 4, [300, 5], [], torch.float32, "cpu", 1e-4, bound=9000, target_programs=64, num_stages=3)
# the merge reads no empty slice's output (the kernel leaves them unwritten): NaN there changes nothing
from engine.attention.triton_merge import merge_splits
mid_o, mid_l = torch.randn(2, 3, 20, 16), torch.randn(2, 3, 20)
mid_l[:, :, 3:17] = float("-inf")
mid_l[1, 2, :] = float("-inf")  # a row that saw no key: 0
w = torch.exp2(mid_l - mid_l.amax(-1, keepdim=True).clamp(min=-1e30)).nan_to_num(0.0)
want = (w[..., None] * mid_o).sum(2) / w.sum(-1, keepdim=True).clamp(min=1e-30)
mid_o[:, :, 3:17] = float("nan")
mid_o[1, 2] = float("nan")
out = torch.full((2, 3, 16), 7.0)
merge_splits(mid_o, mid_l, out, torch.arange(2))
torch.testing.assert_close(out, want)
(kernel, calls), (reference, none) = engine_tokens(sys.argv[1], "auto"), engine_tokens(sys.argv[1], "reference")
assert calls > 0 and none == 0, (calls, none)
assert torch.equal(kernel, reference), (kernel, reference)
split, _ = engine_tokens(sys.argv[1], "auto", split_steps=True)
assert torch.equal(split, kernel), (split, kernel)
split, _ = engine_tokens(sys.argv[1], "auto", split_steps=True, absorb_below=1)  # every piece expanded
assert torch.equal(split, kernel), (split, kernel)
print("ok")
"""


def engine_tokens(path: str, backend: str, device: str = "cpu", dtype: str = "float32",
                  split_steps: bool = False, absorb_below: int = 6) -> tuple[torch.Tensor, int]:
    """Greedy tokens of the tiny DeepSeek checkpoint at `path` with config attn.backend `backend`:
    prompts of 29 and 13 tokens in pieces of 5 (those after the first, shorter than the lowered
    absorb bound of 6, in latent form), then decodes of both in one step (the engine's own
    metadata). Returns the tokens and how many times the kernel ran. split_steps: every step,
    decodes too, through engine.prefill_graphs.MlaPrefillGraphs' pieces (padded to a bucket, static
    buffers, attention between them) without capturing graphs, each step's hidden states checked
    against the model's own forward. absorb_below: the layers' bound (1: every piece expanded)."""
    from engine.attention import triton_mla
    from prometheus_client import CollectorRegistry
    from engine import LLMEngine, SamplingParams
    from engine import mla
    from kvc.config import load_config
    cfg = load_config().replace(path=path, dtype=dtype, device=device, gpu_only=True, page_size=4, chunk_size=5,
                                num_device_blocks=64, backend=backend)
    eng = LLMEngine(cfg, registry=CollectorRegistry())
    if split_steps:
        from engine.prefill_graphs import MlaPrefillGraphs
        from tests.engine.test_attention_kernels import check_split_steps
        eng.runner.graphs = None
        pg = eng.runner.prefill_graphs = check_split_steps(eng, MlaPrefillGraphs(
            eng.model, eng.kv, eng.device, 64, capture=False, max_model_len=64))
    old, kernel, calls = mla.ABSORB_PIECES, triton_mla.mla_attention, []
    mla.ABSORB_PIECES = {"cpu": 1.0, "cuda": 1.0}  # short pieces in latent form, through the kernel
    triton_mla.mla_attention = lambda *a, **k: calls.append(1) or kernel(*a, **k)
    try:
        for layer in eng.model.model.layers:
            layer.self_attn.absorb_below = absorb_below
        greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        prompts = [[(i * 37 + 11) % 120 for i in range(29)], [(i * 5 + 1) % 120 for i in range(13)]]
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, greedy)
        got = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    got[o.request_id] = o.outputs[0].token_ids
        if split_steps:
            assert pg.replays > 0 and pg.attention_replays == 0, (pg.replays, pg.attention_replays)
        return torch.tensor([got["0"], got["1"]]), len(calls)
    finally:
        mla.ABSORB_PIECES, triton_mla.mla_attention = old, kernel
        eng.close()


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory):
    from engine.tiny import make_tiny_model
    path = tmp_path_factory.mktemp("ds")
    make_tiny_model(path, "deepseek_v3")
    return path


def test_mla_kernel_matches_reference_interpreter(ds_dir):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    r = subprocess.run([sys.executable, "-c", INTERP, str(ds_dir)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mla_kernel_matches_reference_cuda():
    """V2-Lite's sizes (16 heads, r 512, dr 64), bf16; V3's 128 heads at short lengths."""
    check_kernel(16, 512, 64, 16, [1, 100, 8191, 32768, 5000], [(64, 32768), (185, 8192), (1, 300), (7, 7)],
                 torch.bfloat16, "cuda", 2e-2)
    check_kernel(128, 512, 64, 64, [17, 4097], [(3, 1000)], torch.bfloat16, "cuda", 2e-2)
    check_kernel(16, 512, 64, 16, [77, 1000], [(30, 500)], torch.float32, "cuda", 1e-4)
    check_kernel(16, 512, 64, 16, [3000], [(64, 32768), (185, 8192), (2, 50)], torch.bfloat16, "cuda", 2e-2, 64)
    check_kernel(16, 512, 64, 16, [300], [(64, 32768), (9, 8000)], torch.bfloat16, "cuda", 2e-2, 64, block_n=64,
                 num_warps=8, num_stages=2)  # 64-key tiles (bench_mla_pieces --tiles)
    # decode's launch as the engine's CUDA graphs make it: V2-Lite's max_model_len as the bound
    from engine.attention import triton_mla as tm
    check_kernel(16, 512, 64, 16, [1, 100, 32768, 5000], [], torch.bfloat16, "cuda", 2e-2, bound=163840,
                 block_n=tm.DECODE_BLOCK_N, num_warps=tm.DECODE_WARPS, num_stages=tm.DECODE_STAGES,
                 target_programs=tm.DECODE_TARGET_PROGRAMS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deepseek_engine_kernel_equals_reference_cuda(ds_dir):
    (kernel, calls), (reference, none) = engine_tokens(str(ds_dir), "auto", "cuda"), \
        engine_tokens(str(ds_dir), "reference", "cuda")
    assert calls > 0 and none == 0, (calls, none)
    assert torch.equal(kernel, reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_deepseek_decode_graphs_equal_eager_cuda(ds_dir, dtype):
    """DeepSeek's decode steps as CUDA graphs (buckets of 1, 2, 4, 8 as requests finish at different
    lengths) give the tokens of eager steps, and the graphs ran."""
    from prometheus_client import CollectorRegistry
    from engine import LLMEngine, SamplingParams
    from kvc.config import load_config
    prompts = [[(i * 37 + 11 + j) % 120 for i in range(n)] for j, n in enumerate((45, 20, 33, 7, 60))]
    out = {}
    for eager in (True, False):
        cfg = load_config().replace(path=str(ds_dir), dtype=dtype, device="cuda", gpu_only=True, page_size=16,
                                    num_device_blocks=128, max_num_seqs=8, enforce_eager=eager)
        eng = LLMEngine(cfg, registry=CollectorRegistry())
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=(9, 4, 12, 6, 3)[i], ignore_eos=True))
        got = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    got[o.request_id] = o.outputs[0].token_ids
        out[eager] = [got[str(i)] for i in range(len(prompts))]
        graphs = eng.runner.graphs
        assert (graphs is None) == eager
        if not eager:
            assert graphs.disabled is None and graphs.replays > 0, (graphs.disabled, graphs.replays)
        eng.close()
    assert out[False] == out[True]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", [16, 2048])
def test_deepseek_prefill_graphs_equal_eager_cuda(ds_dir, dtype, chunk):
    """DeepSeek's prefill and mixed steps as piecewise graphs (engine.prefill_graphs.MlaPrefillGraphs,
    attention eager between them) give the tokens of the same steps run eagerly, cold and then
    with every prompt's pages hit in the device pool (decode graphs on in both)."""
    from prometheus_client import CollectorRegistry
    from engine import LLMEngine, SamplingParams
    from kvc.config import load_config
    prompts = [[(i * 37 + 11 + j) % 120 for i in range(n)] for j, n in enumerate((45, 20, 33, 7, 60))]
    out = {}
    for graph_tokens in (0, 4096):
        cfg = load_config().replace(path=str(ds_dir), dtype=dtype, device="cuda", gpu_only=True, page_size=16,
                                    chunk_size=chunk, num_device_blocks=128, max_num_seqs=8,
                                    prefill_graph_tokens=graph_tokens)
        eng = LLMEngine(cfg, registry=CollectorRegistry())
        got = []
        for r in range(2):  # the second round hits the first's pages
            for i, p in enumerate(prompts):
                eng.add_request(f"{r}-{i}", p + [r] * (i + 1),
                                SamplingParams(temperature=0, max_tokens=(9, 4, 12, 6, 3)[i], ignore_eos=True))
            done = {}
            while eng.has_unfinished():
                done.update({o.request_id: o.outputs[0].token_ids for o in eng.step() if o.finished})
            got.append([done[f"{r}-{i}"] for i in range(len(prompts))])
        pg = eng.runner.prefill_graphs
        if graph_tokens:
            assert pg is not None and pg.disabled is None and pg.replays > 0, getattr(pg, "disabled", None)
        else:
            assert pg is None
        out[graph_tokens] = got
        eng.close()
    assert out[4096] == out[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deepseek_expanded_decode_stays_eager_cuda(ds_dir):
    """With set_absorb(False) the decode cannot be captured (its store and gathers are not graph-safe):
    the capture is refused before its warm-up, the graphs turn off, the steps run eagerly."""
    from prometheus_client import CollectorRegistry
    from engine import LLMEngine, SamplingParams
    from kvc.config import load_config
    cfg = load_config().replace(path=str(ds_dir), dtype="float32", device="cuda", gpu_only=True, page_size=16,
                                num_device_blocks=64, max_num_seqs=4)
    eng = LLMEngine(cfg, registry=CollectorRegistry())
    eng.model.set_absorb(False)
    eng.add_request("a", list(range(3, 40)), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    assert "set_absorb" in eng.runner.graphs.disabled and eng.runner.graphs.replays == 0
    eng.close()


def test_deepseek_graph_blocker_names_what_keeps_decode_eager():
    """engine.cuda_graphs refuses a DeepSeek decode capture (before its warm-up, whose padding rows
    only the kernels' store skips) while an MLA layer is on the expanded oracle or the reference path."""
    from engine.deepseek import DeepseekCausalLM
    from engine.model_args import ModelArgs
    from engine.tiny import tiny_config
    m = DeepseekCausalLM(ModelArgs.from_dict(tiny_config("deepseek_v3", None)))
    assert m.graph_blocker() is None
    m.set_absorb(False)
    assert "set_absorb" in m.graph_blocker()
    m.set_absorb(True)
    m.model.layers[-1].self_attn.backend = "reference"
    assert "reference" in m.graph_blocker()


def expanded_reference(q, k, v, scale):
    """q [Q, h, D] the last Q of k [K, h, D] / v [K, h, Dv], causal -> [Q, h, Dv] (float64)."""
    Q, K = q.shape[0], k.shape[0]
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    s = s.masked_fill(torch.arange(K, device=q.device)[None, :] > torch.arange(K - Q, K, device=q.device)[:, None],
                      float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cudnn_expanded_matches_reference_cuda():
    """MLA's expanded pieces through cuDNN (K 192 wide, V 128, V2-Lite's 16 heads): pieces alone,
    after prefixes that are multiples of CUDNN_ALIGN and one that is not (attn.prefill_kernel cudnn),
    query counts that are not; bf16 and fp16."""
    from engine.attention import cudnn_prefill
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16):
        for Q, K in ((512, 512), (300, 300), (700, 1212), (1000, 2024), (64, 4160), (1, 513), (300, 1000)):
            q, k = (torch.randn(n, 16, 192, generator=g).to(dtype).cuda() for n in (Q, K))
            v = torch.randn(K, 16, 128, generator=g).to(dtype).cuda()
            assert cudnn_prefill.mla_cudnn_usable(q, K - Q, forced=(K - Q) % 512 != 0)  # 700 cached: forced
            got = cudnn_prefill.cudnn_expanded(q, k, v, K - Q, 192 ** -0.5)
            assert got is not None, cudnn_prefill._mla_broken
            want = expanded_reference(q, k, v, 192 ** -0.5)
            assert got.shape == (Q, 16, 128) and got.dtype == dtype
            assert (got.double() - want).abs().max().item() < 2e-2, (dtype, Q, K)
    assert not cudnn_prefill.mla_cudnn_usable(q, 100)  # a prefix off the alignment stays on SDPA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deepseek_engine_cudnn_pieces_equal_sdpa_cuda(ds_dir):
    """The tiny DeepSeek engine (bf16) on chunks of 512 (each chunk's prefix a multiple of
    CUDNN_ALIGN) gives the same greedy tokens with MLA's pieces on cuDNN as on SDPA, and cuDNN ran."""
    from prometheus_client import CollectorRegistry
    from engine import LLMEngine, SamplingParams, mla
    from engine.attention import cudnn_prefill
    from kvc.config import load_config
    prompts = [[(i * 37 + 11 + j) % 120 for i in range(n)] for j, n in enumerate((1300, 700))]
    out, calls, real = {}, [], cudnn_prefill.cudnn_expanded
    old, shares = (mla.CUDNN_PIECES, mla.CUDNN_MIN_QUERIES), mla.ABSORB_PIECES
    mla.ABSORB_PIECES = {**shares, "cuda": 0.0}  # every piece expanded: the tiny engine's are latent-short
    cudnn_prefill.cudnn_expanded = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    mla.CUDNN_MIN_QUERIES = 1  # the tiny engine's pieces are short
    try:
        for on in (False, True):
            mla.CUDNN_PIECES = on
            cfg = load_config().replace(path=str(ds_dir), dtype="bfloat16", device="cuda", gpu_only=True,
                                        page_size=16, chunk_size=512, max_num_batched_tokens=512,
                                        num_device_blocks=256)
            eng = LLMEngine(cfg, registry=CollectorRegistry())
            for i, p in enumerate(prompts):
                eng.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
            got = {}
            while eng.has_unfinished():
                for o in eng.step():
                    if o.finished:
                        got[o.request_id] = o.outputs[0].token_ids
            out[on] = [got["0"], got["1"]]
            eng.close()
            assert (len(calls) > 0) == on, len(calls)
    finally:
        (mla.CUDNN_PIECES, mla.CUDNN_MIN_QUERIES), cudnn_prefill.cudnn_expanded = old, real
        mla.ABSORB_PIECES = shares
    assert cudnn_prefill._mla_broken is None, cudnn_prefill._mla_broken
    assert out[True] == out[False]


def test_mla_cudnn_choice_follows_config(ds_dir):
    """Which expanded pieces ask for cuDNN: under attn.prefill_kernel auto, pieces after a cached
    prefix of at least CUDNN_MIN_QUERIES; cudnn forces every piece; flash / triton and
    attn.backend reference keep SDPA; engine.mla.CUDNN_PIECES False turns it off. The engine hands
    its config to the MLA layers."""
    from prometheus_client import CollectorRegistry
    from engine import LLMEngine, mla
    from kvc.config import load_config
    n = mla.CUDNN_MIN_QUERIES
    for backend, kernel, want in (("auto", "auto", {(n, 512): True, (n - 1, 512): False, (n, 0): False}),
                                  ("auto", "cudnn", {(n, 512): True, (1, 0): True, (64, 100): True}),
                                  ("auto", "flash", {(n, 512): False}), ("auto", "triton", {(n, 512): False}),
                                  ("reference", "cudnn", {(n, 512): False, (1, 0): False})):
        cfg = load_config().replace(path=str(ds_dir), device="cpu", gpu_only=True, num_device_blocks=16,
                                    backend=backend, prefill_kernel=kernel)
        eng = LLMEngine(cfg, registry=CollectorRegistry())
        try:
            layer = eng.model.model.layers[0].self_attn
            assert (layer.backend, layer.prefill_kernel) == (backend, kernel)
            assert {qo: layer.wants_cudnn(*qo) for qo in want} == want, (backend, kernel)
            old = mla.CUDNN_PIECES
            mla.CUDNN_PIECES = False
            try:
                assert not any(layer.wants_cudnn(*qo) for qo in want)
            finally:
                mla.CUDNN_PIECES = old
        finally:
            eng.close()


def stand_in_split_kernel(monkeypatch, fits: tuple) -> list:
    """_mla_split_kernel replaced by a stand-in that records each launch's (BLOCK_M, BLOCK_N, warps,
    stages) and raises OutOfResources (as a launch past the GPU's shared memory does, before it
    runs) unless (BLOCK_N, warps, stages) == fits; the merge does nothing; nothing noted yet.
    Returns the launches' list."""
    from triton.runtime.errors import OutOfResources
    from engine.attention import triton_mla as tm
    launches = []

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, BLOCK_M, BLOCK_N, num_warps, num_stages, **kw):
                launches.append((BLOCK_M, BLOCK_N, num_warps, num_stages))
                if (BLOCK_N, num_warps, num_stages) != fits:
                    raise OutOfResources(232448, 221184, "shared memory")
            return run
    monkeypatch.setattr(tm, "_mla_split_kernel", Kernel())
    monkeypatch.setattr(tm, "merge_splits", lambda *a, **k: None)
    monkeypatch.setattr(tm, "_TOO_BIG", set())
    return launches


def test_mla_piece_tile_falls_back_when_out_of_resources(monkeypatch):
    """A pieces' launch that the GPU cannot hold (OutOfResources, raised before anything runs) is
    launched again with FALLBACK_TILE and noted, so piece_tile picks the fallback from then on;
    without fallback the error reaches the caller. The kernel and merge are stand-ins that record
    the launches (the interpreter never runs out of shared memory)."""
    from triton.runtime.errors import OutOfResources
    from engine.attention import triton_mla as tm
    launches = stand_in_split_kernel(monkeypatch, tm.FALLBACK_TILE)
    H, r, dr, P = 16, 64, 16, 16
    cache = torch.zeros(4, P, 1, r + dr)
    q = torch.zeros(8, H, r + dr)
    one = torch.ones(1, dtype=torch.int32)
    tables = torch.zeros(1, 4, dtype=torch.int32)
    out = torch.zeros(1, 8 * H, r)
    tile = tm.piece_tile(cache)
    assert (tile["block_n"], tile["num_warps"], tile["num_stages"]) == (tm.PIECE_BLOCK_N, tm.PIECE_WARPS,
                                                                         tm.PIECE_STAGES) != tm.FALLBACK_TILE
    with pytest.raises(OutOfResources):
        tm.mla_attention(q, cache, r, one * 0, one * 8, one * 40, tables, 8, 40, 0.1, out, **tile)
    assert tm.piece_tile(cache) == tile  # nothing noted without fallback
    launches.clear()
    tm.mla_attention(q, cache, r, one * 0, one * 8, one * 40, tables, 8, 40, 0.1, out, **tile, fallback=tm.FALLBACK_TILE)
    assert [n[1:] for n in launches] == [(tm.PIECE_BLOCK_N, tm.PIECE_WARPS, tm.PIECE_STAGES), tm.FALLBACK_TILE]
    after = tm.piece_tile(cache)
    assert (after["block_n"], after["num_warps"], after["num_stages"]) == tm.FALLBACK_TILE
    assert tm.piece_tile(cache.double())["block_n"] == tm.PIECE_BLOCK_N  # noted per dtype (and device, width)


def test_mla_decode_tile_falls_back_when_out_of_resources(monkeypatch):
    """Decode's launch (decode_tile) falls back to DECODE_FALLBACK, not the pieces' tile, when the GPU
    cannot hold it, and decode_tile picks the fallback from then on (stand-in kernel as above)."""
    from engine.attention import triton_mla as tm
    launches = stand_in_split_kernel(monkeypatch, tm.DECODE_FALLBACK)
    monkeypatch.setattr(tm, "DECODE_BLOCK_N", 128)
    monkeypatch.setattr(tm, "DECODE_STAGES", 3)
    H, r, dr, P, B = 16, 64, 16, 16, 3
    cache = torch.zeros(8, P, 1, r + dr)
    q = torch.zeros(B, H, r + dr)
    idx = torch.arange(B, dtype=torch.int32)
    lens = torch.tensor([5, 40, 17], dtype=torch.int32)
    tables = torch.zeros(B, 4, dtype=torch.int32)
    out = torch.zeros(B, H, r)
    tile = tm.decode_tile(cache)
    assert tile == dict(block_m=tm.BLOCK_M, block_n=128, num_warps=tm.DECODE_WARPS, num_stages=3)
    tm.mla_attention(q, cache, r, idx, idx * 0 + 1, lens, tables, 1, 64, 0.1, out, **tile,
                     fallback=tm.DECODE_FALLBACK)
    assert launches == [(tm.BLOCK_M, 128, tm.DECODE_WARPS, 3), (tm.BLOCK_M, *tm.DECODE_FALLBACK)]
    assert tm.decode_tile(cache) == dict(block_m=tm.BLOCK_M, **dict(zip(("block_n", "num_warps", "num_stages"),
                                                                         tm.DECODE_FALLBACK)))
    assert tm.piece_tile(cache)["block_n"] == tm.PIECE_BLOCK_N  # the pieces' launch is noted apart
