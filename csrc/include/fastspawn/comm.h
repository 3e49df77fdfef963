/*
 * fastspawn/comm.h - collectives of the ranks of one machine over shared memory
 * (shm.c, comm.c, coll_cpu.c) and the reduction kernels (reduce.c).
 * Part of the public C API; include "fastspawn.h" for all of it.
 */
#ifndef FASTSPAWN_COMM_H
#define FASTSPAWN_COMM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "fastspawn/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * A communicator joins the `world_size` ranks of one machine through one
 * shared-memory segment, in two steps:
 *
 *   rank 0:      fs_comm_create(world_size, ...)   makes the segment; then the
 *                caller passes fs_comm_handle() to the others (e.g. through a store)
 *   ranks 1..:   fs_comm_open(handle, rank, ...)   maps it
 *   every rank:  fs_comm_join()                    waits until every rank has
 *
 * The handle is an opaque string (shorter than FS_COMM_HANDLE_MAX) that is only
 * meaningful on this machine until every rank joined. By default the segment has
 * no name anywhere (a memfd, opened by the peers through rank 0's /proc entry),
 * so nothing can be left behind, whoever dies when; its memory is reserved at
 * creation, so a full /dev/shm or memory cgroup is an error there, never a SIGBUS
 * later (see fs_comm_opts_t.shm for the named fallback).
 *
 * Every collective is run by every rank in the same order with matching
 * arguments; a mismatch (kind, dtype, op, count, root) is FS_EMISMATCH on every
 * rank. A peer that exits or dies while others wait for it is FS_EPEER, a peer
 * that does not arrive before the deadline is FS_ETIMEOUT; both name the rank.
 * After any error the communicator is aborted: peers see it, and every later
 * call fails at once with FS_EABORTED.
 *
 * Reductions visit the ranks in order 0..N-1 on every rank, so every rank gets
 * bit-identical results. float16/bfloat16 accumulate in float32 and round once.
 */

enum fs_dtype {
    FS_FLOAT32 = 0,
    FS_FLOAT64 = 1,
    FS_FLOAT16 = 2,
    FS_BFLOAT16 = 3,
    FS_INT8 = 4,
    FS_UINT8 = 5,
    FS_INT32 = 6,
    FS_INT64 = 7,
    FS_BOOL = 8, /* one byte, 0 or 1 */
    FS_DTYPE_COUNT
};

enum fs_redop {
    FS_SUM = 0,
    FS_AVG = 1, /* SUM divided by world_size; floating dtypes only */
    FS_MIN = 2, /* a NaN in any input gives NaN */
    FS_MAX = 3,
    FS_PRODUCT = 4,
    FS_BAND = 5, /* bitwise ops: integer dtypes and bool only */
    FS_BOR = 6,
    FS_BXOR = 7,
    FS_REDOP_COUNT
};

enum fs_coll_kind {
    /* count is the number of elements of one rank's contribution:        */
    FS_COLL_ALLREDUCE = 0,      /* send[count] -> recv[count] on every rank  */
    FS_COLL_BROADCAST = 1,      /* root's recv[count] -> every recv[count]   */
    FS_COLL_ALLGATHER = 2,      /* send[count] -> recv[count * N], by rank   */
    FS_COLL_REDUCE_SCATTER = 3, /* send[count * N] -> recv[count], block r   */
    FS_COLL_REDUCE = 4,         /* send[count] -> root's recv[count]         */
    FS_COLL_GATHER = 5,         /* send[count] -> root's recv[count * N]     */
    FS_COLL_SCATTER = 6,        /* root's send[count * N] -> recv[count]     */
    FS_COLL_ALLTOALL = 7,       /* send[count * N] -> recv[count * N]        */
    FS_COLL_BARRIER = 8,        /* no data                                   */
    FS_COLL_KIND_COUNT
};

/* Bytes per element (0 for an unknown dtype) and stable names. */
size_t fs_dtype_size(int dtype);
const char *fs_dtype_name(int dtype);
const char *fs_redop_name(int op);
const char *fs_coll_name(int kind);

/*
 * out[i] = in[0][i] op in[1][i] op ... op in[nin-1][i], combined in that order
 * (AVG: the SUM divided by nin). out may alias in[0] (and only in[0]).
 * Returns FS_EINVAL for an unsupported dtype/op pair.
 */
int fs_reduce(void *out, const void *const *in, int nin, size_t count, int dtype, int op,
              fs_error_t *err);
/* Which kernel variant the CPU runs ("avx512f", "avx2" or "default"). */
const char *fs_reduce_isa(void);
/* 1 if op is defined for dtype (AVG: floating only; BAND/BOR/BXOR: integers and bool). */
int fs_reduce_supported(int dtype, int op);

/* Defaults for the options below that are left <= 0. */
#define FS_COMM_DEFAULT_TIMEOUT_MS (30LL * 60 * 1000) /* per collective: 30 minutes */
#define FS_COMM_DEFAULT_CONNECT_TIMEOUT_MS 60000LL    /* fs_comm_join: 60 s */
#define FS_COMM_DEFAULT_LIVENESS_MS 100LL             /* a sleeping waiter checks peers */

/* Where rank 0 makes the segment (fs_comm_opts_t.shm). */
enum fs_shm_kind {
    FS_SHM_AUTO = 0,  /* $FASTSPAWN_SHM ("memfd", "named", "auto"); unset or "auto": a
                         memfd, or a named segment where memfd_create is refused */
    FS_SHM_MEMFD = 1, /* memfd_create: no name; the memory counts against the memory cgroup */
    FS_SHM_NAMED = 2  /* shm_open in /dev/shm (mode 0600), unlinked once every rank joined:
                         a rank killed before that leaves the name behind */
};

typedef struct fs_comm_opts {
    int64_t timeout_ms;         /* per collective; <= 0: FS_COMM_DEFAULT_TIMEOUT_MS */
    int64_t connect_timeout_ms; /* fs_comm_join; <= 0: FS_COMM_DEFAULT_CONNECT_TIMEOUT_MS */
    size_t slot_bytes;          /* shared buffer per rank (two halves); 0: default */
    size_t oneshot_max;         /* one-shot all_reduce up to this many bytes; 0: default */
    int64_t spin_ns;            /* spin with pause first; < 0: automatic (cores vs ranks) */
    int64_t yield_ns;           /* then poll with sched_yield before sleeping; < 0: automatic */
    int64_t liveness_ms;        /* how often a sleeping waiter checks peers; <= 0: default */
    int no_worker;              /* 1: no worker thread (fs_comm_submit is refused) */
    int shm;                    /* enum fs_shm_kind (rank 0 only; the handle tells the rest) */
} fs_comm_opts_t;

/* The defaults above; spin_ns and yield_ns automatic. */
void fs_comm_opts_init(fs_comm_opts_t *opts);

typedef struct fs_comm fs_comm_t;

#define FS_COMM_HANDLE_MAX 128

/*
 * Rank 0: create the segment for world_size ranks (sized by opts, its memory
 * reserved: FS_ENOMEM, with what to do, when there is not enough), count rank 0 as
 * joined and return without waiting. Pass fs_comm_handle(*out) to the other ranks,
 * then call fs_comm_join. opts may be NULL (defaults).
 */
int fs_comm_create(int world_size, const fs_comm_opts_t *opts, fs_comm_t **out, fs_error_t *err);
/*
 * Ranks 1..world_size-1: map the segment of rank 0's handle and check it (a handle of
 * another machine, pid namespace or job is an error, and nothing of that file is
 * touched). Returns without waiting; call fs_comm_join next. Rank 0's slot_bytes and
 * oneshot_max win; this rank's timeouts and waiting options are its own.
 */
int fs_comm_open(const char *handle, int rank, int world_size, const fs_comm_opts_t *opts,
                 fs_comm_t **out, fs_error_t *err);
/* The handle of the communicator's segment (rank 0's, on every rank). */
const char *fs_comm_handle(const fs_comm_t *comm);
/*
 * Every rank, once: announce this rank and wait up to connect_timeout_ms until every
 * rank has (a joined rank that dies meanwhile is FS_EPEER at once). Then rank 0
 * closes its descriptor of the segment and the mappings alone keep its memory.
 * Collectives need a joined communicator. On failure the peers are told
 * (FS_EABORTED) and the communicator can only be destroyed.
 */
int fs_comm_join(fs_comm_t *comm, fs_error_t *err);
/*
 * Leave: queued collectives still run (each within its own deadline), then the
 * worker stops and the segment is unmapped. Peers that later wait for this
 * rank get FS_EPEER. NULL is a no-op. In a child forked after fs_comm_create/open
 * the communicator cannot be used (calls fail with FS_EINVAL); destroying it
 * there only frees the child's copy and leaves the parent's rank alone.
 */
void fs_comm_destroy(fs_comm_t *comm);
/* Abort: every pending and later collective here and on every peer fails. */
void fs_comm_abort(fs_comm_t *comm, const char *reason);
int fs_comm_rank(const fs_comm_t *comm);
int fs_comm_world_size(const fs_comm_t *comm);
/* FS_OK, or the code the communicator was aborted with; why (may be NULL) gets why. */
int fs_comm_status(fs_comm_t *comm, fs_error_t *why);

typedef struct fs_coll_args {
    int kind;  /* enum fs_coll_kind */
    int dtype; /* enum fs_dtype */
    int op;    /* enum fs_redop (reductions only) */
    int root;  /* broadcast, reduce, gather, scatter */
    const void *send;
    void *recv;
    size_t count; /* see enum fs_coll_kind */
} fs_coll_args_t;

/* Run one collective in the calling thread (after the queued ones finish). */
int fs_comm_run(fs_comm_t *comm, const fs_coll_args_t *args, fs_error_t *err);

/* Convenience wrappers around fs_comm_run. */
int fs_allreduce(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype, int op,
                 fs_error_t *err);
int fs_broadcast(fs_comm_t *c, void *buf, size_t count, int dtype, int root, fs_error_t *err);
int fs_allgather(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype,
                 fs_error_t *err);
int fs_reduce_scatter(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype, int op,
                      fs_error_t *err);
int fs_reduce_root(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype, int op,
                   int root, fs_error_t *err);
int fs_gather(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype, int root,
              fs_error_t *err);
int fs_scatter(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype, int root,
               fs_error_t *err);
int fs_alltoall(fs_comm_t *c, const void *send, void *recv, size_t count, int dtype,
                fs_error_t *err);
int fs_barrier(fs_comm_t *c, fs_error_t *err);

/*
 * Asynchronous use: the communicator's worker thread runs submitted collectives
 * one at a time in submission order. Tickets count up from 1. The buffers must
 * stay valid until the ticket completes.
 */
int fs_comm_submit(fs_comm_t *comm, const fs_coll_args_t *args, uint64_t *ticket, fs_error_t *err);
/*
 * Wait until `ticket` completes (timeout_ms < 0: no limit) and return its
 * status (error in *err). A ticket not yet submitted is waited for too. Returns
 * FS_ETIMEOUT (ticket still pending) when timeout_ms passes, FS_ECLOSED when
 * the communicator is being destroyed and the ticket will never run.
 */
int fs_comm_wait(fs_comm_t *comm, uint64_t ticket, int64_t timeout_ms, fs_error_t *err);
/* Highest completed ticket (all lower ones completed too). */
uint64_t fs_comm_completed(fs_comm_t *comm);
/* Wake fs_comm_wait callers for tickets not yet submitted: they return FS_ECLOSED. */
void fs_comm_shutdown_waiters(fs_comm_t *comm);

#ifdef __cplusplus
}
#endif
#endif /* FASTSPAWN_COMM_H */
