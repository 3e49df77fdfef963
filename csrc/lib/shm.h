/*
 * shm.h - internal to shm.c and coll_cpu.c: the shared segment's layout, the
 * communicator object and the step/wait primitives the collectives are built on.
 * Not part of the public API (see fastspawn.h).
 *
 * Steps. Every rank has one 64-bit counter `seq`, on its own cache line(s), and a
 * data slot split into two buffers. A collective is a fixed sequence of steps
 * (fixed by kind, dtype, count, world size and slot size, so all ranks agree):
 * at step k a rank may write its buffer k % 2 (and header k % 2), then posts
 * seq = k, then waits for the peers whose data it needs (seq >= k) and reads
 * their buffer k % 2. A rank posts step k only after it finished reading the
 * data of step k - 1, so before writing buffer k % 2 at step k it is enough to
 * see every peer at seq >= k - 1 (they are done with step k - 2, the last user
 * of that buffer). The first step of each collective waits for every rank and
 * compares the headers, so ranks that disagree fail there, before any data
 * moves.
 */
#ifndef FS_SHM_H
#define FS_SHM_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "fastspawn.h"

#define FS_SHM_MAGIC 0x66732d73686d3031ULL /* "fs-shm01" */
#define FS_SHM_VERSION 1u
#define FS_SHM_ALIGN 4096u

/* What one rank announces for the collective it runs (both ranks must agree). */
struct fs_coll_hdr {
    uint64_t coll_seq; /* 1 for the communicator's first collective */
    uint64_t count;
    int32_t kind, dtype, op, root; /* fields a kind does not use are 0 */
};

enum { FS_RANK_FREE = 0, FS_RANK_JOINED = 1, FS_RANK_CLOSED = 2 };

/* One per rank, 128 bytes so that no two ranks' counters share a cache line pair. */
struct fs_rank_line {
    _Atomic uint64_t seq;      /* last posted step; its low 32 bits are the futex word */
    _Atomic uint32_t waiters;  /* peers sleeping on seq: the poster wakes them */
    _Atomic uint32_t state;    /* FS_RANK_* */
    struct fs_coll_hdr hdr[2]; /* header of the collective, per buffer parity */
    _Atomic int32_t pid;
    char pad[128 - 8 - 4 - 4 - 2 * sizeof(struct fs_coll_hdr) - 4];
};
_Static_assert(sizeof(struct fs_rank_line) == 128, "rank line must be 128 bytes");

enum { FS_ABORT_NONE = 0, FS_ABORT_WRITING = 1, FS_ABORT_SET = 2 };

struct fs_shm_hdr {
    uint64_t magic;
    uint32_t version;
    uint32_t world_size;
    uint64_t slot_bytes;
    uint64_t total_bytes;
    uint64_t lines_off; /* byte offsets from the segment start */
    uint64_t slots_off;
    uint64_t oneshot_max;     /* rank 0's choice, so every rank picks the same algorithm */
    _Atomic uint32_t ready;   /* 1 once rank 0 filled this header */
    _Atomic uint32_t nmapped; /* ranks that mapped the segment */
    _Alignas(64) _Atomic uint32_t abort_word; /* FS_ABORT_*, on its own cache line */
    int32_t abort_rank;                       /* valid once abort_word == FS_ABORT_SET */
    int32_t abort_code;
    char abort_msg[FS_ERRMSG_LEN];
};

/* One queued collective. */
struct fs_coll_item {
    fs_coll_args_t args;
    uint64_t ticket;
};

struct fs_comm {
    int rank, world;
    fs_comm_opts_t opts;
    char name[FS_COMM_NAME_MAX];
    void *base;
    size_t map_len;
    struct fs_shm_hdr *hdr;
    struct fs_rank_line *lines;
    unsigned char *slots;
    size_t slot_bytes, buf_bytes;
    pid_t *pids;
    int *pidfds; /* -1 where pidfd_open is missing */
    int64_t spin_ns, yield_ns;
    unsigned fork_gen; /* fork generation of the creating process (see fs_shm_forked) */

    /* Run state, touched only by the thread holding exec_lock. */
    pthread_mutex_t exec_lock;
    uint64_t step;     /* last step this rank posted */
    uint64_t all_seen; /* every rank is known to have posted this step */
    uint64_t coll_seq; /* collectives started */
    const void **ins;  /* world_size input pointers for fs_reduce */
    char what[160];    /* the running collective, for error messages */

    _Atomic int local_abort; /* set by fs_comm_abort / destroy */
    _Atomic int failed;      /* this rank saw an error; fail_err holds it */
    pthread_mutex_t fail_lock;
    fs_error_t fail_err;

    /* Worker thread and its queue (coll_cpu.c). */
    int has_worker;
    pthread_t worker;
    pthread_mutex_t qlock;
    pthread_cond_t q_cv;    /* work arrived or stop */
    pthread_cond_t done_cv; /* a ticket completed or waiters shut down */
    struct fs_coll_item *queue;
    size_t q_cap, q_head, q_len;
    uint64_t submitted, completed;
    uint64_t fail_ticket; /* first ticket that failed, 0 if none */
    fs_error_t ticket_err;
    int stopping, waiters_shutdown;
};

/* Buffer (step % 2) of rank q's slot, and the header slot for that step. */
static inline unsigned char *fs_shm_buf(fs_comm_t *c, int q, uint64_t step)
{
    return c->slots + (size_t)q * c->slot_bytes + (size_t)(step & 1) * c->buf_bytes;
}

static inline struct fs_coll_hdr *fs_shm_hdr_of(fs_comm_t *c, int q, uint64_t step)
{
    return &c->lines[q].hdr[step & 1];
}

/* 1 in a child forked after the communicator was created: it has no worker thread and
 * its locks may be held by threads that did not survive the fork. */
int fs_shm_forked(const fs_comm_t *c);
int fs_shm_forked_error(const fs_comm_t *c, fs_error_t *err);

/* Post step `step` for this rank and wake peers sleeping on it. */
void fs_shm_post(fs_comm_t *c, uint64_t step);
/* Wait until rank q posted `step` (deadline: fs_now_ms value). */
int fs_shm_wait(fs_comm_t *c, int q, uint64_t step, int64_t deadline, fs_error_t *err);
/* Wait until every rank posted `step`. */
int fs_shm_wait_all(fs_comm_t *c, uint64_t step, int64_t deadline, fs_error_t *err);
/* FS_OK, or FS_EABORTED when this communicator failed or was aborted earlier. */
int fs_shm_check_usable(fs_comm_t *c, fs_error_t *err);
/* Record err on this rank and abort the communicator for all; returns err->code. */
int fs_shm_fail(fs_comm_t *c, fs_error_t *err);

/* coll_cpu.c: run one collective (caller holds exec_lock); worker control. */
int fs_coll_execute(fs_comm_t *c, const fs_coll_args_t *a, fs_error_t *err);
int fs_coll_validate(const fs_comm_t *c, const fs_coll_args_t *a, fs_error_t *err);
int fs_coll_worker_start(fs_comm_t *c, fs_error_t *err);
void fs_coll_worker_stop(fs_comm_t *c);

#endif /* FS_SHM_H */
