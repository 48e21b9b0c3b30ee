#pragma once
// Functions shared by the CPU and CUDA kernels are compiled for both from one definition.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define PEFTOPS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PEFTOPS_HOST_DEVICE inline
#endif
