// AdamW (torch single-tensor path), scalars precomputed on the host in double and rounded to f32.
// Every product, quotient and sum is rounded on its own (the _rn intrinsics forbid FMA contraction), in
// torch's order, so the update is bit-identical to the CPU reference.
#include "common.cuh"

// p, g, m, v: (n)
extern "C" __global__ void snella_adamw(float* p, const float* g, float* m, float* v, long n, float decay, float one_m_b1,
                                        float b2, float one_m_b2, float step_size, float bc2_sqrt, float eps) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float pi = __fmul_rn(p[i], decay);
    float mi = __fadd_rn(m[i], __fmul_rn(one_m_b1, __fsub_rn(gi, m[i])));
    float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(one_m_b2, gi), gi));
    float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
    p[i] = __fadd_rn(pi, __fdiv_rn(__fmul_rn(-step_size, mi), denom));
    m[i] = mi;
    v[i] = vi;
}
