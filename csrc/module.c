/*
 * module.c - the fastspawn._C extension module: module object, error mapping.
 * The per-concern bindings live in py_*.c and register themselves here.
 */
#include "fs_py.h"

#include <errno.h>

PyObject *fs_py_raise(const fs_error_t *err)
{
    PyObject *type;
    switch (err->code) {
    case FS_EINVAL: type = PyExc_ValueError; break;
    case FS_ETIMEOUT: type = PyExc_TimeoutError; break;
    case FS_ECLOSED: type = PyExc_ConnectionError; break;
    case FS_EAUTH: type = PyExc_PermissionError; break;
    case FS_ENOMEM: type = PyExc_MemoryError; break;
    case FS_ETOOBIG: type = PyExc_ValueError; break;
    case FS_ENOTFOUND: type = PyExc_KeyError; break;
    case FS_EINTR: type = PyExc_InterruptedError; break;
    case FS_ESYS:
        if (err->sys_errno != 0) {
            /* OSError(errno, msg) picks the matching subclass (e.g. ECONNREFUSED). */
            PyObject *args = Py_BuildValue("(is)", err->sys_errno, err->msg);
            if (args != NULL) {
                PyErr_SetObject(PyExc_OSError, args);
                Py_DECREF(args);
            }
            return NULL;
        }
        type = PyExc_OSError;
        break;
    default: type = PyExc_RuntimeError; break;
    }
    PyErr_SetString(type, err->msg[0] ? err->msg : fs_status_name(err->code));
    return NULL;
}

int fs_py_raise_int(const fs_error_t *err)
{
    (void)fs_py_raise(err);
    return -1;
}

static struct PyModuleDef fs_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fastspawn._C",
    .m_doc = "fastspawn's C core: supervisor, store and collectives.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__C(void)
{
    PyObject *m = PyModule_Create(&fs_module);
    if (m == NULL)
        return NULL;
    if (fs_py_init_supervise(m) < 0)
        goto fail;
    /* >>> more binding init calls >>> */
    if (fs_py_init_store(m) < 0)
        goto fail;
    if (fs_py_init_coll(m) < 0)
        goto fail;
    if (fs_py_init_nccl(m) < 0)
        goto fail;
    /* <<< more binding init calls <<< */
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
