/*
 * coll.h - internal to coll_cpu.c and comm.c: the collective algorithms, on one rank's
 * view of the segment (shm.h). The caller (comm.c) serialises collectives on a segment.
 */
#ifndef FS_COLL_H
#define FS_COLL_H

#include "shm.h"

/* FS_OK when a is a collective this communicator can run (kinds, dtypes, ops, roots,
   buffers); the same checks on every rank, before anything is posted. */
int fs__coll_validate(const fs__shm_t *s, const fs_coll_args_t *a, fs_error_t *err);
/* Run one validated collective within timeout_ms. Any failure aborts the segment for
   every rank (fs__shm_fail). */
int fs__coll_execute(fs__shm_t *s, const fs_coll_args_t *a, int64_t timeout_ms, fs_error_t *err);

#endif /* FS_COLL_H */
