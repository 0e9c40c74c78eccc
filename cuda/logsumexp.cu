// Max-shifted log-sum-exp over the last dimension k (IWAE bound, Burda et al. 2016, eq. 8):
//   forward:  out[r] = m + log(sum_i exp(a_i - m)), m = max_i a_i;  all -inf gives -inf;
//             a NaN anywhere in the row gives NaN (the max propagates NaN, unlike fmaxf)
//   backward: da[r, i] = g[r] * exp(a_i - out[r])  (normalized importance weights); 0 if out is -inf
#include "common.cuh"

extern "C" __global__ void gt_logsumexp(const float* a, float* out, uint32_t rows, uint32_t k) {
    for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* row = a + (size_t)r * k;
        float m = -INFINITY;
        for (size_t i = threadIdx.x; i < k; i += blockDim.x) m = gt_nan_max(m, row[i]);
        m = gt_block_nan_max(m);
        if (!isfinite(m)) {
            if (threadIdx.x == 0) out[r] = m;
            continue;
        }
        float s = 0.0f;
        for (size_t i = threadIdx.x; i < k; i += blockDim.x) s += expf(row[i] - m);
        s = gt_block_sum(s);
        if (threadIdx.x == 0) out[r] = m + logf(s);
    }
}

extern "C" __global__ void gt_logsumexp_bwd(const float* a, const float* lse, const float* g, float* da, uint32_t rows, uint32_t k) {
    size_t n = (size_t)rows * k;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float m = lse[i / k];
        da[i] = (m == -INFINITY) ? 0.0f : g[i / k] * expf(a[i] - m);
    }
}
