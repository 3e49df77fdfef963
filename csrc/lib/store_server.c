/*
 * store_server.c - the rendezvous store's server: one pthread running an epoll
 * loop over non-blocking sockets (TCP, optionally a Unix socket too).
 *
 * All state (the key table, connections, parked requests) belongs to that
 * thread; the only cross-thread traffic is the stop flag + eventfd and a few
 * atomic counters. A blocking request (get / wait / multi_get) whose keys are
 * missing is parked as a `struct waiter` on the first missing key and answered
 * when that key is written; the client enforces the deadline and sends CANCEL.
 *
 * A request is handled only once its whole frame is in, in one go on this one
 * thread, so a client that disconnects mid-request leaves nothing half done.
 * A malformed frame, a wrong token or an I/O error closes that connection only.
 * Replies are queued and flushed after each request (never written while a
 * list is being walked), so closing a connection never frees what a loop holds.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "store_proto.h"

#define WBUF_HIGH ((size_t)8 << 20) /* stop reading a client whose replies pile up */
#define READ_CHUNK ((size_t)64 << 10)
#define BUF_KEEP ((size_t)2 << 20) /* free idle per-connection buffers larger than this */
#define MAX_SERVERS 16
#define SPIN_US 50 /* keep polling this long after a request before sleeping */

enum tag_kind { TAG_LISTEN, TAG_WAKE, TAG_CONN };

struct tag {
    int kind;
};

struct waiter;

struct entry {
    struct entry *next; /* hash chain */
    uint64_t hash;
    int has_value;
    uint8_t *val;
    size_t vlen;
    struct waiter *wfirst, *wlast; /* requests parked on this key */
    uint32_t klen;
    uint8_t key[];
};

struct conn;

struct waiter {
    struct waiter *kprev, *knext; /* on entry `on` */
    struct entry *on;
    struct waiter *cprev, *cnext; /* on its connection */
    struct conn *conn;
    uint32_t id;
    int op;
    uint32_t nkeys;
    fs_store_arg_t keys[]; /* key bytes follow the array */
};

struct conn {
    struct tag tag;
    int fd;
    int authed;
    int closing;      /* close once `out` is flushed (after an auth failure) */
    int dead;         /* closed; freed at the end of the event batch */
    int paused;       /* not reading: too many unsent replies */
    int kill_pending; /* close at the next flush (out of memory) */
    int resume;       /* unpaused: handle the frames that waited in `in` */
    int in_dirty;
    uint32_t events; /* epoll mask now registered */
    int64_t accepted_ms;
    fs_store_buf_t in, out;
    size_t in_off, out_off;
    struct waiter *wfirst, *wlast;
    struct conn *prev, *next; /* all live connections */
    struct conn *dirty_next, *dead_next;
};

struct listener {
    struct tag tag;
    int fd;
    int family;
};

struct fs_store_server {
    pthread_t thread;
    int thread_started;
    pid_t owner;
    int ep, wakefd, reserve_fd;
    struct listener lis[2];
    int nlis;
    struct tag wake_tag;
    atomic_int stop;
    atomic_int failed;
    atomic_size_t nclients;
    fs_error_t thread_err;
    uint8_t token[FS_STORE_MAX_TOKEN];
    size_t token_len;
    size_t max_value, max_frame;
    int auth_timeout_ms;
    char host[64];
    int port;
    int family;
    struct sockaddr_storage addr;                                    /* the bound TCP address */
    char unix_path[sizeof(((struct sockaddr_un *)0)->sun_path) + 1]; /* "@name" or a path */
    int registry_slot;
    /* key table */
    struct entry **buckets;
    size_t nbuckets, nentries, nkeys;
    uint64_t seed;
    /* connections */
    struct conn *conns;
    size_t nunauth;
    struct conn *dirty, *dead;
    fs_store_arg_t *args; /* parse scratch, FS_STORE_MAX_ARGS */
};

/* ------------------------------------------------------------------ */
/* Fork safety: a forked child must not keep the server's sockets open   */
/* (a dead launcher's port would stay bound; a dead rank's connection    */
/* would stay open). The child handler closes them, async-signal-safely. */
/* ------------------------------------------------------------------ */

struct reg_slot {
    atomic_int used;
    int fds[4];                   /* listeners, wakefd, epoll fd; -1 unused */
    struct sockaddr_storage addr; /* bound TCP address: port, and the IP unless a wildcard */
    char unix_path[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];
};

static struct reg_slot registry[MAX_SERVERS];
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static int atfork_rc;

struct linux_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

static int sock_is_server_side(int fd, const struct reg_slot *r)
{
    struct sockaddr_storage ss = {0};
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0)
        return 0;
    if (ss.ss_family == AF_INET && r->addr.ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)&ss;
        const struct sockaddr_in *b = (const struct sockaddr_in *)&r->addr;
        return a->sin_port == b->sin_port && (b->sin_addr.s_addr == htonl(INADDR_ANY) ||
                                              a->sin_addr.s_addr == b->sin_addr.s_addr);
    }
    if (ss.ss_family == AF_INET6 && r->addr.ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&ss;
        const struct sockaddr_in6 *b = (const struct sockaddr_in6 *)&r->addr;
        return a->sin6_port == b->sin6_port &&
               (IN6_IS_ADDR_UNSPECIFIED(&b->sin6_addr) ||
                memcmp(&a->sin6_addr, &b->sin6_addr, sizeof a->sin6_addr) == 0);
    }
    if (ss.ss_family == AF_UNIX && r->unix_path[0] != '\0') {
        const struct sockaddr_un *un = (const struct sockaddr_un *)&ss;
        size_t plen = sl > offsetof(struct sockaddr_un, sun_path)
                          ? sl - offsetof(struct sockaddr_un, sun_path)
                          : 0;
        size_t want = strlen(r->unix_path);
        if (r->unix_path[0] == '@') /* abstract: sun_path[0] == '\0', no terminator */
            return plen == want && un->sun_path[0] == '\0' &&
                   memcmp(un->sun_path + 1, r->unix_path + 1, want - 1) == 0;
        return plen >= want && memcmp(un->sun_path, r->unix_path, want) == 0 &&
               (plen == want || un->sun_path[want] == '\0');
    }
    return 0;
}

static void atfork_child(void)
{
    int any = 0;
    for (int i = 0; i < MAX_SERVERS; i++) {
        if (!atomic_load(&registry[i].used))
            continue;
        any = 1;
        for (int j = 0; j < 4; j++)
            if (registry[i].fds[j] >= 0)
                (void)close(registry[i].fds[j]); /* best effort; nothing to report to */
    }
    if (!any)
        return;
    int dfd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return;
    char buf[4096];
    for (;;) {
        long n = syscall(SYS_getdents64, dfd, buf, sizeof buf);
        if (n <= 0)
            break;
        for (long off = 0; off < n;) {
            struct linux_dirent64 *d = (struct linux_dirent64 *)(buf + off);
            off += d->d_reclen;
            int fd = 0;
            const char *s = d->d_name;
            if (*s < '0' || *s > '9')
                continue;
            for (; *s >= '0' && *s <= '9'; s++)
                fd = fd * 10 + (*s - '0');
            if (fd == dfd)
                continue;
            for (int i = 0; i < MAX_SERVERS; i++) {
                if (atomic_load(&registry[i].used) && sock_is_server_side(fd, &registry[i])) {
                    (void)close(fd);
                    break;
                }
            }
        }
    }
    (void)close(dfd);
}

static void atfork_init(void)
{
    atfork_rc = pthread_atfork(NULL, NULL, atfork_child);
}

static int registry_add(fs_store_server_t *s, fs_error_t *err)
{
    int rc = pthread_once(&atfork_once, atfork_init);
    if (rc != 0 || atfork_rc != 0) {
        errno = rc != 0 ? rc : atfork_rc;
        return fs_error_sys(err, "store server: pthread_atfork");
    }
    for (int i = 0; i < MAX_SERVERS; i++) {
        int expected = 0;
        struct reg_slot *r = &registry[i];
        /* Claim with 2 (being filled: the child handler skips it), then publish 1. */
        if (!atomic_compare_exchange_strong(&r->used, &expected, 2))
            continue;
        int k = 0;
        for (int j = 0; j < s->nlis; j++)
            r->fds[k++] = s->lis[j].fd;
        r->fds[k++] = s->wakefd;
        r->fds[k++] = s->ep;
        while (k < 4)
            r->fds[k++] = -1;
        memcpy(&r->addr, &s->addr, sizeof r->addr);
        memcpy(r->unix_path, s->unix_path, sizeof r->unix_path);
        s->registry_slot = i;
        atomic_store(&r->used, 1);
        return FS_OK;
    }
    s->registry_slot = -1; /* more than MAX_SERVERS: still works, just not fork-scrubbed */
    return FS_OK;
}

static void registry_remove(fs_store_server_t *s)
{
    if (s->registry_slot >= 0)
        atomic_store(&registry[s->registry_slot].used, 0);
    s->registry_slot = -1;
}

/* ------------------------------------------------------------------ */
/* Small helpers                                                      */
/* ------------------------------------------------------------------ */

/* Closing a socket we are done with: an error leaves nothing to act on. */
static void close_quietly(int fd)
{
    if (fd >= 0 && close(fd) < 0 && errno != EINTR) {
        /* EBADF here would be a bug elsewhere; there is no caller to tell. */
    }
}

static int64_t now_us(void)
{
    struct timespec ts;
    (void)clock_gettime(CLOCK_MONOTONIC, &ts); /* cannot fail with this clock */
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static uint64_t hash_key(uint64_t seed, const uint8_t *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL ^ seed;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h ^ (h >> 29);
}

/* ------------------------------------------------------------------ */
/* Key table                                                          */
/* ------------------------------------------------------------------ */

static struct entry *table_find(fs_store_server_t *s, const uint8_t *k, size_t n)
{
    uint64_t h = hash_key(s->seed, k, n);
    for (struct entry *e = s->buckets[h & (s->nbuckets - 1)]; e; e = e->next)
        if (e->hash == h && e->klen == n && memcmp(e->key, k, n) == 0)
            return e;
    return NULL;
}

static void table_grow(fs_store_server_t *s)
{
    size_t nb = s->nbuckets * 2;
    struct entry **b = calloc(nb, sizeof(struct entry *));
    if (b == NULL)
        return; /* keep the smaller table: slower, still correct */
    for (size_t i = 0; i < s->nbuckets; i++) {
        struct entry *e = s->buckets[i];
        while (e) {
            struct entry *next = e->next;
            e->next = b[e->hash & (nb - 1)];
            b[e->hash & (nb - 1)] = e;
            e = next;
        }
    }
    free(s->buckets);
    s->buckets = b;
    s->nbuckets = nb;
}

static struct entry *table_get_or_add(fs_store_server_t *s, const uint8_t *k, size_t n)
{
    struct entry *e = table_find(s, k, n);
    if (e != NULL)
        return e;
    e = calloc(1, sizeof *e + n);
    if (e == NULL)
        return NULL;
    e->hash = hash_key(s->seed, k, n);
    e->klen = (uint32_t)n;
    if (n > 0)
        memcpy(e->key, k, n);
    if (s->nentries >= s->nbuckets)
        table_grow(s);
    size_t b = e->hash & (s->nbuckets - 1);
    e->next = s->buckets[b];
    s->buckets[b] = e;
    s->nentries++;
    return e;
}

/* Free e if it holds neither a value nor parked requests. */
static void table_maybe_drop(fs_store_server_t *s, struct entry *e)
{
    if (e->has_value || e->wfirst != NULL)
        return;
    struct entry **pp = &s->buckets[e->hash & (s->nbuckets - 1)];
    while (*pp != e)
        pp = &(*pp)->next;
    *pp = e->next;
    s->nentries--;
    free(e);
}

/* Replace e's value with a copy of v (takes ownership of `owned` if given). */
static int entry_set(fs_store_server_t *s, struct entry *e, const void *v, size_t n)
{
    uint8_t *copy = NULL;
    if (n > 0) {
        copy = malloc(n);
        if (copy == NULL)
            return FS_ENOMEM;
        memcpy(copy, v, n);
    }
    free(e->val);
    e->val = copy;
    e->vlen = n;
    if (!e->has_value)
        s->nkeys++;
    e->has_value = 1;
    return FS_OK;
}

/* ------------------------------------------------------------------ */
/* Connections: queues, flushing, closing                             */
/* ------------------------------------------------------------------ */

static void mark_dirty(fs_store_server_t *s, struct conn *c)
{
    if (c->in_dirty || c->dead)
        return;
    c->in_dirty = 1;
    c->dirty_next = s->dirty;
    s->dirty = c;
}

/* Queue a failure to close c at the next flush (safe inside any loop). */
static void conn_fail(fs_store_server_t *s, struct conn *c)
{
    c->kill_pending = 1;
    mark_dirty(s, c);
}

static void waiter_unlink_key(fs_store_server_t *s, struct waiter *w)
{
    struct entry *e = w->on;
    if (e == NULL)
        return;
    if (w->kprev)
        w->kprev->knext = w->knext;
    else
        e->wfirst = w->knext;
    if (w->knext)
        w->knext->kprev = w->kprev;
    else
        e->wlast = w->kprev;
    w->on = NULL;
    w->kprev = w->knext = NULL;
    table_maybe_drop(s, e);
}

static void waiter_free(fs_store_server_t *s, struct waiter *w)
{
    waiter_unlink_key(s, w);
    struct conn *c = w->conn;
    if (w->cprev)
        w->cprev->cnext = w->cnext;
    else
        c->wfirst = w->cnext;
    if (w->cnext)
        w->cnext->cprev = w->cprev;
    else
        c->wlast = w->cprev;
    free(w);
}

/* Free every request c has parked (it is closing). */
static void conn_drop_waiters(fs_store_server_t *s, struct conn *c)
{
    struct waiter *w = c->wfirst;
    c->wfirst = c->wlast = NULL;
    while (w) {
        struct waiter *next = w->cnext;
        waiter_unlink_key(s, w);
        free(w);
        w = next;
    }
}

static void conn_kill(fs_store_server_t *s, struct conn *c)
{
    if (c->dead)
        return;
    c->dead = 1;
    /* Remove from epoll explicitly: a forked child may still hold a dup of fd, and
     * epoll tracks the open file, not the descriptor. */
    if (epoll_ctl(s->ep, EPOLL_CTL_DEL, c->fd, NULL) < 0 && errno != ENOENT) {
        /* Nothing else to do: the fd is closed next and the conn marked dead. */
    }
    close_quietly(c->fd);
    c->fd = -1;
    conn_drop_waiters(s, c);
    if (!c->authed)
        s->nunauth--;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    atomic_fetch_sub(&s->nclients, 1);
    c->dead_next = s->dead;
    s->dead = c;
}

static void conn_free(struct conn *c)
{
    fs_store_buf_free(&c->in);
    fs_store_buf_free(&c->out);
    free(c);
}

static void conn_update_events(fs_store_server_t *s, struct conn *c)
{
    uint32_t want = 0;
    if (!c->paused && !c->closing)
        want |= EPOLLIN;
    if (c->out_off < c->out.len)
        want |= EPOLLOUT;
    if (want == c->events)
        return;
    struct epoll_event ev = {.events = want, .data.ptr = c};
    if (epoll_ctl(s->ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
        conn_kill(s, c);
        return;
    }
    c->events = want;
}

static void conn_flush(fs_store_server_t *s, struct conn *c)
{
    while (c->out_off < c->out.len) {
        ssize_t r = send(c->fd, c->out.p + c->out_off, c->out.len - c->out_off, MSG_NOSIGNAL);
        if (r > 0) {
            c->out_off += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        conn_kill(s, c); /* EPIPE, ECONNRESET, ... */
        return;
    }
    if (c->out_off == c->out.len) {
        c->out_off = c->out.len = 0;
        if (c->out.cap > BUF_KEEP)
            fs_store_buf_free(&c->out);
        if (c->closing) {
            conn_kill(s, c);
            return;
        }
    }
    if (c->paused && c->out.len - c->out_off <= WBUF_HIGH / 2) {
        c->paused = 0;
        c->resume = 1;
        mark_dirty(s, c);
    }
    conn_update_events(s, c);
}

/* ------------------------------------------------------------------ */
/* Replies                                                            */
/* ------------------------------------------------------------------ */

/* Build a reply on c->out. On failure the connection is queued to close. */
struct reply {
    struct conn *c;
    size_t start;
    int ok;
};

static struct reply reply_begin(fs_store_server_t *s, struct conn *c, uint32_t id, int code)
{
    struct reply r = {c, 0, 1};
    fs_error_t e;
    if (fs_store_frame_begin(&c->out, id, code, &r.start, &e) < 0) {
        r.ok = 0;
        conn_fail(s, c);
    }
    return r;
}

static void reply_arg(fs_store_server_t *s, struct reply *r, const void *p, size_t n)
{
    fs_error_t e;
    if (r->ok && fs_store_frame_arg(&r->c->out, r->start, p, n, &e) < 0) {
        r->ok = 0;
        conn_fail(s, r->c);
    }
}

static void reply_i64(fs_store_server_t *s, struct reply *r, int64_t v)
{
    uint8_t b[8];
    fs_store_put_u64(b, (uint64_t)v);
    reply_arg(s, r, b, 8);
}

static void reply_end(fs_store_server_t *s, struct reply *r)
{
    if (r->ok)
        fs_store_frame_end(&r->c->out, r->start);
    mark_dirty(s, r->c);
}

static void reply_ok(fs_store_server_t *s, struct conn *c, uint32_t id)
{
    struct reply r = reply_begin(s, c, id, FS_OK);
    reply_end(s, &r);
}

static void reply_err(fs_store_server_t *s, struct conn *c, uint32_t id, int code, const char *fmt,
                      ...) __attribute__((format(printf, 5, 6)));

static void reply_err(fs_store_server_t *s, struct conn *c, uint32_t id, int code, const char *fmt,
                      ...)
{
    char msg[FS_ERRMSG_LEN];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof msg)
        n = (int)sizeof msg - 1;
    struct reply r = reply_begin(s, c, id, code);
    reply_arg(s, &r, msg, (size_t)n);
    reply_end(s, &r);
}

/*
 * Answer a get / wait / multi_get if every key has a value: returns 1 when
 * answered, or 0 with *missing set to the first key that has none.
 */
static int try_answer(fs_store_server_t *s, struct conn *c, uint32_t id, int op,
                      const fs_store_arg_t *keys, uint32_t n, uint32_t *missing)
{
    size_t total = FS_STORE_HDR;
    for (uint32_t i = 0; i < n; i++) {
        struct entry *e = table_find(s, keys[i].p, keys[i].len);
        if (e == NULL || !e->has_value) {
            *missing = i;
            return 0;
        }
        total += 4 + e->vlen;
    }
    if (op == FS_OP_WAIT) {
        reply_ok(s, c, id);
        return 1;
    }
    if (total > s->max_frame) {
        reply_err(s, c, id, FS_ETOOBIG,
                  "store %s: the %u values total %zu bytes, more than one reply may carry (%zu); "
                  "ask for fewer keys at a time",
                  fs_store_op_name(op), n, total, s->max_frame);
        return 1;
    }
    struct reply r = reply_begin(s, c, id, FS_OK);
    if (r.ok && fs_store_buf_reserve(&c->out, total, &(fs_error_t){0}) < 0) {
        r.ok = 0;
        conn_fail(s, c);
    }
    for (uint32_t i = 0; i < n && r.ok; i++) {
        struct entry *e = table_find(s, keys[i].p, keys[i].len);
        reply_arg(s, &r, e->val, e->vlen);
    }
    reply_end(s, &r);
    return 1;
}

static void waiter_register(fs_store_server_t *s, struct waiter *w, struct entry *e)
{
    w->on = e;
    w->knext = NULL;
    w->kprev = e->wlast;
    if (e->wlast)
        e->wlast->knext = w;
    else
        e->wfirst = w;
    e->wlast = w;
    (void)s;
}

/* Re-check a parked request: answer and free it, or park it on its first missing key. */
static void waiter_eval(fs_store_server_t *s, struct waiter *w)
{
    uint32_t missing = 0;
    if (try_answer(s, w->conn, w->id, w->op, w->keys, w->nkeys, &missing)) {
        waiter_free(s, w);
        return;
    }
    struct entry *e = table_get_or_add(s, w->keys[missing].p, w->keys[missing].len);
    if (e == NULL) {
        reply_err(s, w->conn, w->id, FS_ENOMEM, "store server out of memory parking a %s",
                  fs_store_op_name(w->op));
        waiter_free(s, w);
        return;
    }
    waiter_register(s, w, e);
}

/* A key got a value: re-check everything parked on it. */
static void wake(fs_store_server_t *s, struct entry *e)
{
    struct waiter *w = e->wfirst;
    e->wfirst = e->wlast = NULL;
    while (w) {
        struct waiter *next = w->knext;
        w->on = NULL;
        w->kprev = w->knext = NULL;
        waiter_eval(s, w);
        w = next;
    }
}

static void park(fs_store_server_t *s, struct conn *c, const fs_store_msg_t *m)
{
    size_t bytes = 0;
    for (unsigned i = 0; i < m->nargs; i++)
        bytes += m->args[i].len;
    struct waiter *w = malloc(sizeof *w + m->nargs * sizeof(fs_store_arg_t) + bytes);
    if (w == NULL) {
        reply_err(s, c, m->id, FS_ENOMEM, "store server out of memory parking a %s",
                  fs_store_op_name(m->code));
        return;
    }
    memset(w, 0, sizeof *w);
    w->conn = c;
    w->id = m->id;
    w->op = m->code;
    w->nkeys = m->nargs;
    uint8_t *kb = (uint8_t *)(w->keys + m->nargs);
    for (unsigned i = 0; i < m->nargs; i++) {
        if (m->args[i].len > 0)
            memcpy(kb, m->args[i].p, m->args[i].len);
        w->keys[i].p = kb;
        w->keys[i].len = m->args[i].len;
        kb += m->args[i].len;
    }
    w->cprev = c->wlast;
    if (c->wlast)
        c->wlast->cnext = w;
    else
        c->wfirst = w;
    c->wlast = w;
    waiter_eval(s, w);
}

/* ------------------------------------------------------------------ */
/* Requests                                                           */
/* ------------------------------------------------------------------ */

static int token_equal(const fs_store_server_t *s, const uint8_t *p, size_t n)
{
    /* Constant time in the presented token's content: always walk our whole token. */
    volatile unsigned char diff = (unsigned char)(n != s->token_len);
    for (size_t i = 0; i < s->token_len; i++)
        diff |= s->token[i] ^ (i < n ? p[i] : 0);
    return diff == 0;
}

static void handle_hello(fs_store_server_t *s, struct conn *c, const fs_store_msg_t *m)
{
    const size_t mlen = sizeof FS_STORE_MAGIC - 1;
    if (m->code != FS_OP_HELLO) {
        conn_kill(s, c);
        return;
    }
    c->closing = 1; /* unless everything below checks out */
    if (m->args[0].len != mlen || memcmp(m->args[0].p, FS_STORE_MAGIC, mlen) != 0) {
        reply_err(s, c, m->id, FS_EPROTO,
                  "store protocol mismatch: the server speaks %s; upgrade fastspawn on both sides",
                  FS_STORE_MAGIC);
        return;
    }
    if (!token_equal(s, m->args[1].p, m->args[1].len)) {
        reply_err(s, c, m->id, FS_EAUTH,
                  "store server rejected the connection: wrong token (check "
                  "FASTSPAWN_STORE_TOKEN matches the launcher's)");
        return;
    }
    c->closing = 0;
    c->authed = 1;
    s->nunauth--;
    struct reply r = reply_begin(s, c, m->id, FS_OK);
    reply_i64(s, &r, (int64_t)s->max_value);
    reply_end(s, &r);
}

static void do_set(fs_store_server_t *s, struct conn *c, uint32_t id, const fs_store_arg_t *k,
                   const fs_store_arg_t *v, int *failed)
{
    struct entry *e = table_get_or_add(s, k->p, k->len);
    if (e == NULL || entry_set(s, e, v->p, v->len) < 0) {
        char kb[200];
        fs_store_fmt_key(kb, sizeof kb, k->p, k->len);
        reply_err(s, c, id, FS_ENOMEM, "store server out of memory storing %s (%u bytes)", kb,
                  v->len);
        if (e != NULL)
            table_maybe_drop(s, e);
        *failed = 1;
        return;
    }
    wake(s, e);
}

static void handle_add(fs_store_server_t *s, struct conn *c, const fs_store_msg_t *m)
{
    const fs_store_arg_t *k = &m->args[0];
    int64_t delta = (int64_t)fs_store_get_u64(m->args[1].p), cur = 0, now;
    char kb[200];
    struct entry *e = table_find(s, k->p, k->len);
    if (e != NULL && e->has_value && fs_store_parse_i64(e->val, e->vlen, &cur) < 0) {
        fs_store_fmt_key(kb, sizeof kb, k->p, k->len);
        reply_err(s, c, m->id, FS_EINVAL,
                  "store add(%s): the key holds %zu bytes that are not a decimal integer", kb,
                  e->vlen);
        return;
    }
    if (__builtin_add_overflow(cur, delta, &now)) {
        fs_store_fmt_key(kb, sizeof kb, k->p, k->len);
        reply_err(s, c, m->id, FS_EINVAL, "store add(%s): %lld + %lld overflows int64", kb,
                  (long long)cur, (long long)delta);
        return;
    }
    char num[24];
    int n = snprintf(num, sizeof num, "%lld", (long long)now);
    fs_store_arg_t v = {(const uint8_t *)num, (uint32_t)n};
    int failed = 0;
    do_set(s, c, m->id, k, &v, &failed);
    if (failed)
        return;
    struct reply r = reply_begin(s, c, m->id, FS_OK);
    reply_i64(s, &r, now);
    reply_end(s, &r);
}

static void handle_cas(fs_store_server_t *s, struct conn *c, const fs_store_msg_t *m)
{
    const fs_store_arg_t *k = &m->args[0], *expected = &m->args[1], *desired = &m->args[2];
    struct entry *e = table_find(s, k->p, k->len);
    const fs_store_arg_t *answer = expected;
    int failed = 0;
    if (e == NULL || !e->has_value) {
        /* torch semantics: a missing key counts as empty; otherwise answer `expected`. */
        if (expected->len == 0) {
            do_set(s, c, m->id, k, desired, &failed);
            answer = desired;
        }
    } else if (e->vlen == expected->len &&
               (e->vlen == 0 || memcmp(e->val, expected->p, e->vlen) == 0)) {
        do_set(s, c, m->id, k, desired, &failed);
        answer = desired;
    } else {
        struct reply r = reply_begin(s, c, m->id, FS_OK);
        reply_arg(s, &r, e->val, e->vlen);
        reply_end(s, &r);
        return;
    }
    if (failed)
        return;
    struct reply r = reply_begin(s, c, m->id, FS_OK);
    reply_arg(s, &r, answer->p, answer->len);
    reply_end(s, &r);
}

static void handle_append(fs_store_server_t *s, struct conn *c, const fs_store_msg_t *m)
{
    const fs_store_arg_t *k = &m->args[0], *v = &m->args[1];
    struct entry *e = table_get_or_add(s, k->p, k->len);
    char kb[200];
    if (e == NULL) {
        fs_store_fmt_key(kb, sizeof kb, k->p, k->len);
        reply_err(s, c, m->id, FS_ENOMEM, "store server out of memory appending to %s", kb);
        return;
    }
    size_t old = e->has_value ? e->vlen : 0;
    if (old + v->len > s->max_value) {
        fs_store_fmt_key(kb, sizeof kb, k->p, k->len);
        reply_err(s, c, m->id, FS_ETOOBIG,
                  "store append(%s): the value would grow to %zu bytes, over the limit of %zu", kb,
                  old + v->len, s->max_value);
        table_maybe_drop(s, e);
        return;
    }
    if (v->len > 0) {
        uint8_t *p = realloc(e->val, old + v->len);
        if (p == NULL) {
            fs_store_fmt_key(kb, sizeof kb, k->p, k->len);
            reply_err(s, c, m->id, FS_ENOMEM, "store server out of memory appending to %s", kb);
            table_maybe_drop(s, e);
            return;
        }
        memcpy(p + old, v->p, v->len);
        e->val = p;
    }
    e->vlen = old + v->len;
    if (!e->has_value)
        s->nkeys++;
    e->has_value = 1;
    wake(s, e);
    reply_ok(s, c, m->id);
}

static void handle(fs_store_server_t *s, struct conn *c, const fs_store_msg_t *m)
{
    uint32_t missing = 0;
    int failed = 0;
    switch (m->code) {
    case FS_OP_SET:
        do_set(s, c, m->id, &m->args[0], &m->args[1], &failed);
        if (!failed)
            reply_ok(s, c, m->id);
        return;
    case FS_OP_GET:
    case FS_OP_WAIT:
    case FS_OP_MULTI_GET:
        if (!try_answer(s, c, m->id, m->code, m->args, m->nargs, &missing))
            park(s, c, m);
        return;
    case FS_OP_ADD: handle_add(s, c, m); return;
    case FS_OP_CAS: handle_cas(s, c, m); return;
    case FS_OP_CHECK: {
        uint8_t flags[FS_STORE_MAX_KEYS];
        for (unsigned i = 0; i < m->nargs; i++) {
            struct entry *e = table_find(s, m->args[i].p, m->args[i].len);
            flags[i] = e != NULL && e->has_value;
        }
        struct reply r = reply_begin(s, c, m->id, FS_OK);
        reply_arg(s, &r, flags, m->nargs);
        reply_end(s, &r);
        return;
    }
    case FS_OP_DELETE: {
        struct entry *e = table_find(s, m->args[0].p, m->args[0].len);
        int existed = e != NULL && e->has_value;
        if (existed) {
            free(e->val);
            e->val = NULL;
            e->vlen = 0;
            e->has_value = 0;
            s->nkeys--;
            table_maybe_drop(s, e);
        }
        struct reply r = reply_begin(s, c, m->id, FS_OK);
        reply_i64(s, &r, existed);
        reply_end(s, &r);
        return;
    }
    case FS_OP_NUM_KEYS: {
        struct reply r = reply_begin(s, c, m->id, FS_OK);
        reply_i64(s, &r, (int64_t)s->nkeys);
        reply_end(s, &r);
        return;
    }
    case FS_OP_MULTI_SET:
        for (unsigned i = 0; i + 1 < m->nargs && !failed; i += 2)
            do_set(s, c, m->id, &m->args[i], &m->args[i + 1], &failed);
        if (!failed)
            reply_ok(s, c, m->id);
        return;
    case FS_OP_APPEND: handle_append(s, c, m); return;
    case FS_OP_CANCEL: {
        uint32_t id = fs_store_get_u32(m->args[0].p);
        for (struct waiter *w = c->wfirst; w; w = w->cnext) {
            if (w->id == id) {
                waiter_free(s, w);
                break;
            }
        }
        return; /* no reply */
    }
    default: conn_kill(s, c); return; /* HELLO twice; others were rejected by the check */
    }
}

/* Handle every complete frame in c->in. */
static void conn_process(fs_store_server_t *s, struct conn *c)
{
    while (!c->dead && !c->closing && !c->paused && !c->kill_pending) {
        fs_store_msg_t m;
        fs_error_t e;
        size_t limit = c->authed ? s->max_frame : FS_STORE_HELLO_MAX_FRAME;
        int64_t n = fs_store_parse_frame(c->in.p + c->in_off, c->in.len - c->in_off, limit, s->args,
                                         FS_STORE_MAX_ARGS, &m, &e);
        if (n == 0)
            break;
        if (n < 0 || fs_store_check_request(&m, s->max_value, &e) < 0) {
            conn_kill(s, c); /* malformed: this client only */
            return;
        }
        if (c->authed)
            handle(s, c, &m);
        else
            handle_hello(s, c, &m);
        c->in_off += (size_t)n;
        if (c->out.len - c->out_off > WBUF_HIGH)
            c->paused = 1;
    }
    if (c->dead)
        return;
    if (c->in_off == c->in.len) {
        c->in_off = c->in.len = 0;
        if (c->in.cap > BUF_KEEP)
            fs_store_buf_free(&c->in);
    }
    mark_dirty(s, c); /* flush replies, update the epoll mask */
}

static void conn_read(fs_store_server_t *s, struct conn *c)
{
    fs_error_t e;
    while (!c->dead && !c->paused && !c->closing && !c->kill_pending) {
        if (c->in_off > 0) {
            memmove(c->in.p, c->in.p + c->in_off, c->in.len - c->in_off);
            c->in.len -= c->in_off;
            c->in_off = 0;
        }
        size_t want = READ_CHUNK;
        if (c->in.len >= 4) {
            size_t frame = (size_t)fs_store_get_u32(c->in.p) + 4;
            if (frame > c->in.len && frame - c->in.len > want) {
                want = frame - c->in.len;
                if (want > 2 * c->in.cap && want > READ_CHUNK)
                    want = 2 * c->in.cap; /* grow as bytes arrive, not as claimed */
            }
        }
        if (fs_store_buf_reserve(&c->in, want, &e) < 0) {
            conn_kill(s, c);
            return;
        }
        size_t room = c->in.cap - c->in.len;
        ssize_t r = recv(c->fd, c->in.p + c->in.len, room, 0);
        if (r > 0) {
            c->in.len += (size_t)r;
            conn_process(s, c);
            if ((size_t)r < room)
                break; /* drained for now; level-triggered epoll reports more */
            continue;
        }
        if (r == 0) {
            conn_kill(s, c);
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            conn_kill(s, c);
        break;
    }
}

/* Flush every connection that got replies; close the failed ones. */
static void run_dirty(fs_store_server_t *s)
{
    while (s->dirty) {
        struct conn *c = s->dirty;
        s->dirty = c->dirty_next;
        c->in_dirty = 0;
        if (c->dead)
            continue;
        if (c->kill_pending) {
            conn_kill(s, c);
            continue;
        }
        conn_flush(s, c);
        if (!c->dead && c->resume && !c->in_dirty) {
            c->resume = 0;
            conn_process(s, c); /* frames that waited while paused; marks c dirty again */
        }
    }
}

static void accept_all(fs_store_server_t *s, struct listener *l)
{
    for (int i = 0; i < 256; i++) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO)
                continue;
            if ((errno == EMFILE || errno == ENFILE) && s->reserve_fd >= 0) {
                /* Out of descriptors: accept-and-close so the backlog does not spin us. */
                close_quietly(s->reserve_fd);
                s->reserve_fd = -1;
                int tmp = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
                if (tmp >= 0)
                    close_quietly(tmp);
                s->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                continue;
            }
            return; /* EAGAIN, or an error the next wakeup retries */
        }
        int one = 1;
        if (l->family != AF_UNIX &&
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) {
            close_quietly(fd);
            continue;
        }
        struct conn *c = calloc(1, sizeof *c);
        if (c == NULL) {
            close_quietly(fd);
            continue;
        }
        c->tag.kind = TAG_CONN;
        c->fd = fd;
        c->events = EPOLLIN;
        c->accepted_ms = fs_now_ms();
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(s->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close_quietly(fd);
            free(c);
            continue;
        }
        c->next = s->conns;
        if (s->conns)
            s->conns->prev = c;
        s->conns = c;
        s->nunauth++;
        atomic_fetch_add(&s->nclients, 1);
    }
}

static void sweep_unauth(fs_store_server_t *s)
{
    int64_t now = fs_now_ms();
    struct conn *c = s->conns;
    while (c) {
        struct conn *next = c->next;
        if (!c->authed && now - c->accepted_ms > s->auth_timeout_ms)
            conn_kill(s, c);
        c = next;
    }
}

static void free_dead(fs_store_server_t *s)
{
    while (s->dead) {
        struct conn *c = s->dead;
        s->dead = c->dead_next;
        conn_free(c);
    }
}

static void *server_main(void *arg)
{
    fs_store_server_t *s = arg;
    struct epoll_event evs[128];
    int64_t last_sweep = fs_now_ms(), busy_until = 0;
    while (!atomic_load(&s->stop)) {
        /* Right after a request, poll without sleeping for SPIN_US: clients often send
         * the next one within microseconds (a rendezvous is a burst of requests), and
         * waking a sleeping thread costs tens of microseconds on a VM. */
        int timeout = s->nunauth > 0 ? 1000 : -1;
        if (busy_until != 0 && now_us() < busy_until)
            timeout = 0;
        int n = epoll_wait(s->ep, evs, 128, timeout);
        if (n > 0)
            busy_until = now_us() + SPIN_US;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fs_error_sys(&s->thread_err, "store server: epoll_wait");
            atomic_store(&s->failed, 1);
            break;
        }
        for (int i = 0; i < n; i++) {
            struct tag *t = evs[i].data.ptr;
            if (t->kind == TAG_WAKE) {
                uint64_t v;
                if (read(s->wakefd, &v, sizeof v) < 0 && errno != EAGAIN) {
                    /* The stop flag is what matters; it is checked below. */
                }
            } else if (t->kind == TAG_LISTEN) {
                accept_all(s, (struct listener *)t);
            } else {
                struct conn *c = (struct conn *)t;
                uint32_t ev = evs[i].events;
                if (c->dead)
                    continue;
                if (ev & EPOLLERR) {
                    conn_kill(s, c);
                } else {
                    if (ev & EPOLLOUT)
                        conn_flush(s, c);
                    if (!c->dead && (ev & (EPOLLIN | EPOLLHUP))) {
                        if (c->paused || c->closing)
                            conn_kill(s, c); /* hung up while we were not reading */
                        else
                            conn_read(s, c);
                    }
                }
            }
            run_dirty(s);
        }
        if (s->nunauth > 0 && fs_now_ms() - last_sweep >= 500) {
            sweep_unauth(s);
            run_dirty(s);
            last_sweep = fs_now_ms();
        }
        free_dead(s);
    }
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Start / stop                                                       */
/* ------------------------------------------------------------------ */

static int listen_tcp(fs_store_server_t *s, const char *host, int port, fs_error_t *err)
{
    struct addrinfo hints = {0}, *res = NULL;
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    const char *node = host == NULL ? "127.0.0.1" : (host[0] == '\0' ? NULL : host);
    int gai = getaddrinfo(node, portstr, &hints, &res);
    if (gai != 0)
        return fs_error_set(err, FS_EINVAL, "store server: cannot resolve host '%s': %s",
                            node ? node : "(any)", gai_strerror(gai));
    int fd = -1, saved = 0;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            saved = errno;
            continue;
        }
        int one = 1, zero = 0;
        if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
            (ai->ai_family == AF_INET6 &&
             setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero) < 0) ||
            bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, 4096) < 0) {
            saved = errno;
            close_quietly(fd);
            fd = -1;
            continue;
        }
        s->family = ai->ai_family;
        break;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        errno = saved;
        return fs_error_sys(err, "store server: cannot listen on %s port %d", node ? node : "(any)",
                            port);
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char serv[16];
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0) {
        close_quietly(fd);
        return fs_error_sys(err, "store server: getsockname");
    }
    gai = getnameinfo((struct sockaddr *)&ss, sl, s->host, sizeof s->host, serv, sizeof serv,
                      NI_NUMERICHOST | NI_NUMERICSERV);
    if (gai != 0) {
        close_quietly(fd);
        return fs_error_set(err, FS_ESYS, "store server: getnameinfo: %s", gai_strerror(gai));
    }
    s->port = atoi(serv);
    memcpy(&s->addr, &ss, sizeof ss);
    s->lis[s->nlis].tag.kind = TAG_LISTEN;
    s->lis[s->nlis].fd = fd;
    s->lis[s->nlis].family = s->family;
    s->nlis++;
    return FS_OK;
}

static int listen_unix(fs_store_server_t *s, const char *path, fs_error_t *err)
{
    struct sockaddr_un un = {0};
    un.sun_family = AF_UNIX;
    char name[sizeof un.sun_path + 1];
    if (strcmp(path, "@") == 0) {
        uint32_t r = 0;
        if (getrandom(&r, sizeof r, 0) != (ssize_t)sizeof r)
            return fs_error_sys(err, "store server: getrandom");
        snprintf(name, sizeof name, "@fastspawn-store-%d-%08x", (int)getpid(), r);
    } else {
        size_t n = strlen(path);
        if (n == 0 || n >= sizeof un.sun_path)
            return fs_error_set(err, FS_EINVAL,
                                "store server: unix socket path must be 1..%zu bytes, got %zu",
                                sizeof un.sun_path - 1, n);
        memcpy(name, path, n + 1);
    }
    size_t n = strlen(name);
    socklen_t len;
    if (name[0] == '@') {
        un.sun_path[0] = '\0';
        memcpy(un.sun_path + 1, name + 1, n - 1);
        len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    } else {
        memcpy(un.sun_path, name, n);
        len = (socklen_t)sizeof un;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return fs_error_sys(err, "store server: socket(AF_UNIX)");
    if (bind(fd, (struct sockaddr *)&un, len) < 0 || listen(fd, 4096) < 0) {
        fs_error_sys(err, "store server: cannot listen on unix socket %s", name);
        close_quietly(fd);
        return FS_ESYS;
    }
    memcpy(s->unix_path, name, n + 1);
    s->lis[s->nlis].tag.kind = TAG_LISTEN;
    s->lis[s->nlis].fd = fd;
    s->lis[s->nlis].family = AF_UNIX;
    s->nlis++;
    return FS_OK;
}

static void server_free(fs_store_server_t *s)
{
    registry_remove(s);
    struct conn *c = s->conns;
    while (c) {
        struct conn *next = c->next;
        conn_drop_waiters(s, c);
        close_quietly(c->fd);
        conn_free(c);
        c = next;
    }
    s->conns = NULL;
    free_dead(s);
    for (size_t i = 0; s->buckets && i < s->nbuckets; i++) {
        struct entry *e = s->buckets[i];
        while (e) {
            struct entry *next = e->next;
            free(e->val);
            free(e);
            e = next;
        }
    }
    free(s->buckets);
    for (int i = 0; i < s->nlis; i++)
        close_quietly(s->lis[i].fd);
    if (s->unix_path[0] != '\0' && s->unix_path[0] != '@' && unlink(s->unix_path) < 0) {
        /* Someone removed it already: fine. */
    }
    close_quietly(s->ep);
    close_quietly(s->wakefd);
    close_quietly(s->reserve_fd);
    free(s->args);
    free(s);
}

int fs_store_server_start(const fs_store_server_opts_t *opts, fs_store_server_t **out,
                          fs_error_t *err)
{
    *out = NULL;
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
    size_t max_value = opts->max_value_size ? opts->max_value_size : FS_STORE_DEFAULT_MAX_VALUE;
    if (max_value > (size_t)UINT32_MAX - FS_STORE_FRAME_SLACK)
        return fs_error_set(err, FS_EINVAL, "store max_value_size %zu exceeds %zu", max_value,
                            (size_t)UINT32_MAX - FS_STORE_FRAME_SLACK);
    fs_store_server_t *s = calloc(1, sizeof *s);
    if (s == NULL)
        return fs_error_set(err, FS_ENOMEM, "store server: out of memory");
    s->ep = s->wakefd = s->reserve_fd = -1;
    s->registry_slot = -1;
    s->owner = getpid();
    memcpy(s->token, opts->token, tlen);
    s->token_len = tlen;
    s->max_value = max_value;
    s->max_frame = fs_store_max_frame(max_value);
    s->auth_timeout_ms = opts->auth_timeout_ms > 0 ? opts->auth_timeout_ms : 30000;
    s->wake_tag.kind = TAG_WAKE;
    atomic_init(&s->stop, 0);
    atomic_init(&s->failed, 0);
    atomic_init(&s->nclients, 0);
    int rc;
    s->nbuckets = 1024;
    s->buckets = calloc(s->nbuckets, sizeof(struct entry *));
    s->args = malloc(FS_STORE_MAX_ARGS * sizeof *s->args);
    if (s->buckets == NULL || s->args == NULL) {
        rc = fs_error_set(err, FS_ENOMEM, "store server: out of memory");
        goto fail;
    }
    if (getrandom(&s->seed, sizeof s->seed, 0) != (ssize_t)sizeof s->seed) {
        rc = fs_error_sys(err, "store server: getrandom");
        goto fail;
    }
    s->ep = epoll_create1(EPOLL_CLOEXEC);
    if (s->ep < 0) {
        rc = fs_error_sys(err, "store server: epoll_create1");
        goto fail;
    }
    s->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->wakefd < 0) {
        rc = fs_error_sys(err, "store server: eventfd");
        goto fail;
    }
    s->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (s->reserve_fd < 0) {
        rc = fs_error_sys(err, "store server: open /dev/null");
        goto fail;
    }
    if ((rc = listen_tcp(s, opts->host, opts->port, err)) < 0)
        goto fail;
    if (opts->unix_path != NULL && (rc = listen_unix(s, opts->unix_path, err)) < 0)
        goto fail;
    for (int i = 0; i < s->nlis; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &s->lis[i].tag};
        if (epoll_ctl(s->ep, EPOLL_CTL_ADD, s->lis[i].fd, &ev) < 0) {
            rc = fs_error_sys(err, "store server: epoll_ctl(listen)");
            goto fail;
        }
    }
    struct epoll_event wev = {.events = EPOLLIN, .data.ptr = &s->wake_tag};
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, s->wakefd, &wev) < 0) {
        rc = fs_error_sys(err, "store server: epoll_ctl(eventfd)");
        goto fail;
    }
    if ((rc = registry_add(s, err)) < 0)
        goto fail;
    /* The thread blocks every signal: they belong to the application's threads. */
    sigset_t all, old;
    sigfillset(&all);
    int prc = pthread_sigmask(SIG_SETMASK, &all, &old);
    if (prc == 0) {
        prc = pthread_create(&s->thread, NULL, server_main, s);
        int mrc = pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (prc == 0 && mrc != 0)
            prc = mrc; /* cannot happen with a valid set; treat as failure below */
        if (prc == 0)
            s->thread_started = 1;
    }
    if (!s->thread_started) {
        errno = prc;
        rc = fs_error_sys(err, "store server: starting the server thread");
        goto fail;
    }
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
    return atomic_load(&((fs_store_server_t *)s)->nclients);
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
    size_t got = 0;
    while (got < sizeof raw) {
        ssize_t r = getrandom(raw + got, sizeof raw - got, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return fs_error_sys(err, "fs_store_make_token: getrandom");
        }
        got += (size_t)r;
    }
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < sizeof raw; i++) {
        out[2 * i] = hex[raw[i] >> 4];
        out[2 * i + 1] = hex[raw[i] & 15];
    }
    out[FS_STORE_TOKEN_LEN] = '\0';
    return FS_OK;
}
