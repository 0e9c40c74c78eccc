// Shared helpers of gentrain's kernels: block-wide reductions (warp shuffles, then one value per
// warp in shared memory) and the numerically stable scalar functions the CPU kernels also use.
// Launch convention for row kernels: one block per row, blockDim.x = 256, grid-stride loops over
// the row; elementwise kernels: 256 threads per block, grid-stride loops over n. Every index
// and stride is size_t: a u32 counter would wrap (and loop forever) above 2^32 elements.
#pragma once
#include <stdint.h>
#include <math.h>

#define GT_BLOCK 256

// max that propagates NaN (fmaxf returns the other operand when one is NaN).
__device__ __forceinline__ float gt_nan_max(float a, float b) { return (isnan(a) || isnan(b)) ? NAN : fmaxf(a, b); }

struct GtSum { __device__ __forceinline__ float operator()(float a, float b) const { return a + b; } };
struct GtMax { __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); } };
struct GtNanMax { __device__ __forceinline__ float operator()(float a, float b) const { return gt_nan_max(a, b); } };

template <typename Op> __device__ __forceinline__ float gt_warp_reduce(float v, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffff, v, o));
    return v;
}

// Reduction over the block (warp shuffles, then one value per warp in shared memory); every
// thread gets the result. `identity` fills the lanes of warps the block does not have.
template <typename Op> __device__ __forceinline__ float gt_block_reduce(float v, Op op, float identity) {
    __shared__ float partial[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = gt_warp_reduce(v, op);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = (threadIdx.x < (blockDim.x + 31) / 32) ? partial[lane] : identity;
        w = gt_warp_reduce(w, op);
        if (lane == 0) total = w;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

__device__ __forceinline__ float gt_warp_sum(float v) { return gt_warp_reduce(v, GtSum()); }
__device__ __forceinline__ float gt_block_sum(float v) { return gt_block_reduce(v, GtSum(), 0.0f); }
__device__ __forceinline__ float gt_block_max(float v) { return gt_block_reduce(v, GtMax(), -INFINITY); }
__device__ __forceinline__ float gt_block_nan_max(float v) { return gt_block_reduce(v, GtNanMax(), -INFINITY); }

// softplus(l) = max(l, 0) + log1p(exp(-|l|))
__device__ __forceinline__ float gt_softplus(float l) { return fmaxf(l, 0.0f) + log1pf(expf(-fabsf(l))); }

__device__ __forceinline__ float gt_sigmoid(float l) {
    float e = expf(-fabsf(l));
    float inv = 1.0f / (1.0f + e);
    return l >= 0.0f ? inv : e * inv;
}
