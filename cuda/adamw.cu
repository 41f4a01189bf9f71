// AdamW (torch single-tensor path), scalars precomputed on the host in double and rounded to f32.
#include "common.cuh"

// p, g, m, v: (n)
extern "C" __global__ void snella_adamw(float* p, const float* g, float* m, float* v, long n, float decay, float one_m_b1,
                                        float b2, float one_m_b2, float step_size, float bc2_sqrt, float eps) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float pi = p[i] * decay;
    float mi = m[i] + one_m_b1 * (gi - m[i]);
    float vi = v[i] * b2 + one_m_b2 * gi * gi;
    float denom = sqrtf(vi) / bc2_sqrt + eps;
    p[i] = pi + (-step_size) * (mi / denom);
    m[i] = mi;
    v[i] = vi;
}
