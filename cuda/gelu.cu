// Exact (erf) GELU, as torch.nn.functional.gelu with approximate='none'.
#include "common.cuh"

// out[i] = x * 0.5 * (1 + erf(x / sqrt(2)))                           (n)
extern "C" __global__ void snella_gelu_forward(float* out, const float* inp, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    }
}

// dinp[i] = dout[i] * (Phi(x) + x * phi(x))                            (n)
extern "C" __global__ void snella_gelu_backward(float* dinp, const float* inp, const float* dout, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) {
        float x = inp[i];
        float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
        dinp[i] = dout[i] * (cdf + x * pdf);
    }
}
