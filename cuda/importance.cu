// SNELLA allocator: EMA importance and uncertainty per factor entry. Products and sums are rounded one at
// a time (__fmul_rn/__fadd_rn: no FMA contraction) to match PyTorch's separate tensor-scalar ops.
#include "common.cuh"

// ipt, unc, p, g: (n)
extern "C" __global__ void snella_importance_update(float* ipt, float* unc, const float* p, const float* g, long n,
                                                    float b1, float one_m_b1, float b2, float one_m_b2) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = fabsf(__fmul_rn(p[i], g[i]));
    if (isnan(x)) x = 0.0f;
    float ni = __fadd_rn(__fmul_rn(b1, ipt[i]), __fmul_rn(one_m_b1, x));
    ipt[i] = ni;
    unc[i] = __fadd_rn(__fmul_rn(b2, unc[i]), __fmul_rn(one_m_b2, fabsf(__fadd_rn(x, -ni))));
}
