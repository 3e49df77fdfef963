/*
 * store_table.c - the store server's key table and the waiters parked on its keys.
 *
 * A chained hash table (FNV-1a with a random seed, so a client cannot pick keys that
 * collide) of entries. An entry exists while it holds a value or has requests parked on
 * it: a get / wait / multi_get whose key is missing parks a waiter on the entry of its
 * first missing key, and store_handle.c re-checks those waiters when the key is written.
 * Each waiter is also on its connection's list, so closing a connection frees them. A
 * waiter woken while its connection's output is over the limit sits on the connection's
 * queue instead of a key (store_handle.c answers it once the client reads).
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "store_server.h"

#define INITIAL_BUCKETS 1024

static uint64_t hash_key(uint64_t seed, const uint8_t *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL ^ seed;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h ^ (h >> 29);
}

int fs__table_init(struct fs__table *t, fs_error_t *err)
{
    memset(t, 0, sizeof *t);
    atomic_init(&t->nwaiters, 0);
    if (fs__getrandom(&t->seed, sizeof t->seed) < 0)
        return fs_error_sys(err, "store server: getrandom");
    t->nbuckets = INITIAL_BUCKETS;
    t->buckets = calloc(t->nbuckets, sizeof(struct fs__entry *));
    if (t->buckets == NULL)
        return fs_error_set(err, FS_ENOMEM, "store server: out of memory");
    return FS_OK;
}

void fs__table_free(struct fs__table *t)
{
    for (size_t i = 0; t->buckets && i < t->nbuckets; i++) {
        struct fs__entry *e = t->buckets[i];
        while (e) {
            struct fs__entry *next = e->next;
            free(e->val);
            free(e);
            e = next;
        }
    }
    free(t->buckets);
    t->buckets = NULL;
}

struct fs__entry *fs__table_find(struct fs__table *t, const uint8_t *k, size_t n)
{
    uint64_t h = hash_key(t->seed, k, n);
    for (struct fs__entry *e = t->buckets[h & (t->nbuckets - 1)]; e; e = e->next)
        if (e->hash == h && e->klen == n && memcmp(e->key, k, n) == 0)
            return e;
    return NULL;
}

static void table_grow(struct fs__table *t)
{
    size_t nb = t->nbuckets * 2;
    struct fs__entry **b = calloc(nb, sizeof(struct fs__entry *));
    if (b == NULL)
        return; /* keep the smaller table: slower, still correct */
    for (size_t i = 0; i < t->nbuckets; i++) {
        struct fs__entry *e = t->buckets[i];
        while (e) {
            struct fs__entry *next = e->next;
            e->next = b[e->hash & (nb - 1)];
            b[e->hash & (nb - 1)] = e;
            e = next;
        }
    }
    free(t->buckets);
    t->buckets = b;
    t->nbuckets = nb;
}

struct fs__entry *fs__table_get_or_add(struct fs__table *t, const uint8_t *k, size_t n)
{
    struct fs__entry *e = fs__table_find(t, k, n);
    if (e != NULL)
        return e;
    e = calloc(1, sizeof *e + n);
    if (e == NULL)
        return NULL;
    e->hash = hash_key(t->seed, k, n);
    e->klen = (uint32_t)n;
    if (n > 0)
        memcpy(e->key, k, n);
    if (t->nentries >= t->nbuckets)
        table_grow(t);
    size_t b = e->hash & (t->nbuckets - 1);
    e->next = t->buckets[b];
    t->buckets[b] = e;
    t->nentries++;
    return e;
}

void fs__table_maybe_drop(struct fs__table *t, struct fs__entry *e)
{
    if (e->has_value || e->wfirst != NULL)
        return;
    struct fs__entry **pp = &t->buckets[e->hash & (t->nbuckets - 1)];
    while (*pp != e)
        pp = &(*pp)->next;
    *pp = e->next;
    t->nentries--;
    free(e);
}

static void entry_mark_set(struct fs__table *t, struct fs__entry *e)
{
    if (!e->has_value)
        t->nkeys++;
    e->has_value = 1;
}

int fs__entry_set(struct fs__table *t, struct fs__entry *e, const void *v, size_t n)
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
    entry_mark_set(t, e);
    return FS_OK;
}

int fs__entry_append(struct fs__table *t, struct fs__entry *e, const void *v, size_t n)
{
    size_t old = e->has_value ? e->vlen : 0;
    if (n > 0) {
        uint8_t *p = realloc(e->val, old + n);
        if (p == NULL)
            return FS_ENOMEM;
        memcpy(p + old, v, n);
        e->val = p;
    }
    e->vlen = old + n;
    entry_mark_set(t, e);
    return FS_OK;
}

int fs__entry_delete(struct fs__table *t, struct fs__entry *e)
{
    if (!e->has_value)
        return 0;
    free(e->val);
    e->val = NULL;
    e->vlen = 0;
    e->has_value = 0;
    t->nkeys--;
    fs__table_maybe_drop(t, e);
    return 1;
}

/* ---- waiters ---------------------------------------------------------------------- */

size_t fs__waiter_size(const fs__store_msg_t *m)
{
    size_t bytes = sizeof(struct fs__waiter) + m->nargs * sizeof(fs__store_arg_t);
    for (unsigned i = 0; i < m->nargs; i++)
        bytes += m->args[i].len;
    return bytes;
}

struct fs__waiter *fs__waiter_new(struct fs__table *t, struct fs__conn *c, const fs__store_msg_t *m)
{
    size_t bytes = fs__waiter_size(m);
    struct fs__waiter *w = malloc(bytes);
    if (w == NULL)
        return NULL;
    memset(w, 0, sizeof *w);
    w->conn = c;
    w->bytes = bytes;
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
    c->parked_bytes += bytes;
    atomic_fetch_add_explicit(&t->nwaiters, 1, memory_order_relaxed);
    return w;
}

void fs__waiter_park(struct fs__waiter *w, struct fs__entry *e)
{
    w->on = e;
    w->knext = NULL;
    w->kprev = e->wlast;
    if (e->wlast)
        e->wlast->knext = w;
    else
        e->wfirst = w;
    e->wlast = w;
}

struct fs__waiter *fs__waiter_take_all(struct fs__entry *e)
{
    struct fs__waiter *list = e->wfirst;
    e->wfirst = e->wlast = NULL;
    for (struct fs__waiter *w = list; w; w = w->knext) {
        w->on = NULL;
        w->kprev = NULL; /* knext stays: it links the returned list */
    }
    return list;
}

void fs__waiter_queue(struct fs__waiter *w)
{
    struct fs__conn *c = w->conn;
    w->queued = 1;
    w->qnext = NULL;
    w->qprev = c->qlast;
    if (c->qlast)
        c->qlast->qnext = w;
    else
        c->qfirst = w;
    c->qlast = w;
}

static void waiter_unqueue(struct fs__waiter *w)
{
    struct fs__conn *c = w->conn;
    if (w->qprev)
        w->qprev->qnext = w->qnext;
    else
        c->qfirst = w->qnext;
    if (w->qnext)
        w->qnext->qprev = w->qprev;
    else
        c->qlast = w->qprev;
    w->queued = 0;
    w->qprev = w->qnext = NULL;
}

struct fs__waiter *fs__waiter_dequeue(struct fs__conn *c)
{
    struct fs__waiter *w = c->qfirst;
    if (w != NULL)
        waiter_unqueue(w);
    return w;
}

/* Take w off the key it is parked on, or off its connection's queue. */
static void waiter_unlink_key(struct fs__table *t, struct fs__waiter *w)
{
    if (w->queued) {
        waiter_unqueue(w);
        return;
    }
    struct fs__entry *e = w->on;
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
    fs__table_maybe_drop(t, e);
}

void fs__waiter_free(struct fs__table *t, struct fs__waiter *w)
{
    waiter_unlink_key(t, w);
    struct fs__conn *c = w->conn;
    if (w->cprev)
        w->cprev->cnext = w->cnext;
    else
        c->wfirst = w->cnext;
    if (w->cnext)
        w->cnext->cprev = w->cprev;
    else
        c->wlast = w->cprev;
    c->parked_bytes -= w->bytes;
    atomic_fetch_sub_explicit(&t->nwaiters, 1, memory_order_relaxed);
    free(w);
}

void fs__conn_drop_waiters(struct fs__table *t, struct fs__conn *c)
{
    struct fs__waiter *w = c->wfirst;
    while (w) {
        struct fs__waiter *next = w->cnext;
        fs__waiter_free(t, w);
        w = next;
    }
}
