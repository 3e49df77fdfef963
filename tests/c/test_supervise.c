/*
 * test_supervise.c - the supervisor (supervise.c), the child side of fork (child.c) and
 * the guardian (guardian.c), from plain C. Tests order events with pipes, not sleeps.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fastspawn.h"
#include "fs_test.h"

static const fs_fork_opts_t OPTS = {
    .new_process_group = 1, .parent_death_signal = SIGKILL, .guardian_fd = -1, .report_fd = -1};

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static int alive(pid_t pid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *paren = strrchr(buf, ')');
    return paren != NULL && paren[2] != 'Z';
}

static int wait_gone(pid_t pid, int ms)
{
    for (int t = 0; t < ms; t += 10) {
        if (!alive(pid))
            return 1;
        sleep_ms(10);
    }
    return !alive(pid);
}

static void wait_all(fs_group_t *g, fs_error_t *err)
{
    int64_t deadline = fs_now_ms() + 10000;
    while (fs_group_running(g) > 0 && fs_now_ms() < deadline)
        FS_CHECK(fs_group_wait(g, 1000, err) >= 0);
}

/* Wait until the exit of rank `index` is recorded (10 s at most). */
static void wait_exited(fs_group_t *g, int index, fs_error_t *err)
{
    int64_t deadline = fs_now_ms() + 10000;
    while (fs_group_proc(g, index)->state != FS_PROC_EXITED && fs_now_ms() < deadline)
        FS_CHECK(fs_group_wait(g, 1000, err) >= 0);
}

/* Block until a byte arrives on fd or it closes (a child waiting for its cue). */
static void wait_for_cue(int fd)
{
    char c;
    while (read(fd, &c, 1) < 0 && errno == EINTR) {
    }
}

static void cue(int fd)
{
    FS_CHECK(write(fd, "x", 1) == 1);
}

/* pid is our child and has exited, but is not reaped: a zombie (looked at with WNOWAIT,
   so looking does not reap it). */
static int our_zombie(pid_t pid)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    return waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == pid;
}

static int reaped(pid_t pid)
{
    return waitpid(pid, NULL, WNOHANG) < 0 && errno == ECHILD;
}

/* Orphans (a rank's grandchildren) come to this test process, which can then reap them. */
static void become_subreaper(void)
{
    FS_CHECK(prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0);
}

/* Kill and reap every child left (orphans included, as a subreaper). */
static void reap_all(void)
{
    pid_t pid;
    while ((pid = waitpid(-1, NULL, WNOHANG)) != 0) {
        if (pid < 0 && errno != EINTR)
            return;
    }
}

static int pidfd_of(pid_t pid)
{
    return (int)syscall(SYS_pidfd_open, pid, 0);
}

FS_TEST(exit_codes_and_order)
{
    fs_error_t err;
    fs_group_t *g = NULL;
    FS_CHECK_OK(fs_group_new(3, &g, &err), &err);
    int go[3][2];
    for (int i = 0; i < 3; i++)
        FS_CHECK(pipe(go[i]) == 0);
    for (int i = 0; i < 3; i++) {
        int wfd = -1;
        pid_t pid = fs_group_fork(g, i, &OPTS, &wfd, &err);
        FS_CHECK(pid >= 0);
        if (pid == 0) {
            wait_for_cue(go[i][0]);
            _exit(10 + i);
        }
    }
    /* Let the ranks exit one at a time, each once the previous one's exit was seen. */
    for (int i = 0; i < 3; i++) {
        cue(go[i][1]);
        wait_exited(g, i, &err);
    }
    for (int i = 0; i < 3; i++) {
        const fs_proc_t *p = fs_group_proc(g, i);
        FS_CHECK_EQ(p->state, FS_PROC_EXITED);
        FS_CHECK_EQ(p->exit.exit_code, 10 + i);
        FS_CHECK_EQ(p->exit.term_signal, 0);
        FS_CHECK_EQ(p->exit_order, i + 1);
    }
    fs_group_free(g);
}

FS_TEST(exit_status_is_read_without_reaping)
{
    /* An exited rank stays our zombie, so its pid (its group's id) cannot be handed to
       another process, until the group is freed. */
    fs_error_t err;
    fs_group_t *g = NULL;
    FS_CHECK_OK(fs_group_new(1, &g, &err), &err);
    int wfd = -1;
    pid_t pid = fs_group_fork(g, 0, &OPTS, &wfd, &err);
    if (pid == 0)
        _exit(5);
    wait_all(g, &err);
    const fs_proc_t *p = fs_group_proc(g, 0);
    FS_CHECK_EQ(p->state, FS_PROC_EXITED);
    FS_CHECK_EQ(p->exit.exit_code, 5);
    FS_CHECK(p->pidfd >= 0);   /* still open: it tells whether the rank is unreaped */
    FS_CHECK(our_zombie(pid)); /* not reaped */
    FS_CHECK_EQ(fs_group_wait(g, 0, &err), 0); /* and counted once */
    FS_CHECK_OK(fs_group_terminate(g, SIGTERM, 0, &err), &err);
    FS_CHECK(our_zombie(pid));                         /* terminate does not reap either */
    FS_CHECK_EQ(fs_group_proc(g, 0)->killed_by_us, 0); /* it had exited before */
    fs_group_free(g);
    FS_CHECK(reaped(pid)); /* the group's end reaps it */
}

/* In a rank: fork a worker in the rank's process group (a DataLoader worker that
   ignores SIGTERM and waits to be killed) and send its pid on fd; exits on failure. */
static void child_start_worker(int fd)
{
    pid_t worker = fork();
    if (worker == 0) {
        signal(SIGTERM, SIG_IGN);
        pause();
        _exit(0);
    }
    int32_t id = worker;
    if (worker < 0 || write(fd, &id, sizeof id) != sizeof id)
        _exit(2);
}

static pid_t read_id(int fd)
{
    int32_t id = 0;
    FS_CHECK(read(fd, &id, sizeof id) == sizeof id);
    return id;
}

/* Fork rank `index` with a worker (*worker gets its pid); the rank exits at its cue, or
   at once when cue_r < 0. */
static pid_t fork_rank_with_worker(fs_group_t *g, int index, int cue_r, pid_t *worker,
                                   fs_error_t *err)
{
    int ids[2];
    FS_CHECK(pipe(ids) == 0);
    int wfd = -1;
    pid_t pid = fs_group_fork(g, index, &OPTS, &wfd, err);
    if (pid == 0) {
        child_start_worker(ids[1]);
        if (cue_r >= 0)
            wait_for_cue(cue_r);
        _exit(0);
    }
    *worker = read_id(ids[0]);
    close(ids[0]);
    close(ids[1]);
    return pid;
}

FS_TEST(exited_rank_group_is_killed_at_close)
{
    become_subreaper();
    fs_error_t err;
    fs_group_t *g = NULL;
    FS_CHECK_OK(fs_group_new(1, &g, &err), &err);
    pid_t worker = 0;
    pid_t rank = fork_rank_with_worker(g, 0, -1, &worker, &err);
    wait_all(g, &err);
    FS_CHECK_EQ(fs_group_proc(g, 0)->exit.exit_code, 0);
    FS_CHECK(our_zombie(rank));
    FS_CHECK(alive(worker)); /* the rank's end alone does not touch its worker */
    fs_group_free(g);
    FS_CHECK(wait_gone(worker, 5000)); /* its group was killed while the zombie held its id */
    FS_CHECK(reaped(rank));
    reap_all();
}

/* Two ranks with a worker each (this process a subreaper); rank 0 exits at once when
   rank0_exits, the others run until stopped. workers[] gets the workers' pids. */
static fs_group_t *two_ranks_with_workers(int rank0_exits, pid_t workers[2], fs_error_t *err)
{
    become_subreaper();
    fs_group_t *g = NULL;
    FS_CHECK_OK(fs_group_new(2, &g, err), err);
    int go[2]; /* never written: a rank waiting on it runs until stopped */
    FS_CHECK(pipe(go) == 0);
    (void)fork_rank_with_worker(g, 0, rank0_exits ? -1 : go[0], &workers[0], err);
    (void)fork_rank_with_worker(g, 1, go[0], &workers[1], err);
    return g;
}

FS_TEST(terminate_kills_what_an_exited_rank_left)
{
    fs_error_t err;
    pid_t workers[2];
    fs_group_t *g = two_ranks_with_workers(1, workers, &err);
    wait_exited(g, 0, &err);
    FS_CHECK_OK(fs_group_terminate(g, SIGTERM, 200, &err), &err);
    /* Both workers: the running rank's and the one the exited rank left behind. */
    FS_CHECK(wait_gone(workers[0], 5000));
    FS_CHECK(wait_gone(workers[1], 5000));
    FS_CHECK_EQ(fs_group_proc(g, 1)->exit.term_signal, SIGTERM);
    fs_group_free(g);
    reap_all();
}

FS_TEST(signal_rank_reaches_its_group_and_nothing_once_ended)
{
    fs_error_t err;
    pid_t workers[2];
    fs_group_t *g = two_ranks_with_workers(0, workers, &err);
    FS_CHECK_OK(fs_group_signal_rank(g, 0, SIGKILL, &err), &err);
    wait_exited(g, 0, &err);
    FS_CHECK_EQ(fs_group_proc(g, 0)->exit.term_signal, SIGKILL);
    FS_CHECK_EQ(fs_group_proc(g, 0)->killed_by_us, 0); /* the program's signal, not a stop */
    FS_CHECK(wait_gone(workers[0], 5000));             /* its whole group */
    FS_CHECK(alive(workers[1]) && fs_group_proc(g, 1)->state == FS_PROC_RUNNING);
    FS_CHECK_OK(fs_group_signal_rank(g, 0, SIGKILL, &err), &err); /* ended: a no-op */
    FS_CHECK_EQ(fs_group_signal_rank(g, 5, SIGKILL, &err), FS_EINVAL);
    FS_CHECK_EQ(fs_group_signal_rank(g, 1, 0, &err), FS_EINVAL);
    fs_group_free(g);
    FS_CHECK(wait_gone(workers[1], 5000));
    reap_all();
}

/*
 * A rank another process reaps (played by the test, as multiprocessing would): once it
 * is reaped, its group id may belong to someone else, so nothing goes to its group, even
 * though the group still has a member here (the worker, which keeps it alive) and the
 * supervisor has not yet seen the exit. With the rank unreaped (a zombie), its group is
 * killed as usual.
 */
FS_TEST(no_group_signal_once_the_leader_is_reaped)
{
    become_subreaper();
    for (int reap_first = 1; reap_first >= 0; reap_first--) {
        fs_error_t err;
        fs_group_t *g = NULL;
        FS_CHECK_OK(fs_group_new(1, &g, &err), &err);
        int ids[2];
        FS_CHECK(pipe(ids) == 0);
        pid_t rank = fs_fork_rank(&OPTS, &err); /* outside the group, like a zygote rank */
        if (rank == 0) {
            child_start_worker(ids[1]);
            _exit(0);
        }
        FS_CHECK(rank > 0);
        FS_CHECK_OK(fs_group_adopt(g, 0, rank, 0, &err), &err);
        pid_t worker = read_id(ids[0]);
        int status = 0;
        if (reap_first) {
            FS_CHECK(waitpid(rank, &status, 0) == rank);
        } else {
            siginfo_t si;
            FS_CHECK(waitid(P_PID, (id_t)rank, &si, WEXITED | WNOWAIT) == 0);
        }
        /* Not yet known as exited (no fs_group_wait): only the pidfd can tell. */
        FS_CHECK_EQ(fs_group_proc(g, 0)->state, FS_PROC_RUNNING);
        FS_CHECK_OK(fs_group_signal_rank(g, 0, SIGKILL, &err), &err);
        FS_CHECK_OK(fs_group_signal(g, SIGKILL, &err), &err);
        if (reap_first) {
            sleep_ms(100);
            FS_CHECK(alive(worker)); /* not signalled: the group id is not verifiably ours */
            FS_CHECK_OK(fs_group_set_exit(g, 0, status, &err), &err);
            fs_group_free(g);
            FS_CHECK(alive(worker));
            FS_CHECK(kill(worker, SIGKILL) == 0); /* the test's own cleanup */
        } else {
            FS_CHECK(wait_gone(worker, 5000)); /* the zombie holds the id: ours, killed */
            FS_CHECK_OK(fs_group_set_exit(g, 0, SIGKILL, &err), &err);
            fs_group_free(g);
            FS_CHECK(waitpid(rank, NULL, 0) == rank);
        }
        FS_CHECK(wait_gone(worker, 5000));
        close(ids[0]);
        close(ids[1]);
        reap_all();
    }
}

FS_TEST(report_larger_than_a_pipe)
{
    enum { SIZE = 1 << 20 };
    fs_error_t err;
    fs_group_t *g = NULL;
    FS_CHECK_OK(fs_group_new(1, &g, &err), &err);
    int wfd = -1;
    pid_t pid = fs_group_fork(g, 0, &OPTS, &wfd, &err);
    if (pid == 0) {
        static char buf[SIZE];
        for (int i = 0; i < SIZE; i++)
            buf[i] = (char)(i * 7);
        size_t off = 0;
        while (off < SIZE) {
            ssize_t n = write(wfd, buf + off, SIZE - off);
            if (n <= 0)
                _exit(3);
            off += (size_t)n;
        }
        _exit(0);
    }
    wait_all(g, &err);
    const fs_proc_t *p = fs_group_proc(g, 0);
    FS_CHECK_EQ(p->exit.exit_code, 0);
    FS_CHECK_EQ(p->report_len, SIZE);
    int same = 1;
    for (int i = 0; i < SIZE && same; i++)
        same = p->report[i] == (unsigned char)(char)(i * 7);
    FS_CHECK(same);
    fs_group_free(g);
}

FS_TEST(wait_times_out)
{
    fs_error_t err;
    fs_group_t *g = NULL;
    FS_CHECK_OK(fs_group_new(1, &g, &err), &err);
    int wfd = -1;
    if (fs_group_fork(g, 0, &OPTS, &wfd, &err) == 0) {
        pause(); /* until fs_group_free kills it */
        _exit(0);
    }
    int64_t t0 = fs_now_ms();
    FS_CHECK_EQ(fs_group_wait(g, 100, &err), 0);
    int64_t took = fs_now_ms() - t0;
    FS_CHECK(took >= 90 && took < 1000);
    FS_CHECK_EQ(fs_group_wait(g, 0, &err), 0); /* non-blocking look */
    FS_CHECK_EQ(fs_group_running(g), 1);
    fs_group_free(g); /* kills and reaps */
}

FS_TEST(terminate_reaches_grandchildren_and_escalates)
{
    fs_error_t err;
    fs_group_t *g = NULL;
    FS_CHECK_OK(fs_group_new(2, &g, &err), &err);
    int fds[2];
    FS_CHECK(pipe(fds) == 0);
    for (int i = 0; i < 2; i++) {
        int wfd = -1;
        pid_t pid = fs_group_fork(g, i, &OPTS, &wfd, &err);
        if (pid == 0) {
            if (i == 1)
                signal(SIGTERM, SIG_IGN); /* must be SIGKILLed after the grace */
            pid_t grandchild = fork();
            if (grandchild == 0) {
                signal(SIGTERM, SIG_IGN);
                sleep_ms(60000);
                _exit(0);
            }
            int32_t gc = grandchild;
            if (write(fds[1], &gc, sizeof gc) != sizeof gc)
                _exit(2);
            sleep_ms(60000);
            _exit(0);
        }
    }
    int32_t grandchildren[2];
    FS_CHECK(read(fds[0], &grandchildren[0], 4) == 4 && read(fds[0], &grandchildren[1], 4) == 4);
    int64_t t0 = fs_now_ms();
    FS_CHECK_OK(fs_group_terminate(g, SIGTERM, 300, &err), &err);
    FS_CHECK(fs_now_ms() - t0 < 3000);
    FS_CHECK_EQ(fs_group_proc(g, 0)->exit.term_signal, SIGTERM);
    FS_CHECK_EQ(fs_group_proc(g, 1)->exit.term_signal, SIGKILL);
    FS_CHECK(fs_group_proc(g, 0)->killed_by_us && fs_group_proc(g, 1)->killed_by_us);
    FS_CHECK(wait_gone(grandchildren[0], 3000));
    FS_CHECK(wait_gone(grandchildren[1], 3000));
    fs_group_free(g);
}

/* A one-rank group whose rank we fork and reap ourselves (playing the zygote);
   its status, if any, goes to *status_wfd. Returns the rank's pid. */
static pid_t adopt_reaped_elsewhere(fs_group_t **g, int delay_ms, int code, int *status_wfd,
                                    fs_error_t *err)
{
    FS_CHECK_OK(fs_group_new(1, g, err), err);
    int status_pipe[2];
    FS_CHECK(pipe(status_pipe) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        sleep_ms(delay_ms);
        _exit(code);
    }
    FS_CHECK_OK(fs_group_adopt(*g, 0, pid, 0, err), err);
    FS_CHECK_OK(fs_group_attach_status_fd(*g, status_pipe[0], err), err);
    *status_wfd = status_pipe[1];
    return pid;
}

FS_TEST(adopted_rank_with_status_fd)
{
    fs_error_t err;
    fs_group_t *g = NULL;
    int status_wfd = -1;
    pid_t pid = adopt_reaped_elsewhere(&g, 50, 7, &status_wfd, &err);
    int status = 0;
    FS_CHECK(waitpid(pid, &status, 0) == pid);
    int32_t rec[2] = {pid, status};
    FS_CHECK(write(status_wfd, rec, sizeof rec) == sizeof rec);
    wait_all(g, &err);
    FS_CHECK_EQ(fs_group_proc(g, 0)->exit.exit_code, 7);
    FS_CHECK(fs_group_proc(g, 0)->gone);
    (void)close(status_wfd);
    fs_group_free(g);
}

FS_TEST(reaper_gone_means_ranks_lost)
{
    fs_error_t err;
    fs_group_t *g = NULL;
    int status_wfd = -1;
    pid_t pid = adopt_reaped_elsewhere(&g, 20, 0, &status_wfd, &err);
    FS_CHECK(waitpid(pid, NULL, 0) == pid);
    (void)close(status_wfd); /* the reaper dies without a word */
    wait_all(g, &err);
    FS_CHECK_EQ(fs_group_proc(g, 0)->state, FS_PROC_EXITED);
    FS_CHECK_EQ(fs_group_proc(g, 0)->exit.term_signal, SIGKILL);
    fs_group_free(g);
}

FS_TEST(bad_arguments)
{
    fs_error_t err;
    fs_group_t *g = NULL;
    FS_CHECK_EQ(fs_group_new(0, &g, &err), FS_EINVAL);
    FS_CHECK(strstr(err.msg, "nprocs") != NULL);
    FS_CHECK_OK(fs_group_new(1, &g, &err), &err);
    int wfd;
    FS_CHECK_EQ(fs_group_fork(g, 5, &OPTS, &wfd, &err), FS_EINVAL);
    FS_CHECK(strstr(err.msg, "out of range") != NULL);
    FS_CHECK_EQ(fs_group_adopt(g, 0, -3, 0, &err), FS_EINVAL);
    FS_CHECK_EQ(fs_group_signal(g, 0, &err), FS_EINVAL);
    FS_CHECK_EQ(fs_child_setup(0, SIGKILL, getppid() + 100000, &err), FS_EPEER);
    fs_group_free(g);
}

FS_TEST(parent_death_signal_race_check)
{
    /* A child whose expected parent is already gone kills itself at once. */
    pid_t pid = fork();
    if (pid == 0) {
        fs_error_t err;
        int rc = fs_child_setup(1, SIGKILL, 1 /* not our parent */, &err);
        _exit(rc == FS_EPEER ? 0 : 1);
    }
    int status = 0;
    FS_CHECK(waitpid(pid, &status, 0) == pid);
    FS_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* Read the ids a launcher process sends (len bytes), wait for its "ready" byte, then
   SIGKILL and reap it: its guardian acts from then on. */
static void kill_launcher_when_ready(pid_t launcher, int ids_fd, int32_t *ids, size_t len,
                                     int ready_fd)
{
    char w;
    FS_CHECK(read(ids_fd, ids, len) == (ssize_t)len);
    FS_CHECK(read(ready_fd, &w, 1) == 1);
    FS_CHECK(kill(launcher, SIGKILL) == 0);
    FS_CHECK(waitpid(launcher, NULL, 0) == launcher);
}

/*
 * A launcher process registers a rank with a guardian and is SIGKILLed: the guardian must
 * kill the rank and its grandchild. default_guardian: the process's own guardian, whose
 * launcher end no child may keep (atfork) - else the guardian would never see EOF.
 */
static void guardian_case(int default_guardian)
{
    int ids_pipe[2], ready[2];
    FS_CHECK(pipe(ids_pipe) == 0 && pipe(ready) == 0);
    pid_t launcher = fork();
    if (launcher == 0) {
        fs_error_t err;
        fs_guardian_t gd;
        fs_fork_opts_t opts;
        fs_fork_opts_init(&opts);
        opts.parent_death_signal = 0; /* only the guardian may save us here */
        /* The guardian runs before the rank is forked, as in a launcher. */
        if (default_guardian && fs_guardian_default_restart(NULL, &err) < 0)
            _exit(2);
        if (!default_guardian) {
            if (fs_guardian_start(&gd, &err) < 0)
                _exit(2);
            opts.guardian_fd = gd.write_fd;
        }
        fs_group_t *g = NULL;
        if (fs_group_new(1, &g, &err) < 0)
            _exit(3);
        int wfd = -1;
        pid_t rank = fs_group_fork(g, 0, &opts, &wfd, &err);
        if (rank == 0) {
            pid_t gc = fork();
            if (gc == 0) {
                pause();
                _exit(0);
            }
            int32_t ids[2] = {getpid(), gc};
            if (write(ids_pipe[1], ids, sizeof ids) != sizeof ids)
                _exit(4);
            pause();
            _exit(0);
        }
        int pidfd = fs_group_proc(g, 0)->pidfd;
        int rc = default_guardian ? fs_group_guard(g, 0, &err)
                                  : fs_guardian_watch(&gd, rank, pidfd, &err);
        /* Sent: the guardian reads it before it sees EOF, so the kill may come now. */
        if (rc < 0 || write(ready[1], "w", 1) != 1)
            _exit(5);
        pause();
        _exit(0);
    }
    int32_t ids[2];
    kill_launcher_when_ready(launcher, ids_pipe[0], ids, sizeof ids, ready[0]);
    FS_CHECK(wait_gone(ids[0], 5000));
    FS_CHECK(wait_gone(ids[1], 5000));
}

/*
 * The guardian's check: a launcher registers two ranks, each leading a group with a
 * worker, then reaps the first one (without unregistering it: as if the launcher had died
 * and init had reaped the zombie before the guardian acted) and is SIGKILLed. The first
 * rank's group id is no longer verifiably the job's, so the guardian must leave it alone
 * (its worker survives); the second rank is a zombie (reparented to this test process,
 * which does not reap it yet), so its group is still the job's and is killed.
 */
FS_TEST(guardian_skips_the_group_of_a_reaped_leader)
{
    become_subreaper(); /* the orphans come here: the rank zombie, workers, the guardian */
    int ids_pipe[2], ready[2];
    FS_CHECK(pipe(ids_pipe) == 0 && pipe(ready) == 0);
    pid_t launcher = fork();
    if (launcher == 0) {
        fs_error_t err;
        fs_guardian_t gd;
        if (fs_guardian_start(&gd, &err) < 0)
            _exit(2);
        int32_t ids[4];
        for (int r = 0; r < 2; r++) {
            int go[2];
            if (pipe(go) < 0)
                _exit(3);
            pid_t rank = fork();
            if (rank == 0) {
                (void)close(gd.write_fd);
                (void)setpgid(0, 0);
                child_start_worker(go[1]);
                _exit(0);
            }
            (void)setpgid(rank, rank);
            int pidfd = pidfd_of(rank);
            if (pidfd < 0 || fs_guardian_watch(&gd, rank, pidfd, &err) < 0)
                _exit(5);
            ids[2 * r] = rank;
            if (read(go[0], &ids[2 * r + 1], sizeof ids[0]) != sizeof ids[0])
                _exit(6);
            siginfo_t si;
            int flags = WEXITED | (r == 0 ? 0 : WNOWAIT); /* reap rank 0, not rank 1 */
            if (waitid(P_PID, (id_t)rank, &si, flags) < 0)
                _exit(7);
        }
        if (write(ids_pipe[1], ids, sizeof ids) != sizeof ids || write(ready[1], "w", 1) != 1)
            _exit(8);
        pause();
        _exit(0);
    }
    int32_t ids[4];
    kill_launcher_when_ready(launcher, ids_pipe[0], ids, sizeof ids, ready[0]);
    FS_CHECK(wait_gone(ids[3], 5000)); /* rank 1's worker: its group was still ours */
    FS_CHECK(alive(ids[1]));           /* rank 0's worker: left alone */
    FS_CHECK(kill(ids[1], SIGKILL) == 0);
    FS_CHECK(wait_gone(ids[1], 5000));
    reap_all();
}

FS_TEST(guardian_kills_groups_when_launcher_is_sigkilled)
{
    guardian_case(0);
}

FS_TEST(default_guardian_end_is_closed_in_children)
{
    guardian_case(1);
}

FS_TEST(default_guardian_lifecycle)
{
    fs_error_t err;
    FS_CHECK_EQ(fs_guardian_default_pid(), 0);
    FS_CHECK_OK(fs_guardian_default_unwatch(12345, &err), &err); /* none yet: no-op */
    pid_t gpid = 0, again = 0;
    FS_CHECK_OK(fs_guardian_default_watch(getpid(), -1, &gpid, &err), &err);
    FS_CHECK(gpid > 0 && fs_guardian_default_pid() == gpid);
    FS_CHECK_OK(fs_guardian_default_watch(getpid(), -1, &again, &err), &err);
    FS_CHECK_EQ(again, gpid); /* started once */
    FS_CHECK_OK(fs_guardian_default_unwatch(getpid(), &err), &err);
    int p[2];
    FS_CHECK(pipe(p) == 0);
    pid_t child = fork();
    if (child == 0) { /* a child has no guardian of its parent's */
        char ok = fs_guardian_default_pid() == 0 ? '1' : '0';
        _exit(write(p[1], &ok, 1) == 1 ? 0 : 1);
    }
    char ok = 0;
    FS_CHECK(read(p[0], &ok, 1) == 1 && ok == '1');
    FS_CHECK(waitpid(child, NULL, 0) == child);
    FS_CHECK_OK(fs_guardian_default_restart(&again, &err), &err);
    FS_CHECK(again > 0 && again != gpid);
    FS_CHECK(wait_gone(gpid, 5000)); /* the old one was stopped and reaped */
    FS_CHECK(waitpid(gpid, NULL, WNOHANG) < 0 && errno == ECHILD);
}

/* A rank whose child-side set-up fails exits 127 and the group names the step. */
static void check_setup_failure(fs_group_t *g, int step, const char *what)
{
    const fs_proc_t *p = fs_group_proc(g, 0);
    fs_error_t err;
    FS_CHECK_EQ(p->state, FS_PROC_EXITED);
    FS_CHECK_EQ(p->exit.exit_code, FS_CHILD_SETUP_EXIT);
    FS_CHECK_EQ(p->setup_step, step);
    FS_CHECK_EQ(p->setup_errno, EINVAL);
    FS_CHECK_EQ(p->report_len, 0); /* the record is not a report */
    FS_CHECK_EQ(fs_group_setup_error(g, 0, &err), FS_ESYS);
    FS_CHECK_EQ(err.sys_errno, EINVAL);
    FS_CHECK(strstr(err.msg, what) != NULL && strstr(err.msg, "rank 0") != NULL);
    FS_CHECK(strstr(err.msg, strerror(EINVAL)) != NULL);
}

FS_TEST(child_setup_failure_names_the_step)
{
    static const struct {
        const char *hook;
        int step;
        const char *what;
    } cases[] = {{"setpgid", FS_SETUP_SETPGID, "setpgid(0, 0)"},
                 {"pdeathsig", FS_SETUP_PDEATHSIG, "prctl(PR_SET_PDEATHSIG)"}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fs_error_t err;
        fs_group_t *g = NULL;
        /* fs_group_fork: the record goes to the rank's report pipe. */
        FS_CHECK_OK(fs_group_new(1, &g, &err), &err);
        setenv(FS_CHILD_SETUP_FAIL_ENV, cases[i].hook, 1);
        int wfd = -1;
        pid_t pid = fs_group_fork(g, 0, &OPTS, &wfd, &err);
        if (pid == 0)
            _exit(3); /* the set-up must not have returned */
        unsetenv(FS_CHILD_SETUP_FAIL_ENV);
        FS_CHECK(pid > 0);
        wait_all(g, &err);
        check_setup_failure(g, cases[i].step, cases[i].what);
        fs_group_free(g);

        /* fs_fork_rank (the zygote's path): to opts.report_fd, here a group's pipe. */
        FS_CHECK_OK(fs_group_new(1, &g, &err), &err);
        fs_fork_opts_t opts = OPTS;
        FS_CHECK_OK(fs_group_prepare_report(g, 0, &opts.report_fd, &err), &err);
        setenv(FS_CHILD_SETUP_FAIL_ENV, cases[i].hook, 1);
        pid = fs_fork_rank(&opts, &err);
        if (pid == 0)
            _exit(3);
        unsetenv(FS_CHILD_SETUP_FAIL_ENV);
        close(opts.report_fd);
        FS_CHECK_OK(fs_group_adopt(g, 0, pid, 1, &err), &err);
        wait_all(g, &err);
        check_setup_failure(g, cases[i].step, cases[i].what);
        fs_group_free(g);

        /* fs_child_setup reports it as an error instead. */
        setenv(FS_CHILD_SETUP_FAIL_ENV, cases[i].hook, 1);
        FS_CHECK_EQ(fs_child_setup(1, SIGKILL, getppid(), &err), FS_ESYS);
        unsetenv(FS_CHILD_SETUP_FAIL_ENV);
        FS_CHECK(strstr(err.msg, cases[i].what) != NULL);
    }
    /* Without the hook: no step failed, and a rank's own exit 127 is just an exit code. */
    fs_error_t err;
    fs_group_t *g = NULL;
    FS_CHECK_OK(fs_group_new(1, &g, &err), &err);
    int wfd = -1;
    if (fs_group_fork(g, 0, &OPTS, &wfd, &err) == 0)
        _exit(FS_CHILD_SETUP_EXIT);
    wait_all(g, &err);
    FS_CHECK_EQ(fs_group_proc(g, 0)->exit.exit_code, FS_CHILD_SETUP_EXIT);
    FS_CHECK_EQ(fs_group_proc(g, 0)->setup_step, FS_SETUP_NONE);
    FS_CHECK_OK(fs_group_setup_error(g, 0, &err), &err);
    fs_group_free(g);
}

FS_TEST(null_error_pointers_are_accepted)
{
    fs_group_t *g = NULL;
    FS_CHECK_EQ(fs_group_new(0, &g, NULL), FS_EINVAL);
    FS_CHECK_EQ(fs_group_new(1, &g, NULL), FS_OK);
    int wfd = -1;
    FS_CHECK_EQ(fs_group_fork(g, 7, &OPTS, &wfd, NULL), FS_EINVAL);
    FS_CHECK_EQ(fs_group_prepare_report(g, 0, &wfd, NULL), FS_OK);
    FS_CHECK_EQ(fs_group_prepare_report(g, 0, &wfd, NULL), FS_EINVAL);
    close(wfd);
    FS_CHECK_EQ(fs_group_wait(g, 0, NULL), 0);
    FS_CHECK_EQ(fs_group_setup_error(g, 3, NULL), FS_EINVAL);
    FS_CHECK_EQ(fs_group_terminate(g, SIGTERM, 0, NULL), FS_OK);
    fs_group_free(g);
}

FS_TEST(signal_names)
{
    FS_CHECK(strcmp(fs_signal_name(SIGKILL), "SIGKILL") == 0);
    FS_CHECK(strcmp(fs_signal_name(SIGABRT), "SIGABRT") == 0);
    FS_CHECK(fs_signal_name(0) == NULL);
    FS_CHECK(strcmp(fs_status_name(FS_ETIMEOUT), "FS_ETIMEOUT") == 0);
}

int main(void)
{
    return fs_test_main();
}
