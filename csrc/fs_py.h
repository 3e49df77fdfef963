/*
 * fs_py.h - internal header shared by the CPython binding files (module.c,
 * py_*.c). Not part of the public C API: only these files include Python.h.
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

/* Each binding file adds its functions/types to the module. */
int fs_py_init_supervise(PyObject *module);
/* >>> more binding init functions (store, coll) >>> */
int fs_py_init_store(PyObject *module);
int fs_py_init_coll(PyObject *module);
int fs_py_init_nccl(PyObject *module); /* csrc/python/py_nccl.c */
/* <<< more binding init functions <<< */

#endif /* FS_PY_H */
