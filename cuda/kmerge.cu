// Kernelized merge of SNELL / SNELLA and its backward (math and layouts: src/ops/kmerge.rs).
//   A = In_Qs (2, n_in, d), B = Out_Qs (2, n_out, d), M and K (n_in, n_out) row-major.
// The elementwise (i, j) kernels run on blocks of KM_TJ x KM_TI threads (threadIdx.x -> column j,
// threadIdx.y -> row i); the A and B rows of the block are staged in dynamic shared memory:
//   sa[(h*KM_TI + r)*d + k]    (2 pieces x KM_TI rows x d)
//   sb[(h*KM_TJ + c)*sd + k]   (2 pieces x KM_TJ rows x sd), sd = d|1 (odd stride: no bank conflicts)
// The host sizes the dynamic shared memory as 4*(2*KM_TI*d + 2*KM_TJ*sd) bytes (kmerge.rs tile_cfg).
#include "common.cuh"

#define KM_TJ 32
#define KM_TI 8

// KernelKind codes (kmerge.rs KernelKind::code).
#define KIND_PIECEWISE_LINEAR 0
#define KIND_LINEAR 1
#define KIND_RBF 2
#define KIND_SIGMOID 3
#define KIND_POLY 4

// max(x, 0) that keeps NaN (torch clamp_min; fmaxf would drop it).
__device__ __forceinline__ float km_clamp0(float x) { return x < 0.0f ? 0.0f : x; }

__device__ __forceinline__ void km_load_tiles(float* sa, float* sb, const float* a, const float* b, int n_in,
                                              int n_out, int d, int sd, int i0, int j0) {
    int t = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
    for (int idx = t; idx < 2 * KM_TI * d; idx += nt) {
        int h = idx / (KM_TI * d), rem = idx - h * KM_TI * d, r = rem / d, k = rem - r * d;
        int i = i0 + r;
        sa[(h * KM_TI + r) * d + k] = i < n_in ? a[((long)h * n_in + i) * d + k] : 0.0f;
    }
    for (int idx = t; idx < 2 * KM_TJ * d; idx += nt) {
        int h = idx / (KM_TJ * d), rem = idx - h * KM_TJ * d, c = rem / d, k = rem - c * d;
        int j = j0 + c;
        sb[(h * KM_TJ + c) * sd + k] = j < n_out ? b[((long)h * n_out + j) * d + k] : 0.0f;
    }
}

// Per-piece dot product and squared norms of (A_h,i, B_h,j) for tile row r, tile column c.
struct KmPair {
    float p[2], a2[2], b2[2];
};

__device__ __forceinline__ KmPair km_pair(const float* sa, const float* sb, int d, int sd, int r, int c) {
    KmPair q;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const float* x = sa + (h * KM_TI + r) * d;
        const float* y = sb + (h * KM_TJ + c) * sd;
        float p = 0.0f, a2 = 0.0f, b2 = 0.0f;
        for (int k = 0; k < d; k++) {
            float u = x[k], v = y[k];
            p += u * v;
            a2 += u * u;
            b2 += v * v;
        }
        q.p[h] = p;
        q.a2[h] = a2;
        q.b2[h] = b2;
    }
    return q;
}

// ||A_h,i - B_h,j||^2 by cdist's expanded form [-2a, |a|^2, 1].[b, 1, |b|^2], clamped at 0.
__device__ __forceinline__ float km_sq_dist(const KmPair& q, int h) {
    return km_clamp0(__fadd_rn(__fadd_rn(-2.0f * q.p[h], q.a2[h]), q.b2[h]));
}

// ||A_h,i - B_h,j|| for the backward's ratio, 0 where the expanded form cannot tell the rows apart: its rounding
// error is about (2d + 2)*eps*(|a|^2 + |b|^2), and below that 0.1*g/D would divide by rounding noise (the CPU
// twin's dist_or_zero, the same operations).
__device__ __forceinline__ float km_dist_or_zero(const KmPair& q, int h, int d) {
    float d2 = km_sq_dist(q, h);
    float noise = __fmul_rn(__fmul_rn((float)(2 * d + 2), 1.1920928955078125e-7f), __fadd_rn(q.a2[h], q.b2[h]));
    return d2 <= noise ? 0.0f : sqrtf(d2);
}

// ||a_i - b_j||^2 over both pieces.
__device__ __forceinline__ float km_sq_dist_all(const KmPair& q) {
    float s0 = __fadd_rn(__fadd_rn(-2.0f * q.p[0], q.a2[0]), q.b2[0]);
    float s1 = __fadd_rn(__fadd_rn(-2.0f * q.p[1], q.a2[1]), q.b2[1]);
    return km_clamp0(__fadd_rn(s0, s1));
}

__device__ __forceinline__ float km_value(int kind, const KmPair& q, int d) {
    switch (kind) {
        case KIND_PIECEWISE_LINEAR:
            return __fadd_rn(__fmul_rn(0.1f, sqrtf(km_sq_dist(q, 0))), __fmul_rn(-0.1f, sqrtf(km_sq_dist(q, 1))));
        case KIND_LINEAR:
            return q.p[0] + q.p[1];
        case KIND_RBF:
            return expm1f(-km_sq_dist_all(q) / (float)(2 * d));
        case KIND_SIGMOID:
            return tanhf(q.p[0] + q.p[1]);
        default: {  // KIND_POLY
            float p = q.p[0] + q.p[1];
            return __fmul_rn(p, p + 2.0f);
        }
    }
}

// out (n_in, n_out) = K(A, B)
extern "C" __global__ void snella_kmerge_forward(float* out, const float* a, const float* b, int n_in, int n_out, int d,
                                                 int kind) {
    DYNAMIC_SHARED(float, km_smem);
    int sd = d | 1;
    float* sa = km_smem;
    float* sb = km_smem + 2 * KM_TI * d;
    int i0 = blockIdx.y * KM_TI, j0 = blockIdx.x * KM_TJ;
    km_load_tiles(sa, sb, a, b, n_in, n_out, d, sd, i0, j0);
    __syncthreads();
    int i = i0 + threadIdx.y, j = j0 + threadIdx.x;
    if (i < n_in && j < n_out) out[(long)i * n_out + j] = km_value(kind, km_pair(sa, sb, d, sd, threadIdx.y, threadIdx.x), d);
}

// dK -> R in place in g (n_in, n_out); the piecewise-linear kernel writes R_0 = 0.1*dK/D_0 to r0 and
// R_1 = -0.1*dK/D_1 to g (0 where D == 0). Rbf: R = dK*exp(-|a-b|^2/r)*(-2/r). Sigmoid: dK*(1-K^2).
// Poly: dK*2(p+1). Linear needs no ratio (R = dK) and is not launched.
extern "C" __global__ void snella_kmerge_ratio(float* g, float* r0, const float* a, const float* b, int n_in, int n_out,
                                               int d, int kind) {
    DYNAMIC_SHARED(float, km_smem);
    int sd = d | 1;
    float* sa = km_smem;
    float* sb = km_smem + 2 * KM_TI * d;
    int i0 = blockIdx.y * KM_TI, j0 = blockIdx.x * KM_TJ;
    km_load_tiles(sa, sb, a, b, n_in, n_out, d, sd, i0, j0);
    __syncthreads();
    int i = i0 + threadIdx.y, j = j0 + threadIdx.x;
    if (i >= n_in || j >= n_out) return;
    long idx = (long)i * n_out + j;
    KmPair q = km_pair(sa, sb, d, sd, threadIdx.y, threadIdx.x);
    float gv = g[idx];
    float r = (float)(2 * d);
    switch (kind) {
        case KIND_PIECEWISE_LINEAR: {
            float d0 = km_dist_or_zero(q, 0, d), d1 = km_dist_or_zero(q, 1, d);
            r0[idx] = d0 == 0.0f ? 0.0f : __fmul_rn(0.1f, gv) / d0;
            g[idx] = d1 == 0.0f ? 0.0f : __fmul_rn(-0.1f, gv) / d1;
            break;
        }
        case KIND_LINEAR:
            break;
        case KIND_RBF:
            g[idx] = __fmul_rn(__fmul_rn(gv, expf(-km_sq_dist_all(q) / r)), -2.0f / r);
            break;
        case KIND_SIGMOID: {
            float t = tanhf(q.p[0] + q.p[1]);
            g[idx] = __fmul_rn(gv, __fsub_rn(1.0f, __fmul_rn(t, t)));
            break;
        }
        default:  // KIND_POLY
            g[idx] = __fmul_rn(gv, __fmul_rn(2.0f, __fadd_rn(q.p[0] + q.p[1], 1.0f)));
            break;
    }
}

// m (n_in, n_out) := m + alpha*softmax_row(m/gamma) + beta, in place; one block per row i.
// alpha, gamma, beta: 1-element device tensors.
extern "C" __global__ void snella_kmerge_mix_forward(float* m, const float* alpha, const float* gamma, const float* beta,
                                                     int n_in, int n_out) {
    SHARED_ARRAY(float, sh, [32]);
    int i = blockIdx.x;
    if (i >= n_in) return;
    float* row = m + (long)i * n_out;
    float al = *alpha, gm = *gamma, be = *beta;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n_out; j += blockDim.x) mx = fmaxf(mx, row[j] / gm);
    mx = block_max(mx, sh);
    float s = 0.0f;
    for (int j = threadIdx.x; j < n_out; j += blockDim.x) s += expf(row[j] / gm - mx);
    float inv = 1.0f / block_sum(s, sh);
    for (int j = threadIdx.x; j < n_out; j += blockDim.x) {
        float k = row[j];
        float p = __fmul_rn(expf(k / gm - mx), inv);
        row[j] = __fadd_rn(__fadd_rn(k, __fmul_rn(al, p)), be);
    }
}

// Mixture backward, one block per row i. In: g = G = dL/dM, k = K. Out: g := dK = G + u/gamma with
// S = softmax_row(K/gamma), u = S*(alpha*G - sum_row(alpha*G*S)); part (3, n_in) := per-row
// sum G, sum G*S, sum u*K.
extern "C" __global__ void snella_kmerge_mix_backward(float* g, const float* k, const float* alpha, const float* gamma,
                                                      float* part, int n_in, int n_out) {
    SHARED_ARRAY(float, sh, [32]);
    int i = blockIdx.x;
    if (i >= n_in) return;
    float* gr = g + (long)i * n_out;
    const float* kr = k + (long)i * n_out;
    float al = *alpha, gm = *gamma;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n_out; j += blockDim.x) mx = fmaxf(mx, kr[j] / gm);
    mx = block_max(mx, sh);
    float s = 0.0f;
    for (int j = threadIdx.x; j < n_out; j += blockDim.x) s += expf(kr[j] / gm - mx);
    float inv = 1.0f / block_sum(s, sh);
    float s_g = 0.0f, s_gs = 0.0f, dot = 0.0f;
    for (int j = threadIdx.x; j < n_out; j += blockDim.x) {
        float sv = __fmul_rn(expf(kr[j] / gm - mx), inv);
        float gv = gr[j];
        s_g += gv;
        s_gs += gv * sv;
        dot += __fmul_rn(al, gv) * sv;
    }
    s_g = block_sum(s_g, sh);
    s_gs = block_sum(s_gs, sh);
    dot = block_sum(dot, sh);
    float s_uk = 0.0f;
    for (int j = threadIdx.x; j < n_out; j += blockDim.x) {
        float kv = kr[j];
        float sv = __fmul_rn(expf(kv / gm - mx), inv);
        float gv = gr[j];
        float u = __fmul_rn(sv, __fsub_rn(__fmul_rn(al, gv), dot));
        gr[j] = __fadd_rn(gv, u / gm);
        s_uk += u * kv;
    }
    s_uk = block_sum(s_uk, sh);
    if (threadIdx.x == 0) {
        part[i] = s_g;
        part[n_in + i] = s_gs;
        part[2 * n_in + i] = s_uk;
    }
}

// dalpha += sum(part[1]), dgamma += -sum(part[2])/gamma^2, dbeta += sum(part[0]); one block.
extern "C" __global__ void snella_kmerge_mix_reduce(float* dalpha, float* dgamma, float* dbeta, const float* gamma,
                                                    const float* part, int n_in) {
    SHARED_ARRAY(float, sh, [32]);
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f;
    for (int i = threadIdx.x; i < n_in; i += blockDim.x) {
        s0 += part[i];
        s1 += part[n_in + i];
        s2 += part[2 * n_in + i];
    }
    s0 = block_sum(s0, sh);
    s1 = block_sum(s1, sh);
    s2 = block_sum(s2, sh);
    if (threadIdx.x == 0) {
        float gm = *gamma;
        *dbeta += s0;
        *dalpha += s1;
        *dgamma += -s2 / (gm * gm);
    }
}

// aug (rows, d+1) = [x | 1], x: (rows, d)
extern "C" __global__ void snella_kmerge_augment(float* aug, const float* x, int rows, int d) {
    long idx = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (idx >= (long)rows * (d + 1)) return;
    long r = idx / (d + 1);
    int k = (int)(idx - r * (d + 1));
    aug[idx] = k < d ? x[r * d + k] : 1.0f;
}

// dx (rows, d) += x * t[:, d] - t[:, :d], t = R.[Y | 1] (rows, d+1)
extern "C" __global__ void snella_kmerge_dist_grad(float* dx, const float* x, const float* t, int rows, int d) {
    long idx = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (idx >= (long)rows * d) return;
    long r = idx / d;
    int k = (int)(idx - r * d);
    const float* tr = t + r * (d + 1);
    dx[idx] += __fsub_rn(__fmul_rn(x[idx], tr[d]), tr[k]);
}
