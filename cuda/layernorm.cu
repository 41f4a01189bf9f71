// LayerNorm over the last dimension: one block per row.
#include "common.cuh"

// The one expression of the forward and the recompute: explicit rounding so both agree to the bit.
__device__ __forceinline__ float ln_normalize(float x, float m, float r, float w, float b) {
    return __fadd_rn(__fmul_rn(__fmul_rn(__fsub_rn(x, m), r), w), b);
}

// out (N,C) = (inp - mean) * rstd * w + b;  mean, rstd (N)
extern "C" __global__ void snella_layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                                                    const float* w, const float* b, int N, int C, float eps) {
    SHARED_ARRAY(float, sh, [32]);
    int row = blockIdx.x;
    if (row >= N) return;
    const float* x = inp + (long)row * C;
    float s = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) s += x[i];
    float m = block_sum(s, sh) / C;
    float v = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) { float d = x[i] - m; v += d * d; }
    // 1/sqrt, not rsqrtf (2 ulp): the CPU's 1.0 / (v + eps).sqrt(), both IEEE-rounded without fast math.
    float r = 1.0f / sqrtf(block_sum(v, sh) / C + eps);
    float* o = out + (long)row * C;
    for (int i = threadIdx.x; i < C; i += blockDim.x) o[i] = ln_normalize(x[i], m, r, w[i], b[i]);
    if (threadIdx.x == 0) { mean[row] = m; rstd[row] = r; }
}

// Recompute of the forward's output from saved statistics: out (n = N*C), mean/rstd (N)
extern "C" __global__ void snella_layernorm_apply(float* out, const float* inp, const float* mean, const float* rstd,
                                                  const float* w, const float* b, long n, int C) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    long row = i / C;
    int c = i % C;
    out[i] = ln_normalize(inp[i], mean[row], rstd[row], w[c], b[c]);
}

// dinp (N,C) += rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat))
extern "C" __global__ void snella_layernorm_backward(float* dinp, const float* dout, const float* inp, const float* w,
                                                     const float* mean, const float* rstd, int N, int C) {
    SHARED_ARRAY(float, sh, [32]);
    int row = blockIdx.x;
    if (row >= N) return;
    const float* x = inp + (long)row * C;
    const float* g = dout + (long)row * C;
    float m = mean[row], r = rstd[row];
    float a = 0.0f, bsum = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float dn = g[i] * w[i];
        a += dn;
        bsum += dn * ((x[i] - m) * r);  // dn * xhat, xhat rounded first as on the CPU
    }
    a = block_sum(a, sh) / C;
    bsum = block_sum(bsum, sh) / C;
    float* dx = dinp + (long)row * C;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float xh = (x[i] - m) * r;
        dx[i] += r * (g[i] * w[i] - a - xh * bsum);
    }
}
