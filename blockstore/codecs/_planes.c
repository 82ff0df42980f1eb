/* The inverse of byte-plane splitting, compiled: one pass that reads every plane and writes every item.
 *
 * `blockstore.planes.join` does the same with numpy, one whole-array operation at a time: nine passes
 * over the output for a 4-byte item, and one GIL round trip per operation. Here each item is assembled
 * in registers and written once, with the GIL released, so decode threads join planes side by side.
 * Layout (see planes.py): plane i holds byte i of every little-endian item; with split_sign the top
 * plane holds the 8 exponent bits and the sign sits in the top bit of the plane below it.
 *
 * Also here, for the same reason (every delta chunk a load decodes goes through it): unpacking the
 * nibbles a delta's difference is coded with, added to its base in the same pass (`nibbles`, below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define MAX_PLANES 8

/* An AVX2 build of each loop beside the baseline one, picked at load time by the CPU (GCC and clang
 * function multiversioning): the baseline x86-64 build vectorizes with SSE2 only, about half as fast. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

/* One 2-byte item from its two plane bytes (the sign back into the top bit with split_sign). */
static inline uint16_t joined2(uint8_t low, uint8_t high, int split_sign) {
    return split_sign ? (uint16_t)((low & 0x7F) | (high << 7) | ((low & 0x80) << 8)) : (uint16_t)(low | (high << 8));
}

MULTIVERSION static void join2(const uint8_t *const *p, uint8_t *out, Py_ssize_t n, int split_sign) {
    const uint8_t *b0 = p[0], *b1 = p[1];
    uint16_t word;
    if (split_sign) {
        for (Py_ssize_t i = 0; i < n; i++) {
            word = joined2(b0[i], b1[i], 1);
            memcpy(out + 2 * i, &word, 2);
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            word = joined2(b0[i], b1[i], 0);
            memcpy(out + 2 * i, &word, 2);
        }
    }
}

MULTIVERSION static void join4(const uint8_t *const *p, uint8_t *out, Py_ssize_t n, int split_sign) {
    const uint8_t *b0 = p[0], *b1 = p[1], *b2 = p[2], *b3 = p[3];
    uint32_t word;
    if (split_sign) {
        for (Py_ssize_t i = 0; i < n; i++) {
            word = (uint32_t)b0[i] | ((uint32_t)b1[i] << 8) | ((uint32_t)(b2[i] & 0x7F) << 16)
                   | ((uint32_t)b3[i] << 23) | ((uint32_t)(b2[i] & 0x80) << 24);
            memcpy(out + 4 * i, &word, 4);
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            word = (uint32_t)b0[i] | ((uint32_t)b1[i] << 8) | ((uint32_t)b2[i] << 16) | ((uint32_t)b3[i] << 24);
            memcpy(out + 4 * i, &word, 4);
        }
    }
}

MULTIVERSION static void join8(const uint8_t *const *p, uint8_t *out, Py_ssize_t n, int split_sign) {
    const uint8_t *b0 = p[0], *b1 = p[1], *b2 = p[2], *b3 = p[3], *b4 = p[4], *b5 = p[5], *b6 = p[6], *b7 = p[7];
    uint64_t low, word;
    for (Py_ssize_t i = 0; i < n; i++) {
        low = (uint64_t)b0[i] | ((uint64_t)b1[i] << 8) | ((uint64_t)b2[i] << 16) | ((uint64_t)b3[i] << 24)
              | ((uint64_t)b4[i] << 32) | ((uint64_t)b5[i] << 40);
        if (split_sign) {
            word = low | ((uint64_t)(b6[i] & 0x7F) << 48) | ((uint64_t)b7[i] << 55) | ((uint64_t)(b6[i] & 0x80) << 56);
        } else {
            word = low | ((uint64_t)b6[i] << 48) | ((uint64_t)b7[i] << 56);
        }
        memcpy(out + 8 * i, &word, 8);
    }
}

/* A delta's difference as sparse nibbles (blockstore/codecs/nibbles.py): bit i % 8 of bitmap byte i / 8 is
 * set where element i is not 0; the nonzero elements' values, in order, are packed two to a byte (the first
 * in the low nibble) as min(value - 1, 15), and a nibble of 15 marks an exception, whose value is 16 plus
 * the next of the exceptions (`width` little-endian bytes each). Written as the values, or, with a base, as
 * base + unzigzag(value) modulo 2**(8*width): how a delta chunk turns back into its bytes
 * (blockstore/codecs/delta.py) in the pass that unpacks it. The base may be the output itself.
 *
 * A block of elements at a time, so that every step finds the block in the L1 cache: its nonzero values are
 * unpacked (`gather`), its exceptions found and written over them (`find_escaped`), the values spread to
 * their elements by the bitmap (`expand`) and added to the base (`combine`, which joins a base given as
 * planes in the same loop). A fine-tune's difference is three quarters zeros, so the first two steps see a
 * quarter of the elements; a zero costs one bit. */

#define UNZIGZAG(T, v) ((T)(((v) >> 1) ^ (T)(0 - ((v) & 1))))
#define SPARSE_BLOCK 4096 /* elements; a multiple of 64, so a block's bitmap is whole 8-byte words */
#define SLACK 64          /* values past a block's own that a vector load may read (zeroed, never used) */
#define ESCAPED 16        /* the value of an element whose nibble is 15, before its exception is added */

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86_VECTORS 1
#else
#define HAVE_X86_VECTORS 0
#endif

/* 2: AVX-512 (F, BW) finds the exceptions among 2-byte values, and as 1; 1: AVX2 expands 2-byte values
 * onto their base; 0: portable loops. The best the CPU has, at import; `vectors()` lowers it for tests. */
static int vector_level = 0;

static int best_vector_level(void) {
#if HAVE_X86_VECTORS
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("popcnt")) {
        return 0;
    }
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? 2 : 1;
#else
    return 0;
#endif
}

/* How many bits are set in the bitmap of `size` elements (whole bytes: the padding bits are checked 0). */
static Py_ssize_t ones(const uint8_t *bits, Py_ssize_t size) {
    Py_ssize_t bytes = (size + 7) / 8, total = 0, k = 0;
    for (; k + 8 <= bytes; k += 8) {
        uint64_t word;
        memcpy(&word, bits + k, 8);
        total += __builtin_popcountll(word);
    }
    for (; k < bytes; k++) {
        total += __builtin_popcount(bits[k]);
    }
    return total;
}

#if HAVE_X86_VECTORS
/* For each bitmap byte, the pshufb that spreads the next (up to) 8 two-byte values to the lanes whose bit
 * is set and zeroes the others. */
static uint8_t expand_table[256][16] __attribute__((aligned(16)));

static void build_expand_table(void) {
    for (int mask = 0; mask < 256; mask++) {
        int rank = 0;
        for (int lane = 0; lane < 8; lane++) {
            int set = (mask >> lane) & 1;
            expand_table[mask][2 * lane] = set ? (uint8_t)(2 * rank) : 0x80;
            expand_table[mask][2 * lane + 1] = set ? (uint8_t)(2 * rank + 1) : 0x80;
            rank += set;
        }
    }
}

__attribute__((target("avx512f,avx512bw"))) static Py_ssize_t find_escaped2_avx512(const uint16_t *vals, Py_ssize_t m,
                                                                                  uint32_t *marked) {
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i escaped = _mm512_set1_epi16(ESCAPED);
    Py_ssize_t found = 0;
    for (Py_ssize_t j = 0; j < m; j += 32) {
        __mmask32 hits = _mm512_cmpeq_epi16_mask(_mm512_loadu_si512((const void *)(vals + j)), escaped);
        if (m - j < 32) {
            hits &= (__mmask32)((1u << (m - j)) - 1);
        }
        __m512i at = _mm512_add_epi32(lanes, _mm512_set1_epi32((int)j));
        _mm512_storeu_si512((void *)(marked + found), _mm512_maskz_compress_epi32((__mmask16)hits, at));
        found += __builtin_popcount(hits & 0xFFFF);
        at = _mm512_add_epi32(at, _mm512_set1_epi32(16));
        _mm512_storeu_si512((void *)(marked + found), _mm512_maskz_compress_epi32((__mmask16)(hits >> 16), at));
        found += __builtin_popcount(hits >> 16);
    }
    return found;
}

/* Sixteen 2-byte elements per step, expanded and added to their base in registers: the values of the set
 * bits spread to their lanes by a pshufb from `expand_table` (8 elements per bitmap byte), the base joined
 * from its two planes (or read, where `base` is given), unzigzag, add, one store. Returns the elements done:
 * whole steps of 16, the rest is the caller's. */
#define EXPAND_ONTO2(BASE_WORDS)                                                                               \
    for (; i + 16 <= n; i += 16) {                                                                            \
        unsigned lo = bits[i / 8], hi = bits[i / 8 + 1];                                                      \
        Py_ssize_t half = at + __builtin_popcount(lo);                                                        \
        __m256i v = _mm256_loadu2_m128i((const __m128i *)(const void *)(vals + half),                         \
                                        (const __m128i *)(const void *)(vals + at));                          \
        __m256i control = _mm256_loadu2_m128i((const __m128i *)(const void *)expand_table[hi],                \
                                              (const __m128i *)(const void *)expand_table[lo]);               \
        __m256i d = _mm256_shuffle_epi8(v, control);                                                          \
        at = half + __builtin_popcount(hi);                                                                   \
        __m256i z = _mm256_xor_si256(_mm256_srli_epi16(d, 1), _mm256_sub_epi16(zero, _mm256_and_si256(d, one))); \
        __m256i w = BASE_WORDS;                                                                               \
        _mm256_storeu_si256((__m256i *)(void *)(out + 2 * i), _mm256_add_epi16(w, z));                        \
    }
#define PLANE_LOW _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(b0 + i)))
#define PLANE_HIGH _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(b1 + i)))

__attribute__((target("avx2,popcnt"))) static Py_ssize_t expand_onto2_avx2(const uint8_t *bits, const uint16_t *vals,
                                                                          Py_ssize_t n, const uint8_t *b0,
                                                                          const uint8_t *b1, int split_sign,
                                                                          const uint8_t *base, uint8_t *out) {
    const __m256i zero = _mm256_setzero_si256(), one = _mm256_set1_epi16(1), low7 = _mm256_set1_epi16(0x7F);
    Py_ssize_t i = 0, at = 0;
    if (base != NULL) {
        EXPAND_ONTO2(_mm256_loadu_si256((const __m256i *)(const void *)(base + 2 * i)))
    } else if (split_sign) { /* (low & 0x7F) | (high << 7) | ((low & 0x80) << 8), as joined2 */
        EXPAND_ONTO2(_mm256_or_si256(_mm256_or_si256(_mm256_and_si256(PLANE_LOW, low7), _mm256_slli_epi16(PLANE_HIGH, 7)),
                                     _mm256_slli_epi16(_mm256_andnot_si256(low7, PLANE_LOW), 8)))
    } else {
        EXPAND_ONTO2(_mm256_or_si256(PLANE_LOW, _mm256_slli_epi16(PLANE_HIGH, 8)))
    }
    return i;
}
#endif

static Py_ssize_t find_escaped2_vector(const uint16_t *vals, Py_ssize_t m, uint32_t *marked) {
#if HAVE_X86_VECTORS
    return find_escaped2_avx512(vals, m, marked);
#else
    (void)vals, (void)m, (void)marked;
    return 0; /* never called: vector_level is 0 */
#endif
}

/* The elements of a block of 2-byte elements expanded and added to their base with vectors (a prefix of n
 * in whole steps; the caller does the rest): the base as planes b0, b1, or as `base`'s words. */
static Py_ssize_t expand_onto2_vector(const uint8_t *bits, const uint16_t *vals, Py_ssize_t n, const uint8_t *b0,
                                      const uint8_t *b1, int split_sign, const uint8_t *base, uint8_t *out) {
#if HAVE_X86_VECTORS
    if (vector_level >= 1) {
        return expand_onto2_avx2(bits, vals, n, b0, b1, split_sign, base, out);
    }
#else
    (void)bits, (void)vals, (void)n, (void)b0, (void)b1, (void)split_sign, (void)base, (void)out;
#endif
    return 0;
}

/* Two-byte elements from their planes (as join2) plus unzigzag of their values, in one loop: the common delta
 * (bf16 and f16 weights), where joining first and adding after cost a pass over the block. */
#define JOINED_ONTO2(SPLIT)                                                                                   \
    for (Py_ssize_t i = 0; i < n; i++) {                                                                      \
        uint16_t word = (uint16_t)(joined2(b0[i], b1[i], SPLIT) + UNZIGZAG(uint16_t, values[i]));             \
        memcpy(out + 2 * i, &word, 2);                                                                        \
    }

static inline void joined_onto2(const uint8_t *b0, const uint8_t *b1, const uint16_t *values, uint8_t *out,
                                Py_ssize_t n, int split_sign) {
    if (split_sign) {
        JOINED_ONTO2(1)
    } else {
        JOINED_ONTO2(0)
    }
}

/* Join elements [start, start + size) of the byte planes into `out` (the same layout as `join`). */
static void join_block(const uint8_t *const *planes, int width, Py_ssize_t start, uint8_t *out, Py_ssize_t size,
                       int split_sign) {
    const uint8_t *at[MAX_PLANES];
    for (int j = 0; j < width; j++) {
        at[j] = planes[j] + start;
    }
    switch (width) {
        case 1: memmove(out, at[0], (size_t)size); break;
        case 2: join2(at, out, size, split_sign); break;
        case 4: join4(at, out, size, split_sign); break;
        default: join8(at, out, size, split_sign); break;
    }
}

/* The steps of one block, for `width`-byte elements of type T. `kind`: 0 values, 1 base + unzigzag(value)
 * from a separate base, 2 the same in place (base == out, or the base's planes joined into out). */
#define SPARSE_LOOPS(W, T)                                                                                    \
    static inline T get##W(const uint8_t *p) {                                                                \
        T value;                                                                                              \
        memcpy(&value, p, W);                                                                                 \
        return value;                                                                                         \
    }                                                                                                         \
    static inline void set##W(uint8_t *p, T value) { memcpy(p, &value, W); }                                  \
    /* Values [from, from + m) of the packed nibbles, each nibble + 1. */                                     \
    static inline void gather##W(const uint8_t *packed, Py_ssize_t from, Py_ssize_t m, T *vals) {             \
        Py_ssize_t j = 0;                                                                                     \
        if ((from & 1) && m > 0) {                                                                            \
            vals[j++] = (T)((packed[from / 2] >> 4) + 1);                                                     \
            from++;                                                                                           \
        }                                                                                                     \
        const uint8_t *p = packed + from / 2;                                                                 \
        T *v = vals + j;                                                                                      \
        Py_ssize_t pairs = (m - j) / 2;                                                                       \
        for (Py_ssize_t k = 0; k < pairs; k++) {                                                              \
            v[2 * k] = (T)((p[k] & 15) + 1);                                                                  \
            v[2 * k + 1] = (T)((p[k] >> 4) + 1);                                                              \
        }                                                                                                     \
        if (j + 2 * pairs < m) {                                                                              \
            v[2 * pairs] = (T)((p[pairs] & 15) + 1);                                                          \
        }                                                                                                     \
    }                                                                                                         \
    /* Where among the m values an exception goes (branch-free: exceptions fall at random). */                \
    static inline Py_ssize_t find_escaped##W(const T *vals, Py_ssize_t m, uint32_t *marked) {                 \
        if (W == 2 && vector_level >= 2) {                                                                    \
            return find_escaped2_vector((const uint16_t *)(const void *)vals, m, marked);                     \
        }                                                                                                     \
        Py_ssize_t found = 0;                                                                                 \
        for (Py_ssize_t j = 0; j < m; j++) {                                                                  \
            marked[found] = (uint32_t)j;                                                                      \
            found += vals[j] == ESCAPED;                                                                      \
        }                                                                                                     \
        return found;                                                                                         \
    }                                                                                                         \
    /* Each of the n elements: the next value where its bit is set, else 0. */                                \
    static inline void expand##W(const uint8_t *bits, const T *vals, Py_ssize_t n, T *values) {               \
        Py_ssize_t at = 0;                                                                                    \
        for (Py_ssize_t i = 0; i < n; i++) {                                                                                  \
            T bit = (T)((bits[i / 8] >> (i & 7)) & 1);                                                        \
            values[i] = (T)(vals[at] & (T)(0 - bit));                                                         \
            at += (Py_ssize_t)bit;                                                                            \
        }                                                                                                     \
    }                                                                                                         \
    static inline void combine##W(const T *values, Py_ssize_t n, int kind, const uint8_t *base, uint8_t *out, \
                                  const uint8_t *const *planes, Py_ssize_t start, int split_sign) {           \
        if (planes != NULL && W == 2) {                                                                       \
            joined_onto2(planes[0] + start, planes[1] + start, (const uint16_t *)(const void *)values, out, n, \
                         split_sign);                                                                         \
            return;                                                                                           \
        }                                                                                                     \
        if (planes != NULL) {                                                                                 \
            join_block(planes, W, start, out, n, split_sign);                                                 \
            base = out;                                                                                       \
        }                                                                                                     \
        if (kind == 0) {                                                                                      \
            memcpy(out, values, (size_t)n * W);                                                               \
        } else if (base == out) {                                                                             \
            for (Py_ssize_t i = 0; i < n; i++) {                                                              \
                set##W(out + i * W, (T)(get##W(out + i * W) + UNZIGZAG(T, values[i])));                       \
            }                                                                                                 \
        } else {                                                                                              \
            for (Py_ssize_t i = 0; i < n; i++) {                                                              \
                set##W(out + i * W, (T)(get##W(base + i * W) + UNZIGZAG(T, values[i])));                      \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
    /* Every block; 0, -1 when the bitmap does not mark exactly the `nonzero` values packed, -2 when the      \
     * nibbles that are 15 are not exactly the `count` exceptions given. */                                  \
    MULTIVERSION static int sparse##W(const uint8_t *bitmap, const uint8_t *packed, Py_ssize_t nonzero,       \
                                      const uint8_t *exceptions, Py_ssize_t count, const uint8_t *base,       \
                                      int kind, uint8_t *out, Py_ssize_t n, const uint8_t *const *planes,     \
                                      int split_sign) {                                                       \
        T vals[SPARSE_BLOCK + SLACK], values[SPARSE_BLOCK];                                                   \
        uint32_t marked[SPARSE_BLOCK + SLACK]; /* a block's exceptions (+ a vector store's slack) */          \
        Py_ssize_t taken = 0, used = 0;                                                                       \
        for (Py_ssize_t start = 0; start < n; start += SPARSE_BLOCK) {                                        \
            Py_ssize_t size = n - start < SPARSE_BLOCK ? n - start : SPARSE_BLOCK;                            \
            const uint8_t *bits = bitmap + start / 8;                                                         \
            Py_ssize_t m = ones(bits, size);                                                                  \
            if (m > nonzero - taken) {                                                                        \
                return -1;                                                                                    \
            }                                                                                                 \
            gather##W(packed, taken, m, vals);                                                                \
            memset(vals + m, 0, SLACK * W);                                                                   \
            Py_ssize_t found = find_escaped##W(vals, m, marked);                                              \
            if (found > count - used) {                                                                       \
                return -2;                                                                                    \
            }                                                                                                 \
            for (Py_ssize_t j = 0; j < found; j++) {                                                          \
                vals[marked[j]] = (T)(ESCAPED + get##W(exceptions + (used + j) * W));                         \
            }                                                                                                 \
            used += found;                                                                                    \
            taken += m;                                                                                       \
            Py_ssize_t done = 0;                                                                              \
            if (W == 2 && kind != 0) {                                                                        \
                done = expand_onto2_vector(bits, (const uint16_t *)(const void *)vals, size,                  \
                                           planes ? planes[0] + start : NULL, planes ? planes[1] + start : NULL, \
                                           split_sign, planes ? NULL : base + start * W, out + start * W);    \
            }                                                                                                 \
            if (done < size) { /* whole bytes of the bitmap: `done` is a multiple of 16 */                  \
                expand##W(bits + done / 8, vals + ones(bits, done), size - done, values);                     \
                combine##W(values, size - done, kind, base ? base + (start + done) * W : NULL,                \
                           out + (start + done) * W, planes, start + done, split_sign);                       \
            }                                                                                                 \
        }                                                                                                     \
        if (taken != nonzero) {                                                                               \
            return -1;                                                                                        \
        }                                                                                                     \
        return used == count ? 0 : -2;                                                                        \
    }

SPARSE_LOOPS(1, uint8_t)
SPARSE_LOOPS(2, uint16_t)
SPARSE_LOOPS(4, uint32_t)
SPARSE_LOOPS(8, uint64_t)

static void release(Py_buffer *views, int count);

/* nibbles(bitmap, packed, nonzero, exceptions, out, width, base): `base` is None (write the values), a buffer
 * (write base + unzigzag(value); it may be `out` itself), or (planes, split_sign): the base as its byte planes,
 * joined into each block of `out` just before the difference is added to it, so it is never written whole. */
static PyObject *nibbles(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer bitmap, packed, exceptions, out, base = {0}, plane_views[MAX_PLANES];
    const uint8_t *plane_bytes[MAX_PLANES];
    int width, split_sign = 0, held = 0, have_base = 0;
    Py_ssize_t nonzero;
    PyObject *base_object, *plane_list = NULL;
    if (!PyArg_ParseTuple(args, "y*y*ny*w*iO", &bitmap, &packed, &nonzero, &exceptions, &out, &width, &base_object)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (width != 1 && width != 2 && width != 4 && width != 8) {
        PyErr_Format(PyExc_ValueError, "width %d: elements of 1, 2, 4 or 8 bytes only", width);
        goto done;
    }
    if (out.len % width) {
        PyErr_Format(PyExc_ValueError, "%zd output bytes is not a whole number of %d-byte elements", out.len, width);
        goto done;
    }
    Py_ssize_t n = out.len / width;
    if (PyTuple_Check(base_object)) {
        PyObject *given_planes; /* borrowed */
        if (!PyArg_ParseTuple(base_object, "Op", &given_planes, &split_sign)) {
            goto done;
        }
        plane_list = PySequence_Fast(given_planes, "planes must be a sequence of buffers");
        if (plane_list == NULL) {
            goto done;
        }
        if (PySequence_Fast_GET_SIZE(plane_list) != width) {
            PyErr_Format(PyExc_ValueError, "%zd base planes for %d-byte elements", PySequence_Fast_GET_SIZE(plane_list), width);
            goto done;
        }
        if (split_sign && width < 2) {
            PyErr_SetString(PyExc_ValueError, "split_sign needs items of 2 bytes or more");
            goto done;
        }
        for (; held < width; held++) {
            if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(plane_list, held), &plane_views[held], PyBUF_SIMPLE) < 0) {
                goto done;
            }
            if (plane_views[held].len != n) {
                PyErr_Format(PyExc_ValueError, "base plane %d holds %zd bytes, expected %zd", held, plane_views[held].len, n);
                held++;
                goto done;
            }
            plane_bytes[held] = (const uint8_t *)plane_views[held].buf;
        }
    } else if (base_object != Py_None) {
        if (PyObject_GetBuffer(base_object, &base, PyBUF_SIMPLE) < 0) {
            goto done;
        }
        have_base = 1;
        if (base.len != out.len) {
            PyErr_Format(PyExc_ValueError, "a base of %zd bytes for %zd output bytes", base.len, out.len);
            goto done;
        }
    }
    const uint8_t *bits = (const uint8_t *)bitmap.buf, *p = (const uint8_t *)packed.buf;
    if (bitmap.len != (n + 7) / 8) {
        PyErr_Format(PyExc_ValueError, "%zd bitmap bytes for %zd elements (expected %zd)", bitmap.len, n, (n + 7) / 8);
        goto done;
    }
    if ((n & 7) && (bits[bitmap.len - 1] >> (n & 7)) != 0) {
        PyErr_SetString(PyExc_ValueError, "the bitmap marks elements past the last one");
        goto done;
    }
    if (nonzero < 0 || nonzero > n || packed.len != (nonzero + 1) / 2) {
        PyErr_Format(PyExc_ValueError, "%zd packed bytes for %zd nonzero values", packed.len, nonzero);
        goto done;
    }
    if ((nonzero & 1) && (p[packed.len - 1] >> 4) != 0) {
        PyErr_SetString(PyExc_ValueError, "the padding nibble after the last value is not 0");
        goto done;
    }
    if (exceptions.len % width) {
        PyErr_Format(PyExc_ValueError, "%zd exception bytes is not a whole number of %d-byte elements", exceptions.len, width);
        goto done;
    }
    const uint8_t *e = (const uint8_t *)exceptions.buf;
    uint8_t *target = (uint8_t *)out.buf;
    const uint8_t *b = have_base ? (const uint8_t *)base.buf : (held ? target : NULL);
    const uint8_t *const *planes = held ? plane_bytes : NULL;
    Py_ssize_t count = exceptions.len / width;
    int kind = b == NULL ? 0 : (b == target ? 2 : 1), unpacked;
    if (kind == 1 && b < target + out.len && target < b + out.len) {
        PyErr_SetString(PyExc_ValueError, "the base overlaps the output without being it");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    switch (width) {
        case 1: unpacked = sparse1(bits, p, nonzero, e, count, b, kind, target, n, planes, split_sign); break;
        case 2: unpacked = sparse2(bits, p, nonzero, e, count, b, kind, target, n, planes, split_sign); break;
        case 4: unpacked = sparse4(bits, p, nonzero, e, count, b, kind, target, n, planes, split_sign); break;
        default: unpacked = sparse8(bits, p, nonzero, e, count, b, kind, target, n, planes, split_sign); break;
    }
    Py_END_ALLOW_THREADS
    if (unpacked == -1) {
        PyErr_Format(PyExc_ValueError, "the bitmap does not mark exactly the %zd nonzero values packed", nonzero);
        goto done;
    }
    if (unpacked < 0) {
        PyErr_Format(PyExc_ValueError, "the packed values do not mark exactly the %zd exceptions given", count);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    release(plane_views, held);
    Py_XDECREF(plane_list);
    if (have_base) {
        PyBuffer_Release(&base);
    }
    PyBuffer_Release(&bitmap);
    PyBuffer_Release(&packed);
    PyBuffer_Release(&exceptions);
    PyBuffer_Release(&out);
    return result;
}

static void release(Py_buffer *views, int count) {
    for (int j = 0; j < count; j++) {
        PyBuffer_Release(&views[j]);
    }
}

static PyObject *join(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *planes;
    Py_buffer out;
    int split_sign;
    if (!PyArg_ParseTuple(args, "Ow*p", &planes, &out, &split_sign)) {
        return NULL;
    }
    PyObject *sequence = PySequence_Fast(planes, "planes must be a sequence of buffers");
    if (sequence == NULL) {
        PyBuffer_Release(&out);
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    Py_buffer views[MAX_PLANES];
    const uint8_t *bytes[MAX_PLANES];
    int held = 0;
    PyObject *result = NULL;
    if (count != 1 && count != 2 && count != 4 && count != 8) {
        PyErr_Format(PyExc_ValueError, "%zd planes: items of 1, 2, 4 or 8 bytes only", count);
        goto done;
    }
    if (split_sign && count < 2) {
        PyErr_SetString(PyExc_ValueError, "split_sign needs items of 2 bytes or more");
        goto done;
    }
    if (out.len % count) {
        PyErr_Format(PyExc_ValueError, "%zd output bytes is not a whole number of %zd-byte items", out.len, count);
        goto done;
    }
    Py_ssize_t n = out.len / count;
    for (; held < count; held++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(sequence, held), &views[held], PyBUF_SIMPLE) < 0) {
            goto done;
        }
        if (views[held].len != n) {
            PyErr_Format(PyExc_ValueError, "plane %d holds %zd bytes, expected %zd", held, views[held].len, n);
            held++;
            goto done;
        }
        bytes[held] = (const uint8_t *)views[held].buf;
    }
    uint8_t *target = (uint8_t *)out.buf;
    Py_BEGIN_ALLOW_THREADS
    switch (count) {
        case 1: memmove(target, bytes[0], (size_t)n); break;
        case 2: join2(bytes, target, n, split_sign); break;
        case 4: join4(bytes, target, n, split_sign); break;
        default: join8(bytes, target, n, split_sign); break;
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(views, held);
    Py_DECREF(sequence);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *set_vectors(PyObject *Py_UNUSED(self), PyObject *args) {
    int wanted;
    if (!PyArg_ParseTuple(args, "i", &wanted)) {
        return NULL;
    }
    int was = vector_level, best = best_vector_level();
    vector_level = wanted < 0 ? 0 : (wanted > best ? best : wanted);
    return PyLong_FromLong(was);
}

static PyObject *get_best_vectors(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args)) {
    return PyLong_FromLong(best_vector_level());
}

static PyMethodDef methods[] = {
    {"join", join, METH_VARARGS,
     "join(planes, out, split_sign): write the items whose byte planes are `planes` into `out`."},
    {"vectors", set_vectors, METH_VARARGS,
     "vectors(level): unpack nibbles with AVX-512 (2), SSSE3 (1) or portable loops (0), at most what the CPU\n"
     "has (the best is the default); returns the previous level. For tests and measurements: all give the same bytes."},
    {"best_vectors", get_best_vectors, METH_NOARGS, "best_vectors(): the highest level `vectors` takes on this CPU."},
    {"nibbles", nibbles, METH_VARARGS,
     "nibbles(bitmap, packed, nonzero, exceptions, out, width, base): unpack a sparse nibble-coded difference into\n"
     "`out` (with a base: base + unzigzag(value) per element); see blockstore.codecs.nibbles."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "blockstore._planes",
    "Byte-plane join and nibble unpacking in one pass each (see blockstore.codecs.planes and .nibbles); "
    "little-endian hosts only.", -1, methods,
};

PyMODINIT_FUNC PyInit__planes(void) {
    const uint16_t probe = 1;
    if (*(const uint8_t *)&probe != 1) {  /* items are assembled as native words */
        PyErr_SetString(PyExc_ImportError, "blockstore._planes assumes a little-endian host");
        return NULL;
    }
#if HAVE_X86_VECTORS
    build_expand_table();
#endif
    vector_level = best_vector_level();
    return PyModule_Create(&module);
}
