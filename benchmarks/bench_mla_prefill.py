"""One MLA layer's expanded attention for long prefill pieces: SDPA (FA2, V padded) against cuDNN.

DeepSeek-V2-Lite's sizes (16 heads, kv_lora 512, rope 64, nope 128, v 128), random weights and
latents; a piece of Q queries at the end of K latents (K - Q cached tokens before it), the form
long pieces take (MLAttention._expanded):

- expand: kv_b_proj over the K latents, K's rope part broadcast to the heads (what both paths pay)
- sdpa:   the engine's path before: V padded to K's width (192), SDPA with the bottom-right causal
          bias after a prefix (which SDPA runs on FA2), is_causal with none (which torch 2.11's SDPA
          itself sends to cuDNN on Hopper, at the padded width)
- cudnn:  engine.attention.cudnn_prefill.cudnn_expanded: cuDNN's fused op at V's own width, the
          piece's own keys causal and the cached prefix unmasked, merged by log-sum-exp
- whole piece: MLAttention._expanded (expansion included) with mla.CUDNN_PIECES off / on, after a
          prefix only (the engine sends pieces with nothing cached before them to SDPA)
- TFLOP/s of each attention: 2 * h * Q * (K - (Q - 1) / 2) * (192 + 128) over its time

Also the largest difference of cudnn's output from sdpa's (bf16). CUDA only; prints ms per call
(GPU time over --iters calls after a warm-up).

    python benchmarks/bench_mla_prefill.py --shapes 8192x8192 8192x32768 32768x32768
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mla_pieces import timed  # noqa: E402
from engine import mla  # noqa: E402
from engine.attention import cudnn_prefill  # noqa: E402
from engine.model_args import ModelArgs  # noqa: E402
from engine.tiny import tiny_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["8192x8192", "8192x16384", "8192x24576", "8192x32768",
                                                     "32768x32768", "2048x32768", "2048x2048", "1000x9192",
                                                     "64x32768", "185x32768", "512x32768"],
                    help="QxK: Q queries after K - Q cached tokens")
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    device, dtype = torch.device("cuda"), torch.bfloat16
    mla.CUDNN_MIN_QUERIES = 1  # the whole-piece column takes cuDNN at every size after a prefix (the engine: >= 2,048)
    torch.manual_seed(0)
    cfg = tiny_config("deepseek_v2", "deepseek-v2-lite-shapes", num_hidden_layers=1)
    layer = mla.MLAttention(ModelArgs.from_dict(cfg)).to(device, dtype)
    h, r, dr, dn, dv = layer.heads, layer.r, layer.dr, layer.dn, layer.dv
    print(f"# one MLA layer, V2-Lite sizes ({h} heads, K {dn + dr} wide, V {dv}), bf16, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    head = ["Q x K", "expand ms", "sdpa ms", "cudnn ms", "cudnn / sdpa", "sdpa TFLOP/s", "cudnn TFLOP/s",
            "max |cudnn - sdpa|", "whole piece sdpa / cudnn ms"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    scale = 0.1
    with torch.inference_mode():
        for shape in a.shapes:
            Q, K = (int(v) for v in shape.split("x"))
            off = K - Q
            q = torch.randn(Q, h, dn + dr, device=device, dtype=dtype)
            lat = torch.randn(K, r + dr, device=device, dtype=dtype)

            def expand():
                kv = layer.kv_b_proj(lat[:, :r]).view(K, h, dn + dv)
                k = torch.cat((kv[..., :dn], lat[:, None, r:].expand(K, h, dr)), -1)
                return k, kv[..., dn:]
            k, v = expand()
            vp = torch.nn.functional.pad(v, (0, dn + dr - dv))

            def sdpa():
                qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], vp.transpose(0, 1)[None]
                if off == 0:
                    o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
                else:
                    o = torch.nn.functional.scaled_dot_product_attention(
                        qt, kt, vt, attn_mask=mla.causal_lower_right(Q, K), scale=scale)
                return o[0].transpose(0, 1)[..., :dv]

            def cudnn():
                return cudnn_prefill.cudnn_expanded(q, k, v, off, scale)
            flops = 2 * h * Q * (K - (Q - 1) / 2) * (dn + dr + dv)
            t_exp = timed(expand, device, a.iters)
            t_s = timed(sdpa, device, a.iters)
            usable = cudnn_prefill.mla_cudnn_usable(q, off)
            got = cudnn() if usable else None
            if got is None:
                why = (f"refused: {cudnn_prefill._mla_broken}" if cudnn_prefill._mla_broken else
                       f"prefix not a multiple of {cudnn_prefill.CUDNN_ALIGN}: SDPA")
                cells = [f"{Q} x {K}", f"{t_exp:.3f}", f"{t_s:.3f}", why, "-", f"{flops / t_s / 1e9:.0f}", "-", "-", "-"]
            else:
                t_c = timed(cudnn, device, a.iters)
                err = (got.float() - sdpa().float()).abs().max().item()
                was, mla.CUDNN_PIECES = mla.CUDNN_PIECES, False
                whole_s = timed(lambda: layer._expanded(q, lat, off, None, scale), device, a.iters)
                mla.CUDNN_PIECES = True
                whole_c = timed(lambda: layer._expanded(q, lat, off, None, scale), device, a.iters)
                mla.CUDNN_PIECES = was
                cells = [f"{Q} x {K}", f"{t_exp:.3f}", f"{t_s:.3f}", f"{t_c:.3f}", f"{t_c / t_s:.2f}x",
                         f"{flops / t_s / 1e9:.0f}", f"{flops / t_c / 1e9:.0f}", f"{err:.4f}",
                         f"{whole_s:.3f} / {whole_c:.3f}" if off else "- (no prefix: the engine keeps SDPA)"]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
