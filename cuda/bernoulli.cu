// Bernoulli log-likelihood from logits, per row of d (f32, contiguous):
//   forward:  out[r] = sum_j x_j l_j - softplus(l_j)          one block per row
//   backward: dl[r, j] = g[r] * (x_j - sigmoid(l_j))         elementwise over rows * d
#include "common.cuh"

extern "C" __global__ void gt_bernoulli_loglik(const float* logits, const float* x, float* out, uint32_t rows, uint32_t d) {
    for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        size_t o = (size_t)r * d;
        float acc = 0.0f;
        for (size_t j = threadIdx.x; j < d; j += blockDim.x) {
            float l = logits[o + j];
            acc += x[o + j] * l - gt_softplus(l);
        }
        acc = gt_block_sum(acc);
        if (threadIdx.x == 0) out[r] = acc;
    }
}

extern "C" __global__ void gt_bernoulli_loglik_bwd(const float* logits, const float* x, const float* g, float* dl, uint32_t rows, uint32_t d) {
    size_t n = (size_t)rows * d;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dl[i] = g[i / d] * (x[i] - gt_sigmoid(logits[i]));
}
