/*
 * shm_seg.c - the file behind a communicator's segment: rank 0 makes it (a memfd, or a
 * name in /dev/shm), sizes it, reserves its memory and maps it; the handle that tells the
 * other ranks where it is; a peer's open, which checks the file before mapping it; and
 * the end of set-up: rank 0's fd closed, the name unlinked. The header inside (and its
 * cookie) is shm.c's.
 *
 * Why a memfd: a file with no name cannot be left behind. The peers reach it through
 * /proc/<pid>/fd/<fd> of rank 0, which the kernel lets a process of the same user open
 * (ptrace READ access; Yama restricts only ATTACH) while rank 0 holds that fd; the
 * memory then lives exactly as long as some mapping of it, whoever dies when.
 *
 * Why reserve: a tmpfs page is allocated when first touched, and when /dev/shm (Docker:
 * 64 MB) or the memory cgroup is full by then, the touching rank dies by SIGBUS in the
 * middle of a collective. posix_fallocate allocates every page at set-up, where running
 * out is an error that says what to do.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "internal.h"
#include "shm.h"

#ifndef MFD_NOEXEC_SEAL
#define MFD_NOEXEC_SEAL 0x0008U /* Linux 6.3 */
#endif

/* Fixed size: no rank, nor anyone else, can shrink the file under the mappings (SIGBUS). */
#define SIZE_SEALS (F_SEAL_SHRINK | F_SEAL_GROW)
#define SHM_ENV "FASTSPAWN_SHM"

static double mib(size_t bytes)
{
    return (double)bytes / (1024.0 * 1024.0);
}

/* ------------------------------------------------------------------ */
/* The handle                                                         */
/* ------------------------------------------------------------------ */

static void hex_encode(char *out, const unsigned char *in, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * n] = '\0';
}

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Exactly 2n lowercase hex digits, then the end of the string. */
static int hex_decode(unsigned char *out, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int hi = hex_digit(p[2 * i]);
        int lo = hi < 0 ? -1 : hex_digit(p[2 * i + 1]); /* p[2i] was not the NUL */
        if (lo < 0)
            return -1;
        out[i] = (unsigned char)(hi << 4 | lo);
    }
    return p[2 * n] == '\0' ? 0 : -1;
}

/* Digits only (no sign, no blanks) in 0..INT_MAX, ending at `end`; *p moves past it. */
static int parse_int(const char **p, char end, int *out)
{
    int v = 0;
    const char *q = *p;
    for (; *q >= '0' && *q <= '9'; q++) {
        if (v > (INT_MAX - (*q - '0')) / 10)
            return -1;
        v = v * 10 + (*q - '0');
    }
    if (q == *p || *q != end)
        return -1;
    *out = v;
    *p = q + 1;
    return 0;
}

/* "memfd:<pid>:<fd>:" or "named:/<name>:", then the cookie. */
static int parse_handle(struct fs__seg *seg, const char *h, pid_t *pid)
{
    const char *p;
    if (strncmp(h, FS__SEG_MEMFD_PREFIX, strlen(FS__SEG_MEMFD_PREFIX)) == 0) {
        int pv, fv;
        p = h + strlen(FS__SEG_MEMFD_PREFIX);
        if (parse_int(&p, ':', &pv) < 0 || parse_int(&p, ':', &fv) < 0 || pv == 0)
            return -1;
        seg->kind = FS_SHM_MEMFD;
        *pid = (pid_t)pv;
        snprintf(seg->name, sizeof seg->name, "/proc/%d/fd/%d", pv, fv);
    } else if (strncmp(h, FS__SEG_NAMED_PREFIX, strlen(FS__SEG_NAMED_PREFIX)) == 0) {
        p = h + strlen(FS__SEG_NAMED_PREFIX);
        const char *colon = strchr(p, ':');
        size_t n = colon != NULL ? (size_t)(colon - p) : 0;
        if (n < 2 || n >= sizeof seg->name || p[0] != '/' || memchr(p + 1, '/', n - 1) != NULL)
            return -1;
        memcpy(seg->name, p, n);
        seg->name[n] = '\0';
        seg->kind = FS_SHM_NAMED;
        p = colon + 1;
    } else {
        return -1;
    }
    return hex_decode(seg->cookie, p, sizeof seg->cookie);
}

static void format_handle(struct fs__seg *seg)
{
    char cookie[2 * FS__SHM_COOKIE_LEN + 1];
    hex_encode(cookie, seg->cookie, sizeof seg->cookie);
    if (seg->kind == FS_SHM_MEMFD)
        snprintf(seg->handle, sizeof seg->handle, FS__SEG_MEMFD_PREFIX "%d:%d:%s", (int)getpid(),
                 seg->fd, cookie);
    else
        snprintf(seg->handle, sizeof seg->handle, FS__SEG_NAMED_PREFIX "%s:%s", seg->name, cookie);
}

/* ------------------------------------------------------------------ */
/* Rank 0: make, size, reserve, map                                   */
/* ------------------------------------------------------------------ */

/* FS_SHM_AUTO becomes $FASTSPAWN_SHM's kind, or a memfd that may fall back to a name. */
static int resolve_kind(int kind, int *out, int *may_fall_back, fs_error_t *err)
{
    *may_fall_back = 0;
    *out = kind;
    if (kind == FS_SHM_MEMFD || kind == FS_SHM_NAMED)
        return FS_OK;
    if (kind != FS_SHM_AUTO)
        return fs_error_set(err, FS_EINVAL, "shm kind %d is not FS_SHM_AUTO, _MEMFD or _NAMED",
                            kind);
    const char *v = getenv(SHM_ENV);
    if (v != NULL && strcmp(v, "memfd") == 0)
        *out = FS_SHM_MEMFD;
    else if (v != NULL && strcmp(v, "named") == 0)
        *out = FS_SHM_NAMED;
    else if (v != NULL && v[0] != '\0' && strcmp(v, "auto") != 0)
        return fs_error_set(err, FS_EINVAL, SHM_ENV "=%s: expected memfd, named or auto", v);
    else {
        *out = FS_SHM_MEMFD;
        *may_fall_back = 1;
    }
    return FS_OK;
}

/* Never executable where the kernel has MFD_NOEXEC_SEAL (before Linux 6.3: EINVAL). */
static int new_memfd(void)
{
    int fd = memfd_create(FS__SEG_MEMFD_NAME, MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL);
    if (fd < 0 && errno == EINVAL)
        fd = memfd_create(FS__SEG_MEMFD_NAME, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    return fd;
}

/* A fresh name that says nothing (no pid, not the cookie), mode 0600 whatever the umask. */
static int new_named(struct fs__seg *seg, fs_error_t *err)
{
    unsigned char rnd[16];
    char hex[2 * sizeof rnd + 1];
    if (fs__getrandom(rnd, sizeof rnd) < 0)
        return fs_error_sys(err, "getrandom");
    hex_encode(hex, rnd, sizeof rnd);
    snprintf(seg->name, sizeof seg->name, "/fastspawn-%s", hex);
    seg->fd = shm_open(seg->name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (seg->fd < 0)
        return fs_error_sys(err, "shm_open(%s, O_CREAT|O_EXCL)", seg->name);
    seg->linked = 1;
    if (fchmod(seg->fd, 0600) < 0) /* the umask may have taken the peers' rw away */
        return fs_error_sys(err, "fchmod(/dev/shm%s, 0600)", seg->name);
    return FS_OK;
}

static int new_file(struct fs__seg *seg, int may_fall_back, fs_error_t *err)
{
    if (seg->kind == FS_SHM_MEMFD) {
        seg->fd = new_memfd();
        if (seg->fd >= 0) {
            snprintf(seg->name, sizeof seg->name, "/proc/%d/fd/%d", (int)getpid(), seg->fd);
            return FS_OK;
        }
        /* A sandbox without memfd_create (seccomp, old kernels): the named fallback. */
        if (!may_fall_back || (errno != ENOSYS && errno != EPERM && errno != EACCES))
            return fs_error_sys(err, "memfd_create (" SHM_ENV "=named uses /dev/shm instead)");
        seg->kind = FS_SHM_NAMED;
    }
    return new_named(seg, err);
}

/* posix_fallocate failed with ENOSPC / ENOMEM: what was needed, where from, what to do. */
static int no_room(const struct fs__seg *seg, const struct fs__seg_size *sz, int e, fs_error_t *err)
{
    char why[128], room[80] = "";
    const char *text = strerror_r(e, why, sizeof why); /* GNU: the string to use */
    struct statvfs v;
    if (seg->kind == FS_SHM_MEMFD)
        return fs_error_set(
            err, FS_ENOMEM,
            "cannot reserve %.1f MiB of shared memory for %d ranks (%.1f MiB slot each): %s. "
            "The segment is a memfd, RAM charged to this process's memory cgroup (the "
            "container's memory limit): free memory or raise the limit, use a smaller segment "
            "(FASTSPAWN_SLOT_BYTES or the slot_bytes option) or fewer ranks",
            mib(sz->total), sz->world, mib(sz->slot_bytes), text);
    if (statvfs("/dev/shm", &v) == 0)
        snprintf(room, sizeof room, " (%.1f MiB free of %.1f MiB)",
                 mib((size_t)v.f_bavail * v.f_frsize), mib((size_t)v.f_blocks * v.f_frsize));
    return fs_error_set(
        err, FS_ENOMEM,
        "cannot reserve %.1f MiB of shared memory for %d ranks (%.1f MiB slot each) in "
        "/dev/shm%s: %s. Give /dev/shm more room (Docker: --shm-size=1g), use a smaller "
        "segment (FASTSPAWN_SLOT_BYTES or the slot_bytes option) or fewer ranks, or unset " SHM_ENV
        "=named (a memfd does not use /dev/shm)",
        mib(sz->total), sz->world, mib(sz->slot_bytes), room, text);
}

/* Allocate every page now (see the top of the file). */
static int reserve(struct fs__seg *seg, const struct fs__seg_size *sz, fs_error_t *err)
{
    int rc;
    do /* returns the error number, errno untouched; a signal interrupts a large one */
        rc = posix_fallocate(seg->fd, 0, (off_t)sz->total);
    while (rc == EINTR);
    if (rc == ENOSPC || rc == ENOMEM)
        return no_room(seg, sz, rc, err);
    if (rc != 0) {
        errno = rc;
        return fs_error_sys(err, "posix_fallocate(%s, %zu bytes)", seg->name, sz->total);
    }
    return FS_OK;
}

static int size_and_map(struct fs__seg *seg, const struct fs__seg_size *sz, fs_error_t *err)
{
    if (ftruncate(seg->fd, (off_t)sz->total) < 0)
        return fs_error_sys(err, "ftruncate(%s, %zu)", seg->name, sz->total);
    int rc = reserve(seg, sz, err);
    if (rc != FS_OK)
        return rc;
    if (seg->kind == FS_SHM_MEMFD && fcntl(seg->fd, F_ADD_SEALS, SIZE_SEALS | F_SEAL_SEAL) < 0)
        return fs_error_sys(err, "fcntl(%s, F_ADD_SEALS)", seg->name);
    void *base = mmap(NULL, sz->total, PROT_READ | PROT_WRITE, MAP_SHARED, seg->fd, 0);
    if (base == MAP_FAILED)
        return fs_error_sys(err, "mmap(%s, %zu bytes)", seg->name, sz->total);
    seg->base = base;
    seg->len = sz->total;
    return FS_OK;
}

int fs__seg_create(struct fs__seg *seg, int kind, const struct fs__seg_size *sz, fs_error_t *err)
{
    int may_fall_back;
    int rc = resolve_kind(kind, &seg->kind, &may_fall_back, err);
    if (rc == FS_OK && fs__getrandom(seg->cookie, sizeof seg->cookie) < 0)
        rc = fs_error_sys(err, "getrandom");
    if (rc == FS_OK)
        rc = new_file(seg, may_fall_back, err);
    if (rc == FS_OK)
        rc = size_and_map(seg, sz, err);
    if (rc != FS_OK) {
        fs__seg_release(seg, 0);
        return rc;
    }
    format_handle(seg); /* fd stays open: the peers open it through /proc */
    return FS_OK;
}

/* ------------------------------------------------------------------ */
/* Other ranks: open and check, map                                   */
/* ------------------------------------------------------------------ */

/* 1 if the link at path reads "/memfd:fastspawn" (then " (deleted)"); link gets it. */
static int is_segment_link(const char *path, char *link, size_t len)
{
    ssize_t n = readlink(path, link, len - 1);
    if (n < 0)
        return -1;
    link[n] = '\0';
    size_t want = strlen("/memfd:" FS__SEG_MEMFD_NAME);
    return strncmp(link, "/memfd:" FS__SEG_MEMFD_NAME, want) == 0 &&
           (link[want] == '\0' || link[want] == ' ');
}

static int not_a_segment(const struct fs__seg *seg, const char *link, int rank, fs_error_t *err)
{
    return fs_error_set(err, FS_EPROTO,
                        "rank %d: %s is %s, not a fastspawn segment (a stale handle, or one "
                        "from another machine or pid namespace)",
                        rank, seg->name, link);
}

/* After the open: what was opened (not what the link said a moment before) is rank 0's
   sealed memfd. A stale fd number may by now name any file of rank 0's. */
static int check_memfd(struct fs__seg *seg, int fd, int rank, fs_error_t *err)
{
    char path[64], link[128];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    int is = is_segment_link(path, link, sizeof link);
    if (is < 0)
        return fs_error_sys(err, "rank %d: readlink(%s)", rank, path);
    if (!is)
        return not_a_segment(seg, link, rank, err);
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || (seals & SIZE_SEALS) != SIZE_SEALS)
        return fs_error_set(err, FS_EPROTO, "rank %d: %s is a memfd without fastspawn's seals",
                            rank, seg->name);
    return FS_OK;
}

static int open_error(const struct fs__seg *seg, pid_t pid, int rank, fs_error_t *err)
{
    if (errno == ENOENT && seg->kind == FS_SHM_MEMFD)
        return fs_error_set(err, FS_EPEER,
                            "rank %d: %s does not exist: rank 0 (pid %d) exited, or closed the "
                            "segment (it does once every rank joined), or the handle comes from "
                            "another machine or pid namespace",
                            rank, seg->name, (int)pid);
    if (errno == ENOENT)
        return fs_error_set(err, FS_EPEER,
                            "rank %d: /dev/shm%s does not exist: rank 0 exited, or every rank "
                            "joined already, or the handle comes from another machine",
                            rank, seg->name);
    if ((errno == EACCES || errno == EPERM) && seg->kind == FS_SHM_MEMFD)
        return fs_error_sys(err,
                            "rank %d: open(%s): only a process of rank 0's user allowed to read "
                            "its /proc entries (ptrace read access) may; " SHM_ENV
                            "=named uses /dev/shm instead",
                            rank, seg->name);
    return fs_error_sys(err, "rank %d: open(%s)", rank, seg->name);
}

/* The open file: what it must be before it is mapped; then map all of it. */
static int check_and_map(struct fs__seg *seg, int fd, int rank, fs_error_t *err)
{
    int rc = seg->kind == FS_SHM_MEMFD ? check_memfd(seg, fd, rank, err) : FS_OK;
    if (rc != FS_OK)
        return rc;
    struct stat st;
    if (fstat(fd, &st) < 0)
        return fs_error_sys(err, "rank %d: fstat(%s)", rank, seg->name);
    /* A named segment is 0600 (a memfd is always 0777, reachable only through /proc). */
    int open_to_others = seg->kind == FS_SHM_NAMED && (st.st_mode & 077) != 0;
    if (!S_ISREG(st.st_mode) || open_to_others || (size_t)st.st_size < sizeof(struct fs__shm_hdr))
        return fs_error_set(err, FS_EPROTO, "rank %d: %s is not a fastspawn segment", rank,
                            seg->name);
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED)
        return fs_error_sys(err, "rank %d: mmap(%s)", rank, seg->name);
    seg->base = base;
    seg->len = (size_t)st.st_size;
    return FS_OK;
}

/* The file the handle names. A memfd's /proc link is read first, so that a device or FIFO
   a stale handle names is never even opened (opening one may block or have side effects). */
static int open_file(struct fs__seg *seg, pid_t pid, int rank, int *fd, fs_error_t *err)
{
    if (seg->kind == FS_SHM_NAMED) {
        *fd = shm_open(seg->name, O_RDWR | O_CLOEXEC, 0);
        return *fd >= 0 ? FS_OK : open_error(seg, pid, rank, err);
    }
    char link[128];
    int is = is_segment_link(seg->name, link, sizeof link);
    if (is < 0)
        return open_error(seg, pid, rank, err);
    if (!is)
        return not_a_segment(seg, link, rank, err);
    *fd = open(seg->name, O_RDWR | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    return *fd >= 0 ? FS_OK : open_error(seg, pid, rank, err);
}

int fs__seg_open(struct fs__seg *seg, const char *handle, int rank, fs_error_t *err)
{
    pid_t pid = 0;
    int fd = -1;
    if (strlen(handle) >= sizeof seg->handle || parse_handle(seg, handle, &pid) < 0)
        return fs_error_set(err, FS_EINVAL, "rank %d: \"%.*s\" is not a communicator handle", rank,
                            80, handle);
    snprintf(seg->handle, sizeof seg->handle, "%s", handle);
    int rc = open_file(seg, pid, rank, &fd, err);
    if (rc == FS_OK)
        rc = check_and_map(seg, fd, rank, err);
    (void)fs__close(fd); /* the mapping keeps the memory; nothing to flush */
    return rc;
}

/* ------------------------------------------------------------------ */
/* The end of set-up                                                  */
/* ------------------------------------------------------------------ */

int fs__seg_settle(struct fs__seg *seg, fs_error_t *err)
{
    fs__closep(&seg->fd); /* a memfd has nothing to flush */
    if (!seg->linked)
        return FS_OK;
    seg->linked = 0;
    if (shm_unlink(seg->name) < 0 && errno != ENOENT) /* ENOENT: a peer was first */
        return fs_error_sys(err, "shm_unlink(%s)", seg->name);
    return FS_OK;
}

void fs__seg_release(struct fs__seg *seg, int forked)
{
    if (forked)
        seg->linked = 0;             /* a child's copy: the name is the parent's to remove */
    (void)fs__seg_settle(seg, NULL); /* on the way out: nothing left to do about a failure */
    if (seg->base != NULL)
        (void)munmap(seg->base, seg->len); /* EINVAL only for a bad range */
    seg->base = NULL;
    seg->len = 0;
}
