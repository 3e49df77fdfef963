/*
 * store_client.c - the rendezvous store's client connection: connect with retry and
 * backoff, authenticate (HELLO), then one request at a time per connection (calls are
 * serialised by a mutex, fs__call_*), each with a deadline. The operations themselves
 * are store_ops.c's.
 *
 * Every request carries an id. When a call gives up (deadline, signal) the
 * client sends CANCEL(id) so the server drops a parked request, and a reply
 * that still arrives for an old id is skipped by the next call.
 */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"
#include "net.h"
#include "store_client.h"

#define BUF_KEEP ((size_t)16 << 20) /* keep a receive buffer this big between calls */
#define KEY_SHOWN 200               /* room for a key quoted in a message */
#define BACKOFF_FIRST_MS 10
#define BACKOFF_MAX_MS 1000

static void describe(char *out, size_t cap, const struct fs__what *w)
{
    char kb[KEY_SHOWN];
    const char *name = fs__store_op_name(w->op);
    if (w->key != NULL) {
        fs__store_fmt_key(kb, sizeof kb, w->key, strlen(w->key));
        snprintf(out, cap, "%s(%s)", name, kb);
        return;
    }
    if (w->keys == NULL) {
        snprintf(out, cap, "%s()", name);
        return;
    }
    size_t o = (size_t)snprintf(out, cap, "%s([", name);
    for (size_t i = 0; i < w->n && o + 8 < cap; i++) {
        if (i == 3) {
            snprintf(out + o, cap - o, ", ... %zu keys", w->n);
            o = strlen(out);
            break;
        }
        fs__store_fmt_key(kb, 64, w->keys[i], strlen(w->keys[i]));
        o += (size_t)snprintf(out + o, cap - o, "%s%s", i ? ", " : "", kb);
    }
    if (o + 3 < cap)
        snprintf(out + o, cap - o, "])");
}

/* ------------------------------------------------------------------ */
/* Deadlines and low-level I/O                                        */
/* ------------------------------------------------------------------ */

int fs__store_resolve_timeout(const fs_store_client_t *c, int64_t timeout_ms, int64_t *deadline,
                              int64_t *effective, fs_error_t *err)
{
    if (timeout_ms == FS_STORE_DEFAULT_TIMEOUT)
        timeout_ms = fs_store_client_timeout(c);
    if (timeout_ms < 0)
        return fs_error_set(err, FS_EINVAL,
                            "store timeout must be >= 0 ms (or FS_STORE_DEFAULT_TIMEOUT), got %lld",
                            (long long)timeout_ms);
    *effective = timeout_ms;
    *deadline = fs__deadline_ms(timeout_ms);
    return FS_OK;
}

static int set_broken(fs_store_client_t *c, fs_error_t *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int set_broken(fs_store_client_t *c, fs_error_t *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(c->broken_msg, sizeof c->broken_msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        c->broken_msg[0] = '\0';
    c->broken = code;
    return fs_error_set(err, code, "%s", c->broken_msg);
}

/* Send c->out entirely. A partial send at the deadline breaks the stream. */
static int send_all(fs_store_client_t *c, int64_t deadline, const char *what, int64_t tmo,
                    fs_error_t *err)
{
    size_t off = 0;
    while (off < c->out.len) {
        ssize_t r = send(c->fd, c->out.p + off, c->out.len - off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r > 0) {
            off += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            if (atomic_load(&c->shut))
                return set_broken(c, err, FS_ECLOSED, "store client was closed during %s", what);
            int e = errno;
            return set_broken(c, err, e == EPIPE || e == ECONNRESET ? FS_ECLOSED : FS_ESYS,
                              "store %s: sending to %s failed: %s", what, c->addr, strerror(e));
        }
        struct pollfd p = {.fd = c->fd, .events = POLLOUT};
        int pr = poll(&p, 1, fs__poll_timeout(deadline));
        if (pr < 0 && errno != EINTR)
            return set_broken(c, err, FS_ESYS, "store %s: poll: %s", what, strerror(errno));
        if (pr == 0) {
            if (off == 0)
                return fs_error_set(err, FS_ETIMEOUT,
                                    "store %s timed out after %lld ms sending to %s (server busy?)",
                                    what, (long long)tmo, c->addr);
            return set_broken(c, err, FS_ETIMEOUT,
                              "store %s timed out after %lld ms with the request half sent to %s",
                              what, (long long)tmo, c->addr);
        }
    }
    return FS_OK;
}

/* Tell the server to drop request `id` if it is parked. */
static void send_cancel(fs_store_client_t *c, uint32_t id)
{
    uint8_t f[FS__STORE_HDR + 8];
    fs__store_put_u32(f, sizeof f - 4);
    fs__store_put_u32(f + 4, id);
    f[8] = FS__OP_CANCEL;
    f[9] = 0;
    f[10] = 1;
    f[11] = 0;
    fs__store_put_u32(f + 12, 4);
    fs__store_put_u32(f + 16, id);
    ssize_t r;
    do {
        r = send(c->fd, f, sizeof f, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (r < 0 && errno == EINTR);
    if (r != (ssize_t)sizeof f) {
        /* A partial or failed cancel leaves the stream unknown: stop using it. */
        c->broken = r < 0 && errno != EAGAIN ? FS_ECLOSED : FS_EPROTO;
        snprintf(c->broken_msg, sizeof c->broken_msg,
                 "store connection to %s dropped after a cancelled request", c->addr);
    }
}

static int op_parks(int op)
{
    return op == FS__OP_GET || op == FS__OP_WAIT || op == FS__OP_MULTI_GET;
}

/* The outcome a complete reply carries: FS_OK, or the server's error with its message. */
static int reply_status(const fs__store_msg_t *reply, const char *what, fs_error_t *err)
{
    if (reply->code == FS_OK)
        return FS_OK;
    int code = reply->code;
    if (code < FS_EINTR || code > FS_EINVAL)
        code = FS_EPROTO;
    if (reply->nargs >= 1)
        return fs_error_set(err, code, "%.*s", (int)reply->args[0].len,
                            (const char *)reply->args[0].p);
    return fs_error_set(err, code, "store %s failed on the server: %s", what, fs_status_name(code));
}

/*
 * Look in c->in for the reply to request id: 1 with *reply and *status filled, 0 when more
 * bytes are needed, or a negative code (the stream is broken). A late answer to a request
 * given up on earlier is skipped.
 */
static int take_reply(fs_store_client_t *c, uint32_t id, const char *what, fs__store_msg_t *reply,
                      int *status, fs_error_t *err)
{
    for (;;) {
        fs_error_t pe;
        int64_t n = fs__store_parse_frame(c->in.p + c->in_off, c->in.len - c->in_off, c->max_frame,
                                          c->args, FS__STORE_MAX_ARGS, reply, &pe);
        if (n < 0)
            return set_broken(c, err, FS_EPROTO, "store %s: bad reply from %s: %s", what, c->addr,
                              pe.msg);
        if (n == 0)
            return 0;
        if (reply->id != id) {
            c->in_off += (size_t)n;
            continue;
        }
        c->last_len = (size_t)n;
        *status = reply_status(reply, what, err);
        return 1;
    }
}

/* Room in c->in for the next read: compact, shrink an idle large buffer, grow. */
static int make_room(fs_store_client_t *c, const char *what, fs_error_t *err)
{
    if (c->in_off == c->in.len) {
        c->in_off = c->in.len = 0;
        if (c->in.cap > BUF_KEEP)
            fs__store_buf_free(&c->in);
    }
    fs_error_t e;
    if (fs__store_buf_make_room(&c->in, &c->in_off, 0, &e) < 0)
        return set_broken(c, err, FS_ENOMEM, "store %s: %s", what, e.msg);
    return FS_OK;
}

/* Receive what is there without blocking: FS_OK (maybe nothing), or the stream broke. */
static int recv_now(fs_store_client_t *c, const char *what, fs_error_t *err)
{
    ssize_t r = recv(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len, MSG_DONTWAIT);
    if (r > 0) {
        c->in.len += (size_t)r;
        return FS_OK;
    }
    if (r < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
        return FS_OK;
    if (atomic_load(&c->shut))
        return set_broken(c, err, FS_ECLOSED, "store client was closed during %s", what);
    if (r == 0)
        return set_broken(c, err, FS_ECLOSED,
                          "store %s: the server at %s closed the connection (launcher gone, "
                          "or it rejected the request)",
                          what, c->addr);
    return set_broken(c, err, FS_ECLOSED, "store %s: receiving from %s failed: %s", what, c->addr,
                      strerror(errno));
}

/* Sleep until c->fd is readable: FS_OK, or the call ends here (deadline, or a signal
   for an interruptible client's blocking op) with its request cancelled. */
static int wait_readable(fs_store_client_t *c, uint32_t id, int op, int64_t deadline, int64_t tmo,
                         const char *what, fs_error_t *err)
{
    for (;;) {
        struct pollfd p = {.fd = c->fd, .events = POLLIN};
        int pr = poll(&p, 1, fs__poll_timeout(deadline));
        if (pr > 0)
            return FS_OK;
        if (pr == 0) {
            send_cancel(c, id);
            return fs_error_set(err, FS_ETIMEOUT, "store %s timed out after %lld ms (store %s)",
                                what, (long long)tmo, c->addr);
        }
        if (errno != EINTR)
            return set_broken(c, err, FS_ESYS, "store %s: poll: %s", what, strerror(errno));
        if (c->interruptible && op_parks(op)) {
            send_cancel(c, id);
            return fs_error_set(err, FS_EINTR, "store %s interrupted by a signal", what);
        }
    }
}

/*
 * Send the frame in c->out (request `id`, op `op`) and wait for its reply.
 * On FS_OK *reply is filled, its args pointing into c->in until the next rpc.
 * An error reply from the server is returned as its code with its message.
 */
static int rpc(fs_store_client_t *c, uint32_t id, int op, int64_t deadline, int64_t tmo,
               const struct fs__what *w, fs__store_msg_t *reply, fs_error_t *err)
{
    char what[320];
    describe(what, sizeof what, w);
    c->in_off += c->last_len;
    c->last_len = 0;
    int rc = send_all(c, deadline, what, tmo, err);
    if (rc < 0)
        return rc;
    /* Spin briefly before sleeping (FS__STORE_SPIN_US): the reply is usually that close. */
    int64_t spin_until = fs__now_us() + FS__STORE_SPIN_US;
    for (;;) {
        int status = FS_OK;
        if ((rc = take_reply(c, id, what, reply, &status, err)) != 0)
            return rc < 0 ? rc : status;
        if ((rc = make_room(c, what, err)) < 0)
            return rc;
        if (fs__now_us() >= spin_until &&
            (rc = wait_readable(c, id, op, deadline, tmo, what, err)) < 0)
            return rc;
        if ((rc = recv_now(c, what, err)) < 0)
            return rc;
    }
}

/* Start a request frame in c->out. */
static int req_begin(fs_store_client_t *c, int op, uint32_t *id, size_t *start, fs_error_t *err)
{
    c->out.len = 0;
    if (c->out.cap > BUF_KEEP)
        fs__store_buf_free(&c->out);
    *id = ++c->next_id;
    return fs__store_frame_begin(&c->out, *id, op, start, err);
}

static int usable(fs_store_client_t *c, fs_error_t *err)
{
    if (atomic_load(&c->shut))
        return fs_error_set(err, FS_ECLOSED, "store client is closed");
    if (c->owner != getpid())
        return fs_error_set(err, FS_EINVAL,
                            "store client was connected in process %d and cannot be used in "
                            "process %d after fork: connect a new one",
                            (int)c->owner, (int)getpid());
    if (c->broken)
        return fs_error_set(err, c->broken, "store connection unusable after an earlier error: %s",
                            c->broken_msg);
    return FS_OK;
}

static int bad_reply(fs_store_client_t *c, const struct fs__what *w, fs_error_t *err)
{
    char what[320];
    describe(what, sizeof what, w);
    return set_broken(c, err, FS_EPROTO, "store %s: reply from %s has the wrong shape", what,
                      c->addr);
}

/* ------------------------------------------------------------------ */
/* Connect                                                            */
/* ------------------------------------------------------------------ */

static int hello(fs_store_client_t *c, const char *token, int64_t deadline, int64_t tmo,
                 fs_error_t *err)
{
    uint32_t id;
    size_t start;
    int rc;
    if ((rc = req_begin(c, FS__OP_HELLO, &id, &start, err)) < 0 ||
        (rc = fs__store_frame_arg(&c->out, start, FS__STORE_MAGIC, sizeof FS__STORE_MAGIC - 1,
                                  err)) < 0 ||
        (rc = fs__store_frame_arg(&c->out, start, token, strlen(token), err)) < 0)
        return rc;
    fs__store_frame_end(&c->out, start);
    fs__store_msg_t m;
    struct fs__what w = {FS__OP_HELLO, NULL, NULL, 0};
    c->max_frame = FS__STORE_HELLO_MAX_FRAME + 64; /* until we know the server's limit */
    rc = rpc(c, id, FS__OP_HELLO, deadline, tmo, &w, &m, err);
    if (rc == FS_EAUTH) {
        char why[FS_ERRMSG_LEN];
        memcpy(why, err->msg, sizeof why);
        return fs_error_set(err, FS_EAUTH, "store at %s refused the connection: %s", c->addr, why);
    }
    if (rc < 0)
        return rc;
    if (m.nargs != 1 || m.args[0].len != 8)
        return bad_reply(c, &w, err);
    uint64_t mv = fs__store_get_u64(m.args[0].p);
    if (mv == 0 || mv > UINT32_MAX)
        return bad_reply(c, &w, err);
    c->max_value = (size_t)mv;
    c->max_frame = fs__store_max_frame(c->max_value);
    return FS_OK;
}

static void reset_conn(fs_store_client_t *c)
{
    fs__closep(&c->fd); /* a failed attempt's socket: nothing to report */
    c->broken = 0;
    c->broken_msg[0] = '\0';
    c->in.len = c->in_off = c->last_len = 0;
    c->out.len = 0;
}

static int retryable(int code)
{
    return code == FS_ESYS || code == FS_ECLOSED;
}

static int check_connect_opts(const fs_store_client_opts_t *opts, fs_error_t *err)
{
    if (opts == NULL || opts->host == NULL || opts->host[0] == '\0')
        return fs_error_set(err, FS_EINVAL, "store connect: no host given");
    if (opts->token == NULL || opts->token[0] == '\0')
        return fs_error_set(err, FS_EINVAL,
                            "store connect: no token given (the launcher passes it in "
                            "FASTSPAWN_STORE_TOKEN)");
    if (strlen(opts->token) > FS_STORE_MAX_TOKEN)
        return fs_error_set(err, FS_EINVAL, "store connect: token longer than %u bytes",
                            FS_STORE_MAX_TOKEN);
    if (strncmp(opts->host, "unix:", 5) != 0 && (opts->port <= 0 || opts->port > 65535))
        return fs_error_set(err, FS_EINVAL, "store connect: port %d is outside 1..65535",
                            opts->port);
    return FS_OK;
}

/* A client object for opts, not connected yet; NULL when out of memory. */
static fs_store_client_t *client_new(const fs_store_client_opts_t *opts)
{
    fs_store_client_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->args = malloc(FS__STORE_MAX_ARGS * sizeof *c->args);
    if (c->args == NULL || pthread_mutex_init(&c->lock, NULL) != 0) {
        free(c->args);
        free(c);
        return NULL;
    }
    c->fd = -1;
    c->owner = getpid();
    atomic_init(&c->shut, 0);
    atomic_init(&c->timeout_ms,
                opts->timeout_ms > 0 ? opts->timeout_ms : FS_STORE_DEFAULT_CALL_TIMEOUT_MS);
    c->interruptible = opts->interruptible;
    c->max_value = FS_STORE_DEFAULT_MAX_VALUE;
    if (strncmp(opts->host, "unix:", 5) == 0)
        snprintf(c->addr, sizeof c->addr, "%s", opts->host);
    else if (strchr(opts->host, ':') != NULL)
        snprintf(c->addr, sizeof c->addr, "[%s]:%d", opts->host, opts->port);
    else
        snprintf(c->addr, sizeof c->addr, "%s:%d", opts->host, opts->port);
    return c;
}

int fs_store_connect(const fs_store_client_opts_t *opts, fs_store_client_t **out, fs_error_t *err)
{
    FS__ERR_OR_LOCAL(err);
    *out = NULL;
    int rc = check_connect_opts(opts, err);
    if (rc < 0)
        return rc;
    fs_store_client_t *c = client_new(opts);
    if (c == NULL)
        return fs_error_set(err, FS_ENOMEM, "store connect: out of memory");
    int64_t tmo = opts->connect_timeout_ms > 0 ? opts->connect_timeout_ms
                                               : FS_STORE_DEFAULT_CONNECT_TIMEOUT_MS;
    int64_t deadline = fs__deadline_ms(tmo), backoff = BACKOFF_FIRST_MS;
    for (int attempts = 1;; attempts++) {
        rc = fs__connect("store", opts->host, opts->port, deadline, c->addr, &c->fd, err);
        if (rc == FS_OK && (rc = hello(c, opts->token, deadline, tmo, err)) == FS_OK)
            break;
        if (!retryable(rc) && rc != FS_ETIMEOUT)
            goto fail;
        reset_conn(c);
        int64_t left = deadline - fs_now_ms();
        if (left <= 0 || rc == FS_ETIMEOUT) {
            char why[FS_ERRMSG_LEN];
            memcpy(why, err->msg, sizeof why);
            rc = fs_error_set(err, FS_ETIMEOUT,
                              "could not connect to the store at %s within %lld ms (%d attempts; "
                              "last error: %s). Is the launcher's store server running?",
                              c->addr, (long long)tmo, attempts, why);
            goto fail;
        }
        if (fs__sleep_ns((backoff < left ? backoff : left) * 1000000) < 0 && c->interruptible) {
            rc =
                fs_error_set(err, FS_EINTR, "store connect to %s interrupted by a signal", c->addr);
            goto fail;
        }
        backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
    }
    *out = c;
    return FS_OK;
fail:
    fs_store_close(c);
    return rc;
}

void fs_store_close(fs_store_client_t *c)
{
    if (c == NULL)
        return;
    (void)fs__close(c->fd); /* nothing useful to do with an error from closing a socket */
    fs__store_buf_free(&c->in);
    fs__store_buf_free(&c->out);
    free(c->args);
    (void)pthread_mutex_destroy(&c->lock); /* unlocked: cannot fail */
    free(c);
}

void fs_store_client_shutdown(fs_store_client_t *c)
{
    if (c == NULL || atomic_exchange(&c->shut, 1))
        return;
    /* Wakes a poll() blocked on fd in another thread; fd stays valid until fs_store_close. */
    if (c->fd >= 0 && c->owner == getpid() && shutdown(c->fd, SHUT_RDWR) < 0) {
        /* ENOTCONN: the peer is gone already; the calls fail on `shut` anyway. */
    }
}

void fs_store_client_set_timeout(fs_store_client_t *c, int64_t timeout_ms)
{
    atomic_store(&c->timeout_ms, timeout_ms < 0 ? 0 : timeout_ms);
}

int64_t fs_store_client_timeout(const fs_store_client_t *c)
{
    return atomic_load(&((fs_store_client_t *)c)->timeout_ms);
}

/* ------------------------------------------------------------------ */
/* One call                                                           */
/* ------------------------------------------------------------------ */

int fs__call_begin(struct fs__call *k, fs_store_client_t *c, int op, int64_t timeout_ms,
                   fs_error_t *err)
{
    int rc;
    k->c = c;
    k->w.op = op;
    if ((rc = fs__store_resolve_timeout(c, timeout_ms, &k->deadline, &k->tmo, err)) < 0 ||
        (rc = usable(c, err)) < 0)
        return rc;
    return req_begin(c, op, &k->id, &k->start, err);
}

int fs__call_arg(struct fs__call *k, const void *p, size_t n, fs_error_t *err)
{
    return fs__store_frame_arg(&k->c->out, k->start, p, n, err);
}

int fs__call_i64_arg(struct fs__call *k, int64_t v, fs_error_t *err)
{
    uint8_t b[8];
    fs__store_put_u64(b, (uint64_t)v);
    return fs__call_arg(k, b, 8, err);
}

int fs__call_run(struct fs__call *k, fs_error_t *err)
{
    fs__store_frame_end(&k->c->out, k->start);
    if (k->c->out.len - k->start > k->c->max_frame) {
        char what[320];
        describe(what, sizeof what, &k->w);
        return fs_error_set(err, FS_ETOOBIG,
                            "store %s: the request is %zu bytes, over the store's frame limit of "
                            "%zu; split it",
                            what, k->c->out.len - k->start, k->c->max_frame);
    }
    return rpc(k->c, k->id, k->w.op, k->deadline, k->tmo, &k->w, &k->reply, err);
}

/* The reply must carry n args; args with want_len >= 0 must have that length. */
int fs__call_reply_shape(struct fs__call *k, unsigned n, int want_len0, fs_error_t *err)
{
    if (k->reply.nargs != n ||
        (want_len0 >= 0 && n > 0 && k->reply.args[0].len != (uint32_t)want_len0))
        return bad_reply(k->c, &k->w, err);
    return FS_OK;
}
