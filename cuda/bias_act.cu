// Fused GEMM epilogue of the affine layers: y = act(a + b) with a = x W^T from cuBLAS, b broadcast
// over rows; and its backward g_pre = g * act'(y) from the output alone.
// act: 0 identity, 1 relu, 2 tanh, 3 softplus, 4 leaky relu with slope 0.2 (same codes as ops::linear::Activation on the Rust side).
#include "common.cuh"

__device__ __forceinline__ float gt_act(int act, float a) {
    switch (act) {
        case 1: return a < 0.0f ? 0.0f : a;  // NaN propagates (fmaxf would return 0), as on the CPU
        case 2: return tanhf(a);
        case 3: return gt_softplus(a);
        case 4: return a < 0.0f ? 0.2f * a : a;  // NaN propagates
        default: return a;
    }
}

__device__ __forceinline__ float gt_act_grad_from_output(int act, float y) {
    switch (act) {
        case 1: return y > 0.0f ? 1.0f : 0.0f;
        case 2: return 1.0f - y * y;
        case 3: return -expm1f(-y);
        case 4: return y > 0.0f ? 1.0f : 0.2f;
        default: return 1.0f;
    }
}

extern "C" __global__ void gt_bias_act(const float* a, const float* b, float* y, uint32_t rows, uint32_t d, int act) {
    size_t n = (size_t)rows * d;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = gt_act(act, a[i] + b[i % d]);
}

extern "C" __global__ void gt_act_bwd(const float* g, const float* y, float* out, uint32_t n, int act) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = g[i] * gt_act_grad_from_output(act, y[i]);
}
