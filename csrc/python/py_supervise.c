/*
 * py_supervise.c - CPython binding of the supervisor (supervise.c, child.c) and the
 * process's guardian (guardian.c): the _C.Group type and the guardian functions.
 */
#include "fs_py.h"

#include <signal.h>

typedef struct {
    PyObject_HEAD
    fs_group_t *group;
} GroupObject;

static int group_check_open(GroupObject *self)
{
    if (self->group == NULL) {
        PyErr_SetString(PyExc_ValueError, "the process group was closed");
        return -1;
    }
    return 0;
}

static PyObject *Group_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"nprocs", NULL};
    int nprocs;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i", kwlist, &nprocs))
        return NULL;
    GroupObject *self = (GroupObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    fs_error_t err;
    fs_error_clear(&err);
    if (fs_group_new(nprocs, &self->group, &err) < 0) {
        Py_DECREF(self);
        return fs_py_raise(&err);
    }
    return (PyObject *)self;
}

static void Group_dealloc(GroupObject *self)
{
    if (self->group != NULL) {
        Py_BEGIN_ALLOW_THREADS
        fs_group_free(self->group);
        Py_END_ALLOW_THREADS
        self->group = NULL;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* fork(index, new_process_group, death_signal) -> (pid, report_fd):
   (pid > 0, -1) in the parent, (0, write end of the report pipe) in the child. */
static PyObject *Group_fork(GroupObject *self, PyObject *args)
{
    int index, new_pgrp, death_signal;
    if (!PyArg_ParseTuple(args, "ipi", &index, &new_pgrp, &death_signal))
        return NULL;
    if (group_check_open(self) < 0)
        return NULL;
    fs_fork_opts_t opts;
    fs_fork_opts_init(&opts); /* the process guardian needs no guardian_fd: atfork closes it */
    opts.new_process_group = new_pgrp;
    opts.parent_death_signal = death_signal;
    fs_error_t err;
    fs_error_clear(&err);
    int wfd = -1;
    PyOS_BeforeFork();
    pid_t pid = fs_group_fork(self->group, index, &opts, &wfd, &err);
    if (pid == 0) {
        PyOS_AfterFork_Child();
        return Py_BuildValue("(ii)", 0, wfd);
    }
    PyOS_AfterFork_Parent();
    if (pid < 0)
        return fs_py_raise(&err);
    return Py_BuildValue("(ii)", (int)pid, -1);
}

static PyObject *Group_prepare_report(GroupObject *self, PyObject *args)
{
    int index, wfd = -1;
    if (!PyArg_ParseTuple(args, "i", &index) || group_check_open(self) < 0)
        return NULL;
    fs_error_t err;
    fs_error_clear(&err);
    if (fs_group_prepare_report(self->group, index, &wfd, &err) < 0)
        return fs_py_raise(&err);
    return PyLong_FromLong(wfd);
}

static PyObject *Group_adopt(GroupObject *self, PyObject *args)
{
    int index, pid, is_child;
    if (!PyArg_ParseTuple(args, "iip", &index, &pid, &is_child) || group_check_open(self) < 0)
        return NULL;
    fs_error_t err;
    fs_error_clear(&err);
    if (fs_group_adopt(self->group, index, (pid_t)pid, is_child, &err) < 0)
        return fs_py_raise(&err);
    Py_RETURN_NONE;
}

/* guard(index): register the rank's process group with this process's guardian, with
   its pidfd; close() unregisters it before reaping the rank. */
static PyObject *Group_guard(GroupObject *self, PyObject *args)
{
    int index;
    if (!PyArg_ParseTuple(args, "i", &index) || group_check_open(self) < 0)
        return NULL;
    fs_error_t err;
    fs_error_clear(&err);
    if (fs_group_guard(self->group, index, &err) < 0)
        return fs_py_raise(&err);
    Py_RETURN_NONE;
}

static PyObject *Group_set_exit(GroupObject *self, PyObject *args)
{
    int index, status;
    if (!PyArg_ParseTuple(args, "ii", &index, &status) || group_check_open(self) < 0)
        return NULL;
    fs_error_t err;
    fs_error_clear(&err);
    if (fs_group_set_exit(self->group, index, status, &err) < 0)
        return fs_py_raise(&err);
    Py_RETURN_NONE;
}

static PyObject *Group_attach_status_fd(GroupObject *self, PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd) || group_check_open(self) < 0)
        return NULL;
    fs_error_t err;
    fs_error_clear(&err);
    if (fs_group_attach_status_fd(self->group, fd, &err) < 0)
        return fs_py_raise(&err);
    Py_RETURN_NONE;
}

/* Seconds (None or math.inf: no limit) to milliseconds (-1: no limit). */
static int timeout_to_ms(PyObject *obj, const char *what, int64_t *out)
{
    return fs_py_timeout_ms(obj, what, -1, -1, 0, out);
}

/* wait(timeout=None) -> number of ranks that exited during the call (0 on
   timeout). Runs Python signal handlers while waiting, so Ctrl-C raises. */
static PyObject *Group_wait(GroupObject *self, PyObject *args)
{
    PyObject *timeout_obj = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &timeout_obj) || group_check_open(self) < 0)
        return NULL;
    int64_t timeout_ms;
    if (timeout_to_ms(timeout_obj, "timeout", &timeout_ms) < 0)
        return NULL;
    int64_t deadline = timeout_ms < 0 ? -1 : fs_now_ms() + timeout_ms;
    for (;;) {
        int slice = -1;
        if (deadline >= 0) {
            int64_t left = deadline - fs_now_ms();
            slice = left <= 0 ? 0 : (left > 1000000 ? 1000000 : (int)left);
        }
        fs_error_t err;
        fs_error_clear(&err);
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = fs_group_wait(self->group, slice, &err);
        Py_END_ALLOW_THREADS
        if (rc == FS_EINTR) {
            if (PyErr_CheckSignals() < 0)
                return NULL;
            continue;
        }
        if (rc < 0)
            return fs_py_raise(&err);
        if (rc > 0 || deadline < 0 || fs_now_ms() >= deadline || fs_group_running(self->group) == 0)
            return PyLong_FromLong(rc);
    }
}

static PyObject *Group_running(GroupObject *self, PyObject *Py_UNUSED(ignored))
{
    if (group_check_open(self) < 0)
        return NULL;
    return PyLong_FromLong(fs_group_running(self->group));
}

/*
 * info(index) -> RankInfo: a struct sequence whose 7 tuple items are (pid, state,
 * exit_code, signal, order, killed, gone), so positional unpacking keeps working, with
 * two more fields by name only: pidfd and setup_error.
 */
static PyStructSequence_Field rank_info_fields[] = {
    {"pid", "the rank's pid (0 before it started)"},
    {"state", "0 before it started, PROC_RUNNING, then PROC_EXITED"},
    {"exit_code", "its exit status once it exited, else -1"},
    {"signal", "the signal that killed it, else 0"},
    {"order", "1 for the first rank seen to exit, 2 for the next, ...; 0 while it runs"},
    {"killed", "1 once the supervisor signalled it"},
    {"gone", "1 once its exit was seen, even if its status is still to come"},
    {"pidfd", "(by name only) its pidfd, -1 if none: open until the group closes; os.dup() "
              "it to keep one (a sentinel)"},
    {"setup_error", "(by name only) None, or why its child-side set-up failed: the step and "
                    "the errno (it then exited with 127)"},
    {NULL, NULL},
};

static PyStructSequence_Desc rank_info_desc = {
    "fastspawn._C.RankInfo",
    "What the supervisor knows of one rank (Group.info): a 7-tuple (pid, state, exit_code, "
    "signal, order, killed, gone), with pidfd and setup_error by name.",
    rank_info_fields,
    7,
};

static PyTypeObject *RankInfoType;

/* The rank `index` that args (one int) name: NULL with IndexError when out of range. */
static const fs_proc_t *proc_arg(GroupObject *self, PyObject *args, int *index)
{
    if (!PyArg_ParseTuple(args, "i", index) || group_check_open(self) < 0)
        return NULL;
    const fs_proc_t *p = fs_group_proc(self->group, *index);
    if (p == NULL)
        PyErr_Format(PyExc_IndexError, "rank index %d out of range", *index);
    return p;
}

static PyObject *Group_info(GroupObject *self, PyObject *args)
{
    int index;
    const fs_proc_t *p = proc_arg(self, args, &index);
    if (p == NULL)
        return NULL;
    PyObject *info = PyStructSequence_New(RankInfoType);
    if (info == NULL)
        return NULL;
    const long items[] = {(long)p->pid,  p->state,        p->exit.exit_code, p->exit.term_signal,
                          p->exit_order, p->killed_by_us, p->gone,           p->pidfd};
    for (Py_ssize_t i = 0; i < (Py_ssize_t)(sizeof items / sizeof items[0]); i++) {
        PyObject *v = PyLong_FromLong(items[i]);
        if (v == NULL) {
            Py_DECREF(info);
            return NULL;
        }
        PyStructSequence_SetItem(info, i, v);
    }
    fs_error_t err;
    PyObject *setup = Py_None;
    if (fs_group_setup_error(self->group, index, &err) != FS_OK)
        setup = PyUnicode_FromString(err.msg);
    else
        Py_INCREF(setup);
    if (setup == NULL) {
        Py_DECREF(info);
        return NULL;
    }
    PyStructSequence_SetItem(info, 8, setup);
    return info;
}

static PyObject *Group_report(GroupObject *self, PyObject *args)
{
    int index;
    const fs_proc_t *p = proc_arg(self, args, &index);
    if (p == NULL)
        return NULL;
    return PyBytes_FromStringAndSize((const char *)p->report, (Py_ssize_t)p->report_len);
}

static PyObject *Group_signal(GroupObject *self, PyObject *args)
{
    int sig;
    if (!PyArg_ParseTuple(args, "i", &sig) || group_check_open(self) < 0)
        return NULL;
    fs_error_t err;
    fs_error_clear(&err);
    if (fs_group_signal(self->group, sig, &err) < 0)
        return fs_py_raise(&err);
    Py_RETURN_NONE;
}

/* signal_rank(index, sig): sig to one rank's process group while the rank is unreaped
   (through its pidfd when its group does not exist); nothing once its exit was seen. */
static PyObject *Group_signal_rank(GroupObject *self, PyObject *args)
{
    int index, sig;
    if (!PyArg_ParseTuple(args, "ii", &index, &sig) || group_check_open(self) < 0)
        return NULL;
    fs_error_t err;
    fs_error_clear(&err);
    if (fs_group_signal_rank(self->group, index, sig, &err) < 0)
        return fs_py_raise(&err);
    Py_RETURN_NONE;
}

/* terminate(sig, grace_seconds): sig to every rank's group, grace, SIGKILL; statuses
   collected (close() reaps). */
static PyObject *Group_terminate(GroupObject *self, PyObject *args)
{
    int sig;
    PyObject *grace_obj;
    if (!PyArg_ParseTuple(args, "iO", &sig, &grace_obj) || group_check_open(self) < 0)
        return NULL;
    int64_t grace_ms;
    if (timeout_to_ms(grace_obj, "grace", &grace_ms) < 0)
        return NULL;
    if (grace_ms < 0 || grace_ms > INT32_MAX)
        grace_ms = INT32_MAX;
    fs_error_t err;
    fs_error_clear(&err);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fs_group_terminate(self->group, sig, (int)grace_ms, &err);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return fs_py_raise(&err);
    Py_RETURN_NONE;
}

static PyObject *Group_close(GroupObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->group != NULL) {
        fs_group_t *g = self->group;
        self->group = NULL;
        Py_BEGIN_ALLOW_THREADS
        fs_group_free(g);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyMethodDef Group_methods[] = {
    {"fork", (PyCFunction)Group_fork, METH_VARARGS,
     "fork(index, new_process_group, death_signal) -> (pid, report_fd)"},
    {"prepare_report", (PyCFunction)Group_prepare_report, METH_VARARGS,
     "prepare_report(index) -> write end of the rank's report pipe"},
    {"adopt", (PyCFunction)Group_adopt, METH_VARARGS,
     "adopt(index, pid, is_child): watch a rank started by other means"},
    {"guard", (PyCFunction)Group_guard, METH_VARARGS,
     "guard(index): the guardian kills the rank's group if this process dies"},
    {"set_exit", (PyCFunction)Group_set_exit, METH_VARARGS,
     "set_exit(index, wait_status): exit status of a rank reaped elsewhere"},
    {"attach_status_fd", (PyCFunction)Group_attach_status_fd, METH_VARARGS,
     "attach_status_fd(fd): read {int32 pid, int32 status} records (takes the fd)"},
    {"wait", (PyCFunction)Group_wait, METH_VARARGS,
     "wait(timeout=None) -> ranks that exited during the call"},
    {"running", (PyCFunction)Group_running, METH_NOARGS, "number of running ranks"},
    {"info", (PyCFunction)Group_info, METH_VARARGS,
     "info(index) -> RankInfo(pid, state, exit_code, signal, order, killed, gone), a 7-tuple "
     "with .pidfd (-1 if none) and .setup_error (None or str) by name"},
    {"report", (PyCFunction)Group_report, METH_VARARGS, "report(index) -> bytes"},
    {"signal", (PyCFunction)Group_signal, METH_VARARGS, "signal(sig): to every running rank"},
    {"signal_rank", (PyCFunction)Group_signal_rank, METH_VARARGS,
     "signal_rank(index, sig): to one rank's process group, nothing once it has ended"},
    {"terminate", (PyCFunction)Group_terminate, METH_VARARGS,
     "terminate(sig, grace): sig, wait grace seconds, SIGKILL"},
    {"close", (PyCFunction)Group_close, METH_NOARGS,
     "kill what runs and what is left of each rank's group, unregister, reap, free"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject GroupType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastspawn._C.Group",
    .tp_basicsize = sizeof(GroupObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A supervised group of rank processes.",
    .tp_new = Group_new,
    .tp_dealloc = (destructor)Group_dealloc,
    .tp_methods = Group_methods,
};

/* ---- guardian ------------------------------------------------------- */

/* guardian_watch(pgid, pidfd=-1) -> guardian pid: pidfd (the leader's) must stay open
   until guardian_unwatch(pgid). */
static PyObject *py_guardian_watch(PyObject *Py_UNUSED(m), PyObject *args)
{
    int pgid, pidfd = -1;
    if (!PyArg_ParseTuple(args, "i|i", &pgid, &pidfd))
        return NULL;
    fs_error_t err;
    pid_t pid = 0;
    if (fs_guardian_default_watch(pgid, pidfd, &pid, &err) < 0)
        return fs_py_raise(&err);
    return PyLong_FromLong(pid);
}

static PyObject *py_guardian_unwatch(PyObject *Py_UNUSED(m), PyObject *args)
{
    int pgid;
    if (!PyArg_ParseTuple(args, "i", &pgid))
        return NULL;
    fs_error_t err;
    if (fs_guardian_default_unwatch(pgid, &err) < 0)
        return fs_py_raise(&err);
    Py_RETURN_NONE;
}

/* guardian_restart(): replace the guardian with a new one, told what is registered. */
static PyObject *py_guardian_restart(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    fs_error_t err;
    pid_t pid = 0;
    if (fs_guardian_default_restart(&pid, &err) < 0)
        return fs_py_raise(&err);
    return PyLong_FromLong(pid);
}

/* guardian_watched() -> tuple of the registered process groups. */
static PyObject *py_guardian_watched(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    for (;;) {
        size_t n = fs_guardian_default_watched(NULL, 0);
        pid_t *pgids = PyMem_Malloc((n ? n : 1) * sizeof *pgids);
        if (pgids == NULL)
            return PyErr_NoMemory();
        size_t got = fs_guardian_default_watched(pgids, n);
        if (got > n) { /* registered meanwhile by another thread: again */
            PyMem_Free(pgids);
            continue;
        }
        PyObject *out = PyTuple_New((Py_ssize_t)got);
        for (size_t i = 0; out != NULL && i < got; i++) {
            PyObject *v = PyLong_FromLong((long)pgids[i]);
            if (v == NULL)
                Py_CLEAR(out);
            else
                PyTuple_SET_ITEM(out, (Py_ssize_t)i, v);
        }
        PyMem_Free(pgids);
        return out;
    }
}

static PyObject *py_guardian_pid(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    pid_t pid = fs_guardian_default_pid();
    if (pid == 0)
        Py_RETURN_NONE;
    return PyLong_FromLong(pid);
}

/* fork_rank(new_process_group, death_signal, report_fd=-1) -> pid (0 in the child): one
   rank forked outside a group, as the zygote does. A failed child set-up is reported on
   report_fd (the rank's report pipe) before the child exits. */
static PyObject *py_fork_rank(PyObject *Py_UNUSED(m), PyObject *args)
{
    int new_pgrp, death_signal, report_fd = -1;
    if (!PyArg_ParseTuple(args, "pi|i", &new_pgrp, &death_signal, &report_fd))
        return NULL;
    fs_fork_opts_t opts;
    fs_fork_opts_init(&opts);
    opts.new_process_group = new_pgrp;
    opts.parent_death_signal = death_signal;
    opts.report_fd = report_fd;
    fs_error_t err;
    fs_error_clear(&err);
    PyOS_BeforeFork();
    pid_t pid = fs_fork_rank(&opts, &err);
    if (pid == 0) {
        PyOS_AfterFork_Child();
        return PyLong_FromLong(0);
    }
    PyOS_AfterFork_Parent();
    if (pid < 0)
        return fs_py_raise(&err);
    return PyLong_FromLong((long)pid);
}

static PyObject *py_child_setup(PyObject *Py_UNUSED(m), PyObject *args)
{
    int new_pgrp, death_signal, expected_ppid;
    if (!PyArg_ParseTuple(args, "pii", &new_pgrp, &death_signal, &expected_ppid))
        return NULL;
    fs_error_t err;
    fs_error_clear(&err);
    if (fs_child_setup(new_pgrp, death_signal, (pid_t)expected_ppid, &err) < 0)
        return fs_py_raise(&err);
    Py_RETURN_NONE;
}

static PyObject *py_signal_name(PyObject *Py_UNUSED(m), PyObject *args)
{
    int sig;
    if (!PyArg_ParseTuple(args, "i", &sig))
        return NULL;
    const char *name = fs_signal_name(sig);
    if (name == NULL)
        Py_RETURN_NONE;
    return PyUnicode_FromString(name);
}

static PyMethodDef supervise_functions[] = {
    {"guardian_watch", py_guardian_watch, METH_VARARGS,
     "guardian_watch(pgid, pidfd=-1) -> guardian pid; starts the guardian on first use"},
    {"guardian_unwatch", py_guardian_unwatch, METH_VARARGS, "guardian_unwatch(pgid)"},
    {"guardian_restart", py_guardian_restart, METH_NOARGS, "replace the guardian"},
    {"guardian_watched", py_guardian_watched, METH_NOARGS,
     "guardian_watched() -> the registered process groups"},
    {"guardian_pid", py_guardian_pid, METH_NOARGS, "this process's guardian pid or None"},
    {"fork_rank", py_fork_rank, METH_VARARGS,
     "fork_rank(new_process_group, death_signal, report_fd=-1) -> pid, 0 in the child"},
    {"child_setup", py_child_setup, METH_VARARGS,
     "child_setup(new_process_group, death_signal, expected_ppid)"},
    {"signal_name", py_signal_name, METH_VARARGS, "signal_name(sig) -> 'SIGKILL' or None"},
    {NULL, NULL, 0, NULL},
};

int fs_py_init_supervise(PyObject *module)
{
    if (RankInfoType == NULL && (RankInfoType = PyStructSequence_NewType(&rank_info_desc)) == NULL)
        return -1;
    if (PyModule_AddObjectRef(module, "RankInfo", (PyObject *)RankInfoType) < 0)
        return -1;
    if (fs_py_add_type(module, &GroupType, "Group") < 0 ||
        PyModule_AddFunctions(module, supervise_functions) < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "PROC_RUNNING", FS_PROC_RUNNING) < 0 ||
        PyModule_AddIntConstant(module, "PROC_EXITED", FS_PROC_EXITED) < 0)
        return -1;
    return 0;
}
