// Kernels with one planted bug each, compiled for the emulated device only (never by nvcc): the test
// tests/emu_sanitizer.rs launches each and requires the check it names to report it, naming the kernel,
// the block, the thread and the address.
#include "../common.cuh"

// memcheck: the thread with i == n writes one element past the end of out (n).
extern "C" __global__ void snella_bug_global_oob_write(float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;  // the bug: <= instead of <
}

// memcheck: the last thread reads one element past the end of a shared array of 32.
extern "C" __global__ void snella_bug_shared_oob_read(float* out) {
    SHARED_ARRAY(float, s, [32]);
    int t = threadIdx.x;
    s[t] = (float)t;
    __syncthreads();
    out[t] = s[t + 1];  // the bug: t + 1 == 32 for the last thread
}

// racecheck: each thread reads the word its neighbour writes, with no barrier between.
extern "C" __global__ void snella_bug_missing_barrier(float* out) {
    SHARED_ARRAY(float, s, [64]);
    int t = threadIdx.x;
    s[t] = (float)t;
    // the bug: a __syncthreads() belongs here
    out[t] = s[(t + 1) % blockDim.x];
}

// synccheck: half of the warp returns, the other half shuffles with the full mask.
extern "C" __global__ void snella_bug_shuffle_after_return(float* out) {
    int t = threadIdx.x;
    if (t >= 16) return;  // the bug: lanes 16-31 leave before the full-mask shuffle
    out[t] = __shfl_xor_sync(0xffffffff, (float)t, 1);
}

// synccheck: a __syncthreads inside a branch that only the first warp takes.
extern "C" __global__ void snella_bug_divergent_barrier(float* out) {
    SHARED_ARRAY(float, s, [64]);
    int t = threadIdx.x;
    s[t] = (float)t;
    if (t < 32) __syncthreads();  // the bug: the second warp never reaches this barrier
    __syncthreads();
    out[t] = s[63 - t];
}

// No bug: the tests launch it with geometry beyond sm_90's limits and with wrong argument lists.
extern "C" __global__ void snella_bug_launch_target(float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = 2.0f;
}
