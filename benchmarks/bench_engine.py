"""Engine prefill, prefix-hit TTFT and decode against transformers on the same random checkpoint.

Prefill: one cold prompt per --prompt-len (device pool only, no prefix hit), once in --chunk-token
chunks and once as a single chunk; transformers: one forward with logits_to_keep=1. TTFT: a
prompt whose first max(--prompt-len) tokens are already in the device pool plus --hit-new new
tokens, against the new tokens alone, each timed until a step hands the token out (on CUDA side by side: the
hit's attention inside the prefill graphs, the same with the kernel's pointer loads only (no TMA tiles), and
eager between them). Decode: aggregate tokens/s of --concurrency requests each
generating --decode-tokens greedy tokens after a --decode-prompt-len prompt, eager steps against
CUDA graphs (on CUDA). The HBM floor is the checkpoint's bytes read per single-request decode step
(attention, router, top-k experts, norms, lm_head) over --hbm-tbps.

    python benchmarks/bench_engine.py                      # CPU: "small" preset, float32, short prompts
    python benchmarks/bench_engine.py --device cuda        # H200: Qwen3-30B-A3B shapes, 12 layers, 8K/32K
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvc.config import load_config  # noqa: E402
from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.layers import set_attention_backend  # noqa: E402
from engine.tiny import make_tiny_model  # noqa: E402
from decode_window import decode_window, room  # noqa: E402

PRESETS = {
    "tiny": {},
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=32,
                  num_experts_per_tok=4),
    "qwen3-30b-a3b-shapes": "qwen3-30b-a3b-shapes",
}
CUDA_DEFAULTS = dict(preset="qwen3-30b-a3b-shapes", layers=12, prompt_len=[8192, 32768], chunk=2048,
                     concurrency=[1, 8, 32], decode_tokens=64)
CPU_DEFAULTS = dict(preset="small", layers=4, prompt_len=[128, 512], chunk=256, concurrency=[1, 8],
                    decode_tokens=32)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prompts(n, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def active_bytes(a, elem: int, tokens: int = 1) -> int:
    """Weights a decode step of `tokens` requests reads: per layer q/k/v/o, norms, router and the
    experts the tokens route to (or the dense MLP), then the final norm and lm_head. One token reads
    its top-k experts; several, the distinct experts uniform routing would give them, E x (1 - (1 -
    k/E)^tokens): a trained router spreads tokens about so, this random checkpoint's concentrates
    them (fewer experts), so for tokens > 1 this is an upper estimate of the bytes."""
    H, D = a.hidden_size, a.head_dim
    per_attn = H * D * (2 * a.num_heads + 2 * a.num_kv_heads) + 2 * H + (2 * D if a.qk_norm else 0)
    total = 0
    for i in range(a.num_layers):
        experts = a.top_k if tokens == 1 else a.num_experts * (1 - (1 - a.top_k / max(a.num_experts, 1)) ** tokens)
        mlp = (a.num_experts * H + int(experts * 3 * H * a.moe_intermediate_size) if a.is_moe_layer(i)
               else 3 * H * a.intermediate_size)
        total += per_attn + mlp
    return (total + H + a.vocab_size * H + H) * elem  # + final norm, lm_head, one embedding row


class Ours:
    def __init__(self, path, a):
        longest = max(a.prompt_len) + a.hit_new
        c = max(a.concurrency)  # each decoding request takes up to room() tokens (decode_window)
        blocks = 2 * (longest // 16 + 64) + c * ((a.decode_prompt_len + room(c, a.decode_prompt_len, a.chunk,
                                                                              a.decode_tokens)) // 16 + 2)
        cfg = load_config().replace(path=str(path), dtype=a.dtype, device=a.device, gpu_only=True,
                                    page_size=16, chunk_size=a.chunk, num_device_blocks=blocks,
                                    max_num_batched_tokens=max(longest, 2048),
                                    max_num_seqs=max(64, max(a.concurrency)))
        self.eng = LLMEngine(cfg)
        self.graphs = self.eng.runner.graphs
        self.prefill_graphs = self.eng.runner.prefill_graphs
        self.attn_sizes = None if self.prefill_graphs is None else self.prefill_graphs.attn_sizes
        self.vocab, self.n, self.device, self.chunk = self.eng.args.vocab_size, 0, a.device, a.chunk
        self._prefill, self._moe = self.eng.config.attn.prefill_kernel, self.eng.config.attn.moe_kernel
        self._fused = True  # engine.layers.FUSED_QKV and engine.moe.FUSED_RESIDUAL (mode(fused_qkv=...))
        self._graph_sets: dict[tuple, dict] = {}  # (attn.moe_kernel, fused q/k/v) -> its prefill graphs
        self._tma = None  # the prefill graphs' own attn_tma choice (mode(attn_tma=...))
        if self.attn_sizes:
            self._tma = self.prefill_graphs._tma(min(self.attn_sizes))

    def mode(self, chunk: int | None = None, graphs: bool | None = None, prefill: str | None = None,
             prefill_graphs: bool | None = None, graph_attention: bool | None = None,
             async_scheduling: bool | None = None, moe: str | None = None, attn_tma: bool | None = None,
             prefix_in_place: bool | None = None, fused_qkv: bool | None = None):
        if prefill is not None:  # attn.prefill_kernel, switched on the engine's model in place
            self._prefill = prefill
        key = (moe or self._moe, self._fused if fused_qkv is None else fused_qkv)
        if key != (self._moe, self._fused) and self.prefill_graphs is not None:
            # each MoE kernel and projection keeps its own prefill graphs (captured when first used,
            # in the same pool); none is deleted: releasing graphs of a shared pool and capturing
            # into it again fails
            self._graph_sets[(self._moe, self._fused)] = self.prefill_graphs.graphs
            self.prefill_graphs.graphs = self._graph_sets.setdefault(key, {})
        if fused_qkv is not None:  # q, k and v as one GEMM (the K/V store in its RoPE launch inside the
            import engine.layers  # prefill graphs) and the residual add inside the MoE's last launch, or
            import engine.moe  # three GEMMs, store_kv and an add of their own (timed side by side;
            # prefill only: the decode graphs keep what they captured)
            engine.layers.FUSED_QKV = engine.moe.FUSED_RESIDUAL = self._fused = fused_qkv
        if prefill is not None or moe is not None:
            self._moe = moe or self._moe
            set_attention_backend(self.eng.model, self.eng.config.attn.backend, self._prefill, self._moe)
        if chunk is not None:
            self.eng.scheduler.chunk = self.eng.prefix_cache.chunk = chunk  # admission sizes the first piece
        if graphs is not None:
            self.eng.runner.graphs = self.graphs if graphs else None
        if prefill_graphs is not None:
            self.eng.runner.prefill_graphs = self.prefill_graphs if prefill_graphs else None
        if async_scheduling is not None:  # switched between runs (nothing in flight then)
            assert self.eng._in_flight is None
            self.eng.async_scheduling = async_scheduling
        if graph_attention is not None and self.prefill_graphs is not None:  # short steps' attention captured
            self.prefill_graphs.attn_sizes = self.attn_sizes if graph_attention else set()
        if attn_tma is not None and self.prefill_graphs is not None:  # the captured attention's TMA tiles
            self.prefill_graphs.attn_tma = self._tma if attn_tma else False
        if prefix_in_place is not None and str(self.device).startswith("cuda"):  # the cuDNN path's cached prefix:
            from engine.attention import cudnn_prefill  # a slice of the pool on adjacent pages, or gathered
            cudnn_prefill.PREFIX_IN_PLACE = prefix_in_place

    def _run(self, ps, max_tokens, first_token=False):
        """(tokens produced, seconds, prompt tokens reused): the time of the whole run, or until a
        step hands out a first token
        (first_token: a TTFT from before add_request, as a request arrives; the engine's page
        bookkeeping follows, untimed. Before the twenty-sixth session the TTFT started after
        add_request, which left out the prompt's id conversion: 0.4-1.1 ms at 32K tokens on the
        H200 host)."""
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        t_arrive = time.perf_counter()
        for p in ps:
            self.n += 1
            self.eng.add_request(f"b{self.n}", p, params)
        t0, produced, cached = time.perf_counter(), 0, 0
        if first_token:
            t0 = t_arrive
        ttft = None
        while self.eng.has_unfinished():
            outs = self.eng.step()
            if first_token and ttft is None and any(o.outputs[0].token_ids for o in outs):
                ttft = time.perf_counter() - t0
            cached += sum(o.num_cached_tokens for o in outs if o.finished)
            produced += len(outs)
        self.eng.flush_commits()  # the last step's page bookkeeping (timed, except for a TTFT)
        sync(self.device)
        return produced, ttft if first_token else time.perf_counter() - t0, cached

    def prefill(self, length, seed):
        p = prompts(1, length, self.vocab, seed)
        return lambda: self._run([p[0]], 1) and self.eng.prefix_cache.reset_device_cache()

    def ttft(self, cached, new, repeat, modes=({},)):
        """Per mode (kwargs of `mode`), (TTFT with `cached` tokens in the device pool + `new` ones,
        TTFT of the `new` alone) in s, medians; the modes interleaved in each repetition (rows run
        one after another drift by more than they differ), in an order rotated by one each
        repetition (a mode always run after the same other mode could carry that one's effects)."""
        base = prompts(1, cached, self.vocab, 7)[0]
        self._run([base], 1)
        hit, alone = [[] for _ in modes], [[] for _ in modes]
        for r in range(repeat + 1):
            for i in [(r + j) % len(modes) for j in range(len(modes))]:
                m = modes[i]
                self.mode(**m)
                suffix, other = prompts(2, new, self.vocab, 1000 + r * len(modes) + i)
                _, dt, got = self._run([base + suffix], 1, first_token=True)
                assert got >= cached, f"expected a device hit of {cached} tokens, got {got}"
                _, dt_alone, _ = self._run([other], 1, first_token=True)
                if r:
                    hit[i].append(dt), alone[i].append(dt_alone)
        self.eng.prefix_cache.reset_device_cache()
        return [(statistics.median(h), statistics.median(a)) for h, a in zip(hit, alone)]

    def decode_tps(self, c, plen, n, repeat):
        """Tokens a second over n steps with all c requests decoding (benchmarks/decode_window.py)."""
        best = []
        for r in range(repeat + 1):
            self.n += 1
            produced, dt = decode_window(self.eng, prompts(c, plen, self.vocab, 100 + r), n, self.chunk,
                                         f"d{self.n}", lambda: sync(self.device))
            self.eng.prefix_cache.reset_device_cache()
            if r:
                best.append(produced / dt)
        return statistics.median(best)


def cuda_engine(model_dir: str | None, layers: int, chunk: int, longest: int, concurrency: int = 1,
                decode_prompt_len: int = 32) -> tuple[Path, Ours]:
    """The 12-layer Qwen3-30B-A3B-shapes checkpoint at model_dir (written there if missing, or in a
    temp dir) and an engine over it sized for prompts up to `longest` tokens and `concurrency`
    decoding requests of `decode_prompt_len` (the scripts that profile or probe one engine on the
    H200 share this)."""
    path = Path(model_dir or tempfile.mkdtemp())
    if not (path / "config.json").exists():
        make_tiny_model(str(path), "qwen3_moe", preset=CUDA_DEFAULTS["preset"], num_hidden_layers=layers,
                        dtype="bfloat16", std=0.02)
    ns = argparse.Namespace(prompt_len=[longest], hit_new=64, concurrency=[concurrency], decode_prompt_len=decode_prompt_len,
                            decode_tokens=16, dtype="bfloat16", device="cuda", chunk=chunk)
    return path, Ours(path, ns)


class HF:
    def __init__(self, path, a):
        import transformers
        self.m = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, a.dtype)).to(a.device).eval()
        self.device, self.vocab = a.device, self.m.config.vocab_size

    def prefill(self, length, seed):
        ids = torch.tensor(prompts(1, length, self.vocab, seed), device=self.device)
        return lambda: self._fwd(ids)

    @torch.inference_mode()
    def _fwd(self, ids):
        self.m(ids, logits_to_keep=1, use_cache=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--arch", default="qwen3_moe", choices=("qwen3_moe", "mixtral"))
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, nargs="+", default=None)
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (attn.chunk_size) for the chunked runs")
    ap.add_argument("--hit-new", type=int, default=64, help="new tokens after the cached prefix (TTFT)")
    ap.add_argument("--decode-prompt-len", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=None)
    ap.add_argument("--concurrency", type=int, nargs="+", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hbm-tbps", type=float, default=4.8, help="memory bandwidth for the floor (H200: 4.8)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--model-dir", default=None, help="write the checkpoint here, or reuse the one there")
    ap.add_argument("--decode-only", action="store_true",
                    help="only the decode table (at a long --decode-prompt-len: see its K/V floor column)")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    for k, v in (CUDA_DEFAULTS if cuda else CPU_DEFAULTS).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    preset = PRESETS[a.preset]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        draw = "cuda" if a.device.startswith("cuda") else "cpu"
        if a.model_dir and (Path(a.model_dir) / "config.json").is_file():
            path = Path(a.model_dir)
        elif isinstance(preset, str):
            path = make_tiny_model(a.model_dir or tmp, a.arch, preset=preset, dtype=a.dtype, std=0.02,
                                   num_hidden_layers=a.layers, device=draw)
        else:
            path = make_tiny_model(a.model_dir or tmp, a.arch, dtype=a.dtype, num_hidden_layers=a.layers,
                                   device=draw, **preset)
        print(f"# checkpoint: {a.arch} preset={a.preset} layers={a.layers} dtype={a.dtype} page=16 gpu_only "
              f"device={a.device} torch={torch.__version__} (written in {time.perf_counter() - t:.1f}s)",
              flush=True)
        ours = Ours(path, a)
        hf = None if a.no_hf or a.decode_only else HF(path, a)
        print(f"# decode CUDA graphs: {'on' if ours.graphs is not None else 'off'}; prefill CUDA graphs: "
              f"{'up to %d tokens' % ours.prefill_graphs.sizes[-1] if ours.prefill_graphs is not None else 'off'}; loaded in "
              f"{time.perf_counter() - t_start:.1f}s since start\n", flush=True)

        if not a.decode_only:  # the prefill and device-hit tables
            print(f"| prompt tokens | kvc, chunk {a.chunk} (ms) | kvc, one chunk (ms) | chunked / one | "
                  f"kvc, chunk {a.chunk}, cached prefix gathered (ms) | "
                  f"kvc, chunk {a.chunk}, MoE without TMA (ms) | kvc, one chunk, MoE without TMA (ms) | "
                  f"chunked / one, MoE without TMA | "
                  f"kvc, chunk {a.chunk}, Triton prefill kernel (ms) | kvc, chunk {a.chunk}, steps eager (ms) | "
                  f"kvc, chunk {a.chunk}, q/k/v three GEMMs, residual add and K/V store apart (ms) | "
                  "kvc, one chunk, q/k/v three GEMMs, residual add and K/V store apart (ms) | "
                  "transformers (ms) | transformers / kvc chunked |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for L in sorted(set(a.prompt_len)):
                ours.mode(chunk=a.chunk)
                chunked = timed(ours.prefill(L, L), a.device, a.repeat)
                ours.mode(prefix_in_place=False)  # each chunk's cached prefix gathered per layer, side by side
                gathered = timed(ours.prefill(L, L), a.device, a.repeat) if cuda else None
                ours.mode(prefix_in_place=True)
                ours.mode(prefill_graphs=False)  # prefill CUDA graphs off: the eager steps, side by side
                eager = timed(ours.prefill(L, L), a.device, a.repeat) if ours.prefill_graphs is not None else None
                ours.mode(prefill_graphs=True)
                ours.mode(prefill="triton")  # long pieces otherwise go to FA2 varlen on CUDA
                triton_only = timed(ours.prefill(L, L), a.device, a.repeat) if cuda else None
                ours.mode(prefill=ours.eng.config.attn.prefill_kernel)
                ours.mode(chunk=L)
                one = timed(ours.prefill(L, L), a.device, a.repeat)
                ours.mode(moe="triton")  # the fused MoE kernels with pointer loads only (no TMA), side by side
                one_ptr = timed(ours.prefill(L, L), a.device, a.repeat)
                ours.mode(chunk=a.chunk)
                chunked_ptr = timed(ours.prefill(L, L), a.device, a.repeat)
                ours.mode(moe=ours.eng.config.attn.moe_kernel)
                ours.mode(fused_qkv=False)  # three q/k/v GEMMs, the add and store apart (as before), side by side
                chunked_3 = timed(ours.prefill(L, L), a.device, a.repeat)
                ours.mode(chunk=L)
                one_3 = timed(ours.prefill(L, L), a.device, a.repeat)
                ours.mode(chunk=a.chunk, fused_qkv=True)
                ref = timed(hf.prefill(L, L), a.device, a.repeat) if hf else None
                hf_cols = f"{ref * 1e3:,.1f} | {ref / chunked:.2f}x" if ref else "- | -"
                tri = f"{triton_only * 1e3:,.1f}" if triton_only else "-"
                eag = f"{eager * 1e3:,.1f}" if eager else "-"
                gat = f"{gathered * 1e3:,.1f}" if gathered else "-"
                print(f"| {L} | {chunked * 1e3:,.1f} | {one * 1e3:,.1f} | {chunked / one:.2f}x | {gat} | {chunked_ptr * 1e3:,.1f} | "
                      f"{one_ptr * 1e3:,.1f} | {chunked_ptr / one_ptr:.2f}x | {tri} | {eag} | {chunked_3 * 1e3:,.1f} | "
                      f"{one_3 * 1e3:,.1f} | {hf_cols} |", flush=True)
                if ours.prefill_graphs is not None and ours.prefill_graphs.disabled is not None:
                    print(f"# WARNING: the prefill CUDA graphs were turned off during this row ({ours.prefill_graphs.disabled}):"
                          " this row and the later ones ran eager", flush=True)
            if hf is not None:
                del hf
                if cuda:
                    torch.cuda.empty_cache()

            cached = max(a.prompt_len)
            print(f"\n| TTFT, device hit (variants interleaved) | {cached} cached + {a.hit_new} new (ms) | {a.hit_new} alone (ms) | ratio |")
            print("|---|---|---|---|")
            variants = [("", None)]
            if ours.attn_sizes:  # side by side: the short steps' attention inside the prefill graphs or not
                variants = [(", attention in the graphs", True), (", attention in the graphs, pointer loads (no TMA)", True),
                            (", attention eager between graphs", False)]
            variants.append((", synchronous scheduling", variants[0][1]))  # the step read back before the next
            modes = [dict(graph_attention=inside, async_scheduling="synchronous" not in label,
                          attn_tma="no TMA" not in label) for label, inside in variants]
            for (label, _), (hit, alone) in zip(variants, ours.ttft(cached, a.hit_new, a.repeat, modes)):
                print(f"| chunk {a.chunk}{label} | {hit * 1e3:,.1f} | {alone * 1e3:,.1f} | {hit / alone:.2f}x |",
                      flush=True)
            ours.mode(graph_attention=True, async_scheduling=True, attn_tma=True)

        elem = torch.finfo(getattr(torch, a.dtype)).bits // 8
        nbytes = active_bytes(ours.eng.args, elem)
        floor_s = nbytes / (a.hbm_tbps * 1e12)
        # the last column is the default (graphs where they run, async scheduling)
        modes = [("eager", False, True)] + ([("graphs, sync scheduling", True, False), ("graphs", True, True)]
                                            if ours.graphs is not None else [("eager, sync scheduling", False, False)])
        if ours.graphs is None:
            modes.reverse()
        # K/V a step reads: every request's keys and values so far, all layers (the mean context)
        args = ours.eng.args
        kv_token = args.num_layers * 2 * args.num_kv_heads * args.head_dim * elem
        ctx = a.decode_prompt_len + a.decode_tokens / 2
        print("\n| concurrent | " + " | ".join(f"{m} tok/s" for m, _, _ in modes) + " | step ms (last) | "
              "single-request step / HBM floor | step / floor with the K/V read (weights + K/V / bandwidth) | "
              "step / floor with the experts uniform routing touches + K/V |")
        print("|---|" + "---|" * len(modes) + "---|---|---|---|")
        for c in a.concurrency:
            tps = []
            for _, g, asy in modes:
                ours.mode(graphs=g, async_scheduling=asy)
                tps.append(ours.decode_tps(c, a.decode_prompt_len, a.decode_tokens, a.repeat))
            step = c / tps[-1]
            floor = f"{step / floor_s:.1f}x" if c == 1 else "-"
            kv_floor_s = (nbytes + c * ctx * kv_token) / (a.hbm_tbps * 1e12)
            wide_s = (active_bytes(args, elem, c) + c * ctx * kv_token) / (a.hbm_tbps * 1e12)
            print(f"| {c} | " + " | ".join(f"{x:,.1f}" for x in tps) + f" | {step * 1e3:.2f} | {floor} | "
                  f"{step / kv_floor_s:.1f}x ({kv_floor_s * 1e3:.3f} ms) | {step / wide_s:.1f}x ({wide_s * 1e3:.3f} ms) |",
                  flush=True)
        print(f"\nHBM floor: {nbytes / 1e9:.2f} GB of weights per single-request decode step / "
              f"{a.hbm_tbps} TB/s = {floor_s * 1e3:.3f} ms ({1 / floor_s:,.0f} tok/s). "
              f"Total {time.perf_counter() - t_start:.0f}s.")


if __name__ == "__main__":
    main()
