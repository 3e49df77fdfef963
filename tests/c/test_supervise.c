/*
 * test_supervise.c - the supervisor (supervise.c), the child side of fork (child.c) and
 * the guardian (guardian.c), from plain C. Tests order events with pipes, not sleeps.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
        int64_t deadline = fs_now_ms() + 10000;
        while (fs_group_proc(g, i)->state != FS_PROC_EXITED && fs_now_ms() < deadline)
            FS_CHECK(fs_group_wait(g, 1000, &err) >= 0);
    }
    for (int i = 0; i < 3; i++) {
        const fs_proc_t *p = fs_group_proc(g, i);
        FS_CHECK_EQ(p->state, FS_PROC_EXITED);
        FS_CHECK_EQ(p->exit.exit_code, 10 + i);
        FS_CHECK_EQ(p->exit.term_signal, 0);
        FS_CHECK_EQ(p->exit_order, i + 1);
        FS_CHECK(waitpid(p->pid, NULL, WNOHANG) < 0 && errno == ECHILD); /* reaped */
    }
    fs_group_free(g);
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
        int rc = default_guardian ? fs_guardian_default_watch(rank, NULL, &err)
                                  : fs_guardian_watch(&gd, rank, &err);
        /* Sent: the guardian reads it before it sees EOF, so the kill may come now. */
        if (rc < 0 || write(ready[1], "w", 1) != 1)
            _exit(5);
        pause();
        _exit(0);
    }
    int32_t ids[2];
    char w;
    FS_CHECK(read(ids_pipe[0], ids, sizeof ids) == sizeof ids);
    FS_CHECK(read(ready[0], &w, 1) == 1);
    FS_CHECK(kill(launcher, SIGKILL) == 0);
    FS_CHECK(waitpid(launcher, NULL, 0) == launcher);
    FS_CHECK(wait_gone(ids[0], 5000));
    FS_CHECK(wait_gone(ids[1], 5000));
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
    FS_CHECK_OK(fs_guardian_default_watch(getpid(), &gpid, &err), &err);
    FS_CHECK(gpid > 0 && fs_guardian_default_pid() == gpid);
    FS_CHECK_OK(fs_guardian_default_watch(getpid(), &again, &err), &err);
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
