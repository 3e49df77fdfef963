/*
 * check_cuda_abi.c - compiled (never run) by tests/test_nccl_loader.py with
 * the real cuda_runtime_api.h: every value and function signature of
 * csrc/lib/cuda_abi.h must agree with it, or this file does not compile.
 */
#include <cuda_runtime_api.h>

#include "cuda_abi.h"

#define SAME(a, b) _Static_assert((long long)(a) == (long long)(b), #a " differs from " #b)

SAME(sizeof(fs__cudaError_t), sizeof(cudaError_t));
SAME(fs__cudaSuccess, cudaSuccess);
SAME(fs__cudaErrorInvalidValue, cudaErrorInvalidValue);
SAME(fs__cudaErrorMemoryAllocation, cudaErrorMemoryAllocation);
SAME(fs__cudaErrorInitializationError, cudaErrorInitializationError);
SAME(fs__cudaErrorInsufficientDriver, cudaErrorInsufficientDriver);
SAME(fs__cudaErrorNoDevice, cudaErrorNoDevice);
SAME(fs__cudaErrorInvalidDevice, cudaErrorInvalidDevice);
SAME(fs__cudaErrorInvalidResourceHandle, cudaErrorInvalidResourceHandle);
SAME(fs__cudaErrorNotReady, cudaErrorNotReady);
SAME(fs__cudaStreamNonBlocking, cudaStreamNonBlocking);
SAME(fs__cudaEventDisableTiming, cudaEventDisableTiming);

/* Same struct tags: the handle types are the very same types. */
_Static_assert(_Generic((cudaStream_t)0, fs__cudaStream_t : 1, default : 0), "cudaStream_t");
_Static_assert(_Generic((cudaEvent_t)0, fs__cudaEvent_t : 1, default : 0), "cudaEvent_t");

#define CHECK(name, ret, params) static fs__pfn_##name check_##name __attribute__((unused)) = name;
FS__CUDA_FUNCTIONS(CHECK)
