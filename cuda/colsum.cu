// Column sums of (rows, cols) matrices into per-column gradients (biases, LayerScale's gamma, LayerNorm's gamma
// and beta), in two deterministic stages so that a reduction over 12,608 rows spreads over every SM instead of
// walking the rows in a few blocks. Rust twin and the order of the additions: src/ops/colsum.rs.
//   stage 1, snella_colsum_partial: part[p][k][c] = sum of plane p's terms over chunk k of COLSUM_CHUNK rows,
//            summed by COLSUM_LANES interleaved lanes (row r goes to lane (r - chunk start) % LANES, in order),
//            then the lane sums in lane order;
//   stage 2, snella_colsum_finish: dst[c] += the sum of part[k][c] over k, in order.
// Every sum is rounded on its own (the _rn intrinsics), so the CPU twin agrees to the bit.
#include "common.cuh"

#define COLSUM_CHUNK 128
#define COLSUM_LANES 8

// Terms by kind: 0: a (a bias); 1: a*b (LayerScale's gamma, b the scaled input); 2: LayerNorm's two planes,
// a*xhat (gamma) and a (beta), xhat = (b - mean[r])*rstd[r] as the forward computes it.
// part (planes, chunks, cols), a and b (rows, cols), mean and rstd (rows, kind 2 only, else null).
// Blocks of 32 columns x COLSUM_LANES lanes: blockIdx.x = chunk, blockIdx.y = 32-column tile.
extern "C" __global__ void snella_colsum_partial(float* part, const float* a, const float* b, const float* mean,
                                                 const float* rstd, int rows, int cols, int kind) {
    SHARED_ARRAY(float, lane0, [COLSUM_LANES][32]);
    SHARED_ARRAY(float, lane1, [COLSUM_LANES][32]);
    int c = blockIdx.y * 32 + threadIdx.x, k = blockIdx.x, chunks = gridDim.x;
    int r1 = min(rows, (k + 1) * COLSUM_CHUNK);
    float s0 = 0.0f, s1 = 0.0f;
    if (c < cols) {
        for (int r = k * COLSUM_CHUNK + threadIdx.y; r < r1; r += COLSUM_LANES) {
            long i = (long)r * cols + c;
            float g = a[i];
            float t = kind == 0 ? g : kind == 1 ? __fmul_rn(g, b[i]) : __fmul_rn(g, __fmul_rn(__fsub_rn(b[i], mean[r]), rstd[r]));
            s0 = __fadd_rn(s0, t);
            s1 = __fadd_rn(s1, g);
        }
    }
    lane0[threadIdx.y][threadIdx.x] = s0;
    lane1[threadIdx.y][threadIdx.x] = s1;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t0 = 0.0f, t1 = 0.0f;
        for (int l = 0; l < COLSUM_LANES; l++) {
            t0 = __fadd_rn(t0, lane0[l][threadIdx.x]);
            t1 = __fadd_rn(t1, lane1[l][threadIdx.x]);
        }
        part[(long)k * cols + c] = t0;
        if (kind == 2) part[((long)chunks + k) * cols + c] = t1;
    }
}

// dst (cols) += sum over k of part[k][c], k in order. part (chunks, cols).
extern "C" __global__ void snella_colsum_finish(float* dst, const float* part, int chunks, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int k = 0; k < chunks; k++) s = __fadd_rn(s, part[(long)k * cols + c]);
    dst[c] = __fadd_rn(dst[c], s);
}
