/*
 * store_handle.c - the store server's requests: one handle_* function per request kind
 * (torch c10d Store semantics), dispatched by fs__store_handle. A request is handled
 * only once its whole frame is in (store_conn.c), in one go on the server thread, so a
 * client that disconnects mid-request leaves nothing half done.
 *
 * A blocking request (get / wait / multi_get) whose keys are missing is parked as a
 * waiter on the first missing key (store_table.c) and answered when that key is written;
 * the client enforces the deadline and sends CANCEL. Its answer obeys the per-client
 * output limit like any other reply (store_server.h, FS__STORE_WBUF_HIGH): woken while
 * its client's output is over the limit, it is queued with no value copied, and answered
 * with the value the key holds once the client has read (fs__store_answer_queued).
 * Closing such a client instead (redis's client-output-buffer-limit) would punish a slow
 * reader for what costs the server nothing to keep: the value stays in the table.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "store_server.h"

#define KEY_SHOWN 200 /* room for a key quoted in a message */

/* ---- blocking requests ------------------------------------------------------------ */

/*
 * Answer a get / wait / multi_get if every key has a value: returns 1 when
 * answered, or 0 with *missing set to the first key that has none.
 */
static int try_answer(fs_store_server_t *s, struct fs__conn *c, uint32_t id, int op,
                      const fs__store_arg_t *keys, uint32_t n, uint32_t *missing)
{
    size_t total = FS__STORE_HDR;
    for (uint32_t i = 0; i < n; i++) {
        struct fs__entry *e = fs__table_find(&s->table, keys[i].p, keys[i].len);
        if (e == NULL || !e->has_value) {
            *missing = i;
            return 0;
        }
        total += 4 + e->vlen;
    }
    if (op == FS__OP_WAIT) {
        fs__reply_ok(s, c, id);
        return 1;
    }
    if (total > s->max_frame) {
        fs__reply_err(s, c, id, FS_ETOOBIG,
                      "store %s: the %u values total %zu bytes, more than one reply may carry "
                      "(%zu); ask for fewer keys at a time",
                      fs__store_op_name(op), n, total, s->max_frame);
        return 1;
    }
    struct fs__reply r = fs__reply_begin(s, c, id, FS_OK);
    if (r.ok && fs__store_buf_reserve(&c->out, total, NULL) < 0)
        r.ok = 0; /* out of memory: fs__reply_end closes the connection */
    for (uint32_t i = 0; i < n && r.ok; i++) {
        struct fs__entry *e = fs__table_find(&s->table, keys[i].p, keys[i].len);
        fs__reply_arg(s, &r, e->val, e->vlen);
    }
    fs__reply_end(s, &r);
    return 1;
}

/* Re-check a parked request: answer and free it, or park it on its first missing key. */
static void waiter_eval(fs_store_server_t *s, struct fs__waiter *w)
{
    uint32_t missing = 0;
    if (try_answer(s, w->conn, w->id, w->op, w->keys, w->nkeys, &missing)) {
        fs__waiter_free(&s->table, w);
        return;
    }
    struct fs__entry *e = fs__table_get_or_add(&s->table, w->keys[missing].p, w->keys[missing].len);
    if (e == NULL) {
        fs__reply_err(s, w->conn, w->id, FS_ENOMEM, "store server out of memory parking a %s",
                      fs__store_op_name(w->op));
        fs__waiter_free(&s->table, w);
        return;
    }
    fs__waiter_park(w, e);
}

/* A key got a value: re-check everything parked on it, or queue what cannot be answered
   now for want of room in its client's output. */
static void wake(fs_store_server_t *s, struct fs__entry *e)
{
    struct fs__waiter *w = fs__waiter_take_all(e);
    while (w) {
        struct fs__waiter *next = w->knext;
        w->knext = NULL;
        if (fs__conn_out_full(w->conn))
            fs__waiter_queue(w);
        else
            waiter_eval(s, w);
        w = next;
    }
}

void fs__store_answer_queued(fs_store_server_t *s, struct fs__conn *c)
{
    while (c->qfirst != NULL && !fs__conn_out_full(c) && !c->kill_pending)
        waiter_eval(s, fs__waiter_dequeue(c)); /* answers it, or parks it again */
}

/* get, wait, multi_get: answer now, or park until the keys exist. */
static void handle_get(fs_store_server_t *s, struct fs__conn *c, const fs__store_msg_t *m)
{
    uint32_t missing = 0;
    if (try_answer(s, c, m->id, m->code, m->args, m->nargs, &missing))
        return;
    size_t bytes = fs__waiter_size(m);
    if (c->parked_bytes + bytes > FS__STORE_PARKED_MAX) {
        /* Our client parks one request at a time: this one pipelines without reading. */
        fs__reply_err(s, c, m->id, FS_ETOOBIG,
                      "store %s: this connection has %zu bytes of requests parked already; "
                      "the limit is %zu",
                      fs__store_op_name(m->code), c->parked_bytes, FS__STORE_PARKED_MAX);
        return;
    }
    struct fs__waiter *w = fs__waiter_new(&s->table, c, m);
    if (w == NULL) {
        fs__reply_err(s, c, m->id, FS_ENOMEM, "store server out of memory parking a %s",
                      fs__store_op_name(m->code));
        return;
    }
    waiter_eval(s, w);
}

/* cancel: the client gave up on a parked request; no reply. */
static void handle_cancel(fs_store_server_t *s, struct fs__conn *c, const fs__store_msg_t *m)
{
    uint32_t id = fs__store_get_u32(m->args[0].p);
    for (struct fs__waiter *w = c->wfirst; w; w = w->cnext) {
        if (w->id == id) {
            fs__waiter_free(&s->table, w);
            return;
        }
    }
}

/* ---- writes ----------------------------------------------------------------------- */

/* Store v under k and wake what waits for k. On failure replies with the error, 0. */
static int store_value(fs_store_server_t *s, struct fs__conn *c, uint32_t id,
                       const fs__store_arg_t *k, const fs__store_arg_t *v)
{
    struct fs__entry *e = fs__table_get_or_add(&s->table, k->p, k->len);
    if (e == NULL || fs__entry_set(&s->table, e, v->p, v->len) < 0) {
        char kb[KEY_SHOWN];
        fs__store_fmt_key(kb, sizeof kb, k->p, k->len);
        fs__reply_err(s, c, id, FS_ENOMEM, "store server out of memory storing %s (%u bytes)", kb,
                      v->len);
        if (e != NULL)
            fs__table_maybe_drop(&s->table, e);
        return 0;
    }
    wake(s, e);
    return 1;
}

static void handle_set(fs_store_server_t *s, struct fs__conn *c, const fs__store_msg_t *m)
{
    if (store_value(s, c, m->id, &m->args[0], &m->args[1]))
        fs__reply_ok(s, c, m->id);
}

/* multi_set: key, value, key, value... applied in order within one request. */
static void handle_multi_set(fs_store_server_t *s, struct fs__conn *c, const fs__store_msg_t *m)
{
    for (unsigned i = 0; i + 1 < m->nargs; i += 2)
        if (!store_value(s, c, m->id, &m->args[i], &m->args[i + 1]))
            return;
    fs__reply_ok(s, c, m->id);
}

static void handle_add(fs_store_server_t *s, struct fs__conn *c, const fs__store_msg_t *m)
{
    const fs__store_arg_t *k = &m->args[0];
    int64_t delta = (int64_t)fs__store_get_u64(m->args[1].p), cur = 0, now;
    char kb[KEY_SHOWN];
    struct fs__entry *e = fs__table_find(&s->table, k->p, k->len);
    if (e != NULL && e->has_value && fs__store_parse_i64(e->val, e->vlen, &cur) < 0) {
        fs__store_fmt_key(kb, sizeof kb, k->p, k->len);
        fs__reply_err(s, c, m->id, FS_EINVAL,
                      "store add(%s): the key holds %zu bytes that are not a decimal integer", kb,
                      e->vlen);
        return;
    }
    if (__builtin_add_overflow(cur, delta, &now)) {
        fs__store_fmt_key(kb, sizeof kb, k->p, k->len);
        fs__reply_err(s, c, m->id, FS_EINVAL, "store add(%s): %lld + %lld overflows int64", kb,
                      (long long)cur, (long long)delta);
        return;
    }
    char num[24];
    int n = snprintf(num, sizeof num, "%lld", (long long)now);
    fs__store_arg_t v = {(const uint8_t *)num, (uint32_t)n};
    if (!store_value(s, c, m->id, k, &v))
        return;
    struct fs__reply r = fs__reply_begin(s, c, m->id, FS_OK);
    fs__reply_i64(s, &r, now);
    fs__reply_end(s, &r);
}

/* compare_set: torch semantics; the reply carries the value now stored. */
static void handle_cas(fs_store_server_t *s, struct fs__conn *c, const fs__store_msg_t *m)
{
    const fs__store_arg_t *k = &m->args[0], *expected = &m->args[1], *desired = &m->args[2];
    struct fs__entry *e = fs__table_find(&s->table, k->p, k->len);
    int present = e != NULL && e->has_value;
    const fs__store_arg_t *answer = expected;
    if (present && !(e->vlen == expected->len &&
                     (e->vlen == 0 || memcmp(e->val, expected->p, e->vlen) == 0))) {
        struct fs__reply r = fs__reply_begin(s, c, m->id, FS_OK);
        fs__reply_arg(s, &r, e->val, e->vlen);
        fs__reply_end(s, &r);
        return;
    }
    /* A missing key counts as empty; with `expected` not empty it stays missing and the
       reply is `expected` itself (torch). */
    if (present || expected->len == 0) {
        if (!store_value(s, c, m->id, k, desired))
            return;
        answer = desired;
    }
    struct fs__reply r = fs__reply_begin(s, c, m->id, FS_OK);
    fs__reply_arg(s, &r, answer->p, answer->len);
    fs__reply_end(s, &r);
}

static void handle_append(fs_store_server_t *s, struct fs__conn *c, const fs__store_msg_t *m)
{
    const fs__store_arg_t *k = &m->args[0], *v = &m->args[1];
    struct fs__entry *e = fs__table_get_or_add(&s->table, k->p, k->len);
    size_t old = e != NULL && e->has_value ? e->vlen : 0;
    int rc = e == NULL ? FS_ENOMEM : old + v->len > s->max_value ? FS_ETOOBIG : FS_OK;
    if (rc == FS_OK)
        rc = fs__entry_append(&s->table, e, v->p, v->len);
    if (rc == FS_OK) {
        wake(s, e);
        fs__reply_ok(s, c, m->id);
        return;
    }
    char kb[KEY_SHOWN];
    fs__store_fmt_key(kb, sizeof kb, k->p, k->len);
    if (rc == FS_ETOOBIG)
        fs__reply_err(s, c, m->id, FS_ETOOBIG,
                      "store append(%s): the value would grow to %zu bytes, over the limit of %zu",
                      kb, old + v->len, s->max_value);
    else
        fs__reply_err(s, c, m->id, FS_ENOMEM, "store server out of memory appending to %s", kb);
    if (e != NULL)
        fs__table_maybe_drop(&s->table, e);
}

static void handle_delete(fs_store_server_t *s, struct fs__conn *c, const fs__store_msg_t *m)
{
    struct fs__entry *e = fs__table_find(&s->table, m->args[0].p, m->args[0].len);
    int existed = e != NULL && fs__entry_delete(&s->table, e);
    struct fs__reply r = fs__reply_begin(s, c, m->id, FS_OK);
    fs__reply_i64(s, &r, existed);
    fs__reply_end(s, &r);
}

/* ---- reads ------------------------------------------------------------------------ */

/* check: one byte per key, 1 when it has a value. */
static void handle_check(fs_store_server_t *s, struct fs__conn *c, const fs__store_msg_t *m)
{
    uint8_t flags[FS_STORE_MAX_KEYS];
    for (unsigned i = 0; i < m->nargs; i++) {
        struct fs__entry *e = fs__table_find(&s->table, m->args[i].p, m->args[i].len);
        flags[i] = e != NULL && e->has_value;
    }
    struct fs__reply r = fs__reply_begin(s, c, m->id, FS_OK);
    fs__reply_arg(s, &r, flags, m->nargs);
    fs__reply_end(s, &r);
}

static void handle_num_keys(fs_store_server_t *s, struct fs__conn *c, const fs__store_msg_t *m)
{
    struct fs__reply r = fs__reply_begin(s, c, m->id, FS_OK);
    fs__reply_i64(s, &r, (int64_t)s->table.nkeys);
    fs__reply_end(s, &r);
}

/* ---- authentication --------------------------------------------------------------- */

static int token_equal(const fs_store_server_t *s, const uint8_t *p, size_t n)
{
    /* Constant time in the presented token's content: always walk our whole token. */
    volatile unsigned char diff = (unsigned char)(n != s->token_len);
    for (size_t i = 0; i < s->token_len; i++)
        diff |= s->token[i] ^ (i < n ? p[i] : 0);
    return diff == 0;
}

static void handle_hello(fs_store_server_t *s, struct fs__conn *c, const fs__store_msg_t *m)
{
    const size_t mlen = sizeof FS__STORE_MAGIC - 1;
    if (m->code != FS__OP_HELLO) {
        fs__conn_kill(s, c);
        return;
    }
    c->closing = 1; /* unless everything below checks out */
    if (m->args[0].len != mlen || memcmp(m->args[0].p, FS__STORE_MAGIC, mlen) != 0) {
        fs__reply_err(
            s, c, m->id, FS_EPROTO,
            "store protocol mismatch: the server speaks %s; upgrade fastspawn on both sides",
            FS__STORE_MAGIC);
        return;
    }
    if (!token_equal(s, m->args[1].p, m->args[1].len)) {
        fs__reply_err(s, c, m->id, FS_EAUTH,
                      "store server rejected the connection: wrong token (check "
                      "FASTSPAWN_STORE_TOKEN matches the launcher's)");
        return;
    }
    size_t authed = atomic_load(&s->counts.nclients) - atomic_load(&s->counts.nunauth);
    if (authed >= s->max_clients) {
        atomic_fetch_add_explicit(&s->counts.refused, 1, memory_order_relaxed);
        fs__reply_err(s, c, m->id, FS_ETOOBIG,
                      "store server has %zu clients, its limit (max_clients; by default half "
                      "the launcher's RLIMIT_NOFILE): close unused clients, or raise ulimit -n",
                      authed);
        return;
    }
    c->closing = 0;
    fs__conn_authed(s, c);
    struct fs__reply r = fs__reply_begin(s, c, m->id, FS_OK);
    fs__reply_i64(s, &r, (int64_t)s->max_value);
    fs__reply_end(s, &r);
}

void fs__store_handle(fs_store_server_t *s, struct fs__conn *c, const fs__store_msg_t *m)
{
    if (!c->authed) {
        handle_hello(s, c, m);
        return;
    }
    switch (m->code) {
    case FS__OP_SET: handle_set(s, c, m); return;
    case FS__OP_GET:
    case FS__OP_WAIT:
    case FS__OP_MULTI_GET: handle_get(s, c, m); return;
    case FS__OP_ADD: handle_add(s, c, m); return;
    case FS__OP_CAS: handle_cas(s, c, m); return;
    case FS__OP_CHECK: handle_check(s, c, m); return;
    case FS__OP_DELETE: handle_delete(s, c, m); return;
    case FS__OP_NUM_KEYS: handle_num_keys(s, c, m); return;
    case FS__OP_MULTI_SET: handle_multi_set(s, c, m); return;
    case FS__OP_APPEND: handle_append(s, c, m); return;
    case FS__OP_CANCEL: handle_cancel(s, c, m); return;
    default: fs__conn_kill(s, c); return; /* HELLO twice; others were rejected by the check */
    }
}
