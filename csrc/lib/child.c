/*
 * child.c - the child side of a fork: one set-up for both fork paths (fs_group_fork in
 * supervise.c, fs_fork_rank here) and for processes started by other means
 * (fs_child_setup).
 *
 * After libuv's uv__process_child_init: between fork() and the return to the caller the
 * child makes only async-signal-safe calls (the parent may have other threads holding
 * locks), and a step that fails is not silent: the child writes {magic, step, errno} to
 * its report fd and exits with FS_CHILD_SETUP_EXIT (127, as libuv's children do). The
 * supervisor reading that report turns it into an error naming the step
 * (fs_group_setup_error). libuv's children exec, so a pipe's EOF tells the parent that
 * set-up succeeded; ours return to the caller's code, so success stays silent and the
 * parent does not wait for it (no round trip per fork).
 */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "internal.h"

/* The record a failed child writes: magic, int32 step, int32 errno (host byte order). */
static const unsigned char record_magic[4] = {'F', 'S', 'C', '1'};
#define RECORD_LEN 12

const char *fs_setup_step_name(int step)
{
    switch (step) {
    case FS_SETUP_SETPGID: return "setpgid(0, 0)";
    case FS_SETUP_PDEATHSIG: return "prctl(PR_SET_PDEATHSIG)";
    default: return NULL;
    }
}

static int fail_step_from_env(void)
{
    const char *v = getenv(FS_CHILD_SETUP_FAIL_ENV);
    if (v == NULL)
        return FS_SETUP_NONE;
    if (strcmp(v, "setpgid") == 0)
        return FS_SETUP_SETPGID;
    if (strcmp(v, "pdeathsig") == 0)
        return FS_SETUP_PDEATHSIG;
    return FS_SETUP_NONE;
}

/*
 * The steps, in order. Returns FS_SETUP_NONE, or the step that failed with errno set.
 * *parent_gone = 1 when, once the death signal is armed, getppid() is no longer parent.
 * Async-signal-safe. fail_step (the test hook) makes that step's call invalid, so the
 * kernel itself rejects it (EINVAL).
 */
static int run_steps(int new_process_group, int parent_death_signal, pid_t parent, int fail_step,
                     int *parent_gone)
{
    *parent_gone = 0;
    if (new_process_group) {
        pid_t pgid = fail_step == FS_SETUP_SETPGID ? -1 : 0;
        /* EPERM: already a session leader; its group is its own, nothing to do. */
        if (setpgid(0, pgid) < 0 && errno != EPERM)
            return FS_SETUP_SETPGID;
    }
    if (parent_death_signal > 0) {
        unsigned long sig = fail_step == FS_SETUP_PDEATHSIG ? 1000ul /* not a signal */
                                                            : (unsigned long)parent_death_signal;
        if (prctl(PR_SET_PDEATHSIG, sig) < 0)
            return FS_SETUP_PDEATHSIG;
        /* The parent may have died before prctl took effect. */
        if (parent > 0 && getppid() != parent)
            *parent_gone = 1;
    }
    return FS_SETUP_NONE;
}

void fs__child_plan(struct fs__child_plan *plan, const fs_fork_opts_t *opts, int report_fd)
{
    plan->new_process_group = opts->new_process_group;
    plan->parent_death_signal = opts->parent_death_signal;
    plan->parent = getpid();
    plan->report_fd = report_fd;
    plan->close_fd = opts->guardian_fd;
    plan->fail_step = fail_step_from_env();
}

static void write_record(int fd, int step, int sys_errno)
{
    unsigned char rec[RECORD_LEN];
    int32_t v[2] = {step, sys_errno};
    memcpy(rec, record_magic, sizeof record_magic);
    memcpy(rec + sizeof record_magic, v, sizeof v);
    ssize_t n;
    do {
        n = write(fd, rec, sizeof rec); /* 12 bytes to a pipe: one atomic write */
    } while (n < 0 && errno == EINTR);
    /* A short or failed write leaves the bare exit status: all that is left to say. */
}

void fs__child_setup_or_exit(const struct fs__child_plan *plan)
{
    if (plan->close_fd >= 0)
        (void)fs__close(plan->close_fd);
    int parent_gone = 0;
    int step = run_steps(plan->new_process_group, plan->parent_death_signal, plan->parent,
                         plan->fail_step, &parent_gone);
    if (step != FS_SETUP_NONE) {
        if (plan->report_fd >= 0)
            write_record(plan->report_fd, step, errno);
        _exit(FS_CHILD_SETUP_EXIT);
    }
    if (parent_gone) {
        /* The launcher already died: behave as if the death signal had arrived. */
        (void)kill(getpid(), plan->parent_death_signal);
        _exit(128 + plan->parent_death_signal);
    }
}

int fs__child_record_decode(const unsigned char *buf, size_t len, int *step, int *sys_errno)
{
    if (len != RECORD_LEN || memcmp(buf, record_magic, sizeof record_magic) != 0)
        return 0;
    int32_t v[2];
    memcpy(v, buf + sizeof record_magic, sizeof v);
    if (fs_setup_step_name(v[0]) == NULL)
        return 0;
    *step = v[0];
    *sys_errno = v[1];
    return 1;
}

void fs_fork_opts_init(fs_fork_opts_t *opts)
{
    memset(opts, 0, sizeof *opts);
    opts->new_process_group = 1;
    opts->parent_death_signal = SIGKILL;
    opts->guardian_fd = -1;
    opts->report_fd = -1;
}

pid_t fs_fork_rank(const fs_fork_opts_t *opts, fs_error_t *err)
{
    struct fs__child_plan plan;
    fs__child_plan(&plan, opts, opts->report_fd);
    pid_t pid = fork();
    if (pid < 0)
        return fs_error_sys(err, "fork");
    if (pid == 0) {
        fs__child_setup_or_exit(&plan);
        return 0;
    }
    /* Both sides call setpgid so the group exists before the parent signals it. */
    if (opts->new_process_group)
        (void)setpgid(pid, pid);
    return pid;
}

int fs_child_setup(int new_process_group, int parent_death_signal, pid_t expected_ppid,
                   fs_error_t *err)
{
    int parent_gone = 0;
    int step = run_steps(new_process_group, parent_death_signal, expected_ppid,
                         fail_step_from_env(), &parent_gone);
    if (step != FS_SETUP_NONE)
        return fs_error_sys(err, "%s", fs_setup_step_name(step));
    if (parent_gone)
        return fs_error_set(err, FS_EPEER, "the launcher (pid %d) is already gone",
                            (int)expected_ppid);
    return FS_OK;
}
