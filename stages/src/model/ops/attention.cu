// The row kernels of the attention core (attention.rs); its matrix products are
// cuBLAS strided-batched GEMMs on the packed qkv. One block of ROW_THREADS per row
// of scores (B H T rows of T), f32 arithmetic for f32 and bf16 storage.
#include "common.cuh"

// p = softmax(s * scale) per row (p may be s), lse = logsumexp(s * scale) per row.
template <typename T>
__device__ void softmax_fwd(const T* s, T* p, float* lse, int n, float scale) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T* sr = s + row * n;
    T* pr = p + row * n;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, to_f32(sr[i]) * scale);
    m = block_max(m, scratch);
    float z = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) z += expf(to_f32(sr[i]) * scale - m);
    z = block_sum(z, scratch);
    const float inv = 1.f / z;
    for (int i = threadIdx.x; i < n; i += blockDim.x) pr[i] = from_f32<T>(expf(to_f32(sr[i]) * scale - m) * inv);
    if (threadIdx.x == 0) lse[row] = m + logf(z);
}

// The backward's P from the scores and the forward's logsumexp (nothing of (B, H, T, T)
// is kept between forward and backward). Elementwise over rows * n.
template <typename T>
__device__ void softmax_from_lse(const T* s, T* p, const float* lse, size_t total, int n, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        p[i] = from_f32<T>(expf(to_f32(s[i]) * scale - lse[i / n]));
}

// dS = scale P (dP - sum_j P_j dP_j), written over dP. One block per row.
template <typename T>
__device__ void softmax_bwd(const T* p, T* dp, int n, float scale) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T* pr = p + row * n;
    T* dr = dp + row * n;
    float delta = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) delta += to_f32(pr[i]) * to_f32(dr[i]);
    delta = block_sum(delta, scratch);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        dr[i] = from_f32<T>(scale * to_f32(pr[i]) * (to_f32(dr[i]) - delta));
}

#define SOFTMAX_KERNELS(T, SUFFIX)                                                                           \
    extern "C" __global__ void attention_softmax_fwd_##SUFFIX(const T* s, T* p, float* lse, int n,          \
                                                              float scale) {                               \
        softmax_fwd<T>(s, p, lse, n, scale);                                                                \
    }                                                                                                       \
    extern "C" __global__ void attention_softmax_from_lse_##SUFFIX(const T* s, T* p, const float* lse,      \
                                                                   size_t total, int n, float scale) {     \
        softmax_from_lse<T>(s, p, lse, total, n, scale);                                                    \
    }                                                                                                       \
    extern "C" __global__ void attention_softmax_bwd_##SUFFIX(const T* p, T* dp, int n, float scale) {      \
        softmax_bwd<T>(p, dp, n, scale);                                                                    \
    }

SOFTMAX_KERNELS(float, f32)
SOFTMAX_KERNELS(__nv_bfloat16, bf16)
