/*
 * fs_py.h - internal header shared by the CPython binding files (module.c, py_*.c).
 * Not part of the public C API: only csrc/python/ includes Python.h; the library
 * (csrc/lib/) knows nothing of Python.
 */
#ifndef FS_PY_H
#define FS_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "fastspawn.h"

/* Raise the Python exception that matches err->code; returns NULL. */
PyObject *fs_py_raise(const fs_error_t *err);
/* Same, returning -1 (for init functions and converters). */
int fs_py_raise_int(const fs_error_t *err);

/*
 * The binding's one conversion of a timeout in seconds (int or float) to milliseconds.
 * One rounding rule: up to the next whole millisecond (a wait is never cut short; float
 * noise below a nanosecond is ignored), and a positive time is at least 1 ms. None gives
 * if_none; math.inf, or 1e12 s (31,700 years) and more, gives if_inf. A negative time,
 * NaN, or 0 with positive_only raise ValueError naming `what`; a non-number TypeError.
 * Returns 0, or -1 with the exception set.
 */
int fs_py_timeout_ms(PyObject *obj, const char *what, int64_t if_none, int64_t if_inf,
                     int positive_only, int64_t *ms);

/* PyType_Ready the static type t and add it to the module as `name`; 0 or -1. */
int fs_py_add_type(PyObject *module, PyTypeObject *t, const char *name);

/* ---- store arguments (py_store.c) ------------------------------------------------- */

/* A key: str (UTF-8) or bytes, no NUL, at most FS_STORE_MAX_KEY bytes; NULL with the
   exception set. The pointer stays valid while obj is alive (str caches its UTF-8). */
const char *fs_py_key_arg(PyObject *obj, const char *what);

/* A value: str (UTF-8) or any bytes-like object. Release with fs_py_value_release. */
struct fs_py_value {
    Py_buffer view;
    int have_view;
    const void *p;
    size_t len;
};

int fs_py_value_arg(PyObject *obj, struct fs_py_value *v, const char *what);
void fs_py_value_release(struct fs_py_value *v);

/* A sequence of keys -> a tuple (kept alive by the caller) and a C array. */
struct fs_py_keys {
    PyObject *tuple;
    const char **ptrs;
    size_t n;
};

int fs_py_keys_arg(PyObject *obj, struct fs_py_keys *k);
void fs_py_keys_release(struct fs_py_keys *k);

/* Each binding file adds its functions and types to the module (module.c calls them). */
int fs_py_init_supervise(PyObject *module);
int fs_py_init_store(PyObject *module);
int fs_py_init_store_client(PyObject *module);
int fs_py_init_coll(PyObject *module);
int fs_py_init_nccl(PyObject *module);

#endif /* FS_PY_H */
