/* The decoding half of roberta.compress: a tensor's chunks back into its words, on all cores; and,
on the same threads, ZipNN's chunks back into their bytes (decode_znn, for roberta.znn).

decode_chunks takes a whole tensor blob and its chunk table and does everything compress.py's numpy
fallback does, without the GIL and without Python between chunks: worker threads take chunks in turn,
check each chunk's xxh3 hash, decode its zstd planes into their own buffers and build every output
word in registers from its plane bytes, writing it once. zstd and xxh3 are not needed at build time:
load_zstd and load_xxh3 get their functions from shared libraries already on the machine (the ones
inside the zstandard and xxhash packages). The bit layouts are documented in compress.py.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

/* Planes of n 16-bit words: see _split_high in compress.py. The outlier plane starts with the chunk's
   base exponent; then come, in order, the exponents of the words whose joint byte has its top bit set. */
typedef struct { const uint8_t *joint, *outliers, *signs, *m4, *nibbles; Py_ssize_t n_outliers; } high_planes;

/* Word i, its exponent taken as base + the joint byte's 5 exponent bits (outliers are fixed after). */
static inline uint16_t join_high(high_planes p, Py_ssize_t i) {
    return (uint16_t)((p.signs[i >> 3] >> (i & 7) & 1) << 15 | ((p.outliers[0] << 7) + ((p.joint[i] & 0x7F) << 5))
                      | (p.m4[i >> 3] >> (i & 7) & 1) << 4 | (p.nibbles[i >> 1] >> (i & 1) * 4 & 0xF));
}

/* Put the outliers' exponents into their words (16-bit words, or the high halves of 32-bit ones when
   wide). 0 if the joint plane flags exactly as many words as the plane holds, else -1. */
static int place_outliers(high_planes p, Py_ssize_t n, void *out, int wide) {
    const uint64_t flags = 0x8080808080808080ull;
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i += 32) {
        Py_ssize_t end = i + 32 < n ? i + 32 : n;
        if (end - i == 32) {  /* 32 bytes at a time: outliers are rare */
            uint64_t w[4];
            memcpy(w, p.joint + i, 32);
            if (!((w[0] | w[1] | w[2] | w[3]) & flags)) continue;
        }
        for (Py_ssize_t j = i; j < end; j++) {
            if (!(p.joint[j] & 0x80)) continue;
            if (k == p.n_outliers) return -1;
            uint32_t e = p.outliers[1 + k++];
            if (wide) ((uint32_t *)out)[j] = (((uint32_t *)out)[j] & 0x807FFFFFu) | e << 23;
            else ((uint16_t *)out)[j] = (uint16_t)((((uint16_t *)out)[j] & 0x807Fu) | e << 7);
        }
    }
    return k == p.n_outliers ? 0 : -1;
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
    __m256i exponent = _mm256_add_epi16(_mm256_set1_epi16((short)(p.outliers[0] << 7)), _mm256_slli_epi16(joint, 5));
    __m128i packed = _mm_loadl_epi64((const __m128i *)(p.nibbles + i / 2));
    __m256i nibbles = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(_mm_and_si128(packed, low4), _mm_and_si128(_mm_srli_epi16(packed, 4), low4)));
    uint16_t sign16, m416;
    memcpy(&sign16, p.signs + i / 8, 2);
    memcpy(&m416, p.m4 + i / 8, 2);
    __m256i sign = _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)sign16), bit), bit), _mm256_set1_epi16((short)0x8000));
    __m256i m4 = _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)m416), bit), bit), _mm256_set1_epi16(0x10));
    return _mm256_or_si256(_mm256_or_si256(sign, exponent), _mm256_or_si256(nibbles, m4));
}

/* The output is written once and not read back soon: where it is aligned, streaming stores skip
   reading every output line into the cache first (a third of the time of this pass). */
__attribute__((target("avx2"))) static Py_ssize_t join_bf16_avx2(high_planes p, uint16_t *out, Py_ssize_t n) {
    Py_ssize_t i = 0;
    if ((uintptr_t)out % 32 == 0) {
        for (; i + 16 <= n; i += 16) _mm256_stream_si256((__m256i *)(out + i), join_high16_avx2(p, i));
        _mm_sfence();
    }
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i *)(out + i), join_high16_avx2(p, i));
    return i;
}

__attribute__((target("avx2"))) static inline void store_fp32_16(uint32_t *out, __m256i high, __m256i low16, int aligned) {
    /* unpack works within 128-bit lanes: words 0-3 | 8-11 and 4-7 | 12-15, put in order after */
    __m256i a = _mm256_unpacklo_epi16(low16, high), b = _mm256_unpackhi_epi16(low16, high);
    __m256i first = _mm256_permute2x128_si256(a, b, 0x20), second = _mm256_permute2x128_si256(a, b, 0x31);
    if (aligned) {
        _mm256_stream_si256((__m256i *)out, first);
        _mm256_stream_si256((__m256i *)(out + 8), second);
    } else {
        _mm256_storeu_si256((__m256i *)out, first);
        _mm256_storeu_si256((__m256i *)(out + 8), second);
    }
}

__attribute__((target("avx2"))) static Py_ssize_t join_fp32_avx2(high_planes p, const uint8_t *low, uint32_t *out, Py_ssize_t n) {
    Py_ssize_t i = 0;
    int aligned = (uintptr_t)out % 32 == 0;
    for (; i + 16 <= n; i += 16)
        store_fp32_16(out + i, join_high16_avx2(p, i), _mm256_loadu_si256((const __m256i *)(low + 2 * i)), aligned);
    if (aligned) _mm_sfence();
    return i;
}
#endif

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

/* --- one chunk's planes into its words ------------------------------------------------------- */

static int join_bf16(high_planes p, uint16_t *out, Py_ssize_t n) {
    Py_ssize_t i = 0;
#ifdef HAVE_AVX2_PATH
    if (__builtin_cpu_supports("avx2")) i = join_bf16_avx2(p, out, n);
#endif
    for (; i < n; i++) out[i] = join_high(p, i);
    return place_outliers(p, n, out, 0);
}

/* fp32 words from the bf16 planes of their top halves and their raw low halves. */
static int join_fp32(high_planes p, const uint8_t *low, uint32_t *out, Py_ssize_t n) {
    Py_ssize_t i = 0;
#ifdef HAVE_AVX2_PATH
    if (__builtin_cpu_supports("avx2")) i = join_fp32_avx2(p, low, out, n);
#endif
    for (; i < n; i++) {
        uint16_t low16;
        memcpy(&low16, low + 2 * i, 2);
        out[i] = (uint32_t)join_high(p, i) << 16 | low16;
    }
    return place_outliers(p, n, out, 1);
}

/* fp32 words from the byte planes of their fp16 values. */
static void join_fp16(const uint8_t *lo, const uint8_t *hi, uint32_t *out, Py_ssize_t n) {
    Py_ssize_t i = 0;
#ifdef HAVE_F16C_PATH
    if (__builtin_cpu_supports("f16c")) i = join_fp16_f16c(lo, hi, out, n);
#endif
    for (; i < n; i++) out[i] = half_to_float((uint16_t)(lo[i] | hi[i] << 8));
}

/* k-byte words from their k byte planes, least significant first. */
static void join_bytes(const uint8_t *const *planes, int k, uint8_t *out, Py_ssize_t n) {
    for (int j = 0; j < k; j++)
        for (Py_ssize_t i = 0; i < n; i++) out[i * k + j] = planes[j][i];
}

/* --- the libraries, found at run time --------------------------------------------------------- */

static void *(*zstd_create_dctx)(void);
static size_t (*zstd_decompress_dctx)(void *dctx, void *dst, size_t capacity, const void *src, size_t size);
static unsigned (*zstd_is_error)(size_t code);
static uint64_t (*xxh3_64)(const void *data, size_t length);

/* load_zstd(path) -> bool: use the zstd library at path; False if it is not one. */
static PyObject *py_load_zstd(PyObject *self, PyObject *path) {
    const char *name = PyUnicode_AsUTF8(path);
    if (!name) return NULL;
    void *lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!lib) Py_RETURN_FALSE;
    void *create = dlsym(lib, "ZSTD_createDCtx");
    void *decompress = dlsym(lib, "ZSTD_decompressDCtx"), *is_error = dlsym(lib, "ZSTD_isError");
    if (!create || !decompress || !is_error) Py_RETURN_FALSE;
    zstd_create_dctx = (void *(*)(void))create;
    zstd_decompress_dctx = (size_t (*)(void *, void *, size_t, const void *, size_t))decompress;
    zstd_is_error = (unsigned (*)(size_t))is_error;
    Py_RETURN_TRUE;
}

/* load_xxh3(path) -> bool: use XXH3_64bits from the library at path (the variant that picks its
   vector code at run time where the library has it); False if it has neither. */
static PyObject *py_load_xxh3(PyObject *self, PyObject *path) {
    const char *name = PyUnicode_AsUTF8(path);
    if (!name) return NULL;
    void *lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    void *fn = lib ? dlsym(lib, "XXH3_64bits_dispatch") : NULL;
    if (!fn && lib) fn = dlsym(lib, "XXH3_64bits");
    if (!fn) Py_RETURN_FALSE;
    xxh3_64 = (uint64_t (*)(const void *, size_t))fn;
    Py_RETURN_TRUE;
}

/* xxh3(buffer) -> int: the loaded XXH3_64bits of the bytes, for checking that it is the right one. */
static PyObject *py_xxh3(PyObject *self, PyObject *arg) {
    Py_buffer v;
    if (!xxh3_64) return PyErr_Format(PyExc_RuntimeError, "call load_xxh3 first");
    if (PyObject_GetBuffer(arg, &v, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    uint64_t h = xxh3_64(v.buf, (size_t)v.len);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(h);
}

/* --- a whole tensor ---------------------------------------------------------------------------- */

/* One row of the chunk table per chunk, as compress.py's _chunk_table builds it (int64 each):
   transform, first element, elements, xxh3 of the stored bytes, offset of the stored bytes in the
   blob, number of planes, then (codec, stored length, decoded size) for each plane. */
enum { BYTES, FP16, BF16, FP32 };
enum { RAW, ZSTD };
#define MAX_PLANES 8
#define ROW (6 + 3 * MAX_PLANES)

/* What a worker needs besides the job: a zstd context, a Huffman table and its workspace (for ZipNN),
   and a buffer per plane. Kept in a pool between calls, so that decoding allocates nothing and
   touches no fresh pages once it has run. */
#define HUF_TABLE_WORDS (1 + (1 << 12))  /* zstd's HUF_DTABLE_SIZE(HUF_TABLELOG_MAX) */
#define HUF_WORKSPACE_BYTES 8192          /* zstd needs HUF_DECOMPRESS_WORKSPACE_SIZE, 2560 */
typedef struct state {
    struct state *next;
    void *dctx;
    uint32_t huf_table[HUF_TABLE_WORDS];
    uint64_t huf_workspace[HUF_WORKSPACE_BYTES / 8];
    uint8_t *buffers[MAX_PLANES];
    Py_ssize_t capacity;
} state_t;

/* One call's work: `decode` turns chunk c of the table into its part of out (0, or -1 when the
   chunk's data is wrong), using a worker's state. */
typedef struct job {
    const uint8_t *blob;
    const int64_t *table;
    uint8_t *out;
    Py_ssize_t chunks, itemsize, buffer_size;
    int (*decode)(struct job *job, Py_ssize_t c, state_t *s);
    atomic_long next, failed;  /* the next chunk to take; the lowest chunk that failed (chunks: none) */
} job_t;

/* Decode chunk c; 0 on success, -1 if its hash, a zstd frame or a decoded size is wrong. */
static int decode_chunk(job_t *job, Py_ssize_t c, state_t *s) {
    void *dctx = s->dctx;
    uint8_t **buffers = s->buffers;
    const int64_t *row = job->table + c * ROW;
    int transform = (int)row[0], nplanes = (int)row[5];
    Py_ssize_t start = row[1], n = row[2];
    const uint8_t *stored = job->blob + row[4], *at = stored, *planes[MAX_PLANES] = {0};
    for (int j = 0; j < nplanes; j++) at += row[7 + 3 * j];
    if (xxh3_64(stored, (size_t)(at - stored)) != (uint64_t)row[3]) return -1;
    at = stored;
    for (int j = 0; j < nplanes; j++) {
        int64_t codec = row[6 + 3 * j], length = row[7 + 3 * j], size = row[8 + 3 * j];
        if (codec == ZSTD) {
            size_t got = zstd_decompress_dctx(dctx, buffers[j], (size_t)size, at, (size_t)length);
            if (zstd_is_error(got) || got != (size_t)size) return -1;
            planes[j] = buffers[j];
        } else {
            planes[j] = at;
        }
        at += length;
    }
    uint8_t *out = job->out + start * job->itemsize;
    high_planes p = {planes[0], planes[1], planes[2], planes[3], planes[4], row[8 + 3 * 1] - 1};  /* plane 1: outliers */
    switch (transform) {
    case BF16: return join_bf16(p, (uint16_t *)out, n);
    case FP32: return join_fp32(p, planes[5], (uint32_t *)out, n);
    case FP16: join_fp16(planes[0], planes[1], (uint32_t *)out, n); return 0;
    default: join_bytes(planes, nplanes, out, n); return 0;
    }
}

static state_t *pool;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;

static state_t *take_state(Py_ssize_t size) {
    pthread_mutex_lock(&pool_lock);
    state_t *s = pool;
    if (s) pool = s->next;
    pthread_mutex_unlock(&pool_lock);
    if (!s && (s = calloc(1, sizeof *s)) && !(s->dctx = zstd_create_dctx())) {
        free(s);
        return NULL;
    }
    if (s && s->capacity < size) {
        for (int j = 0; j < MAX_PLANES; j++) {
            free(s->buffers[j]);
            s->buffers[j] = NULL;
        }
        s->capacity = 0;
        int ok = 1;
        for (int j = 0; ok && j < MAX_PLANES; j++) ok = (s->buffers[j] = malloc((size_t)size)) != NULL;
        if (ok) s->capacity = size;  /* on failure the buffers are freed by the next take */
    }
    return s;
}

static void give_state(state_t *s) {
    pthread_mutex_lock(&pool_lock);
    s->next = pool;
    pool = s;
    pthread_mutex_unlock(&pool_lock);
}

static void *worker(void *arg) {
    job_t *job = arg;
    state_t *s = take_state(job->buffer_size);
    if (!s || s->capacity < job->buffer_size) {  /* the other workers, or the caller, do the chunks */
        if (s) give_state(s);
        return NULL;
    }
    for (;;) {
        Py_ssize_t c = atomic_fetch_add(&job->next, 1);
        if (c >= job->chunks || c > atomic_load(&job->failed)) break;  /* done, or past a failure */
        if (job->decode(job, c, s) < 0) {
            long lowest = atomic_load(&job->failed);
            while (c < lowest && !atomic_compare_exchange_weak(&job->failed, &lowest, c)) {}
        }
    }
    give_state(s);
    return NULL;
}

/* Threads kept between calls: starting threads for every tensor would cost more than decoding a small
   one. A call wakes `helpers` of them to work beside the calling thread on the same job; one call
   uses the pool at a time (others wait for it, outside the GIL). After a fork the child starts with
   no pool threads and builds its own. */
#define MAX_HELPERS 63
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER, pool_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER, finished = PTHREAD_COND_INITIALIZER;
static job_t *current;
static long generation, pool_threads, wanted, joined, busy;

static void *pool_thread(void *arg) {
    long seen = (long)(intptr_t)arg;  /* the generation before the one this thread was started for */
    pthread_mutex_lock(&pool_mutex);
    for (;;) {
        while (generation == seen) pthread_cond_wait(&wake, &pool_mutex);
        seen = generation;
        if (joined == wanted) continue;  /* enough helpers on this job already */
        joined++;
        job_t *job = current;
        pthread_mutex_unlock(&pool_mutex);
        worker(job);
        pthread_mutex_lock(&pool_mutex);
        if (--busy == 0) pthread_cond_signal(&finished);
    }
    return NULL;
}

static void run(job_t *job, long helpers) {
    if (helpers > MAX_HELPERS) helpers = MAX_HELPERS;
    if (helpers <= 0) {
        worker(job);
        return;
    }
    pthread_mutex_lock(&call_lock);
    pthread_mutex_lock(&pool_mutex);
    while (pool_threads < helpers) {  /* if a thread cannot start, the others do its share */
        pthread_t id;
        if (pthread_create(&id, NULL, pool_thread, (void *)(intptr_t)generation) != 0) break;
        pthread_detach(id);
        pool_threads++;
    }
    if (helpers > pool_threads) helpers = pool_threads;
    current = job, wanted = busy = helpers, joined = 0;
    generation++;
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&pool_mutex);
    worker(job);
    pthread_mutex_lock(&pool_mutex);
    while (busy > 0) pthread_cond_wait(&finished, &pool_mutex);
    pthread_mutex_unlock(&pool_mutex);
    pthread_mutex_unlock(&call_lock);
}

static void after_fork_in_child(void) {
    pthread_mutex_t unlocked = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t fresh = PTHREAD_COND_INITIALIZER;
    call_lock = pool_mutex = pool_lock = unlocked;
    wake = finished = fresh;
    pool_threads = busy = 0;
}

/* Check that the table describes chunks inside the blob and the output, with the plane sizes each
   transform reads (compress.py checked all of this already; a wrong table must not become a crash). */
static const char *check_table(const int64_t *table, Py_ssize_t chunks, Py_ssize_t blob_len, Py_ssize_t out_len,
                               Py_ssize_t itemsize, Py_ssize_t *buffer_size) {
    *buffer_size = 1;
    for (Py_ssize_t c = 0; c < chunks; c++) {
        const int64_t *row = table + c * ROW;
        int64_t transform = row[0], start = row[1], n = row[2], offset = row[4], nplanes = row[5], at = offset;
        int64_t half = (n + 1) / 2, bits = (n + 7) / 8;
        int64_t high[] = {n, -1, bits, bits, half, 2 * n}, expect_planes, words = itemsize;  /* -1: 1 to n + 1 */
        if (transform == BF16) expect_planes = 5, words = 2;
        else if (transform == FP32) expect_planes = 6, words = 4;
        else if (transform == FP16) expect_planes = 2, words = 4;
        else if (transform == BYTES) expect_planes = itemsize;
        else return "unknown transform";
        if (words != itemsize || nplanes != expect_planes || n <= 0 || start < 0 || start > out_len / itemsize - n)
            return "chunk outside the output";
        for (int j = 0; j < nplanes; j++) {
            int64_t codec = row[6 + 3 * j], length = row[7 + 3 * j], size = row[8 + 3 * j];
            int64_t expect = transform == BF16 || transform == FP32 ? high[j] : n;
            if (expect == -1 ? size < 1 || size > n + 1 : size != expect) return "plane sizes do not match";
            if (length < 0 || (codec != ZSTD && (codec != RAW || length != size)))
                return "plane sizes do not match";
            if (codec == ZSTD && size > *buffer_size) *buffer_size = size;
            at += length;
        }
        if (offset < 0 || at > blob_len) return "chunk outside the blob";
    }
    return NULL;
}

/* --- ZipNN's format (roberta/znn.py documents it) --------------------------------------------- */

/* zstd's Huffman decoder for one 4-stream block with its table description (what ZipNN's HUF_compress
   writes; the format zstd's literals use), taken from a zstd library that exports it. */
static size_t (*huf_decompress4x)(uint32_t *table, void *dst, size_t size, const void *src, size_t length,
                                  void *workspace, size_t workspace_size, int flags);
static unsigned (*huf_is_error)(size_t code);
static int huf_flags;

/* load_huf(path) -> bool: use HUF_decompress4X_hufOnly_wksp from the zstd library at path, which only
   libraries built with their internal symbols visible export (the zstandard wheel's cffi module
   does). Its signature is zstd's internal one, fixed from zstd 1.5.5 (flags) to 1.5.x: other
   versions are refused. */
static PyObject *py_load_huf(PyObject *self, PyObject *path) {
    const char *name = PyUnicode_AsUTF8(path);
    if (!name) return NULL;
    void *lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!lib) Py_RETURN_FALSE;
    void *version = dlsym(lib, "ZSTD_versionNumber"), *decode = dlsym(lib, "HUF_decompress4X_hufOnly_wksp");
    void *is_error = dlsym(lib, "HUF_isError");
    if (!version || !decode || !is_error) Py_RETURN_FALSE;
    unsigned number = ((unsigned (*)(void))version)();
    if (number < 10505 || number >= 10600) Py_RETURN_FALSE;
    huf_decompress4x = (size_t (*)(uint32_t *, void *, size_t, const void *, size_t, void *, size_t, int))decode;
    huf_is_error = (unsigned (*)(size_t))is_error;
#ifdef HAVE_AVX2_PATH
    huf_flags = __builtin_cpu_supports("bmi2") ? 1 : 0;  /* HUF_flags_bmi2: its fast loop */
#endif
    Py_RETURN_TRUE;
}

/* One row per ZipNN chunk (int64 each): output offset, output bytes, groups k (1, 2 or 4) | bit order
   << 8, then for each group: codec (0 stored, 1 Huffman), offset of its bytes in the blob, their
   length, the group's decoded length. */
#define ZNN_ROW (3 + 4 * 4)

static inline uint16_t znn_revert16(uint16_t w) { return (uint16_t)((w & 0x80) << 8 | (w >> 1 & 0x7F80) | (w & 0x7F)); }
static inline uint32_t znn_revert32(uint32_t w) { return (w << 8 & 0x80000000u) | (w >> 1 & 0x7F800000u) | (w & 0x7FFFFFu); }

#if defined(__SSE2__)
#include <emmintrin.h>
/* 16 words at a time (SSE2: every x86-64 CPU): four groups' bytes into 32-bit words, or two groups'
   into 16-bit words, with the sign bits moved back when `bits`. Returns how many words were written. */
static int64_t znn_join4_sse2(const uint8_t *const *g, int bits, uint8_t *out, int64_t q) {
    const __m128i sign = _mm_set1_epi32((int)0x80000000u), exponent = _mm_set1_epi32(0x7F800000), mantissa = _mm_set1_epi32(0x7FFFFF);
    int64_t i = 0;
    for (; i + 16 <= q; i += 16) {
        __m128i a = _mm_loadu_si128((const __m128i *)(g[0] + i)), b = _mm_loadu_si128((const __m128i *)(g[1] + i));
        __m128i c = _mm_loadu_si128((const __m128i *)(g[2] + i)), d = _mm_loadu_si128((const __m128i *)(g[3] + i));
        __m128i ab_lo = _mm_unpacklo_epi8(a, b), ab_hi = _mm_unpackhi_epi8(a, b);
        __m128i cd_lo = _mm_unpacklo_epi8(c, d), cd_hi = _mm_unpackhi_epi8(c, d);
        __m128i w[4] = {_mm_unpacklo_epi16(ab_lo, cd_lo), _mm_unpackhi_epi16(ab_lo, cd_lo),
                        _mm_unpacklo_epi16(ab_hi, cd_hi), _mm_unpackhi_epi16(ab_hi, cd_hi)};
        for (int j = 0; j < 4; j++) {
            if (bits)
                w[j] = _mm_or_si128(_mm_or_si128(_mm_and_si128(_mm_slli_epi32(w[j], 8), sign),
                                                 _mm_and_si128(_mm_srli_epi32(w[j], 1), exponent)),
                                    _mm_and_si128(w[j], mantissa));
            _mm_storeu_si128((__m128i *)(out + 4 * i + 16 * j), w[j]);
        }
    }
    return i;
}

static int64_t znn_join2_sse2(const uint8_t *const *g, int bits, uint8_t *out, int64_t q) {
    const __m128i sign = _mm_set1_epi16(0x80), exponent = _mm_set1_epi16(0x7F80), mantissa = _mm_set1_epi16(0x7F);
    int64_t i = 0;
    for (; i + 16 <= q; i += 16) {
        __m128i a = _mm_loadu_si128((const __m128i *)(g[0] + i)), b = _mm_loadu_si128((const __m128i *)(g[1] + i));
        __m128i w[2] = {_mm_unpacklo_epi8(a, b), _mm_unpackhi_epi8(a, b)};
        for (int j = 0; j < 2; j++) {
            if (bits)
                w[j] = _mm_or_si128(_mm_or_si128(_mm_slli_epi16(_mm_and_si128(w[j], sign), 8),
                                                 _mm_and_si128(_mm_srli_epi16(w[j], 1), exponent)),
                                    _mm_and_si128(w[j], mantissa));
            _mm_storeu_si128((__m128i *)(out + 2 * i + 16 * j), w[j]);
        }
    }
    return i;
}
#endif

/* A chunk's groups back into its bytes: byte i*k+b is group b's byte i; the n % k bytes left over
   are the last bytes of the first groups. With the bit order set, ZipNN moved each float's sign
   below its exponent in every whole 4-byte word of the chunk: moved back here. */
static void znn_join(const uint8_t *const *g, int k, int bits, uint8_t *out, int64_t n) {
    int64_t q = n / k, i = 0;
    if (k == 4) {
#if defined(__SSE2__)
        i = znn_join4_sse2(g, bits, out, q);
#endif
        for (; i < q; i++) {
            uint32_t w = (uint32_t)g[0][i] | (uint32_t)g[1][i] << 8 | (uint32_t)g[2][i] << 16 | (uint32_t)g[3][i] << 24;
            if (bits) w = znn_revert32(w);
            memcpy(out + 4 * i, &w, 4);
        }
    } else if (k == 2) {
        int64_t moved = bits ? n / 4 * 2 : 0;  /* 16-bit words inside whole 4-byte words */
#if defined(__SSE2__)
        i = znn_join2_sse2(g, bits, out, bits ? moved : q);
#endif
        for (; i < q; i++) {
            uint16_t w = (uint16_t)(g[0][i] | g[1][i] << 8);
            if (i < moved) w = znn_revert16(w);
            memcpy(out + 2 * i, &w, 2);
        }
    } else {
        memcpy(out, g[0], (size_t)n);
        return;
    }
    for (int b = 0; b < n % k; b++) out[q * k + b] = g[b][q];
}

static int decode_znn_chunk(job_t *job, Py_ssize_t c, state_t *s) {
    const int64_t *row = job->table + c * ZNN_ROW;
    int k = (int)(row[2] & 0xFF), bits = (int)(row[2] >> 8 & 1);
    const uint8_t *groups[4];
    for (int b = 0; b < k; b++) {
        const int64_t *g = row + 3 + 4 * b;
        const uint8_t *src = job->blob + g[1];
        int64_t length = g[2], size = g[3];
        if (g[0] == 0 || length == size) {  /* stored, or Huffman's own "stored" */
            groups[b] = src;
        } else if (length == 1) {  /* Huffman's one-symbol block: that byte, size times */
            memset(s->buffers[b], src[0], (size_t)size);
            groups[b] = s->buffers[b];
        } else {
            s->huf_table[0] = 12u * 0x01000001u;  /* an empty table of zstd's largest size */
            size_t got = huf_decompress4x(s->huf_table, s->buffers[b], (size_t)size, src, (size_t)length,
                                          s->huf_workspace, sizeof s->huf_workspace, huf_flags);
            if (huf_is_error(got) || got != (size_t)size) return -1;
            groups[b] = s->buffers[b];
        }
    }
    znn_join(groups, k, bits, job->out + row[0], row[1]);
    return 0;
}

/* The same checks as check_table, for ZipNN rows: groups that split the chunk as ZipNN splits it,
   inside the blob and the output. */
static const char *check_znn_table(const int64_t *table, Py_ssize_t chunks, Py_ssize_t blob_len, Py_ssize_t out_len,
                                   Py_ssize_t itemsize, Py_ssize_t *buffer_size) {
    *buffer_size = 1;
    for (Py_ssize_t c = 0; c < chunks; c++) {
        const int64_t *row = table + c * ZNN_ROW;
        int64_t start = row[0], n = row[1], k = row[2] & 0xFF;
        if ((k != 1 && k != 2 && k != 4) || (row[2] >> 8) > 1) return "unknown grouping";
        if (n <= 0 || start < 0 || start > out_len - n) return "chunk outside the output";
        for (int b = 0; b < k; b++) {
            const int64_t *g = row + 3 + 4 * b;
            int64_t codec = g[0], offset = g[1], length = g[2], size = g[3];
            if (size != n / k + (b < n % k)) return "group sizes do not match";
            if (codec == 0 ? length != size : codec != 1 || length < 1 || length > size) return "group sizes do not match";
            if (offset < 0 || offset > blob_len - length) return "chunk outside the blob";
            if (codec == 1 && size > *buffer_size) *buffer_size = size;
        }
    }
    (void)itemsize;
    return NULL;
}

/* --- the calls --------------------------------------------------------------------------------- */

typedef const char *(*check_fn)(const int64_t *, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t *);

/* (blob, table, out, threads): decode every row of the table from blob into out on `threads`
   threads; -1 when all succeed, else the lowest row whose data was wrong (out is then partly
   written). */
static PyObject *run_table(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t row, check_fn check,
                           int (*decode)(job_t *, Py_ssize_t, state_t *)) {
    Py_buffer v[3];
    if (nargs != 4) return PyErr_Format(PyExc_TypeError, "expected (blob, table, out, threads)");
    long threads = PyLong_AsLong(args[3]);
    if (threads == -1 && PyErr_Occurred()) return NULL;
    int flags[3] = {PyBUF_C_CONTIGUOUS, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT};
    for (int i = 0; i < 3; i++) {
        if (PyObject_GetBuffer(args[i], &v[i], flags[i]) < 0) {
            while (i--) PyBuffer_Release(&v[i]);
            return NULL;
        }
    }
    const char *error = NULL;
    Py_ssize_t chunks = v[1].len / (Py_ssize_t)(row * sizeof(int64_t)), buffer_size = 0;
    if (v[1].itemsize != 8 || v[1].len % (row * sizeof(int64_t))) error = "the table must be whole int64 rows";
    else error = check(v[1].buf, chunks, v[0].len, v[2].len, v[2].itemsize, &buffer_size);
    if (error) {
        for (int i = 0; i < 3; i++) PyBuffer_Release(&v[i]);
        return PyErr_Format(PyExc_ValueError, "%s", error);
    }
    job_t job = {v[0].buf, v[1].buf, v[2].buf, chunks, v[2].itemsize, buffer_size, decode};
    atomic_init(&job.next, 0);
    atomic_init(&job.failed, chunks);
    Py_BEGIN_ALLOW_THREADS
    run(&job, (threads < chunks ? threads : (long)chunks) - 1);
    Py_END_ALLOW_THREADS
    for (int i = 0; i < 3; i++) PyBuffer_Release(&v[i]);
    long failed = atomic_load(&job.failed);
    if (atomic_load(&job.next) < chunks && failed == chunks) return PyErr_NoMemory();  /* no worker could start */
    return PyLong_FromLong(failed < chunks ? failed : -1);
}

/* decode_chunks(blob, table, out, threads) -> int: a model.rbz tensor (out: its bytes, typed) */
static PyObject *py_decode_chunks(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!zstd_decompress_dctx || !xxh3_64) return PyErr_Format(PyExc_RuntimeError, "call load_zstd and load_xxh3 first");
    return run_table(args, nargs, ROW, check_table, decode_chunk);
}

/* decode_znn(blob, table, out, threads) -> int: ZipNN chunks (out: bytes) */
static PyObject *py_decode_znn(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!zstd_create_dctx || !huf_decompress4x) return PyErr_Format(PyExc_RuntimeError, "call load_zstd and load_huf first");
    return run_table(args, nargs, ZNN_ROW, check_znn_table, decode_znn_chunk);
}

static PyMethodDef methods[] = {
    {"load_zstd", py_load_zstd, METH_O, "load_zstd(path) -> bool"},
    {"load_xxh3", py_load_xxh3, METH_O, "load_xxh3(path) -> bool"},
    {"xxh3", py_xxh3, METH_O, "xxh3(buffer) -> int"},
    {"decode_chunks", (PyCFunction)(void (*)(void))py_decode_chunks, METH_FASTCALL,
     "decode_chunks(blob, table, out, threads) -> -1, or the lowest chunk that failed its checks"},
    {"load_huf", py_load_huf, METH_O, "load_huf(path) -> bool"},
    {"decode_znn", (PyCFunction)(void (*)(void))py_decode_znn, METH_FASTCALL,
     "decode_znn(blob, table, out, threads) -> -1, or the lowest ZipNN chunk whose data was wrong"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_planes", "Compressed tensor chunks back into words (roberta.compress).", -1, methods};

PyMODINIT_FUNC PyInit__planes(void) {
    pthread_atfork(NULL, NULL, after_fork_in_child);
    return PyModule_Create(&module);
}
