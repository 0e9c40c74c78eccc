// Counter-based random draws on the device, identical to gentrain::rng::counter_u64 and
// counter_normal on the host: draw i of stream `key` is splitmix64(key ^ splitmix64(i)).
//   binarize_rows: out[b, j] = Bernoulli(pixels[idx[b], j] / 255) using the top 32 bits of draw
//                  b * d + j, as r * 255 < p * 2^32 (exact probability p / 255); NaN for a row
//                  index out of range (callers check indices on the host first)
//   fill_normal:   out[i] = sqrt(-2 ln u1) cos(2 pi u2), u1 = ((draw 2i >> 40) + 1) 2^-24,
//                  u2 = (draw 2i+1 >> 40) 2^-24
#include "common.cuh"

__device__ __forceinline__ uint64_t gt_splitmix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ uint64_t gt_counter(uint64_t key, uint64_t i) { return gt_splitmix64(key ^ gt_splitmix64(i)); }

extern "C" __global__ void gt_binarize_rows(const uint8_t* pixels, const uint32_t* idx, float* out, uint32_t rows, uint32_t b, uint32_t d, uint64_t key) {
    size_t n = (size_t)b * d;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        size_t row = i / d, col = i % d;
        if (idx[row] >= rows) {  // never read past the pixels: an out-of-range row is NaN, as on the CPU
            out[i] = NAN;
            continue;
        }
        uint64_t p = pixels[(size_t)idx[row] * d + col];
        uint64_t r = gt_counter(key, i) >> 32;
        out[i] = (r * 255ull < (p << 32)) ? 1.0f : 0.0f;
    }
}

extern "C" __global__ void gt_fill_normal(float* out, uint32_t n, uint64_t key) {
    const float TAU = 6.283185307179586f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float u1 = (float)((gt_counter(key, 2ull * i) >> 40) + 1) * (1.0f / 16777216.0f);
        float u2 = (float)(gt_counter(key, 2ull * i + 1) >> 40) * (1.0f / 16777216.0f);
        out[i] = sqrtf(-2.0f * logf(u1)) * cosf(TAU * u2);
    }
}
