/*
 * loader.h - finding and loading a shared library with dlopen, as the CUDA
 * runtime and NCCL loaders (cuda_loader.c, nccl_load.c) both need it.
 */
#ifndef FS_LOADER_H
#define FS_LOADER_H

#include <pthread.h>
#include <stddef.h>

#include "fastspawn.h"

/* The full text of one search; long enough for several directories and dlerror()s. */
#define FS__DL_REPORT_MAX 4096

typedef struct fs__dl_spec {
    const char *what;           /* for messages: "NCCL", "the CUDA runtime" */
    const char *env;            /* the variable that forces a path */
    const char *const *sonames; /* NULL-terminated, preferred first */
    /* For fs__dl_load: */
    pthread_mutex_t *mu;                         /* serialises loading */
    int (*loaded)(void);                         /* 1 once the library is published */
    int (*adopt)(void *handle, fs_error_t *err); /* resolve and publish (mu held) */
    char *report;                                /* FS__DL_REPORT_MAX bytes */
} fs__dl_spec_t;

/* Search and adopt once: FS_OK at once when already loaded; a failure is not remembered. */
int fs__dl_load(const fs__dl_spec_t *spec, const char *const *dirs, size_t ndirs, fs_error_t *err);

/*
 * The search order of fs_nccl_load (see fastspawn/nccl.h). Returns the
 * handle, or NULL with FS_ENOTFOUND in *err. report (FS__DL_REPORT_MAX
 * bytes) gets every place tried and what dlopen said, success or not.
 */
void *fs__dl_search(const fs__dl_spec_t *spec, const char *const *dirs, size_t ndirs, char *report,
                    fs_error_t *err);

/* One symbol to resolve into a struct of function pointers, at `offset`. */
typedef struct fs__dl_sym {
    const char *name;
    int since; /* 0: required; else the (FS__NCCL_V) version that introduced it */
    size_t offset;
} fs__dl_sym_t;

/*
 * Resolve syms[0..n) from handle into the struct at base. A required symbol
 * that is missing is FS_ENOTFOUND naming it and `path`; an optional one whose
 * `since` is above `version` is left NULL without looking.
 */
int fs__dl_resolve(void *handle, const char *path, const fs__dl_sym_t *syms, size_t n, int version,
                   void *base, fs_error_t *err);

/* The file a handle was loaded from ("?" when the loader cannot say). */
void fs__dl_path(void *handle, char *buf, size_t cap);

#endif /* FS_LOADER_H */
