/*
 * A stand-in for the CUDA runtime header, so check_nccl_abi.c can include
 * the nccl.h of PyPI's nvidia-nccl-cu13 wheel without a CUDA toolkit. nccl.h
 * needs only these handle types; check_cuda_abi.c checks them (and the rest
 * of cuda_abi.h) against the real CUDA headers where those are installed.
 */
#ifndef FS_CUDA_RUNTIME_STUB_H
#define FS_CUDA_RUNTIME_STUB_H
typedef struct CUstream_st *cudaStream_t;
typedef struct CUevent_st *cudaEvent_t;
#define CUDART_VERSION 13000
#endif
