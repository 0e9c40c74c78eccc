// Diagonal-Gaussian kernels (Kingma & Welling 2014), f32, contiguous inputs.
//   reparameterize:  z = mu + exp(logvar / 2) * eps                     elementwise, n elements
//   gaussian_kl:     out[r] = 0.5 * sum_j (mu^2 + exp(lv) - 1 - lv)    one block per row of d
//   gaussian_logpdf: out[r] = -0.5 * sum_j (ln 2pi + lv + (z - mu)^2 exp(-lv))
// Backwards are compositions of candle ops (latent tensors are small).
#include "common.cuh"

extern "C" __global__ void gt_reparameterize(const float* mu, const float* lv, const float* eps, float* z, uint32_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        z[i] = mu[i] + expf(0.5f * lv[i]) * eps[i];
}

extern "C" __global__ void gt_gaussian_kl(const float* mu, const float* lv, float* out, uint32_t rows, uint32_t d) {
    for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* m = mu + (size_t)r * d;
        const float* l = lv + (size_t)r * d;
        float acc = 0.0f;
        for (size_t j = threadIdx.x; j < d; j += blockDim.x) acc += m[j] * m[j] + expf(l[j]) - 1.0f - l[j];
        acc = gt_block_sum(acc);
        if (threadIdx.x == 0) out[r] = 0.5f * acc;
    }
}

extern "C" __global__ void gt_gaussian_logpdf(const float* z, const float* mu, const float* lv, float* out, uint32_t rows, uint32_t d) {
    const float LN_2PI = 1.8378770664093453f;
    for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        size_t o = (size_t)r * d;
        float acc = 0.0f;
        for (size_t j = threadIdx.x; j < d; j += blockDim.x) {
            float diff = z[o + j] - mu[o + j];
            acc += LN_2PI + lv[o + j] + diff * diff * expf(-lv[o + j]);
        }
        acc = gt_block_sum(acc);
        if (threadIdx.x == 0) out[r] = -0.5f * acc;
    }
}
