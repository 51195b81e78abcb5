#!/usr/bin/env bash
# One device-machine call: the CUDA tests and the GPU benchmarks, each under its own time limit, each
# writing its log to $OUT (or ./h200-out). Usage: bash benchmarks/h200_run.sh PART [PART ...]
# PARTs: tests, cpu-info, native-tests, tests-kvc, attention, decode-attn, attention-hit, cpu-hit, cpu-hits, cpu-hits-sums, cpu-hits-groups, cpu-hits-both, cpu-hits-staged, cpu-hits-lag, copy-rows, cpu-hit-switch, switch-pairs, graph-pairs, reuse-paired, reuse-sweep, paired, paired-16, paired-profile, paired-profile-12, paired-sched-12, paired-sched-12-malloc, paired-sched-12-switch50, paired-sched-12-switch20, paired-switch-12, paired-gaps, paired-host, paired-buffer, paired-variants, paired-async, paired-gate, busy-hit, step-host, paired-switch, moe, moe-parts, moe-wide, moe-wide-tiles, moe-tma, moe-tma-rows, moe-tma-two-m, moe-grouped, moe-tma-halves, moe-tma-sorted, qkv, shapes, shapes-norecompile, load-path, host-path, tokenizer, profile, profile-hit, profile-chunked, hit-experts, reuse, put-cost, disk, engine, decode-long, decode-32k, decode-32k-16, profile-decode-long, deepseek, deepseek-27, deepseek-27-ttft, deepseek-27-decode-32k, deepseek-mla, deepseek-long, profile-mla-decode, profile-deepseek-prefill, deepseek-chunks, deepseek-ttft, deepseek-ttft-paths, deepseek-ttft-rule, deepseek-step, deepseek-step-hit, deepseek-step-hit-n32, deepseek-ttft-32k, deepseek-ttft-32k-n32, mla-prefill, deepseek-graphs, deepseek-decode, deepseek-mla-64, mla-pieces, mla-tiles, mla-decode-tiles, deepseek-decode-tiles, mla-kernel-tests, mla-latent, mla-tests, offload-layer, offload-steps, offload-variants, offload-e2e. The Qwen3-30B-A3B-shapes
# checkpoint (12 layers, bf16) is written once to /tmp/kvc-q30b-12l and shared by reuse/engine/offload-e2e.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-./h200-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
ckpt=/tmp/kvc-q30b-12l
step() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s) $(date -u +%FT%TZ) commit ${KVC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"
  local t0=$SECONDS
  timeout "$secs" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
  tail -n 40 "$out/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for part in "$@"; do
  case $part in
    tests) step tests 220 python3 -m pytest -q -m gpu -p no:cacheprovider -n 8 tests/kvc/test_cuda_store.py \
        tests/engine/test_cuda.py tests/engine/test_attention_kernels.py tests/engine/test_cuda_graphs.py \
        tests/engine/test_prefix_cache_cuda.py tests/engine/test_deepseek.py tests/engine/test_mla_kernel.py \
        tests/engine/test_offload.py \
        tests/engine/test_llm_close.py tests/engine/test_moe_kernels.py tests/kvc/test_pinned.py ;;
    cpu-info) step cpu-info 20 bash -c "lscpu | grep -E 'Model name|Thread|Core|Socket|NUMA node|Flags' | cut -c1-400" ;;
    native-tests) step native-tests 90 python3 -m pytest -q -p no:cacheprovider tests/engine/test_native_experts.py ;;
    tests-kvc) step tests-kvc 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kvc/test_cuda_store.py ;;
    attention) step attention 150 python3 benchmarks/bench_attention.py ;;
    decode-attn) step decode-attn 150 python3 benchmarks/bench_attention.py --decode ;;
    attention-hit) step attention-hit 90 python3 benchmarks/bench_attention.py --no-sweep --no-launch --new 64 ;;
    cpu-hit) step cpu-hit 150 python3 benchmarks/probe_cpu_hit.py --model-dir "$ckpt" ;;
    cpu-hit-switch) step cpu-hit-switch 150 python3 benchmarks/probe_cpu_hit.py --model-dir "$ckpt" --cached 8192 \
        --switch-interval 0.0002 ;;
    reuse) step reuse 330 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" --profile ;;
    reuse-8k) step reuse 300 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" --profile \
        --skip transformers,cpu-experts --lengths 8192 ;;
    reuse-paired) step reuse 260 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" \
        --skip transformers,cpu-experts,tput-variants ;;
    paired) step paired 200 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" --paired-only ;;
    paired-16) step paired 300 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" --paired-only --tput-pairs 16 ;;
    paired-profile) step paired-profile 240 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" --paired-only \
        --profile ;;
    paired-profile-12) step paired-profile-12 300 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" \
        --paired-only --tput-pairs 12 --profile ;;
    paired-sched-12) step paired-sched-12 240 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" \
        --paired-only --tput-pairs 12 ;;
    paired-sched-12-malloc) step paired-sched-12-malloc 240 env \
        GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296 \
        python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" --paired-only --tput-pairs 12 ;;
    paired-sched-12-switch50) step paired-sched-12-switch50 240 python3 benchmarks/bench_gpu_reuse.py \
        --model-dir "$ckpt" --paired-only --tput-pairs 12 --switch-interval 0.05 ;;
    paired-sched-12-switch20) step paired-sched-12-switch20 240 python3 benchmarks/bench_gpu_reuse.py \
        --model-dir "$ckpt" --paired-only --tput-pairs 12 --switch-interval 0.02 ;;
    paired-switch-12) step paired-switch-12 300 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" \
        --paired-only --tput-pairs 12 --profile --switch-interval 0.0002 ;;
    paired-gaps) step paired-gaps 240 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" --paired-only \
        --tput-pairs 2 --profile ;;
    paired-host) step paired-host 300 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" --paired-only \
        --tput-pairs 12 --host-variants ;;
    paired-variants) step paired-variants 300 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" --paired-only \
        --profile --put-variants ;;
    paired-async) step paired-async 300 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" --paired-only \
        --profile --sync-variants ;;
    paired-buffer) step paired-buffer 300 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" --paired-only \
        --tput-pairs 12 --buffer-variants 0.25,0.5 ;;
    paired-gate) step paired-gate 200 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" --paired-only \
        --gate-variants ;;
    paired-gate-12) step paired-gate-12 300 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" \
        --paired-only --tput-pairs 12 --gate-variants ;;
    busy-hit) step busy-hit 200 python3 benchmarks/probe_busy_hit.py --cpu-gb 4 --pages 2048 ;;
    step-host) step step-host 200 python3 benchmarks/probe_step_host.py --model-dir "$ckpt" ;;
    paired-switch) step paired-switch 200 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" --paired-only \
        --switch-interval 0.0002 ;;
    switch-pairs) step switch-pairs 200 python3 benchmarks/probe_cpu_hit.py --model-dir "$ckpt" --switch-pairs 6 ;;
    graph-pairs) step graph-pairs 200 python3 benchmarks/probe_cpu_hit.py --model-dir "$ckpt" --graph-pairs 6 ;;
    reuse-ttft) step reuse 170 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" \
        --skip transformers,throughput,cpu-experts ;;
    cpu-hits) step cpu-hits 200 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" \
        --skip transformers,throughput,cpu-experts,disk --repeats 5 ;;
    cpu-hits-groups) step cpu-hits-groups 200 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" \
        --skip transformers,throughput,cpu-experts,disk --repeats 11 --hit-variants per-layer ;;
    cpu-hits-sums) step cpu-hits-sums 200 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" \
        --skip transformers,throughput,cpu-experts,disk --repeats 11 --hit-variants sums-after ;;
    cpu-hits-both) step cpu-hits-both 240 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" \
        --skip transformers,throughput,cpu-experts,disk --repeats 11 --hit-variants sums-after,per-layer ;;
    cpu-hits-staged) step cpu-hits-staged 200 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" \
        --skip transformers,throughput,cpu-experts,disk --repeats 11 --hit-variants staged ;;
    cpu-hits-lag) step cpu-hits-lag 240 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" \
        --skip transformers,throughput,cpu-experts,disk --repeats 11 --hit-variants lag-2,lag-all ;;
    copy-rows) step copy-rows 90 python3 benchmarks/probe_copy_rows.py ;;
    reuse-sweep) step reuse-sweep 300 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" \
        --skip transformers,throughput,cpu-experts --lengths 4096,8192,16384,24576,32768 ;;
    reuse-noref) step reuse 300 python3 benchmarks/bench_gpu_reuse.py --model-dir "$ckpt" --profile \
        --skip transformers,cpu-experts ;;
    moe) step moe 100 python3 benchmarks/bench_moe.py ;;
    moe-sweep) step moe 200 python3 benchmarks/bench_moe.py --sweep --tokens 1 32 256 2048 8192 ;;
    moe-parts) step moe-parts 240 python3 benchmarks/bench_moe.py --parts --tokens 2048 8192 ;;
    moe-wide-tiles) step moe-wide-tiles 150 python3 benchmarks/bench_moe.py --wide-tiles --tokens 2048 ;;
    moe-tma) step moe-tma 240 python3 benchmarks/bench_moe.py --tma --tokens 2048 8192 32768 ;;
    moe-tma-rows) step moe-tma-rows 240 python3 benchmarks/bench_moe.py --tma-rows --tokens 2048 8192 ;;
    moe-tma-two-m) step moe-tma-two-m 240 python3 benchmarks/bench_moe.py --tma-two-m --tokens 2048 8192 32768 ;;
    qkv) step qkv 120 python3 benchmarks/bench_qkv.py ;;
    moe-tma-sorted) step moe-tma-sorted 240 python3 benchmarks/bench_moe.py --tma-sorted --tokens 2048 8192 32768 ;;
    moe-tma-halves) step moe-tma-halves 240 python3 benchmarks/bench_moe.py --tma-halves --tokens 2048 8192 32768 ;;
    moe-grouped) step moe-grouped 240 python3 benchmarks/bench_moe.py --grouped --tokens 2048 8192 32768 ;;
    moe-wide) step moe 420 python3 benchmarks/bench_moe.py --sweep --wide --tokens 2048 ;;
    probe-close) step probe-close 60 python3 benchmarks/probe_close.py ;;
    shapes) step shapes 240 python3 benchmarks/bench_prefill_shapes.py --model-dir "$ckpt" ;;
    shapes-norecompile) TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 step shapes-norecompile 120 \
        python3 benchmarks/bench_prefill_shapes.py --model-dir "$ckpt" --kernels cudnn ;;
    load-path) step load-path 120 python3 benchmarks/probe_load_path.py ;;
    host-path) step host-path 200 python3 benchmarks/bench_host_path.py --device cuda --model-dir "$ckpt" \
        --preset qwen3-30b-a3b-shapes --layers 12 --tiers cpu --repeat 10 ;;
    tokenizer) step tokenizer 120 python3 benchmarks/bench_tokenizer.py ;;  # the host's CPU, no GPU
    profile) step profile 240 python3 benchmarks/profile_prefill.py --model-dir "$ckpt" ;;
    profile-hit) step profile-hit 300 python3 benchmarks/profile_prefill.py --model-dir "$ckpt" \
        --cases hit,prefill --prompt-len 8192 32768 --top 12 ;;
    profile-chunked) step profile-chunked 300 python3 benchmarks/profile_prefill.py --model-dir "$ckpt" \
        --cases prefill --prompt-len 8192 32768 --top 30 ;;
    hit-experts) step hit-experts 200 python3 benchmarks/profile_prefill.py --model-dir "$ckpt" \
        --cases hit --prompt-len 32768 --top 12 ;;
    put-cost) step put-cost 200 python3 benchmarks/bench_put_cost.py --model-dir "$ckpt" ;;
    disk) step disk 90 python3 benchmarks/bench_disk.py --reps 2 ;;
    engine) step engine 240 python3 benchmarks/bench_engine.py --device cuda --model-dir "$ckpt" ;;
    decode-long) step decode-long 240 python3 benchmarks/bench_engine.py --device cuda --model-dir "$ckpt" \
        --decode-only --decode-prompt-len 8192 --decode-tokens 32 --concurrency 1 8 32 --repeat 2 ;;
    decode-32k) step decode-32k 240 python3 benchmarks/bench_engine.py --device cuda --model-dir "$ckpt" \
        --decode-only --decode-prompt-len 32768 --decode-tokens 32 --concurrency 1 8 --repeat 2 ;;
    decode-32k-16) step decode-32k-16 300 python3 benchmarks/bench_engine.py --device cuda --model-dir "$ckpt" \
        --decode-only --decode-prompt-len 32768 --decode-tokens 32 --concurrency 16 --repeat 2 ;;
    profile-decode-long) step profile-decode-long 300 python3 benchmarks/profile_prefill.py --model-dir "$ckpt" \
        --cases decode --decode 32 --decode-prompt-len 8192 --prompt-len 8192 --no-hf --top 14 ;;
    deepseek) step deepseek 200 python3 benchmarks/bench_deepseek.py --ttft-len 8192 32768 ;;
    mla-pieces) step mla-pieces 180 python3 benchmarks/bench_mla_pieces.py --block-m 16 32 64 ;;
    mla-tiles) step mla-tiles 240 python3 benchmarks/bench_mla_pieces.py --shapes --decode --tiles 64x32x8x2 \
        64x64x8x2 64x64x8x3 64x64x8x1 64x32x8x3 64x32x8x1 32x32x4x2 32x64x4x2 32x64x4x3 32x64x8x2 64x128x8x1 \
        64x64x4x2 ;;
    mla-decode-tiles) step mla-decode-tiles 200 python3 benchmarks/bench_mla_pieces.py --shapes --decode \
        --decode-tiles ${DECODE_TILES:-16x32x4x2 16x64x4x2 16x64x4x3 16x32x4x3 16x16x4x2 16x128x4x2 16x64x8x3 \
        16x32x2x2 16x64x2x3} ;;
    deepseek-decode-tiles)  # decode's MLA launch: the engine's against $DECODE_TILE or mla-decode-tiles' quickest
      t=${DECODE_TILE:-$(sed -n 's/^quickest decode tile: //p' "$out/mla-decode-tiles.txt" 2>/dev/null)}
      step deepseek-decode-tiles 300 python3 benchmarks/bench_deepseek.py --sections throughput --prefill-len 8192 \
        --decode-prompt-len 32768 --decode-tokens 64 --concurrency 1 16 --no-hf \
        --mla-backends "auto,auto@${t:-16x64x4x3},auto,auto@${t:-16x64x4x3}" ;;
    deepseek-step-hit-n32) step deepseek-step-hit-n32 240 python3 benchmarks/probe_deepseek_step.py --cached 32768 \
        --mla-tile 64x32x8x2 ;;
    deepseek-ttft-32k) step deepseek-ttft-32k 240 python3 benchmarks/bench_deepseek.py --sections ttft \
        --ttft-len 32768 --repeat 3 ;;
    deepseek-ttft-32k-n32) step deepseek-ttft-32k-n32 240 python3 benchmarks/bench_deepseek.py --sections ttft \
        --ttft-len 32768 --repeat 3 --mla-tile 64x32x8x2 ;;
    mla-kernel-tests) step mla-kernel-tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider \
        tests/engine/test_mla_kernel.py -k "matches_reference_cuda" ;;
    mla-latent) step mla-latent 150 python3 benchmarks/bench_mla_pieces.py --block-m 64 --decode \
        --shapes 16x8192 64x8192 16x32768 64x32768 128x32768 185x32768 64x131072 ;;
    mla-tests) step mla-tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_mla_kernel.py \
        tests/engine/test_deepseek.py ;;
    deepseek-mla) step deepseek-mla 380 python3 benchmarks/bench_deepseek.py --sections ttft \
        --ttft-len 8192 32768 --mla-paths bias,latent ;;
    deepseek-decode) step deepseek-decode 300 python3 benchmarks/bench_deepseek.py --sections throughput \
        --prefill-len 32768 --decode-prompt-len 8192 --concurrency 1 16 --mla-backends auto,reference ;;
    deepseek-mla-64) step deepseek-mla-64 200 python3 benchmarks/bench_deepseek.py --sections ttft \
        --ttft-len 32768 --mla-paths bias,latent --mla-block-m 64 ;;
    deepseek-graphs) step deepseek-graphs-tests 100 python3 -m pytest -q -m gpu -p no:cacheprovider \
        tests/engine/test_mla_kernel.py
      step deepseek-graphs 200 python3 benchmarks/bench_deepseek.py --sections throughput --prefill-len 8192 \
        --decode-prompt-len 8192 --concurrency 1 16 --mla-backends auto,auto:eager,auto ;;
    profile-deepseek-prefill) step profile-deepseek-prefill 300 python3 benchmarks/profile_deepseek_prefill.py \
        --prompt-len 32768 --chunk 8192 32768 ;;
    deepseek-chunks) step deepseek-chunks 300 python3 benchmarks/profile_deepseek_prefill.py \
        --prompt-len 32768 --chunk 2048 8192 32768 --cudnn on ;;
    deepseek-ttft) step deepseek-ttft 300 python3 benchmarks/bench_deepseek.py --sections ttft \
        --ttft-len 8192 32768 --repeat 3 ;;
    deepseek-ttft-paths) step deepseek-ttft-paths 300 python3 benchmarks/bench_deepseek.py --sections ttft \
        --ttft-len 8192 32768 --repeat 3 --mla-paths engine,latent ;;
    deepseek-ttft-rule) step deepseek-ttft-rule 300 python3 benchmarks/bench_deepseek.py --sections ttft \
        --ttft-len 8192 32768 --repeat 3 --mla-paths cudnn,engine ;;
    deepseek-step) step deepseek-step 200 python3 benchmarks/probe_deepseek_step.py --compare-eager ;;
    deepseek-step-hit) step deepseek-step-hit 240 python3 benchmarks/probe_deepseek_step.py --cached 32768 ;;
    mla-prefill) step mla-prefill 150 python3 benchmarks/bench_mla_prefill.py ;;
    profile-mla-decode) step profile-mla-decode 200 python3 benchmarks/profile_mla_decode.py ;;
    profile-mla-decode-27-32k)  # run GV's 16 decodes after 32K prompts at 27 layers, profiled
      step profile-mla-decode-27-32k 330 python3 benchmarks/profile_mla_decode.py --layers 27 --conc 16 \
        --prompt-len 32768 --steps 6 ;;
    deepseek-long) step deepseek-long 300 python3 benchmarks/bench_deepseek.py --sections throughput \
        --prefill-len 8192 32768 ;;
    deepseek-27)  # all 27 of V2-Lite's layers (~31 GB checkpoint, kept in /tmp/kvc-dsv2-27l for deepseek-27-ttft)
      step deepseek-27 400 python3 benchmarks/bench_deepseek.py --layers 27 --model-dir /tmp/kvc-dsv2-27l \
        --sections bytes,throughput --prefill-len 8192 32768 --decode-prompt-len 8192 --concurrency 1 16 ;;
    deepseek-27-ttft) step deepseek-27-ttft 400 python3 benchmarks/bench_deepseek.py --layers 27 \
        --model-dir /tmp/kvc-dsv2-27l --sections ttft --ttft-len 8192 32768 --repeat 3 ;;
    deepseek-27-decode-32k)  # decode after 32K-token prompts at full depth (the 8-layer figures' follow-up)
      step deepseek-27-decode-32k 400 python3 benchmarks/bench_deepseek.py --layers 27 --model-dir /tmp/kvc-dsv2-27l \
        --sections throughput --prefill-len 2048 --decode-prompt-len 32768 --concurrency 1 16 --repeat 1 ;;
    deepseek-short) step deepseek 150 python3 benchmarks/bench_deepseek.py --layers 6 --ttft-len 8192 --repeat 1 ;;
    offload-layer) step offload-layer 150 python3 benchmarks/bench_offload.py --cpu-layer --device cuda \
        --formats bfloat16,bfloat16:native,int8,int8:native_unpacked,int8:native \
        --cpu-tokens 1,8,32,128,512,2048 --iters-decode 3 --iters-prefill 2 --no-loop ;;
    offload-steps) step offload-steps 150 python3 benchmarks/bench_offload.py --cpu-steps --device cuda \
        --formats bfloat16:native,int8:native --cpu-tokens 1,8,32 --iters-decode 4 ;;
    offload-variants) step offload-variants 280 python3 benchmarks/bench_offload.py --cpu-steps --device cuda \
        --formats bfloat16:native,int8:native --cpu-tokens 1,8,32 --iters-decode 4 \
        --variant-formats "${KVC_VARIANT_FORMATS:-int8:native}" \
        --native-variants "${KVC_NATIVE_VARIANTS:-again=;pin=-DPIN=1;g16d4=-DGU_TASKS_PACKED=16 -DDOWN_TASKS_PACKED=4;again2=;pin2=-DPIN=1}" ;;
    offload-e2e) step offload-e2e 200 python3 benchmarks/bench_offload.py --e2e --device cuda --model-dir "$ckpt" \
        --e2e-rows auto:grouped,auto:native,int8:native ;;
    *) echo "unknown part $part" ;;
  esac
done
