// Dropout and drop-path with hashed masks: keep(i) = splitmix64(seed, stream, i / group) >= p, the same hash
// as src/ops/dropout.rs, so the backward regenerates the forward's mask and nothing is stored.
#include "common.cuh"

__device__ __forceinline__ unsigned long long snella_mix(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// u = ((z >> 40) + 1) / 2^24 in (0, 1]: exact in f32, the same value as the CPU's.
__device__ __forceinline__ bool snella_keep(unsigned long long seed, unsigned long long stream, unsigned long long i, float p) {
    unsigned long long state = snella_mix((snella_mix(seed ^ 0x243F6A8885A308D3ULL) + stream) ^ 0x13198A2E03707344ULL);
    unsigned long long z = snella_mix(state + (i + 1) * 0x9E3779B97F4A7C15ULL);
    return __fmul_rn((float)((z >> 40) + 1), 1.0f / 16777216.0f) >= p;
}

// out (n) = inp * keep(i / group) * scale;  out may be inp
extern "C" __global__ void snella_dropout(float* out, const float* inp, long n, long group, float p, float scale,
                                          long seed, long stream) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    bool k = snella_keep((unsigned long long)seed, (unsigned long long)stream, (unsigned long long)(i / group), p);
    out[i] = k ? __fmul_rn(inp[i], scale) : 0.0f;
}
