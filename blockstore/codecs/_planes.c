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

/* Small unsigned integers packed two to a byte (blockstore/codecs/nibbles.py): element 2k in the low nibble
 * of byte k, element 2k+1 in its high nibble; 15 marks an element whose value (minus 15) is the next of the
 * exceptions, `width` little-endian bytes each. Written as `value`, or, with a base, as base + unzigzag(value)
 * modulo 2**(8*width): how a delta chunk turns back into its bytes (blockstore/codecs/delta.py) in the same
 * pass that unpacks it. The base may be the output itself (a base decoded where its delta goes).
 *
 * A block at a time, so that both steps find it in the L1 cache: first every nibble is taken as a value
 * (branch-free, vectorized; with the base given as planes, joined in the same loop), then the nibbles that
 * are 15 are found (`find_marks`) and their exceptions written over them. */

#define UNZIGZAG(T, v) ((T)(((v) >> 1) ^ (T)(0 - ((v) & 1))))
#define NIBBLE_BLOCK 4096 /* elements; a multiple of 16, so a block's nibbles are whole 8-byte words */

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

/* The elements of `words` 8-byte words of nibbles (16 elements each) whose nibble is 15, in order, into
 * `marked`; returns how many. Where AVX-512 is there, 16 elements at a time with a compress and no branch
 * (the exceptions fall at random, so a branch per word that holds one is mispredicted about as often as it is
 * taken: that was most of the time a delta's exceptions cost); elsewhere a word at a time. */
static Py_ssize_t find_marks_portable(const uint8_t *packed, Py_ssize_t words, uint32_t *marked) {
    const uint64_t low_bits = 0x1111111111111111ULL;
    Py_ssize_t found = 0;
    for (Py_ssize_t w = 0; w < words; w++) {
        uint64_t word;
        memcpy(&word, packed + 8 * w, 8);
        uint64_t marks = word & (word >> 1) & (word >> 2) & (word >> 3) & low_bits;
        while (marks) {
            marked[found++] = (uint32_t)(16 * w + __builtin_ctzll(marks) / 4);
            marks &= marks - 1;
        }
    }
    return found;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_VECTOR_MARKS 1
__attribute__((target("avx512f,bmi2"))) static Py_ssize_t find_marks_avx512(const uint8_t *packed, Py_ssize_t words,
                                                                            uint32_t *marked) {
    const uint64_t low_bits = 0x1111111111111111ULL;
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    Py_ssize_t found = 0;
    for (Py_ssize_t w = 0; w < words; w++) {
        uint64_t word;
        memcpy(&word, packed + 8 * w, 8);
        __mmask16 marks = (__mmask16)_pext_u64(word & (word >> 1) & (word >> 2) & (word >> 3) & low_bits, low_bits);
        __m512i at = _mm512_add_epi32(lanes, _mm512_set1_epi32((int)(16 * w)));
        _mm512_storeu_si512((void *)(marked + found), _mm512_maskz_compress_epi32(marks, at));
        found += __builtin_popcount(marks);
    }
    return found;
}
#else
#define HAVE_VECTOR_MARKS 0
#endif

static int vector_marks = 0; /* set at import where the CPU has AVX-512F and BMI2 (`vector_marks()` to change) */

static int cpu_has_vector_marks(void) {
#if HAVE_VECTOR_MARKS
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("bmi2");
#else
    return 0;
#endif
}

static Py_ssize_t find_marks(const uint8_t *packed, Py_ssize_t words, uint32_t *marked) {
#if HAVE_VECTOR_MARKS
    if (vector_marks) {
        return find_marks_avx512(packed, words, marked);
    }
#endif
    return find_marks_portable(packed, words, marked);
}

/* Two-byte elements from their planes (as join2) plus unzigzag of their nibbles, in one loop: the
 * common delta (bf16 and f16 weights), where joining first and adding after cost a pass over the block.
 * A pair of elements per packed byte, so that the loop vectorizes. */
#define JOINED_ONTO2(SPLIT)                                                                                   \
    for (Py_ssize_t k = 0; k < n / 2; k++) {                                                                  \
        uint16_t low = (uint16_t)(packed[k] & 15), high = (uint16_t)(packed[k] >> 4);                         \
        uint16_t first = (uint16_t)(joined2(b0[2 * k], b1[2 * k], SPLIT) + UNZIGZAG(uint16_t, low));          \
        uint16_t second = (uint16_t)(joined2(b0[2 * k + 1], b1[2 * k + 1], SPLIT) + UNZIGZAG(uint16_t, high)); \
        memcpy(out + 4 * k, &first, 2);                                                                       \
        memcpy(out + 4 * k + 2, &second, 2);                                                                  \
    }                                                                                                         \
    if (n & 1) {                                                                                              \
        uint16_t low = (uint16_t)(packed[n / 2] & 15);                                                        \
        uint16_t last = (uint16_t)(joined2(b0[n - 1], b1[n - 1], SPLIT) + UNZIGZAG(uint16_t, low));           \
        memcpy(out + 2 * (n - 1), &last, 2);                                                                  \
    }

static inline void joined_onto2(const uint8_t *b0, const uint8_t *b1, const uint8_t *packed, uint8_t *out,
                                Py_ssize_t n, int split_sign) {
    if (split_sign) {
        JOINED_ONTO2(1)
    } else {
        JOINED_ONTO2(0)
    }
}

/* One block of `n` elements (n even, or the last block) starting at element 0 of the pointers given. `kind`:
 * 0 values, 1 base + unzigzag(value) from a separate base, 2 the same in place (base == out: the loop then
 * reads and writes one pointer, which the vectorizer takes without an overlap check). */
#define NIBBLE_LOOPS(W, T)                                                                                    \
    static inline T get##W(const uint8_t *p) {                                                                \
        T value;                                                                                              \
        memcpy(&value, p, W);                                                                                 \
        return value;                                                                                         \
    }                                                                                                         \
    static inline void set##W(uint8_t *p, T value) { memcpy(p, &value, W); }                                  \
    static inline void values##W(const uint8_t *packed, uint8_t *out, Py_ssize_t n) {                         \
        for (Py_ssize_t k = 0; k < n / 2; k++) {                                                              \
            set##W(out + (2 * k) * W, (T)(packed[k] & 15));                                                   \
            set##W(out + (2 * k + 1) * W, (T)(packed[k] >> 4));                                               \
        }                                                                                                     \
        if (n & 1) {                                                                                          \
            set##W(out + (n - 1) * W, (T)(packed[n / 2] & 15));                                               \
        }                                                                                                     \
    }                                                                                                         \
    static inline void onto##W(const uint8_t *packed, const uint8_t *base, uint8_t *out, Py_ssize_t n) {     \
        for (Py_ssize_t k = 0; k < n / 2; k++) {                                                              \
            T low = (T)(packed[k] & 15), high = (T)(packed[k] >> 4);                                          \
            set##W(out + (2 * k) * W, (T)(get##W(base + (2 * k) * W) + UNZIGZAG(T, low)));                    \
            set##W(out + (2 * k + 1) * W, (T)(get##W(base + (2 * k + 1) * W) + UNZIGZAG(T, high)));           \
        }                                                                                                     \
        if (n & 1) {                                                                                          \
            T low = (T)(packed[n / 2] & 15);                                                                  \
            set##W(out + (n - 1) * W, (T)(get##W(base + (n - 1) * W) + UNZIGZAG(T, low)));                    \
        }                                                                                                     \
    }                                                                                                         \
    static inline void inplace##W(const uint8_t *packed, uint8_t *out, Py_ssize_t n) {                        \
        for (Py_ssize_t k = 0; k < n / 2; k++) {                                                              \
            T low = (T)(packed[k] & 15), high = (T)(packed[k] >> 4);                                          \
            set##W(out + (2 * k) * W, (T)(get##W(out + (2 * k) * W) + UNZIGZAG(T, low)));                     \
            set##W(out + (2 * k + 1) * W, (T)(get##W(out + (2 * k + 1) * W) + UNZIGZAG(T, high)));            \
        }                                                                                                     \
        if (n & 1) {                                                                                          \
            T low = (T)(packed[n / 2] & 15);                                                                  \
            set##W(out + (n - 1) * W, (T)(get##W(out + (n - 1) * W) + UNZIGZAG(T, low)));                     \
        }                                                                                                     \
    }                                                                                                         \
    /* Element i is an exception: its value is 15 + the stored one (base: base + unzigzag of it). With the \
     * base in place, out[i] still holds base + unzigzag(15) from the first step, so the base is recovered \
     * from it. */                                                                                            \
    static inline void put##W(uint8_t *out, const uint8_t *base, int kind, Py_ssize_t i, const uint8_t *stored) { \
        T value = (T)(get##W(stored) + 15);                                                                   \
        if (kind == 1) {                                                                                      \
            value = (T)(get##W(base + i * W) + UNZIGZAG(T, value));                                           \
        } else if (kind == 2) {                                                                               \
            T below = (T)(get##W(out + i * W) - UNZIGZAG(T, (T)15));                                          \
            value = (T)(below + UNZIGZAG(T, value));                                                          \
        }                                                                                                     \
        set##W(out + i * W, value);                                                                           \
    }                                                                                                         \
    /* The block's exceptions, from `*used` on; -1 when they run out. */                                      \
    static inline int patch##W(const uint8_t *packed, Py_ssize_t n, const uint8_t *exceptions, Py_ssize_t count, \
                               Py_ssize_t *used, const uint8_t *base, int kind, uint8_t *out, uint32_t *marked) { \
        Py_ssize_t words = (n + 1) / 2 / 8, found = find_marks(packed, words, marked);                       \
        if (found > count - *used) {                                                                          \
            return -1;                                                                                        \
        }                                                                                                     \
        for (Py_ssize_t j = 0; j < found; j++) {                                                              \
            put##W(out, base, kind, marked[j], exceptions + (*used + j) * W);                                 \
        }                                                                                                     \
        *used += found;                                                                                       \
        for (Py_ssize_t i = 16 * words; i < n; i++) {                                                         \
            if (((packed[i / 2] >> (4 * (i & 1))) & 15) == 15) {                                              \
                if (*used == count) {                                                                         \
                    return -1;                                                                                \
                }                                                                                             \
                put##W(out, base, kind, i, exceptions + *used * W);                                           \
                ++*used;                                                                                      \
            }                                                                                                 \
        }                                                                                                     \
        return 0;                                                                                             \
    }                                                                                                         \
    /* Every block; 0, or -1 when the nibbles that are 15 are not exactly the `count` exceptions given. */    \
    MULTIVERSION static int unpack##W(const uint8_t *packed, const uint8_t *exceptions, Py_ssize_t count,     \
                                      const uint8_t *base, int kind, uint8_t *out, Py_ssize_t n,              \
                                      const uint8_t *const *planes, int split_sign) {                         \
        Py_ssize_t used = 0;                                                                                  \
        uint32_t marked[NIBBLE_BLOCK + 16]; /* a block's exception positions (+ a vector store's slack) */   \
        for (Py_ssize_t start = 0; start < n; start += NIBBLE_BLOCK) {                                        \
            Py_ssize_t size = n - start < NIBBLE_BLOCK ? n - start : NIBBLE_BLOCK;                            \
            const uint8_t *p = packed + start / 2;                                                            \
            uint8_t *o = out + start * W;                                                                     \
            if (planes != NULL && W == 2) { /* bf16/f16 bases: joined and added to in one loop */            \
                joined_onto2(planes[0] + start, planes[1] + start, p, o, size, split_sign);                   \
            } else if (planes != NULL) { /* the base is these planes: joined into the block, then added to */ \
                join_block(planes, W, start, o, size, split_sign);                                            \
                inplace##W(p, o, size);                                                                       \
            } else if (kind == 0) {                                                                           \
                values##W(p, o, size);                                                                        \
            } else if (kind == 1) {                                                                           \
                onto##W(p, base + start * W, o, size);                                                        \
            } else {                                                                                          \
                inplace##W(p, o, size);                                                                       \
            }                                                                                                 \
            if (patch##W(p, size, exceptions, count, &used, base ? base + start * W : NULL, kind, o, marked) < 0) { \
                return -1;                                                                                    \
            }                                                                                                 \
        }                                                                                                     \
        return used == count ? 0 : -1;                                                                        \
    }

NIBBLE_LOOPS(1, uint8_t)
NIBBLE_LOOPS(2, uint16_t)
NIBBLE_LOOPS(4, uint32_t)
NIBBLE_LOOPS(8, uint64_t)

static void release(Py_buffer *views, int count);

/* nibbles(packed, exceptions, out, width, base): `base` is None (write the values), a buffer (write base +
 * unzigzag(value); it may be `out` itself), or (planes, split_sign): the base as its byte planes, joined into
 * each block of `out` just before the difference is added to it, so the base is never written out whole. */
static PyObject *nibbles(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer packed, exceptions, out, base = {0}, plane_views[MAX_PLANES];
    const uint8_t *plane_bytes[MAX_PLANES];
    int width, split_sign = 0, held = 0, have_base = 0;
    PyObject *base_object, *plane_list = NULL;
    if (!PyArg_ParseTuple(args, "y*y*w*iO", &packed, &exceptions, &out, &width, &base_object)) {
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
    if (packed.len != (n + 1) / 2) {
        PyErr_Format(PyExc_ValueError, "%zd packed bytes for %zd elements (expected %zd)", packed.len, n, (n + 1) / 2);
        goto done;
    }
    if ((n & 1) && (((const uint8_t *)packed.buf)[packed.len - 1] >> 4) != 0) {
        PyErr_SetString(PyExc_ValueError, "the padding nibble after the last element is not 0");
        goto done;
    }
    if (exceptions.len % width) {
        PyErr_Format(PyExc_ValueError, "%zd exception bytes is not a whole number of %d-byte elements", exceptions.len, width);
        goto done;
    }
    const uint8_t *p = (const uint8_t *)packed.buf, *e = (const uint8_t *)exceptions.buf;
    uint8_t *target = (uint8_t *)out.buf;
    const uint8_t *b = have_base ? (const uint8_t *)base.buf : (held ? target : NULL);
    const uint8_t *const *planes = held ? plane_bytes : NULL;
    Py_ssize_t count = exceptions.len / width;
    int kind = b == NULL ? 0 : (b == target ? 2 : 1), patched;
    if (kind == 1 && b < target + out.len && target < b + out.len) {
        PyErr_SetString(PyExc_ValueError, "the base overlaps the output without being it");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    switch (width) {
        case 1: patched = unpack1(p, e, count, b, kind, target, n, planes, split_sign); break;
        case 2: patched = unpack2(p, e, count, b, kind, target, n, planes, split_sign); break;
        case 4: patched = unpack4(p, e, count, b, kind, target, n, planes, split_sign); break;
        default: patched = unpack8(p, e, count, b, kind, target, n, planes, split_sign); break;
    }
    Py_END_ALLOW_THREADS
    if (patched < 0) {
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

static PyObject *set_vector_marks(PyObject *Py_UNUSED(self), PyObject *args) {
    int wanted;
    if (!PyArg_ParseTuple(args, "p", &wanted)) {
        return NULL;
    }
    int was = vector_marks;
    vector_marks = wanted && cpu_has_vector_marks();
    return PyBool_FromLong(was);
}

static PyMethodDef methods[] = {
    {"join", join, METH_VARARGS,
     "join(planes, out, split_sign): write the items whose byte planes are `planes` into `out`."},
    {"vector_marks", set_vector_marks, METH_VARARGS,
     "vector_marks(on): find exceptions with AVX-512 where the CPU has it (the default), or not; returns the "
     "previous setting. For tests and measurements: both give the same bytes."},
    {"nibbles", nibbles, METH_VARARGS,
     "nibbles(packed, exceptions, out, width, base): unpack nibble-coded values into `out` (with a base:\n"
     "base + unzigzag(value) per element); see blockstore.codecs.nibbles."},
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
    vector_marks = cpu_has_vector_marks();
    return PyModule_Create(&module);
}
