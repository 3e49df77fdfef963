/*
 * store_fork.c - the store server's fork registry: a child forked while a server runs
 * must not keep the server's sockets open (a dead launcher's port would stay bound; a
 * dead rank's connection would stay open). A pthread_atfork child handler closes, with
 * async-signal-safe calls only, every registered server's listeners, eventfd and epoll
 * fd, and every other fd of the child that is a socket bound to a server's address
 * (the accepted connections, whose numbers change too fast to register).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "internal.h"
#include "store_server.h"

#define MAX_SERVERS 16

struct reg_slot {
    atomic_int used;              /* 0 free, 2 being filled (the handler skips it), 1 live */
    int fds[4];                   /* listeners, wakefd, epoll fd; -1 unused */
    struct sockaddr_storage addr; /* bound TCP address: port, and the IP unless a wildcard */
    char unix_path[FS__UNIX_NAME_CAP];
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

static int bound_to_a_server(int fd)
{
    for (int i = 0; i < MAX_SERVERS; i++) {
        if (atomic_load(&registry[i].used) == 1 &&
            fs__sock_bound_to(fd, &registry[i].addr, registry[i].unix_path))
            return 1;
    }
    return 0;
}

/* Close every open fd that is a socket of a registered server (/proc/self/fd). */
static void close_server_sockets(void)
{
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
            if (fd != dfd && bound_to_a_server(fd))
                (void)fs__close(fd);
        }
    }
    (void)fs__close(dfd);
}

static void atfork_child(void)
{
    int any = 0;
    for (int i = 0; i < MAX_SERVERS; i++) {
        if (atomic_load(&registry[i].used) != 1)
            continue;
        any = 1;
        for (int j = 0; j < 4; j++)
            (void)fs__close(registry[i].fds[j]); /* best effort; nothing to report to */
    }
    if (any)
        close_server_sockets();
}

static void atfork_init(void)
{
    atfork_rc = pthread_atfork(NULL, NULL, atfork_child);
}

int fs__store_fork_register(fs_store_server_t *s, fs_error_t *err)
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

void fs__store_fork_unregister(fs_store_server_t *s)
{
    if (s->registry_slot >= 0)
        atomic_store(&registry[s->registry_slot].used, 0);
    s->registry_slot = -1;
}
