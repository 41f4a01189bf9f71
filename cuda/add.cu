// Bias add, axpy, LayerScale's per-channel scale (their backwards' column sums: colsum.cu).
#include "common.cuh"

// out (n = rows*cols) += bias[i % cols]
extern "C" __global__ void snella_add_bias(float* out, const float* bias, long n, int cols) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) out[i] += bias[i % cols];
}

// dst (n) += alpha * src
extern "C" __global__ void snella_axpy(float* dst, const float* src, float alpha, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __fadd_rn(dst[i], __fmul_rn(alpha, src[i]));  // no FMA: bit-identical to the CPU
}

// dst (n) = alpha * src
extern "C" __global__ void snella_scale_copy(float* dst, const float* src, float alpha, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) dst[i] = alpha * src[i];
}

// out (n) (+)= inp * gamma[i % cols]
extern "C" __global__ void snella_mul_cols(float* out, const float* inp, const float* gamma, long n, int cols, int accumulate) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = __fmul_rn(inp[i], gamma[i % cols]);  // no FMA with the accumulate: as on the CPU
    out[i] = accumulate ? __fadd_rn(out[i], v) : v;
}
