/*
 * cuda_loader.c - find and dlopen shared libraries (the search order of
 * fastspawn/nccl.h), and load the CUDA runtime with it.
 *
 * Nothing runs at start-up: the runtime is loaded by the first
 * fs_cuda_load(), and loading it does not initialise CUDA (only
 * cudaRuntimeGetVersion is called), so a process may still fork afterwards.
 */
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loader.h"
#include "nccl_internal.h"

/* ------------------------------------------------------------------ */
/* The search                                                         */
/* ------------------------------------------------------------------ */

/* Append to a NUL-terminated report of FS__DL_REPORT_MAX bytes; truncates quietly. */
__attribute__((format(printf, 2, 3))) static void report_add(char *report, const char *fmt, ...)
{
    size_t used = strnlen(report, FS__DL_REPORT_MAX - 1);
    va_list ap;
    va_start(ap, fmt);
    (void)vsnprintf(report + used, FS__DL_REPORT_MAX - used, fmt, ap);
    va_end(ap);
}

static const char *dl_reason(void)
{
    const char *e = dlerror();
    return e != NULL ? e : "unknown dlopen error";
}

/* dlopen(name); on failure the report gets "  - <label>: <dlerror>". */
static void *try_open(const char *name, int extra_flags, const char *label, char *report)
{
    void *h = dlopen(name, RTLD_NOW | RTLD_LOCAL | extra_flags);
    if (h == NULL && (extra_flags & RTLD_NOLOAD))
        report_add(report, "\n  - already loaded in this process: no %s", name);
    else if (h == NULL)
        report_add(report, "\n  - %s%s", label, dl_reason());
    return h;
}

/* Steps 2-4 of the search (step 1, the forced path, excludes them). */
static void *search_all(const fs__dl_spec_t *spec, const char *const *dirs, size_t ndirs,
                        char *report)
{
    void *h = NULL;
    for (const char *const *so = spec->sonames; h == NULL && *so != NULL; so++)
        h = try_open(*so, RTLD_NOLOAD, "", report);
    for (size_t d = 0; h == NULL && d < ndirs; d++) {
        for (const char *const *so = spec->sonames; h == NULL && *so != NULL; so++) {
            char path[4096];
            if (snprintf(path, sizeof path, "%s/%s", dirs[d], *so) >= (int)sizeof path) {
                report_add(report, "\n  - %s/%s: path too long", dirs[d], *so);
                continue;
            }
            h = try_open(path, 0, "", report); /* dlerror names the path itself */
        }
    }
    for (const char *const *so = spec->sonames; h == NULL && *so != NULL; so++) {
        char label[128];
        snprintf(label, sizeof label, "system (dlopen \"%s\"): ", *so);
        h = try_open(*so, 0, label, report);
    }
    return h;
}

void *fs__dl_search(const fs__dl_spec_t *spec, const char *const *dirs, size_t ndirs, char *report,
                    fs_error_t *err)
{
    report[0] = '\0';
    const char *forced = getenv(spec->env);
    void *h;
    if (forced != NULL && forced[0] != '\0') {
        report_add(report, "\n  - %s=%s (forced: nothing else is tried): ", spec->env, forced);
        h = dlopen(forced, RTLD_NOW | RTLD_LOCAL);
        if (h == NULL)
            report_add(report, "%s", dl_reason());
    } else {
        report_add(report, "\n  - %s: not set", spec->env);
        h = search_all(spec, dirs, ndirs, report);
    }
    if (h != NULL) {
        char path[1024];
        fs__dl_path(h, path, sizeof path);
        report_add(report, "\n  => loaded %s", path);
        return h;
    }
    char names[256] = "";
    for (const char *const *so = spec->sonames; *so != NULL; so++)
        snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s",
                 so == spec->sonames ? "" : ", ", *so);
    /* The variable goes first: a long report is cut at the end, never there. */
    fs_error_set(err, FS_ENOTFOUND,
                 "%s (%s) could not be loaded; set %s to its path to force one. Searched:%s",
                 spec->what, names, spec->env, report);
    return NULL;
}

int fs__dl_resolve(void *handle, const char *path, const fs__dl_sym_t *syms, size_t n, int version,
                   void *base, fs_error_t *err)
{
    _Static_assert(sizeof(void *) == sizeof(void (*)(void)), "dlsym needs code pointers of "
                                                             "data pointer size");
    for (size_t i = 0; i < n; i++) {
        if (syms[i].since > version)
            continue; /* gated off: stays NULL */
        void *sym = dlsym(handle, syms[i].name);
        if (sym == NULL && syms[i].since == 0)
            return fs_error_set(err, FS_ENOTFOUND, "%s has no %s (%s)", path, syms[i].name,
                                dl_reason());
        /* POSIX guarantees a dlsym result converts to a function pointer; memcpy says so
         * without a cast ISO C leaves undefined. */
        memcpy((char *)base + syms[i].offset, &sym, sizeof sym);
    }
    return FS_OK;
}

void fs__dl_path(void *handle, char *buf, size_t cap)
{
    struct link_map *lm = NULL;
    if (dlinfo(handle, RTLD_DI_LINKMAP, &lm) != 0 || lm == NULL || lm->l_name == NULL)
        snprintf(buf, cap, "?");
    else
        snprintf(buf, cap, "%s", lm->l_name);
}

int fs__dl_load(const fs__dl_spec_t *spec, const char *const *dirs, size_t ndirs, fs_error_t *err)
{
    if (spec->loaded())
        return FS_OK;
    fs__lock(spec->mu);
    int rc = FS_OK;
    if (!spec->loaded()) {
        void *h = fs__dl_search(spec, dirs, ndirs, spec->report, err);
        rc = h == NULL ? FS_ENOTFOUND : spec->adopt(h, err);
        if (h != NULL && rc != FS_OK)
            (void)dlclose(h);
    }
    fs__unlock(spec->mu);
    return rc;
}

/* ------------------------------------------------------------------ */
/* The CUDA runtime                                                   */
/* ------------------------------------------------------------------ */

static pthread_mutex_t cuda_mu = PTHREAD_MUTEX_INITIALIZER;
static fs__cuda_api_t cuda_table;
static _Atomic(const fs__cuda_api_t *) cuda_loaded; /* &cuda_table once complete */
static char cuda_report[FS__DL_REPORT_MAX];
static char cuda_path[1024];
static int cuda_rt_version;

static const char *const cudart_sonames[] = {"libcudart.so.13", "libcudart.so.12",
                                             "libcudart.so.11.0", NULL};

static const fs__dl_sym_t cuda_syms[] = {
#define FS__CUDA_SYM(name, ret, params) {#name, 0, offsetof(fs__cuda_api_t, name)},
    FS__CUDA_FUNCTIONS(FS__CUDA_SYM)
#undef FS__CUDA_SYM
};

const fs__cuda_api_t *fs__cuda(void)
{
    return atomic_load_explicit(&cuda_loaded, memory_order_acquire);
}

static int cuda_is_loaded(void)
{
    return fs__cuda() != NULL;
}

/* Resolve and publish the runtime behind handle (cuda_mu held). */
static int cuda_adopt(void *handle, fs_error_t *err)
{
    fs__cuda_api_t t;
    memset(&t, 0, sizeof t);
    char path[sizeof cuda_path];
    fs__dl_path(handle, path, sizeof path);
    int rc =
        fs__dl_resolve(handle, path, cuda_syms, sizeof cuda_syms / sizeof cuda_syms[0], 0, &t, err);
    if (rc != FS_OK)
        return rc;
    int v = 0;
    /* fs__dl_resolve filled every pointer (through memcpy, which the analyzer cannot follow). */
    fs__cudaError_t e = t.cudaRuntimeGetVersion(&v); // NOLINT(clang-analyzer-core.CallAndMessage)
    if (e != fs__cudaSuccess)
        return fs__cuda_fail(err, &t, e, "cudaRuntimeGetVersion (%s)", path);
    cuda_table = t;
    cuda_rt_version = v;
    memcpy(cuda_path, path, sizeof cuda_path);
    atomic_store_explicit(&cuda_loaded, &cuda_table, memory_order_release);
    return FS_OK;
}

static const fs__dl_spec_t cudart_spec = {.what = "the CUDA runtime",
                                          .env = "FASTSPAWN_CUDART_LIBRARY",
                                          .sonames = cudart_sonames,
                                          .mu = &cuda_mu,
                                          .loaded = cuda_is_loaded,
                                          .adopt = cuda_adopt,
                                          .report = cuda_report};

int fs_cuda_load(const char *const *dirs, size_t ndirs, fs_error_t *err)
{
    return fs__dl_load(&cudart_spec, dirs, ndirs, err);
}

const char *fs_cuda_search_report(void)
{
    return cuda_report[0] != '\0' ? cuda_report : NULL;
}

int fs_cuda_runtime_version(void)
{
    return fs__cuda() != NULL ? cuda_rt_version : 0;
}

const char *fs_cuda_library_path(void)
{
    return fs__cuda() != NULL ? cuda_path : NULL;
}

int fs__cuda_fail(fs_error_t *err, const fs__cuda_api_t *cu, fs__cudaError_t e, const char *fmt,
                  ...)
{
    char what[256];
    va_list ap;
    va_start(ap, fmt);
    (void)vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    int code;
    switch (e) {
    case fs__cudaErrorInvalidValue:
    case fs__cudaErrorInvalidDevice:
    case fs__cudaErrorInvalidResourceHandle: code = FS_EINVAL; break;
    case fs__cudaErrorMemoryAllocation: code = FS_ENOMEM; break;
    case fs__cudaErrorNoDevice:
    case fs__cudaErrorInsufficientDriver: code = FS_ENOTFOUND; break;
    default: code = FS_EABORTED; break;
    }
    return fs_error_set(err, code, "%s failed: %s (%s)", what, cu->cudaGetErrorName(e),
                        cu->cudaGetErrorString(e));
}

int fs_cuda_device_count(int *count, fs_error_t *err)
{
    const fs__cuda_api_t *cu = fs__cuda();
    *count = 0;
    if (cu == NULL)
        return fs_error_set(err, FS_ENOTFOUND, "the CUDA runtime is not loaded (fs_cuda_load)");
    int n = 0;
    fs__cudaError_t e = cu->cudaGetDeviceCount(&n);
    if (e == fs__cudaSuccess && n > 0) {
        *count = n;
        return FS_OK;
    }
    int driver = 0;
    (void)cu->cudaDriverGetVersion(&driver);
    if (e == fs__cudaSuccess)
        e = fs__cudaErrorNoDevice;
    int rc = fs__cuda_fail(err, cu, e, "no usable CUDA device: cudaGetDeviceCount");
    size_t used = strlen(err->msg);
    snprintf(err->msg + used, sizeof err->msg - used, "; CUDA runtime %d, driver %d%s (%s)",
             cuda_rt_version, driver, driver == 0 ? " (no NVIDIA driver found)" : "", cuda_path);
    return rc;
}
