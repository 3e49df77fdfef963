/*
 * shm.h - internal to shm.c, coll_cpu.c and comm.c: the shared segment's layout, one
 * rank's view of it (fs__shm_t) and the step/wait primitives the collectives are built
 * on. Not part of the public API (see fastspawn/comm.h). The layers, bottom up:
 * shm_seg.c (the file behind the segment: create, reserve, handle, open and check) <-
 * shm.c (layout, join, steps, abort word) <- coll_cpu.c (algorithms) <- comm.c (the
 * communicator, its worker thread and queue, the public entry points).
 *
 * The segment file. Rank 0 makes it (a memfd by default, else a /dev/shm name), sizes
 * and reserves it, maps it, writes the header with a random cookie and only then hands
 * out its handle, so a peer finds a complete header or nothing. A peer maps the file
 * the handle names and compares the cookie before it reads or writes anything else.
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

#define FS__SHM_MAGIC 0x66732d73686d3031ULL /* "fs-shm01" */
#define FS__SHM_VERSION 2u                  /* 2: the cookie, no ready flag */
#define FS__SHM_COOKIE_LEN 16
#define FS__SHM_ALIGN 4096u
#define FS__SHM_MIN_SLOT_BYTES ((size_t)2 * FS__SHM_ALIGN)

/* What one rank announces for the collective it runs (both ranks must agree). */
struct fs__coll_hdr {
    uint64_t coll_seq; /* 1 for the communicator's first collective */
    uint64_t count;
    int32_t kind, dtype, op, root; /* fields a kind does not use are 0 */
};

enum { FS__RANK_FREE = 0, FS__RANK_JOINED = 1, FS__RANK_CLOSED = 2 };

/* One per rank, 128 bytes so that no two ranks' counters share a cache line pair. */
struct fs__rank_line {
    _Atomic uint64_t seq;       /* last posted step; its low 32 bits are the futex word */
    _Atomic uint32_t waiters;   /* peers sleeping on seq: the poster wakes them */
    _Atomic uint32_t state;     /* FS__RANK_* */
    struct fs__coll_hdr hdr[2]; /* header of the collective, per buffer parity */
    _Atomic int32_t pid;
    char pad[128 - 8 - 4 - 4 - 2 * sizeof(struct fs__coll_hdr) - 4];
};
_Static_assert(sizeof(struct fs__rank_line) == 128, "rank line must be 128 bytes");

enum { FS__ABORT_NONE = 0, FS__ABORT_WRITING = 1, FS__ABORT_SET = 2 };

struct fs__shm_hdr {
    uint64_t magic;
    uint32_t version;
    uint32_t world_size;
    uint64_t slot_bytes;
    uint64_t total_bytes;
    uint64_t lines_off; /* byte offsets from the segment start */
    uint64_t slots_off;
    uint64_t oneshot_max; /* rank 0's choice, so every rank picks the same algorithm */
    unsigned char cookie[FS__SHM_COOKIE_LEN]; /* random, also in the handle: the right file */
    _Atomic uint32_t nmapped;                 /* ranks that joined */
    _Alignas(64) _Atomic uint32_t abort_word; /* FS__ABORT_*, on its own cache line */
    int32_t abort_rank;                       /* valid once abort_word == FS__ABORT_SET */
    int32_t abort_code;
    char abort_msg[FS_ERRMSG_LEN];
};

/* ---- the segment file (shm_seg.c) ------------------------------------------------ */

/* Handle formats, private to the library (the C tests forge bad ones):
     memfd:<pid>:<fd>:<cookie hex>      the peers open /proc/<pid>/fd/<fd>
     named:/fastspawn-<hex>:<cookie hex> the peers shm_open the name */
#define FS__SEG_MEMFD_PREFIX "memfd:"
#define FS__SEG_NAMED_PREFIX "named:"
/* memfd_create's name: /proc/<pid>/fd/<fd> reads "/memfd:fastspawn (deleted)". */
#define FS__SEG_MEMFD_NAME "fastspawn"
#define FS__SEG_NAME_MAX 64

struct fs__seg {
    int kind;                        /* FS_SHM_MEMFD or FS_SHM_NAMED, once made or opened */
    int fd;                          /* rank 0's, open until every rank joined; else -1 */
    int linked;                      /* named: the name may still exist */
    char name[FS__SEG_NAME_MAX];     /* named: the shm name; memfd: the /proc path (messages) */
    char handle[FS_COMM_HANDLE_MAX]; /* rank 0's handle, on every rank */
    unsigned char cookie[FS__SHM_COOKIE_LEN];
    void *base; /* the mapping */
    size_t len;
};

/* What the segment needs, for fs__seg_create and its error messages. */
struct fs__seg_size {
    size_t total, slot_bytes;
    int world;
};

/* Rank 0: a new segment file of sz->total bytes of kind FS_SHM_* (AUTO: $FASTSPAWN_SHM, else a
   memfd, named where memfd_create is refused), reserved and mapped; seg->fd stays open, handle
   and cookie are filled. The caller writes the header, then publishes the handle. */
int fs__seg_create(struct fs__seg *seg, int kind, const struct fs__seg_size *sz, fs_error_t *err);
/* Other ranks: parse handle, open the file it names, check that it is a segment file (memfd:
   ours, sealed), map it. The caller checks the cookie before anything else. */
int fs__seg_open(struct fs__seg *seg, const char *handle, int rank, fs_error_t *err);
/* Every rank joined: rank 0 closes its fd, the name (named) goes. Also on failure: leave no
   name behind. Idempotent; err may be NULL. */
int fs__seg_settle(struct fs__seg *seg, fs_error_t *err);
/* Settle and unmap. forked: a child's copy, whose name (if any) is the parent's to remove. */
void fs__seg_release(struct fs__seg *seg, int forked);

/* ---- one rank's view (shm.c) -------------------------------------------------------- */

/* One rank's view of the segment and the state of its steps. */
typedef struct fs__shm {
    int rank, world;
    struct fs__seg seg;
    /* Set by the caller before fs__shm_create / _open (rank 0's slot_bytes and oneshot_max then
       win on every rank, from the segment's header). */
    size_t slot_bytes, buf_bytes, oneshot_max;
    int64_t spin_ns, yield_ns, liveness_ms, connect_timeout_ms;
    /* Views into seg's mapping. */
    struct fs__shm_hdr *hdr;
    struct fs__rank_line *lines;
    unsigned char *slots;
    pid_t *pids;
    int *pidfds; /* -1 where pidfd_open is missing */
    /* Run state, touched only by the thread running a collective. */
    uint64_t step;     /* last step this rank posted */
    uint64_t all_seen; /* every rank is known to have posted this step */
    uint64_t coll_seq; /* collectives started */
    const void **ins;  /* world_size input pointers for fs_reduce */
    char what[160];    /* the running collective, for error messages */
    /* Failure: the first error this rank saw, and aborts. */
    _Atomic int local_abort; /* set by fs__shm_abort */
    _Atomic int failed;      /* fail_err holds the first error */
    pthread_mutex_t fail_lock;
    int lock_ready; /* fail_lock was initialised */
    fs_error_t fail_err;
} fs__shm_t;

/* Rank and world, and the per-rank arrays; the sizes are the caller's to set. */
int fs__shm_init(fs__shm_t *s, int rank, int world, fs_error_t *err);
/* Rank 0: make the segment (kind FS_SHM_*), write its header and join it as rank 0. */
int fs__shm_create(fs__shm_t *s, int kind, fs_error_t *err);
/* Other ranks: map rank 0's segment from its handle and check its header (rank 0's sizes win). */
int fs__shm_open(fs__shm_t *s, const char *handle, fs_error_t *err);
/* Join (rank 0 did at creation) and wait until every rank did, or one that joined died; then
   the segment file is settled (fs__seg_settle) and the peers' pidfds are open. */
int fs__shm_join(fs__shm_t *s, fs_error_t *err);
/* Leave (peers waiting for this rank then get FS_EPEER), unmap, close, free. forked: in
   a child forked after attach, where only the memory is ours to release. */
void fs__shm_release(fs__shm_t *s, int forked);

/* Buffer (step % 2) of rank q's slot, and the header slot for that step. */
static inline unsigned char *fs__shm_buf(fs__shm_t *s, int q, uint64_t step)
{
    return s->slots + (size_t)q * s->slot_bytes + (size_t)(step & 1) * s->buf_bytes;
}

static inline struct fs__coll_hdr *fs__shm_hdr_of(fs__shm_t *s, int q, uint64_t step)
{
    return &s->lines[q].hdr[step & 1];
}

/* Post step `step` for this rank and wake peers sleeping on it. */
void fs__shm_post(fs__shm_t *s, uint64_t step);
/* Wait until rank q posted `step` (deadline: fs_now_ms value). */
int fs__shm_wait(fs__shm_t *s, int q, uint64_t step, int64_t deadline, fs_error_t *err);
/* Wait until every rank posted `step`. */
int fs__shm_wait_all(fs__shm_t *s, uint64_t step, int64_t deadline, fs_error_t *err);
/* FS_OK, or FS_EABORTED when this rank failed or the segment was aborted earlier. */
int fs__shm_check_usable(fs__shm_t *s, fs_error_t *err);
/* Record err on this rank and abort the segment for all; returns err->code. */
int fs__shm_fail(fs__shm_t *s, const fs_error_t *err);
/* Abort from this rank: every pending and later step here and on every peer fails. */
void fs__shm_abort(fs__shm_t *s, const char *reason);
/* FS_OK, or the code this rank failed or was aborted with (why says why). */
int fs__shm_status(fs__shm_t *s, fs_error_t *why);

#endif /* FS_SHM_H */
