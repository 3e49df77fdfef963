/*
 * internal.h - the library's one internal layer: helpers that several files of csrc/lib/
 * share (core.c). Not part of the public API. Naming, after libuv: public symbols are
 * fs_* / FS_*, internal cross-file symbols fs__* / FS__*, file-local ones plain static.
 *
 * Policies that hold in every file:
 *   - fds are closed with fs__close (EINTR-safe, errno kept);
 *   - time is read with fs__now_ns (CLOCK_MONOTONIC), never with a clock of its own;
 *   - pthread mutex / condition variable calls go through fs__lock, fs__unlock,
 *     fs__cond_*: they fail only on a corrupted or wrongly used object (a bug), and then
 *     abort, as libuv's uv_mutex_lock does; no caller checks their results;
 *   - a public function that passes its fs_error_t on to code which reads it back starts
 *     with FS__ERR_OR_LOCAL(err), so NULL is accepted everywhere (fastspawn/error.h).
 */
#ifndef FS_INTERNAL_H
#define FS_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "fastspawn.h"

/* Let a public function whose err may be NULL use *err freely: point it at a local. */
#define FS__ERR_OR_LOCAL(err)                                                                      \
    fs_error_t fs__err_local_;                                                                     \
    if ((err) == NULL)                                                                             \
    (err) = &fs__err_local_

/* Monotonic clock (CLOCK_MONOTONIC) in nanoseconds; fs_now_ms() is this / 1e6. */
int64_t fs__now_ns(void);

static inline int64_t fs__now_us(void)
{
    return fs__now_ns() / 1000;
}

/* Absolute deadline (fs_now_ms() clock) timeout_ms from now, saturating at INT64_MAX. */
int64_t fs__deadline_ms(int64_t timeout_ms);
/* Milliseconds left until deadline as a poll()/epoll_wait() timeout: -1 for INT64_MAX
   (no limit), 0 once passed, else at most INT_MAX. */
int fs__poll_timeout(int64_t deadline);

/* Sleep ns nanoseconds; returns 0, or -1 (errno EINTR) when a signal cut it short. */
int fs__sleep_ns(int64_t ns);

/*
 * close(fd) for fds we are done with. Returns 0, or the errno of a failure (EBADF, EIO);
 * EINTR counts as closed (Linux always releases the descriptor) and is never retried.
 * errno itself is left as it was, so a caller reporting an earlier failure keeps its errno.
 * fd < 0 is a no-op. Async-signal-safe.
 */
int fs__close(int fd);
/* fs__close(*fd), then *fd = -1. */
void fs__closep(int *fd);

/* pidfd_open(pid, 0): the fd (>= 0); FS__NO_PIDFD where the kernel or a sandbox offers
   none (ENOSYS, EPERM): the caller falls back to polling; -1 with errno otherwise (ESRCH:
   the process is gone). */
#define FS__NO_PIDFD (-2)
int fs__pidfd_open(pid_t pid);
/* pidfd_send_signal(pidfd, sig, NULL, 0): 0, or -1 with errno. sig 0 sends nothing and
   tells whether the process is still unreaped (a zombie counts): ESRCH once it was reaped,
   whatever process now has its number. Async-signal-safe. */
int fs__pidfd_send_signal(int pidfd, int sig);

/* Fill buf with len random bytes from getrandom(), retrying EINTR and short reads.
   Returns 0, or -1 with errno. */
int fs__getrandom(void *buf, size_t len);

/* Mutexes and condition variables: abort on failure (see the policy above). */
void fs__lock(pthread_mutex_t *m);
void fs__unlock(pthread_mutex_t *m);
void fs__cond_wait(pthread_cond_t *cv, pthread_mutex_t *m);
/* pthread_cond_timedwait against CLOCK_MONOTONIC deadline_ns (fs__now_ns clock; the
   condition variable must use that clock): returns 0 or ETIMEDOUT. */
int fs__cond_timedwait(pthread_cond_t *cv, pthread_mutex_t *m, int64_t deadline_ns);
void fs__cond_signal(pthread_cond_t *cv);
void fs__cond_broadcast(pthread_cond_t *cv);
/* pthread_cond_init with CLOCK_MONOTONIC (for fs__cond_timedwait). Returns 0 or an errno. */
int fs__cond_init_monotonic(pthread_cond_t *cv);

/*
 * Start a thread with every signal blocked (signals belong to the application's own
 * threads, and a library thread must not run a Python signal handler). The caller's mask
 * is unchanged afterwards. Returns 0 or the errno value of the failure.
 */
int fs__thread_start(pthread_t *t, void *(*fn)(void *), void *arg);

/* ---- the child side of fork (child.c) --------------------------------------------- */

/* What a forked child must do, fixed in the parent before fork(). */
struct fs__child_plan {
    int new_process_group;
    int parent_death_signal;
    pid_t parent;  /* getppid() must still say this once the death signal is armed */
    int report_fd; /* where a failed step's record goes; -1: nowhere */
    int close_fd;  /* one more fd to close (a guardian's launcher end); -1: none */
    int fail_step; /* the FS_CHILD_SETUP_FAIL_ENV test hook; FS_SETUP_NONE normally */
};

/* Parent side, before fork(): the plan for opts (reads the test hook). */
void fs__child_plan(struct fs__child_plan *plan, const fs_fork_opts_t *opts, int report_fd);
/* Child side, right after fork(): run the set-up. Returns only when every step worked;
   else writes the record to plan->report_fd and _exit(FS_CHILD_SETUP_EXIT). */
void fs__child_setup_or_exit(const struct fs__child_plan *plan);
/* 1 when buf[0..len) is exactly one failure record (step, errno filled), else 0. */
int fs__child_record_decode(const unsigned char *buf, size_t len, int *step, int *sys_errno);

#endif /* FS_INTERNAL_H */
