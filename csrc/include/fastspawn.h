/*
 * fastspawn.h - the public C API of libfastspawn, one header per concern:
 *
 *   fastspawn/error.h      status codes, fs_error_t, the monotonic clock
 *   fastspawn/supervise.h  fork / adopt / watch / stop rank processes; the guardian
 *   fastspawn/store.h      the rendezvous key-value store: server and client
 *   fastspawn/comm.h       shared-memory collectives and reduction kernels
 *   fastspawn/nccl.h       CUDA collectives through NCCL, both loaded at run time
 *
 * Everything here is plain C11 + POSIX/Linux: no Python, no torch, no CUDA.
 * Conventions (after libuv) are set out in fastspawn/error.h.
 */
#ifndef FASTSPAWN_H
#define FASTSPAWN_H

#include "fastspawn/error.h"
#include "fastspawn/supervise.h"
#include "fastspawn/store.h"
#include "fastspawn/comm.h"
#include "fastspawn/nccl.h"

#endif /* FASTSPAWN_H */
