/*
 * check_nccl_abi.c - compiled (never run) by tests/test_nccl_loader.py with
 * the real nccl.h: every value, struct layout and function signature of
 * csrc/lib/nccl_abi.h must agree with it, or this file does not compile
 * (-Werror=incompatible-pointer-types turns a signature mismatch into an error).
 */
#include <stddef.h>

/* cuda_runtime.h defines this (through cuda_bf16.h) on every CUDA >= 11; older nccl.h
 * declares ncclBfloat16 only when it is set. The stub headers do not define it. */
#ifndef __CUDA_BF16_TYPES_EXIST__
#define __CUDA_BF16_TYPES_EXIST__
#endif
#include <nccl.h>

/* Values NCCL added later are checked only against headers that have them. Float8 is
 * gated at 2.24 like FS_NCCL_CAP_FLOAT8 in nccl_load.c; ncclTimeout (which an older
 * NCCL never returns) is checked from 2.29, a version sure to have it: 2.18's header
 * lacks it, 2.30's has it, and a guard set too high only skips one check. */
#define HAS_NCCL(maj, min) (NCCL_VERSION_CODE >= NCCL_VERSION(maj, min, 0))

/* By-value and pointer struct parameters: use the real types (layouts checked below). */
#define FS__NCCL_ID_T ncclUniqueId
#define FS__NCCL_CONFIG_T ncclConfig_t
#include "nccl_abi.h"

#define SAME(a, b) _Static_assert((long long)(a) == (long long)(b), #a " differs from " #b)

SAME(sizeof(fs__ncclResult_t), sizeof(ncclResult_t));
SAME(sizeof(fs__ncclDataType_t), sizeof(ncclDataType_t));
SAME(sizeof(fs__ncclRedOp_t), sizeof(ncclRedOp_t));
SAME(sizeof(fs__ncclScalarResidence_t), sizeof(ncclScalarResidence_t));

SAME(fs__ncclSuccess, ncclSuccess);
SAME(fs__ncclUnhandledCudaError, ncclUnhandledCudaError);
SAME(fs__ncclSystemError, ncclSystemError);
SAME(fs__ncclInternalError, ncclInternalError);
SAME(fs__ncclInvalidArgument, ncclInvalidArgument);
SAME(fs__ncclInvalidUsage, ncclInvalidUsage);
SAME(fs__ncclRemoteError, ncclRemoteError);
SAME(fs__ncclInProgress, ncclInProgress);
#if HAS_NCCL(2, 29)
SAME(fs__ncclTimeout, ncclTimeout);
#endif

SAME(fs__ncclInt8, ncclInt8);
SAME(fs__ncclUint8, ncclUint8);
SAME(fs__ncclInt32, ncclInt32);
SAME(fs__ncclUint32, ncclUint32);
SAME(fs__ncclInt64, ncclInt64);
SAME(fs__ncclUint64, ncclUint64);
SAME(fs__ncclFloat16, ncclFloat16);
SAME(fs__ncclFloat32, ncclFloat32);
SAME(fs__ncclFloat64, ncclFloat64);
SAME(fs__ncclBfloat16, ncclBfloat16);
#if HAS_NCCL(2, 24)
SAME(fs__ncclFloat8e4m3, ncclFloat8e4m3);
SAME(fs__ncclFloat8e5m2, ncclFloat8e5m2);
#endif

SAME(fs__ncclSum, ncclSum);
SAME(fs__ncclProd, ncclProd);
SAME(fs__ncclMax, ncclMax);
SAME(fs__ncclMin, ncclMin);
SAME(fs__ncclAvg, ncclAvg);
SAME(fs__ncclScalarDevice, ncclScalarDevice);
SAME(fs__ncclScalarHostImmediate, ncclScalarHostImmediate);

SAME(FS__NCCL_UNIQUE_ID_BYTES, NCCL_UNIQUE_ID_BYTES);
SAME(sizeof(fs__ncclUniqueId), sizeof(ncclUniqueId));
SAME(_Alignof(fs__ncclUniqueId), _Alignof(ncclUniqueId));

/* Our ncclConfig_t is the 2.14 prefix of the real one: the fields we set sit where NCCL reads. */
SAME(offsetof(fs__ncclConfig_t, size), offsetof(ncclConfig_t, size));
SAME(offsetof(fs__ncclConfig_t, magic), offsetof(ncclConfig_t, magic));
SAME(offsetof(fs__ncclConfig_t, version), offsetof(ncclConfig_t, version));
SAME(offsetof(fs__ncclConfig_t, blocking), offsetof(ncclConfig_t, blocking));
SAME(sizeof(((fs__ncclConfig_t *)0)->blocking), sizeof(((ncclConfig_t *)0)->blocking));
_Static_assert(sizeof(fs__ncclConfig_t) <= sizeof(ncclConfig_t), "our config is a prefix");
#ifdef NCCL_API_MAGIC
SAME(FS__NCCL_CONFIG_MAGIC, NCCL_API_MAGIC);
#else /* before NCCL_API_MAGIC, NCCL_CONFIG_INITIALIZER spelled the magic out */
_Static_assert(FS__NCCL_CONFIG_MAGIC == 0xcafebeefu, "config magic");
#endif
SAME(FS__NCCL_CONFIG_UNDEF_INT, NCCL_CONFIG_UNDEF_INT);

SAME(FS__NCCL_VERSION(2, 8, 4), NCCL_VERSION(2, 8, 4));
SAME(FS__NCCL_VERSION(2, 14, 0), NCCL_VERSION(2, 14, 0));
SAME(FS__NCCL_VERSION(2, 30, 7), NCCL_VERSION(2, 30, 7));

/* The real function must convert to our pointer type without a cast. */
#define CHECK(name, ret, params) static fs__pfn_##name check_##name __attribute__((unused)) = name;
#define CHECK_OPT(name, since, ret, params) CHECK(name, ret, params)
FS__NCCL_REQUIRED(CHECK)
FS__NCCL_OPTIONAL(CHECK_OPT)
