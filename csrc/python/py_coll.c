/*
 * py_coll.c - CPython binding of the shared-memory collectives (comm.c, reduce.c):
 * the _C.Comm type, dtype / op / kind codes and a few helpers.
 *
 * Python passes raw addresses (tensor.data_ptr()), element counts and codes; the
 * caller keeps the memory alive until the collective completes. Every call that
 * can block (create, run, wait, close) releases the GIL.
 */
#include "fs_py.h"

#include <string.h>
#include <time.h>

typedef struct {
    PyObject_HEAD
    fs_comm_t *comm;
    int busy; /* calls in progress with the GIL released (changed with the GIL held) */
} CommObject;

static int comm_check_open(CommObject *self)
{
    if (self->comm == NULL) {
        PyErr_SetString(PyExc_ValueError, "the communicator was closed");
        return -1;
    }
    return 0;
}

/* "auto" / None, "memfd", "named" -> enum fs_shm_kind. */
static int parse_shm_kind(const char *v, int *kind)
{
    if (v == NULL || strcmp(v, "auto") == 0)
        *kind = FS_SHM_AUTO;
    else if (strcmp(v, "memfd") == 0)
        *kind = FS_SHM_MEMFD;
    else if (strcmp(v, "named") == 0)
        *kind = FS_SHM_NAMED;
    else {
        PyErr_Format(PyExc_ValueError, "shm must be 'auto', 'memfd' or 'named', not '%s'", v);
        return -1;
    }
    return 0;
}

/* Comm(handle, rank, world_size, ...): rank 0 passes None and creates, the others open. */
static PyObject *Comm_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"handle",          "rank",       "world_size",  "timeout",
                             "connect_timeout", "slot_bytes", "oneshot_max", "spin_ns",
                             "yield_ns",        "worker",     "shm",         NULL};
    const char *handle, *shm = NULL;
    int rank, world, worker = 1;
    PyObject *timeout = Py_None, *connect_timeout = Py_None;
    Py_ssize_t slot_bytes = 0, oneshot_max = 0;
    long long spin_ns = -1, yield_ns = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "zii|$OOnnLLpz", kwlist, &handle, &rank, &world,
                                     &timeout, &connect_timeout, &slot_bytes, &oneshot_max,
                                     &spin_ns, &yield_ns, &worker, &shm))
        return NULL;
    if (slot_bytes < 0 || oneshot_max < 0) {
        PyErr_SetString(PyExc_ValueError, "slot_bytes and oneshot_max must be >= 0");
        return NULL;
    }
    if ((rank == 0) != (handle == NULL)) {
        PyErr_SetString(PyExc_ValueError,
                        "rank 0 passes handle=None (it creates the segment); the others pass "
                        "rank 0's Comm.handle");
        return NULL;
    }
    fs_comm_opts_t opts;
    fs_comm_opts_init(&opts);
    /* None: the C defaults (0); math.inf: no limit (the deadline saturates). */
    if (fs_py_timeout_ms(timeout, "timeout", 0, INT64_MAX, 1, &opts.timeout_ms) < 0 ||
        fs_py_timeout_ms(connect_timeout, "connect_timeout", 0, INT64_MAX, 1,
                         &opts.connect_timeout_ms) < 0 ||
        parse_shm_kind(shm, &opts.shm) < 0)
        return NULL;
    opts.slot_bytes = (size_t)slot_bytes;
    opts.oneshot_max = (size_t)oneshot_max;
    opts.spin_ns = spin_ns;
    opts.yield_ns = yield_ns;
    opts.no_worker = !worker;
    CommObject *self = (CommObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    fs_error_t err;
    fs_error_clear(&err);
    PyThreadState *ts = PyEval_SaveThread();
    int rc = handle == NULL ? fs_comm_create(world, &opts, &self->comm, &err)
                            : fs_comm_open(handle, rank, world, &opts, &self->comm, &err);
    PyEval_RestoreThread(ts);
    if (rc != FS_OK) {
        Py_DECREF(self);
        return fs_py_raise(&err);
    }
    return (PyObject *)self;
}

static void comm_close(CommObject *self)
{
    fs_comm_t *c = self->comm;
    self->comm = NULL;
    if (c == NULL)
        return;
    PyThreadState *ts = PyEval_SaveThread();
    fs_comm_shutdown_waiters(c);
    fs_comm_destroy(c);
    PyEval_RestoreThread(ts);
}

static void Comm_dealloc(CommObject *self)
{
    comm_close(self); /* nobody else holds a reference, so nothing is busy */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* close(): wake waiters, let queued collectives finish, unmap. Idempotent. */
static PyObject *Comm_close(CommObject *self, PyObject *Py_UNUSED(ignored))
{
    fs_comm_t *c = self->comm;
    if (c != NULL) {
        fs_comm_shutdown_waiters(c); /* only takes the queue lock */
        /* Other threads still inside wait()/run() must leave before the memory goes. */
        while (self->busy > 0 && self->comm != NULL) {
            PyThreadState *ts = PyEval_SaveThread();
            struct timespec pause = {0, 1000000};
            (void)nanosleep(&pause, NULL); /* EINTR only shortens the pause */
            PyEval_RestoreThread(ts);
        }
        comm_close(self);
    }
    Py_RETURN_NONE;
}

/* One blocking call on the communicator, with the GIL released: what join, run and wait
   share. `busy` counts it, so that close() waits for it before the memory goes. */
enum blocking_call { CALL_JOIN, CALL_RUN, CALL_WAIT };

struct blocking_args {
    const fs_coll_args_t *coll; /* CALL_RUN */
    uint64_t ticket;            /* CALL_WAIT */
    int64_t timeout_ms;
};

static PyObject *call_blocking(CommObject *self, enum blocking_call what,
                               const struct blocking_args *a)
{
    fs_error_t err;
    fs_error_clear(&err);
    fs_comm_t *c = self->comm;
    int rc;
    self->busy++;
    PyThreadState *ts = PyEval_SaveThread();
    switch (what) {
    case CALL_JOIN: rc = fs_comm_join(c, &err); break;
    case CALL_RUN: rc = fs_comm_run(c, a->coll, &err); break;
    default: rc = fs_comm_wait(c, a->ticket, a->timeout_ms, &err); break;
    }
    PyEval_RestoreThread(ts);
    self->busy--;
    if (rc != FS_OK)
        return fs_py_raise(&err);
    Py_RETURN_NONE;
}

/* join(): wait until every rank joined. */
static PyObject *Comm_join(CommObject *self, PyObject *Py_UNUSED(ignored))
{
    if (comm_check_open(self) < 0)
        return NULL;
    return call_blocking(self, CALL_JOIN, NULL);
}

/* Parse (kind, dtype, op, root, send_ptr, recv_ptr, count) into args. */
static int parse_coll(PyObject *args, fs_coll_args_t *a)
{
    unsigned long long send, recv;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "iiiiKKn", &a->kind, &a->dtype, &a->op, &a->root, &send, &recv,
                          &count))
        return -1;
    if (count < 0) {
        PyErr_Format(PyExc_ValueError, "element count must be >= 0, got %zd", count);
        return -1;
    }
    if (a->kind < 0 || a->kind >= FS_COLL_KIND_COUNT) {
        PyErr_Format(PyExc_ValueError, "unknown collective kind %d", a->kind);
        return -1;
    }
    if (a->kind != FS_COLL_BARRIER && fs_dtype_size(a->dtype) == 0) {
        PyErr_Format(PyExc_TypeError, "unknown dtype code %d", a->dtype);
        return -1;
    }
    a->send = (const void *)(uintptr_t)send;
    a->recv = (void *)(uintptr_t)recv;
    a->count = (size_t)count;
    return 0;
}

/* run(kind, dtype, op, root, send_ptr, recv_ptr, count): one collective, blocking. */
static PyObject *Comm_run(CommObject *self, PyObject *args)
{
    fs_coll_args_t a;
    if (comm_check_open(self) < 0 || parse_coll(args, &a) < 0)
        return NULL;
    struct blocking_args b = {.coll = &a};
    return call_blocking(self, CALL_RUN, &b);
}

/* submit(kind, dtype, op, root, send_ptr, recv_ptr, count) -> ticket (runs on the worker). */
static PyObject *Comm_submit(CommObject *self, PyObject *args)
{
    fs_coll_args_t a;
    if (comm_check_open(self) < 0 || parse_coll(args, &a) < 0)
        return NULL;
    fs_error_t err;
    fs_error_clear(&err);
    uint64_t ticket = 0;
    /* Only takes the queue lock: no need to drop the GIL. */
    if (fs_comm_submit(self->comm, &a, &ticket, &err) != FS_OK)
        return fs_py_raise(&err);
    return PyLong_FromUnsignedLongLong(ticket);
}

/* wait(ticket, timeout=None): block until the ticket completed; raise its error. */
static PyObject *Comm_wait(CommObject *self, PyObject *args)
{
    unsigned long long ticket;
    PyObject *timeout = Py_None;
    if (!PyArg_ParseTuple(args, "K|O", &ticket, &timeout) || comm_check_open(self) < 0)
        return NULL;
    struct blocking_args b = {.ticket = (uint64_t)ticket, .timeout_ms = -1};
    /* None and math.inf: no limit */
    if (fs_py_timeout_ms(timeout, "timeout", -1, -1, 0, &b.timeout_ms) < 0)
        return NULL;
    return call_blocking(self, CALL_WAIT, &b);
}

static PyObject *Comm_completed(CommObject *self, PyObject *Py_UNUSED(ignored))
{
    if (comm_check_open(self) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(fs_comm_completed(self->comm));
}

static PyObject *Comm_shutdown_waiters(CommObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->comm != NULL)
        fs_comm_shutdown_waiters(self->comm);
    Py_RETURN_NONE;
}

static PyObject *Comm_abort(CommObject *self, PyObject *args)
{
    const char *reason = "aborted from Python";
    if (!PyArg_ParseTuple(args, "|s", &reason) || comm_check_open(self) < 0)
        return NULL;
    fs_comm_abort(self->comm, reason);
    Py_RETURN_NONE;
}

/* status() -> None while usable, else (status name, message). */
static PyObject *Comm_status(CommObject *self, PyObject *Py_UNUSED(ignored))
{
    if (comm_check_open(self) < 0)
        return NULL;
    fs_error_t why;
    int rc = fs_comm_status(self->comm, &why);
    if (rc == FS_OK)
        Py_RETURN_NONE;
    return Py_BuildValue("(ss)", fs_status_name(rc), why.msg);
}

static PyObject *Comm_get_rank(CommObject *self, void *Py_UNUSED(closure))
{
    if (comm_check_open(self) < 0)
        return NULL;
    return PyLong_FromLong(fs_comm_rank(self->comm));
}

static PyObject *Comm_get_world_size(CommObject *self, void *Py_UNUSED(closure))
{
    if (comm_check_open(self) < 0)
        return NULL;
    return PyLong_FromLong(fs_comm_world_size(self->comm));
}

static PyObject *Comm_get_handle(CommObject *self, void *Py_UNUSED(closure))
{
    if (comm_check_open(self) < 0)
        return NULL;
    return PyUnicode_FromString(fs_comm_handle(self->comm));
}

static PyObject *Comm_get_closed(CommObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->comm == NULL);
}

static PyMethodDef Comm_methods[] = {
    {"join", (PyCFunction)Comm_join, METH_NOARGS,
     "join(): wait until every rank joined (TimeoutError, or ConnectionError-like errors "
     "naming the rank that died); needed before any collective"},
    {"run", (PyCFunction)Comm_run, METH_VARARGS,
     "run(kind, dtype, op, root, send_ptr, recv_ptr, count): one collective, blocking "
     "(after the queued ones)"},
    {"submit", (PyCFunction)Comm_submit, METH_VARARGS,
     "submit(kind, dtype, op, root, send_ptr, recv_ptr, count) -> ticket; runs on the worker"},
    {"wait", (PyCFunction)Comm_wait, METH_VARARGS,
     "wait(ticket, timeout=None): until the ticket completed; raises its error "
     "(TimeoutError if still running, ConnectionError once closing)"},
    {"completed", (PyCFunction)Comm_completed, METH_NOARGS, "highest completed ticket"},
    {"shutdown_waiters", (PyCFunction)Comm_shutdown_waiters, METH_NOARGS,
     "make wait() on tickets not yet submitted raise ConnectionError"},
    {"abort", (PyCFunction)Comm_abort, METH_VARARGS,
     "abort(reason): fail every pending and later collective on every rank"},
    {"status", (PyCFunction)Comm_status, METH_NOARGS,
     "None while usable, else (status name, message)"},
    {"close", (PyCFunction)Comm_close, METH_NOARGS,
     "let queued collectives finish, then leave the communicator"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Comm_getset[] = {
    {"rank", (getter)Comm_get_rank, NULL, "this rank", NULL},
    {"world_size", (getter)Comm_get_world_size, NULL, "number of ranks", NULL},
    {"closed", (getter)Comm_get_closed, NULL, "True after close()", NULL},
    {"handle", (getter)Comm_get_handle, NULL,
     "rank 0's handle of the segment: what the other ranks pass to Comm()", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CommType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastspawn._C.Comm",
    .tp_basicsize = sizeof(CommObject),
    .tp_dealloc = (destructor)Comm_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Comm(handle, rank, world_size, *, timeout=None, connect_timeout=None, "
              "slot_bytes=0, oneshot_max=0, spin_ns=-1, yield_ns=-1, worker=True, shm='auto'): "
              "a shared-memory communicator of the ranks of one machine. Rank 0 passes "
              "handle=None and creates the segment (shm: 'memfd', 'named', or 'auto': "
              "$FASTSPAWN_SHM, else memfd); the others pass rank 0's .handle; then every "
              "rank calls join().",
    .tp_methods = Comm_methods,
    .tp_getset = Comm_getset,
    .tp_new = Comm_new,
};

static PyObject *py_reduce_isa(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    return PyUnicode_FromString(fs_reduce_isa());
}

static PyObject *py_reduce_supported(PyObject *Py_UNUSED(m), PyObject *args)
{
    int dtype, op;
    if (!PyArg_ParseTuple(args, "ii", &dtype, &op))
        return NULL;
    return PyBool_FromLong(fs_reduce_supported(dtype, op));
}

static PyMethodDef coll_functions[] = {
    {"reduce_isa", py_reduce_isa, METH_NOARGS,
     "reduce_isa() -> the reduction kernels' instruction set ('avx512f', 'avx2', 'default')"},
    {"reduce_supported", py_reduce_supported, METH_VARARGS,
     "reduce_supported(dtype, op) -> whether the reduce op is defined for the dtype"},
    {NULL, NULL, 0, NULL},
};

int fs_py_init_coll(PyObject *module)
{
    if (fs_py_add_type(module, &CommType, "Comm") < 0 ||
        PyModule_AddFunctions(module, coll_functions) < 0)
        return -1;
    static const struct {
        const char *name;
        int value;
    } consts[] = {
        {"DTYPE_FLOAT32", FS_FLOAT32},
        {"DTYPE_FLOAT64", FS_FLOAT64},
        {"DTYPE_FLOAT16", FS_FLOAT16},
        {"DTYPE_BFLOAT16", FS_BFLOAT16},
        {"DTYPE_INT8", FS_INT8},
        {"DTYPE_UINT8", FS_UINT8},
        {"DTYPE_INT32", FS_INT32},
        {"DTYPE_INT64", FS_INT64},
        {"DTYPE_BOOL", FS_BOOL},
        {"OP_SUM", FS_SUM},
        {"OP_AVG", FS_AVG},
        {"OP_MIN", FS_MIN},
        {"OP_MAX", FS_MAX},
        {"OP_PRODUCT", FS_PRODUCT},
        {"OP_BAND", FS_BAND},
        {"OP_BOR", FS_BOR},
        {"OP_BXOR", FS_BXOR},
        {"COLL_ALLREDUCE", FS_COLL_ALLREDUCE},
        {"COLL_BROADCAST", FS_COLL_BROADCAST},
        {"COLL_ALLGATHER", FS_COLL_ALLGATHER},
        {"COLL_REDUCE_SCATTER", FS_COLL_REDUCE_SCATTER},
        {"COLL_REDUCE", FS_COLL_REDUCE},
        {"COLL_GATHER", FS_COLL_GATHER},
        {"COLL_SCATTER", FS_COLL_SCATTER},
        {"COLL_ALLTOALL", FS_COLL_ALLTOALL},
        {"COLL_BARRIER", FS_COLL_BARRIER},
    };
    for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++) {
        if (PyModule_AddIntConstant(module, consts[i].name, consts[i].value) < 0)
            return -1;
    }
    return 0;
}
