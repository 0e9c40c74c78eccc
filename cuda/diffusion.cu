// Denoising diffusion (Ho et al. 2020, DDPM; Song et al. 2021, DDIM), f32, contiguous inputs.
//   q_sample:       x_t[r, j] = table[t_r, 0] x0[r, j] + table[t_r, 1] eps[r, j]   (Ho et al. eq. 4)
//                   elementwise over rows * d; a time index t_r >= steps gives a NaN row (the table
//                   is never read past; the host refuses such indices when they are on the CPU)
//   q_sample_coefs: out[r] = table[t_r] (2 values; NaN, NaN for t_r >= steps), q_sample's backward
//   simple_loss:    out[r] = mean_j (p - e)^2  (Ho et al. eq. 14 per sample)   one block per row:
//                   each square in f32, divided by d, then summed (the partial sums cannot overflow
//                   before the mean does)
//   sampler_step:   x0 = sra x_t - srm1 eps_pred, clamped to [lo, hi] when clip (NaN kept: not
//                   fminf/fmaxf, which drop it); out = c_x0 x0 + c_xt x_t [+ c_eps (x_t - sab x0) / s1m]
//                   + sigma noise, the bracket only when c_eps != 0 (as on the CPU)
// The elementwise kernels use the _rn intrinsics, which nvcc never contracts into an FMA, in the
// CPU loops' order: the device matches the CPU (ops/diffusion.rs) bit for bit.
#include "common.cuh"

extern "C" __global__ void gt_q_sample(const float* x0, const float* eps, const uint32_t* t, const float* table, float* out, uint32_t rows, uint32_t d, uint32_t steps) {
    size_t n = (size_t)rows * d;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t ti = t[i / d];
        if (ti >= steps) {  // never read past the table: a NaN row, as on the CPU
            out[i] = NAN;
            continue;
        }
        float a = table[2 * (size_t)ti], b = table[2 * (size_t)ti + 1];
        out[i] = __fadd_rn(__fmul_rn(a, x0[i]), __fmul_rn(b, eps[i]));
    }
}

extern "C" __global__ void gt_q_sample_coefs(const uint32_t* t, const float* table, float* out, uint32_t rows, uint32_t steps) {
    size_t n = 2 * (size_t)rows;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t ti = t[i / 2];
        out[i] = (ti < steps) ? table[2 * (size_t)ti + (i % 2)] : NAN;
    }
}

extern "C" __global__ void gt_simple_loss(const float* p, const float* e, float* out, uint32_t rows, uint32_t d) {
    float inv_d = 1.0f / (float)d;
    for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        size_t o = (size_t)r * d;
        float acc = 0.0f;
        for (size_t j = threadIdx.x; j < d; j += blockDim.x) {
            float diff = p[o + j] - e[o + j];
            acc += __fmul_rn(diff, diff) * inv_d;  // the square rounded (and overflowing) in f32
        }
        acc = gt_block_sum(acc);
        if (threadIdx.x == 0) out[r] = d ? acc : NAN;  // the mean of nothing, 0 / 0, as on the CPU
    }
}

extern "C" __global__ void gt_sampler_step(const float* xt, const float* ep, const float* noise, float* out, uint32_t n,
                                           float sra, float srm1, int clip, float lo, float hi, float sab, float s1m,
                                           float c_x0, float c_xt, float c_eps, float sigma) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float x = xt[i];
        float x0 = __fsub_rn(__fmul_rn(sra, x), __fmul_rn(srm1, ep[i]));
        if (clip) x0 = (x0 < lo) ? lo : ((x0 > hi) ? hi : x0);  // NaN fails both tests: kept
        float y = __fadd_rn(__fmul_rn(c_x0, x0), __fmul_rn(c_xt, x));
        if (c_eps != 0.0f) {
            float eps2 = __fdiv_rn(__fsub_rn(x, __fmul_rn(sab, x0)), s1m);
            y = __fadd_rn(y, __fmul_rn(c_eps, eps2));
        }
        out[i] = __fadd_rn(y, __fmul_rn(sigma, noise[i]));
    }
}
