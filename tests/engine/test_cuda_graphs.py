"""Decode and prefill CUDA graphs and the attention kernels inside the engine: greedy tokens equal
eager steps and the gather+SDPA reference across page sizes, chunk sizes, GQA ratios and ragged batches.
The GPU tests run on the device (`-m gpu`); bucket sizing and the CPU fallback run everywhere."""
from __future__ import annotations

import sys
import threading

import pytest
import torch

from engine import LLMEngine, SamplingParams
from engine.cuda_graphs import buckets
from engine.prefill_graphs import buckets as prefill_buckets
from engine.tiny import make_tiny_model
from kvc.config import ConfigError, load_config

PROMPTS = [[(i * 37 + 11 + j) % 250 for i in range(n)] for j, n in enumerate((45, 20, 33, 7, 60, 16))]


def engine(path, dtype="float32", device="cuda", **kw):
    cfg = load_config().replace(**{"path": str(path), "dtype": dtype, "device": device, "num_device_blocks": 256,
                                   "gpu_only": True, "max_num_seqs": 8, **kw})
    return LLMEngine(cfg)


_ids = iter(range(1 << 30))


def run(eng, prompts, max_tokens=(9, 4, 12, 6, 3, 10)):
    """Greedy tokens per prompt; different max_tokens so the decode batch shrinks through buckets."""
    tag = f"r{next(_ids)}"
    for i, p in enumerate(prompts):
        eng.add_request(f"{tag}-{i}", p, SamplingParams(temperature=0, max_tokens=max_tokens[i % len(max_tokens)],
                                                        ignore_eos=True))
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    return [done[f"{tag}-{i}"] for i in range(len(prompts))]


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(48) == [1, 2, 4, 8, 16, 32, 48]


def test_a_failed_capture_disables_the_graphs_once(caplog):
    from engine.cuda_graphs import ensure_captured

    class Owner:
        graphs, disabled, tries = {}, None, 0

        def _capture(self, size):
            self.tries += 1
            if size > 4:
                raise RuntimeError("operation not permitted when stream is capturing")
            self.graphs[size] = "graph"
    o = Owner()
    assert ensure_captured(o, 4, "decode") and ensure_captured(o, 4, "decode") and o.tries == 1
    assert not ensure_captured(o, 8, "prefill") and "not permitted" in o.disabled
    assert "prefill CUDA graphs off" in caplog.text


def test_prefill_buckets():
    assert prefill_buckets(2048) == [16, 32, 64, 128, 256, 512, 1024, 1536, 2048]
    assert prefill_buckets(100) == [16, 32, 64, 100]
    assert prefill_buckets(1300) == [16, 32, 64, 128, 256, 512, 1024, 1300]
    assert prefill_buckets(8) == [8]


@pytest.mark.parametrize("table_type", ["BlockTable", "list"])
def test_decode_step_inputs_equal_their_definition(qwen_dir, table_type):
    """The decode graphs' host inputs (built on any device; uploaded into the static buffers on
    CUDA): ids (0 for a pending token), positions, slots, key counts, and each request's blocks up
    to its last key padded with 0, from a BlockTable's bytes or a plain list alike."""
    import random
    from engine.cuda_graphs import DecodeGraphs
    from engine.request import BlockTable, Request
    eng = engine(qwen_dir, device="cpu")
    P = eng.kv.page_size
    rng = random.Random(3)
    sched = []
    for n, pending in ((5, 0), (40, 0), (P * 3 - 1, 1), (P * 3, 0), (1, 0)):
        ids = [rng.randrange(100) for _ in range(n)]
        r = Request(f"d{n}", None, ids, SamplingParams(temperature=0))
        r.output_ids = [rng.randrange(100)]
        r.num_computed = n  # the next token's position
        r.pending = pending
        blocks = rng.sample(range(200), n // P + 2)
        r.block_table = BlockTable(blocks) if table_type == "BlockTable" else blocks
        sched.append((r, 1))
    g = DecodeGraphs(eng.model, eng.kv, torch.device("cpu"), 8, 512)
    host, lens, table = g.step_inputs(sched)
    want_lens = [r.num_computed + 1 for r, _ in sched]
    assert host.tolist() == [[0 if r.pending else r.ids(r.num_computed, r.num_computed + 1)[0] for r, _ in sched],
                             [r.num_computed for r, _ in sched],
                             [r.block_table[r.num_computed // P] * P + r.num_computed % P for r, _ in sched]]
    assert lens.tolist() == want_lens and lens.dtype == torch.int32 and table.dtype == torch.int32
    width = max(-(-n // P) for n in want_lens)
    assert table.tolist() == [r.block_table[:-(-n // P)] + [0] * (width - -(-n // P))
                              for (r, _), n in zip(sched, want_lens)]
    eng.close()


def test_enforce_eager_is_a_bool_key_and_cpu_stays_eager(qwen_dir):
    with pytest.raises(ConfigError, match="enforce_eager"):
        load_config().replace(enforce_eager="maybe")
    with pytest.raises(ConfigError, match="prefill_graph_tokens"):
        load_config().replace(prefill_graph_tokens=-1)
    eng = engine(qwen_dir, device="cpu")
    assert eng.runner.graphs is None and eng.runner.prefill_graphs is None  # no CUDA: every step eager


def rounds(eng, prompts):
    """Greedy tokens of two rounds of the same prompts: cold, then hits in the device pool."""
    return run(eng, prompts), run(eng, prompts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("page,chunk", [(16, 16), (32, 48), (16, 2048)], ids=["p16c16", "p32c48", "p16c2048"])
def test_prefill_graphs_equal_eager(qwen_dir, bf16_dirs, dtype, page, chunk):
    """Prefill chunks and mixed prefill + decode steps replayed as piecewise graphs give the tokens
    of the same steps run eagerly (decode graphs on in both), cold and after device-pool hits."""
    path = qwen_dir if dtype == "float32" else bf16_dirs["qwen3_moe"]
    prompts = PROMPTS + [PROMPTS[4][:50] + [9, 8, 7, 6]]  # the last one also hits the fifth's pages
    eager_eng = engine(path, dtype, page_size=page, chunk_size=chunk, prefill_graph_tokens=0)
    assert eager_eng.runner.prefill_graphs is None
    eager = rounds(eager_eng, prompts)
    eng = engine(path, dtype, page_size=page, chunk_size=chunk)
    got = rounds(eng, prompts)
    pg = eng.runner.prefill_graphs
    assert pg is not None and pg.disabled is None, getattr(pg, "disabled", None)
    assert pg.replays > 0 and len(pg.graphs) >= 2  # several buckets (ragged steps)
    assert got == eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("switch", ["layers.FUSED_QKV", "moe.FUSED_RESIDUAL"])
def test_fusions_equal_the_separate_launches(bf16_dirs, arch, switch, monkeypatch):
    """q, k and v as one GEMM (the RoPE kernel copying v out into the static buffers), and the
    residual add inside the MoE's last launch, give the tokens of three projections and of an add
    of its own, through the prefill and decode graphs and eagerly, cold and after device-pool hits,
    in chunks of 32 and of 2,048 (steps of more than 64 tokens: 16 heads a RoPE program)."""
    import importlib
    import engine.layers as layers
    module, name = switch.split(".")
    path = bf16_dirs[arch]
    prompts = PROMPTS + [PROMPTS[4][:50] + [9, 8, 7, 6]]
    for chunk in (32, 2048) if arch == "qwen3_moe" else (32,):
        fused = engine(path, "bfloat16", chunk_size=chunk)
        attn = [m for m in fused.model.modules() if isinstance(m, layers.Attention)]
        assert attn and all(m.qkv_weight is not None for m in attn)
        got = rounds(fused, prompts)
        if chunk == 32:
            assert got == rounds(engine(path, "bfloat16", chunk_size=chunk, enforce_eager=True,
                                        prefill_graph_tokens=0), prompts), "eager"
        with monkeypatch.context() as m:
            m.setattr(importlib.import_module(f"engine.{module}"), name, False)
            want = rounds(engine(path, "bfloat16", chunk_size=chunk), prompts)
        assert got == want, chunk


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefill_graphs_tma_attention_equals_pointer_loads(bf16_dirs):
    """Device hits of a 2,600-token prefix + a short suffix, their attention captured in the prefill
    graphs: with the kernel's TMA tiles (whole 128-key tiles of the prefix on adjacent pages, the
    engine's choice on Hopper) and with pointer loads only, the tokens of eager steps."""
    pytest.importorskip("triton")
    path = bf16_dirs["qwen3_moe"]
    base = [(i * 29 + 5) % 250 for i in range(2600)]
    prompts = [base] + [base + [(i * 13 + j) % 250 for i in range(n)] for j, n in enumerate((20, 7, 33))]
    eager = rounds(engine(path, "bfloat16", chunk_size=1024, num_device_blocks=1024, prefill_graph_tokens=0),
                   prompts)
    for tma in (None, False):
        eng = engine(path, "bfloat16", chunk_size=1024, num_device_blocks=1024)
        pg = eng.runner.prefill_graphs
        pg.attn_tma = tma
        got = rounds(eng, prompts)
        assert got == eager, f"attn_tma {tma}"
        assert pg.disabled is None and pg.attention_replays > 0
        if tma is None and torch.cuda.get_device_capability()[0] >= 9:
            assert pg.attn_tma and any(key[2] for key in pg.graphs), pg.graphs.keys()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefill_graphs_long_chunks_use_cudnn_between_graphs(bf16_dirs):
    """A 3,000-token prompt in chunks of 1,024 (aligned prefixes: cuDNN runs between the graphs
    where it can) and its repeat after a partial hit give the eager tokens."""
    from engine.attention import cudnn_prefill
    path = bf16_dirs["qwen3_moe"]
    long = [[(i * 31 + 7 + j) % 250 for i in range(3000)] for j in range(2)]
    prompts = [long[0], long[0][:2100] + long[1][:500]]
    eager = rounds(engine(path, "bfloat16", chunk_size=1024, num_device_blocks=1024, prefill_graph_tokens=0),
                   prompts)
    eng = engine(path, "bfloat16", chunk_size=1024, num_device_blocks=1024)
    calls, real = [0], cudnn_prefill._attend4

    def counted(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)
    cudnn_prefill._attend4 = counted
    try:
        got = rounds(eng, prompts)
    finally:
        cudnn_prefill._attend4 = real
    assert got == eager
    pg = eng.runner.prefill_graphs
    assert pg.disabled is None and pg.replays > 0
    if cudnn_prefill.cudnn_usable(torch.empty(1, 1, 64, device="cuda", dtype=torch.bfloat16)):
        assert calls[0] > 0  # cuDNN ran between the graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefill_graphs_pad_cudnn_pieces_in_the_spare_rows(bf16_dirs):
    """A step whose cuDNN piece starts after another piece and is padded to its CUDNN_ALIGN bucket
    past the step's bucket (a 1,024-token budget: 20 + 1,004 tokens): between the graphs it reads
    that padding in place from the static buffers' spare rows (no F.pad copies), and the tokens
    equal the eager steps', which pad."""
    from engine.attention import cudnn_prefill
    from engine.prefill_graphs import SPARE_ROWS
    assert SPARE_ROWS >= cudnn_prefill.CUDNN_ALIGN  # fewer would pad again
    if not cudnn_prefill.cudnn_usable(torch.empty(1, 1, 64, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("cuDNN attention does not run here")
    path = bf16_dirs["qwen3_moe"]
    prompts = [[(i * 13 + 5) % 250 for i in range(20)], [(i * 31 + 7) % 250 for i in range(1500)]]
    seen, real = [], cudnn_prefill._rows

    def spy(x, start, q, n, spare=0):
        out = real(x, start, q, n, spare)
        if start + n > x.shape[0] and q != n:  # padded past x's rows: in place, or a copy
            seen.append(out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr())
        return out
    cudnn_prefill._rows = spy
    try:
        kw = dict(chunk_size=1024, max_num_batched_tokens=1024)
        eager = rounds(engine(path, "bfloat16", prefill_graph_tokens=0, **kw), prompts)
        padded_eagerly, seen[:] = list(seen), []
        got = rounds(engine(path, "bfloat16", **kw), prompts)
    finally:
        cudnn_prefill._rows = real
    assert got == eager
    assert padded_eagerly and not any(padded_eagerly)  # eager steps: fresh tensors, padded by copies
    assert seen and all(seen)  # between the graphs: every such piece read its padding in place


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefill_graphs_capture_the_attention_of_hit_steps(qwen_dir):
    """A prefix hit's short suffix alone (one piece over 1,500 cached tokens) and several suffixes in
    one step (pieces over shared prefixes) run their attention inside the graphs (the one-piece and
    the MAX_PIECES graphs), and give the tokens of the same steps with attention eager between the
    graphs and with no prefill graphs at all."""
    from engine.prefill_graphs import MAX_PIECES
    long = [(i * 13 + 5) % 250 for i in range(1500)]
    hit = [long + [(i * 3 + 1) % 250 for i in range(40)]]
    many = [long[:700 + 37 * j] + [(i * 7 + j) % 250 for i in range(5 + 9 * j)] for j in range(3)]

    def tokens(**kw):
        eng = engine(qwen_dir, chunk_size=512, num_device_blocks=512, **kw)
        out = [run(eng, [long]), run(eng, hit), run(eng, many)]
        return out, eng.runner.prefill_graphs

    plain, _ = tokens(prefill_graph_tokens=0)
    eager_attn, pg = tokens(prefill_kernel="flash")  # flash forced: attention stays eager between graphs
    assert pg.attention_replays == 0 and pg.replays > 0
    got, pg = tokens()
    assert pg.disabled is None, pg.disabled
    assert {1, MAX_PIECES} <= {key[1] for key in pg.graphs}, sorted(pg.graphs)  # (bucket, pieces, tma)
    assert pg.attention_replays >= 2
    assert got == plain and eager_attn == plain


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphs_capture_on_streams_outside_the_default_pool(qwen_dir, monkeypatch):
    """torch.cuda.Stream() hands out 32 default-priority streams round-robin; the host tier's load,
    put and verify streams are among them. Decode and prefill graphs must capture (and warm up) on
    none of them: a capture on the loader's stream took its copies into the graph (run BF)."""
    pool = {torch.cuda.Stream().cuda_stream for _ in range(64)}  # every stream of the default pool
    assert len(pool) <= 32
    seen = []
    real = torch.cuda.CUDAGraph.capture_begin

    def spy(self, *a, **kw):
        seen.append(torch.cuda.current_stream().cuda_stream)
        return real(self, *a, **kw)
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", spy)
    eng = engine(qwen_dir)
    run(eng, PROMPTS[:3])  # prefill and decode steps: captures of both kinds
    assert eng.runner.graphs.graphs and eng.runner.prefill_graphs.graphs
    assert seen and not pool & set(seen)


@pytest.fixture(scope="module")
def bf16_dirs(tmp_path_factory):
    return {a: make_tiny_model(tmp_path_factory.mktemp(a), a, dtype="bfloat16") for a in ("qwen3_moe", "mixtral")}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("page", [16, 64])
def test_graph_decode_equals_eager(bf16_dirs, arch, page):
    path = bf16_dirs[arch]
    eager = run(engine(path, "bfloat16", page_size=page, chunk_size=32, enforce_eager=True), PROMPTS)
    eng = engine(path, "bfloat16", page_size=page, chunk_size=32)
    graphs = run(eng, PROMPTS)
    g = eng.runner.graphs
    assert g is not None and g.disabled is None and g.replays > 0 and len(g.graphs) >= 3
    assert graphs == eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_capture_while_another_thread_copies(bf16_dirs):
    """Decode graphs captured while another thread copies pinned pages to the device on its own
    stream and synchronizes it, as the kvc-load thread does: every capture holds (a "global" mode
    capture fails or voids the other thread's calls) and tokens equal eager decode."""
    path = bf16_dirs["qwen3_moe"]
    eager = run(engine(path, "bfloat16", chunk_size=32, enforce_eager=True), PROMPTS)
    eng = engine(path, "bfloat16", chunk_size=32)
    stop, errors, copies = threading.Event(), [], [0]
    src = torch.arange(1 << 20, dtype=torch.float32).pin_memory()  # [1M] 4 MiB, like a staged page run

    def loader():
        try:
            stream, dst = torch.cuda.Stream(), None
            while not stop.is_set():
                with torch.cuda.stream(stream):
                    dst = src.to("cuda", non_blocking=True)  # a fresh device buffer, as the staging is
                stream.synchronize()
                copies[0] += 1
            assert dst is not None and torch.equal(dst.cpu(), src)
        except Exception as e:  # reported below: the thread must never see a capture error
            errors.append(e)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # hand the GIL over often, so the copies land inside the captures
    t = threading.Thread(target=loader, daemon=True)
    t.start()
    try:
        graphs = run(eng, PROMPTS)
    finally:
        stop.set()
        t.join(timeout=60)
        sys.setswitchinterval(switch)
    g = eng.runner.graphs
    assert not errors, errors
    assert copies[0] > 0
    assert g is not None and g.disabled is None and g.replays > 0 and len(g.graphs) >= 3, getattr(g, "disabled", None)
    assert graphs == eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("page,chunk", [(16, 2048), (32, 16), (64, 24)], ids=["p16c2048", "p32c16", "p64c24"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=["gqa1", "gqa4", "gqa8"])
def test_kernels_greedy_equal_reference(tmp_path, page, chunk, heads):
    path = make_tiny_model(tmp_path, "qwen3_moe", num_attention_heads=heads[0], num_key_value_heads=heads[1])
    prompts = PROMPTS + [PROMPTS[0][:40] + [5, 6, 7]]  # the last one hits the first's cached pages
    ref = run(engine(path, page_size=page, chunk_size=chunk, backend="reference"), prompts)
    eng = engine(path, page_size=page, chunk_size=chunk)
    assert run(eng, prompts) == ref
    first = run(eng, prompts[:1])  # a device hit of the whole prompt but its last token
    assert first == ref[:1]
