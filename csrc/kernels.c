/* Inference kernels for the CPU.

1. The int8 encoder's two element-wise steps around each integer matmul (roberta.inference.Int8Linear),
one pass each instead of PyTorch's four to five: per-token quantisation of the activations, and the
per-token scale plus bias on the int32 sums oneDNN has already scaled per column, with the FFN's GELU in
the same pass over the rows (below, 3), and in the FFN the quantisation of those rows for its second
matmul too, while they are in cache.

Both give bit for bit what the PyTorch expressions in inference.py give (the tests hold them to it):
every operation is one IEEE single-precision step in the same order, and contraction into fused
multiply-adds is switched off (-ffp-contract=off in setup.py), since an FMA rounds once where PyTorch
rounds twice. The loops are plain C that the compiler vectorises once per instruction set (AVX-512,
AVX2 or the baseline); the one used is the widest this process may use (`set_isa`, below).

2. Self-attention on packed sequences (roberta.model.RobertaSelfAttention.packed on CPU): each
sequence's real tokens attend to each other straight from the [tokens, 3 x heads x dim] projection,
with no padding, masks or gathers. Short sequences are most of what an encoder serves, and there
PyTorch's attention costs more in overhead and padding than in arithmetic. This one is not held to
PyTorch's bits (it sums in another order and has its own exp), only to within float rounding. Written
once (csrc/lanes.h), for AVX-512 (16 lanes) and AVX2 with FMA (8 lanes).

3. The float32 steps between the matmuls that PyTorch makes in several passes over a whole tensor: each
sublayer's residual addition and LayerNorm (roberta.model.add_norm) in one pass per row, the same bits at
every instruction-set level; and GELU (with the int8 rescaling above), within 5e-7 of the exact
function.

All of them run on PyTorch's own threads, through OpenMP (-fopenmp: the libgomp torch has loaded), as many as
torch.get_num_threads(): the element-wise steps share their rows (`parallel_rows`), attention its
(sequence, head) pairs. Threads of their own (pthreads) would compete for the cores with PyTorch's, which
keep spinning for a while after each matmul: on 2 cores (Intel Ice Lake, int8 base, 128 SST-2 sentences)
attention took 156-176 ms a pass on pthreads and 81-94 ms on PyTorch's threads.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>

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

/* The residual connection and LayerNorm after each sublayer of the post-LayerNorm encoder, one pass over
   a row held in L1 instead of PyTorch's three over the whole tensor (add, then LayerNorm's moments, then
   its normalisation): y[i] = (v - mean(v)) / sqrt(var(v) + eps) * gamma + beta with v = y[i] + r[i], in
   place. The variance is taken about the mean, in a second sweep of the row, as PyTorch does (not as
   E[v^2] - mean^2, which loses digits when the mean is large). Each sum runs over PARTIAL_SUMS partial
   sums (a column of the row in steps of PARTIAL_SUMS each), then the elements past the last whole step, then the
   partial sums in order: the same operations in the same order at every level (one body, vectorised by
   the compiler at each: the 32 partial sums fill 2 AVX-512 registers or 4 AVX2 ones), so the result is
   the same bits on every CPU. */
#define PARTIAL_SUMS 32

/* Fold the partial sums into `rest` (the sum of the elements past the last whole step), in order. */
static inline float fold(const float *lane, float rest) {
    for (int l = 0; l < PARTIAL_SUMS; l++) rest += lane[l];
    return rest;
}

static inline __attribute__((always_inline))
void add_norm_body(float *restrict y, const float *restrict r, Py_ssize_t rows, Py_ssize_t n,
                   const float *restrict gamma, const float *restrict beta, float eps) {
    const Py_ssize_t whole = n - n % PARTIAL_SUMS;
    for (Py_ssize_t i = 0; i < rows; i++) {
        float *restrict row = y + i * n;
        const float *restrict res = r + i * n;
        float lane[PARTIAL_SUMS] = {0}, rest = 0.0f;
        for (Py_ssize_t j = 0; j < whole; j += PARTIAL_SUMS)
            for (int l = 0; l < PARTIAL_SUMS; l++) {
                float v = row[j + l] + res[j + l];
                row[j + l] = v;
                lane[l] += v;
            }
        for (Py_ssize_t j = whole; j < n; j++) {
            row[j] = row[j] + res[j];
            rest += row[j];
        }
        const float mean = fold(lane, rest) / (float)n;
        float square[PARTIAL_SUMS] = {0};
        rest = 0.0f;
        for (Py_ssize_t j = 0; j < whole; j += PARTIAL_SUMS)
            for (int l = 0; l < PARTIAL_SUMS; l++) {
                float d = row[j + l] - mean;
                square[l] += d * d;
            }
        for (Py_ssize_t j = whole; j < n; j++) {
            float d = row[j] - mean;
            rest += d * d;
        }
        const float rstd = 1.0f / sqrtf(fold(square, rest) / (float)n + eps);
        for (Py_ssize_t j = 0; j < n; j++) {
            float d = row[j] - mean;
            d = d * rstd;
            d = d * gamma[j];
            row[j] = d + beta[j];
        }
    }
}

PER_ISA(add_norm, (float *y, const float *r, Py_ssize_t rows, Py_ssize_t n, const float *gamma, const float *beta,
                   float eps), (y, r, rows, n, gamma, beta, eps))

/* Rows of an element-wise step shared among threads, CHUNK floats' worth of rows at a time, through
   OpenMP: the same runtime as PyTorch's (libgomp, loaded by torch first), so these steps run on the
   threads PyTorch's own operations have just used, not on threads of their own that would compete with
   them for the cores while they wait. A step over fewer than 4 chunks per thread runs on fewer threads.
   Rows are independent, so the result is the same bits whatever the number of threads. */
#define CHUNK 16384

static void parallel_rows(void (*step)(const void *, Py_ssize_t, Py_ssize_t), const void *args, Py_ssize_t rows,
                          Py_ssize_t n, long threads) {
    const Py_ssize_t chunk = n >= CHUNK ? 1 : CHUNK / n, chunks = (rows + chunk - 1) / chunk;
    if (threads > chunks / 4) threads = chunks / 4 > 1 ? (long)(chunks / 4) : 1;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (Py_ssize_t c = 0; c < chunks; c++)
        step(args, c * chunk, rows - c * chunk < chunk ? rows - c * chunk : chunk);
}

typedef struct { const float *x; Py_ssize_t k; uint8_t *q; float *m; } quantize_args;
static void quantize_step(const void *p, Py_ssize_t first, Py_ssize_t count) {
    const quantize_args *a = p;
    quantize(a->x + first * a->k, count, a->k, a->q + first * a->k, a->m + first);
}

/* GELU, x * Phi(x) with Phi the normal distribution's CDF, exact (erf) as fairseq and transformers use it:
   Phi(x) = 1 - q for x >= 0 and q for x < 0, q = erfc(|x| / sqrt 2) / 2, and erfc(z) ~ t P(t) e^-z^2 with
   t = 1 / (1 + p z), Abramowitz and Stegun's 7.1.26 (absolute error under 1.5e-7). Taking q for x < 0
   straight from erfc, not as 1 - (1 - q), keeps the small values of the negative side. PyTorch's own
   vectorised erf uses the same formula. e^-z^2 by the attention's exp (csrc/lanes.h). NaN stays NaN;
   +inf gives +inf (PyTorch's vectorised GELU gives NaN), -inf NaN (-inf x 0), as PyTorch's does.

   Written once, with the attention's exp, in csrc/lanes.h, on vectors of each level's own width. */
#define GELU_P 0.3275911f
#define GELU_A1 0.254829592f
#define GELU_A2 -0.284496736f
#define GELU_A3 1.421413741f
#define GELU_A4 -1.453152027f
#define GELU_A5 1.061405429f

/* Self-attention of packed sequences, shared by the threads of one call (`attend`). */
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

#define ROWS 4  /* queries per block of the attention */

/* csrc/lanes.h once per level: gelu_rows_<level> at every level, attend_one_<level> at AVX2 and AVX-512.
   There alone, multiply-adds are contracted into fused multiply-adds: 1.5x faster GELU than apart, and the
   AVX-512 and AVX2 levels then give the same bits (the int8 steps above keep their two roundings). */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#define LANES 4
#define OUT_VECTORS 2
#define TARGET
#define NAME(f) f##_base
#include "lanes.h"
#undef LANES
#undef OUT_VECTORS
#undef TARGET
#undef NAME
#ifdef X86
#define LANES 8
#define OUT_VECTORS 2
#define TARGET AVX2
#define NAME(f) f##_avx2
#include "lanes.h"
#undef LANES
#undef OUT_VECTORS
#undef TARGET
#undef NAME
#define LANES 16
#define OUT_VECTORS 4
#define TARGET AVX512
#define NAME(f) f##_avx512
#include "lanes.h"
#undef LANES
#undef OUT_VECTORS
#undef TARGET
#undef NAME
static void gelu_rows(float *y, Py_ssize_t rows, Py_ssize_t n) {
    if (isa == 2) gelu_rows_avx512(y, rows, n); else if (isa == 1) gelu_rows_avx2(y, rows, n); else gelu_rows_base(y, rows, n);
}
#define ATTEND_KERNEL 1
#else
static void gelu_rows(float *y, Py_ssize_t rows, Py_ssize_t n) { gelu_rows_base(y, rows, n); }
#endif
#pragma GCC pop_options

/* scale_rows, then GELU over the same rows (`gelu`) while they are in L1 or L2, then (where `q` is given)
   those rows quantised for the next int8 matmul: what quantize_rows would give from them later, from cache
   rather than from memory. */
typedef struct { float *y; Py_ssize_t n; const float *m, *bias; int gelu; uint8_t *q; float *q_m; } scale_args;
static void scale_step(const void *p, Py_ssize_t first, Py_ssize_t count) {
    const scale_args *a = p;
    for (Py_ssize_t i = first; i < first + count; i += 8) {  /* 8 rows at a time: 96 KB at 3072 wide */
        Py_ssize_t k = first + count - i < 8 ? first + count - i : 8;
        scale_rows(a->y + i * a->n, k, a->n, a->m + i, a->bias);
        if (a->gelu) gelu_rows(a->y + i * a->n, k, a->n);
        if (a->q) quantize(a->y + i * a->n, k, a->n, a->q + i * a->n, a->q_m + i);
    }
}

typedef struct { float *y; const float *r; Py_ssize_t n; const float *gamma, *beta; float eps; } add_norm_args;
static void add_norm_step(const void *p, Py_ssize_t first, Py_ssize_t count) {
    const add_norm_args *a = p;
    add_norm(a->y + first * a->n, a->r + first * a->n, count, a->n, a->gamma, a->beta, a->eps);
}

#ifdef ATTEND_KERNEL
/* One thread's share: (sequence, head) pairs taken one at a time until none are left. */
static void attend_worker(attend_job *job) {
    const size_t padded = ((size_t)job->max_length + 15) & ~(size_t)15;  /* T rounded up to any level's lanes */
    float *work = malloc(sizeof(float) * (size_t)(job->dim + ROWS) * (padded ? padded : 16));
    if (!work) { __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED); return; }
    const int items = (int)(job->batch * job->heads);
    for (int item; (item = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED)) < items;)
        (job->isa == 2 ? attend_one_avx512 : attend_one_avx2)(job, item / job->heads, item % job->heads, work,
                                                       work + job->dim * padded);
    free(work);
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

typedef struct { PyObject *obj; Py_ssize_t count, size; int writable; const char *what; } wanted;

/* Every buffer in `w` (`get`), or none of them and a Python error. */
static int get_all(const wanted *w, int k, Py_buffer *views) {
    for (int i = 0; i < k; i++)
        if (get(w[i].obj, &views[i], w[i].count, w[i].size, w[i].writable, w[i].what) < 0) {
            while (i--) PyBuffer_Release(&views[i]);
            return -1;
        }
    return 0;
}

/* `step` over the rows on `threads` threads without the GIL, then the buffers released. */
static PyObject *run_rows(void (*step)(const void *, Py_ssize_t, Py_ssize_t), const void *args, Py_ssize_t rows,
                          Py_ssize_t n, long threads, Py_buffer *views, int k) {
    Py_BEGIN_ALLOW_THREADS
    parallel_rows(step, args, rows, n, threads);
    Py_END_ALLOW_THREADS
    for (int i = 0; i < k; i++) PyBuffer_Release(&views[i]);
    Py_RETURN_NONE;
}

/* The rows (>= 0), row width (>= 1) and threads (>= 1) of an element-wise step; else a Python error. */
static int sizes(PyObject *rows_arg, PyObject *n_arg, PyObject *threads_arg, Py_ssize_t *rows, Py_ssize_t *n,
                 long *threads) {
    *rows = PyLong_AsSsize_t(rows_arg), *n = PyLong_AsSsize_t(n_arg), *threads = PyLong_AsLong(threads_arg);
    if (PyErr_Occurred()) return -1;
    if (*rows < 0 || *n < 1 || *threads < 1) {
        PyErr_Format(PyExc_ValueError, "bad shape %zd x %zd or %ld threads", *rows, *n, *threads);
        return -1;
    }
    return 0;
}

static PyObject *py_quantize_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) return PyErr_Format(PyExc_TypeError, "quantize_rows(x, rows, k, q, m, threads)");
    Py_ssize_t rows, k;
    long threads;
    Py_buffer v[3];
    if (sizes(args[1], args[2], args[5], &rows, &k, &threads) < 0) return NULL;
    wanted w[3] = {{args[0], rows * k, 4, 0, "x"}, {args[3], rows * k, 1, 1, "q"}, {args[4], rows, 4, 1, "m"}};
    if (get_all(w, 3, v) < 0) return NULL;
    quantize_args a = {v[0].buf, k, v[1].buf, v[2].buf};
    return run_rows(quantize_step, &a, rows, k, threads, v, 3);
}

static PyObject *py_scale_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7 && nargs != 9)
        return PyErr_Format(PyExc_TypeError, "scale_rows(y, rows, n, m, bias, gelu, threads[, q, q_m])");
    Py_ssize_t rows, n;
    long threads;
    Py_buffer v[5];
    int gelu = PyObject_IsTrue(args[5]), k = nargs == 9 ? 5 : 3;
    if (gelu < 0 || sizes(args[1], args[2], args[6], &rows, &n, &threads) < 0) return NULL;
    wanted w[5] = {{args[0], rows * n, 4, 1, "y"}, {args[3], rows, 4, 0, "m"}, {args[4], n, 4, 0, "bias"},
                   {k == 5 ? args[7] : NULL, rows * n, 1, 1, "q"}, {k == 5 ? args[8] : NULL, rows, 4, 1, "q_m"}};
    if (get_all(w, k, v) < 0) return NULL;
    scale_args a = {v[0].buf, n, v[1].buf, v[2].buf, gelu, k == 5 ? v[3].buf : NULL, k == 5 ? v[4].buf : NULL};
    return run_rows(scale_step, &a, rows, n, threads, v, k);
}

static PyObject *py_add_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) return PyErr_Format(PyExc_TypeError, "add_norm(y, r, rows, n, gamma, beta, eps, threads)");
    Py_ssize_t rows, n;
    long threads;
    Py_buffer v[4];
    double eps = PyFloat_AsDouble(args[6]);
    if ((eps == -1.0 && PyErr_Occurred()) || sizes(args[2], args[3], args[7], &rows, &n, &threads) < 0) return NULL;
    wanted w[4] = {{args[0], rows * n, 4, 1, "y"}, {args[1], rows * n, 4, 0, "r"}, {args[4], n, 4, 0, "gamma"},
                   {args[5], n, 4, 0, "beta"}};
    if (get_all(w, 4, v) < 0) return NULL;
    add_norm_args a = {v[0].buf, v[1].buf, n, v[2].buf, v[3].buf, (float)eps};
    return run_rows(add_norm_step, &a, rows, n, threads, v, 4);
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
    if (threads > batch * heads) threads = batch * heads > 0 ? (long)(batch * heads) : 1;  /* no idle threads */
    Py_BEGIN_ALLOW_THREADS
    #pragma omp parallel num_threads(threads) if (threads > 1)  /* PyTorch's threads, as `parallel_rows` */
    attend_worker(&job);
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
     "quantize_rows(x, rows, k, q, m, threads): float32 x [rows, k] into uint8 q and float32 row maxima m"},
    {"scale_rows", (PyCFunction)(void (*)(void))py_scale_rows, METH_FASTCALL,
     "scale_rows(y, rows, n, m, bias, gelu, threads[, q, q_m]): y = bias + y * m[row], then GELU where gelu, in "
     "place; then, given uint8 q [rows, n] and float32 q_m [rows], quantize_rows of the result into them"},
    {"add_norm", (PyCFunction)(void (*)(void))py_add_norm, METH_FASTCALL,
     "add_norm(y, r, rows, n, gamma, beta, eps, threads): y = LayerNorm(y + r) * gamma + beta over rows of n, in place"},
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
