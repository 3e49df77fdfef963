/*
 * nccl_load.c - load libnccl.so.2 at run time: resolve the functions every
 * supported NCCL has (>= 2.7, for ncclSend/ncclRecv), then each optional one
 * only when ncclGetVersion says the library is new enough to have it, and
 * derive the capability flags of fastspawn/nccl.h.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include "fastspawn/nccl.h"
#include "loader.h"
#include "nccl_abi.h"

static pthread_mutex_t nccl_mu = PTHREAD_MUTEX_INITIALIZER;
static fs__nccl_api_t nccl_table;
static _Atomic(const fs__nccl_api_t *) nccl_loaded; /* &nccl_table once complete */
static char nccl_report[FS__DL_REPORT_MAX];
static char nccl_path[1024];

static const char *const nccl_sonames[] = {"libnccl.so.2", NULL};

static const fs__dl_sym_t nccl_syms[] = {
#define FS__NCCL_SYM(name, ret, params) {#name, 0, offsetof(fs__nccl_api_t, name)},
#define FS__NCCL_SYM_OPT(name, since, ret, params) {#name, since, offsetof(fs__nccl_api_t, name)},
    FS__NCCL_REQUIRED(FS__NCCL_SYM) FS__NCCL_OPTIONAL(FS__NCCL_SYM_OPT)
#undef FS__NCCL_SYM
#undef FS__NCCL_SYM_OPT
};

const fs__nccl_api_t *fs__nccl(void)
{
    return atomic_load_explicit(&nccl_loaded, memory_order_acquire);
}

/* ncclGetVersion's code in one scheme: 2708 (before 2.9) -> 20708; 23007 stays. */
static int normalise_version(int code)
{
    if (code < 10000)
        return code / 1000 * 10000 + code % 1000 / 100 * 100 + code % 100;
    return code;
}

/* Capabilities that come with a version rather than with a symbol. */
static unsigned caps_of(const fs__nccl_api_t *t)
{
    unsigned caps = 0;
    caps |= t->ncclCommAbort ? FS_NCCL_CAP_ABORT : 0;
    caps |= t->ncclCommGetAsyncError ? FS_NCCL_CAP_ASYNC_ERROR : 0;
    /* Non-blocking mode is polled through ncclCommGetAsyncError and undone with abort. */
    caps |= t->ncclCommInitRankConfig && t->ncclCommGetAsyncError && t->ncclCommAbort
                ? FS_NCCL_CAP_NONBLOCKING
                : 0;
    caps |= t->ncclCommFinalize ? FS_NCCL_CAP_FINALIZE : 0;
    caps |= t->ncclCommSplit ? FS_NCCL_CAP_SPLIT : 0;
    caps |= t->ncclRedOpCreatePreMulSum && t->ncclRedOpDestroy ? FS_NCCL_CAP_PREMUL_SUM : 0;
    caps |= t->ncclGetLastError ? FS_NCCL_CAP_LAST_ERROR : 0;
    caps |= t->version >= FS__NCCL_V(2, 10, 0) ? FS_NCCL_CAP_AVG | FS_NCCL_CAP_BFLOAT16 : 0;
    caps |= t->version >= FS__NCCL_V(2, 24, 0) ? FS_NCCL_CAP_FLOAT8 : 0;
    return caps;
}

/* Resolve, check the version and publish the NCCL behind handle (nccl_mu held). */
static int nccl_adopt(void *handle, fs_error_t *err)
{
    fs__nccl_api_t t;
    memset(&t, 0, sizeof t);
    char path[sizeof nccl_path];
    fs__dl_path(handle, path, sizeof path);
    const size_t nsyms = sizeof nccl_syms / sizeof nccl_syms[0];
    /* Required symbols first (version 0 gates every optional one off), then the version. */
    int rc = fs__dl_resolve(handle, path, nccl_syms, nsyms, 0, &t, err);
    if (rc != FS_OK)
        return rc;
    int code = 0;
    if (t.ncclGetVersion(&code) != fs__ncclSuccess || code <= 0)
        return fs_error_set(err, FS_ENOTFOUND, "%s: ncclGetVersion failed", path);
    t.version = normalise_version(code);
    if (t.version < FS__NCCL_V(2, 7, 0))
        return fs_error_set(err, FS_ENOTFOUND,
                            "%s is NCCL %d.%d.%d; fastspawn needs 2.7 or later (ncclSend/ncclRecv)",
                            path, t.version / 10000, t.version / 100 % 100, t.version % 100);
    rc = fs__dl_resolve(handle, path, nccl_syms, nsyms, t.version, &t, err);
    if (rc != FS_OK)
        return rc;
    t.caps = caps_of(&t);
    nccl_table = t;
    memcpy(nccl_path, path, sizeof nccl_path);
    atomic_store_explicit(&nccl_loaded, &nccl_table, memory_order_release);
    return FS_OK;
}

static int nccl_is_loaded(void)
{
    return fs__nccl() != NULL;
}

static const fs__dl_spec_t nccl_spec = {.what = "NCCL",
                                        .env = "FASTSPAWN_NCCL_LIBRARY",
                                        .sonames = nccl_sonames,
                                        .mu = &nccl_mu,
                                        .loaded = nccl_is_loaded,
                                        .adopt = nccl_adopt,
                                        .report = nccl_report};

int fs_nccl_load(const char *const *dirs, size_t ndirs, fs_error_t *err)
{
    return fs__dl_load(&nccl_spec, dirs, ndirs, err);
}

const char *fs_nccl_search_report(void)
{
    return nccl_report[0] != '\0' ? nccl_report : NULL;
}

int fs_nccl_version(void)
{
    const fs__nccl_api_t *t = fs__nccl();
    return t != NULL ? t->version : 0;
}

unsigned fs_nccl_caps(void)
{
    const fs__nccl_api_t *t = fs__nccl();
    return t != NULL ? t->caps : 0;
}

const char *fs_nccl_library_path(void)
{
    return fs__nccl() != NULL ? nccl_path : NULL;
}
