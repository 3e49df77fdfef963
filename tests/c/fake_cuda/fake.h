/*
 * fake.h - what the fake CUDA runtime (libcudart.so.13 built from
 * fake_cudart.c) exports besides the CUDA functions fastspawn calls: the
 * call log, and the two runtime functions the fake NCCL needs.
 *
 * The fakes stand in for a GPU on machines without one: host memory is
 * "device" memory, a stream is a worker thread running its queue in order,
 * and an event completes when its stream reaches it. Every call is logged
 * in order, one line each, so tests can assert what fastspawn asked for.
 *
 * Test hooks (environment, read at each call):
 *   FAKE_CUDA_DEVICES=n        devices (default 1; 0: cudaErrorNoDevice)
 *   FAKE_CUDA_LOG_STDERR=1     also print every log line to stderr
 */
#ifndef FAKE_CUDA_H
#define FAKE_CUDA_H

#include <stddef.h>

#include "cuda_abi.h"

/* Append one line to the call log (printf format, no newline needed). */
void fakecuda_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Copy the log into buf (NUL-terminated, cut to cap); returns its full length. */
size_t fakecuda_log_read(char *buf, size_t cap);
void fakecuda_log_clear(void);

/* Runtime functions the fake NCCL uses (real CUDA has them too). */
typedef void (*fakecuda_host_fn)(void *arg);
fs__cudaError_t cudaLaunchHostFunc(fs__cudaStream_t stream, fakecuda_host_fn fn, void *arg);
fs__cudaError_t cudaGetDevice(int *device);

#endif /* FAKE_CUDA_H */
