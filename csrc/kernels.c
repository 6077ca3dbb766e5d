/* The int8 encoder's two element-wise steps around each integer matmul (roberta.inference.Int8Linear),
one pass each instead of PyTorch's four to five: per-token quantisation of the activations, and the
per-token scale plus bias on the int32 sums oneDNN has already scaled per column.

Both give bit for bit what the PyTorch expressions in inference.py give (the tests hold them to it):
every operation is one IEEE single-precision step in the same order, and contraction into fused
multiply-adds is switched off (-ffp-contract=off in setup.py), since an FMA rounds once where PyTorch
rounds twice. The loops are plain C that the compiler vectorises for the machine's widest units
(target_clones: AVX-512, AVX2 or the baseline, chosen at load time).
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* q[i, k] = trunc(x[i, k] * (127 / m[i]) + 128.5) and m[i] = max(max_k |x[i, k]|, 1e-30): symmetric
   int8 with an offset of 128 (uint8), rounding halves up. The row maximum is taken on the bit patterns
   with the sign cleared: for floats that are not NaN, their order is that of unsigned integers, and an
   integer maximum vectorises where a float one would need -ffast-math. */
VECTOR_CLONES
static void quantize(const float *x, Py_ssize_t rows, Py_ssize_t k, uint8_t *q, float *m) {
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
VECTOR_CLONES
static void scale_rows(float *y, Py_ssize_t rows, Py_ssize_t n, const float *m, const float *bias) {
    for (Py_ssize_t i = 0; i < rows; i++) {
        float *row = y + i * n;
        const float s = m[i];
        for (Py_ssize_t j = 0; j < n; j++) {
            float v = row[j] * s;
            row[j] = bias[j] + v;
        }
    }
}

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

static PyMethodDef methods[] = {
    {"quantize_rows", (PyCFunction)(void (*)(void))py_quantize_rows, METH_FASTCALL,
     "quantize_rows(x, rows, k, q, m): float32 x [rows, k] into uint8 q and float32 row maxima m"},
    {"scale_rows", (PyCFunction)(void (*)(void))py_scale_rows, METH_FASTCALL,
     "scale_rows(y, rows, n, m, bias): y = bias + y * m[row], in place"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "The int8 encoder's element-wise steps (roberta.inference).", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
