// Bias add and its backward, axpy, LayerScale's per-channel scale.
#include "common.cuh"

// out (n = rows*cols) += bias[i % cols]
extern "C" __global__ void snella_add_bias(float* out, const float* bias, long n, int cols) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) out[i] += bias[i % cols];
}

// dbias (cols) += column sums of dout (rows, cols); one thread per column, rows in order
extern "C" __global__ void snella_bias_backward(float* dbias, const float* dout, int rows, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int r = 0; r < rows; r++) s += dout[(long)r * cols + c];
    dbias[c] += s;
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

// dgamma (cols) += column sums of dout * inp
extern "C" __global__ void snella_mul_cols_backward_gamma(float* dgamma, const float* dout, const float* inp, int rows, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int r = 0; r < rows; r++) s = __fadd_rn(s, __fmul_rn(dout[(long)r * cols + c], inp[(long)r * cols + c]));
    dgamma[c] += s;
}
