/*
 * py_store_client.c - CPython binding of the rendezvous store's client: _C.StoreClient
 * and the conversion of keys, values and key lists. Plain C API. The GIL is released
 * around every call that can block; a blocking wait interrupted by a signal runs the
 * Python signal handlers (Ctrl-C raises KeyboardInterrupt) and, if they do not raise,
 * carries on with what is left of its deadline.
 *
 * Timeouts are seconds (int or float): None means the client's default, math.inf means
 * no limit (fs_py_timeout_ms).
 */
#include "fs_py.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ */
/* Argument conversion (keys and values: py_store.c)                  */
/* ------------------------------------------------------------------ */

/* Seconds (None: the client's default, math.inf: no limit) -> timeout_ms for the C API. */
static int timeout_arg(PyObject *obj, int64_t *ms)
{
    return fs_py_timeout_ms(obj, "timeout", FS_STORE_DEFAULT_TIMEOUT, FS_STORE_NO_TIMEOUT, 0, ms);
}

static PyObject *bytes_take(void *p, size_t n)
{
    PyObject *b = PyBytes_FromStringAndSize(p, (Py_ssize_t)n);
    free(p);
    return b;
}

/* ------------------------------------------------------------------ */
/* StoreClient                                                        */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    fs_store_client_t *c;
    /* Serialises calls and the copy out of a value view (get, multi_get): taken with the
     * GIL released and never waited for while holding the GIL, so it cannot deadlock. */
    PyThread_type_lock lock;
    int closed;
} ClientObject;

/* now + ms on the fs_now_ms() clock, saturating: INT64_MAX means no limit. */
static int64_t deadline_of_ms(int64_t ms)
{
    int64_t now = fs_now_ms();
    return ms > INT64_MAX - now ? INT64_MAX : now + ms;
}

static int64_t deadline_of(ClientObject *self, int64_t ms)
{
    return deadline_of_ms(ms == FS_STORE_DEFAULT_TIMEOUT ? fs_store_client_timeout(self->c) : ms);
}

static int64_t left_of(int64_t deadline)
{
    if (deadline == INT64_MAX)
        return FS_STORE_NO_TIMEOUT;
    int64_t left = deadline - fs_now_ms();
    return left < 0 ? 0 : left;
}

static PY_TIMEOUT_T lock_us(int64_t ms)
{
    if (ms == FS_STORE_NO_TIMEOUT || ms > (int64_t)(PY_TIMEOUT_MAX / 1000))
        return -1;
    return (PY_TIMEOUT_T)ms * 1000;
}

/*
 * Run `call` (an expression using `tmo_` as its timeout_ms and `err`) with the
 * GIL released and self->lock held; with `hold`, a successful call keeps the
 * lock for the caller to copy a view and release. On FS_EINTR run the signal
 * handlers and, unless they raised, go on with the time left. Leaves the
 * status in rc (FS_EINTR: a Python exception is set).
 */
#define FS_BLOCKING_EX(self, ms, rc, call, hold)                                                   \
    do {                                                                                           \
        int64_t dl_ = deadline_of((self), (ms));                                                   \
        for (;;) {                                                                                 \
            PyThreadState *ts_ = PyEval_SaveThread();                                              \
            PyLockStatus ls_ =                                                                     \
                PyThread_acquire_lock_timed((self)->lock, lock_us(left_of(dl_)), 1);               \
            if (ls_ == PY_LOCK_ACQUIRED) {                                                         \
                int64_t tmo_ = left_of(dl_);                                                       \
                (rc) = (call);                                                                     \
                if (!(hold) || (rc) != FS_OK)                                                      \
                    PyThread_release_lock((self)->lock);                                           \
            } else if (ls_ == PY_LOCK_INTR) {                                                      \
                (rc) = fs_error_set(&err, FS_EINTR, "store call interrupted by a signal");         \
            } else {                                                                               \
                (rc) = fs_error_set(&err, FS_ETIMEOUT,                                             \
                                    "store call timed out waiting for another thread's call on "   \
                                    "this connection (use Store.clone() for one per thread)");     \
            }                                                                                      \
            PyEval_RestoreThread(ts_);                                                             \
            if ((rc) != FS_EINTR || PyErr_CheckSignals() < 0)                                      \
                break;                                                                             \
        }                                                                                          \
    } while (0)

#define FS_BLOCKING(self, ms, rc, call) FS_BLOCKING_EX(self, ms, rc, call, 0)

/* What a timeout raises: TimeoutError, or the subclass fastspawn.store registers (one that
 * is also torch's DistStoreError, which torch's own retry loops catch). */
static PyObject *timeout_error_type;

static PyObject *raise_rc(int rc, const fs_error_t *err)
{
    if (rc == FS_EINTR && PyErr_Occurred())
        return NULL;
    if (rc == FS_ETIMEOUT && timeout_error_type != NULL) {
        PyErr_SetString(timeout_error_type, err->msg);
        return NULL;
    }
    return fs_py_raise(err);
}

static int client_usable(ClientObject *self)
{
    if (self->c == NULL) {
        PyErr_SetString(PyExc_ValueError, "StoreClient is not connected");
        return -1;
    }
    return 0;
}

static int client_init(ClientObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"host", "port", "token", "timeout", "connect_timeout", NULL};
    const char *host, *token;
    int port;
    PyObject *tmo_obj = Py_None, *ctmo_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "siz|OO:StoreClient", kwlist, &host, &port, &token,
                                     &tmo_obj, &ctmo_obj))
        return -1;
    if (token == NULL || token[0] == '\0') {
        PyErr_SetString(PyExc_ValueError, "StoreClient needs the server's token (the launcher "
                                          "sets FASTSPAWN_STORE_TOKEN)");
        return -1;
    }
    int64_t tmo = FS_STORE_DEFAULT_TIMEOUT, ctmo = FS_STORE_DEFAULT_TIMEOUT;
    if (timeout_arg(tmo_obj, &tmo) < 0 || timeout_arg(ctmo_obj, &ctmo) < 0)
        return -1;
    if (self->c != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "StoreClient is already connected");
        return -1;
    }
    if (self->lock == NULL && (self->lock = PyThread_allocate_lock()) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    fs_store_client_opts_t o = {0};
    o.host = host;
    o.port = port;
    o.token = token;
    o.timeout_ms = 0; /* the C default; replaced below when a timeout was given */
    o.interruptible = 1;
    int64_t cdl = deadline_of_ms(
        ctmo == FS_STORE_DEFAULT_TIMEOUT ? FS_STORE_DEFAULT_CONNECT_TIMEOUT_MS : ctmo);
    fs_error_t err;
    fs_store_client_t *c = NULL;
    int rc = FS_OK;
    for (;;) {
        int64_t left = left_of(cdl);
        o.connect_timeout_ms = left > 0 ? left : 1;
        PyThreadState *ts = PyEval_SaveThread();
        rc = fs_store_connect(&o, &c, &err);
        PyEval_RestoreThread(ts);
        if (rc != FS_EINTR)
            break;
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
    if (rc < 0) {
        raise_rc(rc, &err);
        return -1;
    }
    if (tmo != FS_STORE_DEFAULT_TIMEOUT)
        fs_store_client_set_timeout(c, tmo);
    self->c = c;
    self->closed = 0;
    return 0;
}

static void client_dealloc(ClientObject *self)
{
    if (self->c != NULL) {
        fs_store_client_t *c = self->c;
        self->c = NULL;
        PyThreadState *ts = PyEval_SaveThread();
        fs_store_close(c);
        PyEval_RestoreThread(ts);
    }
    if (self->lock != NULL)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *client_close(ClientObject *self, PyObject *unused)
{
    (void)unused;
    /* Wake calls blocked in other threads; the memory goes when the object does. */
    if (self->c != NULL)
        fs_store_client_shutdown(self->c);
    self->closed = 1;
    Py_RETURN_NONE;
}

/* Parse (key, timeout=None). */
static int key_timeout_args(ClientObject *self, PyObject *args, PyObject *kw, const char *format,
                            const char **key, int64_t *ms)
{
    static char *kwlist[] = {"key", "timeout", NULL};
    PyObject *kobj, *tobj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, format, kwlist, &kobj, &tobj) ||
        client_usable(self) < 0 || timeout_arg(tobj, ms) < 0)
        return -1;
    *key = fs_py_key_arg(kobj, "key");
    return *key == NULL ? -1 : 0;
}

/* Parse (keys, timeout=None); release k with fs_py_keys_release. */
static int keys_timeout_args(ClientObject *self, PyObject *args, PyObject *kw, const char *format,
                             struct fs_py_keys *k, int64_t *ms)
{
    static char *kwlist[] = {"keys", "timeout", NULL};
    PyObject *kobj, *tobj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, format, kwlist, &kobj, &tobj) ||
        client_usable(self) < 0 || timeout_arg(tobj, ms) < 0)
        return -1;
    return fs_py_keys_arg(kobj, k);
}

typedef int (*set_fn)(fs_store_client_t *, const char *, const void *, size_t, int64_t,
                      fs_error_t *);

/* set and append: (key, value, timeout=None). */
static PyObject *client_set_like(ClientObject *self, PyObject *args, PyObject *kw,
                                 const char *format, set_fn fn)
{
    static char *kwlist[] = {"key", "value", "timeout", NULL};
    PyObject *kobj, *vobj, *tobj = Py_None;
    int64_t ms;
    struct fs_py_value v;
    if (!PyArg_ParseTupleAndKeywords(args, kw, format, kwlist, &kobj, &vobj, &tobj) ||
        client_usable(self) < 0 || timeout_arg(tobj, &ms) < 0)
        return NULL;
    const char *key = fs_py_key_arg(kobj, "key");
    if (key == NULL || fs_py_value_arg(vobj, &v, "value") < 0)
        return NULL;
    fs_error_t err;
    int rc;
    FS_BLOCKING(self, ms, rc, fn(self->c, key, v.p, v.len, tmo_, &err));
    fs_py_value_release(&v);
    if (rc < 0)
        return raise_rc(rc, &err);
    Py_RETURN_NONE;
}

static PyObject *client_set(ClientObject *self, PyObject *args, PyObject *kw)
{
    return client_set_like(self, args, kw, "OO|O:set", fs_store_set);
}

static PyObject *client_append(ClientObject *self, PyObject *args, PyObject *kw)
{
    return client_set_like(self, args, kw, "OO|O:append", fs_store_append);
}

static PyObject *client_get(ClientObject *self, PyObject *args, PyObject *kw)
{
    const char *key;
    int64_t ms;
    if (key_timeout_args(self, args, kw, "O|O:get", &key, &ms) < 0)
        return NULL;
    fs_error_t err;
    const void *view = NULL;
    size_t len = 0;
    int rc;
    FS_BLOCKING_EX(self, ms, rc, fs_store_get_view(self->c, key, &view, &len, tmo_, &err), 1);
    if (rc < 0)
        return raise_rc(rc, &err);
    PyObject *b = PyBytes_FromStringAndSize(view, (Py_ssize_t)len);
    PyThread_release_lock(self->lock);
    return b;
}

static PyObject *client_add(ClientObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"key", "value", "timeout", NULL};
    PyObject *kobj, *dobj, *tobj = Py_None;
    int64_t ms;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:add", kwlist, &kobj, &dobj, &tobj) ||
        client_usable(self) < 0 || timeout_arg(tobj, &ms) < 0)
        return NULL;
    const char *key = fs_py_key_arg(kobj, "key");
    if (key == NULL)
        return NULL;
    if (!PyLong_Check(dobj)) {
        PyErr_Format(PyExc_TypeError, "add() amount must be an int, not %.100s",
                     Py_TYPE(dobj)->tp_name);
        return NULL;
    }
    long long delta = PyLong_AsLongLong(dobj);
    if (delta == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "add() amount must fit in a signed 64-bit integer");
        }
        return NULL;
    }
    fs_error_t err;
    int64_t result = 0;
    int rc;
    FS_BLOCKING(self, ms, rc, fs_store_add(self->c, key, delta, &result, tmo_, &err));
    if (rc < 0)
        return raise_rc(rc, &err);
    return PyLong_FromLongLong(result);
}

static PyObject *client_compare_set(ClientObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"key", "expected", "desired", "timeout", NULL};
    PyObject *kobj, *eobj, *dobj, *tobj = Py_None;
    int64_t ms;
    struct fs_py_value e, d;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|O:compare_set", kwlist, &kobj, &eobj, &dobj,
                                     &tobj) ||
        client_usable(self) < 0 || timeout_arg(tobj, &ms) < 0)
        return NULL;
    const char *key = fs_py_key_arg(kobj, "key");
    if (key == NULL || fs_py_value_arg(eobj, &e, "expected") < 0)
        return NULL;
    if (fs_py_value_arg(dobj, &d, "desired") < 0) {
        fs_py_value_release(&e);
        return NULL;
    }
    fs_error_t err;
    void *cur = NULL;
    size_t len = 0;
    int rc;
    FS_BLOCKING(self, ms, rc,
                fs_store_compare_set(self->c, key, e.p, e.len, d.p, d.len, &cur, &len, tmo_, &err));
    fs_py_value_release(&e);
    fs_py_value_release(&d);
    if (rc < 0)
        return raise_rc(rc, &err);
    return bytes_take(cur, len);
}

static PyObject *client_wait(ClientObject *self, PyObject *args, PyObject *kw)
{
    int64_t ms;
    struct fs_py_keys k;
    if (keys_timeout_args(self, args, kw, "O|O:wait", &k, &ms) < 0)
        return NULL;
    fs_error_t err;
    int rc;
    FS_BLOCKING(self, ms, rc, fs_store_wait(self->c, k.ptrs, k.n, tmo_, &err));
    fs_py_keys_release(&k);
    if (rc < 0)
        return raise_rc(rc, &err);
    Py_RETURN_NONE;
}

static PyObject *client_check(ClientObject *self, PyObject *args, PyObject *kw)
{
    int64_t ms;
    struct fs_py_keys k;
    if (keys_timeout_args(self, args, kw, "O|O:check", &k, &ms) < 0)
        return NULL;
    fs_error_t err;
    int all = 0, rc;
    FS_BLOCKING(self, ms, rc, fs_store_check(self->c, k.ptrs, k.n, &all, tmo_, &err));
    fs_py_keys_release(&k);
    if (rc < 0)
        return raise_rc(rc, &err);
    return PyBool_FromLong(all);
}

static PyObject *client_delete_key(ClientObject *self, PyObject *args, PyObject *kw)
{
    const char *key;
    int64_t ms;
    if (key_timeout_args(self, args, kw, "O|O:delete_key", &key, &ms) < 0)
        return NULL;
    fs_error_t err;
    int deleted = 0, rc;
    FS_BLOCKING(self, ms, rc, fs_store_delete(self->c, key, &deleted, tmo_, &err));
    if (rc < 0)
        return raise_rc(rc, &err);
    return PyBool_FromLong(deleted);
}

static PyObject *client_num_keys(ClientObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *tobj = Py_None;
    int64_t ms;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:num_keys", kwlist, &tobj) ||
        client_usable(self) < 0 || timeout_arg(tobj, &ms) < 0)
        return NULL;
    fs_error_t err;
    int64_t n = 0;
    int rc;
    FS_BLOCKING(self, ms, rc, fs_store_num_keys(self->c, &n, tmo_, &err));
    if (rc < 0)
        return raise_rc(rc, &err);
    return PyLong_FromLongLong(n);
}

static PyObject *client_multi_get(ClientObject *self, PyObject *args, PyObject *kw)
{
    int64_t ms;
    struct fs_py_keys k;
    if (keys_timeout_args(self, args, kw, "O|O:multi_get", &k, &ms) < 0)
        return NULL;
    const void **vals = PyMem_Calloc(k.n ? k.n : 1, sizeof *vals);
    size_t *lens = PyMem_Calloc(k.n ? k.n : 1, sizeof *lens);
    PyObject *out = NULL;
    if (vals == NULL || lens == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    fs_error_t err;
    int rc;
    FS_BLOCKING_EX(self, ms, rc,
                   fs_store_multi_get_view(self->c, k.ptrs, k.n, vals, lens, tmo_, &err), 1);
    if (rc < 0) {
        raise_rc(rc, &err);
        goto done;
    }
    out = PyList_New((Py_ssize_t)k.n);
    for (size_t i = 0; out != NULL && i < k.n; i++) {
        PyObject *b = PyBytes_FromStringAndSize(vals[i], (Py_ssize_t)lens[i]);
        if (b == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, (Py_ssize_t)i, b);
    }
    PyThread_release_lock(self->lock);
done:
    PyMem_Free(vals);
    PyMem_Free(lens);
    fs_py_keys_release(&k);
    return out;
}

static PyObject *client_multi_set(ClientObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"keys", "values", "timeout", NULL};
    PyObject *kobj, *vobj, *tobj = Py_None, *vt = NULL, *out = NULL;
    int64_t ms;
    struct fs_py_keys k;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:multi_set", kwlist, &kobj, &vobj, &tobj) ||
        client_usable(self) < 0 || timeout_arg(tobj, &ms) < 0 || fs_py_keys_arg(kobj, &k) < 0)
        return NULL;
    struct fs_py_value *vals = NULL;
    const void **ptrs = NULL;
    size_t *lens = NULL, nv = 0;
    vt = PySequence_Tuple(vobj);
    if (vt == NULL)
        goto done;
    if ((size_t)PyTuple_GET_SIZE(vt) != k.n) {
        PyErr_Format(PyExc_ValueError,
                     "multi_set got %zu keys but %zd values: pass one value "
                     "per key",
                     k.n, PyTuple_GET_SIZE(vt));
        goto done;
    }
    vals = PyMem_Calloc(k.n ? k.n : 1, sizeof *vals);
    ptrs = PyMem_Calloc(k.n ? k.n : 1, sizeof *ptrs);
    lens = PyMem_Calloc(k.n ? k.n : 1, sizeof *lens);
    if (vals == NULL || ptrs == NULL || lens == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; nv < k.n; nv++) {
        if (fs_py_value_arg(PyTuple_GET_ITEM(vt, (Py_ssize_t)nv), &vals[nv], "value") < 0)
            goto done;
        ptrs[nv] = vals[nv].p;
        lens[nv] = vals[nv].len;
    }
    fs_error_t err;
    int rc;
    FS_BLOCKING(self, ms, rc, fs_store_multi_set(self->c, k.ptrs, ptrs, lens, k.n, tmo_, &err));
    if (rc < 0) {
        raise_rc(rc, &err);
        goto done;
    }
    Py_INCREF(Py_None);
    out = Py_None;
done:
    for (size_t i = 0; vals != NULL && i < nv; i++)
        fs_py_value_release(&vals[i]);
    PyMem_Free(vals);
    PyMem_Free(ptrs);
    PyMem_Free(lens);
    Py_XDECREF(vt);
    fs_py_keys_release(&k);
    return out;
}

static PyObject *client_barrier(ClientObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", "world_size", "rank", "timeout", NULL};
    PyObject *nobj, *tobj = Py_None;
    int world, rank;
    int64_t ms;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oii|O:barrier", kwlist, &nobj, &world, &rank,
                                     &tobj) ||
        client_usable(self) < 0 || timeout_arg(tobj, &ms) < 0)
        return NULL;
    const char *name = fs_py_key_arg(nobj, "barrier name");
    if (name == NULL)
        return NULL;
    fs_error_t err;
    int rc;
    FS_BLOCKING(self, ms, rc, fs_store_barrier(self->c, name, world, rank, tmo_, &err));
    if (rc < 0)
        return raise_rc(rc, &err);
    Py_RETURN_NONE;
}

static PyObject *client_set_timeout(ClientObject *self, PyObject *arg)
{
    int64_t ms;
    if (client_usable(self) < 0 || timeout_arg(arg, &ms) < 0)
        return NULL;
    if (ms == FS_STORE_DEFAULT_TIMEOUT) {
        PyErr_SetString(PyExc_ValueError, "set_timeout needs a number of seconds");
        return NULL;
    }
    fs_store_client_set_timeout(self->c, ms);
    Py_RETURN_NONE;
}

static PyObject *client_get_timeout(ClientObject *self, void *c)
{
    (void)c;
    if (client_usable(self) < 0)
        return NULL;
    int64_t ms = fs_store_client_timeout(self->c);
    if (ms == FS_STORE_NO_TIMEOUT)
        return PyFloat_FromDouble(INFINITY);
    return PyFloat_FromDouble((double)ms / 1000.0);
}

static PyObject *client_get_closed(ClientObject *self, void *c)
{
    (void)c;
    return PyBool_FromLong(self->closed || self->c == NULL);
}

#define KW (METH_VARARGS | METH_KEYWORDS)
#define FN(f) (PyCFunction)(void (*)(void))(f)

static PyMethodDef client_methods[] = {
    {"set", FN(client_set), KW, "set(key, value, timeout=None)"},
    {"get", FN(client_get), KW, "get(key, timeout=None) -> bytes; waits for the key"},
    {"add", FN(client_add), KW, "add(key, value, timeout=None) -> int (atomic counter)"},
    {"compare_set", FN(client_compare_set), KW,
     "compare_set(key, expected, desired, timeout=None) -> bytes now stored"},
    {"wait", FN(client_wait), KW, "wait(keys, timeout=None); waits for every key"},
    {"check", FN(client_check), KW, "check(keys, timeout=None) -> bool (all exist)"},
    {"delete_key", FN(client_delete_key), KW, "delete_key(key, timeout=None) -> bool"},
    {"num_keys", FN(client_num_keys), KW, "num_keys(timeout=None) -> int"},
    {"multi_get", FN(client_multi_get), KW, "multi_get(keys, timeout=None) -> list[bytes]"},
    {"multi_set", FN(client_multi_set), KW, "multi_set(keys, values, timeout=None)"},
    {"append", FN(client_append), KW, "append(key, value, timeout=None)"},
    {"barrier", FN(client_barrier), KW,
     "barrier(name, world_size, rank, timeout=None); single-use name; a timeout names the "
     "ranks that did not arrive"},
    {"set_timeout", (PyCFunction)client_set_timeout, METH_O, "set_timeout(seconds)"},
    {"close", (PyCFunction)client_close, METH_NOARGS,
     "Close the connection; calls blocked in other threads return ConnectionError."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef client_getset[] = {
    {"timeout", (getter)client_get_timeout, NULL, "default timeout in seconds", NULL},
    {"closed", (getter)client_get_closed, NULL, "True after close()", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ClientType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastspawn._C.StoreClient",
    .tp_basicsize = sizeof(ClientObject),
    .tp_dealloc = (destructor)client_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "StoreClient(host, port, token, timeout=None, connect_timeout=None): one "
              "connection to a fastspawn store. Thread-safe (calls are serialised). host may be "
              "'unix:@name' or 'unix:/path'. Timeouts are seconds.",
    .tp_methods = client_methods,
    .tp_getset = client_getset,
    .tp_init = (initproc)client_init,
    .tp_new = PyType_GenericNew,
};

static PyObject *py_set_timeout_error(PyObject *m, PyObject *cls)
{
    (void)m;
    if (!PyType_Check(cls) ||
        !PyType_IsSubtype((PyTypeObject *)cls, (PyTypeObject *)PyExc_TimeoutError)) {
        PyErr_SetString(PyExc_TypeError, "the store timeout error must subclass TimeoutError");
        return NULL;
    }
    Py_INCREF(cls);
    Py_XSETREF(timeout_error_type, cls);
    Py_RETURN_NONE;
}

static PyMethodDef client_functions[] = {
    {"_store_set_timeout_error", (PyCFunction)py_set_timeout_error, METH_O,
     "_store_set_timeout_error(cls): StoreClient timeouts raise cls (a TimeoutError subclass)"},
    {NULL, NULL, 0, NULL},
};

int fs_py_init_store_client(PyObject *module)
{
    if (fs_py_add_type(module, &ClientType, "StoreClient") < 0 ||
        PyModule_AddFunctions(module, client_functions) < 0)
        return -1;
    return 0;
}
