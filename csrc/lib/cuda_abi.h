/*
 * cuda_abi.h - our own declarations of the few CUDA runtime types, constants
 * and functions fastspawn calls, so the build needs no CUDA headers.
 *
 * Names carry an fs__ prefix so a file may include this header and the real
 * cuda_runtime_api.h together: tests/c/abi/check_cuda_abi.c does exactly
 * that and static-asserts that every value, and every function signature
 * below, matches the real one.
 *
 * Enums cross the ABI as their compatible integer type: cudaError_t has no
 * negative values, so it is an unsigned int, and declaring it so lets the
 * signature check also catch a change of that type.
 */
#ifndef FS_CUDA_ABI_H
#define FS_CUDA_ABI_H

#include <stddef.h>

typedef unsigned int fs__cudaError_t;
/* The same tags as the real headers: the types are then compatible with theirs. */
typedef struct CUstream_st *fs__cudaStream_t;
typedef struct CUevent_st *fs__cudaEvent_t;

enum {
    fs__cudaSuccess = 0,
    fs__cudaErrorInvalidValue = 1,
    fs__cudaErrorMemoryAllocation = 2,
    fs__cudaErrorInitializationError = 3,
    fs__cudaErrorInsufficientDriver = 35,
    fs__cudaErrorNoDevice = 100,
    fs__cudaErrorInvalidDevice = 101,
    fs__cudaErrorInvalidResourceHandle = 400,
    fs__cudaErrorNotReady = 600,
};

enum {
    fs__cudaStreamNonBlocking = 0x01, /* no implicit sync with the legacy default stream */
    fs__cudaEventDisableTiming = 0x02,
};

/*
 * X(name, return type, parameter list): every runtime function we resolve.
 * The loader resolves all of them (each exists since CUDA 10).
 */
#define FS__CUDA_FUNCTIONS(X)                                                                      \
    X(cudaGetErrorName, const char *, (fs__cudaError_t error))                                     \
    X(cudaGetErrorString, const char *, (fs__cudaError_t error))                                   \
    X(cudaRuntimeGetVersion, fs__cudaError_t, (int *version))                                      \
    X(cudaDriverGetVersion, fs__cudaError_t, (int *version))                                       \
    X(cudaGetDeviceCount, fs__cudaError_t, (int *count))                                           \
    X(cudaGetDevice, fs__cudaError_t, (int *device))                                               \
    X(cudaSetDevice, fs__cudaError_t, (int device))                                                \
    X(cudaDeviceGetStreamPriorityRange, fs__cudaError_t, (int *least, int *greatest))              \
    X(cudaStreamCreateWithPriority, fs__cudaError_t,                                               \
      (fs__cudaStream_t * stream, unsigned int flags, int priority))                               \
    X(cudaStreamDestroy, fs__cudaError_t, (fs__cudaStream_t stream))                               \
    X(cudaStreamWaitEvent, fs__cudaError_t,                                                        \
      (fs__cudaStream_t stream, fs__cudaEvent_t event, unsigned int flags))                        \
    X(cudaEventCreateWithFlags, fs__cudaError_t, (fs__cudaEvent_t * event, unsigned int flags))    \
    X(cudaEventDestroy, fs__cudaError_t, (fs__cudaEvent_t event))                                  \
    X(cudaEventRecord, fs__cudaError_t, (fs__cudaEvent_t event, fs__cudaStream_t stream))          \
    X(cudaEventQuery, fs__cudaError_t, (fs__cudaEvent_t event))                                    \
    X(cudaMalloc, fs__cudaError_t, (void **ptr, size_t size))                                      \
    X(cudaFree, fs__cudaError_t, (void *ptr))

#define FS__CUDA_TYPEDEF(name, ret, params) typedef ret(*fs__pfn_##name) params;
FS__CUDA_FUNCTIONS(FS__CUDA_TYPEDEF)
#undef FS__CUDA_TYPEDEF

/* The loaded runtime: one pointer per function, filled by fs_cuda_load. */
typedef struct fs__cuda_api {
#define FS__CUDA_MEMBER(name, ret, params) fs__pfn_##name name;
    FS__CUDA_FUNCTIONS(FS__CUDA_MEMBER)
#undef FS__CUDA_MEMBER
} fs__cuda_api_t;

/* The loaded runtime, or NULL before fs_cuda_load succeeded. */
const fs__cuda_api_t *fs__cuda(void);

#endif /* FS_CUDA_ABI_H */
