// Shared pieces of the fused ops' CUDA kernels (the .cu files beside the ops).
//
// Determinism, as on the CPU: every block has a fixed shape and every reduction a
// fixed tree (warp shuffles, then the warp sums), and sums across blocks go
// through per-block partials added in block order by one thread per output
// element. So a result does not depend on scheduling.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// Threads per block of the kernels with one block per row.
#define ROW_THREADS 256
// Rows per partial of a column reduction (dgamma, dbeta, dbias).
#define COL_CHUNK 256

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
// `scratch` holds 32 floats; the leading barrier lets a caller reuse it at once.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    v = warp_sum(v);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x / 32) ? scratch[lane] : 0.f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    v = warp_max(v);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x / 32) ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// Stage 1 of a column reduction over a (rows, d) matrix: block (32, 8) covers 32
// columns of COL_CHUNK rows; partial[chunk * d + c] = sum of value(r, c) over the
// chunk's rows. Loads are coalesced: a warp reads 32 neighbouring columns of a row.
template <typename F>
__device__ __forceinline__ void column_partial(F value, float* partial, int rows, int d) {
    __shared__ float tile[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * COL_CHUNK;
    const int r1 = min(rows, r0 + COL_CHUNK);
    float acc = 0.f;
    if (c < d)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) acc += value(r, c);
    tile[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < d) {
        float s = 0.f;
        for (int y = 0; y < 8; ++y) s += tile[y][threadIdx.x];
        partial[(size_t)blockIdx.y * d + c] = s;
    }
}

// The (loss, count) partial of a block of 8 warps, one patch per warp (the loss kernels):
// warp sums added in warp order by thread 0 into partial[2 blk], partial[2 blk + 1].
__device__ __forceinline__ void loss_partial_8_warps(float loss, float count, float* partial) {
    __shared__ float sums[8][2];
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
        sums[warp][0] = loss;
        sums[warp][1] = count;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float l = 0.f, c = 0.f;
        for (int k = 0; k < 8; ++k) {
            l += sums[k][0];
            c += sums[k][1];
        }
        partial[2 * blockIdx.x] = l;
        partial[2 * blockIdx.x + 1] = c;
    }
}
