/*
 * fs_test.h - a tiny test harness for fastspawn's C tests.
 *
 *   FS_TEST(name) { FS_CHECK(cond); FS_CHECK_EQ(a, b); }
 *   int main(void) { return fs_test_main(); }   (after the tests)
 *
 * Each test runs in a forked process with a time limit, so one crash or hang
 * fails that test only. The runner prints "N passed, N failed" last.
 */
#ifndef FS_TEST_H
#define FS_TEST_H

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

typedef void (*fs_test_fn)(void);
struct fs_test_case {
    const char *name;
    fs_test_fn fn;
};

#define FS_TEST_MAX 256
static struct fs_test_case fs_tests[FS_TEST_MAX];
static int fs_test_count;
static int fs_test_failed_checks;

#define FS_TEST(name)                                                                              \
    static void name(void);                                                                        \
    __attribute__((constructor)) static void name##_register(void)                                 \
    {                                                                                              \
        if (fs_test_count < FS_TEST_MAX)                                                           \
            fs_tests[fs_test_count++] = (struct fs_test_case){#name, name};                        \
    }                                                                                              \
    static void name(void)

#define FS_CHECK(cond)                                                                             \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "  %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);             \
            fs_test_failed_checks++;                                                               \
        }                                                                                          \
    } while (0)

#define FS_CHECK_EQ(a, b)                                                                          \
    do {                                                                                           \
        long long fs_a_ = (long long)(a), fs_b_ = (long long)(b);                                  \
        if (fs_a_ != fs_b_) {                                                                      \
            fprintf(stderr, "  %s:%d: check failed: %s == %s (%lld != %lld)\n", __FILE__,          \
                    __LINE__, #a, #b, fs_a_, fs_b_);                                               \
            fs_test_failed_checks++;                                                               \
        }                                                                                          \
    } while (0)

/* Fail unless the fs_* call returned FS_OK; prints the error message. */
#define FS_CHECK_OK(call, errp)                                                                    \
    do {                                                                                           \
        int fs_rc_ = (call);                                                                       \
        if (fs_rc_ != 0) {                                                                         \
            fprintf(stderr, "  %s:%d: %s returned %d: %s\n", __FILE__, __LINE__, #call, fs_rc_,    \
                    (errp)->msg);                                                                  \
            fs_test_failed_checks++;                                                               \
        }                                                                                          \
    } while (0)

static int fs_test_run_one(const struct fs_test_case *t, int limit_s)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 0;
    }
    if (pid == 0) {
        alarm((unsigned)limit_s);
        t->fn();
        fflush(NULL);
        _exit(fs_test_failed_checks == 0 ? 0 : 1);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        return 1;
    if (WIFSIGNALED(status))
        fprintf(stderr, "  %s: killed by signal %d%s\n", t->name, WTERMSIG(status),
                WTERMSIG(status) == SIGALRM ? " (time limit)" : "");
    return 0;
}

static int fs_test_main(void)
{
    const char *only = getenv("FS_TEST_ONLY");
    const char *limit_env = getenv("FS_TEST_TIMEOUT");
    int limit_s = limit_env ? atoi(limit_env) : 60;
    int passed = 0, failed = 0;
    for (int i = 0; i < fs_test_count; i++) {
        const struct fs_test_case *t = &fs_tests[i];
        if (only && strstr(t->name, only) == NULL)
            continue;
        int ok = fs_test_run_one(t, limit_s > 0 ? limit_s : 60);
        printf("%s %s\n", ok ? "PASS" : "FAIL", t->name);
        if (ok)
            passed++;
        else
            failed++;
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 && passed > 0 ? 0 : 1;
}

#endif /* FS_TEST_H */
