// Head split / merge permutes of attention (the products run in cuBLAS, the softmax in softmax.cu).
#include "common.cuh"

// to_heads: dst (B,H,N,hd) <- src rows (B,N,ld) columns [h*hd, h*hd+hd);  else the inverse scatter.
extern "C" __global__ void snella_permute_heads(float* dst, const float* src, int B, int N, int H, int hd, int ld, int to_heads) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    long total = (long)B * N * H * hd;
    if (i >= total) return;
    int d = i % hd;
    long t = i / hd;
    int n = t % N; t /= N;
    int h = t % H;
    int b = t / H;
    long heads = i;
    long rows = ((long)b * N + n) * ld + (long)h * hd + d;
    if (to_heads) dst[heads] = src[rows]; else dst[rows] = src[heads];
}
