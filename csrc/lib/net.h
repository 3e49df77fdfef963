/*
 * net.h - socket helpers shared by the store's server and client (net.c), after redis's
 * anet.c: listening, connecting with a deadline, Unix socket names (abstract ones
 * included) and socket options. Internal to csrc/lib/.
 *
 * A Unix socket is named "@name" (the abstract namespace: sun_path starts with a NUL and
 * the name is not NUL-terminated) or by a filesystem path. Every socket made here is
 * non-blocking and close-on-exec. Messages start with `who` ("store server", "store").
 */
#ifndef FS_NET_H
#define FS_NET_H

#include <stdint.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "fastspawn.h"

/* Room for a Unix socket name as we write it: "@name" or a path, and the NUL. */
#define FS__UNIX_NAME_CAP (sizeof(((struct sockaddr_un *)0)->sun_path) + 1)

/* The sockaddr for a Unix socket name; FS_EINVAL when it is empty or too long. */
int fs__unix_addr(const char *who, const char *name, struct sockaddr_un *un, socklen_t *len,
                  fs_error_t *err);

/*
 * Listen on host:port (host NULL: 127.0.0.1; "": every address, IPv6 and IPv4; port 0: an
 * ephemeral port). Fills *fd, the bound address, its numeric host and its port.
 */
int fs__listen_tcp(const char *who, const char *host, int port, int *fd,
                   struct sockaddr_storage *bound, char *numeric_host, size_t host_cap,
                   int *bound_port, fs_error_t *err);
/* Listen on a Unix socket name. */
int fs__listen_unix(const char *who, const char *name, int *fd, fs_error_t *err);

/*
 * Connect to `host` ("unix:NAME", or an address or name tried address by address) and
 * port before deadline (fs_now_ms clock; INT64_MAX: none); TCP sockets get TCP_NODELAY.
 * `shown` names the peer in messages. Failures worth retrying (nobody listening yet, a
 * full backlog, a timeout) are FS_ESYS; a bad address is FS_EINVAL.
 */
int fs__connect(const char *who, const char *host, int port, int64_t deadline, const char *shown,
                int *fd, fs_error_t *err);

/* TCP_NODELAY on a TCP socket; 0 (nothing to do) for AF_UNIX. Returns 0 or -1 (errno). */
int fs__set_nodelay(int fd, int family);

/*
 * 1 when fd is a socket whose local address is `addr` (TCP: the port, and the IP unless
 * addr is a wildcard) or, with unix_name non-empty, that Unix socket; else 0.
 * Async-signal-safe (getsockname, byte compares): the store's fork handler uses it.
 */
int fs__sock_bound_to(int fd, const struct sockaddr_storage *addr, const char *unix_name);

#endif /* FS_NET_H */
