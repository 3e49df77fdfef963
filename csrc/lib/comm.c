/*
 * comm.c - the communicator: creating / opening and joining a segment, leaving, aborting,
 * the per-communicator worker thread that runs queued collectives in submission order,
 * and the public fs_* collective entry points. The segment and its steps are shm.c's,
 * the algorithms coll_cpu.c's: this file calls both, neither calls back.
 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "coll.h"
#include "internal.h"

#define MAX_WORLD 4096
/* Measured on a 2-core VM (bench/allreduce.py): 4 MiB slots (2 MiB chunks) while every
 * rank has a core, smaller steps when ranks share cores; one-shot all_reduce pays while
 * reading N inputs costs less than a second step: up to 1 MiB for 2 ranks, a quarter of
 * that per extra rank, at least 16 KiB. */
#define SLOT_BYTES_ENOUGH_CORES ((size_t)4 << 20)
#define SLOT_BYTES_OVERSUBSCRIBED ((size_t)2 << 20)
#define ONESHOT_MAX_2_RANKS ((size_t)1 << 20)
#define ONESHOT_MAX_MIN ((size_t)16 << 10)
/*
 * Waiting: spin with pause (cheapest wake-up, but it holds the core), then poll with
 * sched_yield (other runnable threads - a co-located rank, the rank's own training
 * thread - get the core at once), then sleep on the futex. Sleeping is the last resort:
 * waking an idle (virtual) CPU can take longer than a whole small collective, and two
 * ranks that both sleep keep missing each other.
 */
#define SPIN_NS_ENOUGH_CORES 2000
#define SPIN_NS_OVERSUBSCRIBED 0
#define YIELD_NS_ENOUGH_CORES 1000000
#define YIELD_NS_OVERSUBSCRIBED 100000

/* One queued collective. */
struct coll_item {
    fs_coll_args_t args;
    uint64_t ticket;
};

struct fs_comm {
    fs__shm_t shm;             /* the segment and the step state (shm.c) */
    fs_comm_opts_t opts;       /* with the defaults filled in */
    unsigned fork_gen;         /* fork generation of the creating process (see forked) */
    int joined;                /* fs_comm_join succeeded: collectives may run */
    int sync_ready;            /* exec_lock, qlock, q_cv, done_cv were initialised */
    pthread_mutex_t exec_lock; /* held while a collective runs on this rank */

    /* Worker thread and its queue. */
    int has_worker;
    pthread_t worker;
    pthread_mutex_t qlock;
    pthread_cond_t q_cv;    /* work arrived or stop */
    pthread_cond_t done_cv; /* a ticket completed or waiters shut down (CLOCK_MONOTONIC) */
    struct coll_item *queue;
    size_t q_cap, q_head, q_len;
    uint64_t submitted, completed;
    uint64_t fail_ticket; /* first ticket that failed, 0 if none */
    fs_error_t ticket_err;
    int stopping, waiters_shutdown;
};

/* ------------------------------------------------------------------ */
/* Fork guard                                                         */
/* ------------------------------------------------------------------ */

/* Bumped in every forked child (pthread_atfork), so a communicator can tell. */
static _Atomic unsigned fork_generation;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void)
{
    atomic_fetch_add(&fork_generation, 1);
}

static void register_atfork(void)
{
    /* Fails only with ENOMEM; comm_new then reports the fork guard as unavailable. */
    if (pthread_atfork(NULL, NULL, on_fork_child) != 0)
        atomic_store(&fork_generation, ~0u);
}

/* 1 in a child forked after the communicator was created: it has no worker thread and
 * its locks may be held by threads that did not survive the fork. */
static int forked(const fs_comm_t *c)
{
    return c->fork_gen != atomic_load(&fork_generation);
}

static int forked_error(const fs_comm_t *c, fs_error_t *err)
{
    return fs_error_set(err, FS_EINVAL,
                        "the communicator of rank %d was created in process %d; a forked child "
                        "cannot use it (create one in the child instead)",
                        c->shm.rank, (int)c->shm.pids[c->shm.rank]);
}

/* ------------------------------------------------------------------ */
/* Worker thread                                                      */
/* ------------------------------------------------------------------ */

static void *worker_main(void *arg)
{
    fs_comm_t *c = arg;
    fs__lock(&c->qlock);
    for (;;) {
        while (c->q_len == 0 && !c->stopping)
            fs__cond_wait(&c->q_cv, &c->qlock);
        if (c->q_len == 0)
            break; /* stopping and drained */
        struct coll_item item = c->queue[c->q_head];
        c->q_head = (c->q_head + 1) % c->q_cap;
        c->q_len--;
        fs__unlock(&c->qlock);

        fs_error_t e;
        fs_error_clear(&e);
        fs__lock(&c->exec_lock);
        int rc = fs__coll_execute(&c->shm, &item.args, c->opts.timeout_ms, &e);
        fs__unlock(&c->exec_lock);

        fs__lock(&c->qlock);
        if (rc != FS_OK && c->fail_ticket == 0) {
            c->fail_ticket = item.ticket;
            c->ticket_err = e;
        }
        c->completed = item.ticket;
        fs__cond_broadcast(&c->done_cv);
    }
    fs__unlock(&c->qlock);
    return NULL;
}

static int worker_start(fs_comm_t *c, fs_error_t *err)
{
    c->q_cap = 64;
    c->queue = calloc(c->q_cap, sizeof *c->queue);
    if (c->queue == NULL)
        return fs_error_set(err, FS_ENOMEM, "out of memory");
    /* The worker takes no signals: they stay with the application's threads. */
    int rc = fs__thread_start(&c->worker, worker_main, c);
    if (rc != 0) {
        errno = rc;
        return fs_error_sys(err, "pthread_create (collectives worker)");
    }
    c->has_worker = 1;
    return FS_OK;
}

static void worker_stop(fs_comm_t *c)
{
    if (!c->has_worker)
        return;
    fs__lock(&c->qlock);
    c->stopping = 1;
    c->waiters_shutdown = 1;
    fs__cond_broadcast(&c->q_cv);
    fs__cond_broadcast(&c->done_cv);
    fs__unlock(&c->qlock);
    /* EDEADLK/EINVAL would mean destroy ran on the worker itself: a caller bug. */
    (void)pthread_join(c->worker, NULL);
    c->has_worker = 0;
}

/* ------------------------------------------------------------------ */
/* Create / destroy                                                   */
/* ------------------------------------------------------------------ */

void fs_comm_opts_init(fs_comm_opts_t *opts)
{
    memset(opts, 0, sizeof *opts);
    opts->timeout_ms = FS_COMM_DEFAULT_TIMEOUT_MS;
    opts->connect_timeout_ms = FS_COMM_DEFAULT_CONNECT_TIMEOUT_MS;
    opts->spin_ns = -1;
    opts->yield_ns = -1;
    opts->liveness_ms = FS_COMM_DEFAULT_LIVENESS_MS;
}

static int cpu_count(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static int check_args(int rank, int world_size, fs_error_t *err)
{
    if (world_size < 1 || world_size > MAX_WORLD)
        return fs_error_set(err, FS_EINVAL, "world_size %d is not in 1..%d", world_size, MAX_WORLD);
    if (rank < 0 || rank >= world_size)
        return fs_error_set(err, FS_EINVAL, "rank %d is not in 0..%d", rank, world_size - 1);
    return FS_OK;
}

/* The options with defaults filled in, and the segment's sizes and waiting times. */
static int choose_sizes(fs_comm_t *c, const fs_comm_opts_t *opts, int world, fs_error_t *err)
{
    fs_comm_opts_t *o = &c->opts;
    if (opts != NULL)
        *o = *opts;
    else
        fs_comm_opts_init(o);
    if (o->timeout_ms <= 0)
        o->timeout_ms = FS_COMM_DEFAULT_TIMEOUT_MS;
    if (o->connect_timeout_ms <= 0)
        o->connect_timeout_ms = FS_COMM_DEFAULT_CONNECT_TIMEOUT_MS;
    if (o->liveness_ms <= 0)
        o->liveness_ms = FS_COMM_DEFAULT_LIVENESS_MS;
    int enough_cores = world <= cpu_count();
    size_t slot = o->slot_bytes  ? o->slot_bytes
                  : enough_cores ? SLOT_BYTES_ENOUGH_CORES
                                 : SLOT_BYTES_OVERSUBSCRIBED;
    if (slot < FS__SHM_MIN_SLOT_BYTES)
        slot = FS__SHM_MIN_SLOT_BYTES;
    if (slot < (size_t)world * 1024) /* >= 64 float64 per rank and half-buffer */
        slot = (size_t)world * 1024;
    if (slot > ((size_t)1 << 40) / (size_t)world)
        return fs_error_set(err, FS_ETOOBIG, "slot_bytes %zu is too large", slot);
    if (o->oneshot_max == 0) {
        int shift = world <= 2 ? 0 : 2 * (world - 2);
        o->oneshot_max = shift >= 20 ? 0 : ONESHOT_MAX_2_RANKS >> shift;
        if (o->oneshot_max < ONESHOT_MAX_MIN)
            o->oneshot_max = ONESHOT_MAX_MIN;
    }
    fs__shm_t *s = &c->shm;
    size_t unit = (size_t)2 * FS__SHM_ALIGN;
    s->slot_bytes = (slot + unit - 1) / unit * unit;
    s->buf_bytes = s->slot_bytes / 2;
    s->oneshot_max = o->oneshot_max;
    s->connect_timeout_ms = o->connect_timeout_ms;
    s->liveness_ms = o->liveness_ms;
    s->spin_ns = o->spin_ns >= 0 ? o->spin_ns
                 : enough_cores  ? SPIN_NS_ENOUGH_CORES
                                 : SPIN_NS_OVERSUBSCRIBED;
    s->yield_ns = o->yield_ns >= 0 ? o->yield_ns
                  : enough_cores   ? YIELD_NS_ENOUGH_CORES
                                   : YIELD_NS_OVERSUBSCRIBED;
    return FS_OK;
}

static int init_sync(fs_comm_t *c, fs_error_t *err)
{
    int rc = pthread_mutex_init(&c->exec_lock, NULL);
    if (rc == 0)
        rc = pthread_mutex_init(&c->qlock, NULL);
    if (rc == 0)
        rc = pthread_cond_init(&c->q_cv, NULL);
    if (rc == 0)
        rc = fs__cond_init_monotonic(&c->done_cv);
    if (rc != 0) {
        /* Only glibc's EAGAIN/ENOMEM; none of these own resources on Linux. */
        errno = rc;
        return fs_error_sys(err, "pthread init");
    }
    c->sync_ready = 1;
    return FS_OK;
}

/* What creating and opening share: the arguments, options and per-rank state. NULL with
 *rc and err filled when it fails. */
static fs_comm_t *comm_new(int rank, int world_size, const fs_comm_opts_t *opts, int *rc,
                           fs_error_t *err)
{
    if ((*rc = check_args(rank, world_size, err)) != FS_OK)
        return NULL;
    if (pthread_once(&atfork_once, register_atfork) != 0 || atomic_load(&fork_generation) == ~0u) {
        *rc = fs_error_set(err, FS_ENOMEM, "pthread_atfork failed");
        return NULL;
    }
    fs_comm_t *c = calloc(1, sizeof *c);
    if (c == NULL) {
        *rc = fs_error_set(err, FS_ENOMEM, "out of memory");
        return NULL;
    }
    c->fork_gen = atomic_load(&fork_generation);
    /* fs__shm_init first: it makes the state fs_comm_destroy can always release. */
    if ((*rc = fs__shm_init(&c->shm, rank, world_size, err)) != FS_OK ||
        (*rc = choose_sizes(c, opts, world_size, err)) != FS_OK ||
        (*rc = init_sync(c, err)) != FS_OK) {
        fs_comm_destroy(c);
        return NULL;
    }
    return c;
}

/* The end of create / open: the communicator, or nothing (peers told, when it is ours). */
static int attached_or_destroy(fs_comm_t *c, int rc, fs_comm_t **out, fs_error_t *err)
{
    if (rc == FS_OK) {
        *out = c;
        return FS_OK;
    }
    if (c != NULL && c->shm.hdr != NULL)
        fs__shm_fail(&c->shm, err); /* e.g. a world size mismatch: rank 0 hears of it at once */
    fs_comm_destroy(c);
    return rc;
}

int fs_comm_create(int world_size, const fs_comm_opts_t *opts, fs_comm_t **out, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    if (out == NULL)
        return fs_error_set(err, FS_EINVAL, "fs_comm_create: out is NULL");
    *out = NULL;
    int rc;
    fs_comm_t *c = comm_new(0, world_size, opts, &rc, err);
    if (c != NULL)
        rc = fs__shm_create(&c->shm, c->opts.shm, err);
    return attached_or_destroy(c, rc, out, err);
}

int fs_comm_open(const char *handle, int rank, int world_size, const fs_comm_opts_t *opts,
                 fs_comm_t **out, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    if (out == NULL || handle == NULL)
        return fs_error_set(err, FS_EINVAL, "fs_comm_open: %s is NULL", out ? "handle" : "out");
    *out = NULL;
    if (rank == 0)
        return fs_error_set(err, FS_EINVAL, "rank 0 creates the segment (fs_comm_create)");
    int rc;
    fs_comm_t *c = comm_new(rank, world_size, opts, &rc, err);
    if (c != NULL)
        rc = fs__shm_open(&c->shm, handle, err);
    return attached_or_destroy(c, rc, out, err);
}

const char *fs_comm_handle(const fs_comm_t *c)
{
    return c->shm.seg.handle;
}

int fs_comm_join(fs_comm_t *c, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    if (forked(c))
        return forked_error(c, err);
    if (c->joined)
        return fs_error_set(err, FS_EINVAL, "rank %d joined already", c->shm.rank);
    /* After a failed join only destroying is left. A peer's abort that came first is not
       checked here: fs__shm_join reports it with its own code (e.g. FS_EMISMATCH). */
    if (atomic_load(&c->shm.failed))
        return fs__shm_check_usable(&c->shm, err);
    int rc = fs__shm_join(&c->shm, err);
    if (rc == FS_OK && !c->opts.no_worker)
        rc = worker_start(c, err);
    if (rc != FS_OK)
        return fs__shm_fail(&c->shm, err); /* the peers must not wait for a rank that gave up */
    c->joined = 1;
    snprintf(c->shm.what, sizeof c->shm.what, "idle");
    return FS_OK;
}

void fs_comm_destroy(fs_comm_t *c)
{
    if (c == NULL)
        return;
    int child = forked(c);
    if (!child)
        worker_stop(c);
    fs__shm_release(&c->shm, child);
    if (c->sync_ready && !child) { /* in a forked child they may be held by threads that are gone */
        (void)pthread_cond_destroy(&c->done_cv);
        (void)pthread_cond_destroy(&c->q_cv);
        (void)pthread_mutex_destroy(&c->qlock);
        (void)pthread_mutex_destroy(&c->exec_lock);
    }
    free(c->queue);
    free(c);
}

void fs_comm_abort(fs_comm_t *c, const char *reason)
{
    if (c == NULL || forked(c)) /* a forked child must not abort its parent's */
        return;
    fs__shm_abort(&c->shm, reason);
}

int fs_comm_status(fs_comm_t *c, fs_error_t *why)
{
    FS__ERR_OR_LOCAL(why);
    fs_error_clear(why);
    if (forked(c))
        return forked_error(c, why);
    return fs__shm_status(&c->shm, why);
}

int fs_comm_rank(const fs_comm_t *c)
{
    return c->shm.rank;
}

int fs_comm_world_size(const fs_comm_t *c)
{
    return c->shm.world;
}

/* ------------------------------------------------------------------ */
/* Queue, submit, wait, run                                           */
/* ------------------------------------------------------------------ */

static int enqueue(fs_comm_t *c, const fs_coll_args_t *a, uint64_t *ticket, fs_error_t *err)
{
    if (c->stopping)
        return fs_error_set(err, FS_ECLOSED, "communicator is being destroyed");
    if (c->q_len == c->q_cap) {
        size_t cap = c->q_cap ? c->q_cap * 2 : 64;
        struct coll_item *q = malloc(cap * sizeof *q);
        if (q == NULL)
            return fs_error_set(err, FS_ENOMEM, "out of memory (collective queue)");
        for (size_t i = 0; i < c->q_len; i++)
            q[i] = c->queue[(c->q_head + i) % c->q_cap];
        free(c->queue);
        c->queue = q;
        c->q_cap = cap;
        c->q_head = 0;
    }
    struct coll_item *it = &c->queue[(c->q_head + c->q_len) % c->q_cap];
    it->args = *a;
    it->ticket = ++c->submitted;
    c->q_len++;
    *ticket = it->ticket;
    fs__cond_signal(&c->q_cv);
    return FS_OK;
}

/* What every call that runs a collective checks first. */
static int check_call(fs_comm_t *c, const fs_coll_args_t *a, fs_error_t *err)
{
    if (forked(c))
        return forked_error(c, err);
    if (!c->joined)
        return fs_error_set(err, FS_EINVAL,
                            "rank %d has not joined the communicator (fs_comm_join)", c->shm.rank);
    return fs__coll_validate(&c->shm, a, err);
}

int fs_comm_submit(fs_comm_t *c, const fs_coll_args_t *a, uint64_t *ticket, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    int rc = check_call(c, a, err);
    if (rc != FS_OK)
        return rc;
    if (!c->has_worker)
        return fs_error_set(err, FS_EINVAL, "communicator was created without a worker thread");
    fs__lock(&c->qlock);
    rc = enqueue(c, a, ticket, err);
    fs__unlock(&c->qlock);
    return rc;
}

/* Status of a completed ticket (qlock held). */
static int ticket_status(fs_comm_t *c, uint64_t t, fs_error_t *err)
{
    if (c->fail_ticket == 0 || t < c->fail_ticket)
        return FS_OK;
    if (t == c->fail_ticket) {
        if (err != NULL)
            *err = c->ticket_err;
        return c->ticket_err.code;
    }
    return fs_error_set(err, FS_EABORTED, "communicator unusable after an earlier error: %s",
                        c->ticket_err.msg);
}

int fs_comm_wait(fs_comm_t *c, uint64_t t, int64_t timeout_ms, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    int64_t now_ns = fs__now_ns(), until_ns = INT64_MAX;
    if (timeout_ms > 0 && timeout_ms < (INT64_MAX - now_ns) / 1000000)
        until_ns = now_ns + timeout_ms * 1000000;
    if (forked(c))
        return forked_error(c, err);
    fs__lock(&c->qlock);
    int rc = FS_OK;
    while (c->completed < t) {
        if (t > c->submitted && (c->waiters_shutdown || c->stopping)) {
            rc = fs_error_set(err, FS_ECLOSED, "communicator is shutting down");
            break;
        }
        if (timeout_ms == 0) {
            rc = fs_error_set(err, FS_ETIMEOUT, "collective %llu is still running",
                              (unsigned long long)t);
            break;
        }
        if (timeout_ms < 0)
            fs__cond_wait(&c->done_cv, &c->qlock);
        else if (fs__cond_timedwait(&c->done_cv, &c->qlock, until_ns) == ETIMEDOUT &&
                 c->completed < t) {
            rc = fs_error_set(err, FS_ETIMEOUT, "collective %llu did not finish in %lld ms",
                              (unsigned long long)t, (long long)timeout_ms);
            break;
        }
    }
    if (rc == FS_OK)
        rc = ticket_status(c, t, err);
    fs__unlock(&c->qlock);
    return rc;
}

uint64_t fs_comm_completed(fs_comm_t *c)
{
    if (forked(c))
        return 0;
    fs__lock(&c->qlock);
    uint64_t done = c->completed;
    fs__unlock(&c->qlock);
    return done;
}

void fs_comm_shutdown_waiters(fs_comm_t *c)
{
    if (forked(c))
        return;
    fs__lock(&c->qlock);
    c->waiters_shutdown = 1;
    fs__cond_broadcast(&c->done_cv);
    fs__unlock(&c->qlock);
}

int fs_comm_run(fs_comm_t *c, const fs_coll_args_t *a, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    int rc = check_call(c, a, err);
    if (rc != FS_OK)
        return rc;
    fs__lock(&c->qlock);
    if (c->q_len == 0 && c->submitted == c->completed) {
        /* Idle: run here (no thread hand-off); the worker waits on exec_lock if needed. */
        fs__lock(&c->exec_lock);
        fs__unlock(&c->qlock);
        rc = fs__coll_execute(&c->shm, a, c->opts.timeout_ms, err);
        fs__unlock(&c->exec_lock);
        return rc;
    }
    uint64_t t = 0;
    rc = enqueue(c, a, &t, err);
    fs__unlock(&c->qlock);
    return rc != FS_OK ? rc : fs_comm_wait(c, t, -1, err);
}

/* ------------------------------------------------------------------ */
/* Convenience wrappers                                               */
/* ------------------------------------------------------------------ */

static int run_kind(fs_comm_t *c, int kind, const void *send, void *recv, size_t count, int dtype,
                    int op, int root, fs_error_t *err)
{
    fs_coll_args_t a = {.kind = kind,
                        .dtype = dtype,
                        .op = op,
                        .root = root,
                        .send = send,
                        .recv = recv,
                        .count = count};
    return fs_comm_run(c, &a, err);
}

int fs_allreduce(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype, int op,
                 fs_error_t *err)
{
    return run_kind(c, FS_COLL_ALLREDUCE, send, recv, count, dtype, op, 0, err);
}

int fs_broadcast(fs_comm_t *c, void *buf, size_t count, int dtype, int root, fs_error_t *err)
{
    return run_kind(c, FS_COLL_BROADCAST, NULL, buf, count, dtype, 0, root, err);
}

int fs_allgather(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype,
                 fs_error_t *err)
{
    return run_kind(c, FS_COLL_ALLGATHER, send, recv, count, dtype, 0, 0, err);
}

int fs_reduce_scatter(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype, int op,
                      fs_error_t *err)
{
    return run_kind(c, FS_COLL_REDUCE_SCATTER, send, recv, count, dtype, op, 0, err);
}

int fs_reduce_root(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype, int op,
                   int root, fs_error_t *err)
{
    return run_kind(c, FS_COLL_REDUCE, send, recv, count, dtype, op, root, err);
}

int fs_gather(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype, int root,
              fs_error_t *err)
{
    return run_kind(c, FS_COLL_GATHER, send, recv, count, dtype, 0, root, err);
}

int fs_scatter(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype, int root,
               fs_error_t *err)
{
    return run_kind(c, FS_COLL_SCATTER, send, recv, count, dtype, 0, root, err);
}

int fs_alltoall(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype,
                fs_error_t *err)
{
    return run_kind(c, FS_COLL_ALLTOALL, send, recv, count, dtype, 0, 0, err);
}

int fs_barrier(fs_comm_t *c, fs_error_t *err)
{
    return run_kind(c, FS_COLL_BARRIER, NULL, NULL, 0, 0, 0, 0, err);
}
