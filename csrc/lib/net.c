/*
 * net.c - socket helpers shared by the store's server and client (see net.h).
 */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "net.h"

#define LISTEN_BACKLOG 4096

int fs__unix_addr(const char *who, const char *name, struct sockaddr_un *un, socklen_t *len,
                  fs_error_t *err)
{
    memset(un, 0, sizeof *un);
    un->sun_family = AF_UNIX;
    size_t n = strlen(name);
    if (n == 0 || n >= sizeof un->sun_path)
        return fs_error_set(err, FS_EINVAL, "%s: unix socket name must be 1..%zu bytes, got %zu",
                            who, sizeof un->sun_path - 1, n);
    if (name[0] == '@') { /* abstract: leading NUL, no terminator */
        memcpy(un->sun_path + 1, name + 1, n - 1);
        *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    } else {
        memcpy(un->sun_path, name, n);
        *len = (socklen_t)sizeof *un;
    }
    return FS_OK;
}

int fs__set_nodelay(int fd, int family)
{
    int one = 1;
    if (family == AF_UNIX)
        return 0;
    return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int resolve(const char *who, const char *node, int port, int passive, struct addrinfo **res,
                   fs_error_t *err)
{
    struct addrinfo hints = {0};
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
    int gai = getaddrinfo(node, portstr, &hints, res);
    if (gai != 0)
        return fs_error_set(err, passive ? FS_EINVAL : FS_ESYS, "%s: cannot resolve '%s': %s", who,
                            node ? node : "(any)", gai_strerror(gai));
    return FS_OK;
}

/* A listening socket on ai, or -1 with errno. */
static int listen_on(const struct addrinfo *ai)
{
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1, zero = 0;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        (ai->ai_family == AF_INET6 &&
         setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero) < 0) ||
        bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, LISTEN_BACKLOG) < 0) {
        (void)fs__close(fd); /* keeps errno */
        return -1;
    }
    return fd;
}

int fs__listen_tcp(const char *who, const char *host, int port, int *fd_out,
                   struct sockaddr_storage *bound, char *numeric_host, size_t host_cap,
                   int *bound_port, fs_error_t *err)
{
    const char *node = host == NULL ? "127.0.0.1" : (host[0] == '\0' ? NULL : host);
    struct addrinfo *res = NULL;
    int rc = resolve(who, node, port, 1, &res, err);
    if (rc < 0)
        return rc;
    int fd = -1, saved = 0;
    for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
        fd = listen_on(ai);
        saved = fd < 0 ? errno : 0;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        errno = saved;
        return fs_error_sys(err, "%s: cannot listen on %s port %d", who, node ? node : "(any)",
                            port);
    }
    socklen_t sl = sizeof *bound;
    char serv[16];
    int gai = 0;
    if (getsockname(fd, (struct sockaddr *)bound, &sl) < 0) {
        rc = fs_error_sys(err, "%s: getsockname", who);
    } else if ((gai = getnameinfo((struct sockaddr *)bound, sl, numeric_host, host_cap, serv,
                                  sizeof serv, NI_NUMERICHOST | NI_NUMERICSERV)) != 0) {
        rc = fs_error_set(err, FS_ESYS, "%s: getnameinfo: %s", who, gai_strerror(gai));
    }
    if (rc < 0) {
        (void)fs__close(fd);
        return rc;
    }
    *bound_port = atoi(serv);
    *fd_out = fd;
    return FS_OK;
}

int fs__listen_unix(const char *who, const char *name, int *fd_out, fs_error_t *err)
{
    struct sockaddr_un un;
    socklen_t len = 0;
    int rc = fs__unix_addr(who, name, &un, &len, err);
    if (rc < 0)
        return rc;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return fs_error_sys(err, "%s: socket(AF_UNIX)", who);
    if (bind(fd, (struct sockaddr *)&un, len) < 0 || listen(fd, LISTEN_BACKLOG) < 0) {
        rc = fs_error_sys(err, "%s: cannot listen on unix socket %s", who, name);
        (void)fs__close(fd);
        return rc;
    }
    *fd_out = fd;
    return FS_OK;
}

/* Wait for a non-blocking connect() to finish; 0 or -1 with errno (ETIMEDOUT). */
static int finish_connect(int fd, int64_t deadline)
{
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int pr;
    do {
        pr = poll(&p, 1, fs__poll_timeout(deadline));
    } while (pr < 0 && errno == EINTR);
    if (pr == 0) {
        errno = ETIMEDOUT;
        return -1;
    }
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    if (pr < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0)
        return -1;
    if (soerr != 0) {
        errno = soerr;
        return -1;
    }
    return 0;
}

static int connect_addr(const char *who, const struct sockaddr *sa, socklen_t len, int64_t deadline,
                        const char *shown, int *fd_out, fs_error_t *err)
{
    int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return fs_error_sys(err, "%s: socket", who);
    int rc = FS_OK;
    if (fs__set_nodelay(fd, sa->sa_family) < 0) {
        rc = fs_error_sys(err, "%s: setsockopt(TCP_NODELAY)", who);
    } else if (connect(fd, sa, len) < 0 && (errno != EINPROGRESS || finish_connect(fd, deadline))) {
        /* ECONNREFUSED / ENOENT (not listening yet), EAGAIN (unix backlog full): retried. */
        rc = fs_error_sys(err, "%s: connecting to %s", who, shown);
    }
    if (rc < 0) {
        (void)fs__close(fd);
        return rc;
    }
    *fd_out = fd;
    return FS_OK;
}

int fs__connect(const char *who, const char *host, int port, int64_t deadline, const char *shown,
                int *fd_out, fs_error_t *err)
{
    int rc;
    if (strncmp(host, "unix:", 5) == 0) {
        struct sockaddr_un un;
        socklen_t len = 0;
        if ((rc = fs__unix_addr(who, host + 5, &un, &len, err)) < 0)
            return rc;
        return connect_addr(who, (struct sockaddr *)&un, len, deadline, shown, fd_out, err);
    }
    struct addrinfo *res = NULL;
    if ((rc = resolve(who, host, port, 0, &res, err)) < 0)
        return rc;
    rc = FS_ESYS;
    for (struct addrinfo *ai = res; ai && rc != FS_OK; ai = ai->ai_next)
        rc = connect_addr(who, ai->ai_addr, ai->ai_addrlen, deadline, shown, fd_out, err);
    freeaddrinfo(res);
    return rc;
}

int fs__sock_bound_to(int fd, const struct sockaddr_storage *addr, const char *unix_name)
{
    struct sockaddr_storage ss = {0};
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0)
        return 0;
    if (ss.ss_family == AF_INET && addr->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)&ss;
        const struct sockaddr_in *b = (const struct sockaddr_in *)addr;
        return a->sin_port == b->sin_port && (b->sin_addr.s_addr == htonl(INADDR_ANY) ||
                                              a->sin_addr.s_addr == b->sin_addr.s_addr);
    }
    if (ss.ss_family == AF_INET6 && addr->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&ss;
        const struct sockaddr_in6 *b = (const struct sockaddr_in6 *)addr;
        return a->sin6_port == b->sin6_port &&
               (IN6_IS_ADDR_UNSPECIFIED(&b->sin6_addr) ||
                memcmp(&a->sin6_addr, &b->sin6_addr, sizeof a->sin6_addr) == 0);
    }
    if (ss.ss_family == AF_UNIX && unix_name[0] != '\0') {
        const struct sockaddr_un *un = (const struct sockaddr_un *)&ss;
        size_t plen = sl > offsetof(struct sockaddr_un, sun_path)
                          ? sl - offsetof(struct sockaddr_un, sun_path)
                          : 0;
        size_t want = strlen(unix_name);
        if (unix_name[0] == '@') /* abstract: sun_path[0] == '\0', no terminator */
            return plen == want && un->sun_path[0] == '\0' &&
                   memcmp(un->sun_path + 1, unix_name + 1, want - 1) == 0;
        return plen >= want && memcmp(un->sun_path, unix_name, want) == 0 &&
               (plen == want || un->sun_path[want] == '\0');
    }
    return 0;
}
