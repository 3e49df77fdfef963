/*
 * supervise.c - start, watch and stop a group of rank processes.
 *
 * Each rank is watched through a pidfd (exit notification without SIGCHLD
 * handlers or busy polling) and a report pipe (the rank's pickled result or
 * error, read while the rank runs so a large report never blocks it). One
 * epoll set covers both, so waiting costs no CPU. Ranks that another process
 * reaps (zygote children) get their exit status from a status fd instead.
 *
 * The child side of fs_group_fork (async-signal-safe only) is child.c's; a child whose
 * set-up failed leaves a record in its report pipe, decoded here (finish_exit).
 *
 * Pid safety (supervise.h): ranks we forked are not reaped when they exit (waitid with
 * WNOWAIT reads the status), so their pid, which is their process group's id, stays the
 * job's until fs_group_free releases them (release_rank). Every signal goes through
 * signal_rank: to the group only while the rank is unreaped (leader_unreaped), to the
 * rank itself through its pidfd.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

/* A report larger than this is truncated: results and tracebacks are small. */
#define REPORT_MAX ((size_t)256 << 20)
/* Without pidfds (kernels < 5.3) we fall back to polling waitpid this often. */
#define FALLBACK_POLL_MS 20
/* After SIGKILL a process normally vanishes at once; do not wait forever. */
#define KILL_REAP_MS 10000
/* One epoll_wait / fs_group_wait slice at most (an int of milliseconds). */
#define WAIT_SLICE_MAX_MS 1000000

/* epoll user data: which kind of fd, and the rank index. */
enum { EV_PIDFD = 1, EV_REPORT = 2, EV_STATUS = 3 };
#define EV_PACK(kind, index) (((uint64_t)(kind) << 32) | (uint32_t)(index))
#define EV_KIND(data) ((int)((data) >> 32))
#define EV_INDEX(data) ((int)((data)&0xffffffffu))

struct fs_group {
    int nprocs;
    int epfd;
    pid_t owner; /* the process that created the group; a forked copy must not act */
    int status_fd;
    unsigned char status_buf[8];
    size_t status_have;
    int exits_seen;
    int events; /* exits recorded + pidfds of ranks reaped elsewhere that fired */
    fs_proc_t procs[];
};

static int epoll_watch(fs_group_t *g, int fd, int kind, int index, fs_error_t *err)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = EV_PACK(kind, index)};
    if (epoll_ctl(g->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        return fs_error_sys(err, "epoll_ctl(ADD)");
    return FS_OK;
}

/* Remove fd from the epoll set (it stays open). */
static void epoll_unwatch(fs_group_t *g, int fd)
{
    if (fd >= 0 && g->epfd >= 0)
        (void)epoll_ctl(g->epfd, EPOLL_CTL_DEL, fd, NULL); /* ENOENT: never added, or gone */
}

/* Remove fd from the epoll set, then close it. close() alone is not enough: a
   forked child may still hold a copy of the file description, and epoll then
   keeps reporting it under the old (now reused or closed) number. */
static void unwatch_close(fs_group_t *g, int *fd)
{
    epoll_unwatch(g, *fd);
    fs__closep(fd);
}

int fs_group_new(int nprocs, fs_group_t **out, fs_error_t *err)
{
    if (nprocs <= 0 || nprocs > 65536)
        return fs_error_set(err, FS_EINVAL, "nprocs must be in 1..65536, got %d", nprocs);
    fs_group_t *g = calloc(1, sizeof *g + (size_t)nprocs * sizeof(fs_proc_t));
    if (g == NULL)
        return fs_error_set(err, FS_ENOMEM, "out of memory for %d ranks", nprocs);
    g->nprocs = nprocs;
    g->owner = getpid();
    g->status_fd = -1;
    for (int i = 0; i < nprocs; i++) {
        g->procs[i].pidfd = -1;
        g->procs[i].report_fd = -1;
        g->procs[i].exit.exit_code = -1;
    }
    g->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (g->epfd < 0) {
        int rc = fs_error_sys(err, "epoll_create1");
        free(g);
        return rc;
    }
    *out = g;
    return FS_OK;
}

int fs_group_size(const fs_group_t *g)
{
    return g->nprocs;
}

const fs_proc_t *fs_group_proc(const fs_group_t *g, int index)
{
    if (index < 0 || index >= g->nprocs)
        return NULL;
    return &g->procs[index];
}

int fs_group_running(const fs_group_t *g)
{
    int n = 0;
    for (int i = 0; i < g->nprocs; i++)
        n += g->procs[i].state == FS_PROC_RUNNING;
    return n;
}

/* Ranks whose exit this group can still learn of by itself: running and not
   gone, or gone while their status is still to come on the status fd. A rank
   reaped elsewhere without a status fd waits for fs_group_set_exit(). */
static int awaiting(const fs_group_t *g)
{
    int n = 0;
    for (int i = 0; i < g->nprocs; i++) {
        const fs_proc_t *p = &g->procs[i];
        if (p->state == FS_PROC_RUNNING && (!p->gone || (!p->is_child && g->status_fd >= 0)))
            n++;
    }
    return n;
}

static int check_index(const fs_group_t *g, int index, fs_error_t *err)
{
    if (index < 0 || index >= g->nprocs)
        return fs_error_set(err, FS_EINVAL, "rank index %d out of range 0..%d", index,
                            g->nprocs - 1);
    return FS_OK;
}

/* Append what is readable now from the rank's report pipe; close it at EOF. */
static int drain_report(fs_group_t *g, fs_proc_t *p, fs_error_t *err)
{
    unsigned char buf[65536];
    while (p->report_fd >= 0) {
        ssize_t n = read(p->report_fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return FS_OK;
            return fs_error_sys(err, "read(report pipe of pid %d)", (int)p->pid);
        }
        if (n == 0) {
            unwatch_close(g, &p->report_fd);
            return FS_OK;
        }
        size_t want = p->report_len + (size_t)n;
        if (want > REPORT_MAX)
            continue; /* keep reading so the writer never blocks; drop the excess */
        if (want > p->report_cap) {
            size_t cap = p->report_cap ? p->report_cap : 4096;
            while (cap < want)
                cap *= 2;
            unsigned char *grown = realloc(p->report, cap);
            if (grown == NULL)
                return fs_error_set(err, FS_ENOMEM, "out of memory reading a rank report");
            p->report = grown;
            p->report_cap = cap;
        }
        memcpy(p->report + p->report_len, buf, (size_t)n);
        p->report_len = want;
    }
    return FS_OK;
}

/* The rank is seen to have exited: its place in the exit order is now, even
   if its status arrives later (from the zygote), so "root cause first" holds. */
static void mark_gone(fs_group_t *g, fs_proc_t *p)
{
    if (p->exit_order == 0)
        p->exit_order = ++g->exits_seen;
    p->gone = 1;
    g->events++;
}

static void record_exit(fs_group_t *g, fs_proc_t *p, int wait_status)
{
    p->state = FS_PROC_EXITED;
    if (WIFSIGNALED(wait_status)) {
        p->exit.exit_code = -1;
        p->exit.term_signal = WTERMSIG(wait_status);
    } else {
        p->exit.exit_code = WEXITSTATUS(wait_status);
        p->exit.term_signal = 0;
    }
    if (p->exit_order == 0)
        p->exit_order = ++g->exits_seen;
    g->events++; /* also when the pidfd already counted: the status is news */
    p->gone = 1;
    /* Out of the epoll set (a child's pidfd stays readable until it is reaped), but open:
       it tells, until the group is freed, whether the rank is still unreaped. */
    epoll_unwatch(g, p->pidfd);
}

/* Convert a waitid() siginfo into a wait(2)-style status. */
static int status_from_siginfo(const siginfo_t *si)
{
    if (si->si_code == CLD_EXITED)
        return (si->si_status & 0xff) << 8;
    return si->si_status & 0x7f; /* CLD_KILLED / CLD_DUMPED: the signal number */
}

/* Finish a rank whose exit we learned of: read the last of its report first. A child
   whose set-up failed (child.c) left a record there instead of a report: take it out. */
static int finish_exit(fs_group_t *g, fs_proc_t *p, int wait_status, fs_error_t *err)
{
    int rc = drain_report(g, p, err);
    record_exit(g, p, wait_status);
    if (p->exit.exit_code == FS_CHILD_SETUP_EXIT &&
        fs__child_record_decode(p->report, p->report_len, &p->setup_step, &p->setup_errno))
        p->report_len = 0;
    /* Whatever a surviving grandchild writes later is not the rank's report. */
    unwatch_close(g, &p->report_fd);
    return rc;
}

/*
 * Our child's exit status, read without reaping it (WNOWAIT): the zombie keeps its pid
 * and group id the job's until release_rank. By pidfd, or by pid where there is none.
 * Returns 1 with *status when it has exited, 0 when not yet, or a negative code.
 */
static int peek_child_exit(const fs_proc_t *p, int *status, fs_error_t *err)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    idtype_t idtype = p->pidfd >= 0 ? (idtype_t)P_PIDFD : P_PID;
    id_t id = p->pidfd >= 0 ? (id_t)p->pidfd : (id_t)p->pid;
    while (waitid(idtype, id, &si, WEXITED | WNOHANG | WNOWAIT) < 0) {
        if (errno != EINTR)
            return fs_error_sys(err, "waitid(pid %d)", (int)p->pid);
    }
    if (si.si_pid == 0)
        return 0; /* not exited yet (a spurious wake-up) */
    *status = status_from_siginfo(&si);
    return 1;
}

static int on_pidfd_ready(fs_group_t *g, int index, fs_error_t *err)
{
    fs_proc_t *p = &g->procs[index];
    if (!p->is_child) {
        /* Someone else reaps it; its status comes from the status fd or
           fs_group_set_exit(). Count the event so the caller can ask. */
        epoll_unwatch(g, p->pidfd);
        mark_gone(g, p);
        return drain_report(g, p, err);
    }
    int status = 0;
    int rc = peek_child_exit(p, &status, err);
    if (rc <= 0)
        return rc;
    return finish_exit(g, p, status, err);
}

/* Kernels without pidfds: look at every such child without blocking. */
static int poll_fallback_children(fs_group_t *g, int *any_fallback, fs_error_t *err)
{
    *any_fallback = 0;
    for (int i = 0; i < g->nprocs; i++) {
        fs_proc_t *p = &g->procs[i];
        if (p->state != FS_PROC_RUNNING || !p->is_child || p->pidfd >= 0)
            continue;
        *any_fallback = 1;
        int status = 0;
        int rc = peek_child_exit(p, &status, err);
        if (rc > 0)
            rc = finish_exit(g, p, status, err);
        if (rc < 0)
            return rc;
    }
    return FS_OK;
}

static fs_proc_t *proc_by_pid(fs_group_t *g, pid_t pid)
{
    for (int i = 0; i < g->nprocs; i++)
        if (g->procs[i].pid == pid && g->procs[i].state == FS_PROC_RUNNING)
            return &g->procs[i];
    return NULL;
}

static int on_status_ready(fs_group_t *g, fs_error_t *err)
{
    for (;;) {
        ssize_t n = read(g->status_fd, g->status_buf + g->status_have,
                         sizeof g->status_buf - g->status_have);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return FS_OK;
            return fs_error_sys(err, "read(status fd)");
        }
        if (n == 0) {
            /* The reaper is gone: ranks it owned can no longer report. */
            unwatch_close(g, &g->status_fd);
            for (int i = 0; i < g->nprocs; i++) {
                fs_proc_t *p = &g->procs[i];
                if (p->state == FS_PROC_RUNNING && !p->is_child && (p->gone || p->pidfd < 0))
                    (void)finish_exit(g, p, SIGKILL, err);
            }
            return FS_OK;
        }
        g->status_have += (size_t)n;
        if (g->status_have < sizeof g->status_buf)
            continue;
        int32_t rec[2];
        memcpy(rec, g->status_buf, sizeof rec);
        g->status_have = 0;
        fs_proc_t *p = proc_by_pid(g, (pid_t)rec[0]);
        if (p != NULL) {
            int rc = finish_exit(g, p, rec[1], err);
            if (rc < 0)
                return rc;
        }
    }
}

static int handle_event(fs_group_t *g, uint64_t data, fs_error_t *err)
{
    int index = EV_INDEX(data);
    if (index < 0 || index >= g->nprocs)
        return fs_error_set(err, FS_EPROTO, "epoll event for unknown rank %d", index);
    fs_proc_t *p = &g->procs[index];
    /* Events for an fd we already closed, or took out of the set (a pidfd once its exit
       was seen), are stale: ignore them. */
    switch (EV_KIND(data)) {
    case EV_PIDFD:
        return p->pidfd < 0 || p->state != FS_PROC_RUNNING || p->gone
                   ? FS_OK
                   : on_pidfd_ready(g, index, err);
    case EV_REPORT: return p->report_fd < 0 ? FS_OK : drain_report(g, p, err);
    case EV_STATUS: return g->status_fd < 0 ? FS_OK : on_status_ready(g, err);
    default:
        return fs_error_set(err, FS_EPROTO, "unknown epoll event %llu", (unsigned long long)data);
    }
}

static int exited_count(const fs_group_t *g)
{
    return g->events;
}

int fs_group_wait(fs_group_t *g, int timeout_ms, fs_error_t *err)
{
    int before = exited_count(g);
    int64_t deadline = timeout_ms < 0 ? -1 : fs_now_ms() + timeout_ms;
    for (;;) {
        int any_fallback = 0;
        int rc = poll_fallback_children(g, &any_fallback, err);
        if (rc < 0)
            return rc;
        if (exited_count(g) > before || awaiting(g) == 0)
            return exited_count(g) - before;
        int wait_ms = -1, last_round = 0;
        if (deadline >= 0) {
            int64_t left = deadline - fs_now_ms();
            last_round = left <= 0; /* still look once, without blocking */
            wait_ms = left <= 0 ? 0 : (int)(left > WAIT_SLICE_MAX_MS ? WAIT_SLICE_MAX_MS : left);
        }
        if (any_fallback && (wait_ms < 0 || wait_ms > FALLBACK_POLL_MS))
            wait_ms = FALLBACK_POLL_MS;
        struct epoll_event events[64];
        int n = epoll_wait(g->epfd, events, 64, wait_ms);
        if (n < 0) {
            if (errno == EINTR)
                return exited_count(g) > before
                           ? exited_count(g) - before
                           : fs_error_set(err, FS_EINTR, "interrupted by a signal");
            return fs_error_sys(err, "epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            rc = handle_event(g, events[i].data.u64, err);
            if (rc < 0)
                return rc;
        }
        if (last_round)
            return exited_count(g) - before;
    }
}

int fs_group_prepare_report(fs_group_t *g, int index, int *report_wfd, fs_error_t *err)
{
    int rc = check_index(g, index, err);
    if (rc < 0)
        return rc;
    fs_proc_t *p = &g->procs[index];
    if (p->state != FS_PROC_UNUSED || p->report_fd >= 0)
        return fs_error_set(err, FS_EINVAL, "rank %d was already started", index);
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) < 0)
        return fs_error_sys(err, "pipe2");
    if (fcntl(fds[0], F_SETFL, O_NONBLOCK) < 0)
        rc = fs_error_sys(err, "fcntl(O_NONBLOCK)");
    else
        rc = epoll_watch(g, fds[0], EV_REPORT, index, err);
    if (rc < 0) {
        (void)fs__close(fds[0]);
        (void)fs__close(fds[1]);
        return rc;
    }
    p->report_fd = fds[0];
    *report_wfd = fds[1];
    return FS_OK;
}

int fs_group_adopt(fs_group_t *g, int index, pid_t pid, int is_child, fs_error_t *err)
{
    int rc = check_index(g, index, err);
    if (rc < 0)
        return rc;
    fs_proc_t *p = &g->procs[index];
    if (p->state != FS_PROC_UNUSED)
        return fs_error_set(err, FS_EINVAL, "rank %d was already started", index);
    if (pid <= 0)
        return fs_error_set(err, FS_EINVAL, "invalid pid %d for rank %d", (int)pid, index);
    p->pid = pid;
    p->is_child = is_child != 0;
    p->state = FS_PROC_RUNNING;
    p->pidfd = fs__pidfd_open(pid);
    if (p->pidfd == FS__NO_PIDFD) {
        p->pidfd = -1; /* kernels without pidfds: fs_group_wait polls waitid */
        p->pidfd_missing = 1;
        return FS_OK;
    }
    if (p->pidfd < 0 && errno == ESRCH && !p->is_child) {
        /* Already gone: its status comes from whoever reaps it. */
        mark_gone(g, p);
        return FS_OK;
    }
    if (p->pidfd < 0)
        return fs_error_sys(err, "pidfd_open(%d)", (int)pid);
    if (p->pidfd >= 0)
        return epoll_watch(g, p->pidfd, EV_PIDFD, index, err);
    return FS_OK;
}

int fs_group_set_exit(fs_group_t *g, int index, int wait_status, fs_error_t *err)
{
    int rc = check_index(g, index, err);
    if (rc < 0)
        return rc;
    fs_proc_t *p = &g->procs[index];
    if (p->state != FS_PROC_RUNNING)
        return FS_OK; /* already known */
    if (p->is_child)
        return fs_error_set(err, FS_EINVAL, "rank %d is our child: its status comes from waitid",
                            index);
    return finish_exit(g, p, wait_status, err);
}

int fs_group_attach_status_fd(fs_group_t *g, int fd, fs_error_t *err)
{
    if (g->status_fd >= 0)
        return fs_error_set(err, FS_EINVAL, "the group already has a status fd");
    if (fcntl(fd, F_SETFL, O_NONBLOCK) < 0 || fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
        return fs_error_sys(err, "fcntl(status fd)");
    int rc = epoll_watch(g, fd, EV_STATUS, 0, err);
    if (rc < 0)
        return rc;
    g->status_fd = fd;
    return FS_OK;
}

/* ---- forking a rank -------------------------------------------------- */

/* In the child: close every fd of the launcher's bookkeeping that the rank must not
   hold (async-signal-safe). */
static void child_close_group_fds(fs_group_t *g)
{
    for (int i = 0; i < g->nprocs; i++) {
        (void)fs__close(g->procs[i].report_fd);
        (void)fs__close(g->procs[i].pidfd);
    }
    (void)fs__close(g->status_fd);
    (void)fs__close(g->epfd);
}

pid_t fs_group_fork(fs_group_t *g, int index, const fs_fork_opts_t *opts, int *report_wfd,
                    fs_error_t *err)
{
    int wfd = -1;
    int rc = fs_group_prepare_report(g, index, &wfd, err);
    if (rc < 0)
        return rc;
    struct fs__child_plan plan;
    fs__child_plan(&plan, opts, wfd);
    pid_t pid = fork();
    if (pid < 0) {
        rc = fs_error_sys(err, "fork(rank %d)", index);
        (void)fs__close(wfd);
        unwatch_close(g, &g->procs[index].report_fd);
        return rc;
    }
    if (pid == 0) {
        child_close_group_fds(g);
        fs__child_setup_or_exit(&plan);
        *report_wfd = wfd;
        return 0;
    }
    (void)fs__close(wfd);
    /* Both sides call setpgid so the group exists before the parent signals it. */
    if (opts->new_process_group)
        (void)setpgid(pid, pid);
    rc = fs_group_adopt(g, index, pid, 1, err);
    if (rc < 0) {
        (void)kill(pid, SIGKILL); /* our child, not reaped: the pid is still its own */
        (void)waitpid(pid, NULL, 0);
        return rc;
    }
    *report_wfd = -1;
    return pid;
}

int fs_group_setup_error(const fs_group_t *g, int index, fs_error_t *err)
{
    int rc = check_index(g, index, err);
    if (rc < 0)
        return rc;
    const fs_proc_t *p = &g->procs[index];
    if (p->setup_step == FS_SETUP_NONE)
        return FS_OK;
    errno = p->setup_errno;
    return fs_error_sys(err, "rank %d (pid %d): child set-up failed at %s", index, (int)p->pid,
                        fs_setup_step_name(p->setup_step));
}

/* ---- signalling and stopping ------------------------------------------------ */

/*
 * 1 while the rank is known to be unreaped (exited or not), so its pid and process group
 * id are still the job's. Its pidfd says so until it is reaped, whoever reaps it. Where
 * the system has no pidfds: a child of ours is unreaped until release_rank; a rank another
 * process reaps is assumed unreaped while its exit is not known (a residual risk there).
 * A rank that was gone before it was adopted (no pidfd) never is.
 */
static int leader_unreaped(const fs_proc_t *p)
{
    if (p->state == FS_PROC_UNUSED)
        return 0;
    if (p->pidfd >= 0)
        return fs__pidfd_send_signal(p->pidfd, 0) == 0 || errno == EPERM; /* EPERM: exists */
    if (p->pidfd_missing)
        return p->is_child || p->state == FS_PROC_RUNNING;
    return 0;
}

/* sig to the rank's process group (its workers too) while the rank is unreaped; to the
   rank alone, through its pidfd, when its group does not exist (yet). */
static void signal_rank(fs_proc_t *p, int sig)
{
    if (!leader_unreaped(p))
        return; /* reaped: the numbers may be someone else's now */
    if (kill(-p->pid, sig) == 0 || errno != ESRCH)
        return;
    /* ESRCH: not (yet) a group leader (a rank started by multiprocessing makes its group
       itself). Its pid is still its own: no other process can hold an unreaped pid. */
    if (p->pidfd >= 0)
        (void)fs__pidfd_send_signal(p->pidfd, sig); /* ESRCH: reaped since, nothing sent */
    else
        (void)kill(p->pid, sig);
}

int fs_group_signal(fs_group_t *g, int sig, fs_error_t *err)
{
    if (sig <= 0 || sig >= NSIG)
        return fs_error_set(err, FS_EINVAL, "invalid signal number %d", sig);
    for (int i = 0; i < g->nprocs; i++) {
        fs_proc_t *p = &g->procs[i];
        if (p->state == FS_PROC_RUNNING) {
            signal_rank(p, sig);
            p->killed_by_us = 1;
        }
    }
    return FS_OK;
}

int fs_group_signal_rank(fs_group_t *g, int index, int sig, fs_error_t *err)
{
    int rc = check_index(g, index, err);
    if (rc < 0)
        return rc;
    if (sig <= 0 || sig >= NSIG)
        return fs_error_set(err, FS_EINVAL, "invalid signal number %d", sig);
    fs_proc_t *p = &g->procs[index];
    if (p->state == FS_PROC_RUNNING && !p->gone)
        signal_rank(p, sig);
    return FS_OK;
}

/* Wait until no rank runs or the deadline passes; signals do not cut it short. */
static int wait_all_until(fs_group_t *g, int64_t deadline, fs_error_t *err)
{
    while (awaiting(g) > 0) {
        int64_t left = deadline - fs_now_ms();
        if (left <= 0)
            return FS_ETIMEOUT;
        int rc = fs_group_wait(g, (int)(left > WAIT_SLICE_MAX_MS ? WAIT_SLICE_MAX_MS : left), err);
        if (rc < 0 && rc != FS_EINTR)
            return rc;
    }
    return FS_OK;
}

/* SIGKILL what is left of every rank's process group (grandchildren too), exited ranks'
   included: signal_rank does it only while the rank is unreaped. */
static void kill_rank_groups(fs_group_t *g)
{
    for (int i = 0; i < g->nprocs; i++)
        signal_rank(&g->procs[i], SIGKILL);
}

int fs_group_terminate(fs_group_t *g, int sig, int grace_ms, fs_error_t *err)
{
    if (grace_ms < 0)
        grace_ms = 0;
    int rc = FS_OK;
    if (sig > 0 && fs_group_running(g) > 0) {
        rc = fs_group_signal(g, sig, err);
        if (rc < 0)
            return rc;
        rc = wait_all_until(g, fs_now_ms() + grace_ms, err);
        if (rc < 0 && rc != FS_ETIMEOUT)
            return rc;
    }
    for (int i = 0; i < g->nprocs; i++)
        if (g->procs[i].state == FS_PROC_RUNNING)
            g->procs[i].killed_by_us = 1;
    kill_rank_groups(g);
    rc = wait_all_until(g, fs_now_ms() + KILL_REAP_MS, err);
    if (rc == FS_ETIMEOUT)
        return fs_error_set(err, FS_ETIMEOUT, "%d rank(s) did not exit within %d ms of SIGKILL",
                            fs_group_running(g), KILL_REAP_MS);
    return rc;
}

int fs_group_guard(fs_group_t *g, int index, fs_error_t *err)
{
    int rc = check_index(g, index, err);
    if (rc < 0)
        return rc;
    fs_proc_t *p = &g->procs[index];
    if (p->state == FS_PROC_UNUSED)
        return fs_error_set(err, FS_EINVAL, "rank %d was not started", index);
    if (p->guarded || (p->pidfd < 0 && !p->pidfd_missing))
        return FS_OK; /* registered already, or gone before it was adopted */
    rc = fs_guardian_default_watch(p->pid, p->pidfd, NULL, err);
    if (rc == FS_OK)
        p->guarded = 1;
    return rc;
}

/*
 * The end of a rank's life in the group, in this order: SIGKILL what is left of its
 * process group while the rank is unreaped (its zombie still holds the group id), take
 * it off the guardian, then reap it if it is ours. A rank still running here (it outlived
 * fs_group_terminate's wait after SIGKILL) is not reaped: it stays our zombie.
 */
static void release_rank(fs_proc_t *p)
{
    if (p->state == FS_PROC_UNUSED)
        return;
    signal_rank(p, SIGKILL);
    if (p->guarded)
        (void)fs_guardian_default_unwatch(p->pid, NULL);
    p->guarded = 0;
    if (p->is_child && p->state == FS_PROC_EXITED) {
        siginfo_t si;
        memset(&si, 0, sizeof si);
        idtype_t idtype = p->pidfd >= 0 ? (idtype_t)P_PIDFD : P_PID;
        id_t id = p->pidfd >= 0 ? (id_t)p->pidfd : (id_t)p->pid;
        while (waitid(idtype, id, &si, WEXITED | WNOHANG) < 0 && errno == EINTR) {
        }
    }
}

void fs_group_free(fs_group_t *g)
{
    if (g == NULL)
        return;
    if (g->owner == getpid()) {
        fs_error_t err;
        fs_error_clear(&err);
        if (fs_group_running(g) > 0)
            (void)fs_group_terminate(g, 0, 0, &err);
        for (int i = 0; i < g->nprocs; i++) {
            release_rank(&g->procs[i]);
            fs__closep(&g->procs[i].pidfd);
            fs__closep(&g->procs[i].report_fd);
        }
        fs__closep(&g->status_fd);
        fs__closep(&g->epfd);
    }
    /* In a forked copy the fds belong to the parent's bookkeeping (already
       closed in the child): only the memory is ours to release. */
    for (int i = 0; i < g->nprocs; i++)
        free(g->procs[i].report);
    free(g);
}

const char *fs_signal_name(int sig)
{
    /* sigabbrev_np needs glibc 2.32; keep our own table for portability. */
    switch (sig) {
    case SIGHUP: return "SIGHUP";
    case SIGINT: return "SIGINT";
    case SIGQUIT: return "SIGQUIT";
    case SIGILL: return "SIGILL";
    case SIGTRAP: return "SIGTRAP";
    case SIGABRT: return "SIGABRT";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGKILL: return "SIGKILL";
    case SIGUSR1: return "SIGUSR1";
    case SIGSEGV: return "SIGSEGV";
    case SIGUSR2: return "SIGUSR2";
    case SIGPIPE: return "SIGPIPE";
    case SIGALRM: return "SIGALRM";
    case SIGTERM: return "SIGTERM";
    case SIGCHLD: return "SIGCHLD";
    case SIGCONT: return "SIGCONT";
    case SIGSTOP: return "SIGSTOP";
    case SIGTSTP: return "SIGTSTP";
    case SIGXCPU: return "SIGXCPU";
    case SIGXFSZ: return "SIGXFSZ";
    case SIGSYS: return "SIGSYS";
    default: return NULL;
    }
}
