// Spectral-norm power iteration (Miyato et al. 2018, algorithm 1) on a weight W (m x n, row-major):
//   v <- W^T u / ||W^T u||,  u <- W v / ||W v||,  sigma = u^T W v.
// Each iteration is two launches; the normalization of a vector is folded into the launch that
// reads it (every block reduces ||x|| itself: x is at most a few thousand floats and sits in L2),
// and gt_sn_finish writes [u (m), v (n), sigma (1)]. Normalization is x / (||x|| + 1e-12) as in
// src/ops/spectral_norm.rs. Block: 256 threads.
#include "common.cuh"

#define GT_SN_EPS 1e-12f

// 1 / (||x|| + eps) over the block, or 1 when `normalize` is 0. Called by every thread.
__device__ __forceinline__ float gt_sn_scale(const float* x, uint32_t len, uint32_t normalize) {
    if (!normalize) return 1.0f;
    float s = 0.0f;
    for (size_t i = threadIdx.x; i < len; i += blockDim.x) s += x[i] * x[i];
    s = gt_block_sum(s);
    return 1.0f / (sqrtf(s) + GT_SN_EPS);
}

// y[j] = scale(x) * sum_i W[i, j] x[i], j < n. A block owns 32 consecutive columns (one per
// lane, so each row's read is coalesced); its 8 warps split the m rows and reduce in shared memory.
extern "C" __global__ void gt_sn_matvec_t(const float* w, const float* x, float* y, uint32_t m, uint32_t n, uint32_t normalize) {
    __shared__ float part[8][33];
    float scale = gt_sn_scale(x, m, normalize);
    uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (size_t j0 = blockIdx.x * (size_t)32; j0 < n; j0 += (size_t)gridDim.x * 32) {
        size_t j = j0 + lane;
        float acc = 0.0f;
        if (j < n)
            for (size_t i = warp; i < m; i += 8) acc += w[(size_t)i * n + j] * x[i];
        part[warp][lane] = acc;
        __syncthreads();
        if (warp == 0 && j < n) {
            float s = 0.0f;
            for (int k = 0; k < 8; ++k) s += part[k][lane];
            y[j] = s * scale;
        }
        __syncthreads();
    }
}

// y[i] = scale(x) * sum_j W[i, j] x[j], i < m: one warp per row, 8 rows per block.
extern "C" __global__ void gt_sn_matvec(const float* w, const float* x, float* y, uint32_t m, uint32_t n, uint32_t normalize) {
    float scale = gt_sn_scale(x, n, normalize);
    uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (size_t i = blockIdx.x * (size_t)8 + warp; i < m; i += (size_t)gridDim.x * 8) {
        const float* row = w + (size_t)i * n;
        float acc = 0.0f;
        for (size_t j = lane; j < n; j += 32) acc += row[j] * x[j];
        acc = gt_warp_sum(acc);
        if (lane == 0) y[i] = acc * scale;
    }
}

// out = [ur / (||ur|| + eps) (m), vr / (||vr|| + eps) (n), sigma], where ur = W v (v already
// normalized), so sigma = u^T W v = ||ur||^2 / (||ur|| + eps). One block.
extern "C" __global__ void gt_sn_finish(const float* ur, const float* vr, float* out, uint32_t m, uint32_t n) {
    float su = 0.0f, sv = 0.0f;
    for (size_t i = threadIdx.x; i < m; i += blockDim.x) su += ur[i] * ur[i];
    su = gt_block_sum(su);
    for (size_t j = threadIdx.x; j < n; j += blockDim.x) sv += vr[j] * vr[j];
    sv = gt_block_sum(sv);
    float nu = sqrtf(su), nv = sqrtf(sv);
    float iu = 1.0f / (nu + GT_SN_EPS), iv = 1.0f / (nv + GT_SN_EPS);
    for (size_t i = threadIdx.x; i < m; i += blockDim.x) out[i] = ur[i] * iu;
    for (size_t j = threadIdx.x; j < n; j += blockDim.x) out[(size_t)m + j] = vr[j] * iv;
    if (threadIdx.x == 0) out[(size_t)m + n] = su * iu;
}
