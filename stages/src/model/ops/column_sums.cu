// Column sums (the bias gradient) and the finishing stage of every column
// reduction: one thread per column adds the chunks' partials in chunk order.
#include "common.cuh"

// grid (ceil(d / 32), ceil(rows / COL_CHUNK)), block (32, 8).
extern "C" __global__ void column_sums_partial_f32(const float* g, float* partial, int rows, int d) {
    column_partial([&](int r, int c) { return g[(size_t)r * d + c]; }, partial, rows, d);
}

// out[c] = sum over chunks of partial[chunk * d + c]; one thread per column.
extern "C" __global__ void column_sums_finish_f32(const float* partial, float* out, int chunks, int d) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float s = 0.f;
    for (int k = 0; k < chunks; ++k) s += partial[(size_t)k * d + c];
    out[c] = s;
}

// y = x + bias, bias broadcast over rows of width d.
extern "C" __global__ void bias_add_f32(const float* x, const float* bias, float* y, size_t n, int d) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = x[i] + bias[i % d];
}
