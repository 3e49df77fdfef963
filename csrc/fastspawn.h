/*
 * fastspawn.h - the one public C header of fastspawn.
 *
 * Everything here is plain C11 + POSIX/Linux: no Python, no torch, no CUDA.
 * Conventions (after libuv):
 *   - every public symbol starts with fs_ / FS_;
 *   - functions that can fail return an int status: FS_OK (0) or a negative
 *     FS_E* code, and fill a caller-provided fs_error_t with a message that
 *     says what went wrong;
 *   - functions never print and never exit the process.
 */
#ifndef FASTSPAWN_H
#define FASTSPAWN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ */
/* Errors                                                             */
/* ------------------------------------------------------------------ */

enum fs_status {
    FS_OK = 0,
    FS_EINVAL = -1,     /* bad argument from the caller */
    FS_ESYS = -2,       /* a system call failed; fs_error_t.sys_errno says why */
    FS_ETIMEOUT = -3,   /* a deadline passed */
    FS_ECLOSED = -4,    /* the peer closed the connection / pipe */
    FS_EPROTO = -5,     /* malformed or unexpected message */
    FS_EAUTH = -6,      /* authentication failed */
    FS_EABORTED = -7,   /* the operation was aborted (communicator aborted) */
    FS_EPEER = -8,      /* a peer process died or exited */
    FS_EMISMATCH = -9,  /* ranks disagree (sizes, dtypes, ops, world sizes) */
    FS_ENOMEM = -10,    /* out of memory */
    FS_ETOOBIG = -11,   /* a size limit was exceeded */
    FS_ENOTFOUND = -12, /* no such key / entry */
    FS_EINTR = -13      /* interrupted by a signal; the caller decides whether to retry */
};

#define FS_ERRMSG_LEN 512

typedef struct fs_error {
    int code;      /* one of enum fs_status */
    int sys_errno; /* errno for FS_ESYS, else 0 */
    char msg[FS_ERRMSG_LEN];
} fs_error_t;

/* Clear *err (code FS_OK, empty message). */
void fs_error_clear(fs_error_t *err);
/* Fill *err and return code, so callers can write `return fs_error_set(...)`. */
int fs_error_set(fs_error_t *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Like fs_error_set(FS_ESYS, ...) with errno appended as ": strerror". */
int fs_error_sys(fs_error_t *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A stable name for a status code ("FS_ETIMEOUT"). */
const char *fs_status_name(int code);

/* Monotonic clock in milliseconds; deadlines are absolute values of it. */
int64_t fs_now_ms(void);

/* ------------------------------------------------------------------ */
/* Supervisor (supervise.c): start, watch and stop a group of ranks     */
/* ------------------------------------------------------------------ */

/* State of one rank as the supervisor sees it. */
enum fs_proc_state {
    FS_PROC_UNUSED = 0,  /* slot not started */
    FS_PROC_RUNNING = 1, /* started, not exited */
    FS_PROC_EXITED = 2,  /* exited; exit_status valid */
};

/* Decoded exit status: exactly one of exit_code >= 0 or term_signal > 0. */
typedef struct fs_exit {
    int exit_code;   /* >= 0 when the process exited, else -1 */
    int term_signal; /* > 0 when a signal killed it, else 0 */
} fs_exit_t;

typedef struct fs_proc {
    pid_t pid;
    int pidfd;        /* exit notification; -1 where pidfd_open is missing */
    int report_fd;    /* read end of the rank's report pipe, -1 when closed */
    int is_child;     /* 1 if we may reap it (waitid); 0 if another process does */
    int state;        /* enum fs_proc_state */
    int exit_order;   /* 1 for the first rank seen to exit, 2 for the next, ... */
    int killed_by_us; /* 1 once the supervisor signalled it */
    int gone;         /* its pidfd fired: exited, even if the status is not known yet */
    fs_exit_t exit;
    unsigned char *report; /* bytes the rank wrote to its report pipe */
    size_t report_len, report_cap;
} fs_proc_t;

typedef struct fs_group fs_group_t;

/* Options for children forked by fs_group_fork(). */
typedef struct fs_fork_opts {
    int new_process_group;   /* setpgid(0, 0) so a kill reaches the rank's descendants */
    int parent_death_signal; /* PR_SET_PDEATHSIG signal, 0 for none */
    int guardian_fd;         /* fd the child must close (launcher-only pipe end), -1 for none */
} fs_fork_opts_t;

/* Create a group for nprocs ranks. */
int fs_group_new(int nprocs, fs_group_t **out, fs_error_t *err);
/* Kill (SIGKILL) and reap whatever is still running, close fds, free. */
void fs_group_free(fs_group_t *g);
int fs_group_size(const fs_group_t *g);
const fs_proc_t *fs_group_proc(const fs_group_t *g, int index);

/*
 * Fork rank `index`. In the parent returns the child's pid (> 0); in the child
 * returns 0 after the child-side setup (process group, parent-death signal,
 * closing fds it must not hold), all done with async-signal-safe calls only.
 * *report_wfd receives, in the child, the write end of its report pipe.
 * The caller (e.g. the CPython binding) handles interpreter fork hooks.
 */
pid_t fs_group_fork(fs_group_t *g, int index, const fs_fork_opts_t *opts, int *report_wfd,
                    fs_error_t *err);

/*
 * Create the report pipe for rank `index` without forking: the write end is
 * returned in *report_wfd (close-on-exec) for the caller to hand to a process
 * it starts itself; then call fs_group_adopt() with the pid.
 */
int fs_group_prepare_report(fs_group_t *g, int index, int *report_wfd, fs_error_t *err);
/*
 * Watch a rank started by other means (multiprocessing, a zygote). is_child:
 * whether this process is its parent and may reap it. When it is not, its
 * exit status must come from fs_group_set_exit() or a status fd.
 */
int fs_group_adopt(fs_group_t *g, int index, pid_t pid, int is_child, fs_error_t *err);
/* Record the exit status of a rank that another process reaped. */
int fs_group_set_exit(fs_group_t *g, int index, int wait_status, fs_error_t *err);
/*
 * Read exit statuses from fd: a stream of records {int32 pid, int32 wait status}
 * in host byte order, written by the process that reaps the ranks (the zygote).
 * The group takes ownership of fd.
 */
int fs_group_attach_status_fd(fs_group_t *g, int fd, fs_error_t *err);

/*
 * Wait until at least one more rank exits, or timeout_ms passes (-1: no
 * limit). Reads report pipes while waiting so a rank never blocks on a full
 * pipe. Returns the number of exit events during this call (>= 0; 0 on
 * timeout), FS_EINTR when a signal arrived, or another negative code. An exit
 * event is a recorded exit status, or a rank reaped elsewhere whose pidfd
 * fired (proc.gone) while its status is still to come (fs_group_set_exit).
 */
int fs_group_wait(fs_group_t *g, int timeout_ms, fs_error_t *err);
/* Number of ranks still running. */
int fs_group_running(const fs_group_t *g);

/*
 * Stop every running rank: send `sig` to each rank's process group, wait up to
 * grace_ms for them to exit, then SIGKILL what is left (process groups too)
 * and reap. grace_ms < 0 waits without limit before the SIGKILL... never: it
 * is clamped to 0. Returns FS_OK or a negative code (only on internal error).
 */
int fs_group_terminate(fs_group_t *g, int sig, int grace_ms, fs_error_t *err);
/* Send sig to every running rank's process group (no waiting). */
int fs_group_signal(fs_group_t *g, int sig, fs_error_t *err);

/*
 * Fork one rank outside any group (the zygote does this): in the child the
 * same async-signal-safe setup as fs_group_fork, returning 0; in the parent
 * the pid.
 */
pid_t fs_fork_rank(const fs_fork_opts_t *opts, fs_error_t *err);

/*
 * Child-side setup for a process started by other means (the Python rank
 * entry point of multiprocessing's spawn/forkserver): own process group and
 * parent-death signal with the getppid race check against expected_ppid.
 * Returns FS_OK, or FS_EPEER when the expected parent is already gone.
 */
int fs_child_setup(int new_process_group, int parent_death_signal, pid_t expected_ppid,
                   fs_error_t *err);

/* ------------------------------------------------------------------ */
/* Guardian (guardian.c): a tiny process that kills every registered    */
/* rank process group when the launcher dies, even by SIGKILL.          */
/* ------------------------------------------------------------------ */

typedef struct fs_guardian {
    pid_t pid;    /* the guardian process */
    int write_fd; /* launcher's end of the pipe; EOF tells the guardian to act */
    pid_t owner;  /* the launcher pid that created it (detects use after fork) */
} fs_guardian_t;

/* Fork the guardian. Its only open fd is the pipe's read end. */
int fs_guardian_start(fs_guardian_t *gd, fs_error_t *err);
/* Register / unregister a process group the guardian must kill. */
int fs_guardian_watch(fs_guardian_t *gd, pid_t pgid, fs_error_t *err);
int fs_guardian_unwatch(fs_guardian_t *gd, pid_t pgid, fs_error_t *err);
/* Close the pipe (the guardian then kills what is registered) and reap it. */
int fs_guardian_stop(fs_guardian_t *gd, int timeout_ms, fs_error_t *err);

/* Signal names: "SIGKILL" for 9; NULL for unknown numbers. */
const char *fs_signal_name(int sig);

/* >>> store API (store.c) >>> */
/* ------------------------------------------------------------------ */
/* Store (store_proto.c, store_server.c, store_client.c): the          */
/* rendezvous key-value store, with torch c10d Store semantics.        */
/* ------------------------------------------------------------------ */

#define FS_STORE_MAX_KEY 4096u  /* bytes in one key */
#define FS_STORE_MAX_KEYS 1024u /* keys in one request (wait, check, multi_*) */
#define FS_STORE_DEFAULT_MAX_VALUE ((size_t)64 << 20) /* bytes in one value */
#define FS_STORE_TOKEN_LEN 64         /* hex characters made by fs_store_make_token */
#define FS_STORE_DEFAULT_TIMEOUT (-1) /* timeout_ms: the client's default */
#define FS_STORE_NO_TIMEOUT INT64_MAX /* timeout_ms: wait without limit */

typedef struct fs_store_server fs_store_server_t;

typedef struct fs_store_server_opts {
    const char *host;      /* address or name to bind; NULL: "127.0.0.1"; "": every address */
    int port;              /* 0: an ephemeral port (read it back with fs_store_server_port) */
    const char *token;     /* required: what every connection must present first */
    const char *unix_path; /* also listen on a Unix socket: "@name" (abstract), "@" (abstract,
                              named for you) or a path; NULL: TCP only */
    size_t max_value_size; /* 0: FS_STORE_DEFAULT_MAX_VALUE */
    int auth_timeout_ms;   /* close a connection silent this long before authenticating; 0: 30 s */
} fs_store_server_opts_t;

/*
 * Start the server thread. Keys live as long as the server. A process forked
 * while it runs has the server's sockets closed in the child (pthread_atfork),
 * so a rank never holds the launcher's port or another rank's connection open.
 */
int fs_store_server_start(const fs_store_server_opts_t *opts, fs_store_server_t **out,
                          fs_error_t *err);
/* Wake and join the thread, close every socket, free. In a forked child: no-op. */
void fs_store_server_stop(fs_store_server_t *s);
/* The bound numeric address ("127.0.0.1", "::1") and port. */
const char *fs_store_server_host(const fs_store_server_t *s);
int fs_store_server_port(const fs_store_server_t *s);
/* The Unix socket ("@name" or a path), or NULL when TCP only. */
const char *fs_store_server_unix_path(const fs_store_server_t *s);
/* Connections now open (authenticated or not). */
size_t fs_store_server_num_clients(const fs_store_server_t *s);
/* FS_OK while the server thread runs; else the error that stopped it. */
int fs_store_server_check(const fs_store_server_t *s, fs_error_t *err);
/* FS_STORE_TOKEN_LEN hex characters from getrandom() + NUL into out (cap >= 65). */
int fs_store_make_token(char *out, size_t cap, fs_error_t *err);

typedef struct fs_store_client fs_store_client_t;

typedef struct fs_store_client_opts {
    const char *host; /* address or name; or "unix:PATH" / "unix:@NAME" (port unused) */
    int port;
    const char *token;
    int64_t connect_timeout_ms; /* keep retrying (backoff) this long; <= 0: 60 s */
    int64_t timeout_ms;         /* default per-call timeout; <= 0: 300 s */
    int interruptible;          /* 1: a signal makes blocking calls return FS_EINTR (request
                                   cancelled; retry with what is left of the deadline) */
} fs_store_client_opts_t;

/* Connect (retrying with exponential backoff until the deadline) and authenticate. */
int fs_store_connect(const fs_store_client_opts_t *opts, fs_store_client_t **out, fs_error_t *err);
/* Close and free. Not concurrent with other calls on c (see fs_store_client_shutdown). */
void fs_store_close(fs_store_client_t *c);
/* Thread-safe: make a blocked call return (FS_ECLOSED) and every later call fail. */
void fs_store_client_shutdown(fs_store_client_t *c);
void fs_store_client_set_timeout(fs_store_client_t *c, int64_t timeout_ms);
int64_t fs_store_client_timeout(const fs_store_client_t *c);

/*
 * Operations (torch c10d semantics). Keys are NUL-terminated, at most
 * FS_STORE_MAX_KEY bytes. timeout_ms: >= 0, FS_STORE_DEFAULT_TIMEOUT or
 * FS_STORE_NO_TIMEOUT. A client is thread-safe (calls are serialised).
 * Values returned through void ** are malloc'd (a NUL follows the bytes, not
 * counted in the length) and the caller frees them.
 */
int fs_store_set(fs_store_client_t *c, const char *key, const void *val, size_t len,
                 int64_t timeout_ms, fs_error_t *err);
/* Blocks until key exists; FS_ETIMEOUT names it. */
int fs_store_get(fs_store_client_t *c, const char *key, void **val, size_t *len, int64_t timeout_ms,
                 fs_error_t *err);
/*
 * Like fs_store_get without the copy: *val points into the client's receive
 * buffer, valid until the next call on c (threads sharing c must serialise the
 * call and the use of the view).
 */
int fs_store_get_view(fs_store_client_t *c, const char *key, const void **val, size_t *len,
                      int64_t timeout_ms, fs_error_t *err);
/* Atomic counter stored as decimal text ("3"); a missing key counts as 0. */
int fs_store_add(fs_store_client_t *c, const char *key, int64_t delta, int64_t *result,
                 int64_t timeout_ms, fs_error_t *err);
/*
 * If the key holds `expected` (or is missing and expected is empty), store
 * `desired`. Returns in *cur the value now stored (torch: when the key is
 * missing and expected is not empty, `expected` itself).
 */
int fs_store_compare_set(fs_store_client_t *c, const char *key, const void *expected,
                         size_t expected_len, const void *desired, size_t desired_len, void **cur,
                         size_t *cur_len, int64_t timeout_ms, fs_error_t *err);
/* Blocks until every key exists; FS_ETIMEOUT names the missing ones. */
int fs_store_wait(fs_store_client_t *c, const char *const *keys, size_t n, int64_t timeout_ms,
                  fs_error_t *err);
/* *all = 1 when every key exists (no waiting). */
int fs_store_check(fs_store_client_t *c, const char *const *keys, size_t n, int *all,
                   int64_t timeout_ms, fs_error_t *err);
/* present[i] = 1 when keys[i] exists; n may exceed FS_STORE_MAX_KEYS (batched). */
int fs_store_check_each(fs_store_client_t *c, const char *const *keys, size_t n, uint8_t *present,
                        int64_t timeout_ms, fs_error_t *err);
/* *deleted = 1 when the key existed. */
int fs_store_delete(fs_store_client_t *c, const char *key, int *deleted, int64_t timeout_ms,
                    fs_error_t *err);
int fs_store_num_keys(fs_store_client_t *c, int64_t *n, int64_t timeout_ms, fs_error_t *err);
/* Blocks until every key exists; vals[i] / lens[i] as for fs_store_get. */
int fs_store_multi_get(fs_store_client_t *c, const char *const *keys, size_t n, void **vals,
                       size_t *lens, int64_t timeout_ms, fs_error_t *err);
/* multi_get with views, as fs_store_get_view. */
int fs_store_multi_get_view(fs_store_client_t *c, const char *const *keys, size_t n,
                            const void **vals, size_t *lens, int64_t timeout_ms, fs_error_t *err);
/* Sets every key in one request (applied together). */
int fs_store_multi_set(fs_store_client_t *c, const char *const *keys, const void *const *vals,
                       const size_t *lens, size_t n, int64_t timeout_ms, fs_error_t *err);
/* Append bytes to the key's value (created when missing). */
int fs_store_append(fs_store_client_t *c, const char *key, const void *val, size_t len,
                    int64_t timeout_ms, fs_error_t *err);
/*
 * Barrier of world_size ranks under a single-use name: each rank sets
 * "<name>/arrived/<rank>", adds 1 to "<name>/count"; the last sets
 * "<name>/done"; all wait for it. On timeout FS_ETIMEOUT names the ranks that
 * did not arrive.
 */
int fs_store_barrier(fs_store_client_t *c, const char *name, int world_size, int rank,
                     int64_t timeout_ms, fs_error_t *err);
/* <<< store API <<< */

/* >>> shared-memory collectives API (shm.c, coll_cpu.c) >>> */

/*
 * A communicator joins the `world_size` ranks of one machine through one POSIX
 * shared-memory segment. Rank 0 creates it under a name from fs_comm_make_name()
 * (the caller passes the name to the other ranks, e.g. through a store); the
 * others open it. The name is unlinked as soon as every rank has mapped it.
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

typedef struct fs_comm_opts {
    int64_t timeout_ms;         /* per collective; <= 0: 30 minutes */
    int64_t connect_timeout_ms; /* fs_comm_create; <= 0: 60 s */
    size_t slot_bytes;          /* shared buffer per rank (two halves); 0: default */
    size_t oneshot_max;         /* one-shot all_reduce up to this many bytes; 0: default */
    int64_t spin_ns;            /* spin with pause first; < 0: automatic (cores vs ranks) */
    int64_t yield_ns;           /* then poll with sched_yield before sleeping; < 0: automatic */
    int64_t liveness_ms;        /* how often a sleeping waiter checks peers; <= 0: 100 */
    int no_worker;              /* 1: no worker thread (fs_comm_submit is refused) */
} fs_comm_opts_t;

void fs_comm_opts_init(fs_comm_opts_t *opts);

typedef struct fs_comm fs_comm_t;

#define FS_COMM_NAME_MAX 64
/* A fresh random segment name ("/fastspawn-<hex>") into buf (>= FS_COMM_NAME_MAX). */
int fs_comm_make_name(char *buf, size_t len, fs_error_t *err);

/*
 * Join the communicator: rank 0 creates the segment `name`, the others open it
 * (waiting up to connect_timeout_ms for it to appear). Returns once every rank
 * has mapped it. opts may be NULL (defaults).
 */
int fs_comm_create(const char *name, int rank, int world_size, const fs_comm_opts_t *opts,
                   fs_comm_t **out, fs_error_t *err);
/*
 * Leave: queued collectives still run (each within its own deadline), then the
 * worker stops and the segment is unmapped. Peers that later wait for this
 * rank get FS_EPEER. NULL is a no-op. In a child forked after fs_comm_create
 * the communicator cannot be used (calls fail with FS_EINVAL); destroying it
 * there only frees the child's copy and leaves the parent's rank alone.
 */
void fs_comm_destroy(fs_comm_t *comm);
/* Abort: every pending and later collective here and on every peer fails. */
void fs_comm_abort(fs_comm_t *comm, const char *reason);
int fs_comm_rank(const fs_comm_t *comm);
int fs_comm_world_size(const fs_comm_t *comm);
/* FS_OK, or the code the communicator was aborted with; msg (may be NULL) gets why. */
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
/* <<< shared-memory collectives API <<< */

#ifdef __cplusplus
}
#endif
#endif /* FASTSPAWN_H */
