// Fused in-place Adam (Kingma & Ba 2015, PyTorch's formulation), f32, n elements.
// State is one buffer of 2n + 1 floats: m = state[0..n), v = state[n..2n), guard = state[2n];
// both kernels do nothing when the guard is NaN or infinite (a skipped step, no host sync).
//   moments: g' = g + wd p (only when wd != 0, as on the CPU: 0 * inf would be NaN);  m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2
//   apply:   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
#include "common.cuh"

extern "C" __global__ void gt_adam_moments(float* state, const float* g, const float* p, uint32_t n, float b1, float b2, float wd) {
    if (!isfinite(state[2 * (size_t)n])) return;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float gi = (wd != 0.0f) ? g[i] + wd * p[i] : g[i];  // as the CPU: no 0 * inf = NaN
        state[i] = b1 * state[i] + (1.0f - b1) * gi;
        state[n + i] = b2 * state[n + i] + (1.0f - b2) * gi * gi;
    }
}

extern "C" __global__ void gt_adam_apply(float* p, const float* state, uint32_t n, float step_size, float sqrt_bc2, float eps) {
    if (!isfinite(state[2 * (size_t)n])) return;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] -= step_size * state[i] / (sqrtf(state[n + i]) / sqrt_bc2 + eps);
}
