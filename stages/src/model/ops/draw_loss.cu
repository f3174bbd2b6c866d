// L_draw, the masked mean over patches of the per-pixel squared error of the drawing
// (B, N, P P C, MAE order) to the target image (B, C, H, W) read in place (draw_loss.rs).
#include "common.cuh"

#define PATCHES_PER_BLOCK 8  // one warp each (loss_partial_8_warps)

// Index into the (B, C, H, W) image of value k (MAE order: row, column, channel) of patch n.
__device__ __forceinline__ size_t image_index(int b, int n, int k, int c, int h, int w, int p) {
    const int gw = w / p;
    const int gy = n / gw, gx = n % gw;
    const int r = k / (p * c), col = (k / c) % p, ch = k % c;
    return (((size_t)b * c + ch) * h + gy * p + r) * w + gx * p + col;
}

// partial[2 blk] = sum of mask mean_k (drawn - t)^2, partial[2 blk + 1] = sum of mask, over
// the block's patches. grid (ceil(B N / PATCHES_PER_BLOCK)), block (32 * PATCHES_PER_BLOCK).
extern "C" __global__ void draw_loss_partial_f32(const float* drawn, const float* target, const float* mask,
                                                 float* partial, int patches, int n, int k, int c, int h, int w,
                                                 int p) {
    const int warp = threadIdx.x / 32;
    const int patch = blockIdx.x * PATCHES_PER_BLOCK + warp;
    float loss = 0.f, count = 0.f;
    // Unmasked patches are left out, not multiplied by 0 (as the CPU op: a non-finite
    // drawing there must not reach the loss). The test is per warp, so shuffles stay whole.
    if (patch < patches && mask[patch] != 0.f) {
        const int b = patch / n, pn = patch % n;
        const float* dr = drawn + (size_t)patch * k;
        float s = 0.f;
        for (int i = threadIdx.x % 32; i < k; i += 32) {
            const float e = dr[i] - target[image_index(b, pn, i, c, h, w, p)];
            s += e * e;
        }
        s = warp_sum(s);
        loss = mask[patch] * (s / k);
    }
    if (patch < patches) count = mask[patch];
    loss_partial_8_warps(loss, count, partial);
}

// d drawn = 2 g mask (drawn - t) / (K max(1, count)); elementwise over B N K.
extern "C" __global__ void draw_loss_bwd_f32(const float* drawn, const float* target, const float* mask,
                                             const float* g, const float* count, float* dd, size_t total,
                                             int n, int k, int c, int h, int w, int p) {
    const float scale = 2.f * g[0] / (k * fmaxf(count[0], 1.f));
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t patch = i / k;
        const int b = (int)(patch / n), pn = (int)(patch % n), kk = (int)(i % k);
        const float m = mask[patch];
        dd[i] = m != 0.f ? scale * m * (drawn[i] - target[image_index(b, pn, kk, c, h, w, p)]) : 0.f;
    }
}
