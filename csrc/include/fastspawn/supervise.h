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

/*
 * Signalling only the job's processes. A process group id is a pid number, and the
 * kernel hands that number to another process only once the rank that leads the group
 * has been reaped (a zombie still holds it). So the group follows one rule: a rank's
 * process group is signalled only while the rank is known to be unreaped, which its pidfd
 * tells (pidfd_send_signal(pidfd, 0) fails with ESRCH once it is reaped), and a single
 * rank is signalled through its pidfd. Ranks the group forked (is_child) are not reaped
 * when they exit: their status is read with waitid(WNOWAIT) and they stay zombies until
 * the group is freed, which first kills what is left of each rank's group. Where the
 * system has no pidfds, kill(2) by pid is the fallback (see fs_group_signal_rank).
 */

/* State of one rank as the supervisor sees it. */
enum fs_proc_state {
    FS_PROC_UNUSED = 0,  /* slot not started */
    FS_PROC_RUNNING = 1, /* started, not exited */
    FS_PROC_EXITED = 2,  /* exited; exit valid (a child of ours: a zombie until fs_group_free) */
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
    int pidfd;        /* exit notification and signalling; open until fs_group_free; -1 where the
                         system has no pidfds (pidfd_missing) or the rank was gone before adopted */
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
    int pidfd_missing; /* 1: pidfd_open is not offered here (kernel < 5.3, a sandbox) */
    int guarded;       /* registered with the process's guardian (fs_group_guard) */
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
/*
 * Release every rank and free the group. What still runs is SIGKILLed and waited for (as
 * fs_group_terminate(g, 0, 0)); then, rank by rank: SIGKILL to what is left of its process
 * group (a DataLoader worker that outlived it) while the rank is unreaped, unregister it
 * from the process's guardian (fs_group_guard), and only then reap it (ranks we forked).
 * Closes the fds. NULL is a no-op; in a forked copy of the process only memory is freed.
 */
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
 * whether this process is its parent and may reap it (it then stays a zombie until
 * fs_group_free, as a forked rank does). When it is not, its exit status must come
 * from fs_group_set_exit() or a status fd, and the process that reaps it decides how
 * long its group id stays the job's (the zygote keeps its ranks unreaped until the
 * launcher releases them). Adopt it before anything can have reaped it: the pid is
 * trusted once, here, to open the pidfd; after that only the pidfd is.
 */
int fs_group_adopt(fs_group_t *g, int index, pid_t pid, int is_child, fs_error_t *err);
/*
 * Register rank `index`'s process group with the process's own guardian
 * (fs_guardian_default_watch), with the rank's pidfd, so it is killed if this process
 * dies; fs_group_free unregisters it after killing what is left of the group and before
 * reaping the rank. A rank already gone when it was adopted is not registered (FS_OK):
 * its group id may no longer be the job's. Errors: those of fs_guardian_default_watch.
 */
int fs_group_guard(fs_group_t *g, int index, fs_error_t *err);
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
 * grace_ms for them to exit, then SIGKILL what is left: every rank's process group,
 * exited ranks' too, while the rank is unreaped (see the rule at the top). Exit statuses
 * are collected; ranks are reaped by fs_group_free. sig 0 skips straight to the SIGKILL;
 * grace_ms < 0 counts as 0. Returns FS_OK or a negative code (only on internal error).
 */
int fs_group_terminate(fs_group_t *g, int sig, int grace_ms, fs_error_t *err);
/* Send sig to every running rank's process group (no waiting); marks them killed_by_us. */
int fs_group_signal(fs_group_t *g, int sig, fs_error_t *err);
/*
 * Send sig to rank `index` alone, as multiprocessing's Process.terminate / kill do, but to
 * its process group: nothing once its exit was seen (FS_OK). Not marked killed_by_us (a
 * signal the program sent is not the supervisor's stop). The group is signalled while
 * the rank is unreaped, the rank through its pidfd (or by pid where pidfd_missing: for a
 * rank another process reaps, a residual risk on systems without pidfds).
 */
int fs_group_signal_rank(fs_group_t *g, int index, int sig, fs_error_t *err);

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
/* A group comes with its leader's pidfd: the guardian kills it only    */
/* while the leader is unreaped (the group id is then still the job's), */
/* and skips it once reaped (the number may be someone else's now).     */
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
/*
 * Register a process group the guardian must kill, with its leader's pidfd (the guardian
 * gets a copy over the socket: SCM_RIGHTS). pidfd -1 only where the system has no pidfds:
 * the group is then killed unchecked, which may hit an unrelated group that took the
 * number over once the leader was reaped. Unregister it before the leader is reaped.
 */
int fs_guardian_watch(fs_guardian_t *gd, pid_t pgid, int pidfd, fs_error_t *err);
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
/* Start the guardian if this process has none, then watch pgid with its leader's pidfd
   (as fs_guardian_watch). The guardian also remembers pgid and pidfd, to tell a new
   guardian if this one dies (the next watch finds it gone and starts another): pidfd must
   stay open until pgid is unwatched. *guardian_pid (may be NULL) gets the guardian's pid. */
int fs_guardian_default_watch(pid_t pgid, int pidfd, pid_t *guardian_pid, fs_error_t *err);
/* Unwatch pgid; FS_OK without a guardian. */
int fs_guardian_default_unwatch(pid_t pgid, fs_error_t *err);
/* Replace the guardian with a new one, told everything registered (the old one, if alive,
   exits without killing anything). */
int fs_guardian_default_restart(pid_t *guardian_pid, fs_error_t *err);
/* The guardian's pid, 0 when this process has none. */
pid_t fs_guardian_default_pid(void);
/* The registered process groups: up to cap of them into pgids; returns how many there are. */
size_t fs_guardian_default_watched(pid_t *pgids, size_t cap);

#ifdef __cplusplus
}
#endif
#endif /* FASTSPAWN_SUPERVISE_H */
