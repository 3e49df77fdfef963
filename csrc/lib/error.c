/* error.c - the fs_error_t helpers and the names of status codes (fastspawn/error.h). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "fastspawn.h"

void fs_error_clear(fs_error_t *err)
{
    if (err == NULL)
        return;
    err->code = FS_OK;
    err->sys_errno = 0;
    err->msg[0] = '\0';
}

/* Fill err (not NULL) from fmt; the code and errno of the record. */
static void vfill(fs_error_t *err, int code, int sys_errno, const char *fmt, va_list ap)
{
    if (vsnprintf(err->msg, sizeof err->msg, fmt, ap) < 0)
        err->msg[0] = '\0';
    err->code = code;
    err->sys_errno = sys_errno;
}

int fs_error_set(fs_error_t *err, int code, const char *fmt, ...)
{
    if (err == NULL)
        return code;
    va_list ap;
    va_start(ap, fmt);
    vfill(err, code, 0, fmt, ap);
    va_end(ap);
    return code;
}

int fs_error_sys(fs_error_t *err, const char *fmt, ...)
{
    int saved = errno;
    if (err == NULL)
        return FS_ESYS;
    va_list ap;
    va_start(ap, fmt);
    vfill(err, FS_ESYS, saved, fmt, ap);
    va_end(ap);
    size_t used = strlen(err->msg);
    char buf[128];
    /* GNU strerror_r returns the string to use (maybe not buf). */
    const char *text = strerror_r(saved, buf, sizeof buf);
    snprintf(err->msg + used, sizeof err->msg - used, ": %s", text);
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
