// Exact (erf) GELU and its derivative (gelu.rs), elementwise, with CUDA's erff.
#include "common.cuh"

#define FRAC_1_SQRT_2 0.70710678118654752f
#define FRAC_1_SQRT_2PI 0.39894228040143268f

extern "C" __global__ void gelu_fwd_f32(const float* x, float* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = x[i];
        y[i] = 0.5f * v * (1.f + erff(v * FRAC_1_SQRT_2));
    }
}

// dx = g (Phi(x) + x phi(x)).
extern "C" __global__ void gelu_bwd_f32(const float* x, const float* g, float* dx, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = x[i];
        const float cdf = 0.5f * (1.f + erff(v * FRAC_1_SQRT_2));
        dx[i] = g[i] * (cdf + v * FRAC_1_SQRT_2PI * expf(-0.5f * v * v));
    }
}
