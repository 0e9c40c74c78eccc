// Shared helpers of gentrain's kernels: block-wide reductions (warp shuffles, then one value per
// warp in shared memory) and the numerically stable scalar functions the CPU kernels also use.
// Launch convention for row kernels: one block per row, blockDim.x = 256, grid-stride loops over
// the row; elementwise kernels: 256 threads per block, grid-stride loops over n.
#pragma once
#include <stdint.h>
#include <math.h>

#define GT_BLOCK 256

__device__ __forceinline__ float gt_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float gt_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffff, v, o));
    return v;
}

// Sum over the block; every thread gets the result.
__device__ __forceinline__ float gt_block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = gt_warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = (threadIdx.x < (blockDim.x + 31) / 32) ? partial[lane] : 0.0f;
        w = gt_warp_sum(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

// Max over the block; every thread gets the result.
__device__ __forceinline__ float gt_block_max(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = gt_warp_max(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = (threadIdx.x < (blockDim.x + 31) / 32) ? partial[lane] : -INFINITY;
        w = gt_warp_max(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

// softplus(l) = max(l, 0) + log1p(exp(-|l|))
__device__ __forceinline__ float gt_softplus(float l) { return fmaxf(l, 0.0f) + log1pf(expf(-fabsf(l))); }

__device__ __forceinline__ float gt_sigmoid(float l) {
    float e = expf(-fabsf(l));
    float inv = 1.0f / (1.0f + e);
    return l >= 0.0f ? inv : e * inv;
}
