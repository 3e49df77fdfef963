/*
 * allreduce_ranks.c - libfastspawn from a C program that never loads Python: the
 * launcher forks NRANKS supervised ranks (watched by the process's guardian) and starts a
 * rendezvous store; rank 0 creates a shared-memory communicator and publishes its handle
 * through the store, the others open it from there; every rank joins it, all-reduces a vector and
 * reports its checksum on its report pipe; the launcher waits for every rank and checks the
 * reports.
 *
 *   make ctest   (builds it against build/clib-dev/libfastspawn.a and runs it)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fastspawn.h"

#define NRANKS 3
#define COUNT 100000 /* floats per rank: large enough for the chunked algorithm */

static int fail(const char *what, const fs_error_t *err)
{
    fprintf(stderr, "allreduce_ranks: %s: %s\n", what, err->msg);
    return 1;
}

/* One rank: rendezvous through the store, all-reduce, report the sum. Returns the exit
   status. */
static int rank_main(int rank, int port, const char *token, int report_fd)
{
    fs_error_t err;
    fs_store_client_opts_t so = {.host = "127.0.0.1", .port = port, .token = token};
    fs_store_client_t *store = NULL;
    if (fs_store_connect(&so, &store, &err) != FS_OK)
        return fail("fs_store_connect", &err);
    fs_comm_t *comm = NULL;
    if (rank == 0) {
        int rc = fs_comm_create(NRANKS, NULL, &comm, &err);
        if (rc == FS_OK) {
            const char *handle = fs_comm_handle(comm);
            rc = fs_store_set(store, "comm/handle", handle, strlen(handle) + 1,
                              FS_STORE_DEFAULT_TIMEOUT, &err);
        }
        if (rc != FS_OK) {
            fs_comm_destroy(comm);
            return fail("creating the communicator", &err);
        }
    } else {
        void *v = NULL;
        size_t n = 0;
        if (fs_store_get(store, "comm/handle", &v, &n, FS_STORE_DEFAULT_TIMEOUT, &err) != FS_OK)
            return fail("fs_store_get", &err);
        int rc = n > 0 && ((const char *)v)[n - 1] == '\0'
                     ? fs_comm_open(v, rank, NRANKS, NULL, &comm, &err)
                     : fs_error_set(&err, FS_EPROTO, "the handle is not a string");
        free(v);
        if (rc != FS_OK)
            return fail("fs_comm_open", &err);
    }
    if (fs_comm_join(comm, &err) != FS_OK) {
        fs_comm_destroy(comm);
        return fail("fs_comm_join", &err);
    }
    float *x = malloc(COUNT * sizeof *x);
    if (x == NULL)
        return 1;
    for (int i = 0; i < COUNT; i++)
        x[i] = (float)(rank + 1) * (float)(i % 7); /* small integers: exact in float */
    int rc = fs_allreduce(comm, x, x, COUNT, FS_FLOAT32, FS_SUM, &err);
    double sum = 0;
    for (int i = 0; i < COUNT; i++)
        sum += x[i];
    free(x);
    fs_comm_destroy(comm);
    fs_store_close(store);
    if (rc != FS_OK)
        return fail("fs_allreduce", &err);
    char line[64];
    int len = snprintf(line, sizeof line, "%.0f", sum);
    return write(report_fd, line, (size_t)len) == len ? 0 : 1;
}

/*
 * Fork the ranks, watched by the process's guardian (fs_group_guard); each waits for the store's
 * port on `go` (written once the server runs). Forking before any other thread exists keeps the
 * example safe under ASan too, whose allocator (GCC 12) is not fork-safe while another
 * thread allocates (glibc's malloc is).
 */
static int start_ranks(fs_group_t *group, const char *token, int *go_w, fs_error_t *err)
{
    int go[2];
    if (pipe(go) < 0)
        return fs_error_sys(err, "pipe");
    fs_fork_opts_t fork_opts;
    fs_fork_opts_init(&fork_opts); /* own process group, SIGKILL when the launcher dies */
    int rc = FS_OK;
    for (int r = 0; r < NRANKS && rc == FS_OK; r++) {
        int report_fd = -1;
        pid_t pid = fs_group_fork(group, r, &fork_opts, &report_fd, err);
        if (pid == 0) {
            int port = 0;
            close(go[1]);
            if (read(go[0], &port, sizeof port) != sizeof port) /* one record per rank */
                _exit(1);
            _exit(rank_main(r, port, token, report_fd));
        }
        rc = pid < 0 ? (int)pid : fs_group_guard(group, r, err); /* fs_group_free unwatches */
    }
    close(go[0]);
    *go_w = go[1];
    return rc;
}

int main(void)
{
    fs_error_t err;
    char token[FS_STORE_TOKEN_LEN + 1];
    fs_store_server_t *server = NULL;
    fs_group_t *group = NULL;
    int bad = 1, go = -1;
    if (fs_store_make_token(token, sizeof token, &err) != FS_OK ||
        fs_group_new(NRANKS, &group, &err) != FS_OK ||
        start_ranks(group, token, &go, &err) != FS_OK) {
        fail("starting the ranks", &err);
        goto out;
    }
    fs_store_server_opts_t opts = {.token = token}; /* 127.0.0.1, a free port */
    if (fs_store_server_start(&opts, &server, &err) != FS_OK) {
        fail("fs_store_server_start", &err);
        goto out;
    }
    int port = fs_store_server_port(server);
    for (int r = 0; r < NRANKS; r++)
        if (write(go, &port, sizeof port) != sizeof port)
            goto out;
    while (fs_group_running(group) > 0) {
        int n = fs_group_wait(group, 30000, &err);
        if (n == 0 || (n < 0 && n != FS_EINTR)) {
            fprintf(stderr, "allreduce_ranks: ranks did not finish: %s\n",
                    n == 0 ? "timed out after 30 s" : err.msg);
            goto out; /* fs_group_free kills what runs */
        }
    }
    /* Every rank holds sum over ranks (r + 1) * (i % 7) for every i. */
    double want = 0;
    for (int i = 0; i < COUNT; i++)
        want += (double)(i % 7) * NRANKS * (NRANKS + 1) / 2.0;
    bad = 0;
    for (int r = 0; r < NRANKS; r++) {
        const fs_proc_t *p = fs_group_proc(group, r);
        char got[64] = "";
        snprintf(got, sizeof got, "%.*s", (int)p->report_len, (const char *)p->report);
        printf("rank %d (pid %d): exit %d, sum %s\n", r, (int)p->pid, p->exit.exit_code, got);
        bad += p->exit.exit_code != 0 || atof(got) != want;
        fs_guardian_default_unwatch(p->pid, NULL);
    }
    printf("%s: %d ranks, all_reduce of %d floats, expected sum %.0f\n", bad ? "FAILED" : "ok",
           NRANKS, COUNT, want);
out:
    if (go >= 0)
        close(go); /* a rank still waiting for its port gets EOF and exits */
    fs_group_free(group);
    fs_store_server_stop(server);
    return bad ? 1 : 0;
}
