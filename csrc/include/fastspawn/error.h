/*
 * fastspawn/error.h - status codes and the error record every fastspawn call fills.
 * Part of the public C API; include "fastspawn.h" for all of it.
 *
 * Conventions of the whole API (after libuv):
 *   - every public symbol starts with fs_ / FS_; the library's internal cross-file
 *     helpers use fs__ / FS__ and are not part of the API;
 *   - a function that can fail returns an int status: FS_OK (0) or a negative FS_E*
 *     code (functions returning a pid return the code in its place), and fills the
 *     caller's fs_error_t with a message that says what went wrong;
 *   - the fs_error_t pointer may be NULL in every function that takes one: the status
 *     is then all the caller gets. Where err is filled, err->code is the returned code;
 *   - functions never print and never exit the process; the one exception is a forked
 *     child whose set-up fails (see fs_group_fork), which has no caller to return to;
 *   - a failing pthread mutex or condition variable call (possible only for a corrupted
 *     object, i.e. a bug) aborts the process, as libuv's uv_mutex_lock does;
 *   - objects are not thread-safe unless their functions say so.
 */
#ifndef FASTSPAWN_ERROR_H
#define FASTSPAWN_ERROR_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

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

/* Clear *err (code FS_OK, empty message). These three accept NULL too. */
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

#ifdef __cplusplus
}
#endif
#endif /* FASTSPAWN_ERROR_H */
