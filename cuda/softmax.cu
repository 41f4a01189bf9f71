// Row softmax with an input scale, one block per row.
#include "common.cuh"

// out (rows,cols) = softmax(scale * inp) per row
extern "C" __global__ void snella_softmax_forward(float* out, const float* inp, int rows, int cols, float scale) {
    SHARED_ARRAY(float, sh, [32]);
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* x = inp + (long)r * cols;
    float* o = out + (long)r * cols;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) mx = fmaxf(mx, x[i] * scale);
    mx = block_max(mx, sh);
    float s = 0.0f;
    // x*scale rounded before the subtraction (no FMA), as on the CPU: the row max gives exp(0) = 1 exactly.
    // In place (out == inp): each thread reads x[i] before writing o[i] of the same i, after block_max's
    // barrier has ended every read of the max pass.
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float e = expf(__fsub_rn(__fmul_rn(x[i], scale), mx));
        o[i] = e;
        s += e;
    }
    float inv = 1.0f / block_sum(s, sh);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) o[i] *= inv;
}

// dinp (rows,cols) = scale * y * (g - sum_row(g*y)); dinp may be dout (each i is read, then written, by
// one thread, after block_sum's barrier).
extern "C" __global__ void snella_softmax_backward(float* dinp, const float* out, const float* dout, int rows, int cols, float scale) {
    SHARED_ARRAY(float, sh, [32]);
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* y = out + (long)r * cols;
    const float* g = dout + (long)r * cols;
    float dot = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) dot += y[i] * g[i];
    dot = block_sum(dot, sh);
    float* d = dinp + (long)r * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) d[i] = scale * y[i] * (g[i] - dot);
}
