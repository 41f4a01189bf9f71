// Patch embedding pieces and the cls-row gather/scatter of the head.
#include "common.cuh"

// out (B*Np, C*P*P) <- img (B,C,H,W)
extern "C" __global__ void snella_patchify(float* out, const float* img, int B, int C, int H, int W, int P) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    int gh = H / P, gw = W / P, pd = C * P * P;
    long total = (long)B * gh * gw * pd;
    if (i >= total) return;
    int col = i % pd;
    long row = i / pd;
    int px = col % P, py = (col / P) % P, c = col / (P * P);
    int gx = row % gw, gy = (row / gw) % gh;
    long b = row / ((long)gh * gw);
    out[i] = img[((b * C + c) * H + gy * P + py) * (long)W + gx * P + px];
}

// x (B,T,D): row 0 = cls + pos[0], row 1+p = patch_out[b*(T-1)+p] + pos[1+p]
extern "C" __global__ void snella_embed_forward(float* x, const float* patch_out, const float* cls, const float* pos, int B, int T, int D) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)B * T * D) return;
    int d = i % D;
    long r = i / D;
    int t = r % T;
    long b = r / T;
    float v = t == 0 ? cls[d] : patch_out[(b * (T - 1) + t - 1) * D + d];
    x[i] = v + pos[(long)t * D + d];
}

// One thread per (t, d): sums over the batch in order. dcls (D) +=, dpos (T,D) +=, dpatch (B*(T-1), D) = ; each may be null
extern "C" __global__ void snella_embed_backward(float* dcls, float* dpos, float* dpatch, const float* dx, int B, int T, int D) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)T * D) return;
    int d = i % D, t = i / D;
    float s = 0.0f;
    for (int b = 0; b < B; b++) {
        float g = dx[((long)b * T + t) * D + d];
        s += g;
        if (t > 0 && dpatch) dpatch[((long)b * (T - 1) + t - 1) * D + d] = g;
    }
    if (dpos) dpos[i] += s;
    if (t == 0 && dcls) dcls[d] += s;
}

// scatter == 0: a (B,D) <- cls rows of b (B,T,D).   scatter == 1: b (B,T,D) <- a in the cls rows, 0 elsewhere.
extern "C" __global__ void snella_cls_rows(float* a, float* b, int B, int T, int D, int scatter) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)B * T * D) return;
    int d = i % D;
    long r = i / D;
    int t = r % T;
    long bi = r / T;
    if (scatter) b[i] = t == 0 ? a[bi * D + d] : 0.0f;
    else if (t == 0) a[bi * D + d] = b[i];
}
