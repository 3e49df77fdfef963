/*
 * core.c - the internal helpers every part of the library shares (internal.h): the
 * monotonic clock, sleeping, closing fds, pidfd_open and pidfd_send_signal, getrandom,
 * mutexes and condition variables, and starting a library thread with signals blocked.
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

int64_t fs__now_ns(void)
{
    struct timespec ts;
    /* CLOCK_MONOTONIC cannot fail with a valid clock id and pointer. */
    (void)clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t fs_now_ms(void)
{
    return fs__now_ns() / 1000000;
}

int64_t fs__deadline_ms(int64_t timeout_ms)
{
    int64_t now = fs_now_ms();
    return timeout_ms > INT64_MAX - now ? INT64_MAX : now + timeout_ms;
}

int fs__poll_timeout(int64_t deadline)
{
    if (deadline == INT64_MAX)
        return -1;
    int64_t left = deadline - fs_now_ms();
    if (left <= 0)
        return 0;
    return left > INT_MAX ? INT_MAX : (int)left;
}

int fs__sleep_ns(int64_t ns)
{
    if (ns <= 0)
        return 0;
    struct timespec ts = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
    return nanosleep(&ts, NULL) < 0 ? -1 : 0;
}

int fs__close(int fd)
{
    if (fd < 0)
        return 0;
    int saved = errno, rc = 0;
    if (close(fd) < 0 && errno != EINTR)
        rc = errno;
    errno = saved;
    return rc;
}

void fs__closep(int *fd)
{
    (void)fs__close(*fd); /* callers close fds they are done with: nothing to report */
    *fd = -1;
}

int fs__pidfd_open(pid_t pid)
{
    long fd = syscall(SYS_pidfd_open, pid, 0);
    if (fd >= 0)
        return (int)fd;
    if (errno == ENOSYS || errno == EPERM)
        return FS__NO_PIDFD;
    return -1;
}

int fs__pidfd_send_signal(int pidfd, int sig)
{
    return syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0) < 0 ? -1 : 0;
}

int fs__getrandom(void *buf, size_t len)
{
    unsigned char *p = buf;
    size_t got = 0;
    while (got < len) {
        ssize_t n = getrandom(p + got, len - got, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        got += (size_t)n;
    }
    return 0;
}

void fs__lock(pthread_mutex_t *m)
{
    if (pthread_mutex_lock(m) != 0)
        abort();
}

void fs__unlock(pthread_mutex_t *m)
{
    if (pthread_mutex_unlock(m) != 0)
        abort();
}

void fs__cond_wait(pthread_cond_t *cv, pthread_mutex_t *m)
{
    if (pthread_cond_wait(cv, m) != 0)
        abort();
}

int fs__cond_timedwait(pthread_cond_t *cv, pthread_mutex_t *m, int64_t deadline_ns)
{
    struct timespec until = {(time_t)(deadline_ns / 1000000000), (long)(deadline_ns % 1000000000)};
    int rc = pthread_cond_timedwait(cv, m, &until);
    if (rc != 0 && rc != ETIMEDOUT)
        abort();
    return rc;
}

void fs__cond_signal(pthread_cond_t *cv)
{
    if (pthread_cond_signal(cv) != 0)
        abort();
}

void fs__cond_broadcast(pthread_cond_t *cv)
{
    if (pthread_cond_broadcast(cv) != 0)
        abort();
}

int fs__cond_init_monotonic(pthread_cond_t *cv)
{
    pthread_condattr_t ca;
    int rc = pthread_condattr_init(&ca);
    if (rc != 0)
        return rc;
    rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    if (rc == 0)
        rc = pthread_cond_init(cv, &ca);
    (void)pthread_condattr_destroy(&ca); /* cannot fail for an initialised attribute */
    return rc;
}

int fs__thread_start(pthread_t *t, void *(*fn)(void *), void *arg)
{
    sigset_t all, old;
    (void)sigfillset(&all); /* cannot fail with a valid pointer */
    int rc = pthread_sigmask(SIG_SETMASK, &all, &old);
    if (rc != 0)
        return rc;
    rc = pthread_create(t, NULL, fn, arg);
    /* Restoring a mask we just read back cannot fail. */
    (void)pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}
