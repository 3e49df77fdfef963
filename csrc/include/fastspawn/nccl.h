/*
 * fastspawn/nccl.h - CUDA collectives through NCCL, loaded at run time.
 *
 * Nothing here needs CUDA or NCCL to build: libnccl.so.2 and the CUDA runtime
 * (libcudart.so.13/.12/.11.0) are found and loaded with dlopen by
 * fs_nccl_load() / fs_cuda_load(), never at start-up. Device memory, streams
 * and events cross this API as plain pointers and uintptr_t handles, so the
 * caller (e.g. Python passing tensor.data_ptr() and a stream's cuda_stream)
 * needs no CUDA headers either.
 *
 * Semantics follow torch's ProcessGroupNCCL:
 *   - each communicator owns a communication stream; a collective waits on
 *     the caller's stream (an event recorded there), runs on the
 *     communication stream and records an end event: a work;
 *   - fs_nccl_work_wait_stream() orders another stream after a work without
 *     blocking the host (Work.wait()); fs_nccl_work_synchronize() blocks the
 *     host (with a timeout);
 *   - a watchdog thread per communicator watches every work's end event and
 *     NCCL's asynchronous errors; when a work exceeds its timeout or NCCL
 *     reports an error it aborts the communicator, and every later call and
 *     wait returns that first error, which names the collective, its
 *     sequence number and the timeout.
 *
 * Buffers must stay valid (and, for the caching allocator, not be reused)
 * until the work completes on the communication stream.
 */
#ifndef FASTSPAWN_NCCL_H
#define FASTSPAWN_NCCL_H

/* fs_error_t, FS_E* codes and the dtype / op / collective codes. */
#include "fastspawn/comm.h"
#include "fastspawn/error.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ */
/* Loading                                                            */
/* ------------------------------------------------------------------ */

/*
 * Where the libraries are looked for, in order:
 *   1. the path in FASTSPAWN_NCCL_LIBRARY / FASTSPAWN_CUDART_LIBRARY when set
 *      (then nothing else is tried);
 *   2. a copy already loaded in the process (dlopen RTLD_NOLOAD by soname;
 *      torch loads both);
 *   3. each directory in dirs (e.g. torch's site-packages/nvidia/nccl/lib,
 *      nvidia/cu13/lib, nvidia/cuda_runtime/lib);
 *   4. the system's (dlopen by soname: LD_LIBRARY_PATH, ld.so.cache).
 * Loading is process-wide and happens once; later calls return FS_OK at
 * once. A failed search is not remembered: a later call searches again.
 * FS_ENOTFOUND when nothing loads: the message names the variable to set and
 * every place searched with what dlopen said (the full list, which may be
 * longer than fs_error_t holds, is in fs_nccl_search_report()).
 * Loading never initialises CUDA, so a process may still fork afterwards.
 */
int fs_nccl_load(const char *const *dirs, size_t ndirs, fs_error_t *err);
int fs_cuda_load(const char *const *dirs, size_t ndirs, fs_error_t *err);

/* The full text of the last search (NULL before any); valid until the next load call. */
const char *fs_nccl_search_report(void);
const char *fs_cuda_search_report(void);

/* NCCL version as major * 10000 + minor * 100 + patch (2.30.7 -> 23007); 0 when not loaded. */
int fs_nccl_version(void);
/* CUDA runtime version (cudaRuntimeGetVersion: 13000 for 13.0); 0 when not loaded. */
int fs_cuda_runtime_version(void);
/* Paths the libraries were loaded from (NULL when not loaded). */
const char *fs_nccl_library_path(void);
const char *fs_cuda_library_path(void);

/* What the loaded NCCL offers, by the version that introduced it. */
enum fs_nccl_cap {
    FS_NCCL_CAP_ABORT = 1 << 0,       /* ncclCommAbort (2.4) */
    FS_NCCL_CAP_ASYNC_ERROR = 1 << 1, /* ncclCommGetAsyncError (2.4) */
    FS_NCCL_CAP_NONBLOCKING = 1 << 2, /* ncclCommInitRankConfig, blocking = 0 (2.14) */
    FS_NCCL_CAP_FINALIZE = 1 << 3,    /* ncclCommFinalize (2.14) */
    FS_NCCL_CAP_SPLIT = 1 << 4,       /* ncclCommSplit (2.18) */
    FS_NCCL_CAP_PREMUL_SUM = 1 << 5,  /* ncclRedOpCreatePreMulSum, ncclRedOpDestroy (2.11) */
    FS_NCCL_CAP_AVG = 1 << 6,         /* ncclAvg (2.10) */
    FS_NCCL_CAP_BFLOAT16 = 1 << 7,    /* ncclBfloat16 (2.10) */
    FS_NCCL_CAP_FLOAT8 = 1 << 8,      /* ncclFloat8e4m3, ncclFloat8e5m2 (2.24) */
    FS_NCCL_CAP_LAST_ERROR = 1 << 9,  /* ncclGetLastError (2.13) */
};
/* enum fs_nccl_cap bits of the loaded NCCL; 0 when not loaded. */
unsigned fs_nccl_caps(void);

/* Number of CUDA devices; FS_ENOTFOUND (with CUDA's reason) when there is none. */
int fs_cuda_device_count(int *count, fs_error_t *err);

/* ------------------------------------------------------------------ */
/* Codes beyond those of the CPU collectives                          */
/* ------------------------------------------------------------------ */

/*
 * dtype: every enum fs_dtype (FS_BOOL travels as uint8, reduced like torch:
 * SUM as MAX, PRODUCT as MIN) plus these, which only NCCL has.
 */
enum fs_nccl_dtype {
    FS_NCCL_UINT32 = 32,
    FS_NCCL_UINT64 = 33,
    FS_NCCL_FLOAT8_E4M3 = 34, /* torch.float8_e4m3fn; NCCL >= 2.24 */
    FS_NCCL_FLOAT8_E5M2 = 35, /* torch.float8_e5m2; NCCL >= 2.24 */
};

/* op: FS_SUM, FS_AVG (NCCL >= 2.10), FS_MIN, FS_MAX, FS_PRODUCT, and: */
enum fs_nccl_redop {
    /* sum of (scalar * input); the scalar has the dtype; NCCL >= 2.11 */
    FS_NCCL_PREMUL_SUM = 32,
};

/* kind: every enum fs_coll_kind (same counts) plus these. */
enum fs_nccl_kind {
    FS_NCCL_SEND = 32,      /* send[count] -> peer */
    FS_NCCL_RECV = 33,      /* peer -> recv[count] */
    FS_NCCL_ALLTOALLV = 34, /* send_counts/displs[N] -> recv_counts/displs[N], in elements */
};

/* Bytes per element of a dtype code (0 when unknown) and a name for messages. */
size_t fs_nccl_dtype_size(int dtype);
const char *fs_nccl_dtype_name(int dtype);
const char *fs_nccl_kind_name(int kind);

/* ------------------------------------------------------------------ */
/* Communicators                                                      */
/* ------------------------------------------------------------------ */

#define FS_NCCL_UNIQUE_ID_BYTES 128

/* A fresh id (ncclGetUniqueId) on one rank; the caller passes it to the others. */
int fs_nccl_get_unique_id(unsigned char id[FS_NCCL_UNIQUE_ID_BYTES], fs_error_t *err);

typedef struct fs_nccl_comm_opts {
    int64_t init_timeout_ms;  /* non-blocking init deadline; <= 0: 30 minutes */
    int64_t timeout_ms;       /* per work, enforced by the watchdog; <= 0: 30 minutes */
    int64_t watchdog_poll_ms; /* how often the watchdog looks; <= 0: 100 */
    int blocking_init;        /* 1: plain ncclCommInitRank even where non-blocking exists */
    int high_priority_stream; /* 1: the communication stream gets the highest priority */
} fs_nccl_comm_opts_t;

void fs_nccl_comm_opts_init(fs_nccl_comm_opts_t *opts);

typedef struct fs_nccl_comm fs_nccl_comm_t;
typedef struct fs_nccl_work fs_nccl_work_t;

/*
 * Join the communicator of world_size ranks named by id, as `rank`, on CUDA
 * device `device`. Needs both libraries loaded. Where NCCL supports it (and
 * opts->blocking_init is 0) the init is non-blocking and bounded by
 * init_timeout_ms: on expiry the communicator is aborted and FS_ETIMEOUT
 * names the rank and the deadline. The caller's current device is restored.
 */
int fs_nccl_comm_create(const unsigned char id[FS_NCCL_UNIQUE_ID_BYTES], int rank, int world_size,
                        int device, const fs_nccl_comm_opts_t *opts, fs_nccl_comm_t **out,
                        fs_error_t *err);
/*
 * Leave: wait up to timeout_ms (< 0: each work's own deadline) for the
 * outstanding works, finalize and destroy the NCCL communicator (aborting it
 * when that does not finish in time), stop the watchdog and free. Works the
 * caller still holds stay valid (fs_nccl_work_release frees them). Returns
 * FS_OK, or why the end was not clean (the communicator is gone either way).
 * A group the calling thread left open is ended first; one another thread
 * has open must be ended before. NULL is a no-op. In a child forked after
 * create only memory is freed, and every other call there fails at once
 * (FS_EINVAL) without touching locks a thread of the parent may have held.
 */
int fs_nccl_comm_destroy(fs_nccl_comm_t *comm, int64_t timeout_ms, fs_error_t *err);
/* Abort now (ncclCommAbort): pending works fail, later calls return FS_EABORTED with reason. */
void fs_nccl_comm_abort(fs_nccl_comm_t *comm, const char *reason);
/* FS_OK while usable, else the communicator's first error (into *why when not NULL). */
int fs_nccl_comm_status(fs_nccl_comm_t *comm, fs_error_t *why);
int fs_nccl_comm_rank(const fs_nccl_comm_t *comm);
int fs_nccl_comm_world_size(const fs_nccl_comm_t *comm);
int fs_nccl_comm_device(const fs_nccl_comm_t *comm);
/* 1 when init was non-blocking (and the watchdog can abort a stuck enqueue). */
int fs_nccl_comm_nonblocking(const fs_nccl_comm_t *comm);
/* The communication stream (a cudaStream_t), e.g. for the caching allocator's record_stream. */
uintptr_t fs_nccl_comm_stream(const fs_nccl_comm_t *comm);
/* Sequence number of the last collective or group enqueued (the first is 1). */
uint64_t fs_nccl_comm_seq(fs_nccl_comm_t *comm);

/* ------------------------------------------------------------------ */
/* Collectives                                                        */
/* ------------------------------------------------------------------ */

typedef struct fs_nccl_args {
    int kind;         /* enum fs_coll_kind or enum fs_nccl_kind */
    int dtype;        /* enum fs_dtype or enum fs_nccl_dtype */
    int op;           /* enum fs_redop or FS_NCCL_PREMUL_SUM (reductions only) */
    int root;         /* broadcast, reduce, gather, scatter; the peer of send / recv */
    const void *send; /* device pointers; broadcast: NULL means in place (recv) */
    void *recv;
    size_t count; /* as for the CPU collectives (one rank's contribution) */
    /* FS_NCCL_ALLTOALLV: world_size entries each, in elements */
    const size_t *send_counts, *send_displs, *recv_counts, *recv_displs;
    /* FS_NCCL_PREMUL_SUM: one element of dtype, in host memory (read at the call) or device
     * memory (read when the collective runs) */
    const void *premul_scalar;
    int premul_scalar_on_device;
    uintptr_t stream; /* the caller's cudaStream_t (0: the legacy default stream) */
} fs_nccl_args_t;

/*
 * Enqueue one collective. Returns once it is enqueued (not done); *work (may
 * be NULL when the caller does not need one) gets the work to wait on, which
 * the caller releases with fs_nccl_work_release. Inside a group *work is set
 * to NULL: fs_nccl_group_end returns the group's work.
 * Invalid arguments (dtype or op the loaded NCCL lacks, root out of range)
 * are FS_EINVAL and leave the communicator usable; any other failure aborts it.
 */
int fs_nccl_run(fs_nccl_comm_t *comm, const fs_nccl_args_t *args, fs_nccl_work_t **work,
                fs_error_t *err);

/*
 * Coalesce: collectives enqueued between start and end (from the thread that
 * called start) launch together (ncclGroupStart/End) and complete as one
 * work with one sequence number. Groups nest; only the outermost end launches.
 * *work gets NULL when the group was empty.
 */
int fs_nccl_group_start(fs_nccl_comm_t *comm, fs_error_t *err);
int fs_nccl_group_end(fs_nccl_comm_t *comm, fs_nccl_work_t **work, fs_error_t *err);

/* ------------------------------------------------------------------ */
/* Works                                                              */
/* ------------------------------------------------------------------ */

/* *done = 1 when the work completed on the device, 0 while pending; an error once it failed. */
int fs_nccl_work_query(fs_nccl_work_t *work, int *done, fs_error_t *err);
/*
 * Block the host until the work completes, fails, or timeout_ms passes
 * (FS_ETIMEOUT; the work goes on). timeout_ms < 0: until its own deadline,
 * at which the watchdog fails it.
 */
int fs_nccl_work_synchronize(fs_nccl_work_t *work, int64_t timeout_ms, fs_error_t *err);
/* Make `stream` wait for the work (cudaStreamWaitEvent); does not block the host. */
int fs_nccl_work_wait_stream(fs_nccl_work_t *work, uintptr_t stream, fs_error_t *err);
uint64_t fs_nccl_work_seq(const fs_nccl_work_t *work);
/* Drop the caller's reference; the work may still be pending. NULL is a no-op. */
void fs_nccl_work_release(fs_nccl_work_t *work);

#ifdef __cplusplus
}
#endif
#endif /* FASTSPAWN_NCCL_H */
