/* The decoding half of roberta.compress: zstd frames and byte planes back into words.

The numpy fallback in roberta/compress.py does the same with many passes over every chunk; here each
output word is built in registers from its plane bytes and written once, and zstd decodes without
the GIL. Every function takes buffers, checks their sizes, and releases the GIL while it runs, so
the decompression threads run in parallel. The bit layouts are documented in compress.py.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>

/* Get the buffers of nplanes planes and out (the last argument). out must be writable and hold n
   words of out_size bytes; each plane must hold the bytes compress.py's _plane_sizes gives it. */
static int get(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t nplanes, Py_buffer *views, Py_ssize_t out_size,
               Py_ssize_t *n) {
    if (nargs != nplanes + 1) {
        PyErr_Format(PyExc_TypeError, "expected %zd buffers, got %zd", nplanes + 1, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i <= nplanes; i++) {
        int flags = i == nplanes ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS;
        if (PyObject_GetBuffer(args[i], &views[i], flags) < 0) {
            while (i--) PyBuffer_Release(&views[i]);
            return -1;
        }
    }
    Py_ssize_t m = *n = views[nplanes].len / out_size;
    int ok = views[nplanes].len % out_size == 0, split_high = nplanes >= 5 && out_size != nplanes;
    for (Py_ssize_t i = 0; i < nplanes; i++) {
        Py_ssize_t expect = !split_high || i < 2 ? m : i < 4 ? (m + 7) / 8 : i == 4 ? (m + 1) / 2 : 2 * m;
        ok &= views[i].len == expect;
    }
    if (!ok) {
        for (Py_ssize_t i = 0; i <= nplanes; i++) PyBuffer_Release(&views[i]);
        PyErr_SetString(PyExc_ValueError, "plane and output sizes do not match");
        return -1;
    }
    return 0;
}

static void release(Py_buffer *views, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) PyBuffer_Release(&views[i]);
}

/* Planes of n 16-bit words: see _split_high in compress.py. */
typedef struct { const uint8_t *joint, *top, *signs, *m4, *nibbles; } high_planes;

static inline uint16_t join_high(high_planes p, Py_ssize_t i) {
    return (uint16_t)((p.signs[i >> 3] >> (i & 7) & 1) << 15 | (p.top[i] & 7) << 12 | (p.joint[i] & 0x7F) << 5
                      | (p.m4[i >> 3] >> (i & 7) & 1) << 4 | (p.nibbles[i >> 1] >> (i & 1) * 4 & 0xF));
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX2_PATH
/* Words i to i+15 in one vector: what gcc does not vectorise on its own. AVX2 is in every x86-64
   CPU since 2013 and checked at run time; elsewhere the plain loop does the same, slower. */
__attribute__((target("avx2"))) static inline __m256i join_high16_avx2(high_planes p, Py_ssize_t i) {
    const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, (short)32768);
    const __m128i low4 = _mm_set1_epi8(0xF);
    __m256i joint = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_loadu_si128((const __m128i *)(p.joint + i)), _mm_set1_epi8(0x7F)));
    __m256i top = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_loadu_si128((const __m128i *)(p.top + i)), _mm_set1_epi8(7)));
    __m128i packed = _mm_loadl_epi64((const __m128i *)(p.nibbles + i / 2));
    __m256i nibbles = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(_mm_and_si128(packed, low4), _mm_and_si128(_mm_srli_epi16(packed, 4), low4)));
    uint16_t sign16, m416;
    memcpy(&sign16, p.signs + i / 8, 2);
    memcpy(&m416, p.m4 + i / 8, 2);
    __m256i sign = _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)sign16), bit), bit), _mm256_set1_epi16((short)0x8000));
    __m256i m4 = _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)m416), bit), bit), _mm256_set1_epi16(0x10));
    return _mm256_or_si256(_mm256_or_si256(_mm256_or_si256(sign, _mm256_slli_epi16(top, 12)), _mm256_or_si256(_mm256_slli_epi16(joint, 5), nibbles)), m4);
}

__attribute__((target("avx2"))) static Py_ssize_t join_bf16_avx2(high_planes p, uint16_t *out, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i *)(out + i), join_high16_avx2(p, i));
    return i;
}

__attribute__((target("avx2"))) static Py_ssize_t join_fp32_avx2(high_planes p, const uint8_t *low, uint32_t *out, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i high = join_high16_avx2(p, i), low16 = _mm256_loadu_si256((const __m256i *)(low + 2 * i));
        /* unpack works within 128-bit lanes: words 0-3 | 8-11 and 4-7 | 12-15, put in order after */
        __m256i a = _mm256_unpacklo_epi16(low16, high), b = _mm256_unpackhi_epi16(low16, high);
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_permute2x128_si256(a, b, 0x20));
        _mm256_storeu_si256((__m256i *)(out + i + 8), _mm256_permute2x128_si256(a, b, 0x31));
    }
    return i;
}
#endif

static high_planes high(Py_buffer *v) {
    return (high_planes){v[0].buf, v[1].buf, v[2].buf, v[3].buf, v[4].buf};
}

/* join_bf16(joint, top, signs, m4, nibbles, out): bf16 words from their five planes. */
static PyObject *py_join_bf16(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer v[6];
    Py_ssize_t n;
    if (get(args, nargs, 5, v, 2, &n) < 0) return NULL;
    high_planes p = high(v);
    uint16_t *out = v[5].buf;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t i = 0;
#ifdef HAVE_AVX2_PATH
    if (__builtin_cpu_supports("avx2")) i = join_bf16_avx2(p, out, n);
#endif
    for (; i < n; i++) out[i] = join_high(p, i);
    Py_END_ALLOW_THREADS
    release(v, 6);
    Py_RETURN_NONE;
}

/* join_fp32(joint, top, signs, m4, nibbles, low16, out): fp32 words from the bf16 planes of their top
   halves and their raw low halves. */
static PyObject *py_join_fp32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer v[7];
    Py_ssize_t n;
    if (get(args, nargs, 6, v, 4, &n) < 0) return NULL;
    high_planes p = high(v);
    const uint8_t *low = v[5].buf;
    uint32_t *out = v[6].buf;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t i = 0;
#ifdef HAVE_AVX2_PATH
    if (__builtin_cpu_supports("avx2")) i = join_fp32_avx2(p, low, out, n);
#endif
    for (; i < n; i++) {
        uint16_t low16;
        memcpy(&low16, low + 2 * i, 2);
        out[i] = (uint32_t)join_high(p, i) << 16 | low16;
    }
    Py_END_ALLOW_THREADS
    release(v, 7);
    Py_RETURN_NONE;
}

static inline float float_from_bits(uint32_t w) { float f; memcpy(&f, &w, 4); return f; }
static inline uint32_t bits_from_float(float f) { uint32_t w; memcpy(&w, &f, 4); return w; }

/* fp16 bits to fp32 bits as torch converts them (same arithmetic, so NaNs come out the same: quiet,
   payload kept). No branches (both results are computed and one is masked
   away): gcc turns the loop into vector code. Normal and special values: shift
   exponent and mantissa into place and rescale by 2^-112, which also turns exponent 31 into 255.
   Subnormals: put the mantissa under a fixed exponent and subtract that exponent's implicit one. */
static inline uint32_t half_to_float(uint16_t h) {
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    uint32_t normal = bits_from_float(float_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f);
    uint32_t subnormal = bits_from_float(float_from_bits((two_w >> 17) | (126u << 23)) - 0.5f);
    uint32_t is_subnormal = -(uint32_t)(two_w < (1u << 27));  /* a mask, not a branch */
    return sign | (subnormal & is_subnormal) | (normal & ~is_subnormal);
}

#ifdef HAVE_AVX2_PATH
#define HAVE_F16C_PATH
/* The conversion instruction torch's own vector code uses (F16C, in every x86-64 CPU since 2012,
   checked at run time): five times the plain loop's speed. Returns how many words it wrote. */
__attribute__((target("avx,f16c"))) static Py_ssize_t join_fp16_f16c(const uint8_t *lo, const uint8_t *hi, uint32_t *out, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i half = _mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)(lo + i)), _mm_loadl_epi64((const __m128i *)(hi + i)));
        _mm256_storeu_ps((float *)(out + i), _mm256_cvtph_ps(half));
    }
    return i;
}
#endif

/* join_fp16(lo, hi, out): fp32 words from the byte planes of their fp16 values. */
static PyObject *py_join_fp16(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer v[3];
    Py_ssize_t n;
    if (get(args, nargs, 2, v, 4, &n) < 0) return NULL;
    const uint8_t *lo = v[0].buf, *hi = v[1].buf;
    uint32_t *out = v[2].buf;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t i = 0;
#ifdef HAVE_F16C_PATH
    if (__builtin_cpu_supports("f16c")) i = join_fp16_f16c(lo, hi, out, n);
#endif
    for (; i < n; i++) out[i] = half_to_float((uint16_t)(lo[i] | hi[i] << 8));
    Py_END_ALLOW_THREADS
    release(v, 3);
    Py_RETURN_NONE;
}

/* join_bytes(plane_0, ..., plane_k-1, out): k-byte words from their byte planes, least significant first. */
static PyObject *py_join_bytes(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer v[9];
    Py_ssize_t n, k = nargs - 1;
    if (k != 1 && k != 2 && k != 4 && k != 8) return PyErr_Format(PyExc_TypeError, "join_bytes takes 1, 2, 4 or 8 planes and out");
    if (get(args, nargs, k, v, k, &n) < 0) return NULL;
    uint8_t *out = v[k].buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j = 0; j < k; j++) {
        const uint8_t *plane = v[j].buf;
        for (Py_ssize_t i = 0; i < n; i++) out[i * k + j] = plane[i];
    }
    Py_END_ALLOW_THREADS
    release(v, k + 1);
    Py_RETURN_NONE;
}

/* zstd frames decoded without holding the GIL (the zstandard package holds it while it decodes, so
   its decoding never runs on two cores at once). No zstd headers or library are needed at build time:
   load_zstd gets the three functions from a zstd shared library that is already on the machine. */
static void *(*zstd_create_dctx)(void);
static size_t (*zstd_decompress_dctx)(void *dctx, void *dst, size_t capacity, const void *src, size_t size);
static unsigned (*zstd_is_error)(size_t code);
static _Thread_local void *dctx;  /* one context per thread, kept for the thread's life */

/* load_zstd(path) -> bool: use the zstd library at path; False if it is not one. */
static PyObject *py_load_zstd(PyObject *self, PyObject *path) {
    const char *name = PyUnicode_AsUTF8(path);
    if (!name) return NULL;
    void *lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    void *create = lib ? dlsym(lib, "ZSTD_createDCtx") : NULL, *decompress = lib ? dlsym(lib, "ZSTD_decompressDCtx") : NULL;
    void *is_error = lib ? dlsym(lib, "ZSTD_isError") : NULL;
    if (!create || !decompress || !is_error) Py_RETURN_FALSE;
    zstd_create_dctx = (void *(*)(void))create;
    zstd_decompress_dctx = (size_t (*)(void *, void *, size_t, const void *, size_t))decompress;
    zstd_is_error = (unsigned (*)(size_t))is_error;
    Py_RETURN_TRUE;
}

/* zstd_into(frame, out) -> int: decode one zstd frame into out, return its decoded size. */
static PyObject *py_zstd_into(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer v[2];
    if (nargs != 2) return PyErr_Format(PyExc_TypeError, "zstd_into takes 2 buffers");
    if (!zstd_decompress_dctx) return PyErr_Format(PyExc_RuntimeError, "call load_zstd first");
    if (PyObject_GetBuffer(args[0], &v[0], PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(args[1], &v[1], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&v[0]);
        return NULL;
    }
    size_t size = 0;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    if (!dctx) dctx = zstd_create_dctx();
    failed = !dctx;
    if (!failed) {
        size = zstd_decompress_dctx(dctx, v[1].buf, (size_t)v[1].len, v[0].buf, (size_t)v[0].len);
        failed = zstd_is_error(size);
    }
    Py_END_ALLOW_THREADS
    release(v, 2);
    if (failed) return PyErr_Format(PyExc_ValueError, "not a valid zstd frame, or it decodes to more than the output holds");
    return PyLong_FromSize_t(size);
}

static PyMethodDef methods[] = {
    {"load_zstd", py_load_zstd, METH_O, "load_zstd(path) -> bool"},
    {"zstd_into", (PyCFunction)(void (*)(void))py_zstd_into, METH_FASTCALL, "zstd_into(frame, out) -> decoded size"},
    {"join_bf16", (PyCFunction)(void (*)(void))py_join_bf16, METH_FASTCALL, "join_bf16(joint, top, signs, m4, nibbles, out)"},
    {"join_fp32", (PyCFunction)(void (*)(void))py_join_fp32, METH_FASTCALL, "join_fp32(joint, top, signs, m4, nibbles, low16, out)"},
    {"join_fp16", (PyCFunction)(void (*)(void))py_join_fp16, METH_FASTCALL, "join_fp16(lo, hi, out)"},
    {"join_bytes", (PyCFunction)(void (*)(void))py_join_bytes, METH_FASTCALL, "join_bytes(*planes, out)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_planes", "Byte planes back into words (roberta.compress).", -1, methods};

PyMODINIT_FUNC PyInit__planes(void) { return PyModule_Create(&module); }
