/* CPU MoE experts of one layer in one call: gate/up, silu * up, down, weighted sum per token.
 *
 * Built at first use by engine/offload/native/__init__.py (cc -O3 -march=native) and called through
 * ctypes, which releases the GIL. No torch headers: plain pointers, row-major, contiguous.
 *
 * Work split: a persistent pthread pool (the caller takes part) claims tasks from an atomic counter.
 *   phase x:    convert / quantize the T input rows (bf16 round-to-nearest-even, or u8 + scale);
 *   phase gu:   task = (active expert, block of intermediate channels j): gate row j and up row I+j
 *               are the two rows of one register block, so silu(g) * u is formed at once;
 *   phase q:    (w8a8 only) quantize each pair's activation row;
 *   phase down: task = block of output channels h over all active experts in id order, so every
 *               out[t, h] has one writer and the sum order does not depend on the thread count.
 * Each weight row is read once per call; the rows of one task are contiguous.
 *
 * Weight formats: 0 fp32 (fp32 activations, FMA), 1 bf16 (bf16 activations, dpbf16 where the CPU has
 * avx512_bf16, else bf16 -> fp32 by shift + FMA), 2 int8 w8a8 (per-channel weights, per-row u8
 * activations with zero point 128, VNNI dpbusd), 3 int8 weight-only (int8 -> fp32 + FMA, fp32
 * activations), 4 int8 w8a8 on weights packed in 16-row blocks for dpbusd (no horizontal sums; VNNI
 * builds only). Without AVX-512 (F, BW, VL) every format runs as one plain C loop.
 */
#define _GNU_SOURCE /* sched_getaffinity, pthread_setaffinity_np (pool.h's PIN setting) */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SIMD 1
#else
#define SIMD 0
#endif

enum { WF_F32 = 0, WF_BF16 = 1, WF_I8 = 2, WF_I8W = 3, WF_I8P = 4 };
#define Q8(wf) ((wf) == WF_I8 || (wf) == WF_I8P) /* u8 activations, per-row scales */
#define TB 8 /* activation rows per register block: 2 x 8 accumulators + 2 weight vectors in 32 zmm */
#ifndef L2_BLOCK
#define L2_BLOCK (192 * 1024) /* bytes of weight rows a task re-reads per group of TB pairs (prefill) */
#endif
#ifndef PF
#define PF 2048 /* bytes ahead to prefetch weight rows: past the 4 KiB pages the hardware stops at */
#endif

/* Values to convert or quantize below which the calling thread does it alone: with AVX-512 a few
 * thousand take ~1 us, less than a pool round (wake, claim, barrier: 8-21 us for an int8 1-token
 * call's activations in runs BW / BX); the scalar build keeps the pool rounds. */
#ifndef SMALL_PREP
#define SMALL_PREP (SIMD ? 16384 : 0)
#endif

/* Tasks per thread the gate/up and down phases aim for (dynamic claiming evens out the rest); fewer,
 * larger tasks stream longer runs of weight rows, more even out the threads' finishing times. */
#ifndef GU_TASKS
#define GU_TASKS 8
#endif
#ifndef DOWN_TASKS
#define DOWN_TASKS 8
#endif
/* The same for packed int8 (w8a8 on 16-row blocks, whose gate/up blocks round up to 16 rows). 16 / 4
 * looked 8-13% faster at 1-32 tokens in one pass on one H200 host and equal on another, inside the
 * ~5-7% spread of one build's passes there (benchmarks/RESULTS.md, runs CJ, CK): 8 / 8 stays. */
#ifndef GU_TASKS_PACKED
#define GU_TASKS_PACKED 8
#endif
#ifndef DOWN_TASKS_PACKED
#define DOWN_TASKS_PACKED 8
#endif
/* 1: a 1-token packed dot runs two accumulator chains over alternate 4-byte steps of K (one chain
 * waits on dpbusd's ~5-cycle latency a 64-byte step). Within the spread of the default's passes at
 * 1-32 tokens on the H200 host (run CJ): off by default. */
#ifndef SPLIT1
#define SPLIT1 0
#endif

#include "pool.h"
#include "dot.h"

/* ---------------------------------------------------------------- one layer call */
typedef struct {
    int wf, T, H, I, k, E, nthreads, xdt; /* xdt: 0 fp32, 1 bf16 */
    const void *x, *w13, *w2;
    const float *s13, *s2;
    const int32_t *rs13, *rs2; /* w8a8: row sums of the int8 weights [E, 2I], [E, H] */
    int nact, N;
    int32_t *act_e, *act_start, *ptok; /* [nact], [nact + 1], [N]: pairs sorted by expert */
    float *pw;                         /* [N] routing weights */
    void *xc;                          /* [T, H] activations in the dot's type (or x itself) */
    float *xs;                         /* [T] w8a8 scales */
    float *actf;                       /* [N, I] fp32 silu(g) * u (fp32 / int8 kernels) */
    void *act;                         /* [N, I] in the dot's type */
    float *as;                         /* [N] w8a8 scales */
    float *out;                        /* [T, H] */
    int jb, njb, hb, nhb, rb;          /* block sizes and counts; rb: rows per prep task */
} call_t;

static size_t wsize(int wf) { return wf == WF_F32 ? 4 : wf == WF_BF16 ? 2 : 1; }
static size_t asize(int wf) { return wf == WF_BF16 ? 2 : Q8(wf) ? 1 : 4; }

/* Per-row symmetric int8 as quantize_rows (amax.clamp_min(1e-12) / 127, round half to even), stored
 * as u8 = q + 128 for dpbusd; v is fp32 (vb NULL) or bf16 (vf NULL). */
#if SIMD
/* 16 values from i on (masked past n) as fp32: vf's, or vb's bf16 widened. */
static inline __m512 load16(const float *vf, const uint16_t *vb, int i, __mmask16 m) {
    if (vf) return _mm512_maskz_loadu_ps(m, vf + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, vb + i)), 16));
}

/* The same numbers as the scalar loop below, 16 at a time (the compiler left its max loop scalar and
 * a decode step's rows run on one thread): the max of |v| ignoring NaNs as fmaxf does (vmaxps gives
 * its second operand when one is NaN), the same division, round half to even, clamp and offset. */
static void quant_row(const float *vf, const uint16_t *vb, int n, uint8_t *q, float *scale) {
    __m512 mx = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __m512 a = _mm512_abs_ps(load16(vf, vb, i, m16(n - i)));
        mx = _mm512_max_ps(a, mx);
    }
    float s = fmaxf(_mm512_reduce_max_ps(mx), 1e-12f) / 127.0f;
    __m512 sv = _mm512_set1_ps(s), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
    __m512i off = _mm512_set1_epi32(128);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = m16(n - i);
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(load16(vf, vb, i, m), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
        _mm512_mask_cvtepi32_storeu_epi8(q + i, m, _mm512_add_epi32(_mm512_cvtps_epi32(r), off));
    }
    *scale = s;
}
#else
static void quant_row(const float *vf, const uint16_t *vb, int n, uint8_t *q, float *scale) {
    float m = 0;
    for (int i = 0; i < n; i++) m = fmaxf(m, fabsf(vf ? vf[i] : bf2f(vb[i])));
    float s = fmaxf(m, 1e-12f) / 127.0f;
    for (int i = 0; i < n; i++) {
        float r = nearbyintf((vf ? vf[i] : bf2f(vb[i])) / s);
        r = r > 127 ? 127 : r < -127 ? -127 : r;
        q[i] = (uint8_t)((int)r + 128);
    }
    *scale = s;
}
#endif

static void task_x(void *ctx, int task) {
    call_t *c = ctx;
    int H = c->H;
    for (int t = task * c->rb; t < c->T && t < (task + 1) * c->rb; t++) {
        const float *xf = c->xdt == 0 ? (const float *)c->x + (size_t)t * H : NULL;
        const uint16_t *xb = c->xdt == 1 ? (const uint16_t *)c->x + (size_t)t * H : NULL;
        if (c->wf == WF_BF16) { /* only reached with fp32 x */
            uint16_t *d = (uint16_t *)c->xc + (size_t)t * H;
            for (int i = 0; i < H; i++) d[i] = f2bf(xf[i]);
        } else if (Q8(c->wf)) {
            quant_row(xf, xb, H, (uint8_t *)c->xc + (size_t)t * H, &c->xs[t]);
        } else { /* fp32 dot with bf16 x */
            float *d = (float *)c->xc + (size_t)t * H;
            for (int i = 0; i < H; i++) d[i] = bf2f(xb[i]);
        }
    }
}

#if SIMD && defined(__AVX512VNNI__)
#define PACKED 1
/* w8a8 on weights packed for dpbusd: 16 rows x 4 bytes per 64-byte vector, blocks [N/16][K/4][16][4]
 * (prepare packs them; N % 16 == 0, K % 4 == 0). A vector of 16 int32 sums per activation row, so no
 * horizontal reductions and a vector epilogue. acc[t] += the rows of `w` times a[t] (u8, 4 at a time). */
static inline __attribute__((always_inline)) void dot16(const int8_t *w0, const int8_t *w1,
                                                        const uint8_t *const *a, int K, __m512i *acc0,
                                                        __m512i *acc1, const int NB, const int NT) {
    for (int k = 0; k < K; k += 4) {
        _mm_prefetch((const char *)(w0 + (size_t)k * 16) + PF, _MM_HINT_T0); /* one cache line per step */
        __m512i v0 = _mm512_loadu_si512((const void *)(w0 + (size_t)k * 16)), v1 = v0;
        if (NB == 2) {
            _mm_prefetch((const char *)(w1 + (size_t)k * 16) + PF, _MM_HINT_T0);
            v1 = _mm512_loadu_si512((const void *)(w1 + (size_t)k * 16));
        }
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) {
            int32_t a4;
            memcpy(&a4, a[t] + k, 4);
            __m512i av = _mm512_set1_epi32(a4); /* 4 activation bytes, shared by both blocks */
            acc0[t] = _mm512_dpbusd_epi32(acc0[t], av, v0);
            if (NB == 2) acc1[t] = _mm512_dpbusd_epi32(acc1[t], av, v1);
        }
    }
}

/* dot16 for one activation row with two chains per block: even and odd 4-byte steps of K (K % 8 == 0,
 * as H % 16 == I % 16 == 0 for packed weights), summed at the end. */
static inline __attribute__((always_inline)) void dot16_one(const int8_t *w0, const int8_t *w1, const uint8_t *a,
                                                            int K, __m512i *acc0, __m512i *acc1, const int NB) {
    __m512i a0 = _mm512_setzero_si512(), b0 = a0, a1 = a0, b1 = a0;
    for (int k = 0; k < K; k += 8) {
        _mm_prefetch((const char *)(w0 + (size_t)k * 16) + PF, _MM_HINT_T0);
        _mm_prefetch((const char *)(w0 + (size_t)k * 16) + PF + 64, _MM_HINT_T0);
        int32_t x0, x1;
        memcpy(&x0, a + k, 4);
        memcpy(&x1, a + k + 4, 4);
        __m512i v0 = _mm512_set1_epi32(x0), v1 = _mm512_set1_epi32(x1);
        a0 = _mm512_dpbusd_epi32(a0, v0, _mm512_loadu_si512((const void *)(w0 + (size_t)k * 16)));
        b0 = _mm512_dpbusd_epi32(b0, v1, _mm512_loadu_si512((const void *)(w0 + (size_t)k * 16 + 64)));
        if (NB == 2) {
            _mm_prefetch((const char *)(w1 + (size_t)k * 16) + PF, _MM_HINT_T0);
            _mm_prefetch((const char *)(w1 + (size_t)k * 16) + PF + 64, _MM_HINT_T0);
            a1 = _mm512_dpbusd_epi32(a1, v0, _mm512_loadu_si512((const void *)(w1 + (size_t)k * 16)));
            b1 = _mm512_dpbusd_epi32(b1, v1, _mm512_loadu_si512((const void *)(w1 + (size_t)k * 16 + 64)));
        }
    }
    acc0[0] = _mm512_add_epi32(a0, b0);
    acc1[0] = _mm512_add_epi32(a1, b1);
}

/* acc0[t] (and acc1[t] when w1) = the 16 int32 sums of the packed rows at w0 (w1) with activation row a[t] */
static void dot16_block(const int8_t *w0, const int8_t *w1, const uint8_t *const *a, int K, __m512i *acc0,
                        __m512i *acc1, int nt) {
    if (SPLIT1 && nt == 1) {
        if (w1) dot16_one(w0, w1, a[0], K, acc0, acc1, 2);
        else dot16_one(w0, w1, a[0], K, acc0, acc1, 1);
        return;
    }
    for (int t = 0; t < TB; t++) acc0[t] = acc1[t] = _mm512_setzero_si512();
#define D16(N) (w1 ? dot16(w0, w1, a, K, acc0, acc1, 2, N) : dot16(w0, w1, a, K, acc0, acc1, 1, N))
    switch (nt) {
    case 1: D16(1); break;
    case 2: D16(2); break;
    case 3: D16(3); break;
    case 4: D16(4); break;
    case 5: D16(5); break;
    case 6: D16(6); break;
    case 7: D16(7); break;
    default: D16(8); break;
    }
#undef D16
}

/* (sum - 128 * rowsum) * scale_a * scale_w for 16 rows */
static inline __m512 deq16(__m512i sum, const int32_t *rs, float sa, const float *sw) {
    __m512i v = _mm512_sub_epi32(sum, _mm512_slli_epi32(_mm512_loadu_si512((const void *)rs), 7));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(sa)), _mm512_loadu_ps(sw));
}

static void task_gu_packed(call_t *c, int task) {
    int a = task / c->njb, jblk = task % c->njb;
    int e = c->act_e[a], p0 = c->act_start[a], p1 = c->act_start[a + 1];
    int H = c->H, I = c->I, j0 = jblk * c->jb, j1 = j0 + c->jb < I ? j0 + c->jb : I;
    const int8_t *we = (const int8_t *)c->w13 + (size_t)e * 2 * I * H; /* block j/16 at we + j * H */
    const float *s = c->s13 + (size_t)e * 2 * I;
    const int32_t *rs = c->rs13 + (size_t)e * 2 * I;
    int js = (int)(L2_BLOCK / (2 * (size_t)H)) & ~15;
    js = js < 16 ? 16 : js;
    for (int jb0 = j0; jb0 < j1; jb0 += js) {
        int jb1 = jb0 + js < j1 ? jb0 + js : j1;
        for (int p = p0; p < p1; p += TB) {
            int nt = p1 - p < TB ? p1 - p : TB;
            const uint8_t *ar[TB];
            for (int t = 0; t < nt; t++) ar[t] = (const uint8_t *)c->xc + (size_t)c->ptok[p + t] * H;
            for (int j = jb0; j < jb1; j += 16) {
                __m512i g[TB], u[TB];
                dot16_block(we + (size_t)j * H, we + (size_t)(I + j) * H, ar, H, g, u, nt);
                for (int t = 0; t < nt; t++) {
                    float xs = c->xs[c->ptok[p + t]], gv[16], uv[16];
                    _mm512_storeu_ps(gv, deq16(g[t], rs + j, xs, s + j));
                    _mm512_storeu_ps(uv, deq16(u[t], rs + I + j, xs, s + I + j));
                    float *dst = c->actf + (size_t)(p + t) * I + j;
                    for (int i = 0; i < 16; i++) dst[i] = silu(gv[i]) * uv[i];
                }
            }
        }
    }
}

static void task_down_packed(call_t *c, int task) {
    int H = c->H, I = c->I, h0 = task * c->hb, h1 = h0 + c->hb < H ? h0 + c->hb : H;
    for (int t = 0; t < c->T; t++) memset(c->out + (size_t)t * H + h0, 0, sizeof(float) * (h1 - h0));
    int hs = (int)(L2_BLOCK / (size_t)I) & ~15;
    hs = hs < 16 ? 16 : hs;
    for (int a = 0; a < c->nact; a++) {
        int e = c->act_e[a], p0 = c->act_start[a], p1 = c->act_start[a + 1];
        const int8_t *we = (const int8_t *)c->w2 + (size_t)e * H * I;
        const float *s = c->s2 + (size_t)e * H;
        const int32_t *rs = c->rs2 + (size_t)e * H;
        for (int hb0 = h0; hb0 < h1; hb0 += hs) {
            int hb1 = hb0 + hs < h1 ? hb0 + hs : h1;
            for (int p = p0; p < p1; p += TB) {
                int nt = p1 - p < TB ? p1 - p : TB;
                const uint8_t *ar[TB];
                for (int t = 0; t < nt; t++) ar[t] = (const uint8_t *)c->act + (size_t)(p + t) * I;
                for (int h = hb0; h < hb1; h += 32) { /* two 16-row blocks share the activation broadcasts */
                    int nb = h + 16 < hb1 ? 2 : 1;
                    __m512i acc[2][TB];
                    dot16_block(we + (size_t)h * I, nb == 2 ? we + (size_t)(h + 16) * I : NULL, ar, I, acc[0], acc[1], nt);
                    for (int b = 0; b < nb; b++)
                        for (int t = 0; t < nt; t++) {
                            float *o = c->out + (size_t)c->ptok[p + t] * H + h + 16 * b;
                            __m512 y = deq16(acc[b][t], rs + h + 16 * b, c->as[p + t] * c->pw[p + t], s + h + 16 * b);
                            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), y));
                        }
                }
            }
        }
    }
}
#else
#define PACKED 0
#endif

static void task_gu(void *ctx, int task) {
    call_t *c = ctx;
#if PACKED
    if (c->wf == WF_I8P) return task_gu_packed(c, task);
#endif
    int a = task / c->njb, jblk = task % c->njb;
    int e = c->act_e[a], p0 = c->act_start[a], p1 = c->act_start[a + 1];
    int H = c->H, I = c->I, j0 = jblk * c->jb, j1 = j0 + c->jb < I ? j0 + c->jb : I;
    size_t ws = wsize(c->wf), xsz = asize(c->wf);
    const char *we = (const char *)c->w13 + (size_t)e * 2 * I * H * ws;
    const float *s = c->s13 ? c->s13 + (size_t)e * 2 * I : NULL;
    const int32_t *rs = c->rs13 ? c->rs13 + (size_t)e * 2 * I : NULL;
    /* Sub-blocks of weight rows that stay in L2 while every group of TB pairs passes over them (one
     * group at decode: then this is a plain walk over the rows). */
    int js = (int)(L2_BLOCK / (2 * (size_t)H * ws));
    js = js < 1 ? 1 : js;
    for (int jb0 = j0; jb0 < j1; jb0 += js) {
        int jb1 = jb0 + js < j1 ? jb0 + js : j1;
        for (int p = p0; p < p1; p += TB) {
            int nt = p1 - p < TB ? p1 - p : TB;
            const void *ar[TB];
            for (int t = 0; t < nt; t++) ar[t] = (const char *)c->xc + (size_t)c->ptok[p + t] * H * xsz;
            for (int j = jb0; j < jb1; j++) {
                const void *w[2] = {we + (size_t)j * H * ws, we + (size_t)(I + j) * H * ws};
                float res[2][TB];
                dot_block(c->wf, w, ar, H, res, 2, nt);
                for (int t = 0; t < nt; t++) {
                    float g = res[0][t], u = res[1][t];
                    if (c->wf == WF_I8) {
                        float xs = c->xs[c->ptok[p + t]];
                        int32_t (*ri)[TB] = (int32_t (*)[TB])res;
                        g = (float)(ri[0][t] - 128 * rs[j]) * xs * s[j];
                        u = (float)(ri[1][t] - 128 * rs[I + j]) * xs * s[I + j];
                    } else if (c->wf == WF_I8W) {
                        g *= s[j];
                        u *= s[I + j];
                    }
                    float v = silu(g) * u;
                    size_t at = (size_t)(p + t) * I + j;
                    if (c->wf == WF_BF16) ((uint16_t *)c->act)[at] = f2bf(v);
                    else c->actf[at] = v;
                }
            }
        }
    }
}

static void task_q(void *ctx, int task) {
    call_t *c = ctx;
    for (int p = task * c->rb; p < c->N && p < (task + 1) * c->rb; p++)
        quant_row(c->actf + (size_t)p * c->I, NULL, c->I, (uint8_t *)c->act + (size_t)p * c->I, &c->as[p]);
}

static void task_down(void *ctx, int task) {
    call_t *c = ctx;
#if PACKED
    if (c->wf == WF_I8P) return task_down_packed(c, task);
#endif
    int H = c->H, I = c->I, h0 = task * c->hb, h1 = h0 + c->hb < H ? h0 + c->hb : H;
    size_t ws = wsize(c->wf), xsz = asize(c->wf);
    for (int t = 0; t < c->T; t++) memset(c->out + (size_t)t * H + h0, 0, sizeof(float) * (h1 - h0));
    for (int a = 0; a < c->nact; a++) {
        int e = c->act_e[a], p0 = c->act_start[a], p1 = c->act_start[a + 1];
        const char *we = (const char *)c->w2 + (size_t)e * H * I * ws;
        const float *s = c->s2 ? c->s2 + (size_t)e * H : NULL;
        const int32_t *rs = c->rs2 ? c->rs2 + (size_t)e * H : NULL;
        int hs = (int)(L2_BLOCK / ((size_t)I * ws)) & ~1; /* rows kept in L2 across the pair groups */
        hs = hs < 2 ? 2 : hs;
        for (int hb0 = h0; hb0 < h1; hb0 += hs) {
            int hb1 = hb0 + hs < h1 ? hb0 + hs : h1;
            for (int p = p0; p < p1; p += TB) {
                int nt = p1 - p < TB ? p1 - p : TB;
                const void *ar[TB];
                for (int t = 0; t < nt; t++) ar[t] = (const char *)c->act + (size_t)(p + t) * I * xsz;
                for (int h = hb0; h < hb1; h += 2) {
                    int nr = h + 1 < hb1 ? 2 : 1;
                    const void *w[2] = {we + (size_t)h * I * ws, we + (size_t)(h + nr - 1) * I * ws};
                    float res[2][TB];
                    dot_block(c->wf, w, ar, I, res, nr, nt);
                    for (int r = 0; r < nr; r++)
                        for (int t = 0; t < nt; t++) {
                            float y = res[r][t];
                            if (c->wf == WF_I8)
                                y = (float)(((int32_t (*)[TB])res)[r][t] - 128 * rs[h + r]) * c->as[p + t] * s[h + r];
                            else if (c->wf == WF_I8W) y *= s[h + r];
                            c->out[(size_t)c->ptok[p + t] * H + h + r] += c->pw[p + t] * y;
                        }
                }
            }
        }
    }
}

static double now_s(void) { return 1e-9 * (double)mono_ns(); }

/* The phase times summed since the last read (setup, x, gu, q, down, in seconds) and the call count
 * into out[0..5]; resets them. */
void kvc_pool_phases(void *pool, double *out) {
    pool_t *pl = pool;
    pthread_mutex_lock(&pl->call_mu);
    for (int i = 0; i < 5; i++) {
        out[i] = pl->phase[i];
        pl->phase[i] = 0;
    }
    out[5] = (double)pl->calls;
    pl->calls = 0;
    pthread_mutex_unlock(&pl->call_mu);
}

/* quant_row over T rows of x [T, H] (fp32 when xdt 0, bf16 when 1) into q [T, H] (u8 = int8 + 128)
 * and scale [T]: what the w8a8 calls do to their inputs, for the tests' comparison with torch. */
void kvc_quant_rows(const void *x, int xdt, int T, int H, uint8_t *q, float *scale) {
    for (int t = 0; t < T; t++)
        quant_row(xdt == 0 ? (const float *)x + (size_t)t * H : NULL,
                  xdt == 1 ? (const uint16_t *)x + (size_t)t * H : NULL, H, q + (size_t)t * H, &scale[t]);
}

/* The calling thread's scratch, kept between calls (the worker thread calls once per layer). */
static __thread char *scratch;
static __thread size_t scratch_cap;

static void *carve(char **at, size_t bytes) {
    void *p = *at;
    *at += (bytes + 63) & ~(size_t)63;
    return p;
}

static long moe(pool_t *pl, int n, int wf, const void *x, int xdt, int T, int H, int I, int k, int E,
                const int64_t *ids, const float *weights, const void *w13, const void *w2, const float *s13,
                const float *s2, const int32_t *rs13, const int32_t *rs2, float *out, double max_rows);

/* out [T, H] fp32 = sum over pairs (t, slot) with ids[t, slot] >= 0 of weights[t, slot] * expert(x[t]).
 * ids [T, k] int64 (-1 = not here), weights [T, k] fp32, x [T, H] fp32 (xdt 0) or bf16 (xdt 1);
 * w13 [E, 2I, H], w2 [E, H, I] in format wf; s13 [E, 2I], s2 [E, H] fp32 scales and rs13, rs2 int32
 * row sums for the int8 formats (rs only for w8a8). Returns the pair count; -1 for an id >= E; -2
 * without computing when the pairs per active expert exceed max_rows (the caller's other kernel). */
long kvc_moe(void *pool, int wf, const void *x, int xdt, int T, int H, int I, int k, int E, const int64_t *ids,
             const float *weights, const void *w13, const void *w2, const float *s13, const float *s2,
             const int32_t *rs13, const int32_t *rs2, float *out, double max_rows) {
    pool_t *pl = pool;
    int n = pl->n;
    if (wf == WF_I8P && (!PACKED || H % 16 || I % 16)) return -4; /* packed: VNNI builds, 16-row blocks */
    pthread_mutex_lock(&pl->call_mu); /* one call at a time per pool */
    long r = moe(pl, n, wf, x, xdt, T, H, I, k, E, ids, weights, w13, w2, s13, s2, rs13, rs2, out, max_rows);
    pthread_mutex_unlock(&pl->call_mu);
    return r;
}

static long moe(pool_t *pl, int n, int wf, const void *x, int xdt, int T, int H, int I, int k, int E,
                const int64_t *ids, const float *weights, const void *w13, const void *w2, const float *s13,
                const float *s2, const int32_t *rs13, const int32_t *rs2, float *out, double max_rows) {
    double t0 = now_s(), t1, t2, t3;
    size_t need = sizeof(int32_t) * (E + 1) * 3 + 64 * 12;
    int N = 0, nact = 0;
    for (long i = 0; i < (long)T * k; i++) {
        if (ids[i] >= E) return -1;
        N += ids[i] >= 0;
    }
    need += (sizeof(int32_t) + sizeof(float)) * (size_t)N + (size_t)T * H * 4 + sizeof(float) * T +
            (size_t)N * I * (4 + 4) + sizeof(float) * N;
    if (need > scratch_cap) {
        free(scratch);
        scratch = malloc(need);
        scratch_cap = scratch ? need : 0;
        if (!scratch) return -3;
    }
    char *at = scratch;
    call_t c = {.wf = wf, .T = T, .H = H, .I = I, .k = k, .E = E, .nthreads = n, .xdt = xdt, .x = x, .w13 = w13,
                .w2 = w2, .s13 = s13, .s2 = s2, .rs13 = rs13, .rs2 = rs2, .N = N, .out = out};
    int32_t *count = carve(&at, sizeof(int32_t) * (E + 1));
    c.act_e = carve(&at, sizeof(int32_t) * (E + 1));
    c.act_start = carve(&at, sizeof(int32_t) * (E + 1));
    c.ptok = carve(&at, sizeof(int32_t) * (N + 1));
    c.pw = carve(&at, sizeof(float) * (N + 1));
    memset(count, 0, sizeof(int32_t) * (E + 1));
    for (long i = 0; i < (long)T * k; i++)
        if (ids[i] >= 0) count[ids[i]]++;
    int32_t *fill = count; /* reused as the next free slot of each active expert */
    int pos = 0;
    for (int e = 0; e < E; e++) {
        int cnt = count[e];
        if (cnt) {
            c.act_e[nact] = e;
            c.act_start[nact++] = pos;
        }
        fill[e] = pos;
        pos += cnt;
    }
    c.act_start[nact] = pos;
    c.nact = nact;
    if (nact && (double)N / nact > max_rows) return -2;
    if (N == 0) {
        memset(out, 0, sizeof(float) * (size_t)T * H);
        return 0;
    }
    for (long i = 0; i < (long)T * k; i++) /* stable: pairs of one expert in token order */
        if (ids[i] >= 0) {
            int p = fill[ids[i]]++;
            c.ptok[p] = (int32_t)(i / k);
            c.pw[p] = weights[i];
        }
    int need_x = !((wf == WF_BF16 && xdt == 1) || ((wf == WF_F32 || wf == WF_I8W) && xdt == 0));
    c.xc = need_x ? carve(&at, (size_t)T * H * 4) : (void *)x;
    c.xs = carve(&at, sizeof(float) * T);
    c.actf = carve(&at, sizeof(float) * (size_t)N * I);
    c.act = wf == WF_F32 || wf == WF_I8W ? (void *)c.actf : carve(&at, (size_t)N * I * 4);
    c.as = carve(&at, sizeof(float) * N);
    t1 = now_s();
    pl->phase[0] += t1 - t0;
    if (need_x) {
        c.rb = (T + 4 * n - 1) / (4 * n);
        if (c.rb < 1 || (long)T * H <= SMALL_PREP) c.rb = T; /* a decode step's few rows: no pool round */
        pool_run(pl, task_x, &c, (T + c.rb - 1) / c.rb);
    }
    /* blocks: about GU_TASKS tasks per thread, each at least 8 rows so a task streams a contiguous run */
    long gut = wf == WF_I8P ? GU_TASKS_PACKED : GU_TASKS, dnt = wf == WF_I8P ? DOWN_TASKS_PACKED : DOWN_TASKS;
    int jb = (int)(((long)I * nact + gut * n - 1) / (gut * n));
    c.jb = jb < 8 ? 8 : jb > 64 ? 64 : jb;
    if (wf == WF_I8P) c.jb = (c.jb + 15) & ~15; /* whole packed blocks */
    c.njb = (I + c.jb - 1) / c.jb;
    t2 = now_s();
    pl->phase[1] += t2 - t1;
    pool_run(pl, task_gu, &c, nact * c.njb);
    t3 = now_s();
    pl->phase[2] += t3 - t2;
    if (Q8(wf)) {
        c.rb = (N + 4 * n - 1) / (4 * n);
        if (c.rb < 1 || (long)N * I <= SMALL_PREP) c.rb = N;
        pool_run(pl, task_q, &c, (N + c.rb - 1) / c.rb);
    }
    int hb = (int)((H + dnt * n - 1) / (dnt * n));
    hb = (hb + 8) & ~15; /* whole cache lines of out per task, the multiple of 16 nearest */
    c.hb = hb < 16 ? 16 : hb;
    c.nhb = (H + c.hb - 1) / c.hb;
    t1 = now_s();
    pl->phase[3] += t1 - t3;
    pool_run(pl, task_down, &c, c.nhb);
    pl->phase[4] += now_s() - t1;
    pl->calls++;
    return N;
}

/* What this build compiled in, for the start-up log: bit 0 AVX-512, 1 avx512_bf16, 2 avx512_vnni. */
int kvc_isa(void) {
    int f = SIMD;
#if SIMD && defined(__AVX512BF16__)
    f |= 2;
#endif
#if SIMD && defined(__AVX512VNNI__)
    f |= 4;
#endif
    return f;
}
