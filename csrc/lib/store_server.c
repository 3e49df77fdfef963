/*
 * store_server.c - the rendezvous store's server thread: start / stop and the epoll loop
 * over non-blocking sockets (TCP, optionally a Unix socket too). Connections are
 * store_conn.c's, requests store_handle.c's, the key table store_table.c's; see
 * store_server.h for the whole.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

#include "internal.h"
#include "store_server.h"

#define EVENT_BATCH 128

static void on_event(fs_store_server_t *s, const struct epoll_event *ev)
{
    struct fs__tag *t = ev->data.ptr;
    if (t->kind == FS__TAG_WAKE) {
        uint64_t v;
        if (read(s->wakefd, &v, sizeof v) < 0) {
            /* EAGAIN: already drained. The stop flag is what matters; the loop checks it. */
        }
        return;
    }
    if (t->kind == FS__TAG_LISTEN) {
        fs__conn_accept(s, (struct fs__listener *)t);
        return;
    }
    struct fs__conn *c = (struct fs__conn *)t;
    if (c->dead)
        return;
    if (ev->events & EPOLLERR) {
        fs__conn_kill(s, c);
        return;
    }
    if (ev->events & EPOLLOUT)
        fs__conn_flush(s, c);
    if (!c->dead && (ev->events & (EPOLLIN | EPOLLHUP))) {
        if (c->paused || c->closing)
            fs__conn_kill(s, c); /* hung up while we were not reading */
        else
            fs__conn_read(s, c);
    }
}

static void *server_main(void *arg)
{
    fs_store_server_t *s = arg;
    struct epoll_event evs[EVENT_BATCH];
    int64_t busy_until = 0;
    while (!atomic_load(&s->stop)) {
        /* Sleep until the next hello deadline or the end of an accept pause; but right
         * after a request, poll without sleeping for FS__STORE_SPIN_US: a rendezvous is
         * a burst of requests (see store_proto.h). */
        int timeout = fs__poll_timeout(fs__conn_next_deadline(s));
        if (busy_until != 0 && fs__now_us() < busy_until)
            timeout = 0;
        int n = epoll_wait(s->ep, evs, EVENT_BATCH, timeout);
        if (n > 0)
            busy_until = fs__now_us() + FS__STORE_SPIN_US;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fs_error_sys(&s->thread_err, "store server: epoll_wait");
            atomic_store(&s->failed, 1);
            break;
        }
        for (int i = 0; i < n; i++) {
            on_event(s, &evs[i]);
            fs__conn_run_dirty(s);
        }
        fs__conn_expire_unauth(s);
        fs__conn_accept_resume(s);
        fs__conn_free_dead(s);
    }
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Start / stop                                                       */
/* ------------------------------------------------------------------ */

static void server_free(fs_store_server_t *s)
{
    fs__store_fork_unregister(s);
    struct fs__conn *c = s->conns;
    while (c) {
        struct fs__conn *next = c->next;
        fs__conn_drop_waiters(&s->table, c);
        (void)fs__close(c->fd);
        fs__conn_free(c);
        c = next;
    }
    s->conns = NULL;
    fs__conn_free_dead(s);
    fs__table_free(&s->table);
    for (int i = 0; i < s->nlis; i++)
        (void)fs__close(s->lis[i].fd);
    if (s->unix_path[0] != '\0' && s->unix_path[0] != '@')
        (void)unlink(s->unix_path); /* ENOENT: someone removed it already */
    (void)fs__close(s->ep);
    (void)fs__close(s->wakefd);
    (void)fs__close(s->reserve_fd);
    free(s->args);
    free(s);
}

static void add_listener(fs_store_server_t *s, int fd, int family)
{
    struct fs__listener *l = &s->lis[s->nlis++];
    l->tag.kind = FS__TAG_LISTEN;
    l->fd = fd;
    l->family = family;
}

/* The listening sockets: TCP, and the Unix socket when asked ("@": a name made here). */
static int server_listen(fs_store_server_t *s, const fs_store_server_opts_t *opts, fs_error_t *err)
{
    int fd = -1, rc;
    if ((rc = fs__listen_tcp("store server", opts->host, opts->port, &fd, &s->addr, s->host,
                             sizeof s->host, &s->port, err)) < 0)
        return rc;
    add_listener(s, fd, s->addr.ss_family);
    if (opts->unix_path == NULL)
        return FS_OK;
    char made[64];
    const char *name = opts->unix_path;
    if (strcmp(name, "@") == 0) {
        uint32_t r = 0;
        if (fs__getrandom(&r, sizeof r) < 0)
            return fs_error_sys(err, "store server: getrandom");
        snprintf(made, sizeof made, "@fastspawn-store-%d-%08x", (int)getpid(), r);
        name = made;
    }
    if ((rc = fs__listen_unix("store server", name, &fd, err)) < 0)
        return rc;
    /* fs__listen_unix checked that the name fits. */
    snprintf(s->unix_path, sizeof s->unix_path, "%s", name);
    add_listener(s, fd, AF_UNIX);
    return FS_OK;
}

/* The epoll set: listeners and the wake-up eventfd. */
static int server_watch(fs_store_server_t *s, fs_error_t *err)
{
    if ((s->ep = epoll_create1(EPOLL_CLOEXEC)) < 0)
        return fs_error_sys(err, "store server: epoll_create1");
    if ((s->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0)
        return fs_error_sys(err, "store server: eventfd");
    /* Held in reserve for when descriptors run out (store_conn.c, shed_one). */
    if ((s->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0)
        return fs_error_sys(err, "store server: open /dev/null");
    for (int i = 0; i < s->nlis; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &s->lis[i].tag};
        if (epoll_ctl(s->ep, EPOLL_CTL_ADD, s->lis[i].fd, &ev) < 0)
            return fs_error_sys(err, "store server: epoll_ctl(listen)");
    }
    struct epoll_event wev = {.events = EPOLLIN, .data.ptr = &s->wake_tag};
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, s->wakefd, &wev) < 0)
        return fs_error_sys(err, "store server: epoll_ctl(eventfd)");
    return FS_OK;
}

static int check_opts(const fs_store_server_opts_t *opts, fs_error_t *err)
{
    if (opts == NULL || opts->token == NULL || opts->token[0] == '\0')
        return fs_error_set(err, FS_EINVAL,
                            "store server needs a non-empty token "
                            "(fs_store_make_token makes one)");
    size_t tlen = strlen(opts->token);
    if (tlen > FS_STORE_MAX_TOKEN)
        return fs_error_set(err, FS_EINVAL, "store token of %zu bytes exceeds %u", tlen,
                            FS_STORE_MAX_TOKEN);
    if (opts->port < 0 || opts->port > 65535)
        return fs_error_set(err, FS_EINVAL, "store server port %d is outside 0..65535", opts->port);
    if (opts->max_value_size > (size_t)UINT32_MAX - FS__STORE_FRAME_SLACK)
        return fs_error_set(err, FS_EINVAL, "store max_value_size %zu exceeds %zu",
                            opts->max_value_size, (size_t)UINT32_MAX - FS__STORE_FRAME_SLACK);
    if (opts->auth_timeout_ms < 0 || opts->max_unauth < 0 || opts->max_clients < 0)
        return fs_error_set(err, FS_EINVAL,
                            "store server: auth_timeout_ms, max_unauth and max_clients must be "
                            ">= 0 (0: the default), got %d, %d, %d",
                            opts->auth_timeout_ms, opts->max_unauth, opts->max_clients);
    return FS_OK;
}

/* max_clients 0: half of the descriptors the process may open, so that store clients
   alone never take the launcher's last ones (redis sizes its maxclients by the limit). */
static size_t default_max_clients(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur == RLIM_INFINITY ||
        rl.rlim_cur / 2 > FS_STORE_DEFAULT_MAX_CLIENTS)
        return FS_STORE_DEFAULT_MAX_CLIENTS;
    return rl.rlim_cur / 2 > 0 ? (size_t)(rl.rlim_cur / 2) : 1;
}

/* The options, defaults filled in (check_opts accepted them). */
static void apply_opts(fs_store_server_t *s, const fs_store_server_opts_t *opts)
{
    s->token_len = strlen(opts->token);
    memcpy(s->token, opts->token, s->token_len);
    s->max_value = opts->max_value_size ? opts->max_value_size : FS_STORE_DEFAULT_MAX_VALUE;
    s->max_frame = fs__store_max_frame(s->max_value);
    s->auth_timeout_ms =
        opts->auth_timeout_ms > 0 ? opts->auth_timeout_ms : FS_STORE_DEFAULT_AUTH_TIMEOUT_MS;
    s->max_unauth = (size_t)(opts->max_unauth > 0 ? opts->max_unauth : FS_STORE_DEFAULT_MAX_UNAUTH);
    s->max_clients = opts->max_clients > 0 ? (size_t)opts->max_clients : default_max_clients();
}

int fs_store_server_start(const fs_store_server_opts_t *opts, fs_store_server_t **out,
                          fs_error_t *err)
{
    *out = NULL;
    int rc = check_opts(opts, err);
    if (rc < 0)
        return rc;
    fs_store_server_t *s = calloc(1, sizeof *s);
    if (s == NULL)
        return fs_error_set(err, FS_ENOMEM, "store server: out of memory");
    s->ep = s->wakefd = s->reserve_fd = -1;
    s->registry_slot = -1;
    s->owner = getpid();
    apply_opts(s, opts);
    s->wake_tag.kind = FS__TAG_WAKE;
    atomic_init(&s->stop, 0);
    atomic_init(&s->failed, 0);
    atomic_init(&s->counts.nclients, 0);
    atomic_init(&s->counts.nunauth, 0);
    atomic_init(&s->counts.out_bytes, 0);
    atomic_init(&s->counts.evicted, 0);
    atomic_init(&s->counts.shed, 0);
    atomic_init(&s->counts.refused, 0);
    s->args = malloc(FS__STORE_MAX_ARGS * sizeof *s->args);
    if (s->args == NULL) {
        rc = fs_error_set(err, FS_ENOMEM, "store server: out of memory");
        goto fail;
    }
    if ((rc = fs__table_init(&s->table, err)) < 0 || (rc = server_listen(s, opts, err)) < 0 ||
        (rc = server_watch(s, err)) < 0 || (rc = fs__store_fork_register(s, err)) < 0)
        goto fail;
    /* The thread takes no signals: they belong to the application's threads. */
    int trc = fs__thread_start(&s->thread, server_main, s);
    if (trc != 0) {
        errno = trc;
        rc = fs_error_sys(err, "store server: starting the server thread");
        goto fail;
    }
    s->thread_started = 1;
    *out = s;
    return FS_OK;
fail:
    server_free(s);
    return rc;
}

void fs_store_server_stop(fs_store_server_t *s)
{
    if (s == NULL)
        return;
    if (getpid() != s->owner)
        return; /* a forked child: the thread lives in the parent; its fds were closed at fork */
    if (s->thread_started) {
        atomic_store(&s->stop, 1);
        uint64_t one = 1;
        ssize_t w;
        do {
            w = write(s->wakefd, &one, sizeof one);
        } while (w < 0 && errno == EINTR);
        /* EAGAIN: the counter is already non-zero, the thread will wake anyway. */
        int rc = pthread_join(s->thread, NULL);
        if (rc != 0) {
            /* Only EDEADLK (stop called from the server thread) is possible: leak, do not free
             * what the thread is still using. */
            return;
        }
        s->thread_started = 0;
    }
    server_free(s);
}

const char *fs_store_server_host(const fs_store_server_t *s)
{
    return s->host;
}

int fs_store_server_port(const fs_store_server_t *s)
{
    return s->port;
}

const char *fs_store_server_unix_path(const fs_store_server_t *s)
{
    return s->unix_path[0] ? s->unix_path : NULL;
}

size_t fs_store_server_num_clients(const fs_store_server_t *s)
{
    return atomic_load(&((fs_store_server_t *)s)->counts.nclients);
}

void fs_store_server_stats(const fs_store_server_t *s, fs_store_server_stats_t *out)
{
    /* The counters are atomics (C11 loads need a non-const object). */
    struct fs__store_counts *k = &((fs_store_server_t *)s)->counts;
    size_t all = atomic_load(&k->nclients), unauth = atomic_load(&k->nunauth);
    out->clients = all >= unauth ? all - unauth : 0; /* two loads, not one snapshot */
    out->unauth = unauth;
    out->parked = atomic_load(&((fs_store_server_t *)s)->table.nwaiters);
    out->out_bytes = atomic_load(&k->out_bytes);
    out->evicted = atomic_load(&k->evicted);
    out->shed = atomic_load(&k->shed);
    out->refused = atomic_load(&k->refused);
}

int fs_store_server_check(const fs_store_server_t *s, fs_error_t *err)
{
    if (atomic_load(&((fs_store_server_t *)s)->failed)) {
        if (err != NULL)
            *err = s->thread_err;
        return s->thread_err.code ? s->thread_err.code : FS_ESYS;
    }
    return FS_OK;
}

int fs_store_make_token(char *out, size_t cap, fs_error_t *err)
{
    uint8_t raw[FS_STORE_TOKEN_LEN / 2];
    if (cap < FS_STORE_TOKEN_LEN + 1)
        return fs_error_set(err, FS_EINVAL, "fs_store_make_token needs %d bytes of room, got %zu",
                            FS_STORE_TOKEN_LEN + 1, cap);
    if (fs__getrandom(raw, sizeof raw) < 0)
        return fs_error_sys(err, "fs_store_make_token: getrandom");
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < sizeof raw; i++) {
        out[2 * i] = hex[raw[i] >> 4];
        out[2 * i + 1] = hex[raw[i] & 15];
    }
    out[FS_STORE_TOKEN_LEN] = '\0';
    return FS_OK;
}
