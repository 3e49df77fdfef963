/*
 * nccl_abi.h - our own declarations of the NCCL types, constants and
 * functions fastspawn calls, so the build never includes nccl.h.
 *
 * Names carry an fs__ prefix so tests/c/abi/check_nccl_abi.c can include
 * this header next to the real nccl.h and static-assert that every value,
 * struct layout and function signature agrees.
 *
 * NCCL's enums (ncclResult_t, ncclDataType_t, ncclRedOp_t,
 * ncclScalarResidence_t) have no negative values, so they cross the ABI as
 * unsigned int; declaring them so lets the signature check catch a change.
 */
#ifndef FS_NCCL_ABI_H
#define FS_NCCL_ABI_H

#include <stddef.h>

#include "cuda_abi.h"

/* NCCL's own version code (its NCCL_VERSION): 2.8.4 -> 2804 (old scheme) but 2.9.0 -> 20900. */
#define FS__NCCL_VERSION(x, y, z)                                                                  \
    (((x) <= 2 && (y) <= 8) ? (x)*1000 + (y)*100 + (z) : (x)*10000 + (y)*100 + (z))
/* Ours, one scheme for every version (fs_nccl_version): 2.8.4 -> 20804. */
#define FS__NCCL_V(x, y, z) ((x)*10000 + (y)*100 + (z))

typedef struct ncclComm *fs__ncclComm_t; /* the real tag: compatible with ncclComm_t */
typedef unsigned int fs__ncclResult_t;
typedef unsigned int fs__ncclDataType_t;
typedef unsigned int fs__ncclRedOp_t; /* built-in values, or one from ncclRedOpCreatePreMulSum */
typedef unsigned int fs__ncclScalarResidence_t;

#define FS__NCCL_UNIQUE_ID_BYTES 128
typedef struct fs__ncclUniqueId {
    char internal[FS__NCCL_UNIQUE_ID_BYTES];
} fs__ncclUniqueId;

enum {
    fs__ncclSuccess = 0,
    fs__ncclUnhandledCudaError = 1,
    fs__ncclSystemError = 2,
    fs__ncclInternalError = 3,
    fs__ncclInvalidArgument = 4,
    fs__ncclInvalidUsage = 5,
    fs__ncclRemoteError = 6, /* 2.13 */
    fs__ncclInProgress = 7,  /* 2.14: a non-blocking call has not finished */
    fs__ncclTimeout = 8,
};

enum {
    fs__ncclInt8 = 0,
    fs__ncclUint8 = 1,
    fs__ncclInt32 = 2,
    fs__ncclUint32 = 3,
    fs__ncclInt64 = 4,
    fs__ncclUint64 = 5,
    fs__ncclFloat16 = 6,
    fs__ncclFloat32 = 7,
    fs__ncclFloat64 = 8,
    fs__ncclBfloat16 = 9,    /* 2.10 */
    fs__ncclFloat8e4m3 = 10, /* 2.24 */
    fs__ncclFloat8e5m2 = 11, /* 2.24 */
};

enum {
    fs__ncclSum = 0,
    fs__ncclProd = 1,
    fs__ncclMax = 2,
    fs__ncclMin = 3,
    fs__ncclAvg = 4, /* 2.10 */
};

enum {
    fs__ncclScalarDevice = 0,        /* read when the collective runs */
    fs__ncclScalarHostImmediate = 1, /* read before ncclRedOpCreatePreMulSum returns */
};

/*
 * The leading fields of ncclConfig_t as NCCL 2.14 defined them. NCCL copies
 * only `size` bytes of the caller's struct over its defaults and ignores
 * fields newer than `version`, so this prefix is valid for every later NCCL.
 */
#define FS__NCCL_CONFIG_MAGIC 0xcafebeefu
#define FS__NCCL_CONFIG_UNDEF_INT (-2147483647 - 1) /* INT_MIN */
typedef struct fs__ncclConfig_v21400 {
    size_t size;
    unsigned int magic;
    unsigned int version;
    int blocking;
} fs__ncclConfig_t;

/*
 * check_nccl_abi.c defines these two to the real ncclUniqueId and
 * ncclConfig_t: a struct type is compatible only with itself, and the
 * layouts of ours are checked there separately.
 */
#ifndef FS__NCCL_ID_T
#define FS__NCCL_ID_T fs__ncclUniqueId
#endif
#ifndef FS__NCCL_CONFIG_T
#define FS__NCCL_CONFIG_T fs__ncclConfig_t
#endif

/* X(name, return type, parameter list): what every supported NCCL (>= 2.7) has. */
#define FS__NCCL_REQUIRED(X)                                                                       \
    X(ncclGetVersion, fs__ncclResult_t, (int *version))                                            \
    X(ncclGetErrorString, const char *, (fs__ncclResult_t result))                                 \
    X(ncclGetUniqueId, fs__ncclResult_t, (FS__NCCL_ID_T * id))                                     \
    X(ncclCommInitRank, fs__ncclResult_t,                                                          \
      (fs__ncclComm_t * comm, int nranks, FS__NCCL_ID_T id, int rank))                             \
    X(ncclCommDestroy, fs__ncclResult_t, (fs__ncclComm_t comm))                                    \
    X(ncclCommCount, fs__ncclResult_t, (const fs__ncclComm_t comm, int *count))                    \
    X(ncclCommUserRank, fs__ncclResult_t, (const fs__ncclComm_t comm, int *rank))                  \
    X(ncclAllReduce, fs__ncclResult_t,                                                             \
      (const void *send, void *recv, size_t count, fs__ncclDataType_t dtype, fs__ncclRedOp_t op,   \
       fs__ncclComm_t comm, fs__cudaStream_t stream))                                              \
    X(ncclBroadcast, fs__ncclResult_t,                                                             \
      (const void *send, void *recv, size_t count, fs__ncclDataType_t dtype, int root,             \
       fs__ncclComm_t comm, fs__cudaStream_t stream))                                              \
    X(ncclReduce, fs__ncclResult_t,                                                                \
      (const void *send, void *recv, size_t count, fs__ncclDataType_t dtype, fs__ncclRedOp_t op,   \
       int root, fs__ncclComm_t comm, fs__cudaStream_t stream))                                    \
    X(ncclAllGather, fs__ncclResult_t,                                                             \
      (const void *send, void *recv, size_t count, fs__ncclDataType_t dtype, fs__ncclComm_t comm,  \
       fs__cudaStream_t stream))                                                                   \
    X(ncclReduceScatter, fs__ncclResult_t,                                                         \
      (const void *send, void *recv, size_t count, fs__ncclDataType_t dtype, fs__ncclRedOp_t op,   \
       fs__ncclComm_t comm, fs__cudaStream_t stream))                                              \
    X(ncclSend, fs__ncclResult_t,                                                                  \
      (const void *send, size_t count, fs__ncclDataType_t dtype, int peer, fs__ncclComm_t comm,    \
       fs__cudaStream_t stream))                                                                   \
    X(ncclRecv, fs__ncclResult_t,                                                                  \
      (void *recv, size_t count, fs__ncclDataType_t dtype, int peer, fs__ncclComm_t comm,          \
       fs__cudaStream_t stream))                                                                   \
    X(ncclGroupStart, fs__ncclResult_t, (void))                                                    \
    X(ncclGroupEnd, fs__ncclResult_t, (void))

/* X(name, version that introduced it (FS__NCCL_V), return type, parameters): resolved one by one.
 */
#define FS__NCCL_OPTIONAL(X)                                                                       \
    X(ncclCommAbort, FS__NCCL_V(2, 4, 0), fs__ncclResult_t, (fs__ncclComm_t comm))                 \
    X(ncclCommGetAsyncError, FS__NCCL_V(2, 4, 0), fs__ncclResult_t,                                \
      (fs__ncclComm_t comm, fs__ncclResult_t * async_error))                                       \
    X(ncclRedOpCreatePreMulSum, FS__NCCL_V(2, 11, 0), fs__ncclResult_t,                            \
      (fs__ncclRedOp_t * op, void *scalar, fs__ncclDataType_t dtype,                               \
       fs__ncclScalarResidence_t residence, fs__ncclComm_t comm))                                  \
    X(ncclRedOpDestroy, FS__NCCL_V(2, 11, 0), fs__ncclResult_t,                                    \
      (fs__ncclRedOp_t op, fs__ncclComm_t comm))                                                   \
    X(ncclGetLastError, FS__NCCL_V(2, 13, 0), const char *, (fs__ncclComm_t comm))                 \
    X(ncclCommInitRankConfig, FS__NCCL_V(2, 14, 0), fs__ncclResult_t,                              \
      (fs__ncclComm_t * comm, int nranks, FS__NCCL_ID_T id, int rank, FS__NCCL_CONFIG_T *config))  \
    X(ncclCommFinalize, FS__NCCL_V(2, 14, 0), fs__ncclResult_t, (fs__ncclComm_t comm))             \
    X(ncclCommSplit, FS__NCCL_V(2, 18, 0), fs__ncclResult_t,                                       \
      (fs__ncclComm_t comm, int color, int key, fs__ncclComm_t *newcomm,                           \
       FS__NCCL_CONFIG_T *config))

#define FS__NCCL_TYPEDEF(name, ret, params) typedef ret(*fs__pfn_##name) params;
#define FS__NCCL_TYPEDEF_OPT(name, since, ret, params) typedef ret(*fs__pfn_##name) params;
FS__NCCL_REQUIRED(FS__NCCL_TYPEDEF)
FS__NCCL_OPTIONAL(FS__NCCL_TYPEDEF_OPT)
#undef FS__NCCL_TYPEDEF
#undef FS__NCCL_TYPEDEF_OPT

/* The loaded library: a pointer per function (optional ones NULL when gated off). */
typedef struct fs__nccl_api {
#define FS__NCCL_MEMBER(name, ret, params) fs__pfn_##name name;
#define FS__NCCL_MEMBER_OPT(name, since, ret, params) fs__pfn_##name name;
    FS__NCCL_REQUIRED(FS__NCCL_MEMBER)
    FS__NCCL_OPTIONAL(FS__NCCL_MEMBER_OPT)
#undef FS__NCCL_MEMBER
#undef FS__NCCL_MEMBER_OPT
    int version;   /* normalised: major * 10000 + minor * 100 + patch */
    unsigned caps; /* enum fs_nccl_cap */
} fs__nccl_api_t;

/* The loaded NCCL, or NULL before fs_nccl_load succeeded. */
const fs__nccl_api_t *fs__nccl(void);

#endif /* FS_NCCL_ABI_H */
