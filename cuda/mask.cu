// GPS-like masked updates: zero the gradient outside a fixed u8 mask.
#include "common.cuh"

// grad (n) f32, mask (n) u8
extern "C" __global__ void snella_mask_grad(float* grad, const unsigned char* mask, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n && mask[i] == 0) grad[i] = 0.0f;
}
