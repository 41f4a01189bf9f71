// bf16 storage: widening to fp32 and rounding from fp32 (round-to-nearest-even). Rust twin: src/ops/convert.rs.
//
// The conversions are written as bit arithmetic, the same as the `half` crate the CPU uses, so both devices
// agree bit for bit on every input, NaN included. For non-NaN inputs this equals cuda_bf16.h's
// __float2bfloat16_rn / __bfloat162float (RNE, subnormals kept, overflow to ±inf); for a NaN, __float2bfloat16_rn
// gives the canonical 0x7FFF while `half` keeps the payload's high bits and sets the quiet bit, as done here.
// bf16 tensors are passed as their bits (unsigned short).
#include "common.cuh"

// f32 -> bf16 bits, round to nearest, ties to even; a NaN stays a (quiet) NaN.
__device__ __forceinline__ unsigned short snella_f32_to_bf16(float f) {
    unsigned int x = __float_as_uint(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) {
        return (unsigned short)((x >> 16) | 0x0040u);
    }
    // Round up when the dropped half is above the tie, or at the tie with an odd kept part; a carry out of
    // the mantissa steps the exponent (and the largest finite values up to infinity), as IEEE rounding does.
    unsigned int round_bit = 0x00008000u;
    unsigned int up = ((x & round_bit) != 0u) && ((x & (3u * round_bit - 1u)) != 0u);
    return (unsigned short)((x >> 16) + up);
}

// bf16 bits -> f32, exact (a NaN gets the quiet bit, as in `half`).
__device__ __forceinline__ float snella_bf16_to_f32(unsigned short b) {
    unsigned int x = (unsigned int)b;
    if ((x & 0x7FFFu) > 0x7F80u) {
        x |= 0x0040u;
    }
    return __uint_as_float(x << 16);
}

// dst[i] = f32(src[i])                                                 dst: f32 (n), src: bf16 (n)
extern "C" __global__ void snella_bf16_widen(float* dst, const unsigned short* src, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) {
        dst[i] = snella_bf16_to_f32(src[i]);
    }
}

// dst[i] = bf16(x[i]) (RNE), then x[i] = f32(dst[i]); a null dst only rounds x in place (a checkpoint
// that is recomputed, not kept).                                      dst: bf16 (n) or null, x: f32 (n)
extern "C" __global__ void snella_bf16_round(unsigned short* dst, float* x, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) {
        unsigned short b = snella_f32_to_bf16(x[i]);
        if (dst != nullptr) {
            dst[i] = b;
        }
        x[i] = snella_bf16_to_f32(b);
    }
}
