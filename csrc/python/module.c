/*
 * module.c - the fastspawn._C extension module: the module object, the mapping of
 * FS_E* codes to Python exceptions, and the timeout conversion every binding file uses.
 * The per-concern bindings live in py_*.c and register themselves here.
 */
#include "fs_py.h"

#include <math.h>

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

int fs_py_timeout_ms(PyObject *obj, const char *what, int64_t if_none, int64_t if_inf,
                     int positive_only, int64_t *ms)
{
    if (obj == NULL || obj == Py_None) {
        *ms = if_none;
        return 0;
    }
    if (!PyFloat_Check(obj) && !PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be None or a number of seconds, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    double s = PyFloat_AsDouble(obj);
    if (s == -1.0 && PyErr_Occurred())
        return -1;
    if (isnan(s) || s < 0.0 || (positive_only && s == 0.0)) {
        PyErr_Format(PyExc_ValueError, "%s must be None or a number of seconds %s 0, got %R", what,
                     positive_only ? ">" : ">=", obj);
        return -1;
    }
    if (s >= 1e12) {
        *ms = if_inf;
        return 0;
    }
    double v = ceil(s * 1000.0 - 1e-6);
    *ms = v < 1.0 && s > 0.0 ? 1 : (int64_t)v;
    return 0;
}

int fs_py_add_type(PyObject *module, PyTypeObject *t, const char *name)
{
    if (PyType_Ready(t) < 0)
        return -1;
    return PyModule_AddObjectRef(module, name, (PyObject *)t);
}

static struct PyModuleDef fs_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fastspawn._C",
    .m_doc = "fastspawn's C core: supervisor, store and collectives.",
    .m_size = -1,
};

/* Every binding file's init function (declared in fs_py.h), in order. */
static int (*const init_functions[])(PyObject *) = {
    fs_py_init_supervise, fs_py_init_store, fs_py_init_store_client,
    fs_py_init_coll,      fs_py_init_nccl,
};

PyMODINIT_FUNC PyInit__C(void)
{
    PyObject *m = PyModule_Create(&fs_module);
    if (m == NULL)
        return NULL;
    for (size_t i = 0; i < sizeof init_functions / sizeof init_functions[0]; i++) {
        if (init_functions[i](m) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
