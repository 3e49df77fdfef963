/* error.c - the fs_error_t helpers shared by every fastspawn C file. */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "fastspawn.h"

void fs_error_clear(fs_error_t *err)
{
    if (err == NULL)
        return;
    err->code = FS_OK;
    err->sys_errno = 0;
    err->msg[0] = '\0';
}

int fs_error_set(fs_error_t *err, int code, const char *fmt, ...)
{
    if (err == NULL)
        return code;
    va_list ap;
    va_start(ap, fmt);
    if (vsnprintf(err->msg, sizeof err->msg, fmt, ap) < 0)
        err->msg[0] = '\0';
    va_end(ap);
    err->code = code;
    err->sys_errno = 0;
    return code;
}

int fs_error_sys(fs_error_t *err, const char *fmt, ...)
{
    int saved = errno;
    if (err == NULL)
        return FS_ESYS;
    va_list ap;
    va_start(ap, fmt);
    if (vsnprintf(err->msg, sizeof err->msg, fmt, ap) < 0)
        err->msg[0] = '\0';
    va_end(ap);
    size_t used = strlen(err->msg);
    char buf[128];
    /* GNU strerror_r returns the string to use (maybe not buf). */
    const char *text = strerror_r(saved, buf, sizeof buf);
    snprintf(err->msg + used, sizeof err->msg - used, ": %s", text);
    err->code = FS_ESYS;
    err->sys_errno = saved;
    return FS_ESYS;
}

const char *fs_status_name(int code)
{
    switch (code) {
    case FS_OK: return "FS_OK";
    case FS_EINVAL: return "FS_EINVAL";
    case FS_ESYS: return "FS_ESYS";
    case FS_ETIMEOUT: return "FS_ETIMEOUT";
    case FS_ECLOSED: return "FS_ECLOSED";
    case FS_EPROTO: return "FS_EPROTO";
    case FS_EAUTH: return "FS_EAUTH";
    case FS_EABORTED: return "FS_EABORTED";
    case FS_EPEER: return "FS_EPEER";
    case FS_EMISMATCH: return "FS_EMISMATCH";
    case FS_ENOMEM: return "FS_ENOMEM";
    case FS_ETOOBIG: return "FS_ETOOBIG";
    case FS_ENOTFOUND: return "FS_ENOTFOUND";
    case FS_EINTR: return "FS_EINTR";
    default: return "FS_E?";
    }
}

int64_t fs_now_ms(void)
{
    struct timespec ts;
    /* CLOCK_MONOTONIC cannot fail with a valid clock id and pointer. */
    (void)clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

const char *fs_signal_name(int sig)
{
    /* sigabbrev_np needs glibc 2.32; keep our own table for portability. */
    switch (sig) {
    case SIGHUP: return "SIGHUP";
    case SIGINT: return "SIGINT";
    case SIGQUIT: return "SIGQUIT";
    case SIGILL: return "SIGILL";
    case SIGTRAP: return "SIGTRAP";
    case SIGABRT: return "SIGABRT";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGKILL: return "SIGKILL";
    case SIGUSR1: return "SIGUSR1";
    case SIGSEGV: return "SIGSEGV";
    case SIGUSR2: return "SIGUSR2";
    case SIGPIPE: return "SIGPIPE";
    case SIGALRM: return "SIGALRM";
    case SIGTERM: return "SIGTERM";
    case SIGCHLD: return "SIGCHLD";
    case SIGCONT: return "SIGCONT";
    case SIGSTOP: return "SIGSTOP";
    case SIGTSTP: return "SIGTSTP";
    case SIGXCPU: return "SIGXCPU";
    case SIGXFSZ: return "SIGXFSZ";
    case SIGSYS: return "SIGSYS";
    default: return NULL;
    }
}
