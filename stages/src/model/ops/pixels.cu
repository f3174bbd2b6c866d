// The pixel-space path (pixels.rs): images to conv-ordered patches, and the drawing
// composed with the image straight into conv order, and its backward. One thread per
// output element. Orders inside a patch: MAE (row, column, channel), channel fastest;
// conv (channel, row, column).

// Offset in the (B, C, H, W) image of channel ch, row r, column col of patch pn of sample b.
__device__ __forceinline__ size_t pixel(int b, int pn, int ch, int r, int col, int c, int h, int w, int p) {
    const int gw = w / p;
    const int gy = pn / gw, gx = pn % gw;
    return (((size_t)b * c + ch) * h + gy * p + r) * w + gx * p + col;
}

// out (B, N, C P P) conv order from images (B, C, H, W).
extern "C" __global__ void patchify_conv_f32(const float* x, float* out, size_t total, int n, int c, int h, int w,
                                             int p) {
    const int k = c * p * p;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t bn = i / k;
        const int j = (int)(i % k);
        const int ch = j / (p * p), r = (j / p) % p, col = j % p;
        out[i] = x[pixel((int)(bn / n), (int)(bn % n), ch, r, col, c, h, w, p)];
    }
}

// out (B, N, C P P) conv order: the drawing (B, N, P P C, MAE order) where mask is nonzero,
// the image where it is 0 (a select, as the CPU op: the same bits).
extern "C" __global__ void compose_conv_f32(const float* drawn, const float* x, const float* mask, float* out,
                                            size_t total, int n, int c, int h, int w, int p) {
    const int k = c * p * p;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t bn = i / k;
        const int j = (int)(i % k);
        const int ch = j / (p * p), r = (j / p) % p, col = j % p;
        out[i] = mask[bn] != 0.f ? drawn[bn * k + (r * p + col) * c + ch]
                                 : x[pixel((int)(bn / n), (int)(bn % n), ch, r, col, c, h, w, p)];
    }
}

// d drawn (B, N, P P C, MAE order) = mask * g (conv order), reordered.
extern "C" __global__ void compose_conv_bwd_f32(const float* g, const float* mask, float* dd, size_t total, int c,
                                                int p) {
    const int k = c * p * p;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t bn = i / k;
        const int j = (int)(i % k);
        const int r = j / (p * c), col = (j / c) % p, ch = j % c;
        dd[i] = mask[bn] != 0.f ? g[bn * k + (ch * p + r) * p + col] : 0.f;
    }
}
