/* The inverse of byte-plane splitting, compiled: one pass that reads every plane and writes every item.
 *
 * `blockstore.planes.join` does the same with numpy, one whole-array operation at a time: nine passes
 * over the output for a 4-byte item, and one GIL round trip per operation. Here each item is assembled
 * in registers and written once, with the GIL released, so decode threads join planes side by side.
 * Layout (see planes.py): plane i holds byte i of every little-endian item; with split_sign the top
 * plane holds the 8 exponent bits and the sign sits in the top bit of the plane below it.
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

MULTIVERSION static void join2(const uint8_t *const *p, uint8_t *out, Py_ssize_t n, int split_sign) {
    const uint8_t *b0 = p[0], *b1 = p[1];
    uint16_t word;
    if (split_sign) {
        for (Py_ssize_t i = 0; i < n; i++) {
            word = (uint16_t)((b0[i] & 0x7F) | (b1[i] << 7) | ((b0[i] & 0x80) << 8));
            memcpy(out + 2 * i, &word, 2);
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            word = (uint16_t)(b0[i] | (b1[i] << 8));
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

static PyMethodDef methods[] = {
    {"join", join, METH_VARARGS,
     "join(planes, out, split_sign): write the items whose byte planes are `planes` into `out`."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "blockstore._planes",
    "Byte-plane join in one pass (see blockstore.planes); little-endian hosts only.", -1, methods,
};

PyMODINIT_FUNC PyInit__planes(void) {
    const uint16_t probe = 1;
    if (*(const uint8_t *)&probe != 1) {  /* items are assembled as native words */
        PyErr_SetString(PyExc_ImportError, "blockstore._planes assumes a little-endian host");
        return NULL;
    }
    return PyModule_Create(&module);
}
