/*
 * test_store.c - the rendezvous store (store_*.c, net.c): every op, limits, parked
 * requests, timeouts, auth, malformed frames, disconnects, concurrency, fork.
 * Sleeps here are the delays under test (a late set, a late server), never a way to
 * wait for another thread or process: those are pipes and replies.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

#include "fastspawn.h"
#include "fs_test.h"
#include "store_proto.h"
#include "store_server.h" /* the output and parked limits */

#define TOKEN "test-token-0123456789"

static fs_store_server_t *start_server(size_t max_value, const char *unix_path)
{
    fs_store_server_opts_t o = {0};
    fs_error_t err;
    fs_store_server_t *s = NULL;
    o.token = TOKEN;
    o.max_value_size = max_value;
    o.unix_path = unix_path;
    o.auth_timeout_ms = 1000;
    int rc = fs_store_server_start(&o, &s, &err);
    if (rc != FS_OK) {
        fprintf(stderr, "  server start failed: %s\n", err.msg);
        exit(1);
    }
    return s;
}

static fs_store_client_t *connect_to(fs_store_server_t *s, const char *token, int *rc_out,
                                     fs_error_t *err)
{
    fs_store_client_opts_t o = {0};
    fs_store_client_t *c = NULL;
    o.host = fs_store_server_host(s);
    o.port = fs_store_server_port(s);
    o.token = token;
    o.connect_timeout_ms = 5000;
    o.timeout_ms = 10000;
    int rc = fs_store_connect(&o, &c, err);
    if (rc_out != NULL)
        *rc_out = rc;
    return c;
}

static fs_store_client_t *client(fs_store_server_t *s)
{
    fs_error_t err;
    int rc;
    fs_store_client_t *c = connect_to(s, TOKEN, &rc, &err);
    if (rc != FS_OK) {
        fprintf(stderr, "  connect failed: %s\n", err.msg);
        exit(1);
    }
    return c;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static int get_str(fs_store_client_t *c, const char *key, char *out, size_t cap, int64_t tmo,
                   fs_error_t *err)
{
    void *v = NULL;
    size_t n = 0;
    int rc = fs_store_get(c, key, &v, &n, tmo, err);
    if (rc == FS_OK) {
        snprintf(out, cap, "%.*s", (int)n, (const char *)v);
        free(v);
    }
    return rc;
}

/* A raw TCP socket to the server (blocking). */
static int raw_connect(fs_store_server_t *s)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)fs_store_server_port(s));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        perror("raw connect");
        exit(1);
    }
    return fd;
}

static void raw_send(int fd, const void *p, size_t n)
{
    const uint8_t *b = p;
    while (n > 0) {
        ssize_t r = send(fd, b, n, MSG_NOSIGNAL);
        if (r <= 0)
            return; /* the server may have closed it: that is what some tests want */
        b += r;
        n -= (size_t)r;
    }
}

/* Build a frame with the proto helpers. */
static void frame(fs__store_buf_t *b, uint32_t id, int code, int nargs, const char **args)
{
    size_t start;
    fs_error_t e;
    b->len = 0;
    fs__store_frame_begin(b, id, code, &start, &e);
    for (int i = 0; i < nargs; i++)
        fs__store_frame_arg(b, start, args[i], strlen(args[i]), &e);
    fs__store_frame_end(b, start);
}

static void raw_hello(int fd)
{
    fs__store_buf_t b = {0};
    const char *args[2] = {FS__STORE_MAGIC, TOKEN};
    frame(&b, 1, FS__OP_HELLO, 2, args);
    raw_send(fd, b.p, b.len);
    uint8_t reply[64];
    ssize_t r = recv(fd, reply, sizeof reply, 0);
    FS_CHECK(r > 0);
    fs__store_buf_free(&b);
}

/* 1 when the server closed fd (recv sees EOF or reset within 2 s). */
static int raw_closed(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int64_t end = fs_now_ms() + 2000;
    while (fs_now_ms() < end) {
        if (poll(&p, 1, 100) > 0) {
            uint8_t buf[4096];
            ssize_t r = recv(fd, buf, sizeof buf, 0);
            if (r <= 0)
                return 1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ */

FS_TEST(test_parse_frame)
{
    fs__store_buf_t b = {0};
    const char *args[2] = {"key", "value"};
    frame(&b, 7, FS__OP_SET, 2, args);
    fs__store_arg_t a[8];
    fs__store_msg_t m;
    fs_error_t e;
    FS_CHECK_EQ(fs__store_parse_frame(b.p, b.len, 1 << 20, a, 8, &m, &e), (int64_t)b.len);
    FS_CHECK_EQ(m.id, 7);
    FS_CHECK_EQ(m.code, FS__OP_SET);
    FS_CHECK_EQ(m.nargs, 2);
    FS_CHECK(m.args[1].len == 5 && memcmp(m.args[1].p, "value", 5) == 0);
    FS_CHECK_EQ(fs__store_check_request(&m, 1 << 20, &e), FS_OK);
    /* Every prefix is "need more". */
    for (size_t i = 0; i < b.len; i++)
        FS_CHECK_EQ(fs__store_parse_frame(b.p, i, 1 << 20, a, 8, &m, &e), 0);
    /* Oversized length is rejected from the 4 length bytes alone. */
    uint8_t big[4];
    fs__store_put_u32(big, 100u << 20);
    FS_CHECK_EQ(fs__store_parse_frame(big, 4, 1 << 20, a, 8, &m, &e), FS_ETOOBIG);
    /* An argument running past the frame. */
    fs__store_put_u32(b.p + FS__STORE_HDR, 1000);
    FS_CHECK_EQ(fs__store_parse_frame(b.p, b.len, 1 << 20, a, 8, &m, &e), FS_EPROTO);
    FS_CHECK(strstr(e.msg, "argument 0") != NULL);
    /* Too many arguments for the caller's array. */
    frame(&b, 7, FS__OP_SET, 2, args);
    FS_CHECK_EQ(fs__store_parse_frame(b.p, b.len, 1 << 20, a, 1, &m, &e), FS_ETOOBIG);
    /* Shape checks. */
    frame(&b, 1, FS__OP_GET, 2, args);
    FS_CHECK_EQ(fs__store_parse_frame(b.p, b.len, 1 << 20, a, 8, &m, &e), (int64_t)b.len);
    FS_CHECK_EQ(fs__store_check_request(&m, 1 << 20, &e), FS_EPROTO);
    frame(&b, 1, 99, 0, args);
    FS_CHECK(fs__store_parse_frame(b.p, b.len, 1 << 20, a, 8, &m, &e) > 0);
    FS_CHECK_EQ(fs__store_check_request(&m, 1 << 20, &e), FS_EPROTO);
    frame(&b, 1, FS__OP_SET, 2, args);
    FS_CHECK(fs__store_parse_frame(b.p, b.len, 1 << 20, a, 8, &m, &e) > 0);
    FS_CHECK_EQ(fs__store_check_request(&m, 4, &e), FS_ETOOBIG); /* value over max_value */
    fs__store_buf_free(&b);
}

FS_TEST(test_parse_i64)
{
    int64_t v = 0;
    FS_CHECK(fs__store_parse_i64((const uint8_t *)"42", 2, &v) == 0 && v == 42);
    FS_CHECK(fs__store_parse_i64((const uint8_t *)"-7", 2, &v) == 0 && v == -7);
    FS_CHECK(fs__store_parse_i64((const uint8_t *)"9223372036854775807", 19, &v) == 0 &&
             v == INT64_MAX);
    FS_CHECK(fs__store_parse_i64((const uint8_t *)"-9223372036854775808", 20, &v) == 0 &&
             v == INT64_MIN);
    FS_CHECK(fs__store_parse_i64((const uint8_t *)"9223372036854775808", 19, &v) < 0);
    FS_CHECK(fs__store_parse_i64((const uint8_t *)"", 0, &v) < 0);
    FS_CHECK(fs__store_parse_i64((const uint8_t *)"-", 1, &v) < 0);
    FS_CHECK(fs__store_parse_i64((const uint8_t *)"1x", 2, &v) < 0);
}

FS_TEST(test_token)
{
    char a[FS_STORE_TOKEN_LEN + 1], b[FS_STORE_TOKEN_LEN + 1];
    fs_error_t err;
    FS_CHECK_OK(fs_store_make_token(a, sizeof a, &err), &err);
    FS_CHECK_OK(fs_store_make_token(b, sizeof b, &err), &err);
    FS_CHECK_EQ(strlen(a), FS_STORE_TOKEN_LEN);
    FS_CHECK(strcmp(a, b) != 0);
    FS_CHECK(strspn(a, "0123456789abcdef") == FS_STORE_TOKEN_LEN);
    FS_CHECK_EQ(fs_store_make_token(a, 10, &err), FS_EINVAL);
}

FS_TEST(test_every_op)
{
    fs_store_server_t *s = start_server(0, NULL);
    fs_store_client_t *c = client(s);
    fs_error_t err;
    char buf[256];
    FS_CHECK(fs_store_server_port(s) > 0);
    FS_CHECK_EQ(strcmp(fs_store_server_host(s), "127.0.0.1"), 0);

    FS_CHECK_OK(fs_store_set(c, "a", "hello", 5, -1, &err), &err);
    FS_CHECK_OK(get_str(c, "a", buf, sizeof buf, -1, &err), &err);
    FS_CHECK_EQ(strcmp(buf, "hello"), 0);
    /* Binary values with NUL bytes, and empty values. */
    FS_CHECK_OK(fs_store_set(c, "bin", "x\0y", 3, -1, &err), &err);
    void *v = NULL;
    size_t n = 0;
    FS_CHECK_OK(fs_store_get(c, "bin", &v, &n, -1, &err), &err);
    FS_CHECK(n == 3 && memcmp(v, "x\0y", 3) == 0);
    free(v);
    FS_CHECK_OK(fs_store_set(c, "empty", "", 0, -1, &err), &err);
    FS_CHECK_OK(fs_store_get(c, "empty", &v, &n, -1, &err), &err);
    FS_CHECK_EQ(n, 0);
    free(v);

    /* add: a decimal counter like torch's. */
    int64_t r = 0;
    FS_CHECK_OK(fs_store_add(c, "ctr", 1, &r, -1, &err), &err);
    FS_CHECK_EQ(r, 1);
    FS_CHECK_OK(fs_store_add(c, "ctr", 2, &r, -1, &err), &err);
    FS_CHECK_EQ(r, 3);
    FS_CHECK_OK(get_str(c, "ctr", buf, sizeof buf, -1, &err), &err);
    FS_CHECK_EQ(strcmp(buf, "3"), 0);
    FS_CHECK_OK(fs_store_add(c, "ctr", -10, &r, -1, &err), &err);
    FS_CHECK_EQ(r, -7);
    FS_CHECK_EQ(fs_store_add(c, "a", 1, &r, -1, &err), FS_EINVAL);
    FS_CHECK(strstr(err.msg, "'a'") != NULL && strstr(err.msg, "not a decimal") != NULL);
    FS_CHECK_OK(fs_store_set(c, "big", "9223372036854775807", 19, -1, &err), &err);
    FS_CHECK_EQ(fs_store_add(c, "big", 1, &r, -1, &err), FS_EINVAL);
    FS_CHECK(strstr(err.msg, "overflows") != NULL);

    /* compare_set, torch semantics. */
    size_t cl = 0;
    void *cur = NULL;
    FS_CHECK_OK(fs_store_compare_set(c, "cas", "", 0, "v1", 2, &cur, &cl, -1, &err), &err);
    FS_CHECK(cl == 2 && memcmp(cur, "v1", 2) == 0); /* missing + empty expected: set */
    free(cur);
    FS_CHECK_OK(fs_store_compare_set(c, "cas", "nope", 4, "v2", 2, &cur, &cl, -1, &err), &err);
    FS_CHECK(cl == 2 && memcmp(cur, "v1", 2) == 0); /* mismatch: current value */
    free(cur);
    FS_CHECK_OK(fs_store_compare_set(c, "cas", "v1", 2, "v2", 2, &cur, &cl, -1, &err), &err);
    FS_CHECK(cl == 2 && memcmp(cur, "v2", 2) == 0); /* match: desired */
    free(cur);
    FS_CHECK_OK(fs_store_compare_set(c, "cas-missing", "x", 1, "y", 1, &cur, &cl, -1, &err), &err);
    FS_CHECK(cl == 1 && memcmp(cur, "x", 1) == 0); /* missing + non-empty expected: expected */
    free(cur);
    int all = -1;
    const char *k1[] = {"cas-missing"};
    FS_CHECK_OK(fs_store_check(c, k1, 1, &all, -1, &err), &err);
    FS_CHECK_EQ(all, 0);

    /* check / wait / delete / num_keys */
    const char *ks[] = {"a", "ctr", "cas"};
    FS_CHECK_OK(fs_store_check(c, ks, 3, &all, -1, &err), &err);
    FS_CHECK_EQ(all, 1);
    FS_CHECK_OK(fs_store_wait(c, ks, 3, 1000, &err), &err);
    FS_CHECK_OK(fs_store_wait(c, ks, 0, 1000, &err), &err);
    int64_t nk = 0;
    FS_CHECK_OK(fs_store_num_keys(c, &nk, -1, &err), &err);
    FS_CHECK_EQ(nk, 6); /* a bin empty ctr big cas */
    int del = -1;
    FS_CHECK_OK(fs_store_delete(c, "a", &del, -1, &err), &err);
    FS_CHECK_EQ(del, 1);
    FS_CHECK_OK(fs_store_delete(c, "a", &del, -1, &err), &err);
    FS_CHECK_EQ(del, 0);
    FS_CHECK_OK(fs_store_check(c, ks, 3, &all, -1, &err), &err);
    FS_CHECK_EQ(all, 0);
    FS_CHECK_OK(fs_store_num_keys(c, &nk, -1, &err), &err);
    FS_CHECK_EQ(nk, 5);

    /* multi_set / multi_get */
    const char *mk[] = {"m1", "m2", "m3"};
    const void *mv[] = {"one", "", "three"};
    size_t ml[] = {3, 0, 5};
    FS_CHECK_OK(fs_store_multi_set(c, mk, mv, ml, 3, -1, &err), &err);
    void *vals[3] = {0};
    size_t lens[3] = {0};
    FS_CHECK_OK(fs_store_multi_get(c, mk, 3, vals, lens, -1, &err), &err);
    FS_CHECK(lens[0] == 3 && memcmp(vals[0], "one", 3) == 0);
    FS_CHECK(lens[1] == 0);
    FS_CHECK(lens[2] == 5 && memcmp(vals[2], "three", 5) == 0);
    for (int i = 0; i < 3; i++)
        free(vals[i]);

    /* append */
    FS_CHECK_OK(fs_store_append(c, "log", "ab", 2, -1, &err), &err);
    FS_CHECK_OK(fs_store_append(c, "log", "cd", 2, -1, &err), &err);
    FS_CHECK_OK(get_str(c, "log", buf, sizeof buf, -1, &err), &err);
    FS_CHECK_EQ(strcmp(buf, "abcd"), 0);

    /* check_each over more than one request's worth of keys */
    enum { NK = FS_STORE_MAX_KEYS + 10 };
    static char names[NK][16];
    static const char *ptrs[NK];
    for (int i = 0; i < NK; i++) {
        snprintf(names[i], sizeof names[i], "%s", i % 2 ? "m1" : "nope");
        ptrs[i] = names[i];
    }
    static uint8_t present[NK];
    FS_CHECK_OK(fs_store_check_each(c, ptrs, NK, present, -1, &err), &err);
    FS_CHECK(present[0] == 0 && present[1] == 1 && present[NK - 1] == 1);

    fs_store_close(c);
    fs_store_server_stop(s);
}

FS_TEST(test_limits)
{
    fs_store_server_t *s = start_server(1024, NULL);
    fs_store_client_t *c = client(s);
    fs_error_t err;
    static char key[FS_STORE_MAX_KEY + 2];
    memset(key, 'k', sizeof key - 1);
    FS_CHECK_EQ(fs_store_set(c, key, "v", 1, -1, &err), FS_ETOOBIG);
    FS_CHECK(strstr(err.msg, "4097 bytes") != NULL);
    key[FS_STORE_MAX_KEY] = '\0'; /* exactly at the limit: fine */
    FS_CHECK_OK(fs_store_set(c, key, "v", 1, -1, &err), &err);
    static char val[2048];
    FS_CHECK_EQ(fs_store_set(c, "v", val, sizeof val, -1, &err), FS_ETOOBIG);
    FS_CHECK(strstr(err.msg, "'v'") != NULL && strstr(err.msg, "1024") != NULL);
    FS_CHECK_OK(fs_store_set(c, "v", val, 1024, -1, &err), &err);
    /* Growing past the limit by append: refused by the server, connection fine. */
    FS_CHECK_EQ(fs_store_append(c, "v", "x", 1, -1, &err), FS_ETOOBIG);
    FS_CHECK(strstr(err.msg, "append('v')") != NULL);
    static const char *many[FS_STORE_MAX_KEYS + 1];
    for (size_t i = 0; i <= FS_STORE_MAX_KEYS; i++)
        many[i] = "v";
    FS_CHECK_EQ(fs_store_wait(c, many, FS_STORE_MAX_KEYS + 1, 100, &err), FS_ETOOBIG);
    FS_CHECK_OK(fs_store_wait(c, many, FS_STORE_MAX_KEYS, 1000, &err), &err);
    /* multi_get whose reply would exceed one frame: error, connection fine. */
    static void *vals[FS_STORE_MAX_KEYS];
    static size_t lens[FS_STORE_MAX_KEYS];
    FS_CHECK_OK(fs_store_multi_get(c, many, 8, vals, lens, 1000, &err), &err);
    for (int i = 0; i < 8; i++) {
        FS_CHECK_EQ(lens[i], 1024);
        free(vals[i]);
    }
    FS_CHECK_EQ(fs_store_wait(c, many, 1, -5, &err), FS_EINVAL);
    int64_t r;
    FS_CHECK_OK(fs_store_add(c, "after", 1, &r, -1, &err), &err);
    fs_store_close(c);
    fs_store_server_stop(s);
}

FS_TEST(test_large_values)
{
    fs_store_server_t *s = start_server(0, NULL);
    fs_store_client_t *c = client(s);
    fs_error_t err;
    size_t n = (size_t)20 << 20;
    uint8_t *big = malloc(n);
    for (size_t i = 0; i < n; i++)
        big[i] = (uint8_t)(i * 131 + 7);
    FS_CHECK_OK(fs_store_set(c, "big", big, n, -1, &err), &err);
    void *v = NULL;
    size_t got = 0;
    FS_CHECK_OK(fs_store_get(c, "big", &v, &got, -1, &err), &err);
    FS_CHECK(got == n && memcmp(v, big, n) == 0);
    free(v);
    /* Four 20 MiB values fit in no single reply of a 64 MiB store. */
    const char *ks[] = {"big", "big", "big", "big"};
    void *vals[4];
    size_t lens[4];
    FS_CHECK_EQ(fs_store_multi_get(c, ks, 4, vals, lens, 5000, &err), FS_ETOOBIG);
    FS_CHECK(strstr(err.msg, "fewer keys") != NULL);
    FS_CHECK_OK(fs_store_multi_get(c, ks, 2, vals, lens, 5000, &err), &err);
    free(vals[0]);
    free(vals[1]);
    free(big);
    fs_store_close(c);
    fs_store_server_stop(s);
}

struct adder {
    fs_store_server_t *s;
    int iters;
    int failures;
};

static void *adder_main(void *arg)
{
    struct adder *a = arg;
    fs_store_client_t *c = client(a->s);
    fs_error_t err;
    for (int i = 0; i < a->iters; i++) {
        int64_t r;
        if (fs_store_add(c, "counter", 1, &r, 10000, &err) != FS_OK)
            a->failures++;
    }
    fs_store_close(c);
    return NULL;
}

FS_TEST(test_concurrent_add)
{
    fs_store_server_t *s = start_server(0, NULL);
    enum { T = 16, N = 300 };
    pthread_t th[T];
    struct adder a[T];
    for (int i = 0; i < T; i++) {
        a[i] = (struct adder){s, N, 0};
        pthread_create(&th[i], NULL, adder_main, &a[i]);
    }
    for (int i = 0; i < T; i++) {
        pthread_join(th[i], NULL);
        FS_CHECK_EQ(a[i].failures, 0);
    }
    fs_store_client_t *c = client(s);
    fs_error_t err;
    char buf[32];
    FS_CHECK_OK(get_str(c, "counter", buf, sizeof buf, -1, &err), &err);
    FS_CHECK_EQ(atoi(buf), T * N);
    fs_store_close(c);
    fs_store_server_stop(s);
}

/* One client shared by threads: calls are serialised, results exact. */
struct shared {
    fs_store_client_t *c;
    int failures;
};

static void *shared_main(void *arg)
{
    struct shared *sh = arg;
    fs_error_t err;
    for (int i = 0; i < 200; i++) {
        int64_t r;
        if (fs_store_add(sh->c, "shared", 1, &r, 10000, &err) != FS_OK)
            sh->failures++;
    }
    return NULL;
}

FS_TEST(test_shared_client_threads)
{
    fs_store_server_t *s = start_server(0, NULL);
    fs_store_client_t *c = client(s);
    pthread_t th[4];
    struct shared sh[4];
    for (int i = 0; i < 4; i++) {
        sh[i] = (struct shared){c, 0};
        pthread_create(&th[i], NULL, shared_main, &sh[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        FS_CHECK_EQ(sh[i].failures, 0);
    }
    int64_t r;
    fs_error_t err;
    FS_CHECK_OK(fs_store_add(c, "shared", 0, &r, -1, &err), &err);
    FS_CHECK_EQ(r, 800);
    fs_store_close(c);
    fs_store_server_stop(s);
}

struct delayed {
    fs_store_server_t *s;
    int delay_ms;
    const char *key;
};

static void *delayed_set(void *arg)
{
    struct delayed *d = arg;
    fs_store_client_t *c = client(d->s);
    fs_error_t err;
    sleep_ms(d->delay_ms);
    fs_store_set(c, d->key, "late", 4, -1, &err);
    fs_store_close(c);
    return NULL;
}

FS_TEST(test_parked_get_woken_by_set)
{
    fs_store_server_t *s = start_server(0, NULL);
    fs_store_client_t *c = client(s);
    fs_error_t err;
    struct delayed d = {s, 200, "later"};
    pthread_t th;
    pthread_create(&th, NULL, delayed_set, &d);
    int64_t t0 = fs_now_ms();
    char buf[32] = "";
    FS_CHECK_OK(get_str(c, "later", buf, sizeof buf, 5000, &err), &err);
    int64_t dt = fs_now_ms() - t0;
    FS_CHECK_EQ(strcmp(buf, "late"), 0);
    FS_CHECK(dt >= 150 && dt < 3000);
    pthread_join(th, NULL);

    /* wait on several keys, woken key by key (and a delete in between is honoured). */
    struct delayed d2 = {s, 100, "w2"};
    fs_store_set(c, "w1", "x", 1, -1, &err);
    pthread_create(&th, NULL, delayed_set, &d2);
    const char *ks[] = {"w1", "w2"};
    FS_CHECK_OK(fs_store_wait(c, ks, 2, 5000, &err), &err);
    pthread_join(th, NULL);

    /* multi_get parks too. */
    struct delayed d3 = {s, 100, "mg"};
    pthread_create(&th, NULL, delayed_set, &d3);
    const char *mk[] = {"w1", "mg"};
    void *vals[2];
    size_t lens[2];
    FS_CHECK_OK(fs_store_multi_get(c, mk, 2, vals, lens, 5000, &err), &err);
    FS_CHECK(lens[1] == 4 && memcmp(vals[1], "late", 4) == 0);
    free(vals[0]);
    free(vals[1]);
    pthread_join(th, NULL);
    fs_store_close(c);
    fs_store_server_stop(s);
}

FS_TEST(test_timeouts)
{
    fs_store_server_t *s = start_server(0, NULL);
    fs_store_client_t *c = client(s);
    fs_error_t err;
    char buf[32];
    int64_t t0 = fs_now_ms();
    FS_CHECK_EQ(get_str(c, "never", buf, sizeof buf, 150, &err), FS_ETIMEOUT);
    int64_t dt = fs_now_ms() - t0;
    FS_CHECK(dt >= 140 && dt < 2000);
    FS_CHECK(strstr(err.msg, "'never'") != NULL);
    FS_CHECK(strstr(err.msg, "150 ms") != NULL);
    /* The connection stays usable; the cancelled get does not swallow a later reply. */
    FS_CHECK_OK(fs_store_set(c, "never", "now", 3, -1, &err), &err);
    FS_CHECK_OK(get_str(c, "never", buf, sizeof buf, 1000, &err), &err);
    FS_CHECK_EQ(strcmp(buf, "now"), 0);
    /* wait names what is missing. */
    const char *ks[] = {"never", "missing-1", "missing-2"};
    FS_CHECK_EQ(fs_store_wait(c, ks, 3, 100, &err), FS_ETIMEOUT);
    FS_CHECK(strstr(err.msg, "2 of 3 keys missing") != NULL);
    FS_CHECK(strstr(err.msg, "'missing-2'") != NULL);
    FS_CHECK(strstr(err.msg, "'never'") == NULL || strstr(err.msg, "wait(['never'") != NULL);
    /* Default timeout from the client. */
    fs_store_client_set_timeout(c, 100);
    FS_CHECK_EQ(fs_store_client_timeout(c), 100);
    t0 = fs_now_ms();
    FS_CHECK_EQ(get_str(c, "nope", buf, sizeof buf, FS_STORE_DEFAULT_TIMEOUT, &err), FS_ETIMEOUT);
    FS_CHECK(fs_now_ms() - t0 < 2000);
    /* After many cancelled gets the server holds no parked requests for us: a set works
     * and answers stay matched. */
    for (int i = 0; i < 20; i++)
        FS_CHECK_EQ(get_str(c, "nope", buf, sizeof buf, 1, &err), FS_ETIMEOUT);
    int64_t r = 0;
    FS_CHECK_OK(fs_store_add(c, "n", 5, &r, 1000, &err), &err);
    FS_CHECK_EQ(r, 5);
    fs_store_close(c);
    fs_store_server_stop(s);
}

FS_TEST(test_wrong_token)
{
    fs_store_server_t *s = start_server(0, NULL);
    fs_store_client_t *good = client(s);
    fs_error_t err;
    int rc;
    int64_t t0 = fs_now_ms();
    fs_store_client_t *bad = connect_to(s, "wrong-token", &rc, &err);
    FS_CHECK(bad == NULL);
    FS_CHECK_EQ(rc, FS_EAUTH);
    FS_CHECK(strstr(err.msg, "wrong token") != NULL);
    FS_CHECK(fs_now_ms() - t0 < 2000); /* not retried */
    int64_t r;
    FS_CHECK_OK(fs_store_add(good, "x", 1, &r, 1000, &err), &err);
    /* A raw connection with a wrong token is closed after the error reply. */
    int fd = raw_connect(s);
    fs__store_buf_t b = {0};
    const char *args[2] = {FS__STORE_MAGIC, "nope"};
    frame(&b, 1, FS__OP_HELLO, 2, args);
    raw_send(fd, b.p, b.len);
    FS_CHECK(raw_closed(fd));
    close(fd);
    /* A request before HELLO closes the connection too. */
    fd = raw_connect(s);
    const char *gargs[1] = {"x"};
    frame(&b, 1, FS__OP_GET, 1, gargs);
    raw_send(fd, b.p, b.len);
    FS_CHECK(raw_closed(fd));
    close(fd);
    fs__store_buf_free(&b);
    FS_CHECK_OK(fs_store_add(good, "x", 1, &r, 1000, &err), &err);
    FS_CHECK_EQ(r, 2);
    fs_store_close(good);
    fs_store_server_stop(s);
}

FS_TEST(test_malformed_frames)
{
    fs_store_server_t *s = start_server(0, NULL);
    fs_store_client_t *good = client(s);
    fs_error_t err;
    int64_t r;
    /* Each of these closes its own connection only. */
    static const uint8_t garbage[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    uint8_t huge[16];
    fs__store_put_u32(huge, 0xfffffff0u);
    memset(huge + 4, 0, 12);
    uint8_t short_frame[8] = {2, 0, 0, 0, 1, 2, 0, 0};
    struct {
        const void *p;
        size_t n;
        int auth;
    } cases[] = {
        {garbage, sizeof garbage - 1, 0},
        {huge, sizeof huge, 0},
        {huge, sizeof huge, 1},
        {short_frame, sizeof short_frame, 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int fd = raw_connect(s);
        if (cases[i].auth)
            raw_hello(fd);
        raw_send(fd, cases[i].p, cases[i].n);
        FS_CHECK(raw_closed(fd));
        close(fd);
        FS_CHECK_OK(fs_store_add(good, "ok", 1, &r, 1000, &err), &err);
    }
    /* Authenticated, then a frame with an argument running past its end. */
    int fd = raw_connect(s);
    raw_hello(fd);
    fs__store_buf_t b = {0};
    const char *args[2] = {"key", "value"};
    frame(&b, 2, FS__OP_SET, 2, args);
    fs__store_put_u32(b.p + FS__STORE_HDR, 99);
    raw_send(fd, b.p, b.len);
    FS_CHECK(raw_closed(fd));
    close(fd);
    /* Unknown op, wrong arg count, add with a 3-byte delta, HELLO twice. */
    const char *three[3] = {"k", "abc", "x"};
    int ops[][2] = {{77, 1}, {FS__OP_GET, 3}, {FS__OP_ADD, 2}, {FS__OP_HELLO, 2}};
    for (size_t i = 0; i < 4; i++) {
        fd = raw_connect(s);
        raw_hello(fd);
        frame(&b, 3, ops[i][0], ops[i][1], three);
        raw_send(fd, b.p, b.len);
        FS_CHECK(raw_closed(fd));
        close(fd);
    }
    fs__store_buf_free(&b);
    FS_CHECK_OK(fs_store_add(good, "ok", 1, &r, 1000, &err), &err);
    FS_CHECK_EQ(r, 5);
    /* The bad key was never stored. */
    int all = 1;
    const char *k[] = {"key"};
    FS_CHECK_OK(fs_store_check(good, k, 1, &all, 1000, &err), &err);
    FS_CHECK_EQ(all, 0);
    fs_store_close(good);
    fs_store_server_stop(s);
}

FS_TEST(test_disconnect_mid_request)
{
    fs_store_server_t *s = start_server(0, NULL);
    fs_store_client_t *good = client(s);
    fs_error_t err;
    /* Half a SET, then gone: nothing stored. */
    int fd = raw_connect(s);
    raw_hello(fd);
    fs__store_buf_t b = {0};
    const char *args[2] = {"half", "some value that never fully arrives"};
    frame(&b, 2, FS__OP_SET, 2, args);
    raw_send(fd, b.p, b.len - 5);
    sleep_ms(50); /* most likely read by then; the checks below hold either way */
    close(fd);
    /* A parked GET, then gone: the server drops it. */
    fd = raw_connect(s);
    raw_hello(fd);
    const char *gargs[1] = {"parked"};
    frame(&b, 3, FS__OP_GET, 1, gargs);
    raw_send(fd, b.p, b.len);
    /* Requests on a connection are handled in order: once num_keys is answered, the get
       is parked. */
    frame(&b, 4, FS__OP_NUM_KEYS, 0, gargs);
    raw_send(fd, b.p, b.len);
    uint8_t reply[64];
    FS_CHECK(recv(fd, reply, sizeof reply, 0) > 0);
    FS_CHECK_EQ(fs__store_get_u32(reply + 4), 4); /* the num_keys reply, not the get's */
    close(fd);
    fs__store_buf_free(&b);
    int64_t t0 = fs_now_ms();
    while (fs_store_server_num_clients(s) != 1 && fs_now_ms() - t0 < 2000)
        sleep_ms(10);
    FS_CHECK_EQ(fs_store_server_num_clients(s), 1);
    int all = 1;
    const char *k[] = {"half"};
    FS_CHECK_OK(fs_store_check(good, k, 1, &all, 1000, &err), &err);
    FS_CHECK_EQ(all, 0);
    FS_CHECK_OK(fs_store_set(good, "parked", "v", 1, 1000, &err), &err);
    int64_t nk = 0;
    FS_CHECK_OK(fs_store_num_keys(good, &nk, 1000, &err), &err);
    FS_CHECK_EQ(nk, 1);
    /* A client that connects and never authenticates is dropped after auth_timeout_ms. */
    fd = raw_connect(s);
    FS_CHECK(raw_closed(fd) || raw_closed(fd));
    close(fd);
    FS_CHECK_OK(fs_store_server_check(s, &err), &err);
    fs_store_close(good);
    fs_store_server_stop(s);
}

struct barrier_arg {
    fs_store_server_t *s;
    int rank, world;
    int64_t timeout;
    int rc;
    fs_error_t err;
};

static void *barrier_main(void *arg)
{
    struct barrier_arg *b = arg;
    fs_store_client_t *c = client(b->s);
    b->rc = fs_store_barrier(c, "bar", b->world, b->rank, b->timeout, &b->err);
    fs_store_close(c);
    return NULL;
}

FS_TEST(test_barrier)
{
    fs_store_server_t *s = start_server(0, NULL);
    enum { W = 6 };
    pthread_t th[W];
    struct barrier_arg a[W];
    for (int i = 0; i < W; i++) {
        a[i] = (struct barrier_arg){s, i, W, 5000, -99, {0}};
        pthread_create(&th[i], NULL, barrier_main, &a[i]);
    }
    for (int i = 0; i < W; i++) {
        pthread_join(th[i], NULL);
        FS_CHECK_EQ(a[i].rc, FS_OK);
    }
    fs_store_server_stop(s);
}

/* err may be NULL everywhere (fastspawn/error.h), timeouts that name keys included. */
FS_TEST(test_null_error_pointers_are_accepted)
{
    fs_store_server_t *s = start_server(0, NULL);
    fs_store_client_t *c = client(s);
    const char *keys[] = {"never"};
    void *v = NULL;
    size_t n = 0;
    int64_t r = 0;
    FS_CHECK_EQ(fs_store_set(c, "k", "1", 1, 1000, NULL), FS_OK);
    FS_CHECK_EQ(fs_store_add(c, "k", 1, &r, 1000, NULL), FS_OK);
    FS_CHECK_EQ(r, 2);
    FS_CHECK_EQ(fs_store_get(c, "never", &v, &n, 50, NULL), FS_ETIMEOUT);
    FS_CHECK_EQ(fs_store_wait(c, keys, 1, 50, NULL), FS_ETIMEOUT);
    FS_CHECK_EQ(fs_store_barrier(c, "b", 2, 0, 50, NULL), FS_ETIMEOUT);
    FS_CHECK_EQ(fs_store_add(c, "k", INT64_MAX, &r, 1000, NULL), FS_EINVAL);
    fs_store_client_opts_t o = {0};
    fs_store_client_t *none = NULL;
    FS_CHECK_EQ(fs_store_connect(&o, &none, NULL), FS_EINVAL);
    o.host = "unix:@fastspawn-test-nobody-here";
    o.token = TOKEN;
    o.connect_timeout_ms = 50;
    FS_CHECK_EQ(fs_store_connect(&o, &none, NULL), FS_ETIMEOUT);
    FS_CHECK_EQ(fs_store_server_check(s, NULL), FS_OK);
    fs_store_close(c);
    fs_store_server_stop(s);
    FS_CHECK_EQ(fs_store_server_start(NULL, &s, NULL), FS_EINVAL);
}

FS_TEST(test_barrier_timeout_names_missing_ranks)
{
    fs_store_server_t *s = start_server(0, NULL);
    enum { W = 8 };
    int arrive[] = {0, 2, 3, 4, 7};
    pthread_t th[5];
    struct barrier_arg a[5];
    int64_t t0 = fs_now_ms();
    for (int i = 0; i < 5; i++) {
        a[i] = (struct barrier_arg){s, arrive[i], W, 300, -99, {0}};
        pthread_create(&th[i], NULL, barrier_main, &a[i]);
    }
    for (int i = 0; i < 5; i++) {
        pthread_join(th[i], NULL);
        FS_CHECK_EQ(a[i].rc, FS_ETIMEOUT);
    }
    FS_CHECK(fs_now_ms() - t0 < 3000);
    FS_CHECK(strstr(a[0].err.msg, "barrier 'bar'") != NULL);
    FS_CHECK(strstr(a[0].err.msg, "5 of 8 ranks arrived") != NULL);
    FS_CHECK(strstr(a[0].err.msg, "missing ranks: 1, 5-6") != NULL);
    if (strstr(a[0].err.msg, "missing ranks: 1, 5-6") == NULL)
        fprintf(stderr, "  message: %s\n", a[0].err.msg);
    /* Bad arguments. */
    fs_store_client_t *c = client(s);
    fs_error_t err;
    FS_CHECK_EQ(fs_store_barrier(c, "b2", 2, 2, 100, &err), FS_EINVAL);
    FS_CHECK_EQ(fs_store_barrier(c, "b2", 0, 0, 100, &err), FS_EINVAL);
    /* Reusing a name with more ranks than world_size is reported. */
    FS_CHECK_OK(fs_store_barrier(c, "b3", 1, 0, 1000, &err), &err);
    fs_store_client_t *c2 = client(s);
    FS_CHECK_EQ(fs_store_barrier(c2, "b3", 1, 0, 1000, &err), FS_OK); /* same rank: counted once */
    fs_store_close(c2);
    fs_store_close(c);
    fs_store_server_stop(s);
}

FS_TEST(test_connect_retry_and_timeout)
{
    fs_error_t err;
    fs_store_client_opts_t o = {0};
    fs_store_client_t *c = NULL;
    /* Nobody listening: retries, then a timeout that says where and how often. */
    o.host = "unix:@fastspawn-test-nobody-here";
    o.token = TOKEN;
    o.connect_timeout_ms = 300;
    int64_t t0 = fs_now_ms();
    FS_CHECK_EQ(fs_store_connect(&o, &c, &err), FS_ETIMEOUT);
    int64_t dt = fs_now_ms() - t0;
    FS_CHECK(dt >= 250 && dt < 2000);
    FS_CHECK(strstr(err.msg, "attempts") != NULL);
    FS_CHECK(strstr(err.msg, "fastspawn-test-nobody-here") != NULL);
    /* The server comes up late: the client's retry finds it. It serves until the
       parent closes `done`. */
    char name[64];
    snprintf(name, sizeof name, "@fastspawn-test-late-%d", (int)getpid());
    int done[2];
    FS_CHECK(pipe(done) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        close(done[1]);
        sleep_ms(300);
        fs_store_server_t *s = start_server(0, name);
        char ch;
        while (read(done[0], &ch, 1) < 0 && errno == EINTR) {
        }
        fs_store_server_stop(s);
        _exit(0);
    }
    close(done[0]);
    char host[80];
    snprintf(host, sizeof host, "unix:%s", name);
    o.host = host;
    o.connect_timeout_ms = 5000;
    t0 = fs_now_ms();
    FS_CHECK_OK(fs_store_connect(&o, &c, &err), &err);
    FS_CHECK(fs_now_ms() - t0 >= 250);
    if (c != NULL) {
        FS_CHECK_OK(fs_store_set(c, "k", "v", 1, 1000, &err), &err);
        fs_store_close(c);
    }
    close(done[1]);
    int status = -1;
    FS_CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    /* Bad options. */
    o.host = "127.0.0.1";
    o.port = 0;
    FS_CHECK_EQ(fs_store_connect(&o, &c, &err), FS_EINVAL);
    o.port = 1;
    o.token = "";
    FS_CHECK_EQ(fs_store_connect(&o, &c, &err), FS_EINVAL);
}

FS_TEST(test_unix_socket_and_ipv6)
{
    fs_store_server_t *s = start_server(0, "@");
    const char *path = fs_store_server_unix_path(s);
    FS_CHECK(path != NULL && path[0] == '@');
    fs_error_t err;
    fs_store_client_opts_t o = {0};
    fs_store_client_t *c = NULL;
    char host[128];
    snprintf(host, sizeof host, "unix:%s", path);
    o.host = host;
    o.token = TOKEN;
    FS_CHECK_OK(fs_store_connect(&o, &c, &err), &err);
    int64_t r = 0;
    FS_CHECK_OK(fs_store_add(c, "u", 1, &r, 1000, &err), &err);
    fs_store_close(c);
    /* The same keys over TCP. */
    c = client(s);
    FS_CHECK_OK(fs_store_add(c, "u", 1, &r, 1000, &err), &err);
    FS_CHECK_EQ(r, 2);
    fs_store_close(c);
    fs_store_server_stop(s);

    /* A filesystem path. */
    char p[64];
    snprintf(p, sizeof p, "/tmp/fastspawn-test-%d.sock", (int)getpid());
    s = start_server(0, p);
    snprintf(host, sizeof host, "unix:%s", p);
    FS_CHECK_OK(fs_store_connect(&o, &c, &err), &err);
    FS_CHECK_OK(fs_store_add(c, "u", 1, &r, 1000, &err), &err);
    fs_store_close(c);
    fs_store_server_stop(s);
    FS_CHECK(access(p, F_OK) != 0); /* unlinked at stop */

    /* IPv6 loopback, where the machine has it. */
    fs_store_server_opts_t so = {0};
    so.host = "::1";
    so.token = TOKEN;
    if (fs_store_server_start(&so, &s, &err) == FS_OK) {
        FS_CHECK_EQ(strcmp(fs_store_server_host(s), "::1"), 0);
        o.host = "::1";
        o.port = fs_store_server_port(s);
        FS_CHECK_OK(fs_store_connect(&o, &c, &err), &err);
        FS_CHECK_OK(fs_store_add(c, "u6", 1, &r, 1000, &err), &err);
        fs_store_close(c);
        fs_store_server_stop(s);
    }
    /* Bad server options. */
    so.host = "no-such-host.invalid";
    FS_CHECK(fs_store_server_start(&so, &s, &err) != FS_OK);
    so.host = NULL;
    so.token = NULL;
    FS_CHECK_EQ(fs_store_server_start(&so, &s, &err), FS_EINVAL);
    so.token = TOKEN;
    so.port = 70000;
    FS_CHECK_EQ(fs_store_server_start(&so, &s, &err), FS_EINVAL);
}

static void *shutdown_later(void *arg)
{
    sleep_ms(150);
    fs_store_client_shutdown(arg);
    return NULL;
}

static void *stop_later(void *arg)
{
    sleep_ms(150);
    fs_store_server_stop(arg);
    return NULL;
}

FS_TEST(test_shutdown_wakes_blocked_calls)
{
    fs_store_server_t *s = start_server(0, NULL);
    fs_store_client_t *c = client(s);
    fs_error_t err;
    char buf[16];
    pthread_t th;
    pthread_create(&th, NULL, shutdown_later, c);
    int64_t t0 = fs_now_ms();
    FS_CHECK_EQ(get_str(c, "never", buf, sizeof buf, 10000, &err), FS_ECLOSED);
    FS_CHECK(fs_now_ms() - t0 < 3000);
    pthread_join(th, NULL);
    FS_CHECK_EQ(fs_store_set(c, "k", "v", 1, 100, &err), FS_ECLOSED);
    fs_store_close(c);

    /* The server going away wakes its parked clients. */
    c = client(s);
    pthread_create(&th, NULL, stop_later, s);
    t0 = fs_now_ms();
    FS_CHECK_EQ(get_str(c, "never", buf, sizeof buf, 10000, &err), FS_ECLOSED);
    FS_CHECK(strstr(err.msg, "closed the connection") != NULL);
    FS_CHECK(fs_now_ms() - t0 < 3000);
    pthread_join(th, NULL);
    FS_CHECK_EQ(fs_store_set(c, "k", "v", 1, 100, &err), FS_ECLOSED);
    FS_CHECK(strstr(err.msg, "earlier error") != NULL);
    fs_store_close(c);
}

FS_TEST(test_fork_child_drops_server_sockets)
{
    fs_store_server_t *s = start_server(0, NULL);
    fs_store_client_t *c = client(s);
    fs_error_t err;
    int port = fs_store_server_port(s);
    int pipefd[2];
    FS_CHECK(pipe(pipefd) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        /* The child holds none of the server's sockets, and the parent's client refuses. */
        int bad = 0;
        int64_t r;
        if (fs_store_add(c, "x", 1, &r, 100, &err) != FS_EINVAL)
            bad = 1;
        fs_store_server_stop(s); /* no-op in a child */
        char ch = (char)('0' + bad);
        if (write(pipefd[1], &ch, 1) != 1)
            _exit(2);
        pause(); /* alive (holding whatever it inherited) until the parent kills it */
        _exit(0);
    }
    char ch = 'x';
    FS_CHECK(read(pipefd[0], &ch, 1) == 1);
    FS_CHECK_EQ(ch, '0');
    int64_t r = 0;
    FS_CHECK_OK(fs_store_add(c, "x", 1, &r, 1000, &err), &err); /* parent unaffected */
    FS_CHECK_EQ(r, 1);
    fs_store_close(c);
    fs_store_server_stop(s);
    /* With the child alive, the port must be closed: it did not inherit the listener. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int rc = connect(fd, (struct sockaddr *)&a, sizeof a);
    FS_CHECK(rc < 0 && errno == ECONNREFUSED);
    close(fd);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

struct storm {
    fs_store_server_t *s;
    int ok;
    fs_store_client_t *c;
};

static void *storm_main(void *arg)
{
    struct storm *st = arg;
    fs_error_t err;
    int rc;
    st->c = connect_to(st->s, TOKEN, &rc, &err);
    int64_t r;
    if (rc == FS_OK && fs_store_add(st->c, "storm", 1, &r, 10000, &err) == FS_OK)
        st->ok = 1;
    return NULL;
}

FS_TEST(test_connect_storm)
{
    fs_store_server_t *s = start_server(0, NULL);
    enum { N = 200 };
    static pthread_t th[N];
    static struct storm st[N];
    for (int i = 0; i < N; i++) {
        st[i] = (struct storm){s, 0, NULL};
        pthread_create(&th[i], NULL, storm_main, &st[i]);
    }
    int ok = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        ok += st[i].ok;
    }
    FS_CHECK_EQ(ok, N);
    FS_CHECK_EQ(fs_store_server_num_clients(s), N);
    fs_error_t err;
    void *v;
    size_t n;
    FS_CHECK_OK(fs_store_get(st[0].c, "storm", &v, &n, 1000, &err), &err);
    FS_CHECK(n == 3 && memcmp(v, "200", 3) == 0);
    free(v);
    for (int i = 0; i < N; i++)
        fs_store_close(st[i].c);
    fs_store_server_stop(s);
}

/* ---- hostile and careless clients (issue 8, findings 3 and 4) ---------------------- */

/* Open descriptors of this process (/proc/self/fd), or -1 when none is left to look. */
static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        return -1;
    int n = -1; /* the directory's own fd */
    while (readdir(d) != NULL)
        n++;
    closedir(d);
    return n - 2; /* "." and ".." */
}

/* VmRSS of this process in bytes. */
static long long vm_rss(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long long kb = -1;
    while (f != NULL && fgets(line, sizeof line, f) != NULL)
        if (sscanf(line, "VmRSS: %lld kB", &kb) == 1)
            break;
    if (f != NULL)
        fclose(f);
    return kb * 1024;
}

static int tcp_connect_nb(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/*
 * The attacker: n idle connections that never say HELLO, each reopened as soon as the
 * server closes it, until stop_fd reads EOF. Writes one byte to ready_fd once all are open.
 */
static void flood_child(int port, int n, int ready_fd, int stop_fd)
{
    struct pollfd *p = calloc((size_t)n + 1, sizeof *p);
    if (p == NULL)
        _exit(2);
    p[0] = (struct pollfd){.fd = stop_fd, .events = POLLIN};
    for (int i = 1; i <= n; i++)
        p[i] = (struct pollfd){.fd = tcp_connect_nb(port), .events = POLLIN};
    if (write(ready_fd, "r", 1) != 1)
        _exit(2);
    for (;;) {
        if (poll(p, (nfds_t)n + 1, 1000) < 0 && errno != EINTR)
            _exit(2);
        if (p[0].revents)
            _exit(0);
        for (int i = 1; i <= n; i++) {
            char b[64];
            if (p[i].fd >= 0 && p[i].revents == 0)
                continue;
            if (p[i].fd >= 0 && recv(p[i].fd, b, sizeof b, MSG_DONTWAIT) > 0)
                continue;
            close(p[i].fd);
            p[i].fd = tcp_connect_nb(port);
        }
    }
}

enum { FLOOD_PROCS = 3, FLOOD_EACH = 734 }; /* 2202 connections, each process < 1024 fds */

FS_TEST(test_unauth_flood_keeps_ranks_in)
{
    fs_store_server_opts_t o = {0};
    fs_error_t err;
    fs_store_server_t *s = NULL;
    o.token = TOKEN; /* every other option at its default */
    FS_CHECK_OK(fs_store_server_start(&o, &s, &err), &err);
    int ready[2], stop[2];
    FS_CHECK(pipe(ready) == 0 && pipe(stop) == 0);
    int fds_before = count_fds();
    pid_t kids[FLOOD_PROCS];
    for (int i = 0; i < FLOOD_PROCS; i++) {
        kids[i] = fork();
        if (kids[i] == 0) {
            close(stop[1]);
            flood_child(fs_store_server_port(s), FLOOD_EACH, ready[1], stop[0]);
        }
    }
    close(stop[0]);
    /* The launcher, as most machines start it: 1024 descriptors. */
    struct rlimit rl, low;
    FS_CHECK(getrlimit(RLIMIT_NOFILE, &rl) == 0);
    low = rl;
    low.rlim_cur = rl.rlim_cur < 1024 ? rl.rlim_cur : 1024;
    FS_CHECK(setrlimit(RLIMIT_NOFILE, &low) == 0);
    char ch;
    for (int i = 0; i < FLOOD_PROCS; i++)
        FS_CHECK(read(ready[0], &ch, 1) == 1);
    int fds_flooded = count_fds();
    /* A rank with the token gets in at once, and its calls work. */
    int rc;
    int64_t t0 = fs_now_ms();
    fs_store_client_t *c = connect_to(s, TOKEN, &rc, &err);
    char buf[16] = "";
    if (rc == FS_OK && (rc = fs_store_set(c, "k", "v", 1, 2000, &err)) == FS_OK)
        rc = get_str(c, "k", buf, sizeof buf, 2000, &err);
    int64_t waited = fs_now_ms() - t0;
    printf("  fds: %d before, %d flooded; the good client: %s after %lld ms\n", fds_before,
           fds_flooded, rc == FS_OK ? "ok" : err.msg, (long long)waited);
    FS_CHECK_OK(rc, &err);
    FS_CHECK(strcmp(buf, "v") == 0);
    FS_CHECK(waited < 3000);
    /* Bounded: the unauthenticated cap (64 by default) and a few of the server's own. */
    FS_CHECK(fds_flooded >= 0 && fds_flooded - fds_before <= FS_STORE_DEFAULT_MAX_UNAUTH + 8);
    fs_store_server_stats_t st;
    fs_store_server_stats(s, &st);
    FS_CHECK_EQ(st.clients, 1);
    FS_CHECK(st.unauth <= FS_STORE_DEFAULT_MAX_UNAUTH);
    FS_CHECK(st.evicted >= FLOOD_PROCS * FLOOD_EACH - FS_STORE_DEFAULT_MAX_UNAUTH);
    fs_store_close(c);
    close(stop[1]);
    for (int i = 0; i < FLOOD_PROCS; i++)
        FS_CHECK(waitpid(kids[i], NULL, 0) == kids[i]);
    FS_CHECK_OK(fs_store_server_check(s, &err), &err);
    fs_store_server_stop(s);
    FS_CHECK(setrlimit(RLIMIT_NOFILE, &rl) == 0);
}

/* Connect, wait for the server to close (or 200 ms), pause 20 ms, again, until stop_fd
   reads EOF: a connection is always pending, at a rate that costs a server shedding it
   next to nothing (unlike one that spins). */
static void reconnect_child(int port, int stop_fd)
{
    for (;;) {
        struct pollfd p[2] = {{.fd = stop_fd, .events = POLLIN}, {.fd = -1, .events = POLLIN}};
        p[1].fd = tcp_connect_nb(port);
        if (poll(p, 2, 200) < 0 && errno != EINTR)
            _exit(2);
        if (p[0].revents)
            _exit(0);
        close(p[1].fd);
        sleep_ms(20);
    }
}

/* Takes the first descriptor that frees up (the server's reserve, when it lets it go). */
struct grabber {
    atomic_int stop;
    int fd;
};

static void *grab_main(void *arg)
{
    struct grabber *g = arg;
    while (!atomic_load(&g->stop) && (g->fd = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0) {
    }
    return NULL;
}

static int64_t cpu_ms(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) < 0)
        return -1;
    return (int64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000 +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1000;
}

FS_TEST(test_accept_out_of_fds_does_not_spin)
{
    fs_store_server_t *s = start_server(0, NULL);
    int stop[2];
    FS_CHECK(pipe(stop) == 0);
    pid_t kid = fork();
    if (kid == 0) {
        close(stop[1]);
        reconnect_child(fs_store_server_port(s), stop[0]);
    }
    close(stop[0]);
    /* Every descriptor of the process taken (a leak elsewhere in the launcher). */
    struct rlimit rl, low;
    FS_CHECK(getrlimit(RLIMIT_NOFILE, &rl) == 0);
    low = rl;
    low.rlim_cur = 256;
    FS_CHECK(setrlimit(RLIMIT_NOFILE, &low) == 0);
    static int fill[256];
    int nfill = 0;
    while (nfill < 256 && (fill[nfill] = open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0)
        nfill++;
    FS_CHECK_EQ(errno, EMFILE);
    /* Another thread races the server for any descriptor it frees: now and then it wins
       the server's reserve, which the server must survive without spinning. */
    struct grabber g = {0, -1};
    pthread_t th;
    pthread_create(&th, NULL, grab_main, &g);
    int64_t t0 = fs_now_ms();
    while (g.fd < 0 && fs_now_ms() - t0 < 3000)
        sleep_ms(10);
    atomic_store(&g.stop, 1);
    pthread_join(th, NULL);
    int64_t c0 = cpu_ms();
    sleep_ms(1000);
    int64_t used = cpu_ms() - c0;
    printf("  %s; the server used %lld ms of CPU in 1 s at the fd limit\n",
           g.fd >= 0 ? "another thread took a descriptor the server freed" : "none freed",
           (long long)used);
    FS_CHECK(used >= 0 && used < 300);
    /* Descriptors come back: the server accepts again. */
    for (int i = 0; i < nfill; i++)
        close(fill[i]);
    close(g.fd);
    fs_error_t err;
    int rc;
    t0 = fs_now_ms();
    fs_store_client_t *c = connect_to(s, TOKEN, &rc, &err);
    FS_CHECK_OK(rc, &err);
    FS_CHECK(fs_now_ms() - t0 < 2000);
    if (c != NULL)
        FS_CHECK_OK(fs_store_set(c, "k", "v", 1, 1000, &err), &err);
    fs_store_close(c);
    close(stop[1]);
    FS_CHECK(waitpid(kid, NULL, 0) == kid);
    FS_CHECK_OK(fs_store_server_check(s, &err), &err);
    fs_store_server_stop(s);
    FS_CHECK(setrlimit(RLIMIT_NOFILE, &rl) == 0);
}

/* Read frames from fd until n replies with ids first..first+n-1 came; 1 when they all did. */
static int read_replies(int fd, uint32_t first, int n, size_t vlen)
{
    static uint8_t seen[64];
    memset(seen, 0, sizeof seen);
    struct timeval tv = {10, 0};
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0)
        return 0;
    size_t frame_len = FS__STORE_HDR + 4 + vlen;
    uint8_t *buf = malloc(frame_len);
    int got = 0;
    while (buf != NULL && got < n) {
        size_t have = 0;
        while (have < frame_len) {
            ssize_t r = recv(fd, buf + have, frame_len - have, 0);
            if (r <= 0)
                goto out;
            have += (size_t)r;
        }
        uint32_t id = fs__store_get_u32(buf + 4);
        if (id < first || id >= first + (uint32_t)n || seen[id - first] || buf[8] != 0)
            goto out;
        seen[id - first] = 1;
        got++;
    }
out:
    free(buf);
    return got == n;
}

FS_TEST(test_parked_answers_obey_the_output_limit)
{
    enum { PARKED = 40 };
    const size_t vlen = (size_t)16 << 20;
    fs_store_server_t *s = start_server(0, NULL);
    int fd = raw_connect(s);
    raw_hello(fd);
    fs__store_buf_t b = {0};
    const char *key[1] = {"big"};
    for (int i = 0; i < PARKED; i++) {
        frame(&b, 2 + (uint32_t)i, FS__OP_GET, 1, key);
        raw_send(fd, b.p, b.len);
    }
    /* Handled in order: once num_keys is answered, the gets are parked. */
    frame(&b, 100, FS__OP_NUM_KEYS, 0, key);
    raw_send(fd, b.p, b.len);
    uint8_t reply[FS__STORE_HDR + 12];
    FS_CHECK(recv(fd, reply, sizeof reply, MSG_WAITALL) == FS__STORE_HDR + 12);
    FS_CHECK_EQ(fs__store_get_u32(reply + 4), 100);
    fs__store_buf_free(&b);
    uint8_t *big = malloc(vlen);
    memset(big, 7, vlen);
    long long rss0 = vm_rss();
    fs_store_client_t *c = client(s);
    fs_error_t err;
    FS_CHECK_OK(fs_store_set(c, "big", big, vlen, 10000, &err), &err); /* wakes them first */
    long long grew = vm_rss() - rss0;
    printf("  40 parked gets of a 16 MiB value: RSS grew by %lld MiB\n", grew >> 20);
    FS_CHECK(grew < (100ll << 20));
    /* The limit, plus the one reply that crossed it; the rest wait without a copy. */
    fs_store_server_stats_t st;
    fs_store_server_stats(s, &st);
    FS_CHECK(st.out_bytes <= FS__STORE_WBUF_HIGH + vlen + 64);
    FS_CHECK(st.parked >= PARKED - 2);
    /* Every answer still comes, as the client reads. */
    FS_CHECK(read_replies(fd, 2, PARKED, vlen));
    int64_t t0 = fs_now_ms(); /* the server counts the last send after it returned */
    do
        fs_store_server_stats(s, &st);
    while (st.out_bytes != 0 && fs_now_ms() - t0 < 2000);
    FS_CHECK_EQ(st.parked, 0);
    FS_CHECK_EQ(st.out_bytes, 0);
    close(fd);
    /* A client that leaves with answers queued frees them. */
    fd = raw_connect(s);
    raw_hello(fd);
    for (int i = 0; i < PARKED; i++) {
        frame(&b, 2 + (uint32_t)i, FS__OP_GET, 1, (const char *[]){"big2"});
        raw_send(fd, b.p, b.len);
    }
    frame(&b, 100, FS__OP_NUM_KEYS, 0, key);
    raw_send(fd, b.p, b.len);
    FS_CHECK(recv(fd, reply, sizeof reply, MSG_WAITALL) == FS__STORE_HDR + 12);
    fs__store_buf_free(&b);
    FS_CHECK_OK(fs_store_set(c, "big2", big, vlen, 10000, &err), &err);
    close(fd);
    t0 = fs_now_ms();
    while (fs_store_server_num_clients(s) != 1 && fs_now_ms() - t0 < 2000)
        sleep_ms(10);
    fs_store_server_stats(s, &st);
    FS_CHECK_EQ(st.parked, 0);
    FS_CHECK_EQ(st.out_bytes, 0);
    fs_store_close(c);
    free(big);
    fs_store_server_stop(s);
}

/* 1 when the server has closed fd within ms (EOF or reset), 0 when it is still open. */
static int closed_within(int fd, int ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, ms) <= 0)
        return 0;
    char b[64];
    return recv(fd, b, sizeof b, MSG_DONTWAIT) <= 0;
}

static fs_store_server_t *start_limited(int max_unauth, int max_clients)
{
    fs_store_server_opts_t o = {0};
    fs_error_t err;
    fs_store_server_t *s = NULL;
    o.token = TOKEN;
    o.auth_timeout_ms = 10000;
    o.max_unauth = max_unauth;
    o.max_clients = max_clients;
    if (fs_store_server_start(&o, &s, &err) != FS_OK) {
        fprintf(stderr, "  server start failed: %s\n", err.msg);
        exit(1);
    }
    return s;
}

FS_TEST(test_unauth_cap_closes_the_oldest)
{
    fs_store_server_t *s = start_limited(4, 0);
    int fds[5];
    fs_store_server_stats_t st = {0};
    for (int i = 0; i < 5; i++) {
        fds[i] = raw_connect(s);
        int64_t t0 = fs_now_ms(); /* accepted in order: wait for each */
        do
            fs_store_server_stats(s, &st);
        while (st.unauth + st.evicted < (size_t)i + 1 && fs_now_ms() - t0 < 2000);
    }
    FS_CHECK(closed_within(fds[0], 2000));
    for (int i = 1; i < 5; i++)
        FS_CHECK(!closed_within(fds[i], 50));
    fs_store_server_stats(s, &st);
    FS_CHECK_EQ(st.unauth, 4);
    FS_CHECK_EQ(st.evicted, 1);
    /* The survivors may still authenticate, and a client gets in (closing the next oldest). */
    raw_hello(fds[4]);
    fs_store_client_t *c = client(s);
    fs_error_t err;
    FS_CHECK_OK(fs_store_set(c, "k", "v", 1, 1000, &err), &err);
    fs_store_server_stats(s, &st);
    FS_CHECK_EQ(st.clients, 2);
    FS_CHECK(st.unauth <= 3);
    fs_store_close(c);
    for (int i = 0; i < 5; i++)
        close(fds[i]);
    /* Bad values. */
    fs_store_server_opts_t o = {0};
    fs_store_server_t *bad = NULL;
    o.token = TOKEN;
    o.max_unauth = -1;
    FS_CHECK_EQ(fs_store_server_start(&o, &bad, &err), FS_EINVAL);
    fs_store_server_stop(s);
}

FS_TEST(test_max_clients_refuses_hello_beyond)
{
    fs_store_server_t *s = start_limited(0, 2);
    fs_store_client_t *a = client(s), *b = client(s), *c = NULL;
    fs_error_t err;
    int rc;
    int64_t t0 = fs_now_ms();
    c = connect_to(s, TOKEN, &rc, &err);
    FS_CHECK_EQ(rc, FS_ETOOBIG); /* at once, not after the connect timeout */
    FS_CHECK(fs_now_ms() - t0 < 1000);
    FS_CHECK(strstr(err.msg, "max_clients") != NULL);
    fs_store_server_stats_t st;
    fs_store_server_stats(s, &st);
    FS_CHECK_EQ(st.clients, 2);
    FS_CHECK_EQ(st.refused, 1);
    fs_store_close(a);
    t0 = fs_now_ms();
    while (fs_store_server_num_clients(s) != 1 && fs_now_ms() - t0 < 2000)
        sleep_ms(10);
    c = client(s);
    FS_CHECK_OK(fs_store_set(c, "k", "v", 1, 1000, &err), &err);
    fs_store_close(b);
    fs_store_close(c);
    fs_store_server_stop(s);
}

/* Waits on FS_STORE_MAX_KEYS long missing keys: each parks ~3.9 MiB of key bytes. */
FS_TEST(test_parked_bytes_per_connection_are_bounded)
{
    fs_store_server_t *s = start_server(0, NULL);
    int fd = raw_connect(s);
    raw_hello(fd);
    static char keys[FS_STORE_MAX_KEYS][4001];
    static const char *ptrs[FS_STORE_MAX_KEYS];
    for (size_t i = 0; i < FS_STORE_MAX_KEYS; i++) {
        memset(keys[i], 'k', 4000);
        for (size_t j = 0; j < 4; j++) /* distinct keys, in letters: no NUL in them */
            keys[i][j] = (char)('a' + ((i >> (4 * j)) & 15));
        ptrs[i] = keys[i];
    }
    fs__store_buf_t b = {0};
    enum { WAITS = 4, FIT = 2 }; /* 2 x 3.9 MiB fit in FS__STORE_PARKED_MAX (8 MiB) */
    for (int i = 0; i < WAITS; i++) {
        frame(&b, 2 + (uint32_t)i, FS__OP_WAIT, (int)FS_STORE_MAX_KEYS, ptrs);
        raw_send(fd, b.p, b.len);
    }
    frame(&b, 100, FS__OP_NUM_KEYS, 0, ptrs);
    raw_send(fd, b.p, b.len);
    fs__store_buf_free(&b);
    /* Those beyond the limit are refused, the connection kept: num_keys is answered. */
    uint8_t reply[FS__STORE_HDR + 4 + FS_ERRMSG_LEN];
    int refused = 0;
    for (;;) {
        FS_CHECK_EQ(recv(fd, reply, FS__STORE_HDR, MSG_WAITALL), FS__STORE_HDR);
        size_t rest = fs__store_get_u32(reply) + 4 - FS__STORE_HDR;
        FS_CHECK(rest <= sizeof reply - FS__STORE_HDR);
        if (rest > sizeof reply - FS__STORE_HDR ||
            recv(fd, reply + FS__STORE_HDR, rest, MSG_WAITALL) != (ssize_t)rest)
            break;
        if (fs__store_get_u32(reply + 4) == 100)
            break;
        refused += (int8_t)reply[8] == FS_ETOOBIG;
    }
    FS_CHECK_EQ(refused, WAITS - FIT);
    fs_store_server_stats_t st;
    fs_store_server_stats(s, &st);
    FS_CHECK_EQ(st.parked, FIT);
    close(fd);
    fs_store_server_stop(s);
}

int main(void)
{
    return fs_test_main();
}
