/*
 * store_conn.c - the store server's connections: accepting, reading frames, queued
 * replies, flushing, closing.
 *
 * A malformed frame, a wrong token or an I/O error closes that connection only. Replies
 * are queued on the connection and flushed after each event (never written while a list
 * is being walked), and a closed connection is freed only at the end of the event batch,
 * so closing one never frees what a loop holds.
 *
 * Descriptors are bounded: at most max_unauth connections that have not authenticated
 * (a new one closes the oldest, and each has auth_timeout_ms from its accept to say
 * HELLO), at most max_clients authenticated ones (store_handle.c refuses the HELLO
 * beyond). When the process runs out of descriptors anyway, accept sheds connections
 * through a reserve descriptor, or pauses; it never spins.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"
#include "store_server.h"

#define ACCEPT_BATCH 256
#define ACCEPT_PAUSE_MS 100 /* out of descriptors without a reserve: stop accepting this long */

void fs__conn_mark_dirty(fs_store_server_t *s, struct fs__conn *c)
{
    if (c->in_dirty || c->dead)
        return;
    c->in_dirty = 1;
    c->dirty_next = s->dirty;
    s->dirty = c;
}

/* Queue c to close at the next flush (safe inside any loop). */
static void conn_fail(fs_store_server_t *s, struct fs__conn *c)
{
    c->kill_pending = 1;
    fs__conn_mark_dirty(s, c);
}

/* ---- the unauthenticated list (oldest first) ------------------------------------- */

static void unauth_append(fs_store_server_t *s, struct fs__conn *c)
{
    c->unext = NULL;
    c->uprev = s->ulast;
    if (s->ulast)
        s->ulast->unext = c;
    else
        s->ufirst = c;
    s->ulast = c;
    atomic_fetch_add(&s->counts.nunauth, 1);
}

static void unauth_unlink(fs_store_server_t *s, struct fs__conn *c)
{
    if (c->uprev)
        c->uprev->unext = c->unext;
    else
        s->ufirst = c->unext;
    if (c->unext)
        c->unext->uprev = c->uprev;
    else
        s->ulast = c->uprev;
    c->uprev = c->unext = NULL;
    atomic_fetch_sub(&s->counts.nunauth, 1);
}

void fs__conn_authed(fs_store_server_t *s, struct fs__conn *c)
{
    c->authed = 1;
    unauth_unlink(s, c);
}

void fs__conn_kill(fs_store_server_t *s, struct fs__conn *c)
{
    if (c->dead)
        return;
    c->dead = 1;
    /* Remove from epoll explicitly: a forked child may still hold a dup of fd, and
     * epoll tracks the open file, not the descriptor. ENOENT: it was never added. */
    (void)epoll_ctl(s->ep, EPOLL_CTL_DEL, c->fd, NULL);
    fs__closep(&c->fd);
    fs__conn_drop_waiters(&s->table, c);
    if (!c->authed)
        unauth_unlink(s, c);
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    atomic_fetch_sub(&s->counts.nclients, 1);
    atomic_fetch_sub_explicit(&s->counts.out_bytes, c->out_counted, memory_order_relaxed);
    c->out_counted = 0;
    c->dead_next = s->dead;
    s->dead = c;
}

void fs__conn_free(struct fs__conn *c)
{
    fs__store_buf_free(&c->in);
    fs__store_buf_free(&c->out);
    free(c);
}

void fs__conn_free_dead(fs_store_server_t *s)
{
    while (s->dead) {
        struct fs__conn *c = s->dead;
        s->dead = c->dead_next;
        fs__conn_free(c);
    }
}

static void conn_update_events(fs_store_server_t *s, struct fs__conn *c)
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
        fs__conn_kill(s, c);
        return;
    }
    c->events = want;
}

/* Bring the server's out_bytes up to date with c's unsent bytes. */
static void conn_count_out(fs_store_server_t *s, struct fs__conn *c)
{
    size_t now = fs__conn_unsent(c);
    if (now >= c->out_counted)
        atomic_fetch_add_explicit(&s->counts.out_bytes, now - c->out_counted, memory_order_relaxed);
    else
        atomic_fetch_sub_explicit(&s->counts.out_bytes, c->out_counted - now, memory_order_relaxed);
    c->out_counted = now;
}

void fs__conn_flush(fs_store_server_t *s, struct fs__conn *c)
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
        fs__conn_kill(s, c); /* EPIPE, ECONNRESET, ... */
        return;
    }
    if (c->out_off == c->out.len) {
        c->out_off = c->out.len = 0;
        if (c->out.cap > FS__STORE_SERVER_BUF_KEEP)
            fs__store_buf_free(&c->out);
        if (c->closing) {
            fs__conn_kill(s, c);
            return;
        }
    }
    /* Half the limit, so that a client reading slowly is not woken for every reply. */
    if (!c->resume && (c->paused || c->qfirst != NULL) &&
        fs__conn_unsent(c) <= FS__STORE_WBUF_HIGH / 2) {
        c->paused = 0;
        c->resume = 1;
        fs__conn_mark_dirty(s, c);
    }
    conn_count_out(s, c);
    conn_update_events(s, c);
}

/* ---- replies ---------------------------------------------------------------------- */

struct fs__reply fs__reply_begin(fs_store_server_t *s, struct fs__conn *c, uint32_t id, int code)
{
    struct fs__reply r = {c, 0, 1};
    if (fs__store_frame_begin(&c->out, id, code, &r.start, NULL) < 0) {
        r.ok = 0;
        conn_fail(s, c);
    }
    return r;
}

void fs__reply_arg(fs_store_server_t *s, struct fs__reply *r, const void *p, size_t n)
{
    if (r->ok && fs__store_frame_arg(&r->c->out, r->start, p, n, NULL) < 0) {
        r->ok = 0;
        conn_fail(s, r->c);
    }
}

void fs__reply_i64(fs_store_server_t *s, struct fs__reply *r, int64_t v)
{
    uint8_t b[8];
    fs__store_put_u64(b, (uint64_t)v);
    fs__reply_arg(s, r, b, 8);
}

void fs__reply_end(fs_store_server_t *s, struct fs__reply *r)
{
    if (r->ok)
        fs__store_frame_end(&r->c->out, r->start);
    else
        conn_fail(s, r->c); /* a reply we could not build: the stream is lost */
    fs__conn_mark_dirty(s, r->c);
}

void fs__reply_ok(fs_store_server_t *s, struct fs__conn *c, uint32_t id)
{
    struct fs__reply r = fs__reply_begin(s, c, id, FS_OK);
    fs__reply_end(s, &r);
}

void fs__reply_err(fs_store_server_t *s, struct fs__conn *c, uint32_t id, int code, const char *fmt,
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
    struct fs__reply r = fs__reply_begin(s, c, id, code);
    fs__reply_arg(s, &r, msg, (size_t)n);
    fs__reply_end(s, &r);
}

/* ---- reading ---------------------------------------------------------------------- */

/* Handle every complete frame in c->in. */
static void conn_process(fs_store_server_t *s, struct fs__conn *c)
{
    while (!c->dead && !c->closing && !c->paused && !c->kill_pending) {
        if (fs__conn_out_full(c)) {
            c->paused = 1; /* read no more requests until the client reads its replies */
            break;
        }
        fs__store_msg_t m;
        size_t limit = c->authed ? s->max_frame : FS__STORE_HELLO_MAX_FRAME;
        int64_t n = fs__store_parse_frame(c->in.p + c->in_off, c->in.len - c->in_off, limit,
                                          s->args, FS__STORE_MAX_ARGS, &m, NULL);
        if (n == 0)
            break;
        if (n < 0 || fs__store_check_request(&m, s->max_value, NULL) < 0) {
            fs__conn_kill(s, c); /* malformed: this client only */
            return;
        }
        fs__store_handle(s, c, &m);
        c->in_off += (size_t)n;
    }
    if (c->dead)
        return;
    if (c->in_off == c->in.len) {
        c->in_off = c->in.len = 0;
        if (c->in.cap > FS__STORE_SERVER_BUF_KEEP)
            fs__store_buf_free(&c->in);
    }
    fs__conn_mark_dirty(s, c); /* flush replies, update the epoll mask */
}

void fs__conn_read(fs_store_server_t *s, struct fs__conn *c)
{
    while (!c->dead && !c->paused && !c->closing && !c->kill_pending) {
        /* cautious until authenticated and after: a client's frame length is a claim. */
        if (fs__store_buf_make_room(&c->in, &c->in_off, 1, NULL) < 0) {
            fs__conn_kill(s, c);
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
            fs__conn_kill(s, c);
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            fs__conn_kill(s, c);
        break;
    }
}

void fs__conn_run_dirty(fs_store_server_t *s)
{
    while (s->dirty) {
        struct fs__conn *c = s->dirty;
        s->dirty = c->dirty_next;
        c->in_dirty = 0;
        if (c->dead)
            continue;
        if (c->kill_pending) {
            fs__conn_kill(s, c);
            continue;
        }
        fs__conn_flush(s, c);
        if (!c->dead && c->resume && !c->in_dirty) {
            c->resume = 0;
            fs__store_answer_queued(s, c); /* parked requests first: they came first */
            conn_process(s, c); /* frames that waited while paused; marks c dirty again */
        }
    }
}

/* ---- accepting -------------------------------------------------------------------- */

/* Listen (1) or not (0) on every listener. MOD on a registered fd allocates nothing: its
   failure is a bug, and stops the server. */
static int set_accepting(fs_store_server_t *s, int on)
{
    for (int i = 0; i < s->nlis; i++) {
        struct epoll_event ev = {.events = on ? EPOLLIN : 0, .data.ptr = &s->lis[i].tag};
        if (epoll_ctl(s->ep, EPOLL_CTL_MOD, s->lis[i].fd, &ev) < 0) {
            fs_error_sys(&s->thread_err, "store server: epoll_ctl(listener)");
            atomic_store(&s->failed, 1);
            atomic_store(&s->stop, 1);
            return -1;
        }
    }
    return 0;
}

/* No descriptor to accept with and no way to shed: leave the backlog to the kernel for a
   while (nginx does the same) rather than wake for it in a loop. */
static void pause_accepting(fs_store_server_t *s)
{
    if (s->accept_paused_until == 0 && set_accepting(s, 0) == 0)
        s->accept_paused_until = fs__deadline_ms(ACCEPT_PAUSE_MS);
}

void fs__conn_accept_resume(fs_store_server_t *s)
{
    if (s->accept_paused_until == 0 || fs_now_ms() < s->accept_paused_until)
        return;
    s->accept_paused_until = 0;
    if (s->reserve_fd < 0)
        s->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC); /* -1: still none */
    /* A failure has stopped the server: nothing more to do here. */
    (void)set_accepting(s, 1);
}

/*
 * Out of descriptors (EMFILE, ENFILE): give back the reserve, accept the next connection
 * and close it (its client retries), take the reserve again (libuv's and nginx's trick:
 * the backlog shrinks instead of waking the loop forever). Returns 1 when a connection
 * was shed, 0 when none was (the backlog is empty) or accepting is paused.
 */
static int shed_one(fs_store_server_t *s, struct fs__listener *l)
{
    if (s->reserve_fd < 0) {
        pause_accepting(s);
        return 0;
    }
    fs__closep(&s->reserve_fd);
    int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
    int shed = fd >= 0;
    if (shed) {
        (void)fs__close(fd);
        atomic_fetch_add_explicit(&s->counts.shed, 1, memory_order_relaxed);
    }
    /* Another thread may have taken the descriptor we freed: then no reserve, and pause. */
    s->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (s->reserve_fd < 0) {
        pause_accepting(s);
        return 0;
    }
    return shed;
}

/* accept4 failed: 1 to try the next connection, 0 to stop for this event. */
static int accept_failed(fs_store_server_t *s, struct fs__listener *l, int e)
{
    switch (e) {
    case EAGAIN: return 0; /* EWOULDBLOCK too: the backlog is empty */
    case EMFILE:
    case ENFILE: return shed_one(s, l);
    case ENOBUFS:
    case ENOMEM: pause_accepting(s); return 0;
    default: return 1; /* that connection only: ECONNABORTED, EPROTO, EPERM, network errors */
    }
}

static struct fs__conn *conn_new(fs_store_server_t *s, int fd, int family)
{
    if (fs__set_nodelay(fd, family) < 0)
        return NULL;
    struct fs__conn *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->tag.kind = FS__TAG_CONN;
    c->fd = fd;
    c->events = EPOLLIN;
    c->accepted_ms = fs_now_ms();
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        free(c);
        return NULL;
    }
    return c;
}

/* Take in the accepted fd, closing the oldest unauthenticated connection at the cap. */
static void admit(fs_store_server_t *s, int fd, int family)
{
    if (atomic_load(&s->counts.nunauth) >= s->max_unauth && s->ufirst != NULL) {
        atomic_fetch_add_explicit(&s->counts.evicted, 1, memory_order_relaxed);
        fs__conn_kill(s, s->ufirst);
    }
    struct fs__conn *c = conn_new(s, fd, family);
    if (c == NULL) {
        (void)fs__close(fd); /* this client only: it sees the connection close */
        return;
    }
    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    unauth_append(s, c);
    atomic_fetch_add(&s->counts.nclients, 1);
}

void fs__conn_accept(fs_store_server_t *s, struct fs__listener *l)
{
    /* A quarter of the cap per event, so that the HELLOs of one batch are read before
       the next batches could evict them (an honest client says HELLO at once). */
    size_t batch = s->max_unauth / 4 ? s->max_unauth / 4 : 1;
    if (batch > ACCEPT_BATCH)
        batch = ACCEPT_BATCH;
    for (size_t i = 0; i < batch && s->accept_paused_until == 0; i++) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0)
            admit(s, fd, l->family);
        else if (errno != EINTR && !accept_failed(s, l, errno))
            return;
    }
}

void fs__conn_expire_unauth(fs_store_server_t *s)
{
    int64_t now = fs_now_ms();
    /* Oldest first, and every one has the same deadline: stop at the first still in time. */
    while (s->ufirst != NULL && now - s->ufirst->accepted_ms >= s->auth_timeout_ms) {
        atomic_fetch_add_explicit(&s->counts.evicted, 1, memory_order_relaxed);
        fs__conn_kill(s, s->ufirst);
    }
}

int64_t fs__conn_next_deadline(const fs_store_server_t *s)
{
    int64_t next = INT64_MAX;
    if (s->ufirst != NULL)
        next = s->ufirst->accepted_ms + s->auth_timeout_ms;
    if (s->accept_paused_until != 0 && s->accept_paused_until < next)
        next = s->accept_paused_until;
    return next;
}
