// Intra-layer magnitude competition (math: src/ops/sparsify.rs): the threshold t = quantile_linear(|M|, s)
// found on the device by a radix select, the sparsified M_s = M*|M|*1[|M| > t], its backward and the
// merged weight W0 + M_s^T.
//
// Radix select: |M| >= 0 orders like its u32 bits (key = bits & 0x7fffffff; NaN keys are > 0x7f800000).
// Two ranks are selected at once, lo = trunc(rank) and hi = ceil(rank), in 4 passes of 8 bits, most
// significant first. state (u32 x 8):
//   [0], [1]  key prefix of rank lo / hi (bits above the current pass are final)
//   [2], [3]  remaining rank of lo / hi inside the entries that share that prefix
//   [4]       non-zero if a NaN was seen (pass 0)
// hist (u32 x 512): [r*256 + bin] counts, for rank r, the entries matching prefix r with digit `bin`.
// Per pass: snella_select_histogram (grid) then snella_select_narrow (one block), which fixes the digit
// and zeroes hist for the next pass. snella_select_init starts it; snella_select_threshold finishes it.
#include "common.cuh"

#define SEL_BINS 256
#define SEL_NOKEY 0xffffffffu

// Starts a select: zero hist, prefixes 0, remaining ranks lo and hi, no NaN. One block.
extern "C" __global__ void snella_select_init(unsigned* state, unsigned* hist, unsigned lo, unsigned hi) {
    for (int b = threadIdx.x; b < 2 * SEL_BINS; b += blockDim.x) hist[b] = 0u;
    if (threadIdx.x == 0) {
        state[0] = 0u;
        state[1] = 0u;
        state[2] = lo;
        state[3] = hi;
        state[4] = 0u;
    }
}

// Key bits fixed before pass `pass` (0..3).
__device__ __forceinline__ unsigned sel_mask(int pass) { return pass == 0 ? 0u : (0xffffffffu << (32 - 8 * pass)); }

// Histogram of digit `pass` of the keys of |m| (n) that match each rank's prefix. blockDim.x must be a
// multiple of 32 (warp-aggregated shared atomics with __match_any_sync over whole warps).
extern "C" __global__ void snella_select_histogram(const float* m, long n, unsigned* state, unsigned* hist, int pass) {
    SHARED_ARRAY(unsigned, sh, [2 * SEL_BINS]);
    for (int b = threadIdx.x; b < 2 * SEL_BINS; b += blockDim.x) sh[b] = 0u;
    __syncthreads();
    int shift = 24 - 8 * pass;
    unsigned mask = sel_mask(pass);
    unsigned p0 = state[0] & mask, p1 = state[1] & mask;
    int lane = threadIdx.x % WARP;
    bool nan = false;
    long stride = (long)gridDim.x * blockDim.x;
    // `base` is uniform over the block, so every lane of a warp runs the same iterations.
    for (long base = (long)blockIdx.x * blockDim.x; base < n; base += stride) {
        long i = base + threadIdx.x;
        bool valid = i < n;
        unsigned key = valid ? (__float_as_uint(m[i]) & 0x7fffffffu) : 0u;
        nan |= valid && key > 0x7f800000u;
        unsigned digit = (key >> shift) & 0xffu;
        unsigned k0 = (valid && (key & mask) == p0) ? digit : SEL_NOKEY;
        unsigned k1 = (valid && (key & mask) == p1) ? (SEL_BINS + digit) : SEL_NOKEY;
        unsigned peers0 = __match_any_sync(0xffffffffu, k0);
        if (k0 != SEL_NOKEY && (__ffs(peers0) - 1) == lane) atomicAdd(&sh[k0], (unsigned)__popc(peers0));
        unsigned peers1 = __match_any_sync(0xffffffffu, k1);
        if (k1 != SEL_NOKEY && (__ffs(peers1) - 1) == lane) atomicAdd(&sh[k1], (unsigned)__popc(peers1));
    }
    if (pass == 0 && nan) atomicOr(&state[4], 1u);
    __syncthreads();
    for (int b = threadIdx.x; b < 2 * SEL_BINS; b += blockDim.x)
        if (sh[b]) atomicAdd(&hist[b], sh[b]);
}

// Fixes digit `pass` of both ranks from hist and zeroes hist. One block of exactly SEL_BINS threads.
extern "C" __global__ void snella_select_narrow(unsigned* state, unsigned* hist, int pass) {
    SHARED_ARRAY(unsigned, warp_tot, [SEL_BINS / WARP]);
    SHARED_ARRAY(unsigned, found_bin, [2]);
    SHARED_ARRAY(unsigned, found_before, [2]);
    int tid = threadIdx.x, lane = tid % WARP, wid = tid / WARP;
    int shift = 24 - 8 * pass;
    for (int r = 0; r < 2; r++) {
        unsigned c = hist[r * SEL_BINS + tid];
        unsigned x = c;  // inclusive scan inside the warp
        for (int o = 1; o < WARP; o <<= 1) {
            unsigned y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        if (lane == WARP - 1) warp_tot[wid] = x;
        __syncthreads();
        unsigned before = 0u;
        for (int w = 0; w < wid; w++) before += warp_tot[w];
        unsigned incl = x + before, excl = incl - c;
        unsigned k = state[2 + r];
        if (excl <= k && k < incl) {  // exactly one bin holds the rank (empty bins have excl == incl)
            found_bin[r] = (unsigned)tid;
            found_before[r] = excl;
        }
        hist[r * SEL_BINS + tid] = 0u;
        __syncthreads();  // found_* visible; warp_tot free for the next rank
    }
    if (tid == 0) {
        for (int r = 0; r < 2; r++) {
            state[r] |= found_bin[r] << shift;
            state[2 + r] -= found_before[r];
        }
    }
}

// t[0] = lerp(v[lo], v[hi], w) as torch.lerp: |w| < 0.5 ? lo + w*(hi-lo) : hi - (hi-lo)*(1-w);
// NaN if |M| has a NaN. One thread.
extern "C" __global__ void snella_select_threshold(float* t, const unsigned* state, float w) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    if (state[4]) {
        t[0] = __uint_as_float(0x7fc00000u);
        return;
    }
    float lo = __uint_as_float(state[0]), hi = __uint_as_float(state[1]);
    float diff = __fsub_rn(hi, lo);
    t[0] = fabsf(w) < 0.5f ? __fadd_rn(lo, __fmul_rn(w, diff)) : __fsub_rn(hi, __fmul_rn(diff, __fsub_rn(1.0f, w)));
}

// ms = m * (|m| > t ? |m| : 0)   (torch: M * F.threshold(|M|, t, 0)); ms may be m.      (n)
extern "C" __global__ void snella_sparsify_apply(float* ms, const float* m, const float* t, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float tv = *t, v = m[i], a = fabsf(v);
    ms[i] = __fmul_rn(v, a > tv ? a : 0.0f);
}

// dm = dms * (|m| > t ? |m| : 0); dm may be dms.                                           (n)
extern "C" __global__ void snella_sparsify_backward(float* dm, const float* dms, const float* m, const float* t, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float tv = *t, a = fabsf(m[i]);
    dm[i] = __fmul_rn(dms[i], a > tv ? a : 0.0f);
}

// dst (n_out, n_in) = w0 (n_out, n_in) + ms^T, ms (n_in, n_out). Blocks of 32x8 threads over 32x32
// tiles of ms (blockIdx.x -> out columns, blockIdx.y -> in rows); dst may be w0.
extern "C" __global__ void snella_add_transposed(float* dst, const float* w0, const float* ms, int n_in, int n_out) {
    SHARED_ARRAY(float, tile, [32][33]);
    int i0 = blockIdx.y * 32, j0 = blockIdx.x * 32;
    for (int r = threadIdx.y; r < 32; r += blockDim.y) {
        int i = i0 + r, j = j0 + threadIdx.x;
        if (i < n_in && j < n_out) tile[r][threadIdx.x] = ms[(long)i * n_out + j];
    }
    __syncthreads();
    for (int r = threadIdx.y; r < 32; r += blockDim.y) {
        int o = j0 + r, i = i0 + threadIdx.x;
        if (o < n_out && i < n_in) {
            long idx = (long)o * n_in + i;
            dst[idx] = w0[idx] + tile[threadIdx.x][r];
        }
    }
}
