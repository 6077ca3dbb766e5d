/* Inference kernels for the CPU.

1. The int8 encoder's two element-wise steps around each integer matmul (roberta.inference.Int8Linear),
one pass each instead of PyTorch's four to five: per-token quantisation of the activations, and the
per-token scale plus bias on the int32 sums oneDNN has already scaled per column.

Both give bit for bit what the PyTorch expressions in inference.py give (the tests hold them to it):
every operation is one IEEE single-precision step in the same order, and contraction into fused
multiply-adds is switched off (-ffp-contract=off in setup.py), since an FMA rounds once where PyTorch
rounds twice. The loops are plain C that the compiler vectorises once per instruction set (AVX-512,
AVX2 or the baseline); the one used is the widest this process may use (`set_isa`, below).

2. Self-attention on packed sequences (roberta.model.RobertaSelfAttention.packed on CPU): each
sequence's real tokens attend to each other straight from the [tokens, 3 x heads x dim] projection,
with no padding, masks or gathers. Short sequences are most of what an encoder serves, and there
PyTorch's attention costs more in overhead and padding than in arithmetic. This one is not held to
PyTorch's bits (it sums in another order and has its own exp), only to within float rounding; its
multiply-adds are explicit FMA intrinsics, so -ffp-contract=off does not slow it. Two variants, AVX-512
(16 lanes) and AVX2 with FMA (8 lanes), taking the same steps.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#include <pthread.h>

/* The widest instructions this process may use: 2 AVX-512, 1 AVX2 (+FMA), 0 the baseline. Python sets it
   from PyTorch's own capability (set_isa, from torch.backends.cpu.get_cpu_capability(), which honours
   ATEN_CPU_CAPABILITY), never above what the CPU has; each kernel below is compiled once per level. */
static int isa = 0;

#if defined(__x86_64__) && defined(__GNUC__)
#define X86 1
#define AVX512 __attribute__((target("avx512f")))
#define AVX2 __attribute__((target("avx2,fma")))
/* void f_avx512, f_avx2 and f_base: one body (an always-inline function) compiled for each level. */
#define PER_ISA(name, params, args) \
    AVX512 static void name##_avx512 params { name##_body args; } \
    AVX2 static void name##_avx2 params { name##_body args; } \
    static void name##_base params { name##_body args; } \
    static void name params { if (isa == 2) name##_avx512 args; else if (isa == 1) name##_avx2 args; else name##_base args; }
#else
#define PER_ISA(name, params, args) static void name params { name##_body args; }
#endif

/* q[i, k] = trunc(x[i, k] * (127 / m[i]) + 128.5) and m[i] = max(max_k |x[i, k]|, 1e-30): symmetric
   int8 with an offset of 128 (uint8), rounding halves up. The row maximum is taken on the bit patterns
   with the sign cleared: for floats that are not NaN, their order is that of unsigned integers, and an
   integer maximum vectorises where a float one would need -ffast-math. */
static inline __attribute__((always_inline))
void quantize_body(const float *x, Py_ssize_t rows, Py_ssize_t k, uint8_t *q, float *m) {
    for (Py_ssize_t i = 0; i < rows; i++) {
        const float *row = x + i * k;
        const uint32_t *bits = (const uint32_t *)row;
        uint32_t top = 0;
        for (Py_ssize_t j = 0; j < k; j++) {
            uint32_t a = bits[j] & 0x7FFFFFFFu;
            top = a > top ? a : top;
        }
        float largest;
        memcpy(&largest, &top, sizeof largest);
        largest = largest < 1e-30f ? 1e-30f : largest;
        m[i] = largest;
        const float scale = 127.0f / largest;
        uint8_t *out = q + i * k;
        for (Py_ssize_t j = 0; j < k; j++) {
            float v = row[j] * scale;
            v = v + 128.5f;
            out[j] = (uint8_t)(int32_t)v;  /* v lies in [1.5, 255.5]: truncation is rounding */
        }
    }
}

/* y[i, j] = bias[j] + y[i, j] * m[i], in place, rounding the product and the sum each (no FMA). */
PER_ISA(quantize, (const float *x, Py_ssize_t rows, Py_ssize_t k, uint8_t *q, float *m), (x, rows, k, q, m))

static inline __attribute__((always_inline))
void scale_rows_body(float *y, Py_ssize_t rows, Py_ssize_t n, const float *m, const float *bias) {
    for (Py_ssize_t i = 0; i < rows; i++) {
        float *row = y + i * n;
        const float s = m[i];
        for (Py_ssize_t j = 0; j < n; j++) {
            float v = row[j] * s;
            row[j] = bias[j] + v;
        }
    }
}

PER_ISA(scale_rows, (float *y, Py_ssize_t rows, Py_ssize_t n, const float *m, const float *bias), (y, rows, n, m, bias))

typedef struct {
    const float *qkv;
    float *out;
    const int64_t *cu;  /* cumulative lengths, [batch + 1] */
    Py_ssize_t batch, heads, dim, max_length;
    float scale;
    int isa;  /* 2: the AVX-512 kernel, 1: the AVX2 one */
    int next;  /* the next (sequence, head) to take, shared by the threads */
    int failed;
} attend_job;

#ifdef X86
#include <immintrin.h>
#define ATTEND_KERNEL 1

/* e^x, 16 at a time, for x <= 0 (the softmax's shifted scores): x = n ln2 + r with |r| <= ln2 / 2, e^r by
   its degree-6 Taylor polynomial (relative error under 2e-7 there), times 2^n (vscalefps). ln2 is
   subtracted in two parts, so that n ln2 is exact; below -87, e^x is under float's range anyway. */
AVX512 static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  /* x second: a NaN stays NaN (maxps returns it), as in PyTorch */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145752f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.42860677e-6f), r);
    __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 720), _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

#define ROWS 4  /* queries per block: 4 rows x 4 vectors of output (a 64-wide head) fill 16 registers */

/* One head of one sequence of T tokens: softmax(q k^T * scale) v, for a head size that is a multiple of
   16. `kt` receives k transposed, [dim, Tp] with T rounded up to 16 and zeros after T, so that a block
   of queries gets its scores as whole-vector multiply-adds along contiguous rows; `p` [ROWS, Tp] holds
   the block's scores, then their exponentials. Queries past T in the last block repeat query T - 1,
   so every load is in bounds; their results are not stored. */
AVX512 static inline __attribute__((always_inline))
void attend_head(const attend_job *job, Py_ssize_t b, Py_ssize_t h, float *kt, float *p, const Py_ssize_t d) {
    const Py_ssize_t inner = job->heads * d, stride = 3 * inner;
    const Py_ssize_t start = job->cu[b], T = job->cu[b + 1] - start, Tp = (T + 15) & ~(Py_ssize_t)15;
    if (T == 0) return;
    const float *q = job->qkv + start * stride + h * d, *k = q + inner, *v = q + 2 * inner;
    float *out = job->out + start * inner + h * d;
    const __mmask16 tail = (__mmask16)((1u << (16 - (Tp - T))) - 1);  /* real keys of the last vector */
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32((int)stride));
    for (Py_ssize_t j0 = 0; j0 < Tp; j0 += 16) {  /* 16 keys' values of one dimension at a time */
        const __mmask16 real = j0 + 16 < Tp ? 0xFFFF : tail;
        for (Py_ssize_t c = 0; c < d; c++)
            _mm512_storeu_ps(kt + c * Tp + j0, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), real, rows, k + j0 * stride + c, 4));
    }
    for (Py_ssize_t i0 = 0; i0 < T; i0 += ROWS) {
        const float *qi[ROWS];
        for (int r = 0; r < ROWS; r++) qi[r] = q + (i0 + r < T ? i0 + r : T - 1) * stride;
        for (Py_ssize_t j0 = 0; j0 < Tp; j0 += 16) {  /* scores: p[r, j] = scale * q_r . k_j */
            __m512 acc[ROWS];
            for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
            for (Py_ssize_t c = 0; c < d; c++) {
                const __m512 kc = _mm512_loadu_ps(kt + c * Tp + j0);
                for (int r = 0; r < ROWS; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(qi[r][c]), kc, acc[r]);
            }
            for (int r = 0; r < ROWS; r++) _mm512_storeu_ps(p + r * Tp + j0, _mm512_mul_ps(acc[r], _mm512_set1_ps(job->scale)));
        }
        float norm[ROWS];
        for (int r = 0; r < ROWS; r++) {  /* softmax numerators e^(s - max), and 1 / their sum */
            float *pr = p + r * Tp;
            const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
            __m512 top = minus_inf;
            for (Py_ssize_t j0 = 0; j0 < Tp; j0 += 16)
                top = _mm512_max_ps(top, _mm512_mask_loadu_ps(minus_inf, j0 + 16 < Tp ? 0xFFFF : tail, pr + j0));
            const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
            __m512 sum = _mm512_setzero_ps();
            for (Py_ssize_t j0 = 0; j0 < Tp; j0 += 16) {
                __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(pr + j0), shift));
                e = _mm512_maskz_mov_ps(j0 + 16 < Tp ? 0xFFFF : tail, e);  /* padded keys weigh 0 */
                _mm512_storeu_ps(pr + j0, e);
                sum = _mm512_add_ps(sum, e);
            }
            norm[r] = 1.0f / _mm512_reduce_add_ps(sum);  /* >= 1: the largest score contributes e^0 */
        }
        for (Py_ssize_t c0 = 0; c0 < d; c0 += 64) {  /* outputs: o_r = sum_j p[r, j] v_j, 64 columns at a time */
            const int vectors = d - c0 >= 64 ? 4 : (int)((d - c0) / 16);
            __m512 o[ROWS][4];
            for (int r = 0; r < ROWS; r++)
                for (int u = 0; u < 4; u++) o[r][u] = _mm512_setzero_ps();
            for (Py_ssize_t j = 0; j < T; j++) {
                const float *vj = v + j * stride + c0;
                __m512 vv[4];
                for (int u = 0; u < 4; u++) vv[u] = u < vectors ? _mm512_loadu_ps(vj + 16 * u) : _mm512_setzero_ps();
                for (int r = 0; r < ROWS; r++) {
                    const __m512 w = _mm512_set1_ps(p[r * Tp + j]);
                    for (int u = 0; u < 4; u++) o[r][u] = _mm512_fmadd_ps(w, vv[u], o[r][u]);
                }
            }
            for (int r = 0; r < ROWS && i0 + r < T; r++)
                for (int u = 0; u < vectors; u++)
                    _mm512_storeu_ps(out + (i0 + r) * inner + c0 + 16 * u, _mm512_mul_ps(o[r][u], _mm512_set1_ps(norm[r])));
        }
    }
}

AVX512 static void attend_one(const attend_job *job, Py_ssize_t b, Py_ssize_t h, float *kt, float *p) {
    if (job->dim == 64)  /* every RoBERTa size: the compiler unrolls the head with its size known */
        attend_head(job, b, h, kt, p, 64);
    else
        attend_head(job, b, h, kt, p, job->dim);
}


/* The same for AVX2 with FMA, 8 lanes: e^x with 2^n built in the exponent bits (n >= -126 after the clamp,
   so 2^n is a normal float); padded keys are told apart by their index, as AVX2 has no mask registers. */
AVX2 static inline __m256 exp_nonpositive8(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  /* x second: a NaN stays NaN */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693145752f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-1.42860677e-6f), r);
    __m256 p = _mm256_fmadd_ps(r, _mm256_set1_ps(1.0f / 720), _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

AVX2 static inline float reduce8(__m256 v, int max) {
    __m128 a = _mm256_castps256_ps128(v), b = _mm256_extractf128_ps(v, 1);
    a = max ? _mm_max_ps(a, b) : _mm_add_ps(a, b);
    b = _mm_movehl_ps(a, a);
    a = max ? _mm_max_ps(a, b) : _mm_add_ps(a, b);
    b = _mm_shuffle_ps(a, a, 1);
    return _mm_cvtss_f32(max ? _mm_max_ss(a, b) : _mm_add_ss(a, b));
}

/* attend_head for AVX2: k transposed into kt [dim, Tp] (Tp: T rounded up to 8, zeros after T), scores of
   ROWS queries 8 keys at a time, outputs 16 columns (two vectors) at a time: 8 accumulators, in the 16
   registers AVX2 has. */
AVX2 static inline __attribute__((always_inline))
void attend_head_avx2(const attend_job *job, Py_ssize_t b, Py_ssize_t h, float *kt, float *p, const Py_ssize_t d) {
    const Py_ssize_t inner = job->heads * d, stride = 3 * inner;
    const Py_ssize_t start = job->cu[b], T = job->cu[b + 1] - start, Tp = (T + 7) & ~(Py_ssize_t)7;
    if (T == 0) return;
    const float *q = job->qkv + start * stride + h * d, *k = q + inner, *v = q + 2 * inner;
    float *out = job->out + start * inner + h * d;
    for (Py_ssize_t c = 0; c < d; c++) {
        for (Py_ssize_t j = 0; j < T; j++) kt[c * Tp + j] = k[j * stride + c];
        for (Py_ssize_t j = T; j < Tp; j++) kt[c * Tp + j] = 0.0f;
    }
    const __m256 lane = _mm256_set_ps(7, 6, 5, 4, 3, 2, 1, 0), length = _mm256_set1_ps((float)T);
    for (Py_ssize_t i0 = 0; i0 < T; i0 += ROWS) {
        const float *qi[ROWS];
        for (int r = 0; r < ROWS; r++) qi[r] = q + (i0 + r < T ? i0 + r : T - 1) * stride;
        for (Py_ssize_t j0 = 0; j0 < Tp; j0 += 8) {
            __m256 acc[ROWS];
            for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
            for (Py_ssize_t c = 0; c < d; c++) {
                const __m256 kc = _mm256_loadu_ps(kt + c * Tp + j0);
                for (int r = 0; r < ROWS; r++) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(qi[r][c]), kc, acc[r]);
            }
            for (int r = 0; r < ROWS; r++) _mm256_storeu_ps(p + r * Tp + j0, _mm256_mul_ps(acc[r], _mm256_set1_ps(job->scale)));
        }
        float norm[ROWS];
        for (int r = 0; r < ROWS; r++) {
            float *pr = p + r * Tp;
            const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
            __m256 top = minus_inf;
            for (Py_ssize_t j0 = 0; j0 < Tp; j0 += 8) {
                const __m256 real = _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps((float)j0)), length, _CMP_LT_OQ);
                top = _mm256_max_ps(top, _mm256_blendv_ps(minus_inf, _mm256_loadu_ps(pr + j0), real));
            }
            const __m256 shift = _mm256_set1_ps(reduce8(top, 1));
            __m256 sum = _mm256_setzero_ps();
            for (Py_ssize_t j0 = 0; j0 < Tp; j0 += 8) {
                const __m256 real = _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps((float)j0)), length, _CMP_LT_OQ);
                __m256 e = _mm256_and_ps(exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(pr + j0), shift)), real);
                _mm256_storeu_ps(pr + j0, e);
                sum = _mm256_add_ps(sum, e);
            }
            norm[r] = 1.0f / reduce8(sum, 0);
        }
        for (Py_ssize_t c0 = 0; c0 < d; c0 += 16) {  /* d is a multiple of 16 */
            __m256 o[ROWS][2];
            for (int r = 0; r < ROWS; r++) o[r][0] = o[r][1] = _mm256_setzero_ps();
            for (Py_ssize_t j = 0; j < T; j++) {
                const float *vj = v + j * stride + c0;
                const __m256 v0 = _mm256_loadu_ps(vj), v1 = _mm256_loadu_ps(vj + 8);
                for (int r = 0; r < ROWS; r++) {
                    const __m256 w = _mm256_set1_ps(p[r * Tp + j]);
                    o[r][0] = _mm256_fmadd_ps(w, v0, o[r][0]);
                    o[r][1] = _mm256_fmadd_ps(w, v1, o[r][1]);
                }
            }
            for (int r = 0; r < ROWS && i0 + r < T; r++)
                for (int u = 0; u < 2; u++)
                    _mm256_storeu_ps(out + (i0 + r) * inner + c0 + 8 * u, _mm256_mul_ps(o[r][u], _mm256_set1_ps(norm[r])));
        }
    }
}

AVX2 static void attend_one_avx2(const attend_job *job, Py_ssize_t b, Py_ssize_t h, float *kt, float *p) {
    if (job->dim == 64)
        attend_head_avx2(job, b, h, kt, p, 64);
    else
        attend_head_avx2(job, b, h, kt, p, job->dim);
}

static void *attend_worker(void *arg) {
    attend_job *job = arg;
    const size_t padded = ((size_t)job->max_length + 15) & ~(size_t)15;  /* T rounded up, as in attend_head */
    float *work = malloc(sizeof(float) * (size_t)(job->dim + ROWS) * (padded ? padded : 16));
    if (!work) { __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED); return NULL; }
    const int items = (int)(job->batch * job->heads);
    for (int item; (item = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED)) < items;)
        (job->isa == 2 ? attend_one : attend_one_avx2)(job, item / job->heads, item % job->heads, work,
                                                       work + job->dim * padded);
    free(work);
    return NULL;
}
#endif /* ATTEND_KERNEL */

/* A contiguous buffer of `count` items of `size` bytes, writable when asked; else a Python error. */
static int get(PyObject *obj, Py_buffer *view, Py_ssize_t count, Py_ssize_t size, int writable, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    if (view->len != count * size) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %zd", what, view->len, count * size);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *py_quantize_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) return PyErr_Format(PyExc_TypeError, "quantize_rows(x, rows, k, q, m)");
    Py_ssize_t rows = PyLong_AsSsize_t(args[1]), k = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (rows < 0 || k < 1) return PyErr_Format(PyExc_ValueError, "bad shape %zd x %zd", rows, k);
    Py_buffer x, q, m;
    if (get(args[0], &x, rows * k, 4, 0, "x") < 0) return NULL;
    if (get(args[3], &q, rows * k, 1, 1, "q") < 0) { PyBuffer_Release(&x); return NULL; }
    if (get(args[4], &m, rows, 4, 1, "m") < 0) { PyBuffer_Release(&x); PyBuffer_Release(&q); return NULL; }
    Py_BEGIN_ALLOW_THREADS
    quantize(x.buf, rows, k, q.buf, m.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&x); PyBuffer_Release(&q); PyBuffer_Release(&m);
    Py_RETURN_NONE;
}

static PyObject *py_scale_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) return PyErr_Format(PyExc_TypeError, "scale_rows(y, rows, n, m, bias)");
    Py_ssize_t rows = PyLong_AsSsize_t(args[1]), n = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (rows < 0 || n < 1) return PyErr_Format(PyExc_ValueError, "bad shape %zd x %zd", rows, n);
    Py_buffer y, m, b;
    if (get(args[0], &y, rows * n, 4, 1, "y") < 0) return NULL;
    if (get(args[3], &m, rows, 4, 0, "m") < 0) { PyBuffer_Release(&y); return NULL; }
    if (get(args[4], &b, n, 4, 0, "bias") < 0) { PyBuffer_Release(&y); PyBuffer_Release(&m); return NULL; }
    Py_BEGIN_ALLOW_THREADS
    scale_rows(y.buf, rows, n, m.buf, b.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&y); PyBuffer_Release(&m); PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

/* The widest level this CPU has (AVX2 counts only with FMA, which the attention kernel needs). */
static int cpu_isa(void) {
#ifdef X86
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

static int attend_runs(void) {
#ifdef ATTEND_KERNEL
    return isa >= 1;
#else
    return 0;
#endif
}

static PyObject *py_attend_available(PyObject *self, PyObject *unused) { return PyBool_FromLong(attend_runs()); }

static PyObject *py_set_isa(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    int asked = !strcmp(name, "AVX512") ? 2 : !strcmp(name, "AVX2") ? 1 : 0;  /* DEFAULT and others: 0 */
    int most = cpu_isa();
    isa = asked < most ? asked : most;
    return PyUnicode_FromString(isa == 2 ? "AVX512" : isa == 1 ? "AVX2" : "DEFAULT");
}

#ifdef ATTEND_KERNEL
static PyObject *py_attend(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) return PyErr_Format(PyExc_TypeError, "attend(qkv, tokens, cu_seqlens, batch, heads, dim, out, threads)");
    Py_ssize_t tokens = PyLong_AsSsize_t(args[1]), batch = PyLong_AsSsize_t(args[3]);
    Py_ssize_t heads = PyLong_AsSsize_t(args[4]), dim = PyLong_AsSsize_t(args[5]);
    long threads = PyLong_AsLong(args[7]);
    if (PyErr_Occurred()) return NULL;
    if (!attend_runs()) return PyErr_Format(PyExc_RuntimeError, "attend needs AVX2 with FMA or AVX-512 (see attend_available())");
    if (dim % 16) return PyErr_Format(PyExc_ValueError, "attend takes heads of a multiple of 16 dimensions, not %zd", dim);
    if (tokens < 0 || batch < 0 || heads < 1 || dim < 1 || threads < 1 || batch * heads > 0x7fffffff)
        return PyErr_Format(PyExc_ValueError, "bad sizes: %zd tokens, %zd sequences, %zd heads of %zd, %ld threads",
                            tokens, batch, heads, dim, threads);
    Py_buffer qkv, cu, out;
    if (get(args[0], &qkv, tokens * 3 * heads * dim, 4, 0, "qkv") < 0) return NULL;
    if (get(args[2], &cu, batch + 1, 8, 0, "cu_seqlens") < 0) { PyBuffer_Release(&qkv); return NULL; }
    if (get(args[6], &out, tokens * heads * dim, 4, 1, "out") < 0) { PyBuffer_Release(&qkv); PyBuffer_Release(&cu); return NULL; }
    const int64_t *c = cu.buf;
    Py_ssize_t max_length = 0;
    int ok = c[0] == 0 && c[batch] == tokens;
    for (Py_ssize_t b = 0; ok && b < batch; b++) {
        ok = c[b + 1] >= c[b];
        if (c[b + 1] - c[b] > max_length) max_length = c[b + 1] - c[b];
    }
    if (!ok) {
        PyBuffer_Release(&qkv); PyBuffer_Release(&cu); PyBuffer_Release(&out);
        return PyErr_Format(PyExc_ValueError, "cu_seqlens must rise from 0 to the %zd tokens", tokens);
    }
    attend_job job = {qkv.buf, out.buf, c, batch, heads, dim, max_length, 1.0f / sqrtf((float)dim), isa, 0, 0};
    if (threads > 256) threads = 256;  /* the pool's size: more threads than any machine's cores asked */
    if (threads > batch * heads) threads = batch * heads > 0 ? (long)(batch * heads) : 1;  /* no idle threads */
    pthread_t pool[256];
    long started = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; started < threads - 1; started++)  /* the caller's thread is the last worker */
        if (pthread_create(&pool[started], NULL, attend_worker, &job) != 0) break;
    attend_worker(&job);
    for (long t = 0; t < started; t++) pthread_join(pool[t], NULL);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&qkv); PyBuffer_Release(&cu); PyBuffer_Release(&out);
    if (job.failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}
#else
static PyObject *py_attend(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return PyErr_Format(PyExc_RuntimeError, "attend needs an x86-64 build with AVX2 or AVX-512");
}
#endif

static PyMethodDef methods[] = {
    {"quantize_rows", (PyCFunction)(void (*)(void))py_quantize_rows, METH_FASTCALL,
     "quantize_rows(x, rows, k, q, m): float32 x [rows, k] into uint8 q and float32 row maxima m"},
    {"scale_rows", (PyCFunction)(void (*)(void))py_scale_rows, METH_FASTCALL,
     "scale_rows(y, rows, n, m, bias): y = bias + y * m[row], in place"},
    {"set_isa", py_set_isa, METH_O, "set_isa(name): use at most AVX512, AVX2 or DEFAULT (torch.backends.cpu."
     "get_cpu_capability()), never more than the CPU has; returns the level in use"},
    {"attend_available", py_attend_available, METH_NOARGS, "attend_available(): whether attend runs at the level in use (AVX2+FMA or AVX-512)"},
    {"attend", (PyCFunction)(void (*)(void))py_attend, METH_FASTCALL,
     "attend(qkv, tokens, cu_seqlens, batch, heads, dim, out, threads): self-attention of packed sequences, "
     "float32 qkv [tokens, 3 * heads * dim] into out [tokens, heads * dim]; cu_seqlens int64 [batch + 1]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "CPU inference kernels: int8 element-wise steps (roberta.inference), packed attention (roberta.model).", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
