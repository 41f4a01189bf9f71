// Fused softmax + cross-entropy (mean over the batch), one block per sample.
#include "common.cuh"

// losses (B); dlogits (B,V) = (softmax - onehot)/B, may be null; logits (B,V); labels (B) int32
extern "C" __global__ void snella_cross_entropy(float* losses, float* dlogits, const float* logits, const int* labels, int B, int V) {
    SHARED_ARRAY(float, sh, [32]);
    int r = blockIdx.x;
    if (r >= B) return;
    const float* x = logits + (long)r * V;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, x[i]);
    mx = block_max(mx, sh);
    float z = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) z += expf(x[i] - mx);
    z = block_sum(z, sh);
    int y = labels[r];
    // A label outside 0..V (set_batch refuses them; this is the last line of defence) gives a NaN row
    // instead of a read outside the logits, as the CPU twin does.
    bool valid = y >= 0 && y < V;
    if (threadIdx.x == 0) losses[r] = valid ? (logf(z) + mx) - x[y] : NAN;
    if (dlogits) {
        float* d = dlogits + (long)r * V;
        for (int i = threadIdx.x; i < V; i += blockDim.x)
            d[i] = valid ? (expf(x[i] - mx) / z - (i == y ? 1.0f : 0.0f)) / B : NAN;
    }
}
