/*
 * nccl_comm.c - NCCL communicators: unique ids, creation (non-blocking with a
 * deadline where NCCL has it), abort, destroy, and the error helpers the
 * collectives and the watchdog share.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nccl_internal.h"

#define DEFAULT_TIMEOUT_MS (30LL * 60 * 1000) /* torch's default collective timeout */
#define DEFAULT_POLL_MS 100

void fs_nccl_comm_opts_init(fs_nccl_comm_opts_t *opts)
{
    memset(opts, 0, sizeof *opts);
}

/* ------------------------------------------------------------------ */
/* Errors                                                             */
/* ------------------------------------------------------------------ */

int fs__nccl_code(fs__ncclResult_t r)
{
    switch (r) {
    case fs__ncclSuccess: return FS_OK;
    case fs__ncclInvalidArgument:
    case fs__ncclInvalidUsage: return FS_EINVAL;
    case fs__ncclRemoteError: return FS_EPEER;
    case fs__ncclTimeout: return FS_ETIMEOUT;
    default: return FS_EABORTED;
    }
}

static const char *result_name(fs__ncclResult_t r)
{
    static const char *const names[] = {
        "ncclSuccess",       "ncclUnhandledCudaError", "ncclSystemError",
        "ncclInternalError", "ncclInvalidArgument",    "ncclInvalidUsage",
        "ncclRemoteError",   "ncclInProgress",         "ncclTimeout"};
    return r < sizeof names / sizeof names[0] ? names[r] : "ncclResult?";
}

void fs__nccl_describe(const fs__nccl_api_t *nc, fs__ncclResult_t r, char *buf, size_t cap)
{
    const char *text = nc->ncclGetErrorString(r);
    int n = snprintf(buf, cap, "%s (%s)", result_name(r), text != NULL ? text : "?");
    /* ncclGetLastError ignores its argument and has the detail NCCL logged (2.13+). */
    const char *last = nc->ncclGetLastError != NULL ? nc->ncclGetLastError(NULL) : NULL;
    if (last != NULL && last[0] != '\0' && n > 0 && (size_t)n < cap)
        snprintf(buf + n, cap - (size_t)n, "; NCCL said: %s", last);
}

int fs__comm_error(struct fs_nccl_comm *c, fs_error_t *err)
{
    if (err != NULL)
        *err = c->error;
    return c->status;
}

int fs__comm_usable(struct fs_nccl_comm *c, fs_error_t *err)
{
    if (c->pid != getpid())
        return fs_error_set(err, FS_EINVAL,
                            "this NCCL communicator belongs to process %d: a forked child cannot "
                            "use it",
                            (int)c->pid);
    if (c->status != FS_OK)
        return fs__comm_error(c, err);
    if (c->closing)
        return fs_error_set(err, FS_ECLOSED, "the NCCL communicator is being destroyed");
    return FS_OK;
}

int fs__comm_enter(struct fs_nccl_comm *c, fs_error_t *err)
{
    if (c->pid != getpid())
        return fs__comm_usable(c, err);
    fs__lock(&c->mu);
    return FS_OK;
}

/* ncclCommAbort (or, lacking it, ncclCommDestroy) now; mu held, no group open. */
static void abort_nccl(struct fs_nccl_comm *c)
{
    if (c->nccl == NULL)
        return;
    fs__ncclComm_t n = c->nccl;
    c->nccl = NULL;
    if (c->nc->ncclCommAbort != NULL)
        (void)c->nc->ncclCommAbort(n);
    else
        (void)c->nc->ncclCommDestroy(n);
}

int fs__comm_fail(struct fs_nccl_comm *c, int code, const char *fmt, ...)
{
    if (c->status == FS_OK) {
        va_list ap;
        va_start(ap, fmt);
        if (vsnprintf(c->error.msg, sizeof c->error.msg, fmt, ap) < 0)
            c->error.msg[0] = '\0';
        va_end(ap);
        c->status = c->error.code = code;
        c->error.sys_errno = 0;
    }
    /* NCCL's group state is the group thread's: abort when it ends the group. */
    if (c->group_depth == 0)
        abort_nccl(c);
    fs__works_fail_all(c);
    return c->status;
}

/* ------------------------------------------------------------------ */
/* Polling non-blocking NCCL calls                                    */
/* ------------------------------------------------------------------ */

fs__ncclResult_t fs__nccl_settle(struct fs_nccl_comm *c, fs__ncclResult_t r, int64_t deadline_ms)
{
    long pause_ns = 1000;
    while (r == fs__ncclInProgress) {
        if (fs_now_ms() >= deadline_ms)
            return fs__ncclTimeout;
        fs__unlock(&c->mu);
        fs__sleep_ns(pause_ns);
        pause_ns = pause_ns < 2000000 ? pause_ns * 2 : pause_ns; /* up to 2 ms, like torch */
        fs__lock(&c->mu);
        if (c->nccl == NULL)
            return fs__ncclInvalidUsage; /* aborted meanwhile; c->error says why */
        fs__ncclResult_t state = fs__ncclSuccess;
        fs__ncclResult_t q = c->nc->ncclCommGetAsyncError(c->nccl, &state);
        r = q != fs__ncclSuccess ? q : state;
    }
    return r;
}

/* ------------------------------------------------------------------ */
/* Devices                                                            */
/* ------------------------------------------------------------------ */

int fs__device_enter(struct fs_nccl_comm *c, fs_error_t *err, int *prev)
{
    int cur = -1;
    *prev = -1;
    fs__cudaError_t e = c->cu->cudaGetDevice(&cur);
    if (e != fs__cudaSuccess)
        return fs__cuda_fail(err, c->cu, e, "cudaGetDevice");
    if (cur == c->device)
        return FS_OK;
    e = c->cu->cudaSetDevice(c->device);
    if (e != fs__cudaSuccess)
        return fs__cuda_fail(err, c->cu, e, "cudaSetDevice(%d)", c->device);
    *prev = cur;
    return FS_OK;
}

void fs__device_leave(struct fs_nccl_comm *c, int prev)
{
    if (prev >= 0)
        (void)c->cu->cudaSetDevice(prev); /* it was current a moment ago: cannot be invalid */
}

/* ------------------------------------------------------------------ */
/* Creation                                                           */
/* ------------------------------------------------------------------ */

int fs_nccl_get_unique_id(unsigned char id[FS_NCCL_UNIQUE_ID_BYTES], fs_error_t *err)
{
    const fs__nccl_api_t *nc = fs__nccl();
    if (nc == NULL)
        return fs_error_set(err, FS_ENOTFOUND, "NCCL is not loaded (fs_nccl_load)");
    fs__ncclUniqueId uid;
    fs__ncclResult_t r = nc->ncclGetUniqueId(&uid);
    if (r != fs__ncclSuccess) {
        char why[400];
        fs__nccl_describe(nc, r, why, sizeof why);
        return fs_error_set(err, fs__nccl_code(r), "ncclGetUniqueId failed: %s", why);
    }
    memcpy(id, uid.internal, FS_NCCL_UNIQUE_ID_BYTES);
    return FS_OK;
}

/* The communication stream, the ready event and the barrier's byte (device current). */
static int setup_cuda(struct fs_nccl_comm *c, const fs_nccl_comm_opts_t *o, fs_error_t *err)
{
    const fs__cuda_api_t *cu = c->cu;
    int least = 0, greatest = 0;
    fs__cudaError_t e = fs__cudaSuccess;
    if (o->high_priority_stream)
        e = cu->cudaDeviceGetStreamPriorityRange(&least, &greatest);
    if (e != fs__cudaSuccess)
        return fs__cuda_fail(err, cu, e, "cudaDeviceGetStreamPriorityRange");
    e = cu->cudaStreamCreateWithPriority(&c->stream, fs__cudaStreamNonBlocking,
                                         o->high_priority_stream ? greatest : 0);
    if (e != fs__cudaSuccess)
        return fs__cuda_fail(err, cu, e, "cudaStreamCreateWithPriority (device %d)", c->device);
    e = cu->cudaEventCreateWithFlags(&c->ready, fs__cudaEventDisableTiming);
    if (e != fs__cudaSuccess)
        return fs__cuda_fail(err, cu, e, "cudaEventCreateWithFlags");
    e = cu->cudaMalloc(&c->scratch, 16);
    if (e != fs__cudaSuccess)
        return fs__cuda_fail(err, cu, e, "cudaMalloc (barrier buffer)");
    return FS_OK;
}

static int init_failed(struct fs_nccl_comm *c, fs__ncclResult_t r, const char *call,
                       fs_error_t *err)
{
    char why[400];
    fs__nccl_describe(c->nc, r, why, sizeof why);
    int rc = fs_error_set(err, fs__nccl_code(r), "%s failed on rank %d of %d (device %d): %s", call,
                          c->rank, c->world, c->device, why);
    abort_nccl(c);
    return rc;
}

/* ncclCommInitRankConfig(blocking = 0) polled up to the deadline, or ncclCommInitRank. */
static int init_nccl(struct fs_nccl_comm *c, const unsigned char *id, int64_t init_timeout_ms,
                     fs_error_t *err)
{
    fs__ncclUniqueId uid;
    memcpy(uid.internal, id, sizeof uid.internal);
    if (!c->nonblocking) {
        /* No deadline is possible here: NCCL gives no way to stop a blocking init. */
        fs__ncclResult_t r = c->nc->ncclCommInitRank(&c->nccl, c->world, uid, c->rank);
        return r == fs__ncclSuccess ? FS_OK : init_failed(c, r, "ncclCommInitRank", err);
    }
    fs__ncclConfig_t cfg = {sizeof cfg, FS__NCCL_CONFIG_MAGIC, FS__NCCL_VERSION(2, 14, 0), 0};
    int64_t deadline = fs__deadline_ms(init_timeout_ms);
    fs__lock(&c->mu);
    fs__ncclResult_t r = c->nc->ncclCommInitRankConfig(&c->nccl, c->world, uid, c->rank, &cfg);
    if (r == fs__ncclInProgress && c->nccl != NULL)
        r = fs__nccl_settle(c, r, deadline);
    fs__unlock(&c->mu);
    if (r == fs__ncclSuccess)
        return FS_OK;
    if (r != fs__ncclTimeout)
        return init_failed(c, r, "ncclCommInitRankConfig", err);
    abort_nccl(c);
    return fs_error_set(err, FS_ETIMEOUT,
                        "rank %d of %d: NCCL communicator init (device %d) did not finish within "
                        "its %lld ms deadline; aborted it (is every rank joining with the same "
                        "unique id?)",
                        c->rank, c->world, c->device, (long long)init_timeout_ms);
}

static int check_create_args(int rank, int world, int device, fs_error_t *err)
{
    if (fs__nccl() == NULL)
        return fs_error_set(err, FS_ENOTFOUND, "NCCL is not loaded (fs_nccl_load)");
    if (fs__cuda() == NULL)
        return fs_error_set(err, FS_ENOTFOUND, "the CUDA runtime is not loaded (fs_cuda_load)");
    if (world < 1 || rank < 0 || rank >= world)
        return fs_error_set(err, FS_EINVAL, "rank %d is not in a world of %d", rank, world);
    int ndev = 0;
    int rc = fs_cuda_device_count(&ndev, err);
    if (rc != FS_OK)
        return rc;
    if (device < 0 || device >= ndev)
        return fs_error_set(err, FS_EINVAL, "CUDA device %d does not exist (%d visible)", device,
                            ndev);
    return FS_OK;
}

static struct fs_nccl_comm *comm_alloc(int rank, int world, int device,
                                       const fs_nccl_comm_opts_t *o, fs_error_t *err)
{
    struct fs_nccl_comm *c = calloc(1, sizeof *c);
    if (c == NULL) {
        fs_error_set(err, FS_ENOMEM, "out of memory for an NCCL communicator");
        return NULL;
    }
    int rc = fs__cond_init_monotonic(&c->wake);
    if (rc == 0 && (rc = pthread_mutex_init(&c->mu, NULL)) != 0)
        (void)pthread_cond_destroy(&c->wake);
    if (rc != 0) {
        errno = rc;
        fs_error_sys(err, "pthread_cond_init / pthread_mutex_init");
        free(c);
        return NULL;
    }
    atomic_init(&c->refs, 1);
    c->nc = fs__nccl();
    c->cu = fs__cuda();
    c->rank = rank;
    c->world = world;
    c->device = device;
    c->pid = getpid();
    c->nonblocking = (c->nc->caps & FS_NCCL_CAP_NONBLOCKING) && !o->blocking_init;
    c->timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : DEFAULT_TIMEOUT_MS;
    c->poll_ms = o->watchdog_poll_ms > 0 ? o->watchdog_poll_ms : DEFAULT_POLL_MS;
    return c;
}

/* Destroy the CUDA objects the communicator owns (not its works' events). */
static void release_cuda(struct fs_nccl_comm *c)
{
    if (c->pid != getpid())
        return; /* a forked child: CUDA objects are the parent's */
    for (int i = 0; i < c->nfree_events; i++)
        (void)c->cu->cudaEventDestroy(c->free_events[i]);
    c->nfree_events = 0;
    if (c->ready != NULL)
        (void)c->cu->cudaEventDestroy(c->ready);
    if (c->scratch != NULL)
        (void)c->cu->cudaFree(c->scratch);
    if (c->stream != NULL)
        (void)c->cu->cudaStreamDestroy(c->stream); /* pending work still runs, then it goes */
    c->ready = NULL;
    c->scratch = NULL;
    c->stream = NULL;
}

void fs__comm_unref(struct fs_nccl_comm *c)
{
    if (atomic_fetch_sub(&c->refs, 1) != 1)
        return;
    /* In a forked child the copies may show the parent's waiters (the watchdog): destroying
     * them would wait forever, so only the memory goes. */
    if (c->pid == getpid()) {
        (void)pthread_mutex_destroy(&c->mu);
        (void)pthread_cond_destroy(&c->wake);
    }
    free(c);
}

int fs_nccl_comm_create(const unsigned char id[FS_NCCL_UNIQUE_ID_BYTES], int rank, int world_size,
                        int device, const fs_nccl_comm_opts_t *opts, fs_nccl_comm_t **out,
                        fs_error_t *err)
{
    *out = NULL;
    fs_nccl_comm_opts_t defaults;
    fs_nccl_comm_opts_init(&defaults);
    const fs_nccl_comm_opts_t *o = opts != NULL ? opts : &defaults;
    int rc = check_create_args(rank, world_size, device, err);
    if (rc != FS_OK)
        return rc;
    struct fs_nccl_comm *c = comm_alloc(rank, world_size, device, o, err);
    if (c == NULL)
        return err != NULL ? err->code : FS_ENOMEM;
    int prev = -1;
    rc = fs__device_enter(c, err, &prev);
    if (rc != FS_OK)
        goto error;
    rc = setup_cuda(c, o, err);
    if (rc == FS_OK)
        rc =
            init_nccl(c, id, o->init_timeout_ms > 0 ? o->init_timeout_ms : DEFAULT_TIMEOUT_MS, err);
    fs__device_leave(c, prev);
    if (rc != FS_OK)
        goto error;
    rc = fs__watchdog_start(c, err);
    if (rc != FS_OK)
        goto error;
    *out = c;
    return FS_OK;
error:
    abort_nccl(c);
    release_cuda(c);
    fs__comm_unref(c);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Abort, destroy                                                     */
/* ------------------------------------------------------------------ */

void fs_nccl_comm_abort(fs_nccl_comm_t *c, const char *reason)
{
    if (c == NULL || c->pid != getpid())
        return;
    fs__lock(&c->mu);
    (void)fs__comm_fail(c, FS_EABORTED, "rank %d: the NCCL communicator was aborted: %s", c->rank,
                        reason != NULL ? reason : "fs_nccl_comm_abort");
    fs__unlock(&c->mu);
}

/* Finalize (polled to the deadline) then destroy the NCCL communicator; mu held. */
static int finish_nccl(struct fs_nccl_comm *c, int64_t deadline_ms, fs_error_t *err)
{
    if (c->nccl == NULL)
        return FS_OK;
    fs__ncclResult_t r = fs__ncclSuccess;
    if (c->nonblocking && c->nc->ncclCommFinalize != NULL) {
        r = c->nc->ncclCommFinalize(c->nccl);
        r = fs__nccl_settle(c, r, deadline_ms);
    }
    if (r == fs__ncclSuccess && c->nccl != NULL) {
        fs__ncclComm_t n = c->nccl;
        c->nccl = NULL;
        r = c->nc->ncclCommDestroy(n);
    }
    if (r == fs__ncclSuccess)
        return FS_OK;
    char why[400];
    fs__nccl_describe(c->nc, r, why, sizeof why);
    int rc = fs_error_set(err, fs__nccl_code(r), "rank %d: destroying the NCCL communicator: %s",
                          c->rank, why);
    abort_nccl(c);
    return rc;
}

/* The latest deadline of the outstanding works (mu held). */
static int64_t last_deadline(struct fs_nccl_comm *c)
{
    int64_t d = fs_now_ms();
    for (struct fs_nccl_work *w = c->works; w != NULL; w = w->next)
        d = w->deadline_ms > d ? w->deadline_ms : d;
    return d;
}

int fs_nccl_comm_destroy(fs_nccl_comm_t *c, int64_t timeout_ms, fs_error_t *err)
{
    if (c == NULL)
        return FS_OK;
    if (c->pid != getpid()) {
        fs__comm_unref(c); /* no watchdog thread and no CUDA here: only memory */
        return FS_OK;
    }
    int rc = FS_OK;
    fs__lock(&c->mu);
    c->closing = 1;
    int64_t deadline = timeout_ms < 0 ? last_deadline(c) : fs__deadline_ms(timeout_ms);
    if (c->group_depth > 0 && pthread_equal(c->group_thread, pthread_self())) {
        (void)c->nc->ncclGroupEnd(); /* close our own open group before NCCL goes */
        c->group_depth = 0;
    }
    if (c->status == FS_OK && fs__works_drain(c, deadline) == FS_ETIMEOUT)
        rc = fs__comm_fail(c, FS_ETIMEOUT,
                           "rank %d: works still pending when the communicator was destroyed "
                           "(waited %lld ms); aborted it",
                           c->rank, (long long)(timeout_ms < 0 ? 0 : timeout_ms));
    if (rc != FS_OK)
        (void)fs__comm_error(c, err);
    else if (c->status == FS_OK)
        rc = finish_nccl(c, deadline + 1000, err);
    abort_nccl(c); /* a communicator that failed earlier: its abort may have waited for a group */
    fs__works_fail_all(c); /* nothing is left to complete them */
    release_cuda(c);
    fs__unlock(&c->mu);
    fs__watchdog_stop(c);
    fs__comm_unref(c);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Accessors                                                          */
/* ------------------------------------------------------------------ */

int fs_nccl_comm_status(fs_nccl_comm_t *c, fs_error_t *why)
{
    int rc = fs__comm_enter(c, why);
    if (rc != FS_OK)
        return rc;
    rc = c->status;
    if (why != NULL)
        *why = c->error;
    fs__unlock(&c->mu);
    return rc;
}

int fs_nccl_comm_rank(const fs_nccl_comm_t *c)
{
    return c->rank;
}

int fs_nccl_comm_world_size(const fs_nccl_comm_t *c)
{
    return c->world;
}

int fs_nccl_comm_device(const fs_nccl_comm_t *c)
{
    return c->device;
}

int fs_nccl_comm_nonblocking(const fs_nccl_comm_t *c)
{
    return c->nonblocking;
}

uintptr_t fs_nccl_comm_stream(const fs_nccl_comm_t *c)
{
    return (uintptr_t)(void *)c->stream;
}

uint64_t fs_nccl_comm_seq(fs_nccl_comm_t *c)
{
    if (fs__comm_enter(c, NULL) != FS_OK)
        return c->seq; /* a forked child's copy */
    uint64_t s = c->seq;
    fs__unlock(&c->mu);
    return s;
}
