// L_pred, the masked mean of 2 - 2 cos (pred_loss.rs). One warp per row (patch);
// the forward's sums go through per-block partials added in order by one block.
#include "common.cuh"

#define ROWS_PER_BLOCK 8  // one warp each (loss_partial_8_warps)

struct RowTerms {
    float valid, cos, inv_p, inv_t;
};

__device__ __forceinline__ RowTerms row_terms(const float* p, const float* t, float w, int dt) {
    float pp = 0.f, tt = 0.f, pt = 0.f;
    for (int i = threadIdx.x % 32; i < dt; i += 32) {
        pp += p[i] * p[i];
        tt += t[i] * t[i];
        pt += p[i] * t[i];
    }
    pp = warp_sum(pp);
    tt = warp_sum(tt);
    pt = warp_sum(pt);
    const float tn = sqrtf(tt);
    RowTerms r;
    r.valid = tn > 0.f ? w : 0.f;
    r.inv_t = 1.f / fmaxf(tn, 1e-12f);
    r.inv_p = 1.f / sqrtf(pp + 1e-12f);
    r.cos = pt * r.inv_t * r.inv_p;
    return r;
}

// partial[2 blk] = sum of (2 - 2 cos) valid over the block's rows, partial[2 blk + 1] = sum valid.
// grid (ceil(rows / ROWS_PER_BLOCK)), block (32 * ROWS_PER_BLOCK).
extern "C" __global__ void pred_loss_partial_f32(const float* p, const float* t, const float* w, float* partial,
                                                 int rows, int dt) {
    const int warp = threadIdx.x / 32;
    const int row = blockIdx.x * ROWS_PER_BLOCK + warp;
    float loss = 0.f, count = 0.f;
    if (row < rows) {
        const RowTerms r = row_terms(p + (size_t)row * dt, t + (size_t)row * dt, w[row], dt);
        loss = r.valid != 0.f ? (2.f - 2.f * r.cos) * r.valid : 0.f;
        count = r.valid;
    }
    loss_partial_8_warps(loss, count, partial);
}

// loss[0] = sum of losses / max(1, count), count[0] = sum of counts (the backward's), from
// the (loss, count) partials of `blocks` blocks; also L_draw's. One block of ROW_THREADS.
extern "C" __global__ void loss_finish_f32(const float* partial, float* loss, float* count, int blocks) {
    __shared__ float scratch[32];
    float l = 0.f, c = 0.f;
    for (int k = threadIdx.x; k < blocks; k += blockDim.x) {
        l += partial[2 * k];
        c += partial[2 * k + 1];
    }
    l = block_sum(l, scratch);
    c = block_sum(c, scratch);
    if (threadIdx.x == 0) {
        loss[0] = l / fmaxf(c, 1.f);
        count[0] = c;
    }
}

// d pred = -2 g valid / max(1, count) (t inv_t inv_p - cos p inv_p^2); g and count on the device.
// grid (ceil(rows / ROWS_PER_BLOCK)), block (32 * ROWS_PER_BLOCK).
extern "C" __global__ void pred_loss_bwd_f32(const float* p, const float* t, const float* w, const float* g,
                                             const float* count, float* dp, int rows, int dt) {
    const int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32;
    if (row >= rows) return;
    const float* pr = p + (size_t)row * dt;
    const float* tr = t + (size_t)row * dt;
    const RowTerms r = row_terms(pr, tr, w[row], dt);
    const float scale = -2.f * g[0] * r.valid / fmaxf(count[0], 1.f);
    // Rows left out get 0, not 0 times their terms (as the CPU op).
    for (int i = threadIdx.x % 32; i < dt; i += 32)
        dp[(size_t)row * dt + i] =
            r.valid != 0.f ? scale * (tr[i] * r.inv_t * r.inv_p - r.cos * pr[i] * r.inv_p * r.inv_p) : 0.f;
}
