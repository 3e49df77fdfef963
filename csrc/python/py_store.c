/*
 * py_store.c - CPython binding of the rendezvous store's server: _C.StoreServer,
 * _C.store_make_token, the store's limits as constants, and the conversion of keys,
 * values and key lists (fs_py_key_arg, ...) for the client (py_store_client.c).
 * fastspawn/store.py wraps these types in the torch.distributed.Store subclass.
 */
#include "fs_py.h"

#include <string.h>

/* ------------------------------------------------------------------ */
/* Keys and values                                                    */
/* ------------------------------------------------------------------ */

/* A key: str (UTF-8) or bytes, no NUL, at most FS_STORE_MAX_KEY bytes. The pointer
 * stays valid while obj is alive (str caches its UTF-8). */
const char *fs_py_key_arg(PyObject *obj, const char *what)
{
    const char *p;
    Py_ssize_t n;
    if (PyUnicode_Check(obj)) {
        p = PyUnicode_AsUTF8AndSize(obj, &n);
        if (p == NULL)
            return NULL;
    } else if (PyBytes_Check(obj)) {
        p = PyBytes_AS_STRING(obj);
        n = PyBytes_GET_SIZE(obj);
    } else {
        PyErr_Format(PyExc_TypeError, "%s must be str or bytes, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    if ((size_t)n > FS_STORE_MAX_KEY) {
        PyErr_Format(PyExc_ValueError,
                     "%s is %zd bytes (UTF-8); the store allows at most %u: use a shorter key "
                     "(a hash of it, for instance)",
                     what, n, FS_STORE_MAX_KEY);
        return NULL;
    }
    if (memchr(p, '\0', (size_t)n) != NULL) {
        PyErr_Format(PyExc_ValueError, "%s %R contains a NUL character, which keys cannot hold",
                     what, obj);
        return NULL;
    }
    return p;
}

int fs_py_value_arg(PyObject *obj, struct fs_py_value *v, const char *what)
{
    v->have_view = 0;
    if (PyUnicode_Check(obj)) {
        Py_ssize_t n;
        const char *p = PyUnicode_AsUTF8AndSize(obj, &n);
        if (p == NULL)
            return -1;
        v->p = p;
        v->len = (size_t)n;
        return 0;
    }
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError,
                     "%s must be bytes or str (or a bytes-like object), not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PyObject_GetBuffer(obj, &v->view, PyBUF_SIMPLE) < 0)
        return -1;
    v->have_view = 1;
    v->p = v->view.buf;
    v->len = (size_t)v->view.len;
    return 0;
}

void fs_py_value_release(struct fs_py_value *v)
{
    if (v->have_view)
        PyBuffer_Release(&v->view);
    v->have_view = 0;
}

int fs_py_keys_arg(PyObject *obj, struct fs_py_keys *k)
{
    k->tuple = NULL;
    k->ptrs = NULL;
    k->n = 0;
    if (PyUnicode_Check(obj) || PyBytes_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "keys must be a list of str, not a single key: "
                                         "wrap it in a list");
        return -1;
    }
    k->tuple = PySequence_Tuple(obj);
    if (k->tuple == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "keys must be a list of str, not %.100s",
                         Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    k->n = (size_t)PyTuple_GET_SIZE(k->tuple);
    k->ptrs = PyMem_Malloc((k->n ? k->n : 1) * sizeof *k->ptrs);
    if (k->ptrs == NULL) {
        Py_CLEAR(k->tuple);
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < k->n; i++) {
        k->ptrs[i] = fs_py_key_arg(PyTuple_GET_ITEM(k->tuple, (Py_ssize_t)i), "key");
        if (k->ptrs[i] == NULL) {
            PyMem_Free(k->ptrs);
            k->ptrs = NULL;
            Py_CLEAR(k->tuple);
            return -1;
        }
    }
    return 0;
}

void fs_py_keys_release(struct fs_py_keys *k)
{
    PyMem_Free(k->ptrs);
    k->ptrs = NULL;
    Py_CLEAR(k->tuple);
}

/* ------------------------------------------------------------------ */
/* StoreServer                                                        */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    fs_store_server_t *srv;
    PyObject *token; /* str */
} ServerObject;

static void server_stop(ServerObject *self)
{
    fs_store_server_t *s = self->srv;
    self->srv = NULL; /* under the GIL: a second shutdown sees NULL */
    if (s != NULL) {
        PyThreadState *ts = PyEval_SaveThread();
        fs_store_server_stop(s);
        PyEval_RestoreThread(ts);
    }
}

static void server_dealloc(ServerObject *self)
{
    server_stop(self);
    Py_CLEAR(self->token);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *server_start(ServerObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"host",       "port",           "token",
                             "unix_path",  "max_value_size", "auth_timeout",
                             "max_unauth", "max_clients",    NULL};
    const char *host = NULL, *token = NULL, *unix_path = NULL;
    int port = 0, max_unauth = 0, max_clients = 0;
    Py_ssize_t max_value = 0;
    PyObject *auth_obj = Py_None;
    int64_t auth_ms = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|zizznOii:start", kwlist, &host, &port, &token,
                                     &unix_path, &max_value, &auth_obj, &max_unauth,
                                     &max_clients) ||
        fs_py_timeout_ms(auth_obj, "auth_timeout", 0, INT32_MAX, 0, &auth_ms) < 0)
        return NULL;
    if (self->srv != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "StoreServer is already running; shutdown() first");
        return NULL;
    }
    if (port < 0 || port > 65535) {
        PyErr_Format(PyExc_ValueError, "port must be 0 (any free port) or 1..65535, got %d", port);
        return NULL;
    }
    if (max_value < 0 || max_unauth < 0 || max_clients < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "max_value_size, max_unauth and max_clients must be >= 0 (0: the default)");
        return NULL;
    }
    fs_error_t err;
    char made[FS_STORE_TOKEN_LEN + 1];
    if (token == NULL) {
        if (fs_store_make_token(made, sizeof made, &err) < 0)
            return fs_py_raise(&err);
        token = made;
    } else if (token[0] == '\0' || strlen(token) > FS_STORE_MAX_TOKEN) {
        PyErr_Format(PyExc_ValueError,
                     "token must be 1..%u characters (or None: one is made with getrandom)",
                     FS_STORE_MAX_TOKEN);
        return NULL;
    }
    PyObject *tok = PyUnicode_FromString(token);
    if (tok == NULL)
        return NULL;
    fs_store_server_opts_t o = {0};
    o.host = host;
    o.port = port;
    o.token = token;
    o.unix_path = unix_path;
    o.max_value_size = (size_t)max_value;
    o.auth_timeout_ms = auth_ms > INT32_MAX ? INT32_MAX : (int)auth_ms; /* 0: the default */
    o.max_unauth = max_unauth;
    o.max_clients = max_clients;
    fs_store_server_t *s = NULL;
    int rc;
    PyThreadState *ts = PyEval_SaveThread();
    rc = fs_store_server_start(&o, &s, &err);
    PyEval_RestoreThread(ts);
    if (rc < 0) {
        Py_DECREF(tok);
        return fs_py_raise(&err);
    }
    self->srv = s;
    Py_XSETREF(self->token, tok);
    return Py_BuildValue("(si)", fs_store_server_host(s), fs_store_server_port(s));
}

static PyObject *server_shutdown(ServerObject *self, PyObject *unused)
{
    (void)unused;
    server_stop(self);
    Py_RETURN_NONE;
}

static PyObject *server_not_running(void)
{
    PyErr_SetString(PyExc_RuntimeError, "StoreServer is not running (call start())");
    return NULL;
}

static PyObject *server_get_host(ServerObject *self, void *c)
{
    (void)c;
    if (self->srv == NULL)
        return server_not_running();
    return PyUnicode_FromString(fs_store_server_host(self->srv));
}

static PyObject *server_get_port(ServerObject *self, void *c)
{
    (void)c;
    if (self->srv == NULL)
        return server_not_running();
    return PyLong_FromLong(fs_store_server_port(self->srv));
}

static PyObject *server_get_unix_path(ServerObject *self, void *c)
{
    (void)c;
    if (self->srv == NULL)
        return server_not_running();
    const char *p = fs_store_server_unix_path(self->srv);
    if (p == NULL)
        Py_RETURN_NONE;
    return PyUnicode_FromString(p);
}

static PyObject *server_get_token(ServerObject *self, void *c)
{
    (void)c;
    if (self->token == NULL)
        Py_RETURN_NONE;
    Py_INCREF(self->token);
    return self->token;
}

static PyObject *server_get_running(ServerObject *self, void *c)
{
    (void)c;
    return PyBool_FromLong(self->srv != NULL && fs_store_server_check(self->srv, NULL) == FS_OK);
}

static PyObject *server_get_num_clients(ServerObject *self, void *c)
{
    (void)c;
    if (self->srv == NULL)
        return server_not_running();
    return PyLong_FromSize_t(fs_store_server_num_clients(self->srv));
}

static PyObject *server_stats(ServerObject *self, PyObject *unused)
{
    (void)unused;
    if (self->srv == NULL)
        return server_not_running();
    fs_store_server_stats_t st;
    fs_store_server_stats(self->srv, &st);
    return Py_BuildValue("{snsnsnsnsKsKsK}", "clients", (Py_ssize_t)st.clients, "unauth",
                         (Py_ssize_t)st.unauth, "parked", (Py_ssize_t)st.parked, "out_bytes",
                         (Py_ssize_t)st.out_bytes, "evicted", (unsigned long long)st.evicted,
                         "shed", (unsigned long long)st.shed, "refused",
                         (unsigned long long)st.refused);
}

static PyMethodDef server_methods[] = {
    {"start", (PyCFunction)(void (*)(void))server_start, METH_VARARGS | METH_KEYWORDS,
     "start(host=None, port=0, token=None, unix_path=None, max_value_size=0, auth_timeout=None,"
     " max_unauth=0, max_clients=0) -> (host, port)\n\nStart the server thread. host None "
     "binds 127.0.0.1, '' every address; port 0 picks a free one; token None makes a random "
     "one (see .token); unix_path '@' also listens on an abstract Unix socket named for you. "
     "0 or None: the C defaults (fastspawn/store.h)."},
    {"stats", (PyCFunction)server_stats, METH_NOARGS,
     "stats() -> dict: clients, unauth, parked, out_bytes, evicted, shed, refused "
     "(fs_store_server_stats)"},
    {"shutdown", (PyCFunction)server_shutdown, METH_NOARGS,
     "Stop the thread, close every connection. Idempotent."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef server_getset[] = {
    {"host", (getter)server_get_host, NULL, "bound numeric address", NULL},
    {"port", (getter)server_get_port, NULL, "bound port", NULL},
    {"unix_path", (getter)server_get_unix_path, NULL, "'@name', a path, or None", NULL},
    {"token", (getter)server_get_token, NULL, "the token clients must present", NULL},
    {"running", (getter)server_get_running, NULL, "True while the server thread serves", NULL},
    {"num_clients", (getter)server_get_num_clients, NULL, "open connections", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ServerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastspawn._C.StoreServer",
    .tp_basicsize = sizeof(ServerObject),
    .tp_dealloc = (destructor)server_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The rendezvous store server: a C thread serving keys over TCP (and optionally a "
              "Unix socket). Use fastspawn.store.StoreServer.",
    .tp_methods = server_methods,
    .tp_getset = server_getset,
    .tp_new = PyType_GenericNew,
};

static PyObject *py_make_token(PyObject *m, PyObject *unused)
{
    (void)m;
    (void)unused;
    char tok[FS_STORE_TOKEN_LEN + 1];
    fs_error_t err;
    if (fs_store_make_token(tok, sizeof tok, &err) < 0)
        return fs_py_raise(&err);
    return PyUnicode_FromString(tok);
}

static PyMethodDef store_functions[] = {
    {"store_make_token", (PyCFunction)py_make_token, METH_NOARGS,
     "store_make_token() -> str: 64 hex characters from getrandom()"},
    {NULL, NULL, 0, NULL},
};

int fs_py_init_store(PyObject *module)
{
    if (fs_py_add_type(module, &ServerType, "StoreServer") < 0 ||
        PyModule_AddFunctions(module, store_functions) < 0 ||
        PyModule_AddIntConstant(module, "STORE_MAX_KEY", FS_STORE_MAX_KEY) < 0 ||
        PyModule_AddIntConstant(module, "STORE_MAX_KEYS", FS_STORE_MAX_KEYS) < 0 ||
        PyModule_AddIntConstant(module, "STORE_DEFAULT_MAX_VALUE",
                                (long)FS_STORE_DEFAULT_MAX_VALUE) < 0)
        return -1;
    return 0;
}
