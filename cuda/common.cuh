// Shared helpers of the snella kernels: block and warp reductions, and the shared-memory declarations.
#pragma once
#ifdef SNELLA_EMU
// Compiled for the host: the emulated CUDA device (cuda/emu/cuda_emu.h provides the built-ins).
#include "emu/cuda_emu.h"
#else
#include <cuda_runtime.h>
#include <math.h>
// Shared memory is declared through these two macros so that the emulator, which gives each block its own
// shared memory and checks every access against the array it belongs to, sees each array's extent.
#define SHARED_ARRAY(type, name, dims) __shared__ type name dims
#define DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

#define WARP 32

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Sum over the whole block; every thread gets the result. `shared` holds at least 32 floats.
__device__ __forceinline__ float block_sum(float v, float* shared) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = (blockDim.x + WARP - 1) / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[wid] = v;
    __syncthreads();
    v = lane < nw ? shared[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* shared) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = (blockDim.x + WARP - 1) / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[wid] = v;
    __syncthreads();
    v = lane < nw ? shared[lane] : -INFINITY;
    return warp_max(v);
}
