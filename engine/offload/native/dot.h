/* Dot products of weight rows with activation rows, per weight format and ISA. Included once, by
 * experts.c (one translation unit). */
/* ---------------------------------------------------------------- scalar helpers */
static inline float bf2f(uint16_t b) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)b << 16};
    return v.f;
}

static inline uint16_t f2bf(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    union { float f; uint32_t u; } v = {.f = f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1)) >> 16);
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* ---------------------------------------------------------------- dot kernels
 * res[r][t] = sum_k w[r][k] * a[t][k] for NR weight rows (1 or 2) and NT activation rows (1..TB).
 * NR and NT are literals at every call site, so the loops unroll into registers.
 */
#define KERNEL static inline __attribute__((always_inline)) void
/* stmt for every (weight row r < NR, token t < NT) of a kernel's accumulators, fully unrolled */
#define FOR_RT(stmt)                                                                              \
    _Pragma("GCC unroll 8") for (int r = 0; r < NR; r++) _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) stmt

#if SIMD
static inline __mmask16 m16(int n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }
static inline __mmask32 m32(int n) { return n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1); }
static inline __mmask64 m64(int n) { return n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1); }
#endif

#if SIMD
KERNEL dot_f32(const float *const *w, const float *const *a, int K, float res[2][TB], const int NR, const int NT) {
    __m512 acc[2][TB];
    FOR_RT(acc[r][t] = _mm512_setzero_ps());
    for (int k = 0; k < K; k += 16) {
        __mmask16 m = m16(K - k);
        if ((k * (int)sizeof(*w[0])) % 64 == 0) /* once per cache line of each weight row */
            _Pragma("GCC unroll 8") for (int r = 0; r < NR; r++) _mm_prefetch((const char *)(w[r] + k) + PF, _MM_HINT_T0);
        __m512 wv[2];
        _Pragma("GCC unroll 8")
        for (int r = 0; r < NR; r++) wv[r] = _mm512_maskz_loadu_ps(m, w[r] + k);
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) {
            __m512 av = _mm512_maskz_loadu_ps(m, a[t] + k);
            _Pragma("GCC unroll 8")
            for (int r = 0; r < NR; r++) acc[r][t] = _mm512_fmadd_ps(wv[r], av, acc[r][t]);
        }
    }
    FOR_RT(res[r][t] = _mm512_reduce_add_ps(acc[r][t]));
}

KERNEL dot_bf16(const uint16_t *const *w, const uint16_t *const *a, int K, float res[2][TB], const int NR,
                const int NT) {
#if SIMD && defined(__AVX512BF16__)
    __m512 acc[2][TB];
    FOR_RT(acc[r][t] = _mm512_setzero_ps());
#define BF_STEP(LOAD)                                                                            \
    {                                                                                            \
        __m512i wv[2];                                                                           \
        _Pragma("GCC unroll 8") for (int r = 0; r < NR; r++) wv[r] = LOAD(w[r] + k);             \
        _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) {                                   \
            __m512i av = LOAD(a[t] + k);                                                         \
            _Pragma("GCC unroll 8") for (int r = 0; r < NR; r++)                                 \
                acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)av, (__m512bh)wv[r]);          \
        }                                                                                        \
    }
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        _Pragma("GCC unroll 8")
        for (int r = 0; r < NR; r++) _mm_prefetch((const char *)(w[r] + k) + PF, _MM_HINT_T0);
#define LD(p) _mm512_loadu_si512((const void *)(p))
        BF_STEP(LD)
#undef LD
    }
    if (k < K) {
        __mmask32 m = m32(K - k);
#define LD(p) _mm512_maskz_loadu_epi16(m, (p))
        BF_STEP(LD)
#undef LD
    }
#undef BF_STEP
    FOR_RT(res[r][t] = _mm512_reduce_add_ps(acc[r][t]));
#elif SIMD
    __m512 acc[2][TB];
    FOR_RT(acc[r][t] = _mm512_setzero_ps());
    for (int k = 0; k < K; k += 16) {
        __mmask16 m = m16(K - k);
        if ((k * (int)sizeof(*w[0])) % 64 == 0) /* once per cache line of each weight row */
            _Pragma("GCC unroll 8") for (int r = 0; r < NR; r++) _mm_prefetch((const char *)(w[r] + k) + PF, _MM_HINT_T0);
        __m512 wv[2];
        _Pragma("GCC unroll 8")
        for (int r = 0; r < NR; r++)
            wv[r] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w[r] + k)), 16));
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) {
            __m512 av = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a[t] + k)), 16));
            _Pragma("GCC unroll 8")
            for (int r = 0; r < NR; r++) acc[r][t] = _mm512_fmadd_ps(wv[r], av, acc[r][t]);
        }
    }
    FOR_RT(res[r][t] = _mm512_reduce_add_ps(acc[r][t]));
#endif
}

/* u8 activations (q + 128) times s8 weights: the raw int32 sums, stored as int32 in res (a float array
 * by type; sums pass 2^24, so they stay integers until the caller removes 128 * rowsum(w)). */
KERNEL dot_u8s8(const int8_t *const *w, const uint8_t *const *a, int K, float res[2][TB], const int NR, const int NT) {
#if SIMD && defined(__AVX512VNNI__)
    __m512i acc[2][TB];
    FOR_RT(acc[r][t] = _mm512_setzero_si512());
    for (int k = 0; k < K; k += 64) {
        __mmask64 m = m64(K - k);
        if ((k * (int)sizeof(*w[0])) % 64 == 0) /* once per cache line of each weight row */
            _Pragma("GCC unroll 8") for (int r = 0; r < NR; r++) _mm_prefetch((const char *)(w[r] + k) + PF, _MM_HINT_T0);
        __m512i wv[2];
        _Pragma("GCC unroll 8")
        for (int r = 0; r < NR; r++) wv[r] = _mm512_maskz_loadu_epi8(m, w[r] + k);
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) {
            __m512i av = _mm512_maskz_loadu_epi8(m, a[t] + k);
            _Pragma("GCC unroll 8")
            for (int r = 0; r < NR; r++) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], av, wv[r]);
        }
    }
    FOR_RT(((int32_t (*)[TB])res)[r][t] = _mm512_reduce_add_epi32(acc[r][t]));
#elif SIMD
    __m512i acc[2][TB];
    FOR_RT(acc[r][t] = _mm512_setzero_si512());
    for (int k = 0; k < K; k += 32) {
        __mmask32 m = m32(K - k);
        if ((k * (int)sizeof(*w[0])) % 64 == 0) /* once per cache line of each weight row */
            _Pragma("GCC unroll 8") for (int r = 0; r < NR; r++) _mm_prefetch((const char *)(w[r] + k) + PF, _MM_HINT_T0);
        __m512i wv[2];
        _Pragma("GCC unroll 8")
        for (int r = 0; r < NR; r++) wv[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, w[r] + k));
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) {
            __m512i av = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(m, a[t] + k));
            _Pragma("GCC unroll 8")
            for (int r = 0; r < NR; r++) acc[r][t] = _mm512_add_epi32(acc[r][t], _mm512_madd_epi16(av, wv[r]));
        }
    }
    FOR_RT(((int32_t (*)[TB])res)[r][t] = _mm512_reduce_add_epi32(acc[r][t]));
#endif
}

/* int8 weights times fp32 activations (weight-only int8); the caller applies the channel scale. */
KERNEL dot_s8f32(const int8_t *const *w, const float *const *a, int K, float res[2][TB], const int NR, const int NT) {
    __m512 acc[2][TB];
    FOR_RT(acc[r][t] = _mm512_setzero_ps());
    for (int k = 0; k < K; k += 16) {
        __mmask16 m = m16(K - k);
        if ((k * (int)sizeof(*w[0])) % 64 == 0) /* once per cache line of each weight row */
            _Pragma("GCC unroll 8") for (int r = 0; r < NR; r++) _mm_prefetch((const char *)(w[r] + k) + PF, _MM_HINT_T0);
        __m512 wv[2];
        _Pragma("GCC unroll 8")
        for (int r = 0; r < NR; r++) wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w[r] + k)));
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) {
            __m512 av = _mm512_maskz_loadu_ps(m, a[t] + k);
            _Pragma("GCC unroll 8")
            for (int r = 0; r < NR; r++) acc[r][t] = _mm512_fmadd_ps(wv[r], av, acc[r][t]);
        }
    }
    FOR_RT(res[r][t] = _mm512_reduce_add_ps(acc[r][t]));
}

#endif /* SIMD kernels */

#define CASES(NR, call)                                                                          \
    switch (nt) {                                                                                \
    case 1: call(NR, 1); break;                                                                  \
    case 2: call(NR, 2); break;                                                                  \
    case 3: call(NR, 3); break;                                                                  \
    case 4: call(NR, 4); break;                                                                  \
    case 5: call(NR, 5); break;                                                                  \
    case 6: call(NR, 6); break;                                                                  \
    case 7: call(NR, 7); break;                                                                  \
    default: call(NR, 8); break;                                                                 \
    }

#if !SIMD
/* Without AVX-512: one plain loop for every format and block shape (small code, quick to build). */
static void dot_scalar(int wf, const void *const *w, const void *const *a, int K, float res[2][TB], int nr, int nt) {
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++) {
            float s = 0;
            int32_t si = 0;
            for (int k = 0; k < K; k++) {
                if (wf == WF_F32) s += ((const float *)w[r])[k] * ((const float *)a[t])[k];
                else if (wf == WF_BF16) s += bf2f(((const uint16_t *)w[r])[k]) * bf2f(((const uint16_t *)a[t])[k]);
                else if (wf == WF_I8) si += (int32_t)((const int8_t *)w[r])[k] * (int32_t)((const uint8_t *)a[t])[k];
                else s += (float)((const int8_t *)w[r])[k] * ((const float *)a[t])[k];
            }
            if (wf == WF_I8) ((int32_t (*)[TB])res)[r][t] = si;
            else res[r][t] = s;
        }
}
#endif

/* res[r][t] for rows w[0..nr) (weight format wf) and activation rows a[0..nt), length K. */
static void dot_block(int wf, const void *const *w, const void *const *a, int K, float res[2][TB], int nr, int nt) {
#if !SIMD
    dot_scalar(wf, w, a, K, res, nr, nt);
#else
#define F32(R, N) dot_f32((const float *const *)w, (const float *const *)a, K, res, R, N)
#define BF(R, N) dot_bf16((const uint16_t *const *)w, (const uint16_t *const *)a, K, res, R, N)
#define U8(R, N) dot_u8s8((const int8_t *const *)w, (const uint8_t *const *)a, K, res, R, N)
#define S8(R, N) dot_s8f32((const int8_t *const *)w, (const float *const *)a, K, res, R, N)
    switch (wf * 2 + (nr == 2)) {
    case WF_F32 * 2: CASES(1, F32); break;
    case WF_F32 * 2 + 1: CASES(2, F32); break;
    case WF_BF16 * 2: CASES(1, BF); break;
    case WF_BF16 * 2 + 1: CASES(2, BF); break;
    case WF_I8 * 2: CASES(1, U8); break;
    case WF_I8 * 2 + 1: CASES(2, U8); break;
    case WF_I8W * 2: CASES(1, S8); break;
    default: CASES(2, S8); break;
    }
#endif
}
