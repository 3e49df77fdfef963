/* test_supervise.c - the supervisor and the guardian, from plain C. */
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
    .new_process_group = 1, .parent_death_signal = SIGKILL, .guardian_fd = -1};

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

FS_TEST(exit_codes_and_order)
{
    fs_error_t err;
    fs_group_t *g = NULL;
    FS_CHECK_OK(fs_group_new(3, &g, &err), &err);
    for (int i = 0; i < 3; i++) {
        int wfd = -1;
        pid_t pid = fs_group_fork(g, i, &OPTS, &wfd, &err);
        FS_CHECK(pid >= 0);
        if (pid == 0) {
            sleep_ms(50 * i);
            _exit(10 + i);
        }
    }
    wait_all(g, &err);
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
        sleep_ms(5000);
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

FS_TEST(guardian_kills_groups_when_launcher_is_sigkilled)
{
    int fds[2];
    FS_CHECK(pipe(fds) == 0);
    pid_t launcher = fork();
    if (launcher == 0) {
        fs_error_t err;
        fs_guardian_t gd;
        if (fs_guardian_start(&gd, &err) < 0)
            _exit(2);
        fs_group_t *g = NULL;
        if (fs_group_new(1, &g, &err) < 0)
            _exit(3);
        fs_fork_opts_t opts = OPTS;
        opts.parent_death_signal = 0; /* only the guardian may save us here */
        opts.guardian_fd = gd.write_fd;
        int wfd = -1;
        pid_t rank = fs_group_fork(g, 0, &opts, &wfd, &err);
        if (rank == 0) {
            pid_t gc = fork();
            if (gc == 0) {
                sleep_ms(60000);
                _exit(0);
            }
            int32_t ids[2] = {getpid(), gc};
            if (write(fds[1], ids, sizeof ids) != sizeof ids)
                _exit(4);
            sleep_ms(60000);
            _exit(0);
        }
        if (fs_guardian_watch(&gd, rank, &err) < 0)
            _exit(5);
        sleep_ms(60000);
        _exit(0);
    }
    int32_t ids[2];
    FS_CHECK(read(fds[0], ids, sizeof ids) == sizeof ids);
    sleep_ms(50); /* let the watch message reach the guardian */
    FS_CHECK(kill(launcher, SIGKILL) == 0);
    FS_CHECK(waitpid(launcher, NULL, 0) == launcher);
    FS_CHECK(wait_gone(ids[0], 5000));
    FS_CHECK(wait_gone(ids[1], 5000));
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
