"""DeepSeek-V2-Lite shapes on kvc: throughput vs transformers, TTFT by tier, the KTransformers case.

One random checkpoint written by make_tiny_model (preset deepseek-v2-lite-shapes: hidden 2048,
64 routed experts top-6 + 2 shared, moe_intermediate 1408, MLA kv_lora 512 + rope 64, 16 heads,
no q_lora, first layer dense, vocab 102400, YaRN), --layers of them. In-process, no HTTP:

(1) KV bytes per token: MLA latent pages vs Qwen3-30B-A3B's GQA pages and this model's own heads.
(2) prefill tok/s (one prompt, one chunk, no prefix hit) and decode tok/s (greedy, after the
    first token) of the engine vs transformers on the same checkpoint.
(3) TTFT of --ttft-len shared prefixes + a fresh --delta-token suffix: cold (new prefix), device
    hit, cpu hit (device pool emptied) and disk hit (an engine whose store has no cpu tier).
(4) KTransformers case: --kt-ratio of the routed experts in CPU memory; cold vs disk-hit TTFT for
    a --kt-len shared prefix.

    python benchmarks/bench_deepseek.py                 # CUDA, V2-Lite shapes, 8 layers (~3 min on an H200)
    python benchmarks/bench_deepseek.py --quick         # CPU, tiny shapes (~1 min)
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mla_pieces import tile_spec  # noqa: E402
from decode_window import decode_window, room  # noqa: E402
from kvc.config import load_config  # noqa: E402
from kvc.hashing import DTYPE_BYTES, PageSpec  # noqa: E402
from kvc.store import TieredStore  # noqa: E402
from engine import LLMEngine, SamplingParams, mla  # noqa: E402
from engine.attention import triton_mla  # noqa: E402
from engine.model_args import ModelArgs  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402

QUICK = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
             num_attention_heads=8, num_key_value_heads=8, n_routed_experts=16, num_experts_per_tok=4,
             n_shared_experts=2, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
PAGE = 16


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rand_prompts(n, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def engine(path, a, tmp: Path | None = None, cpu_gb=2.0, **kw) -> LLMEngine:
    """An engine with an explicit pool; with tmp, a TieredStore (cpu_gb 0: disk only) behind it."""
    blocks = (max(a.ttft_len + [a.kt_len] + a.prefill_len) + 4 * a.delta) // PAGE * 2 + 64
    c = max(a.concurrency)  # each request decodes up to room() tokens (decode_window)
    decoded = room(c, a.decode_prompt_len, a.chunk, a.decode_tokens)
    blocks = max(blocks, c * ((a.decode_prompt_len + decoded) // PAGE + 2) + 64)
    cfg = load_config().replace(path=str(path), dtype=a.dtype, device=str(a.device), gpu_only=tmp is None,
                                page_size=PAGE, chunk_size=a.chunk, max_num_batched_tokens=a.chunk,
                                num_device_blocks=blocks, cpu_memory_size_GB=cpu_gb,
                                disk_path=str(tmp) if tmp else None, disk_size_GB=8.0, disk_write="through", **kw)
    store = TieredStore(cfg.kvc) if tmp is not None else None
    eng = LLMEngine(cfg, cache=store)
    eng._store = store
    return eng


def close(eng: LLMEngine) -> None:
    eng.close()
    if eng._store is not None:
        eng._store.close()


def ttft(eng: LLMEngine, prompt: list[int], max_tokens=1) -> tuple[float, int]:
    """Seconds from add_request to the first token, and the cached tokens it reused. eng._last
    holds where that time went: add_request's ms, and each step() call's host ms up to the token
    (a step queues its kernels and returns; the token's step waits for them)."""
    eng._n = getattr(eng, "_n", 0) + 1
    rid = f"q{eng._n}"
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    sync(eng.device)
    t0 = time.perf_counter()
    eng.add_request(rid, prompt, params)
    t_add = time.perf_counter() - t0
    first, cached, steps = None, 0, []
    while eng.has_unfinished():
        ts = time.perf_counter()
        outs = eng.step()
        if first is None:
            steps.append(time.perf_counter() - ts)
        for o in outs:
            if o.request_id == rid and first is None and o.outputs[0].token_ids:
                sync(eng.device)
                first, cached = time.perf_counter() - t0, o.num_cached_tokens
    eng.prefix_cache.flush()
    eng._last = dict(add=t_add, steps=steps)
    return first, cached


def decode_tps(eng: LLMEngine, conc: int, plen: int, n: int, seed: int, chunk: int) -> float:
    """Tokens a second over n steps with all `conc` requests decoding (benchmarks/decode_window.py)."""
    produced, dt = decode_window(eng, rand_prompts(conc, plen, eng.args.vocab_size, seed), n, chunk, f"d{seed}",
                                 lambda: sync(eng.device))
    eng.prefix_cache.reset_device_cache()
    return produced / dt


def section_bytes(args: ModelArgs, dtype: str, full_layers: int):
    mla = args.page_spec(PAGE, dtype)
    qwen = PageSpec(48, 4, 128, PAGE, dtype)
    per = lambda s: s.page_bytes / s.page_size / s.num_layers  # noqa: E731
    mha = args.num_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim) * DTYPE_BYTES[dtype]
    print(f"\n(1) KV bytes per token ({dtype})")
    print("| cache | bytes/token/layer | layers | bytes/token (whole model) |\n|---|---|---|---|")
    print(f"| this model, MLA latent ({mla.head_dim} values) | {per(mla):,.0f} | {full_layers} | "
          f"{per(mla) * full_layers:,.0f} |")
    print(f"| this model, per-head K and V expanded ({args.num_heads} heads) | {mha:,} | {full_layers} | "
          f"{mha * full_layers:,} |")
    print(f"| Qwen3-30B-A3B GQA (4 KV heads x 128, K and V) | {per(qwen):,.0f} | 48 | {per(qwen) * 48:,.0f} |")
    print(f"MLA / Qwen3-30B-A3B per layer: {per(mla) / per(qwen):.2f}x; per token: "
          f"{per(mla) * full_layers / (per(qwen) * 48):.3f}x; MLA / its own expanded K,V: {per(mla) / mha:.2f}x")


def decode_tile_arg(text: str) -> tuple:
    """'MxNxWxS[@T]' (bench_mla_pieces.tile_spec) -> decode's (N, W, S, T or None); M must be
    triton_mla.BLOCK_M (a decode program takes one query's heads)."""
    try:
        m, n, w, st, target = tile_spec(text)
    except ValueError as e:
        raise SystemExit(f"bench_deepseek: decode {e}") from None
    if m != triton_mla.BLOCK_M:
        raise SystemExit(f"bench_deepseek: decode tile {text!r}: decode's rows a program are {triton_mla.BLOCK_M}")
    return n, w, st, target


def section_throughput(path, a):
    backends = a.mla_backends.split(",")
    rows = {}
    for variant in backends:  # the engine once per MLA layers' backend (auto: the latent kernel on CUDA)
        backend, _, eager = variant.partition(":")
        backend, _, tile = backend.partition("@")
        default_tile = (triton_mla.DECODE_BLOCK_N, triton_mla.DECODE_WARPS, triton_mla.DECODE_STAGES,
                        triton_mla.DECODE_TARGET_PROGRAMS)
        if tile:  # decode's MLA launch for this engine (its graphs capture it)
            (triton_mla.DECODE_BLOCK_N, triton_mla.DECODE_WARPS, triton_mla.DECODE_STAGES,
             triton_mla.DECODE_TARGET_PROGRAMS) = decode_tile_arg(tile)
        eng = engine(path, a, enforce_eager=eager == "eager")
        for layer in eng.model.model.layers:
            layer.self_attn.backend = backend
        for L in a.prefill_len:
            p = rand_prompts(a.repeat + 1, L, eng.args.vocab_size, L)
            times = []
            for i, q in enumerate(p):
                t, _ = ttft(eng, q)
                eng.prefix_cache.reset_device_cache()
                if i:
                    times.append(t)
            rows.setdefault(("prefill", L), []).append(L / statistics.median(times))
        for c in a.concurrency:
            decode_tps(eng, c, a.decode_prompt_len, 4, 1, a.chunk)  # warm-up
            rows.setdefault(("decode", c), []).append(statistics.median(
                decode_tps(eng, c, a.decode_prompt_len, a.decode_tokens, 10 + r, a.chunk) for r in range(a.repeat)))
        close(eng)
        del eng
        gc.collect()
        (triton_mla.DECODE_BLOCK_N, triton_mla.DECODE_WARPS, triton_mla.DECODE_STAGES,
         triton_mla.DECODE_TARGET_PROGRAMS) = default_tile
    if not a.no_hf:
        import transformers
        m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, a.dtype)).to(a.device).eval()
        V = m.config.vocab_size

        def timed(fn):
            fn()
            ts = []
            for _ in range(a.repeat):
                sync(a.device)
                t = time.perf_counter()
                fn()
                sync(a.device)
                ts.append(time.perf_counter() - t)
            return statistics.median(ts)

        def hf_row(key, fn):  # transformers' rate for a row; out of device memory: nan and a note
            try:
                rows[key].append(fn())
            except torch.OutOfMemoryError:
                rows[key].append(float("nan"))
                print(f"# transformers ran out of device memory for {key[0]} {key[1]}: its column is nan", flush=True)
                gc.collect()
                torch.cuda.empty_cache()

        with torch.inference_mode():
            for L in a.prefill_len:
                ids = torch.tensor(rand_prompts(1, L, V, L), device=a.device)
                hf_row(("prefill", L), lambda: L / timed(lambda: m(ids, logits_to_keep=1, use_cache=False)))
            for c in a.concurrency:
                ids = torch.tensor(rand_prompts(c, a.decode_prompt_len, V, 10), device=a.device)
                gen = lambda n: m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,  # noqa: E731
                                           pad_token_id=0)

                def rate():
                    t_n, t_1 = timed(lambda: gen(a.decode_tokens)), timed(lambda: gen(1))
                    return c * (a.decode_tokens - 1) / (t_n - t_1) if t_n > t_1 else float("nan")
                hf_row(("decode", c), rate)
        del m
        gc.collect()
        if a.device.type == "cuda":
            torch.cuda.empty_cache()
    nb = len(backends)
    named = ["kvc engine tok/s" if backends == ["auto"] else f"kvc, MLA {b}, tok/s" for b in backends]
    extra = [f"{backends[0]} / {b}" for b in backends[1:]]
    print(f"\n(2) throughput, engine vs transformers {'(skipped)' if a.no_hf else ''}; decode after "
          f"{a.decode_prompt_len}-token prompts")
    head = ["phase", "size", *named, "transformers tok/s", "ratio", *extra]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for (phase, size), v in rows.items():
        what = f"{size} tokens" if phase == "prefill" else f"{size} requests x {a.decode_tokens} tokens"
        hf = f"{v[nb]:,.1f}" if len(v) > nb else "-"
        ratio = f"{v[0] / v[nb]:.2f}x" if len(v) > nb else "-"
        cells = [phase, what, *[f"{x:,.1f}" for x in v[:nb]], hf, ratio, *[f"{v[0] / x:.2f}x" for x in v[1:nb]]]
        print("| " + " | ".join(cells) + " |", flush=True)


def tier_table(path, a, tmp: Path, lens: list[int], label: str, **kw):
    """Cold / device / cpu / disk TTFT for each prefix length (disk via a disk-only engine)."""
    hot = engine(path, a, tmp / f"{label}-cpu", cpu_gb=4.0, **kw)
    disk = engine(path, a, tmp / f"{label}-disk", cpu_gb=0.0, **kw)
    V = hot.args.vocab_size
    for e, seed in ((hot, 1), (disk, 2)):  # warm-up: a full chunk cold, then a hit on it
        w = rand_prompts(1, min(a.chunk, lens[0]), V, seed)[0]
        ttft(e, w)
        ttft(e, w + [1] * a.delta)
        e.prefix_cache.reset_device_cache()

    def timed(e, prompt):  # (seconds, cached, where the time went)
        t, c = ttft(e, prompt)
        return t, c, e._last

    out = []
    for n in lens:
        res = {k: [] for k in ("cold", "device", "device, writers idle", "delta alone", "cpu", "disk")}
        for r in range(a.repeat):
            prefix = rand_prompts(1, n, V, 1000 * n + r)[0]
            delta = lambda k: rand_prompts(1, a.delta, V, 7 * n + 31 * r + k)[0]  # noqa: E731
            res["cold"].append(timed(hot, prefix + delta(0)))
            res["device"].append(timed(hot, prefix + delta(1)))  # right after the cold one's commits
            if hot._store is not None:
                hot._store.flush()  # its pages' disk writes done: the host threads idle
            res["device, writers idle"].append(timed(hot, prefix + delta(5)))
            res["delta alone"].append(timed(hot, delta(6)))  # the same length, nothing cached
            hot.prefix_cache.reset_device_cache()
            res["cpu"].append(timed(hot, prefix + delta(2)))
            hot.prefix_cache.reset_device_cache()
            ttft(disk, prefix + delta(3))  # fills the disk-only store
            disk.prefix_cache.reset_device_cache()
            res["disk"].append(timed(disk, prefix + delta(4)))
            disk.prefix_cache.reset_device_cache()
        out.append((n, res))
    close(hot)
    close(disk)
    gc.collect()
    return out


def print_tiers(rows, a, tiers=("cold", "device", "device, writers idle", "delta alone", "cpu", "disk")):
    """A row a tier (medians); the last columns say where a TTFT went: add_request, the steps up to
    the token (the first's host ms, then the rest's)."""
    print("| prefix | hit from | TTFT ms (median) | all runs ms | cached tokens | vs cold | add_request ms "
          "| steps | first step host ms | later steps host ms |\n|---|---|---|---|---|---|---|---|---|---|")
    med = statistics.median
    for n, res in rows:
        cold = med(t for t, *_ in res["cold"])
        for tier in tiers:
            runs = res[tier]
            t = med(x for x, *_ in runs)
            cached = min(r[1] for r in runs)
            every = " / ".join(f"{x * 1e3:.1f}" for x, *_ in runs)
            add = med(r[2]["add"] for r in runs) * 1e3
            nsteps = med(len(r[2]["steps"]) for r in runs)
            first = med(r[2]["steps"][0] for r in runs) * 1e3
            later = med(sum(r[2]["steps"][1:]) for r in runs) * 1e3
            print(f"| {n} + {a.delta} | {tier} | {t * 1e3:,.1f} | {every} | {cached} | {cold / t:.1f}x | {add:.2f} "
                  f"| {nsteps:g} | {first:.2f} | {later:.2f} |", flush=True)


# engine.mla's (LOWER_RIGHT, ABSORB_PIECES, CUDNN_PIECES) for each --mla-paths name ("engine": as they are)
MLA_PATHS = {"mask": (False, {}, False), "bias": (True, {}, False),
             "latent": (True, {"cpu": 1.0, "cuda": 1.0}, False), "cudnn": (True, {}, True),
             "engine": (mla.LOWER_RIGHT, mla.ABSORB_PIECES, mla.CUDNN_PIECES)}


def kept_checkpoint(a) -> Path | None:
    """--model-dir's checkpoint if an earlier run wrote it with this many layers and dtype, else None."""
    if not a.model_dir or not (Path(a.model_dir) / "config.json").exists():
        return None
    cfg = ModelArgs.from_dir(a.model_dir)
    if cfg.num_layers != a.layers:
        raise SystemExit(f"--model-dir {a.model_dir} holds {cfg.num_layers} layers, not --layers {a.layers}: "
                         "give another directory or remove it")
    return Path(a.model_dir)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU, small sizes")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu with --quick)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--decode-prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--ttft-len", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--kt-len", type=int, default=8192)
    ap.add_argument("--kt-ratio", type=float, default=0.5, help="share of routed experts kept on the GPU")
    ap.add_argument("--delta", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=8192, help="prefill chunk (scheduler token budget)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sections", default="bytes,throughput,ttft,kt")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--model-dir", default=None,
                    help="keep the V2-Lite-shapes checkpoint here: written if absent, reused by a later run with the "
                         "same --layers (a full-depth checkpoint is ~31 GB; default: a temporary directory)")
    ap.add_argument("--mla-paths", default="engine",
                    help="comma-separated, the TTFT section once per path in this order, for prefill pieces after "
                         "cached tokens: mask (expanded, a boolean [Q, K] mask: the path before "
                         "2026-12-05), bias (expanded, SDPA's bottom-right causal bias), latent (the bias, and "
                         "short pieces in the absorbed latent form on any device), cudnn (the bias, and pieces of "
                         "at least mla.CUDNN_MIN_QUERIES through cuDNN), engine (its defaults)")
    ap.add_argument("--mla-backends", default="auto",
                    help="comma-separated, the throughput section's engine once each with its MLA layers on this "
                         "attn.backend (auto: the latent kernel over the pool on CUDA; reference: gather + SDPA); "
                         "the rest of the model as configured. The process's first engine decodes slower whatever "
                         "its path (RESULTS, runs FE-FG): list the paths twice, e.g. reference,auto,reference,auto. "
                         "A suffix :eager sets model.enforce_eager (no decode CUDA graphs), e.g. auto:eager,auto; "
                         "@MxNxWxS[@T] sets decode's MLA launch for that engine (engine.attention.triton_mla.DECODE_*; "
                         "T: programs its split-K launch aims at), e.g. auto,auto@16x64x4x3@1024")
    ap.add_argument("--mla-block-m", type=int, default=None,
                    help="the MLA kernel's rows a program (engine.attention.triton_mla's BLOCK_M and PIECE_BLOCK_M)")
    ap.add_argument("--mla-tile", default=None,
                    help="MxNxWxS: the MLA kernel's launch for prefill pieces (rows a program, keys a tile, warps, "
                         "stages; engine.attention.triton_mla.PIECE_*); default the engine's")
    a = ap.parse_args()
    if a.mla_block_m:
        triton_mla.BLOCK_M = triton_mla.PIECE_BLOCK_M = a.mla_block_m
    if a.mla_tile:
        (triton_mla.PIECE_BLOCK_M, triton_mla.PIECE_BLOCK_N, triton_mla.PIECE_WARPS,
         triton_mla.PIECE_STAGES) = (int(v) for v in a.mla_tile.split("x"))
    if set(a.mla_paths.split(",")) - set(MLA_PATHS):
        ap.error(f"--mla-paths takes {', '.join(MLA_PATHS)}")
    if a.quick:
        a.layers, a.prefill_len, a.ttft_len, a.kt_len, a.chunk = 3, [128, 512], [512, 1024], 512, 512
        a.concurrency, a.decode_prompt_len, a.decode_tokens, a.delta = [1, 4], 32, 8, 16
    a.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() and not a.quick else "cpu"))
    a.dtype = a.dtype or ("bfloat16" if a.device.type == "cuda" else "float32")
    sections = set(a.sections.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        where = Path(a.model_dir) if a.model_dir else tmp / "model"
        path = kept_checkpoint(a)
        kept = "reused" if path else "written"
        if path is None and a.quick:
            path = make_tiny_model(where, "deepseek_v2", dtype=a.dtype, std=0.05, num_hidden_layers=a.layers,
                                   **QUICK)
        elif path is None:
            path = make_tiny_model(where, "deepseek_v2", preset="deepseek-v2-lite-shapes", dtype=a.dtype,
                                   std=0.02, num_hidden_layers=a.layers, device=str(a.device))
        args = ModelArgs.from_dir(path)
        print(f"# DeepSeek-V2 {'tiny' if a.quick else 'V2-Lite'} shapes, {a.layers} layers, {a.dtype}, "
              f"device={a.device} ({torch.cuda.get_device_name(a.device) if a.device.type == 'cuda' else 'cpu'}), "
              f"torch {torch.__version__}, threads {torch.get_num_threads()}; checkpoint {kept} "
              f"in {time.perf_counter() - t:.1f}s; page {PAGE} tokens, prefill chunk {a.chunk}")
        if "bytes" in sections:
            section_bytes(args, a.dtype, a.layers if a.quick else 27)
        if "throughput" in sections:
            section_throughput(path, a)
        if "ttft" in sections:
            paths = a.mla_paths.split(",")
            for i, path_name in enumerate(paths):  # a path listed twice gets its own stores (no hits from the first)
                mla.LOWER_RIGHT, mla.ABSORB_PIECES, mla.CUDNN_PIECES = MLA_PATHS[path_name]
                how = f"; MLA pieces after cached tokens: {path_name}" if paths != ["engine"] else ""
                print(f"\n(3) TTFT by tier: shared prefix + fresh {a.delta}-token delta, median of {a.repeat}{how}")
                print_tiers(tier_table(path, a, tmp, a.ttft_len, f"ttft-{i}-{path_name}"), a)
            mla.LOWER_RIGHT, mla.ABSORB_PIECES, mla.CUDNN_PIECES = MLA_PATHS["engine"]
        if "kt" in sections:
            print(f"\n(4) KTransformers case: gpu_experts_ratio={a.kt_ratio} (the rest of the routed experts "
                  f"in CPU memory), {a.kt_len}-token shared prefix")
            rows = tier_table(path, a, tmp, [a.kt_len], "kt", gpu_experts_ratio=a.kt_ratio)
            print_tiers(rows, a, ("cold", "disk"))


if __name__ == "__main__":
    main()
