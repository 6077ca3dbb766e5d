/* The kernels of csrc/kernels.c that are written once on vectors of LANES floats (GCC's vector extension,
   each operation one per lane) and compiled once per instruction-set level on that level's own width.
   kernels.c includes this file once per level, with
     LANES        16 (AVX-512), 8 (AVX2) or 4 (the baseline: SSE2, or NEON off x86);
     OUT_VECTORS  how many vectors of one output row the attention accumulates at once (below);
     TARGET       the level's target attribute, empty for the baseline;
     NAME(f)      f with the level's suffix (f_avx512, f_avx2, f_base).
   GCC lowers a vector wider than the target's piece by piece through memory, which is why each level
   gets its own width: with 16 lanes at every level, GELU ran 5x slower at AVX2 than at AVX-512.

   Multiply-adds here are contracted into fused multiply-adds (kernels.c compiles this file under
   fp-contract=fast), so the AVX-512 and AVX2 levels give the same bits lane for lane; x86's baseline
   (SSE2) has no FMA and rounds them apart. */

typedef float NAME(floats) __attribute__((vector_size(4 * LANES)));
typedef int32_t NAME(ints) __attribute__((vector_size(4 * LANES)));
#define floats NAME(floats)
#define ints NAME(ints)

TARGET static inline __attribute__((always_inline)) floats NAME(where)(ints mask, floats a, floats b) {
    return (floats)(((ints)a & mask) | ((ints)b & ~mask));
}

TARGET static inline __attribute__((always_inline)) floats NAME(load)(const float *p) {
    floats v;
    memcpy(&v, p, sizeof v);
    return v;
}

TARGET static inline __attribute__((always_inline)) void NAME(store)(float *p, floats v) { memcpy(p, &v, sizeof v); }

/* e^x for x <= 0 (softmax's shifted scores, GELU's -z^2): x = k ln2 + r with |r| <= ln2 / 2, e^r by its
   degree-6 Taylor polynomial (relative error under 2e-7 there), times 2^k put in the exponent bits. ln2
   is subtracted in two parts, so that k ln2 is exact. Below -87, e^x is under float's range anyway, and
   the clamp keeps k >= -126, where 2^k is a normal float; a NaN passes the clamp and stays NaN. */
TARGET static inline __attribute__((always_inline)) floats NAME(exp_nonpositive)(floats x) {
    x = NAME(where)(x < -87.0f, (floats){0} - 87.0f, x);
    const ints n = __builtin_convertvector(x * 1.44269504f - 0.5f, ints);  /* to nearest: truncation, x <= 0 */
    const floats k = __builtin_convertvector(n, floats);
    const floats r = (x - k * 0.693145752f) - k * 1.42860677e-6f;
    const floats e = (((((r * (1.0f / 720) + 1.0f / 120) * r + 1.0f / 24) * r + 1.0f / 6) * r + 0.5f) * r + 1.0f) * r + 1.0f;
    return e * (floats)((n + 127) << 23);
}

/* GELU (kernels.c says how): Phi(x) = 1 - q for x >= 0 and q for x < 0, q = t P(t) e^-z^2 / 2. */
TARGET static inline __attribute__((always_inline)) floats NAME(gelu)(floats x) {
    const floats z = (floats)((ints)x & 0x7fffffff) * 0.707106781f;  /* |x| / sqrt 2 */
    const floats t = 1.0f / (1.0f + z * GELU_P);
    const floats poly = ((((GELU_A5 * t + GELU_A4) * t + GELU_A3) * t + GELU_A2) * t + GELU_A1) * t;
    const floats q = 0.5f * poly * NAME(exp_nonpositive)(-(z * z));
    return x * NAME(where)(x < 0.0f, q, 1.0f - q);
}

/* GELU in place over rows x n floats. */
TARGET static void NAME(gelu_rows)(float *y, Py_ssize_t rows, Py_ssize_t n) {
    const Py_ssize_t count = rows * n;
    Py_ssize_t j = 0;
    for (; j + LANES <= count; j += LANES) NAME(store)(y + j, NAME(gelu)(NAME(load)(y + j)));
    if (j < count) {  /* the last few through a zeroed vector */
        floats v = {0};
        memcpy(&v, y + j, sizeof(float) * (size_t)(count - j));
        v = NAME(gelu)(v);
        memcpy(y + j, &v, sizeof(float) * (size_t)(count - j));
    }
}

#if LANES >= 8
/* One head of one sequence of T tokens: softmax(q k^T * scale) v, for a head size that is a multiple of
   16. `kt` receives k transposed, [dim, Tp] with T rounded up to LANES and zeros after T, so that a block
   of ROWS queries gets its scores as whole-vector multiply-adds along contiguous rows; `p` [ROWS, Tp]
   holds the block's scores, then their exponentials. Queries past T in the last block repeat query T - 1,
   so every load is in bounds; their results are not stored. The outputs of the block are accumulated
   OUT_VECTORS vectors of columns at a time: ROWS x OUT_VECTORS accumulators and OUT_VECTORS values fill
   the level's registers (16 + 4 of AVX-512's 32, 8 + 2 of AVX2's 16). */
TARGET static inline __attribute__((always_inline))
void NAME(attend_head)(const attend_job *job, Py_ssize_t b, Py_ssize_t h, float *kt, float *p, const Py_ssize_t d) {
    const Py_ssize_t inner = job->heads * d, stride = 3 * inner;
    const Py_ssize_t start = job->cu[b], T = job->cu[b + 1] - start, Tp = (T + LANES - 1) & ~(Py_ssize_t)(LANES - 1);
    if (T == 0) return;
    const float *q = job->qkv + start * stride + h * d, *k = q + inner, *v = q + 2 * inner;
    float *out = job->out + start * inner + h * d;
    for (Py_ssize_t j0 = 0; j0 < Tp; j0 += LANES) {  /* LANES keys at a time: a vector of kt from LANES rows */
        const Py_ssize_t last = T - 1 - j0;  /* keys past T repeat the last one: their scores are masked below */
        for (Py_ssize_t c = 0; c < d; c++) {
            floats column;
            for (int i = 0; i < LANES; i++) column[i] = k[(j0 + (i < last ? i : last)) * stride + c];
            NAME(store)(kt + c * Tp + j0, column);
        }
    }
    ints lane;  /* 0, 1, ..., LANES - 1: tells the padded keys of the last vector apart */
    for (int i = 0; i < LANES; i++) lane[i] = i;
    const floats minus_inf = (floats){0} - INFINITY;
    for (Py_ssize_t i0 = 0; i0 < T; i0 += ROWS) {
        const float *qi[ROWS];
        for (int r = 0; r < ROWS; r++) qi[r] = q + (i0 + r < T ? i0 + r : T - 1) * stride;
        for (Py_ssize_t j0 = 0; j0 < Tp; j0 += LANES) {  /* scores: p[r, j] = scale * q_r . k_j */
            floats acc[ROWS] = {{0}};
            for (Py_ssize_t c = 0; c < d; c++) {
                const floats kc = NAME(load)(kt + c * Tp + j0);
                for (int r = 0; r < ROWS; r++) acc[r] += qi[r][c] * kc;
            }
            for (int r = 0; r < ROWS; r++) NAME(store)(p + r * Tp + j0, acc[r] * job->scale);
        }
        float norm[ROWS];
        for (int r = 0; r < ROWS; r++) {  /* softmax numerators e^(s - max), and 1 / their sum */
            float *pr = p + r * Tp;
            floats top = minus_inf;
            for (Py_ssize_t j0 = 0; j0 < Tp; j0 += LANES) {
                const floats s = NAME(where)(lane + (int32_t)j0 < (int32_t)T, NAME(load)(pr + j0), minus_inf);
                top = NAME(where)(s > top, s, top);
            }
            float shift = top[0];
            for (int i = 1; i < LANES; i++) shift = top[i] > shift ? top[i] : shift;
            floats sum = {0};
            for (Py_ssize_t j0 = 0; j0 < Tp; j0 += LANES) {
                const ints real = lane + (int32_t)j0 < (int32_t)T;  /* padded keys weigh 0 */
                const floats e = (floats)((ints)NAME(exp_nonpositive)(NAME(load)(pr + j0) - shift) & real);
                NAME(store)(pr + j0, e);
                sum += e;
            }
            float total = 0.0f;
            for (int i = 0; i < LANES; i++) total += sum[i];
            norm[r] = 1.0f / total;  /* >= 1: the largest score contributes e^0 */
        }
        for (Py_ssize_t c0 = 0; c0 < d; c0 += OUT_VECTORS * LANES) {  /* outputs: o_r = sum_j p[r, j] v_j */
            const int vectors = d - c0 >= OUT_VECTORS * LANES ? OUT_VECTORS : (int)((d - c0) / LANES);
            floats o[ROWS][OUT_VECTORS] = {{{0}}};
            for (Py_ssize_t j = 0; j < T; j++) {
                const float *vj = v + j * stride + c0;
                floats vv[OUT_VECTORS];
                for (int u = 0; u < OUT_VECTORS; u++)  /* vectors past the head's end: any in bounds, not stored */
                    vv[u] = NAME(load)(vj + LANES * (u < vectors ? u : 0));
                for (int r = 0; r < ROWS; r++) {
                    const float w = p[r * Tp + j];
                    for (int u = 0; u < OUT_VECTORS; u++) o[r][u] += w * vv[u];
                }
            }
            for (int r = 0; r < ROWS && i0 + r < T; r++)
                for (int u = 0; u < vectors; u++) NAME(store)(out + (i0 + r) * inner + c0 + LANES * u, o[r][u] * norm[r]);
        }
    }
}

TARGET static void NAME(attend_one)(const attend_job *job, Py_ssize_t b, Py_ssize_t h, float *kt, float *p) {
    if (job->dim == 64)  /* every RoBERTa size: the compiler unrolls the head with its size known */
        NAME(attend_head)(job, b, h, kt, p, 64);
    else
        NAME(attend_head)(job, b, h, kt, p, job->dim);
}
#endif

#undef floats
#undef ints
