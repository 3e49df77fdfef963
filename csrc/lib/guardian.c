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
 * A group is registered with its leader's pidfd (SCM_RIGHTS). A group id is a
 * pid number, and the number stays the job's only while the leader is unreaped
 * (a zombie included); so at EOF the guardian first asks the pidfd
 * (pidfd_send_signal(fd, 0)) and kills the group only if the leader is not yet
 * reaped. Once it is, the number may belong to an unrelated process that leads a
 * group of its own: that entry is skipped. Without pidfds (kernels < 5.3) a group
 * is registered bare and killed unchecked, as before pidfds existed.
 *
 * The guardian is a fork of the launcher that never returns to the caller: it
 * uses async-signal-safe calls only and static storage (no malloc).
 *
 * The process's own guardian (fs_guardian_default_*) is a singleton here, so a C
 * program gets what the Python launcher gets: a pthread_atfork child handler closes its
 * launcher end in every child forked afterwards, so only the launcher holds it (a rank
 * holding it would keep the guardian from seeing EOF when the launcher dies). It also
 * remembers what is registered, so a guardian that died is replaced and told it all again.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

#ifndef SYS_close_range
#define SYS_close_range 436
#endif

#ifndef SYS_prlimit64
#define SYS_prlimit64 302
#endif

#define GUARDIAN_MAX_GROUPS 16384

/* GUARD_WATCH_PIDFD carries the leader's pidfd (SCM_RIGHTS); GUARD_WATCH registers a
   group without one (the launcher has no pidfds); GUARD_QUIT: exit without killing. */
enum { GUARD_WATCH = 1, GUARD_UNWATCH = 2, GUARD_WATCH_PIDFD = 3, GUARD_QUIT = 4 };

/* One message: 8 bytes, sent in one piece (one sendmsg) on a stream socket pair. */
struct guard_msg {
    int32_t op;
    int32_t pgid;
};

/* An entry's pidfd: an fd >= 0, or one of these. */
enum {
    GUARD_NO_PIDFD = -1,   /* registered without one: killed unchecked */
    GUARD_LOST_PIDFD = -2, /* sent, but not received (the guardian's fd limit): skipped */
};

/* The guardian's table; pgid 0 marks a free slot. */
static struct {
    pid_t pgid;
    int pidfd;
} watched[GUARDIAN_MAX_GROUPS];

static void table_watch(pid_t pgid, int pidfd)
{
    for (int i = 0; i < GUARDIAN_MAX_GROUPS; i++) {
        if (watched[i].pgid == 0) {
            watched[i].pgid = pgid;
            watched[i].pidfd = pidfd;
            return;
        }
    }
    (void)fs__close(pidfd); /* full: nothing keeps it */
}

static void table_unwatch(pid_t pgid)
{
    for (int i = 0; i < GUARDIAN_MAX_GROUPS; i++) {
        if (watched[i].pgid == pgid) {
            (void)fs__close(watched[i].pidfd);
            watched[i].pgid = 0;
            watched[i].pidfd = GUARD_NO_PIDFD;
        }
    }
}

/* 1 when group pgid may be killed: its leader is unreaped (pidfd), or there is no pidfd
   to ask (kernels without pidfds: as before, unchecked). */
static int group_still_ours(int pidfd)
{
    if (pidfd == GUARD_NO_PIDFD)
        return 1;
    if (pidfd < 0)
        return 0; /* GUARD_LOST_PIDFD: cannot tell, so leave it alone */
    /* EPERM: it exists (not ours to signal, so the kill below fails too). ESRCH: reaped;
       the number may be an unrelated process's now. */
    return fs__pidfd_send_signal(pidfd, 0) == 0 || errno == EPERM;
}

static void kill_all_watched(void)
{
    for (int i = 0; i < GUARDIAN_MAX_GROUPS; i++) {
        pid_t pgid = watched[i].pgid;
        int pidfd = watched[i].pidfd;
        if (pgid <= 0 || !group_still_ours(pidfd))
            continue;
        if (kill(-pgid, SIGKILL) == 0 || errno != ESRCH)
            continue;
        /* ESRCH: the rank had not made its group yet; its pid is still its own. */
        if (pidfd >= 0)
            (void)fs__pidfd_send_signal(pidfd, SIGKILL);
        else
            (void)kill(pgid, SIGKILL);
    }
}

/* A guardian holds one pidfd per rank: take the hard limit on open files as its soft
   limit. prlimit64 directly: a plain system call, async-signal-safe. */
static void guardian_raise_fd_limit(void)
{
    struct {
        uint64_t cur, max;
    } lim;
    if (syscall(SYS_prlimit64, 0, RLIMIT_NOFILE, NULL, &lim) == 0 && lim.cur < lim.max) {
        lim.cur = lim.max;
        (void)syscall(SYS_prlimit64, 0, RLIMIT_NOFILE, &lim, NULL);
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

/*
 * Read the rest of one message into *m (have: bytes of it already there), with any fd
 * that comes along. Never reads past the message's end, so an fd that arrives belongs to
 * this message (the kernel attaches it to the first byte of the sendmsg that sent it).
 * Returns the bytes read (> 0), 0 at EOF, -1 on error. *fd: the fd received, -1 if none,
 * GUARD_LOST_PIDFD if one was sent but could not be received (MSG_CTRUNC).
 */
static ssize_t guardian_recv(int sock, unsigned char *m, size_t have, int *fd)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * 4)];
    } control;
    struct iovec iov = {.iov_base = m + have, .iov_len = sizeof(struct guard_msg) - have};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    ssize_t n;
    do {
        n = recvmsg(sock, &msg, 0);
    } while (n < 0 && errno == EINTR);
    if (n <= 0)
        return n;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t k = 0; k < count; k++) {
            int got;
            memcpy(&got, CMSG_DATA(c) + k * sizeof(int), sizeof got);
            if (*fd == -1)
                *fd = got;
            else
                (void)fs__close(got); /* one fd a message: extras are not ours to keep */
        }
    }
    if ((msg.msg_flags & MSG_CTRUNC) && *fd == -1)
        *fd = GUARD_LOST_PIDFD;
    return n;
}

static _Noreturn void guardian_main(int sock)
{
    guardian_ignore_signals();
    (void)setpgid(0, 0); /* out of the terminal's foreground group */
    guardian_isolate_fds(sock);
    guardian_raise_fd_limit();
    unsigned char buf[sizeof(struct guard_msg)];
    size_t have = 0;
    int fd = -1; /* what came with the message being read */
    for (;;) {
        ssize_t n = guardian_recv(sock, buf, have, &fd);
        if (n <= 0)
            break; /* EOF (or error): the launcher is gone */
        have += (size_t)n;
        if (have < sizeof buf)
            continue;
        struct guard_msg m;
        memcpy(&m, buf, sizeof m);
        have = 0;
        if (m.op == GUARD_QUIT)
            _exit(0); /* replaced by a new guardian: the groups are its now */
        if (m.op == GUARD_WATCH_PIDFD && m.pgid > 0)
            table_watch(m.pgid, fd == -1 ? GUARD_LOST_PIDFD : fd);
        else if (m.op == GUARD_WATCH && m.pgid > 0)
            table_watch(m.pgid, GUARD_NO_PIDFD);
        else if (m.op == GUARD_UNWATCH)
            table_unwatch(m.pgid);
        if (m.op != GUARD_WATCH_PIDFD || m.pgid <= 0)
            (void)fs__close(fd); /* an fd with a message that takes none */
        fd = -1;
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

/* Send one message, with fd (SCM_RIGHTS) when fd >= 0. */
static int guardian_send(fs_guardian_t *gd, int op, pid_t pgid, int fd, fs_error_t *err)
{
    if (gd->write_fd < 0 || gd->owner != getpid())
        return fs_error_set(err, FS_EINVAL, "the guardian was not started by this process");
    struct guard_msg m = {.op = op, .pgid = (int32_t)pgid};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    struct iovec iov = {.iov_base = &m, .iov_len = sizeof m};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    memset(&control, 0, sizeof control);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (fd >= 0) {
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    for (;;) {
        /* MSG_NOSIGNAL: a dead guardian is an error to report, not SIGPIPE. */
        ssize_t n = sendmsg(gd->write_fd, &msg, MSG_NOSIGNAL);
        if (n == (ssize_t)sizeof m)
            return FS_OK;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EPIPE || errno == ECONNRESET))
            return fs_error_set(err, FS_ECLOSED, "the guardian process %d is gone", (int)gd->pid);
        if (n < 0)
            return fs_error_sys(err, "sendmsg(guardian)");
        return fs_error_set(err, FS_EPROTO, "short write to the guardian");
    }
}

int fs_guardian_watch(fs_guardian_t *gd, pid_t pgid, int pidfd, fs_error_t *err)
{
    if (pgid <= 0)
        return fs_error_set(err, FS_EINVAL, "invalid process group %d", (int)pgid);
    return guardian_send(gd, pidfd >= 0 ? GUARD_WATCH_PIDFD : GUARD_WATCH, pgid, pidfd, err);
}

int fs_guardian_unwatch(fs_guardian_t *gd, pid_t pgid, fs_error_t *err)
{
    return guardian_send(gd, GUARD_UNWATCH, pgid, -1, err);
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

/* Retire a guardian that another one replaces: GUARD_QUIT first, so that one still
   alive exits without killing what it watches (the new one watches it now), then close
   and reap. A dead one only needs reaping. */
static void guardian_retire(fs_guardian_t *gd)
{
    (void)guardian_send(gd, GUARD_QUIT, 0, -1, NULL);
    (void)fs_guardian_stop(gd, 1000, NULL);
}

/* ---- the process's own guardian --------------------------------------- */

/* The lock covers `process_guardian` and the registry; every fork holds it (atfork
   prepare) so a child never copies a half-updated record. It is never held across a
   fork of our own. */
static pthread_mutex_t process_lock = PTHREAD_MUTEX_INITIALIZER;
static fs_guardian_t process_guardian = {.pid = 0, .write_fd = -1, .owner = 0};
static pthread_once_t process_once = PTHREAD_ONCE_INIT;
static int process_atfork_rc;

/* What is registered, so that a new guardian can be told it all: the groups and the
   callers' pidfds (not copies: each stays open until its group is unwatched). */
struct process_watch {
    pid_t pgid;
    int pidfd;
};
static struct process_watch *process_watches;
static size_t process_nwatch, process_capwatch;

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
       EOF when the launcher dies. This thread took the lock in atfork_prepare. The
       registry is the launcher's too (its buffer is kept for the child's own use). */
    (void)fs__close(process_guardian.write_fd);
    process_guardian = (fs_guardian_t){.pid = 0, .write_fd = -1, .owner = 0};
    process_nwatch = 0;
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

/* Lock held. */
static int registry_add(pid_t pgid, int pidfd, fs_error_t *err)
{
    if (process_nwatch == process_capwatch) {
        size_t cap = process_capwatch ? process_capwatch * 2 : 64;
        struct process_watch *grown = realloc(process_watches, cap * sizeof *grown);
        if (grown == NULL)
            return fs_error_set(err, FS_ENOMEM, "out of memory registering a process group");
        process_watches = grown;
        process_capwatch = cap;
    }
    process_watches[process_nwatch++] = (struct process_watch){.pgid = pgid, .pidfd = pidfd};
    return FS_OK;
}

/* Lock held. Forget every entry for pgid, as the guardian does. */
static void registry_remove(pid_t pgid)
{
    size_t kept = 0;
    for (size_t i = 0; i < process_nwatch; i++)
        if (process_watches[i].pgid != pgid)
            process_watches[kept++] = process_watches[i];
    process_nwatch = kept;
}

/* Lock held: tell the (new) guardian everything registered. */
static int registry_send_all(fs_error_t *err)
{
    for (size_t i = 0; i < process_nwatch; i++) {
        int rc = fs_guardian_watch(&process_guardian, process_watches[i].pgid,
                                   process_watches[i].pidfd, err);
        if (rc < 0)
            return rc;
    }
    return FS_OK;
}

/* Start the process guardian unless it runs, and tell a new one what is registered. The
   fork happens without the lock (the atfork handlers take it); a guardian another
   thread installed meanwhile wins. */
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
        if (!lost) {
            process_guardian = fresh;
            rc = registry_send_all(err);
        }
        pid = process_guardian.pid;
        fs__unlock(&process_lock);
        if (lost)
            guardian_retire(&fresh); /* it watches nothing */
        if (rc < 0)
            return rc;
    }
    if (guardian_pid != NULL)
        *guardian_pid = pid;
    return FS_OK;
}

int fs_guardian_default_watch(pid_t pgid, int pidfd, pid_t *guardian_pid, fs_error_t *err)
{
    if (pgid <= 0)
        return fs_error_set(err, FS_EINVAL, "invalid process group %d", (int)pgid);
    int rc = process_init(err);
    if (rc < 0)
        return rc;
    fs_guardian_t dead = {.pid = 0, .write_fd = -1, .owner = 0};
    fs__lock(&process_lock);
    rc = registry_add(pgid, pidfd, err);
    if (rc == FS_OK && process_has_guardian()) {
        rc = fs_guardian_watch(&process_guardian, pgid, pidfd, err);
        if (rc == FS_ECLOSED) {
            /* It died: a new one (process_ensure) is told everything, this group too. */
            dead = process_guardian;
            process_guardian = (fs_guardian_t){.pid = 0, .write_fd = -1, .owner = 0};
            rc = FS_OK;
        } else if (rc < 0) {
            process_nwatch--; /* not registered after all */
        }
    }
    fs__unlock(&process_lock);
    if (dead.pid > 0)
        (void)fs_guardian_stop(&dead, 1000, NULL); /* reap it, do not wait long */
    if (rc < 0)
        return rc;
    rc = process_ensure(guardian_pid, err);
    if (rc < 0) {
        /* No guardian to watch it: the caller sees the error and will not unwatch it.
           (One that got it before failing checks its pidfd.) */
        fs__lock(&process_lock);
        registry_remove(pgid);
        fs__unlock(&process_lock);
    }
    return rc;
}

int fs_guardian_default_unwatch(pid_t pgid, fs_error_t *err)
{
    int rc = FS_OK;
    fs__lock(&process_lock);
    registry_remove(pgid);
    if (process_has_guardian()) {
        rc = fs_guardian_unwatch(&process_guardian, pgid, err);
        if (rc == FS_ECLOSED)
            rc = FS_OK; /* a dead guardian watches nothing; the next watch replaces it */
    }
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
        guardian_retire(&old);
    return process_ensure(guardian_pid, err);
}

pid_t fs_guardian_default_pid(void)
{
    fs__lock(&process_lock);
    pid_t pid = process_has_guardian() ? process_guardian.pid : 0;
    fs__unlock(&process_lock);
    return pid;
}

size_t fs_guardian_default_watched(pid_t *pgids, size_t cap)
{
    fs__lock(&process_lock);
    size_t n = process_nwatch;
    for (size_t i = 0; i < n && i < cap; i++)
        pgids[i] = process_watches[i].pgid;
    fs__unlock(&process_lock);
    return n;
}
