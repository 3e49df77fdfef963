/*
 * store_client.c - the rendezvous store's client: connect with retry and
 * backoff, one request at a time per connection (calls are serialised by a
 * mutex), a deadline on every call, and the barrier helper.
 *
 * Every request carries an id. When a call gives up (deadline, signal) the
 * client sends CANCEL(id) so the server drops a parked request, and a reply
 * that still arrives for an old id is skipped by the next call.
 */
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stddef.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "store_proto.h"

#define READ_CHUNK ((size_t)64 << 10)
#define BUF_KEEP ((size_t)16 << 20) /* keep a receive buffer this big between calls */
#define SPIN_US 50                  /* poll for a reply this long before sleeping */
#define MISSING_CHECK_MS 2000 /* how long a timeout message may spend finding what is missing */

struct fs_store_client {
    int fd;
    pid_t owner;
    pthread_mutex_t lock;
    atomic_int shut;
    atomic_llong timeout_ms;
    int interruptible;
    int broken; /* the stream is unusable (why in broken_msg) */
    char broken_msg[FS_ERRMSG_LEN];
    uint32_t next_id;
    size_t max_value, max_frame;
    char addr[300];
    fs_store_buf_t out, in;
    size_t in_off, last_len; /* last_len: the reply frame handed out by the last rpc */
    fs_store_arg_t *args;
};

/* What a call is doing, for messages: "get('key')", "wait(['a', 'b'])". */
struct what {
    int op;
    const char *key;
    const char *const *keys;
    size_t n;
};

static void describe(char *out, size_t cap, const struct what *w)
{
    char kb[200];
    const char *name = fs_store_op_name(w->op);
    if (w->key != NULL) {
        fs_store_fmt_key(kb, sizeof kb, w->key, strlen(w->key));
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
        fs_store_fmt_key(kb, 64, w->keys[i], strlen(w->keys[i]));
        o += (size_t)snprintf(out + o, cap - o, "%s%s", i ? ", " : "", kb);
    }
    if (o + 3 < cap)
        snprintf(out + o, cap - o, "])");
}

/* ------------------------------------------------------------------ */
/* Deadlines and low-level I/O                                        */
/* ------------------------------------------------------------------ */

static int resolve_timeout(const fs_store_client_t *c, int64_t timeout_ms, int64_t *deadline,
                           int64_t *effective, fs_error_t *err)
{
    if (timeout_ms == FS_STORE_DEFAULT_TIMEOUT)
        timeout_ms = atomic_load(&((fs_store_client_t *)c)->timeout_ms);
    if (timeout_ms < 0)
        return fs_error_set(err, FS_EINVAL,
                            "store timeout must be >= 0 ms (or FS_STORE_DEFAULT_TIMEOUT), got %lld",
                            (long long)timeout_ms);
    *effective = timeout_ms;
    int64_t now = fs_now_ms();
    *deadline = timeout_ms > INT64_MAX - now ? INT64_MAX : now + timeout_ms;
    return FS_OK;
}

static int64_t now_us(void)
{
    struct timespec ts;
    (void)clock_gettime(CLOCK_MONOTONIC, &ts); /* cannot fail with this clock */
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int poll_ms(int64_t deadline)
{
    if (deadline == INT64_MAX)
        return -1;
    int64_t left = deadline - fs_now_ms();
    if (left <= 0)
        return 0;
    return left > INT_MAX ? INT_MAX : (int)left;
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
        int pr = poll(&p, 1, poll_ms(deadline));
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
    uint8_t f[FS_STORE_HDR + 8];
    fs_store_put_u32(f, sizeof f - 4);
    fs_store_put_u32(f + 4, id);
    f[8] = FS_OP_CANCEL;
    f[9] = 0;
    f[10] = 1;
    f[11] = 0;
    fs_store_put_u32(f + 12, 4);
    fs_store_put_u32(f + 16, id);
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
    return op == FS_OP_GET || op == FS_OP_WAIT || op == FS_OP_MULTI_GET;
}

/*
 * Send the frame in c->out (request `id`, op `op`) and wait for its reply.
 * On FS_OK *reply is filled, its args pointing into c->in until the next rpc.
 * An error reply from the server is returned as its code with its message.
 */
static int rpc(fs_store_client_t *c, uint32_t id, int op, int64_t deadline, int64_t tmo,
               const struct what *w, fs_store_msg_t *reply, fs_error_t *err)
{
    char what[320];
    describe(what, sizeof what, w);
    c->in_off += c->last_len;
    c->last_len = 0;
    int rc = send_all(c, deadline, what, tmo, err);
    if (rc < 0)
        return rc;
    int64_t spin_until = now_us() + SPIN_US;
    for (;;) {
        fs_error_t pe;
        int64_t n = fs_store_parse_frame(c->in.p + c->in_off, c->in.len - c->in_off, c->max_frame,
                                         c->args, FS_STORE_MAX_ARGS, reply, &pe);
        if (n < 0)
            return set_broken(c, err, FS_EPROTO, "store %s: bad reply from %s: %s", what, c->addr,
                              pe.msg);
        if (n > 0) {
            if (reply->id != id) { /* the late answer to a request we gave up on */
                c->in_off += (size_t)n;
                continue;
            }
            c->last_len = (size_t)n;
            if (reply->code == FS_OK)
                return FS_OK;
            int code = reply->code;
            if (code < FS_EINTR || code > FS_EINVAL)
                code = FS_EPROTO;
            if (reply->nargs >= 1)
                return fs_error_set(err, code, "%.*s", (int)reply->args[0].len,
                                    (const char *)reply->args[0].p);
            return fs_error_set(err, code, "store %s failed on the server: %s", what,
                                fs_status_name(code));
        }
        /* Need more bytes. */
        if (c->in_off == c->in.len) {
            c->in_off = c->in.len = 0;
            if (c->in.cap > BUF_KEEP)
                fs_store_buf_free(&c->in);
        } else if (c->in_off > 0) {
            memmove(c->in.p, c->in.p + c->in_off, c->in.len - c->in_off);
            c->in.len -= c->in_off;
            c->in_off = 0;
        }
        size_t want = READ_CHUNK;
        if (c->in.len >= 4) {
            size_t frame = (size_t)fs_store_get_u32(c->in.p) + 4;
            if (frame > c->in.len && frame - c->in.len > want)
                want = frame - c->in.len;
        }
        if (fs_store_buf_reserve(&c->in, want, err) < 0)
            return set_broken(c, err, FS_ENOMEM, "store %s: %s", what, err->msg);
        /* Spin briefly before sleeping: a reply usually comes within microseconds, and
         * waking a sleeping thread (an idle CPU, on a VM) costs tens of microseconds. */
        if (spin_until != 0) {
            ssize_t r = recv(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len, MSG_DONTWAIT);
            if (r > 0) {
                c->in.len += (size_t)r;
                continue;
            }
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) &&
                now_us() < spin_until)
                continue;
            spin_until = 0; /* out of time, or EOF / an error that the path below reports */
        }
        struct pollfd p = {.fd = c->fd, .events = POLLIN};
        int pr = poll(&p, 1, poll_ms(deadline));
        if (pr < 0) {
            if (errno != EINTR)
                return set_broken(c, err, FS_ESYS, "store %s: poll: %s", what, strerror(errno));
            if (c->interruptible && op_parks(op)) {
                send_cancel(c, id);
                return fs_error_set(err, FS_EINTR, "store %s interrupted by a signal", what);
            }
            continue;
        }
        if (pr == 0) {
            send_cancel(c, id);
            return fs_error_set(err, FS_ETIMEOUT, "store %s timed out after %lld ms (store %s)",
                                what, (long long)tmo, c->addr);
        }
        ssize_t r = recv(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len, MSG_DONTWAIT);
        if (r > 0) {
            c->in.len += (size_t)r;
            continue;
        }
        if (r < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
            continue;
        if (atomic_load(&c->shut))
            return set_broken(c, err, FS_ECLOSED, "store client was closed during %s", what);
        if (r == 0)
            return set_broken(c, err, FS_ECLOSED,
                              "store %s: the server at %s closed the connection (launcher gone, "
                              "or it rejected the request)",
                              what, c->addr);
        return set_broken(c, err, FS_ECLOSED, "store %s: receiving from %s failed: %s", what,
                          c->addr, strerror(errno));
    }
}

/* Start a request frame in c->out. */
static int req_begin(fs_store_client_t *c, int op, uint32_t *id, size_t *start, fs_error_t *err)
{
    c->out.len = 0;
    if (c->out.cap > BUF_KEEP)
        fs_store_buf_free(&c->out);
    *id = ++c->next_id;
    return fs_store_frame_begin(&c->out, *id, op, start, err);
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

static int check_key(const fs_store_client_t *c, const char *op, const char *key, fs_error_t *err)
{
    (void)c;
    if (key == NULL)
        return fs_error_set(err, FS_EINVAL, "store %s: key is NULL", op);
    size_t n = strlen(key);
    if (n > FS_STORE_MAX_KEY) {
        char kb[200];
        fs_store_fmt_key(kb, sizeof kb, key, n);
        return fs_error_set(err, FS_ETOOBIG, "store %s: key %s is %zu bytes; the limit is %u", op,
                            kb, n, FS_STORE_MAX_KEY);
    }
    return FS_OK;
}

static int check_value(const fs_store_client_t *c, const char *op, const char *key, size_t len,
                       fs_error_t *err)
{
    if (len > c->max_value) {
        char kb[200];
        fs_store_fmt_key(kb, sizeof kb, key, strlen(key));
        return fs_error_set(err, FS_ETOOBIG,
                            "store %s(%s): value of %zu bytes exceeds the store's limit of %zu", op,
                            kb, len, c->max_value);
    }
    return FS_OK;
}

static int check_keys(const fs_store_client_t *c, int op, const char *const *keys, size_t n,
                      fs_error_t *err)
{
    if (n > FS_STORE_MAX_KEYS)
        return fs_error_set(err, FS_ETOOBIG, "store %s: %zu keys; at most %u per call",
                            fs_store_op_name(op), n, FS_STORE_MAX_KEYS);
    if (n > 0 && keys == NULL)
        return fs_error_set(err, FS_EINVAL, "store %s: keys is NULL", fs_store_op_name(op));
    for (size_t i = 0; i < n; i++) {
        int rc = check_key(c, fs_store_op_name(op), keys[i], err);
        if (rc < 0)
            return rc;
    }
    return FS_OK;
}

/* Copy a reply argument into a malloc'd, NUL-terminated buffer. */
static int copy_out(const fs_store_arg_t *a, void **out, size_t *len, fs_error_t *err)
{
    char *p = malloc((size_t)a->len + 1);
    if (p == NULL)
        return fs_error_set(err, FS_ENOMEM, "store: out of memory for a %u-byte value", a->len);
    if (a->len > 0)
        memcpy(p, a->p, a->len);
    p[a->len] = '\0';
    *out = p;
    *len = a->len;
    return FS_OK;
}

static int bad_reply(fs_store_client_t *c, const struct what *w, fs_error_t *err)
{
    char what[320];
    describe(what, sizeof what, w);
    return set_broken(c, err, FS_EPROTO, "store %s: reply from %s has the wrong shape", what,
                      c->addr);
}

/* ------------------------------------------------------------------ */
/* Connect                                                            */
/* ------------------------------------------------------------------ */

/* Connect a non-blocking socket to one address before the deadline. */
static int connect_addr(fs_store_client_t *c, const struct sockaddr *sa, socklen_t len,
                        int64_t deadline, fs_error_t *err)
{
    int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return fs_error_sys(err, "store: socket");
    int one = 1;
    if (sa->sa_family != AF_UNIX &&
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) {
        fs_error_sys(err, "store: setsockopt(TCP_NODELAY)");
        (void)close(fd); /* a socket that never connected: nothing to report */
        return FS_ESYS;
    }
    int r = connect(fd, sa, len);
    if (r < 0 && errno == EINPROGRESS) {
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int pr;
        do {
            pr = poll(&p, 1, poll_ms(deadline));
        } while (pr < 0 && errno == EINTR);
        int soerr = 0;
        socklen_t sl = sizeof soerr;
        if (pr == 0) {
            errno = ETIMEDOUT;
            r = -1;
        } else if (pr < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0) {
            r = -1;
        } else if (soerr != 0) {
            errno = soerr;
            r = -1;
        } else {
            r = 0;
        }
    }
    if (r < 0) {
        /* ECONNREFUSED / ENOENT (not listening yet), EAGAIN (unix backlog full): retried. */
        fs_error_sys(err, "store: connecting to %s", c->addr);
        (void)close(fd);
        return FS_ESYS;
    }
    c->fd = fd;
    return FS_OK;
}

/* Open a connected socket; failures worth retrying return FS_ESYS. */
static int open_socket(fs_store_client_t *c, const char *host, int port, int64_t deadline,
                       fs_error_t *err)
{
    if (strncmp(host, "unix:", 5) == 0) {
        const char *path = host + 5;
        struct sockaddr_un un = {0};
        un.sun_family = AF_UNIX;
        size_t n = strlen(path);
        if (n == 0 || n >= sizeof un.sun_path)
            return fs_error_set(err, FS_EINVAL,
                                "store address '%s': unix path must be 1..%zu bytes", host,
                                sizeof un.sun_path - 1);
        socklen_t len;
        if (path[0] == '@') { /* abstract namespace: leading NUL, no terminator */
            memcpy(un.sun_path + 1, path + 1, n - 1);
            len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
        } else {
            memcpy(un.sun_path, path, n);
            len = (socklen_t)sizeof un;
        }
        return connect_addr(c, (struct sockaddr *)&un, len, deadline, err);
    }
    struct addrinfo hints = {0}, *res = NULL;
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    int gai = getaddrinfo(host, portstr, &hints, &res);
    if (gai != 0)
        return fs_error_set(err, FS_ESYS, "store: cannot resolve '%s': %s", host,
                            gai_strerror(gai));
    int rc = FS_ESYS;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        rc = connect_addr(c, ai->ai_addr, ai->ai_addrlen, deadline, err);
        if (rc == FS_OK)
            break;
    }
    freeaddrinfo(res);
    return rc;
}

static int hello(fs_store_client_t *c, const char *token, int64_t deadline, int64_t tmo,
                 fs_error_t *err)
{
    uint32_t id;
    size_t start;
    int rc;
    if ((rc = req_begin(c, FS_OP_HELLO, &id, &start, err)) < 0 ||
        (rc = fs_store_frame_arg(&c->out, start, FS_STORE_MAGIC, sizeof FS_STORE_MAGIC - 1, err)) <
            0 ||
        (rc = fs_store_frame_arg(&c->out, start, token, strlen(token), err)) < 0)
        return rc;
    fs_store_frame_end(&c->out, start);
    fs_store_msg_t m;
    struct what w = {FS_OP_HELLO, NULL, NULL, 0};
    c->max_frame = FS_STORE_HELLO_MAX_FRAME + 64; /* until we know the server's limit */
    rc = rpc(c, id, FS_OP_HELLO, deadline, tmo, &w, &m, err);
    if (rc == FS_EAUTH) {
        char why[FS_ERRMSG_LEN];
        memcpy(why, err->msg, sizeof why);
        return fs_error_set(err, FS_EAUTH, "store at %s refused the connection: %s", c->addr, why);
    }
    if (rc < 0)
        return rc;
    if (m.nargs != 1 || m.args[0].len != 8)
        return bad_reply(c, &w, err);
    uint64_t mv = fs_store_get_u64(m.args[0].p);
    if (mv == 0 || mv > UINT32_MAX)
        return bad_reply(c, &w, err);
    c->max_value = (size_t)mv;
    c->max_frame = fs_store_max_frame(c->max_value);
    return FS_OK;
}

static void reset_conn(fs_store_client_t *c)
{
    if (c->fd >= 0)
        (void)close(c->fd); /* a failed attempt's socket: nothing to report */
    c->fd = -1;
    c->broken = 0;
    c->broken_msg[0] = '\0';
    c->in.len = c->in_off = c->last_len = 0;
    c->out.len = 0;
}

static int retryable(int code)
{
    return code == FS_ESYS || code == FS_ECLOSED;
}

int fs_store_connect(const fs_store_client_opts_t *opts, fs_store_client_t **out, fs_error_t *err)
{
    *out = NULL;
    if (opts == NULL || opts->host == NULL || opts->host[0] == '\0')
        return fs_error_set(err, FS_EINVAL, "store connect: no host given");
    if (opts->token == NULL || opts->token[0] == '\0')
        return fs_error_set(err, FS_EINVAL,
                            "store connect: no token given (the launcher passes it in "
                            "FASTSPAWN_STORE_TOKEN)");
    if (strlen(opts->token) > FS_STORE_MAX_TOKEN)
        return fs_error_set(err, FS_EINVAL, "store connect: token longer than %u bytes",
                            FS_STORE_MAX_TOKEN);
    int is_unix = strncmp(opts->host, "unix:", 5) == 0;
    if (!is_unix && (opts->port <= 0 || opts->port > 65535))
        return fs_error_set(err, FS_EINVAL, "store connect: port %d is outside 1..65535",
                            opts->port);
    fs_store_client_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return fs_error_set(err, FS_ENOMEM, "store connect: out of memory");
    c->args = malloc(FS_STORE_MAX_ARGS * sizeof *c->args);
    int prc = pthread_mutex_init(&c->lock, NULL);
    if (c->args == NULL || prc != 0) {
        free(c->args);
        if (prc == 0)
            pthread_mutex_destroy(&c->lock);
        free(c);
        return fs_error_set(err, FS_ENOMEM, "store connect: out of memory");
    }
    c->fd = -1;
    c->owner = getpid();
    atomic_init(&c->shut, 0);
    atomic_init(&c->timeout_ms, opts->timeout_ms > 0 ? opts->timeout_ms : 300000);
    c->interruptible = opts->interruptible;
    c->max_value = FS_STORE_DEFAULT_MAX_VALUE;
    if (is_unix)
        snprintf(c->addr, sizeof c->addr, "%s", opts->host);
    else if (strchr(opts->host, ':') != NULL)
        snprintf(c->addr, sizeof c->addr, "[%s]:%d", opts->host, opts->port);
    else
        snprintf(c->addr, sizeof c->addr, "%s:%d", opts->host, opts->port);

    int64_t tmo = opts->connect_timeout_ms > 0 ? opts->connect_timeout_ms : 60000;
    int64_t start = fs_now_ms();
    int64_t deadline = tmo > INT64_MAX - start ? INT64_MAX : start + tmo;
    int64_t backoff = 10;
    int attempts = 0, rc;
    for (;;) {
        attempts++;
        rc = open_socket(c, opts->host, opts->port, deadline, err);
        if (rc == FS_OK)
            rc = hello(c, opts->token, deadline, tmo, err);
        if (rc == FS_OK)
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
        int64_t nap = backoff < left ? backoff : left;
        struct timespec ts = {nap / 1000, (long)(nap % 1000) * 1000000L};
        if (nanosleep(&ts, NULL) < 0 && errno == EINTR && c->interruptible) {
            rc =
                fs_error_set(err, FS_EINTR, "store connect to %s interrupted by a signal", c->addr);
            goto fail;
        }
        backoff = backoff * 2 > 1000 ? 1000 : backoff * 2;
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
    if (c->fd >= 0)
        (void)close(c->fd); /* nothing useful to do with an error from closing a socket */
    fs_store_buf_free(&c->in);
    fs_store_buf_free(&c->out);
    free(c->args);
    pthread_mutex_destroy(&c->lock);
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
/* Operations                                                         */
/* ------------------------------------------------------------------ */

/* Everything a call needs between lock and unlock. */
struct call {
    fs_store_client_t *c;
    struct what w;
    int64_t deadline, tmo;
    uint32_t id;
    size_t start;
    fs_store_msg_t reply;
};

static int call_begin(struct call *k, fs_store_client_t *c, int op, int64_t timeout_ms,
                      fs_error_t *err)
{
    int rc;
    k->c = c;
    k->w.op = op;
    if ((rc = resolve_timeout(c, timeout_ms, &k->deadline, &k->tmo, err)) < 0 ||
        (rc = usable(c, err)) < 0)
        return rc;
    return req_begin(c, op, &k->id, &k->start, err);
}

static int call_arg(struct call *k, const void *p, size_t n, fs_error_t *err)
{
    return fs_store_frame_arg(&k->c->out, k->start, p, n, err);
}

static int call_i64_arg(struct call *k, int64_t v, fs_error_t *err)
{
    uint8_t b[8];
    fs_store_put_u64(b, (uint64_t)v);
    return call_arg(k, b, 8, err);
}

static int call_run(struct call *k, fs_error_t *err)
{
    fs_store_frame_end(&k->c->out, k->start);
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
static int reply_shape(struct call *k, unsigned n, int want_len0, fs_error_t *err)
{
    if (k->reply.nargs != n ||
        (want_len0 >= 0 && n > 0 && k->reply.args[0].len != (uint32_t)want_len0))
        return bad_reply(k->c, &k->w, err);
    return FS_OK;
}

static int set_locked(fs_store_client_t *c, int op, const char *key, const void *val, size_t len,
                      int64_t timeout_ms, fs_error_t *err)
{
    struct call k = {.w = {op, key, NULL, 0}};
    int rc;
    if ((rc = check_key(c, fs_store_op_name(op), key, err)) < 0 ||
        (rc = check_value(c, fs_store_op_name(op), key, len, err)) < 0 ||
        (rc = call_begin(&k, c, op, timeout_ms, err)) < 0 ||
        (rc = call_arg(&k, key, strlen(key), err)) < 0 || (rc = call_arg(&k, val, len, err)) < 0 ||
        (rc = call_run(&k, err)) < 0)
        return rc;
    return reply_shape(&k, 0, -1, err);
}

int fs_store_set(fs_store_client_t *c, const char *key, const void *val, size_t len,
                 int64_t timeout_ms, fs_error_t *err)
{
    pthread_mutex_lock(&c->lock);
    int rc = set_locked(c, FS_OP_SET, key, val, len, timeout_ms, err);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

int fs_store_append(fs_store_client_t *c, const char *key, const void *val, size_t len,
                    int64_t timeout_ms, fs_error_t *err)
{
    pthread_mutex_lock(&c->lock);
    int rc = set_locked(c, FS_OP_APPEND, key, val, len, timeout_ms, err);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

static int get_view_locked(fs_store_client_t *c, const char *key, const void **val, size_t *len,
                           int64_t timeout_ms, fs_error_t *err)
{
    struct call k = {.w = {FS_OP_GET, key, NULL, 0}};
    int rc;
    if ((rc = check_key(c, "get", key, err)) < 0 ||
        (rc = call_begin(&k, c, FS_OP_GET, timeout_ms, err)) < 0 ||
        (rc = call_arg(&k, key, strlen(key), err)) < 0)
        return rc;
    rc = call_run(&k, err);
    if (rc == FS_ETIMEOUT) {
        char kb[200], why[FS_ERRMSG_LEN];
        fs_store_fmt_key(kb, sizeof kb, key, strlen(key));
        memcpy(why, err->msg, sizeof why);
        return fs_error_set(err, FS_ETIMEOUT, "%s: key %s was never set", why, kb);
    }
    if (rc < 0 || (rc = reply_shape(&k, 1, -1, err)) < 0)
        return rc;
    *val = k.reply.args[0].p;
    *len = k.reply.args[0].len;
    return FS_OK;
}

int fs_store_get_view(fs_store_client_t *c, const char *key, const void **val, size_t *len,
                      int64_t timeout_ms, fs_error_t *err)
{
    pthread_mutex_lock(&c->lock);
    int rc = get_view_locked(c, key, val, len, timeout_ms, err);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

int fs_store_get(fs_store_client_t *c, const char *key, void **val, size_t *len, int64_t timeout_ms,
                 fs_error_t *err)
{
    const void *p = NULL;
    size_t n = 0;
    pthread_mutex_lock(&c->lock);
    int rc = get_view_locked(c, key, &p, &n, timeout_ms, err);
    if (rc == FS_OK) {
        fs_store_arg_t a = {p, (uint32_t)n};
        rc = copy_out(&a, val, len, err);
    }
    pthread_mutex_unlock(&c->lock);
    return rc;
}

static int add_locked(fs_store_client_t *c, const char *key, int64_t delta, int64_t *result,
                      int64_t timeout_ms, fs_error_t *err)
{
    struct call k = {.w = {FS_OP_ADD, key, NULL, 0}};
    int rc;
    if ((rc = check_key(c, "add", key, err)) < 0 ||
        (rc = call_begin(&k, c, FS_OP_ADD, timeout_ms, err)) < 0 ||
        (rc = call_arg(&k, key, strlen(key), err)) < 0 || (rc = call_i64_arg(&k, delta, err)) < 0 ||
        (rc = call_run(&k, err)) < 0 || (rc = reply_shape(&k, 1, 8, err)) < 0)
        return rc;
    if (result != NULL)
        *result = (int64_t)fs_store_get_u64(k.reply.args[0].p);
    return FS_OK;
}

int fs_store_add(fs_store_client_t *c, const char *key, int64_t delta, int64_t *result,
                 int64_t timeout_ms, fs_error_t *err)
{
    pthread_mutex_lock(&c->lock);
    int rc = add_locked(c, key, delta, result, timeout_ms, err);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

int fs_store_compare_set(fs_store_client_t *c, const char *key, const void *expected,
                         size_t expected_len, const void *desired, size_t desired_len, void **cur,
                         size_t *cur_len, int64_t timeout_ms, fs_error_t *err)
{
    struct call k = {.w = {FS_OP_CAS, key, NULL, 0}};
    int rc;
    pthread_mutex_lock(&c->lock);
    if ((rc = check_key(c, "compare_set", key, err)) < 0 ||
        (rc = check_value(c, "compare_set", key, expected_len, err)) < 0 ||
        (rc = check_value(c, "compare_set", key, desired_len, err)) < 0 ||
        (rc = call_begin(&k, c, FS_OP_CAS, timeout_ms, err)) < 0 ||
        (rc = call_arg(&k, key, strlen(key), err)) < 0 ||
        (rc = call_arg(&k, expected, expected_len, err)) < 0 ||
        (rc = call_arg(&k, desired, desired_len, err)) < 0 || (rc = call_run(&k, err)) < 0 ||
        (rc = reply_shape(&k, 1, -1, err)) < 0)
        goto out;
    rc = copy_out(&k.reply.args[0], cur, cur_len, err);
out:
    pthread_mutex_unlock(&c->lock);
    return rc;
}

/* present[i] for up to FS_STORE_MAX_KEYS keys, one request. */
static int check_chunk(fs_store_client_t *c, const char *const *keys, size_t n, uint8_t *present,
                       int64_t timeout_ms, fs_error_t *err)
{
    struct call k = {.w = {FS_OP_CHECK, NULL, keys, n}};
    int rc;
    if ((rc = check_keys(c, FS_OP_CHECK, keys, n, err)) < 0 ||
        (rc = call_begin(&k, c, FS_OP_CHECK, timeout_ms, err)) < 0)
        return rc;
    for (size_t i = 0; i < n; i++)
        if ((rc = call_arg(&k, keys[i], strlen(keys[i]), err)) < 0)
            return rc;
    if ((rc = call_run(&k, err)) < 0 || (rc = reply_shape(&k, 1, (int)n, err)) < 0)
        return rc;
    memcpy(present, k.reply.args[0].p, n);
    return FS_OK;
}

static int check_each_locked(fs_store_client_t *c, const char *const *keys, size_t n,
                             uint8_t *present, int64_t timeout_ms, fs_error_t *err)
{
    int64_t deadline = 0, tmo = 0;
    int rc = resolve_timeout(c, timeout_ms, &deadline, &tmo, err);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < n; i += FS_STORE_MAX_KEYS) {
        size_t m = n - i < FS_STORE_MAX_KEYS ? n - i : FS_STORE_MAX_KEYS;
        int64_t left = deadline == INT64_MAX ? FS_STORE_NO_TIMEOUT : deadline - fs_now_ms();
        if ((rc = check_chunk(c, keys + i, m, present + i, left < 0 ? 0 : left, err)) < 0)
            return rc;
    }
    return FS_OK;
}

int fs_store_check_each(fs_store_client_t *c, const char *const *keys, size_t n, uint8_t *present,
                        int64_t timeout_ms, fs_error_t *err)
{
    pthread_mutex_lock(&c->lock);
    int rc = check_each_locked(c, keys, n, present, timeout_ms, err);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

int fs_store_check(fs_store_client_t *c, const char *const *keys, size_t n, int *all,
                   int64_t timeout_ms, fs_error_t *err)
{
    uint8_t stack[64];
    uint8_t *present = n <= sizeof stack ? stack : malloc(n);
    if (present == NULL)
        return fs_error_set(err, FS_ENOMEM, "store check: out of memory for %zu keys", n);
    int rc = fs_store_check_each(c, keys, n, present, timeout_ms, err);
    if (rc == FS_OK) {
        *all = 1;
        for (size_t i = 0; i < n; i++)
            if (!present[i])
                *all = 0;
    }
    if (present != stack)
        free(present);
    return rc;
}

/* After a timed-out wait / multi_get: append which keys are still missing to err. */
static void name_missing(fs_store_client_t *c, const char *const *keys, size_t n, fs_error_t *err)
{
    uint8_t *present = malloc(n ? n : 1);
    fs_error_t e;
    if (present == NULL || c->broken ||
        check_each_locked(c, keys, n, present, MISSING_CHECK_MS, &e) < 0) {
        free(present);
        return;
    }
    size_t used = strlen(err->msg), missing = 0;
    for (size_t i = 0; i < n; i++)
        missing += !present[i];
    int w =
        snprintf(err->msg + used, sizeof err->msg - used, "; %zu of %zu keys missing:", missing, n);
    used += w > 0 ? (size_t)w : 0;
    for (size_t i = 0; i < n && used + 16 < sizeof err->msg; i++) {
        if (present[i])
            continue;
        char kb[128];
        fs_store_fmt_key(kb, sizeof kb, keys[i], strlen(keys[i]));
        if (used + strlen(kb) + 8 >= sizeof err->msg) {
            snprintf(err->msg + used, sizeof err->msg - used, " ...");
            break;
        }
        w = snprintf(err->msg + used, sizeof err->msg - used, " %s", kb);
        used += w > 0 ? (size_t)w : 0;
    }
    free(present);
}

/* wait, or multi_get with views of the values (valid until the next call on c). */
static int wait_locked(fs_store_client_t *c, int op, const char *const *keys, size_t n,
                       const void **vals, size_t *lens, int64_t timeout_ms, fs_error_t *err)
{
    struct call k = {.w = {op, NULL, keys, n}};
    int rc;
    if ((rc = check_keys(c, op, keys, n, err)) < 0 ||
        (rc = call_begin(&k, c, op, timeout_ms, err)) < 0)
        return rc;
    for (size_t i = 0; i < n; i++)
        if ((rc = call_arg(&k, keys[i], strlen(keys[i]), err)) < 0)
            return rc;
    rc = call_run(&k, err);
    if (rc == FS_ETIMEOUT) {
        name_missing(c, keys, n, err);
        return FS_ETIMEOUT;
    }
    if (rc < 0)
        return rc;
    if (op == FS_OP_WAIT)
        return reply_shape(&k, 0, -1, err);
    if ((rc = reply_shape(&k, (unsigned)n, -1, err)) < 0)
        return rc;
    for (size_t i = 0; i < n; i++) {
        vals[i] = k.reply.args[i].p;
        lens[i] = k.reply.args[i].len;
    }
    return FS_OK;
}

int fs_store_wait(fs_store_client_t *c, const char *const *keys, size_t n, int64_t timeout_ms,
                  fs_error_t *err)
{
    pthread_mutex_lock(&c->lock);
    int rc = wait_locked(c, FS_OP_WAIT, keys, n, NULL, NULL, timeout_ms, err);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

int fs_store_multi_get_view(fs_store_client_t *c, const char *const *keys, size_t n,
                            const void **vals, size_t *lens, int64_t timeout_ms, fs_error_t *err)
{
    pthread_mutex_lock(&c->lock);
    int rc = wait_locked(c, FS_OP_MULTI_GET, keys, n, vals, lens, timeout_ms, err);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

int fs_store_multi_get(fs_store_client_t *c, const char *const *keys, size_t n, void **vals,
                       size_t *lens, int64_t timeout_ms, fs_error_t *err)
{
    const void *stack[16];
    const void **views = n <= 16 ? stack : malloc(n * sizeof *views);
    if (views == NULL)
        return fs_error_set(err, FS_ENOMEM, "store multi_get: out of memory for %zu keys", n);
    pthread_mutex_lock(&c->lock);
    int rc = wait_locked(c, FS_OP_MULTI_GET, keys, n, views, lens, timeout_ms, err);
    for (size_t i = 0; rc == FS_OK && i < n; i++) {
        fs_store_arg_t a = {views[i], (uint32_t)lens[i]};
        if ((rc = copy_out(&a, &vals[i], &lens[i], err)) < 0) {
            for (size_t j = 0; j < i; j++) {
                free(vals[j]);
                vals[j] = NULL;
            }
        }
    }
    pthread_mutex_unlock(&c->lock);
    if (views != stack)
        free(views);
    return rc;
}

int fs_store_multi_set(fs_store_client_t *c, const char *const *keys, const void *const *vals,
                       const size_t *lens, size_t n, int64_t timeout_ms, fs_error_t *err)
{
    struct call k = {.w = {FS_OP_MULTI_SET, NULL, keys, n}};
    int rc;
    pthread_mutex_lock(&c->lock);
    if ((rc = check_keys(c, FS_OP_MULTI_SET, keys, n, err)) < 0)
        goto out;
    for (size_t i = 0; i < n; i++)
        if ((rc = check_value(c, "multi_set", keys[i], lens[i], err)) < 0)
            goto out;
    if ((rc = call_begin(&k, c, FS_OP_MULTI_SET, timeout_ms, err)) < 0)
        goto out;
    for (size_t i = 0; i < n; i++)
        if ((rc = call_arg(&k, keys[i], strlen(keys[i]), err)) < 0 ||
            (rc = call_arg(&k, vals[i], lens[i], err)) < 0)
            goto out;
    if ((rc = call_run(&k, err)) < 0)
        goto out;
    rc = reply_shape(&k, 0, -1, err);
out:
    pthread_mutex_unlock(&c->lock);
    return rc;
}

int fs_store_delete(fs_store_client_t *c, const char *key, int *deleted, int64_t timeout_ms,
                    fs_error_t *err)
{
    struct call k = {.w = {FS_OP_DELETE, key, NULL, 0}};
    int rc;
    pthread_mutex_lock(&c->lock);
    if ((rc = check_key(c, "delete_key", key, err)) == FS_OK &&
        (rc = call_begin(&k, c, FS_OP_DELETE, timeout_ms, err)) == FS_OK &&
        (rc = call_arg(&k, key, strlen(key), err)) == FS_OK && (rc = call_run(&k, err)) == FS_OK &&
        (rc = reply_shape(&k, 1, 8, err)) == FS_OK && deleted != NULL)
        *deleted = fs_store_get_u64(k.reply.args[0].p) != 0;
    pthread_mutex_unlock(&c->lock);
    return rc;
}

int fs_store_num_keys(fs_store_client_t *c, int64_t *n, int64_t timeout_ms, fs_error_t *err)
{
    struct call k = {.w = {FS_OP_NUM_KEYS, NULL, NULL, 0}};
    int rc;
    pthread_mutex_lock(&c->lock);
    if ((rc = call_begin(&k, c, FS_OP_NUM_KEYS, timeout_ms, err)) == FS_OK &&
        (rc = call_run(&k, err)) == FS_OK && (rc = reply_shape(&k, 1, 8, err)) == FS_OK)
        *n = (int64_t)fs_store_get_u64(k.reply.args[0].p);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Barrier                                                            */
/* ------------------------------------------------------------------ */

static int64_t left_of(int64_t deadline)
{
    if (deadline == INT64_MAX)
        return FS_STORE_NO_TIMEOUT;
    int64_t left = deadline - fs_now_ms();
    return left < 0 ? 0 : left;
}

/* Append "missing ranks: 1, 3-5, 9" for the ranks with no arrived key. */
static void name_missing_ranks(fs_store_client_t *c, const char *name, int world_size,
                               fs_error_t *err)
{
    size_t klen = strlen(name) + 32;
    char **keys = calloc((size_t)world_size, sizeof *keys);
    char *kbuf = malloc((size_t)world_size * klen);
    uint8_t *present = malloc((size_t)world_size);
    fs_error_t e;
    if (keys == NULL || kbuf == NULL || present == NULL)
        goto out;
    for (int r = 0; r < world_size; r++) {
        keys[r] = kbuf + (size_t)r * klen;
        snprintf(keys[r], klen, "%s/arrived/%d", name, r);
    }
    if (c->broken || check_each_locked(c, (const char *const *)keys, (size_t)world_size, present,
                                       MISSING_CHECK_MS, &e) < 0)
        goto out;
    int arrived = 0;
    for (int r = 0; r < world_size; r++)
        arrived += present[r] != 0;
    size_t used = strlen(err->msg);
    int w = snprintf(err->msg + used, sizeof err->msg - used,
                     ": %d of %d ranks arrived; missing ranks:", arrived, world_size);
    used += w > 0 ? (size_t)w : 0;
    const char *sep = " ";
    for (int r = 0; r < world_size; r++) {
        if (present[r])
            continue;
        int end = r;
        while (end + 1 < world_size && !present[end + 1])
            end++;
        if (used + 32 >= sizeof err->msg) {
            snprintf(err->msg + used, sizeof err->msg - used, ", ...");
            break;
        }
        if (end == r)
            w = snprintf(err->msg + used, sizeof err->msg - used, "%s%d", sep, r);
        else
            w = snprintf(err->msg + used, sizeof err->msg - used, "%s%d-%d", sep, r, end);
        used += w > 0 ? (size_t)w : 0;
        sep = ", ";
        r = end;
    }
out:
    free(keys);
    free(kbuf);
    free(present);
}

int fs_store_barrier(fs_store_client_t *c, const char *name, int world_size, int rank,
                     int64_t timeout_ms, fs_error_t *err)
{
    if (name == NULL || strlen(name) + 32 > FS_STORE_MAX_KEY)
        return fs_error_set(err, FS_EINVAL, "store barrier: name must be 1..%u bytes",
                            FS_STORE_MAX_KEY - 32);
    if (world_size < 1 || rank < 0 || rank >= world_size)
        return fs_error_set(
            err, FS_EINVAL,
            "store barrier '%s': rank %d is outside 0..world_size-1 (world_size %d)", name, rank,
            world_size);
    int64_t deadline = 0, tmo = 0;
    int rc = resolve_timeout(c, timeout_ms, &deadline, &tmo, err);
    if (rc < 0)
        return rc;
    size_t klen = strlen(name) + 32;
    char *arrived = malloc(klen), *count = malloc(klen), *done = malloc(klen);
    if (arrived == NULL || count == NULL || done == NULL) {
        rc = fs_error_set(err, FS_ENOMEM, "store barrier: out of memory");
        goto out;
    }
    snprintf(arrived, klen, "%s/arrived/%d", name, rank);
    snprintf(count, klen, "%s/count", name);
    snprintf(done, klen, "%s/done", name);
    pthread_mutex_lock(&c->lock);
    /* Counting our arrival key first makes a retry (after FS_EINTR) count us once only. */
    int64_t mine = 0, n = 0;
    if ((rc = add_locked(c, arrived, 1, &mine, left_of(deadline), err)) < 0)
        goto unlock;
    if (mine == 1) {
        if ((rc = add_locked(c, count, 1, &n, left_of(deadline), err)) < 0)
            goto unlock;
        if (n > world_size) {
            rc = fs_error_set(err, FS_EMISMATCH,
                              "store barrier '%s': %lld ranks arrived but world_size is %d (is the "
                              "name reused, or do ranks disagree on world_size?)",
                              name, (long long)n, world_size);
            goto unlock;
        }
        if (n == world_size &&
            (rc = set_locked(c, FS_OP_SET, done, "1", 1, left_of(deadline), err)) < 0)
            goto unlock;
    }
    const char *keys[1] = {done};
    rc = wait_locked(c, FS_OP_WAIT, keys, 1, NULL, NULL, left_of(deadline), err);
    if (rc == FS_ETIMEOUT) {
        fs_error_set(err, FS_ETIMEOUT, "store barrier '%s' (rank %d) timed out after %lld ms", name,
                     rank, (long long)tmo);
        name_missing_ranks(c, name, world_size, err);
    }
unlock:
    pthread_mutex_unlock(&c->lock);
out:
    free(arrived);
    free(count);
    free(done);
    return rc;
}
