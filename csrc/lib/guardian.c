/*
 * guardian.c - a tiny process that outlives a SIGKILLed launcher just long
 * enough to kill every rank's process group.
 *
 * PR_SET_PDEATHSIG reaches a rank, but not the rank's own children
 * (DataLoader workers, subprocesses). The guardian holds one end of a socket
 * pair whose other end only the launcher has; when that end closes (the
 * launcher exited or was killed), the read returns EOF and the guardian sends
 * SIGKILL to every process group still registered, then exits.
 *
 * The guardian is a fork of the launcher that never returns to the caller: it
 * uses async-signal-safe calls only and static storage (no malloc).
 *
 * The process's own guardian (fs_guardian_default_*) is a singleton here, so a C
 * program gets what the Python launcher gets: a pthread_atfork child handler closes its
 * launcher end in every child forked afterwards, so only the launcher holds it (a rank
 * holding it would keep the guardian from seeing EOF when the launcher dies).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

#ifndef SYS_close_range
#define SYS_close_range 436
#endif

#define GUARDIAN_MAX_GROUPS 16384

enum { GUARD_WATCH = 1, GUARD_UNWATCH = 2 };

/* One message: 8 bytes, sent in one piece on a stream socket pair. */
struct guard_msg {
    int32_t op;
    int32_t pgid;
};

static pid_t watched[GUARDIAN_MAX_GROUPS];

static void table_watch(pid_t pgid)
{
    for (int i = 0; i < GUARDIAN_MAX_GROUPS; i++) {
        if (watched[i] == 0) {
            watched[i] = pgid;
            return;
        }
    }
}

static void table_unwatch(pid_t pgid)
{
    for (int i = 0; i < GUARDIAN_MAX_GROUPS; i++)
        if (watched[i] == pgid)
            watched[i] = 0;
}

static void kill_all_watched(void)
{
    for (int i = 0; i < GUARDIAN_MAX_GROUPS; i++) {
        if (watched[i] > 0 && kill(-watched[i], SIGKILL) < 0 && errno == ESRCH)
            (void)kill(watched[i], SIGKILL); /* the rank had not made its group yet */
    }
}

/* Keep only fd `keep` and /dev/null on 0..2, so the guardian holds no pipe
   or socket of the launcher open (a reader waiting for EOF would hang). */
static void guardian_isolate_fds(int keep)
{
    int devnull = open("/dev/null", O_RDWR);
    if (devnull >= 0) {
        for (int fd = 0; fd < 3; fd++)
            if (fd != devnull)
                (void)dup2(devnull, fd);
    }
    if (keep > 3 && syscall(SYS_close_range, 3, keep - 1, 0) < 0) {
        for (int fd = 3; fd < keep; fd++)
            (void)fs__close(fd);
    }
    if (syscall(SYS_close_range, keep + 1, ~0U, 0) < 0) {
        for (int fd = keep + 1; fd < 65536; fd++)
            (void)fs__close(fd);
    }
    /* devnull itself (if above 2) went with the close_range calls. */
}

static void guardian_ignore_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    /* Ctrl-C, a closing terminal or a polite TERM aimed at the job must not
       remove the guardian before it has done its one job. */
    (void)sigaction(SIGINT, &sa, NULL);
    (void)sigaction(SIGHUP, &sa, NULL);
    (void)sigaction(SIGTERM, &sa, NULL);
    (void)sigaction(SIGQUIT, &sa, NULL);
    (void)sigaction(SIGPIPE, &sa, NULL);
    sigset_t none;
    (void)sigemptyset(&none);
    (void)sigprocmask(SIG_SETMASK, &none, NULL);
}

static _Noreturn void guardian_main(int fd)
{
    guardian_ignore_signals();
    (void)setpgid(0, 0); /* out of the terminal's foreground group */
    guardian_isolate_fds(fd);
    unsigned char buf[sizeof(struct guard_msg) * 64];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(fd, buf + have, sizeof buf - have);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break; /* EOF (or error): the launcher is gone */
        have += (size_t)n;
        size_t used = 0;
        while (have - used >= sizeof(struct guard_msg)) {
            struct guard_msg m;
            memcpy(&m, buf + used, sizeof m);
            used += sizeof m;
            if (m.op == GUARD_WATCH && m.pgid > 0)
                table_watch(m.pgid);
            else if (m.op == GUARD_UNWATCH)
                table_unwatch(m.pgid);
        }
        memmove(buf, buf + used, have - used);
        have -= used;
    }
    kill_all_watched();
    _exit(0);
}

int fs_guardian_start(fs_guardian_t *gd, fs_error_t *err)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        return fs_error_sys(err, "socketpair(guardian)");
    pid_t pid = fork();
    if (pid < 0) {
        int rc = fs_error_sys(err, "fork(guardian)");
        (void)fs__close(sv[0]);
        (void)fs__close(sv[1]);
        return rc;
    }
    if (pid == 0) {
        (void)fs__close(sv[1]);
        guardian_main(sv[0]);
    }
    (void)fs__close(sv[0]);
    gd->pid = pid;
    gd->write_fd = sv[1];
    gd->owner = getpid();
    return FS_OK;
}

static int guardian_send(fs_guardian_t *gd, int op, pid_t pgid, fs_error_t *err)
{
    if (gd->write_fd < 0 || gd->owner != getpid())
        return fs_error_set(err, FS_EINVAL, "the guardian was not started by this process");
    struct guard_msg m = {.op = op, .pgid = (int32_t)pgid};
    for (;;) {
        /* MSG_NOSIGNAL: a dead guardian is an error to report, not SIGPIPE. */
        ssize_t n = send(gd->write_fd, &m, sizeof m, MSG_NOSIGNAL);
        if (n == (ssize_t)sizeof m)
            return FS_OK;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EPIPE)
            return fs_error_set(err, FS_ECLOSED, "the guardian process %d is gone", (int)gd->pid);
        if (n < 0)
            return fs_error_sys(err, "send(guardian)");
        return fs_error_set(err, FS_EPROTO, "short write to the guardian");
    }
}

int fs_guardian_watch(fs_guardian_t *gd, pid_t pgid, fs_error_t *err)
{
    if (pgid <= 0)
        return fs_error_set(err, FS_EINVAL, "invalid process group %d", (int)pgid);
    return guardian_send(gd, GUARD_WATCH, pgid, err);
}

int fs_guardian_unwatch(fs_guardian_t *gd, pid_t pgid, fs_error_t *err)
{
    return guardian_send(gd, GUARD_UNWATCH, pgid, err);
}

int fs_guardian_stop(fs_guardian_t *gd, int timeout_ms, fs_error_t *err)
{
    if (gd->owner != getpid())
        return FS_OK; /* a forked copy: the launcher's guardian is not ours */
    fs__closep(&gd->write_fd);
    int64_t deadline = fs_now_ms() + (timeout_ms < 0 ? 0 : timeout_ms);
    while (gd->pid > 0) {
        pid_t r = waitpid(gd->pid, NULL, WNOHANG);
        if (r == gd->pid || (r < 0 && errno == ECHILD)) {
            gd->pid = 0;
            break;
        }
        if (r < 0 && errno != EINTR)
            return fs_error_sys(err, "waitpid(guardian)");
        if (fs_now_ms() >= deadline)
            return fs_error_set(err, FS_ETIMEOUT, "the guardian %d did not exit", (int)gd->pid);
        (void)fs__sleep_ns(1000000); /* EINTR only shortens one look */
    }
    return FS_OK;
}

/* ---- the process's own guardian --------------------------------------- */

/* The lock covers `process_guardian`; every fork holds it (atfork prepare) so a child
   never copies a half-updated record. It is never held across a fork of our own. */
static pthread_mutex_t process_lock = PTHREAD_MUTEX_INITIALIZER;
static fs_guardian_t process_guardian = {.pid = 0, .write_fd = -1, .owner = 0};
static pthread_once_t process_once = PTHREAD_ONCE_INIT;
static int process_atfork_rc;

static void atfork_prepare(void)
{
    fs__lock(&process_lock);
}

static void atfork_parent(void)
{
    fs__unlock(&process_lock);
}

static void atfork_child(void)
{
    /* The launcher's end must not live on in children, or the guardian would not see
       EOF when the launcher dies. This thread took the lock in atfork_prepare. */
    (void)fs__close(process_guardian.write_fd);
    process_guardian = (fs_guardian_t){.pid = 0, .write_fd = -1, .owner = 0};
    fs__unlock(&process_lock);
}

static void atfork_register(void)
{
    process_atfork_rc = pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

static int process_init(fs_error_t *err)
{
    int rc = pthread_once(&process_once, atfork_register);
    if (rc == 0)
        rc = process_atfork_rc;
    if (rc != 0) {
        errno = rc;
        return fs_error_sys(err, "guardian: pthread_atfork");
    }
    return FS_OK;
}

/* Lock held. */
static int process_has_guardian(void)
{
    return process_guardian.write_fd >= 0 && process_guardian.owner == getpid();
}

/* Start the process guardian unless it runs. The fork happens without the lock (the
   atfork handlers take it); a guardian another thread installed meanwhile wins. */
static int process_ensure(pid_t *guardian_pid, fs_error_t *err)
{
    int rc = process_init(err);
    if (rc < 0)
        return rc;
    fs__lock(&process_lock);
    int running = process_has_guardian();
    pid_t pid = process_guardian.pid;
    fs__unlock(&process_lock);
    if (!running) {
        fs_guardian_t fresh = {.pid = 0, .write_fd = -1, .owner = 0};
        if ((rc = fs_guardian_start(&fresh, err)) < 0)
            return rc;
        fs__lock(&process_lock);
        int lost = process_has_guardian();
        if (!lost)
            process_guardian = fresh;
        pid = process_guardian.pid;
        fs__unlock(&process_lock);
        if (lost)
            (void)fs_guardian_stop(&fresh, 1000, NULL); /* it watches nothing yet */
    }
    if (guardian_pid != NULL)
        *guardian_pid = pid;
    return FS_OK;
}

int fs_guardian_default_watch(pid_t pgid, pid_t *guardian_pid, fs_error_t *err)
{
    int rc = process_ensure(guardian_pid, err);
    if (rc < 0)
        return rc;
    fs__lock(&process_lock);
    rc = fs_guardian_watch(&process_guardian, pgid, err);
    fs__unlock(&process_lock);
    return rc;
}

int fs_guardian_default_unwatch(pid_t pgid, fs_error_t *err)
{
    int rc = FS_OK;
    fs__lock(&process_lock);
    if (process_has_guardian())
        rc = fs_guardian_unwatch(&process_guardian, pgid, err);
    fs__unlock(&process_lock);
    return rc;
}

int fs_guardian_default_restart(pid_t *guardian_pid, fs_error_t *err)
{
    int rc = process_init(err);
    if (rc < 0)
        return rc;
    fs__lock(&process_lock);
    fs_guardian_t old = process_guardian;
    int had = process_has_guardian();
    process_guardian = (fs_guardian_t){.pid = 0, .write_fd = -1, .owner = 0};
    fs__unlock(&process_lock);
    if (had)
        (void)fs_guardian_stop(&old, 1000, NULL); /* it died: reap it, do not wait long */
    return process_ensure(guardian_pid, err);
}

pid_t fs_guardian_default_pid(void)
{
    fs__lock(&process_lock);
    pid_t pid = process_has_guardian() ? process_guardian.pid : 0;
    fs__unlock(&process_lock);
    return pid;
}
