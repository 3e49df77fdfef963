/*
 * nccl_work.c - works (one enqueued collective or group, watched through
 * its end event), waiting on them, and the watchdog thread that fails a
 * communicator whose work outlives its timeout or whose NCCL reports an
 * asynchronous error.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nccl_internal.h"

/* ------------------------------------------------------------------ */
/* Life cycle                                                         */
/* ------------------------------------------------------------------ */

void fs__work_describe(const struct fs_nccl_work *w, char *buf, size_t cap)
{
    if (w->nops > 1)
        snprintf(buf, cap, "a group of %d ops starting with %s (seq %llu)", w->nops,
                 fs_nccl_kind_name(w->kind), (unsigned long long)w->seq);
    else if (w->kind == FS_COLL_BARRIER)
        snprintf(buf, cap, "barrier (seq %llu)", (unsigned long long)w->seq);
    else
        snprintf(buf, cap, "%s (seq %llu, %zu x %s)", fs_nccl_kind_name(w->kind),
                 (unsigned long long)w->seq, w->count, fs_nccl_dtype_name(w->dtype));
}

int fs__work_new(struct fs_nccl_comm *c, int with_caller_ref, struct fs_nccl_work **out,
                 fs_error_t *err)
{
    *out = NULL;
    struct fs_nccl_work *w = calloc(1, sizeof *w);
    if (w == NULL)
        return fs_error_set(err, FS_ENOMEM, "out of memory for an NCCL work");
    if (c->nfree_events > 0) {
        w->end = c->free_events[--c->nfree_events];
    } else {
        fs__cudaError_t e = c->cu->cudaEventCreateWithFlags(&w->end, fs__cudaEventDisableTiming);
        if (e != fs__cudaSuccess) {
            free(w);
            return fs__cuda_fail(err, c->cu, e, "cudaEventCreateWithFlags");
        }
    }
    atomic_init(&w->refs, with_caller_ref ? 2 : 1);
    w->comm = c;
    w->nops = 1;
    atomic_fetch_add(&c->refs, 1);
    *out = w;
    return FS_OK;
}

/* Give the end event back (or destroy it), free the work, drop its comm reference; mu held. */
static void work_free_locked(struct fs_nccl_work *w)
{
    struct fs_nccl_comm *c = w->comm;
    if (c->pid == getpid()) {
        /* Only a completed event may serve again: a failed one may never fire. */
        if (w->state == FS__WORK_DONE && !c->closing && c->nfree_events < 32)
            c->free_events[c->nfree_events++] = w->end;
        else
            (void)c->cu->cudaEventDestroy(w->end); /* fine while a record is pending */
    }
    free(w);
    /* Never the last reference: whoever holds mu also holds one (the owner or a work). */
    atomic_fetch_sub(&c->refs, 1);
}

static void work_unref_locked(struct fs_nccl_work *w)
{
    if (atomic_fetch_sub(&w->refs, 1) == 1)
        work_free_locked(w);
}

void fs__work_discard(struct fs_nccl_work *w)
{
    w->state = FS__WORK_DONE; /* never recorded: its event is clean */
    atomic_store(&w->refs, 1);
    work_unref_locked(w);
}

void fs_nccl_work_release(fs_nccl_work_t *w)
{
    if (w == NULL)
        return;
    struct fs_nccl_comm *c = w->comm;
    if (c->pid != getpid()) { /* a forked child's copy: memory only, mu untouched */
        if (atomic_fetch_sub(&w->refs, 1) == 1) {
            free(w);
            fs__comm_unref(c);
        }
        return;
    }
    /* Hold the communicator across the unlock: this may be the work's last reference. */
    atomic_fetch_add(&c->refs, 1);
    fs__lock(&c->mu);
    work_unref_locked(w);
    fs__unlock(&c->mu);
    fs__comm_unref(c);
}

int fs__work_launch(struct fs_nccl_work *w, fs_error_t *err)
{
    struct fs_nccl_comm *c = w->comm;
    fs__cudaError_t e = c->cu->cudaEventRecord(w->end, c->stream);
    if (e != fs__cudaSuccess) {
        char what[160];
        fs_error_t why;
        fs__work_describe(w, what, sizeof what);
        fs__cuda_fail(&why, c->cu, e, "cudaEventRecord after %s", what);
        fs__comm_fail(c, why.code, "rank %d: %s; the NCCL communicator was aborted", c->rank,
                      why.msg);
        fs__work_discard(w);
        return fs__comm_error(c, err);
    }
    w->deadline_ms = fs__deadline_ms(c->timeout_ms);
    if (c->works_tail != NULL)
        c->works_tail->next = w;
    else
        c->works = w;
    c->works_tail = w;
    return FS_OK;
}

/* Unlink w (whose predecessor is prev, or NULL) from the outstanding list; mu held. */
static void works_unlink(struct fs_nccl_comm *c, struct fs_nccl_work *prev, struct fs_nccl_work *w)
{
    if (prev != NULL)
        prev->next = w->next;
    else
        c->works = w->next;
    if (c->works_tail == w)
        c->works_tail = prev;
    w->next = NULL;
}

void fs__works_fail_all(struct fs_nccl_comm *c)
{
    while (c->works != NULL) {
        struct fs_nccl_work *w = c->works;
        works_unlink(c, NULL, w);
        if (w->state == FS__WORK_PENDING)
            w->state = FS__WORK_FAILED;
        work_unref_locked(w);
    }
}

/* ------------------------------------------------------------------ */
/* Polling                                                            */
/* ------------------------------------------------------------------ */

/*
 * Bring w's state up to date (mu held): its event, its deadline. A failure
 * here fails the whole communicator. Returns FS_OK or the communicator's error.
 */
static int work_poll(struct fs_nccl_work *w, fs_error_t *err)
{
    struct fs_nccl_comm *c = w->comm;
    if (w->state == FS__WORK_DONE)
        return FS_OK;
    if (w->state == FS__WORK_FAILED || c->status != FS_OK)
        return fs__comm_error(c, err);
    if (c->pid != getpid())
        return fs__comm_usable(c, err);
    if (c->stream == NULL) /* destroyed: cannot happen, destroy settles every work */
        return fs_error_set(err, FS_ECLOSED, "the NCCL communicator was destroyed");
    fs__cudaError_t e = c->cu->cudaEventQuery(w->end);
    if (e == fs__cudaSuccess) {
        w->state = FS__WORK_DONE;
        return FS_OK;
    }
    char what[160];
    fs__work_describe(w, what, sizeof what);
    if (e != fs__cudaErrorNotReady) {
        fs_error_t why;
        fs__cuda_fail(&why, c->cu, e, "cudaEventQuery");
        fs__comm_fail(c, why.code, "rank %d: %s: %s; the NCCL communicator was aborted", c->rank,
                      what, why.msg);
    } else if (fs_now_ms() > w->deadline_ms) {
        fs__comm_fail(c, FS_ETIMEOUT,
                      "rank %d: NCCL watchdog: %s did not complete within the timeout of %lld ms; "
                      "the NCCL communicator was aborted",
                      c->rank, what, (long long)c->timeout_ms);
    }
    return c->status != FS_OK ? fs__comm_error(c, err) : FS_OK;
}

int fs_nccl_work_query(fs_nccl_work_t *w, int *done, fs_error_t *err)
{
    struct fs_nccl_comm *c = w->comm;
    *done = 0;
    int rc = fs__comm_enter(c, err);
    if (rc != FS_OK)
        return rc;
    rc = work_poll(w, err);
    *done = rc == FS_OK && w->state == FS__WORK_DONE;
    fs__unlock(&c->mu);
    return rc;
}

int fs_nccl_work_synchronize(fs_nccl_work_t *w, int64_t timeout_ms, fs_error_t *err)
{
    struct fs_nccl_comm *c = w->comm;
    int64_t deadline = timeout_ms < 0 ? INT64_MAX : fs__deadline_ms(timeout_ms);
    long pause_ns = 1000;
    int rc = fs__comm_enter(c, err);
    if (rc != FS_OK)
        return rc;
    /* Bounded even with no timeout: work_poll fails the work at its own deadline. */
    while ((rc = work_poll(w, err)) == FS_OK && w->state != FS__WORK_DONE) {
        if (fs_now_ms() >= deadline) {
            char what[160];
            fs__work_describe(w, what, sizeof what);
            rc = fs_error_set(err, FS_ETIMEOUT, "rank %d: %s still pending after %lld ms", c->rank,
                              what, (long long)timeout_ms);
            break;
        }
        fs__unlock(&c->mu);
        fs__sleep_ns(pause_ns);
        pause_ns = pause_ns < 1000000 ? pause_ns * 2 : pause_ns;
        fs__lock(&c->mu);
    }
    fs__unlock(&c->mu);
    return rc;
}

int fs_nccl_work_wait_stream(fs_nccl_work_t *w, uintptr_t stream, fs_error_t *err)
{
    struct fs_nccl_comm *c = w->comm;
    int rc = fs__comm_enter(c, err);
    if (rc != FS_OK)
        return rc;
    rc = work_poll(w, err);
    if (rc == FS_OK) { /* even when done: cheap, and the caller's order never depends on a race */
        fs__cudaError_t e = c->cu->cudaStreamWaitEvent((fs__cudaStream_t)(void *)stream, w->end, 0);
        if (e != fs__cudaSuccess)
            rc = fs__cuda_fail(err, c->cu, e, "cudaStreamWaitEvent(stream 0x%jx)",
                               (uintmax_t)stream);
    }
    fs__unlock(&c->mu);
    return rc;
}

uint64_t fs_nccl_work_seq(const fs_nccl_work_t *w)
{
    return w->seq;
}

/* ------------------------------------------------------------------ */
/* The watchdog                                                       */
/* ------------------------------------------------------------------ */

/* Poll every outstanding work, drop finished ones, fail on a timeout or a CUDA error. */
static void look_at_works(struct fs_nccl_comm *c)
{
    struct fs_nccl_work *prev = NULL, *w = c->works;
    while (w != NULL && c->status == FS_OK) {
        struct fs_nccl_work *next = w->next;
        (void)work_poll(w, NULL);
        if (w->state == FS__WORK_DONE) {
            works_unlink(c, prev, w);
            work_unref_locked(w);
        } else {
            prev = w;
        }
        w = next;
    }
}

/* ncclCommGetAsyncError: an error there (a dead peer, a network failure) fails the comm. */
static void look_at_nccl(struct fs_nccl_comm *c)
{
    if (c->status != FS_OK || c->nccl == NULL || c->nc->ncclCommGetAsyncError == NULL)
        return;
    fs__ncclResult_t state = fs__ncclSuccess;
    fs__ncclResult_t r = c->nc->ncclCommGetAsyncError(c->nccl, &state);
    if (r == fs__ncclSuccess)
        r = state;
    if (r == fs__ncclSuccess || r == fs__ncclInProgress)
        return;
    char why[400], what[160] = "no work";
    fs__nccl_describe(c->nc, r, why, sizeof why);
    if (c->works != NULL)
        fs__work_describe(c->works, what, sizeof what);
    fs__comm_fail(c, fs__nccl_code(r) == FS_OK ? FS_EABORTED : fs__nccl_code(r),
                  "rank %d: NCCL watchdog: asynchronous NCCL error %s while %s was pending; the "
                  "NCCL communicator was aborted",
                  c->rank, why, what);
}

#define WATCHDOG_MAX_POLL_MS (24LL * 3600 * 1000)

static void *watchdog_main(void *arg)
{
    struct fs_nccl_comm *c = arg;
    /* The event queries run on this thread: give it the communicator's device. */
    (void)c->cu->cudaSetDevice(c->device);
    fs__lock(&c->mu);
    while (!c->closing) {
        look_at_works(c);
        look_at_nccl(c);
        /* timeout or wake: look again (an interval beyond a day is a day: no overflow) */
        int64_t poll_ms = c->poll_ms < WATCHDOG_MAX_POLL_MS ? c->poll_ms : WATCHDOG_MAX_POLL_MS;
        (void)fs__cond_timedwait(&c->wake, &c->mu, fs__now_ns() + poll_ms * 1000000);
    }
    fs__unlock(&c->mu);
    return NULL;
}

int fs__watchdog_start(struct fs_nccl_comm *c, fs_error_t *err)
{
    int rc = fs__thread_start(&c->watchdog, watchdog_main, c);
    if (rc != 0) {
        errno = rc;
        return fs_error_sys(err, "starting the NCCL watchdog thread");
    }
    c->watchdog_started = 1;
    return FS_OK;
}

void fs__watchdog_stop(struct fs_nccl_comm *c)
{
    if (!c->watchdog_started)
        return;
    fs__lock(&c->mu);
    c->closing = 1;
    fs__cond_broadcast(&c->wake);
    fs__unlock(&c->mu);
    (void)pthread_join(c->watchdog, NULL);
    c->watchdog_started = 0;
}

int fs__works_drain(struct fs_nccl_comm *c, int64_t deadline_ms)
{
    for (;;) {
        look_at_works(c);
        if (c->status != FS_OK || c->works == NULL)
            return c->status;
        if (fs_now_ms() >= deadline_ms)
            return FS_ETIMEOUT;
        fs__unlock(&c->mu);
        fs__sleep_ns(1000000);
        fs__lock(&c->mu);
    }
}
