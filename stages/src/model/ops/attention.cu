// The row kernels of the attention core (attention.rs); its matrix products are
// cuBLAS strided-batched GEMMs on the packed qkv. One block of ROW_THREADS per row
// of scores (B H T rows of T). The scores S and dP are f32 (cuBLAS writes them
// from f32 or bf16 operands with f32 accumulation, as FlashAttention keeps them);
// P and dS, the operands of the next products, are stored in the products' type TP.
#include "common.cuh"

// p = softmax(s * scale) per row, lse = logsumexp(s * scale) per row.
template <typename TP>
__device__ void softmax_fwd(const float* s, TP* p, float* lse, int n, float scale) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const float* sr = s + row * n;
    TP* pr = p + row * n;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, sr[i] * scale);
    m = block_max(m, scratch);
    float z = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) z += expf(sr[i] * scale - m);
    z = block_sum(z, scratch);
    const float inv = 1.f / z;
    for (int i = threadIdx.x; i < n; i += blockDim.x) pr[i] = from_f32<TP>(expf(sr[i] * scale - m) * inv);
    if (threadIdx.x == 0) lse[row] = m + logf(z);
}

// The backward's P from the scores and the forward's logsumexp (nothing of (B, H, T, T)
// is kept between forward and backward). Elementwise over rows * n.
template <typename TP>
__device__ void softmax_from_lse(const float* s, TP* p, const float* lse, size_t total, int n, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        p[i] = from_f32<TP>(expf(s[i] * scale - lse[i / n]));
}

// dS = scale P (dP - sum_j P_j dP_j), from P (as the products saw it) and the f32 dP.
// One block per row.
template <typename TP>
__device__ void softmax_bwd(const TP* p, const float* dp, TP* ds, int n, float scale) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const TP* pr = p + row * n;
    const float* dr = dp + row * n;
    TP* out = ds + row * n;
    float delta = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) delta += to_f32(pr[i]) * dr[i];
    delta = block_sum(delta, scratch);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        out[i] = from_f32<TP>(scale * to_f32(pr[i]) * (dr[i] - delta));
}

#define SOFTMAX_KERNELS(TP, SUFFIX)                                                                           \
    extern "C" __global__ void attention_softmax_fwd_##SUFFIX(const float* s, TP* p, float* lse, int n,      \
                                                              float scale) {                                \
        softmax_fwd<TP>(s, p, lse, n, scale);                                                                \
    }                                                                                                        \
    extern "C" __global__ void attention_softmax_from_lse_##SUFFIX(const float* s, TP* p, const float* lse,  \
                                                                   size_t total, int n, float scale) {      \
        softmax_from_lse<TP>(s, p, lse, total, n, scale);                                                    \
    }                                                                                                        \
    extern "C" __global__ void attention_softmax_bwd_##SUFFIX(const TP* p, const float* dp, TP* ds, int n,   \
                                                              float scale) {                                \
        softmax_bwd<TP>(p, dp, ds, n, scale);                                                                \
    }

SOFTMAX_KERNELS(float, f32)
SOFTMAX_KERNELS(__nv_bfloat16, bf16)
