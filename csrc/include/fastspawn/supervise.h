/*
 * fastspawn/supervise.h - start, watch and stop a group of rank processes (supervise.c,
 * child.c) and the guardian that outlives a killed launcher (guardian.c).
 * Part of the public C API; include "fastspawn.h" for all of it.
 */
#ifndef FASTSPAWN_SUPERVISE_H
#define FASTSPAWN_SUPERVISE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "fastspawn/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* State of one rank as the supervisor sees it. */
enum fs_proc_state {
    FS_PROC_UNUSED = 0,  /* slot not started */
    FS_PROC_RUNNING = 1, /* started, not exited */
    FS_PROC_EXITED = 2,  /* exited; exit valid */
};

/* Decoded exit status: exactly one of exit_code >= 0 or term_signal > 0. */
typedef struct fs_exit {
    int exit_code;   /* >= 0 when the process exited, else -1 */
    int term_signal; /* > 0 when a signal killed it, else 0 */
} fs_exit_t;

/*
 * The steps of the child side of a fork (fs_group_fork, fs_fork_rank), in order. When
 * one fails, the child writes {FS_CHILD_RECORD_MAGIC, step, errno} to its report fd and
 * exits with FS_CHILD_SETUP_EXIT; the supervisor turns that record into
 * fs_proc_t.setup_step / setup_errno (see fs_group_setup_error).
 */
enum fs_setup_step {
    FS_SETUP_NONE = 0,
    FS_SETUP_SETPGID = 1,   /* setpgid(0, 0): the rank's own process group */
    FS_SETUP_PDEATHSIG = 2, /* prctl(PR_SET_PDEATHSIG) */
};
#define FS_CHILD_SETUP_EXIT 127
/*
 * Test hook: with this environment variable set to "setpgid" or "pdeathsig" when a rank
 * is forked (or fs_child_setup runs), that step is made to fail (a call the kernel
 * rejects with EINVAL), so the failure path can be tested end to end. Read in the parent,
 * before fork.
 */
#define FS_CHILD_SETUP_FAIL_ENV "FASTSPAWN_TEST_CHILD_SETUP_FAIL"

typedef struct fs_proc {
    pid_t pid;
    int pidfd;        /* exit notification; -1 where pidfd_open is missing or once exited */
    int report_fd;    /* read end of the rank's report pipe, -1 when closed */
    int is_child;     /* 1 if we may reap it (waitid); 0 if another process does */
    int state;        /* enum fs_proc_state */
    int exit_order;   /* 1 for the first rank seen to exit, 2 for the next, ... */
    int killed_by_us; /* 1 once the supervisor signalled it */
    int gone;         /* its pidfd fired: exited, even if the status is not known yet */
    fs_exit_t exit;
    int setup_step;        /* enum fs_setup_step that failed in the child, FS_SETUP_NONE if none */
    int setup_errno;       /* the errno of that failure */
    unsigned char *report; /* bytes the rank wrote to its report pipe */
    size_t report_len, report_cap;
} fs_proc_t;

typedef struct fs_group fs_group_t;

/* Options for children forked by fs_group_fork() and fs_fork_rank(). */
typedef struct fs_fork_opts {
    int new_process_group;   /* setpgid(0, 0) so a kill reaches the rank's descendants */
    int parent_death_signal; /* PR_SET_PDEATHSIG signal, 0 for none */
    int guardian_fd; /* another fd the child must close (a guardian's launcher end), -1: none;
                        the process's own guardian (fs_guardian_default_*) needs none */
    int report_fd;   /* fs_fork_rank only: the child's report fd, where a failed set-up
                        writes its record; -1: none (fs_group_fork uses the rank's pipe) */
} fs_fork_opts_t;

/* Defaults: new process group, SIGKILL as parent-death signal, no fds (-1). Start from
   this rather than from {0}: 0 is a valid fd. */
void fs_fork_opts_init(fs_fork_opts_t *opts);

/* Create a group for nprocs ranks. */
int fs_group_new(int nprocs, fs_group_t **out, fs_error_t *err);
/* Kill (SIGKILL) and reap whatever is still running, close fds, free. NULL is a no-op. */
void fs_group_free(fs_group_t *g);
int fs_group_size(const fs_group_t *g);
const fs_proc_t *fs_group_proc(const fs_group_t *g, int index);

/*
 * Fork rank `index`. In the parent returns the child's pid (> 0); in the child
 * returns 0 after the child-side setup (process group, parent-death signal,
 * closing fds it must not hold), all done with async-signal-safe calls only.
 * When a set-up step fails the child does not return: it reports the step and errno on
 * its report pipe and exits with FS_CHILD_SETUP_EXIT (see enum fs_setup_step).
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
 * FS_OK when rank `index` did not fail in its child-side set-up; else FS_ESYS with a
 * message naming the rank, the step and the errno ("rank 1 (pid 42): child set-up failed
 * at setpgid(0, 0): Invalid argument"), sys_errno set.
 */
int fs_group_setup_error(const fs_group_t *g, int index, fs_error_t *err);
/* "setpgid(0, 0)", "prctl(PR_SET_PDEATHSIG)"; NULL for FS_SETUP_NONE or unknown steps. */
const char *fs_setup_step_name(int step);

/*
 * Stop every running rank: send `sig` to each rank's process group, wait up to
 * grace_ms for them to exit, then SIGKILL what is left (process groups too)
 * and reap. sig 0 skips straight to the SIGKILL; grace_ms < 0 counts as 0.
 * Returns FS_OK or a negative code (only on internal error).
 */
int fs_group_terminate(fs_group_t *g, int sig, int grace_ms, fs_error_t *err);
/* Send sig to every running rank's process group (no waiting). */
int fs_group_signal(fs_group_t *g, int sig, fs_error_t *err);

/*
 * Fork one rank outside any group (the zygote does this): in the child the
 * same async-signal-safe setup as fs_group_fork, returning 0 (or, when a step fails,
 * the record on opts->report_fd and FS_CHILD_SETUP_EXIT); in the parent the pid.
 */
pid_t fs_fork_rank(const fs_fork_opts_t *opts, fs_error_t *err);

/*
 * Child-side setup for a process started by other means (the Python rank
 * entry point of multiprocessing's spawn/forkserver): own process group and
 * parent-death signal with the getppid race check against expected_ppid
 * (<= 0: no check). The same steps as after fs_group_fork, reported as an error
 * instead: FS_OK, FS_ESYS naming the step, or FS_EPEER when the expected parent is
 * already gone.
 */
int fs_child_setup(int new_process_group, int parent_death_signal, pid_t expected_ppid,
                   fs_error_t *err);

/* Signal names: "SIGKILL" for 9; NULL for unknown numbers. */
const char *fs_signal_name(int sig);

/* ------------------------------------------------------------------ */
/* Guardian (guardian.c): a tiny process that kills every registered    */
/* rank process group when the launcher dies, even by SIGKILL.          */
/* ------------------------------------------------------------------ */

typedef struct fs_guardian {
    pid_t pid;    /* the guardian process */
    int write_fd; /* launcher's end of the socket pair; EOF tells the guardian to act */
    pid_t owner;  /* the launcher pid that created it (detects use after fork) */
} fs_guardian_t;

/*
 * Fork a guardian. Its only open fd is its end of the socket pair. A child forked later
 * inherits gd->write_fd unless it closes it (fs_fork_opts_t.guardian_fd): prefer the
 * process's own guardian below, which needs no such care.
 */
int fs_guardian_start(fs_guardian_t *gd, fs_error_t *err);
/* Register / unregister a process group the guardian must kill. */
int fs_guardian_watch(fs_guardian_t *gd, pid_t pgid, fs_error_t *err);
int fs_guardian_unwatch(fs_guardian_t *gd, pid_t pgid, fs_error_t *err);
/* Close the socket (the guardian then kills what is registered) and reap it. A copy
   in a forked child is left alone (FS_OK). */
int fs_guardian_stop(fs_guardian_t *gd, int timeout_ms, fs_error_t *err);

/*
 * The process's own guardian, what a launcher uses: started on the first watch, and its
 * launcher end closed in every child forked after that (pthread_atfork), so it never
 * leaks into ranks, their workers or unrelated subprocesses. A child that calls these
 * gets a guardian of its own. Thread-safe.
 */
/* Start the guardian if this process has none, then watch pgid. *guardian_pid (may be
   NULL) gets the guardian's pid. */
int fs_guardian_default_watch(pid_t pgid, pid_t *guardian_pid, fs_error_t *err);
/* Unwatch pgid; FS_OK without a guardian. */
int fs_guardian_default_unwatch(pid_t pgid, fs_error_t *err);
/* After the guardian died (a watch failed with FS_ECLOSED): start a new one. The caller
   registers its process groups again. */
int fs_guardian_default_restart(pid_t *guardian_pid, fs_error_t *err);
/* The guardian's pid, 0 when this process has none. */
pid_t fs_guardian_default_pid(void);

#ifdef __cplusplus
}
#endif
#endif /* FASTSPAWN_SUPERVISE_H */
