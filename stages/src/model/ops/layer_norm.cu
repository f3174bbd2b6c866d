// LayerNorm over the last dimension (layer_norm.rs): one block of ROW_THREADS per row,
// statistics in f32; dgamma / dbeta by a coalesced column reduction in two stages.
#include "common.cuh"

// y = (x - mean) rstd w + b; stats[2 r] = mean, stats[2 r + 1] = rstd. grid (rows).
extern "C" __global__ void layer_norm_fwd_f32(const float* x, const float* w, const float* b, float* y,
                                              float* stats, int d, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const float* xr = x + row * d;
    float* yr = y + row * d;
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += xr[i];
    const float mean = block_sum(s, scratch) / d;
    float v = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float c = xr[i] - mean;
        v += c * c;
    }
    const float rstd = 1.f / sqrtf(block_sum(v, scratch) / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
    if (threadIdx.x == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}

// dx = rstd (g w - mean(g w) - xh mean(g w xh)), xh = (x - mean) rstd. grid (rows).
extern "C" __global__ void layer_norm_bwd_dx_f32(const float* x, const float* g, const float* w,
                                                 const float* stats, float* dx, int d) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const float* xr = x + row * d;
    const float* gr = g + row * d;
    const float mean = stats[2 * row], rstd = stats[2 * row + 1];
    float sg = 0.f, sgx = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float gh = gr[i] * w[i];
        sg += gh;
        sgx += gh * (xr[i] - mean) * rstd;
    }
    const float mg = block_sum(sg, scratch) / d;
    const float mgx = block_sum(sgx, scratch) / d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float xh = (xr[i] - mean) * rstd;
        dx[row * d + i] = rstd * (gr[i] * w[i] - mg - xh * mgx);
    }
}

// Stage 1 of dgamma = sum g xh and dbeta = sum g: partials (chunks, d) each.
// grid (ceil(d / 32), ceil(rows / COL_CHUNK)), block (32, 8).
extern "C" __global__ void layer_norm_bwd_params_partial_f32(const float* x, const float* g, const float* stats,
                                                             float* partial_w, float* partial_b, int rows, int d) {
    column_partial(
        [&](int r, int c) {
            const size_t i = (size_t)r * d + c;
            return g[i] * (x[i] - stats[2 * r]) * stats[2 * r + 1];
        },
        partial_w, rows, d);
    __syncthreads();
    column_partial([&](int r, int c) { return g[(size_t)r * d + c]; }, partial_b, rows, d);
}
