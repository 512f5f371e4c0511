// Just enough of CUDA to compile a kernel file with the host C++ compiler and run its grid sequentially on the
// CPU (tests/test_ops_host_emulation.py). Valid only for kernels whose threads never cooperate: no shared memory,
// __syncthreads, warp intrinsics or atomics. Force-included (g++ -include) before the kernel source.
#pragma once

#define INVOLUTION_HOST_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// __restrict__ is already a GNU C++ keyword.

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
typedef dim3 uint3;

// The launcher (launcher.cpp) sets these before "running" each thread.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
