/*
 * py_nccl.c - CPython binding of the CUDA/NCCL layer (fastspawn/nccl.h):
 * _C.NcclComm, _C.NcclWork and the loader functions.
 *
 * Python passes device pointers (tensor.data_ptr()), element counts, dtype /
 * op / kind codes and stream handles (torch.cuda.Stream.cuda_stream) as ints;
 * the caller keeps the memory alive until the work completes. Every call that
 * can block (loading, init, enqueue, waits, close) releases the GIL.
 * Nothing here loads CUDA or NCCL at import: nccl_load / cuda_load do.
 */
#include "fs_py.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

#include "fastspawn/nccl.h"

/* A library or device that is not there is a RuntimeError (not fs_py_raise's KeyError). */
static PyObject *nccl_raise(const fs_error_t *err)
{
    if (err->code == FS_ENOTFOUND) {
        PyErr_SetString(PyExc_RuntimeError, err->msg);
        return NULL;
    }
    return fs_py_raise(err);
}

/* Seconds (None: the default, 0 here) to milliseconds. */
static int seconds_to_ms(PyObject *obj, int64_t *out)
{
    *out = 0;
    if (obj == NULL || obj == Py_None)
        return 0;
    double s = PyFloat_AsDouble(obj);
    if (s == -1.0 && PyErr_Occurred())
        return -1;
    if (!(s >= 0.0)) {
        PyErr_Format(PyExc_ValueError, "timeouts must be None or >= 0 seconds, got %R", obj);
        return -1;
    }
    *out = s > 1e12 ? (int64_t)1e15 : (int64_t)(s * 1000.0 + 0.5);
    return 0;
}

/* The one optional argument `timeout` (seconds, None: -1 for "no limit of the caller's"). */
static int parse_timeout(PyObject *args, PyObject *kwds, int64_t *ms)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *timeout = Py_None;
    *ms = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O", kwlist, &timeout))
        return -1;
    if (timeout == Py_None)
        return 0;
    return seconds_to_ms(timeout, ms);
}

/* ------------------------------------------------------------------ */
/* Loading                                                            */
/* ------------------------------------------------------------------ */

/* A sequence of str/bytes/os.PathLike into a NULL-free array of C strings (kept in *keep). */
static int parse_dirs(PyObject *seq, const char ***dirs, Py_ssize_t *n, PyObject **keep)
{
    *dirs = NULL;
    *n = 0;
    *keep = PySequence_Fast(seq, "dirs must be a sequence of paths");
    if (*keep == NULL)
        return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(*keep);
    PyObject *encoded = PyList_New(len); /* owns the bytes objects */
    const char **out = PyMem_Calloc((size_t)len + 1, sizeof *out);
    if (encoded == NULL || out == NULL)
        goto error;
    for (Py_ssize_t i = 0; i < len; i++) {
        PyObject *b = NULL;
        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(*keep, i), &b))
            goto error;
        PyList_SET_ITEM(encoded, i, b);
        out[i] = PyBytes_AS_STRING(b);
    }
    Py_SETREF(*keep, encoded);
    *dirs = out;
    *n = len;
    return 0;
error:
    Py_XDECREF(encoded);
    PyMem_Free(out);
    Py_CLEAR(*keep);
    return -1;
}

/* The loader's message with the full search list (fs_error_t holds only its start). */
static PyObject *raise_load_error(const fs_error_t *err, const char *report)
{
    const char *cut = strstr(err->msg, "Searched:");
    if (err->code != FS_ENOTFOUND || cut == NULL || report == NULL)
        return nccl_raise(err);
    char head[FS_ERRMSG_LEN];
    snprintf(head, sizeof head, "%.*s", (int)(cut - err->msg + 9), err->msg);
    PyErr_Format(PyExc_RuntimeError, "%s%s", head, report); /* Python's format lacks %.*s */
    return NULL;
}

typedef int (*load_fn)(const char *const *, size_t, fs_error_t *);

static PyObject *load_with(PyObject *args, PyObject *kwds, load_fn load,
                           const char *(*report)(void))
{
    static char *kwlist[] = {"dirs", NULL};
    PyObject *seq = NULL, *keep = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O", kwlist, &seq))
        return NULL;
    const char **dirs = NULL;
    Py_ssize_t n = 0;
    if (seq != NULL && parse_dirs(seq, &dirs, &n, &keep) < 0)
        return NULL;
    fs_error_t err;
    fs_error_clear(&err);
    PyThreadState *ts = PyEval_SaveThread();
    int rc = load(dirs, (size_t)n, &err);
    PyEval_RestoreThread(ts);
    PyMem_Free(dirs);
    Py_XDECREF(keep);
    if (rc != FS_OK)
        return raise_load_error(&err, report());
    Py_RETURN_NONE;
}

static PyObject *py_nccl_load(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds)
{
    PyObject *r = load_with(args, kwds, fs_nccl_load, fs_nccl_search_report);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    return PyLong_FromLong(fs_nccl_version());
}

static PyObject *py_cuda_load(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds)
{
    PyObject *r = load_with(args, kwds, fs_cuda_load, fs_cuda_search_report);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    return PyLong_FromLong(fs_cuda_runtime_version());
}

static PyObject *str_or_none(const char *s)
{
    if (s == NULL)
        Py_RETURN_NONE;
    return PyUnicode_DecodeFSDefault(s);
}

/* Module functions that only read what the loader recorded (no GIL release needed). */
#define LOADER_GETTER(name, expr)                                                                  \
    static PyObject *py_##name(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))                     \
    {                                                                                              \
        return expr;                                                                               \
    }
LOADER_GETTER(nccl_version, PyLong_FromLong(fs_nccl_version()))
LOADER_GETTER(nccl_caps, PyLong_FromUnsignedLong(fs_nccl_caps()))
LOADER_GETTER(nccl_library_path, str_or_none(fs_nccl_library_path()))
LOADER_GETTER(cuda_library_path, str_or_none(fs_cuda_library_path()))
LOADER_GETTER(nccl_search_report, str_or_none(fs_nccl_search_report()))
LOADER_GETTER(cuda_search_report, str_or_none(fs_cuda_search_report()))

static PyObject *py_cuda_device_count(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    int n = 0;
    fs_error_t err;
    fs_error_clear(&err);
    PyThreadState *ts = PyEval_SaveThread();
    int rc = fs_cuda_device_count(&n, &err);
    PyEval_RestoreThread(ts);
    if (rc != FS_OK)
        return nccl_raise(&err);
    return PyLong_FromLong(n);
}

static PyObject *py_nccl_get_unique_id(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    unsigned char id[FS_NCCL_UNIQUE_ID_BYTES];
    fs_error_t err;
    fs_error_clear(&err);
    PyThreadState *ts = PyEval_SaveThread();
    int rc = fs_nccl_get_unique_id(id, &err);
    PyEval_RestoreThread(ts);
    if (rc != FS_OK)
        return nccl_raise(&err);
    return PyBytes_FromStringAndSize((const char *)id, sizeof id);
}

/* ------------------------------------------------------------------ */
/* NcclWork                                                           */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    fs_nccl_work_t *work;
} NcclWorkObject;

static PyTypeObject NcclWorkType;

static PyObject *work_wrap(fs_nccl_work_t *w)
{
    if (w == NULL)
        Py_RETURN_NONE;
    NcclWorkObject *self = PyObject_New(NcclWorkObject, &NcclWorkType);
    if (self == NULL) {
        fs_nccl_work_release(w);
        return NULL;
    }
    self->work = w;
    return (PyObject *)self;
}

static void NcclWork_dealloc(NcclWorkObject *self)
{
    fs_nccl_work_release(self->work); /* takes the comm lock only briefly */
    PyObject_Free(self);
}

static PyObject *NcclWork_query(NcclWorkObject *self, PyObject *Py_UNUSED(a))
{
    int done = 0;
    fs_error_t err;
    fs_error_clear(&err);
    PyThreadState *ts = PyEval_SaveThread();
    int rc = fs_nccl_work_query(self->work, &done, &err);
    PyEval_RestoreThread(ts);
    if (rc != FS_OK)
        return nccl_raise(&err);
    return PyBool_FromLong(done);
}

static PyObject *NcclWork_synchronize(NcclWorkObject *self, PyObject *args, PyObject *kwds)
{
    int64_t ms = -1;
    if (parse_timeout(args, kwds, &ms) < 0)
        return NULL;
    fs_error_t err;
    fs_error_clear(&err);
    PyThreadState *ts = PyEval_SaveThread();
    int rc = fs_nccl_work_synchronize(self->work, ms, &err);
    PyEval_RestoreThread(ts);
    if (rc != FS_OK)
        return nccl_raise(&err);
    Py_RETURN_NONE;
}

static PyObject *NcclWork_wait_stream(NcclWorkObject *self, PyObject *args)
{
    unsigned long long stream = 0;
    if (!PyArg_ParseTuple(args, "K", &stream))
        return NULL;
    fs_error_t err;
    fs_error_clear(&err);
    PyThreadState *ts = PyEval_SaveThread();
    int rc = fs_nccl_work_wait_stream(self->work, (uintptr_t)stream, &err);
    PyEval_RestoreThread(ts);
    if (rc != FS_OK)
        return nccl_raise(&err);
    Py_RETURN_NONE;
}

static PyObject *NcclWork_get_seq(NcclWorkObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(fs_nccl_work_seq(self->work));
}

static PyMethodDef NcclWork_methods[] = {
    {"query", (PyCFunction)NcclWork_query, METH_NOARGS,
     "query() -> True once done on the device; raises the communicator's error"},
    {"synchronize", (PyCFunction)(void (*)(void))NcclWork_synchronize, METH_VARARGS | METH_KEYWORDS,
     "synchronize(timeout=None): block the host until done (TimeoutError after timeout; "
     "None: until the work's own deadline, when the watchdog fails it)"},
    {"wait_stream", (PyCFunction)NcclWork_wait_stream, METH_VARARGS,
     "wait_stream(stream): make the stream wait for the work, without blocking the host"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef NcclWork_getset[] = {
    {"seq", (getter)NcclWork_get_seq, NULL, "the work's sequence number", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject NcclWorkType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastspawn._C.NcclWork",
    .tp_basicsize = sizeof(NcclWorkObject),
    .tp_dealloc = (destructor)NcclWork_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One enqueued NCCL collective (or group), from NcclComm.run / group_end.",
    .tp_methods = NcclWork_methods,
    .tp_getset = NcclWork_getset,
};

/* ------------------------------------------------------------------ */
/* NcclComm                                                           */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    fs_nccl_comm_t *comm;
    int busy; /* calls in progress with the GIL released (changed with the GIL held) */
} NcclCommObject;

static int comm_check_open(NcclCommObject *self)
{
    if (self->comm == NULL) {
        PyErr_SetString(PyExc_ValueError, "the NCCL communicator was closed");
        return -1;
    }
    return 0;
}

static PyObject *NcclComm_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {
        "unique_id",         "rank",          "world_size",    "device", "timeout", "init_timeout",
        "watchdog_interval", "blocking_init", "high_priority", NULL};
    Py_buffer id;
    int rank, world, device, blocking = 0, high = 0;
    PyObject *timeout = Py_None, *init_timeout = Py_None, *poll = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*iii|$OOOpp", kwlist, &id, &rank, &world,
                                     &device, &timeout, &init_timeout, &poll, &blocking, &high))
        return NULL;
    fs_nccl_comm_opts_t o;
    fs_nccl_comm_opts_init(&o);
    o.blocking_init = blocking;
    o.high_priority_stream = high;
    NcclCommObject *self = NULL;
    if (id.len != FS_NCCL_UNIQUE_ID_BYTES) {
        PyErr_Format(PyExc_ValueError, "unique_id must be %d bytes, got %zd",
                     FS_NCCL_UNIQUE_ID_BYTES, id.len);
        goto out;
    }
    if (seconds_to_ms(timeout, &o.timeout_ms) < 0 ||
        seconds_to_ms(init_timeout, &o.init_timeout_ms) < 0 ||
        seconds_to_ms(poll, &o.watchdog_poll_ms) < 0)
        goto out;
    self = (NcclCommObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        goto out;
    fs_error_t err;
    fs_error_clear(&err);
    PyThreadState *ts = PyEval_SaveThread();
    int rc = fs_nccl_comm_create(id.buf, rank, world, device, &o, &self->comm, &err);
    PyEval_RestoreThread(ts);
    if (rc != FS_OK) {
        Py_CLEAR(self);
        nccl_raise(&err);
    }
out:
    PyBuffer_Release(&id);
    return (PyObject *)self;
}

/* Leave (fs_nccl_comm_destroy) with the GIL released; idempotent. */
static int comm_close(NcclCommObject *self, int64_t timeout_ms, fs_error_t *err)
{
    fs_nccl_comm_t *c = self->comm;
    self->comm = NULL;
    if (c == NULL)
        return FS_OK;
    PyThreadState *ts = PyEval_SaveThread();
    int rc = fs_nccl_comm_destroy(c, timeout_ms, err);
    PyEval_RestoreThread(ts);
    return rc;
}

/* Dropped without close(): a bounded wait, then abort (as torch's ProcessGroupNCCL does), so
 * a garbage collection never waits for a stuck work's 30-minute deadline. */
#define DEALLOC_WAIT_MS 10000

static void NcclComm_dealloc(NcclCommObject *self)
{
    fs_error_t err;
    (void)comm_close(self, DEALLOC_WAIT_MS, &err); /* nobody else holds a reference: not busy */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *NcclComm_close(NcclCommObject *self, PyObject *args, PyObject *kwds)
{
    int64_t ms = -1;
    if (parse_timeout(args, kwds, &ms) < 0)
        return NULL;
    /* Other threads still inside a call must leave before the communicator goes. */
    while (self->busy > 0 && self->comm != NULL) {
        PyThreadState *ts = PyEval_SaveThread();
        struct timespec pause = {0, 1000000};
        (void)nanosleep(&pause, NULL); /* EINTR only shortens the pause */
        PyEval_RestoreThread(ts);
    }
    fs_error_t err;
    fs_error_clear(&err);
    if (comm_close(self, ms, &err) != FS_OK)
        return nccl_raise(&err);
    Py_RETURN_NONE;
}

/* A sequence of world_size non-negative ints into a size_t array (PyMem). */
static int parse_counts(PyObject *obj, Py_ssize_t n, size_t **out)
{
    *out = NULL;
    if (obj == Py_None)
        return 0;
    PyObject *seq = PySequence_Fast(obj, "counts and displacements must be sequences of ints");
    if (seq == NULL)
        return -1;
    int rc = -1;
    if (PySequence_Fast_GET_SIZE(seq) != n) {
        PyErr_Format(PyExc_ValueError, "expected %zd counts (one per rank), got %zd", n,
                     PySequence_Fast_GET_SIZE(seq));
        goto out;
    }
    *out = PyMem_Calloc((size_t)n + 1, sizeof **out);
    if (*out == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        size_t v = PyLong_AsSize_t(PySequence_Fast_GET_ITEM(seq, i));
        if (v == (size_t)-1 && PyErr_Occurred())
            goto out;
        (*out)[i] = v;
    }
    rc = 0;
out:
    Py_DECREF(seq);
    if (rc < 0) {
        PyMem_Free(*out);
        *out = NULL;
    }
    return rc;
}

typedef struct {
    fs_nccl_args_t a;
    size_t *counts[4];
} run_args_t;

static void run_args_free(run_args_t *r)
{
    for (int i = 0; i < 4; i++)
        PyMem_Free(r->counts[i]);
}

static int parse_run(NcclCommObject *self, PyObject *args, PyObject *kwds, run_args_t *r, int *sync)
{
    static char *kwlist[] = {
        "kind",        "dtype",       "count",       "send",          "recv",
        "op",          "root",        "stream",      "sync",          "send_counts",
        "send_displs", "recv_counts", "recv_displs", "premul_scalar", "premul_scalar_on_device",
        NULL};
    memset(r, 0, sizeof *r);
    Py_ssize_t count = 0;
    unsigned long long send = 0, recv = 0, stream = 0, scalar = 0;
    PyObject *lists[4] = {Py_None, Py_None, Py_None, Py_None};
    int on_device = 0;
    *sync = 0;
    /* The common arguments positional too: the hot path passes them so, and a positional parse
     * is the cheaper one. */
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iin|KKiiKp$OOOOKp", kwlist, &r->a.kind,
                                     &r->a.dtype, &count, &send, &recv, &r->a.op, &r->a.root,
                                     &stream, sync, &lists[0], &lists[1], &lists[2], &lists[3],
                                     &scalar, &on_device))
        return -1;
    if (count < 0) {
        PyErr_Format(PyExc_ValueError, "element count must be >= 0, got %zd", count);
        return -1;
    }
    Py_ssize_t world = fs_nccl_comm_world_size(self->comm);
    for (int i = 0; i < 4; i++)
        if (parse_counts(lists[i], world, &r->counts[i]) < 0) {
            run_args_free(r);
            return -1;
        }
    r->a.count = (size_t)count;
    r->a.send = (const void *)(uintptr_t)send;
    r->a.recv = (void *)(uintptr_t)recv;
    r->a.stream = (uintptr_t)stream;
    r->a.send_counts = r->counts[0], r->a.send_displs = r->counts[1];
    r->a.recv_counts = r->counts[2], r->a.recv_displs = r->counts[3];
    r->a.premul_scalar = (const void *)(uintptr_t)scalar;
    r->a.premul_scalar_on_device = on_device;
    return 0;
}

/*
 * run(kind, dtype, count, send=0, recv=0, op=0, root=0, stream=0, sync=False, *, ...)
 *   -> NcclWork (None in a group, or with sync)
 * sync: also make `stream` wait for the work (fs_nccl_work_wait_stream) and drop it, in the
 * same call: async_op=False without a Python object or a second trip into C.
 */
static PyObject *NcclComm_run(NcclCommObject *self, PyObject *args, PyObject *kwds)
{
    run_args_t r;
    int sync = 0;
    if (comm_check_open(self) < 0 || parse_run(self, args, kwds, &r, &sync) < 0)
        return NULL;
    fs_nccl_work_t *w = NULL;
    fs_error_t err;
    fs_error_clear(&err);
    fs_nccl_comm_t *c = self->comm;
    self->busy++;
    PyThreadState *ts = PyEval_SaveThread();
    int rc = fs_nccl_run(c, &r.a, &w, &err);
    if (rc == FS_OK && sync && w != NULL) {
        rc = fs_nccl_work_wait_stream(w, r.a.stream, &err);
        fs_nccl_work_release(w);
        w = NULL;
    }
    PyEval_RestoreThread(ts);
    self->busy--;
    run_args_free(&r);
    if (rc != FS_OK)
        return nccl_raise(&err);
    return work_wrap(w);
}

static PyObject *NcclComm_group_start(NcclCommObject *self, PyObject *Py_UNUSED(a))
{
    if (comm_check_open(self) < 0)
        return NULL;
    fs_error_t err;
    fs_error_clear(&err);
    fs_nccl_comm_t *c = self->comm;
    self->busy++;
    PyThreadState *ts = PyEval_SaveThread();
    int rc = fs_nccl_group_start(c, &err);
    PyEval_RestoreThread(ts);
    self->busy--;
    if (rc != FS_OK)
        return nccl_raise(&err);
    Py_RETURN_NONE;
}

static PyObject *NcclComm_group_end(NcclCommObject *self, PyObject *Py_UNUSED(a))
{
    if (comm_check_open(self) < 0)
        return NULL;
    fs_nccl_work_t *w = NULL;
    fs_error_t err;
    fs_error_clear(&err);
    fs_nccl_comm_t *c = self->comm;
    self->busy++;
    PyThreadState *ts = PyEval_SaveThread();
    int rc = fs_nccl_group_end(c, &w, &err);
    PyEval_RestoreThread(ts);
    self->busy--;
    if (rc != FS_OK)
        return nccl_raise(&err);
    return work_wrap(w);
}

static PyObject *NcclComm_abort(NcclCommObject *self, PyObject *args)
{
    const char *reason = "aborted from Python";
    if (!PyArg_ParseTuple(args, "|s", &reason) || comm_check_open(self) < 0)
        return NULL;
    fs_nccl_comm_t *c = self->comm;
    self->busy++;
    PyThreadState *ts = PyEval_SaveThread();
    fs_nccl_comm_abort(c, reason);
    PyEval_RestoreThread(ts);
    self->busy--;
    Py_RETURN_NONE;
}

/* status() -> None while usable, else (status name, message). */
static PyObject *NcclComm_status(NcclCommObject *self, PyObject *Py_UNUSED(a))
{
    if (comm_check_open(self) < 0)
        return NULL;
    fs_error_t why;
    fs_error_clear(&why);
    int rc = fs_nccl_comm_status(self->comm, &why);
    if (rc == FS_OK)
        Py_RETURN_NONE;
    return Py_BuildValue("(ss)", fs_status_name(rc), why.msg);
}

#define COMM_GETTER(name, expr)                                                                    \
    static PyObject *NcclComm_get_##name(NcclCommObject *self, void *Py_UNUSED(c))                 \
    {                                                                                              \
        if (comm_check_open(self) < 0)                                                             \
            return NULL;                                                                           \
        return expr;                                                                               \
    }
COMM_GETTER(rank, PyLong_FromLong(fs_nccl_comm_rank(self->comm)))
COMM_GETTER(world_size, PyLong_FromLong(fs_nccl_comm_world_size(self->comm)))
COMM_GETTER(device, PyLong_FromLong(fs_nccl_comm_device(self->comm)))
COMM_GETTER(stream, PyLong_FromUnsignedLongLong(fs_nccl_comm_stream(self->comm)))
COMM_GETTER(seq, PyLong_FromUnsignedLongLong(fs_nccl_comm_seq(self->comm)))
COMM_GETTER(nonblocking, PyBool_FromLong(fs_nccl_comm_nonblocking(self->comm)))

static PyObject *NcclComm_get_closed(NcclCommObject *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->comm == NULL);
}

static PyMethodDef NcclComm_methods[] = {
    {"run", (PyCFunction)(void (*)(void))NcclComm_run, METH_VARARGS | METH_KEYWORDS,
     "run(kind, dtype, count, send=0, recv=0, op=0, root=0, stream=0, sync=False, *, "
     "send_counts=None, send_displs=None, recv_counts=None, recv_displs=None, premul_scalar=0, "
     "premul_scalar_on_device=False) -> NcclWork, or None inside a group or with sync. "
     "Enqueues after the work already on `stream`; sync: `stream` also waits for the work "
     "(without blocking the host); pointers and counts as ints"},
    {"group_start", (PyCFunction)NcclComm_group_start, METH_NOARGS,
     "group_start(): coalesce the next calls of this thread (ncclGroupStart)"},
    {"group_end", (PyCFunction)NcclComm_group_end, METH_NOARGS,
     "group_end() -> NcclWork of the whole group (None if it was empty)"},
    {"abort", (PyCFunction)NcclComm_abort, METH_VARARGS,
     "abort(reason): ncclCommAbort; pending and later calls fail"},
    {"status", (PyCFunction)NcclComm_status, METH_NOARGS,
     "None while usable, else (status name, message) of the first error"},
    {"close", (PyCFunction)(void (*)(void))NcclComm_close, METH_VARARGS | METH_KEYWORDS,
     "close(timeout=None): wait for outstanding works (None: their own deadlines), finalize, "
     "destroy"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef NcclComm_getset[] = {
    {"rank", (getter)NcclComm_get_rank, NULL, "this rank", NULL},
    {"world_size", (getter)NcclComm_get_world_size, NULL, "number of ranks", NULL},
    {"device", (getter)NcclComm_get_device, NULL, "the CUDA device", NULL},
    {"stream", (getter)NcclComm_get_stream, NULL, "the communication stream (cudaStream_t)", NULL},
    {"seq", (getter)NcclComm_get_seq, NULL, "sequence number of the last collective", NULL},
    {"nonblocking", (getter)NcclComm_get_nonblocking, NULL, "init was non-blocking", NULL},
    {"closed", (getter)NcclComm_get_closed, NULL, "True after close()", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject NcclCommType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastspawn._C.NcclComm",
    .tp_basicsize = sizeof(NcclCommObject),
    .tp_dealloc = (destructor)NcclComm_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "NcclComm(unique_id, rank, world_size, device, *, timeout=None, init_timeout=None, "
              "watchdog_interval=None, blocking_init=False, high_priority=False): an NCCL "
              "communicator with its own stream and watchdog (timeouts in seconds; None: 30 "
              "minutes). Needs nccl_load() and cuda_load() first. Dropped without close(), it "
              "waits up to 10 s for outstanding works, then aborts.",
    .tp_methods = NcclComm_methods,
    .tp_getset = NcclComm_getset,
    .tp_new = NcclComm_new,
};

/* ------------------------------------------------------------------ */
/* Registration                                                       */
/* ------------------------------------------------------------------ */

static PyMethodDef nccl_functions[] = {
    {"nccl_load", (PyCFunction)(void (*)(void))py_nccl_load, METH_VARARGS | METH_KEYWORDS,
     "nccl_load(dirs=()) -> version: load libnccl.so.2 (FASTSPAWN_NCCL_LIBRARY, the copy "
     "already loaded, dirs, the system); RuntimeError listing every place searched"},
    {"cuda_load", (PyCFunction)(void (*)(void))py_cuda_load, METH_VARARGS | METH_KEYWORDS,
     "cuda_load(dirs=()) -> runtime version: load libcudart (same order; "
     "FASTSPAWN_CUDART_LIBRARY); does not initialise CUDA"},
    {"nccl_version", py_nccl_version, METH_NOARGS,
     "nccl_version() -> major * 10000 + minor * 100 + patch, 0 when not loaded"},
    {"nccl_caps", py_nccl_caps, METH_NOARGS, "nccl_caps() -> NCCL_CAP_* bits of the loaded NCCL"},
    {"nccl_library_path", py_nccl_library_path, METH_NOARGS, "path of the loaded NCCL, or None"},
    {"cuda_library_path", py_cuda_library_path, METH_NOARGS,
     "path of the loaded CUDA runtime, or None"},
    {"nccl_search_report", py_nccl_search_report, METH_NOARGS,
     "where the last nccl_load looked and what dlopen said"},
    {"cuda_search_report", py_cuda_search_report, METH_NOARGS,
     "where the last cuda_load looked and what dlopen said"},
    {"cuda_device_count", py_cuda_device_count, METH_NOARGS,
     "cuda_device_count() -> n; RuntimeError with CUDA's reason when there is none"},
    {"nccl_get_unique_id", py_nccl_get_unique_id, METH_NOARGS,
     "nccl_get_unique_id() -> 128 bytes (ncclGetUniqueId) for NcclComm"},
    {NULL, NULL, 0, NULL},
};

static int add_type(PyObject *module, const char *name, PyTypeObject *type)
{
    if (PyType_Ready(type) < 0)
        return -1;
    Py_INCREF(type);
    if (PyModule_AddObject(module, name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

int fs_py_init_nccl(PyObject *module)
{
    if (add_type(module, "NcclComm", &NcclCommType) < 0 ||
        add_type(module, "NcclWork", &NcclWorkType) < 0 ||
        PyModule_AddFunctions(module, nccl_functions) < 0)
        return -1;
    static const struct {
        const char *name;
        int value;
    } consts[] = {
        {"NCCL_UNIQUE_ID_BYTES", FS_NCCL_UNIQUE_ID_BYTES},
        {"NCCL_DTYPE_UINT32", FS_NCCL_UINT32},
        {"NCCL_DTYPE_UINT64", FS_NCCL_UINT64},
        {"NCCL_DTYPE_FLOAT8_E4M3", FS_NCCL_FLOAT8_E4M3},
        {"NCCL_DTYPE_FLOAT8_E5M2", FS_NCCL_FLOAT8_E5M2},
        {"NCCL_OP_PREMUL_SUM", FS_NCCL_PREMUL_SUM},
        {"NCCL_SEND", FS_NCCL_SEND},
        {"NCCL_RECV", FS_NCCL_RECV},
        {"NCCL_ALLTOALLV", FS_NCCL_ALLTOALLV},
        {"NCCL_CAP_ABORT", FS_NCCL_CAP_ABORT},
        {"NCCL_CAP_ASYNC_ERROR", FS_NCCL_CAP_ASYNC_ERROR},
        {"NCCL_CAP_NONBLOCKING", FS_NCCL_CAP_NONBLOCKING},
        {"NCCL_CAP_FINALIZE", FS_NCCL_CAP_FINALIZE},
        {"NCCL_CAP_SPLIT", FS_NCCL_CAP_SPLIT},
        {"NCCL_CAP_PREMUL_SUM", FS_NCCL_CAP_PREMUL_SUM},
        {"NCCL_CAP_AVG", FS_NCCL_CAP_AVG},
        {"NCCL_CAP_BFLOAT16", FS_NCCL_CAP_BFLOAT16},
        {"NCCL_CAP_FLOAT8", FS_NCCL_CAP_FLOAT8},
        {"NCCL_CAP_LAST_ERROR", FS_NCCL_CAP_LAST_ERROR},
    };
    for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++) {
        if (PyModule_AddIntConstant(module, consts[i].name, consts[i].value) < 0)
            return -1;
    }
    return 0;
}
