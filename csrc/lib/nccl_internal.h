/*
 * nccl_internal.h - what nccl_comm.c, nccl_coll.c and nccl_work.c share:
 * the communicator and work structs, and their internal helpers.
 *
 * Locking: one mutex per communicator (mu) guards its state, its work list
 * and every NCCL call on its ncclComm_t, so the watchdog's
 * ncclCommGetAsyncError / ncclCommAbort never race an enqueue or a destroy.
 * Waits on NCCL (non-blocking init, an enqueue that returned ncclInProgress)
 * poll with mu released, so the watchdog can abort in between.
 */
#ifndef FS_NCCL_INTERNAL_H
#define FS_NCCL_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>

#include "cuda_abi.h"
#include "internal.h"
#include "fastspawn/nccl.h"
#include "nccl_abi.h"

enum fs__work_state { FS__WORK_PENDING = 0, FS__WORK_DONE = 1, FS__WORK_FAILED = 2 };

struct fs_nccl_work {
    atomic_int refs;           /* the caller's and the watchdog list's */
    struct fs_nccl_comm *comm; /* holds a reference on the communicator */
    struct fs_nccl_work *next; /* in comm->works (under comm->mu) */
    fs__cudaEvent_t end;       /* recorded on the communication stream after the NCCL call */
    uint64_t seq;
    int kind, dtype, nops; /* nops > 1: a group; kind and dtype are its first op's */
    size_t count;
    int64_t deadline_ms;
    int state; /* enum fs__work_state, under comm->mu */
};

/* A premultiplier reduction op made for one call, destroyed once NCCL has the call. */
#define FS__MAX_GROUP_REDOPS 64

struct fs_nccl_comm {
    pthread_mutex_t mu;
    pthread_cond_t wake; /* the watchdog sleeps on it between looks */
    atomic_int refs;     /* the owner's and one per live work */
    const fs__nccl_api_t *nc;
    const fs__cuda_api_t *cu;
    fs__ncclComm_t nccl; /* NULL once aborted or destroyed */
    int rank, world, device, nonblocking;
    pid_t pid;               /* the process that created it; forked copies are inert */
    fs__cudaStream_t stream; /* the communication stream */
    fs__cudaEvent_t ready;   /* recorded on the caller's stream before each enqueue */
    void *scratch;           /* one device byte for barrier() */
    int64_t timeout_ms, poll_ms;
    uint64_t seq;
    int status;                              /* FS_OK, or the first error (sticky) */
    fs_error_t error;                        /* its message */
    struct fs_nccl_work *works, *works_tail; /* outstanding, in enqueue order */
    fs__cudaEvent_t free_events[32];         /* end events of released works, for reuse */
    int nfree_events;
    /* The open group (group_depth > 0), owned by group_thread. */
    int group_depth, group_nops, group_kind, group_dtype;
    size_t group_count;
    pthread_t group_thread;
    fs__ncclRedOp_t group_redops[FS__MAX_GROUP_REDOPS];
    int group_nredops;
    /* The watchdog. */
    pthread_t watchdog;
    int watchdog_started, closing;
};

/* nccl_comm.c */

/*
 * Lock mu for a public call. In a forked child, whose copy of mu may be held
 * forever by a thread the fork did not copy, refuse without touching it.
 */
int fs__comm_enter(struct fs_nccl_comm *c, fs_error_t *err);
/* FS_OK, or why the communicator cannot be used (mu held): its error, a fork, closing. */
int fs__comm_usable(struct fs_nccl_comm *c, fs_error_t *err);
/*
 * Record the communicator's first error and abort it (mu held): the NCCL
 * communicator is aborted, every outstanding work fails. Returns the
 * recorded code (the first error's, when there already was one).
 */
int fs__comm_fail(struct fs_nccl_comm *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Copy the communicator's error into *err and return its code (mu held). */
int fs__comm_error(struct fs_nccl_comm *c, fs_error_t *err);
/* Map an NCCL result to an FS_E* code. */
int fs__nccl_code(fs__ncclResult_t r);
/* "ncclRemoteError (remote process exited...)", plus ncclGetLastError where there is one. */
void fs__nccl_describe(const fs__nccl_api_t *nc, fs__ncclResult_t r, char *buf, size_t cap);
/*
 * Wait for a non-blocking NCCL call that returned ncclInProgress (mu held,
 * released between polls) until it succeeds, fails or deadline_ms passes.
 * Returns the final result; fs__ncclTimeout at the deadline; on abort by
 * another thread (c->nccl became NULL) fs__ncclInvalidUsage.
 */
fs__ncclResult_t fs__nccl_settle(struct fs_nccl_comm *c, fs__ncclResult_t r, int64_t deadline_ms);
void fs__comm_unref(struct fs_nccl_comm *c);
/* Restore-on-exit device switch: fs__device_enter returns the previous device (or -1). */
int fs__device_enter(struct fs_nccl_comm *c, fs_error_t *err, int *prev);
void fs__device_leave(struct fs_nccl_comm *c, int prev);
/* Describes a work in messages: "all_reduce (seq 3, 1024 x float32)". */
void fs__work_describe(const struct fs_nccl_work *w, char *buf, size_t cap);

/* nccl_work.c */

/* A new pending work (mu held): an end event from the pool, refs for the caller if wanted. */
int fs__work_new(struct fs_nccl_comm *c, int with_caller_ref, struct fs_nccl_work **out,
                 fs_error_t *err);
/* Free a work that never got enqueued (mu held). */
void fs__work_discard(struct fs_nccl_work *w);
/* Record the end event on the communication stream and start watching it (mu held). */
int fs__work_launch(struct fs_nccl_work *w, fs_error_t *err);
/* Fail every outstanding work (mu held); used by fs__comm_fail. */
void fs__works_fail_all(struct fs_nccl_comm *c);
/* Start / stop (join) the watchdog thread. */
int fs__watchdog_start(struct fs_nccl_comm *c, fs_error_t *err);
void fs__watchdog_stop(struct fs_nccl_comm *c);
/* Wait (mu held, released between polls) until no work is outstanding or deadline_ms. */
int fs__works_drain(struct fs_nccl_comm *c, int64_t deadline_ms);

/* cuda_loader.c */

/* fs_error_set with "<what> failed: cudaErrorX (text)" and an FS_E* code for the CUDA error. */
int fs__cuda_fail(fs_error_t *err, const fs__cuda_api_t *cu, fs__cudaError_t e, const char *fmt,
                  ...) __attribute__((format(printf, 4, 5)));

#endif /* FS_NCCL_INTERNAL_H */
