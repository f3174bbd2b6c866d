// AdamW's fused update (optim.rs, FusedUpdate): one pass per parameter tensor, the
// parameter in place, new moments out. Every step is an explicitly rounded f32
// operation (__fmul_rn / __fadd_rn: nvcc would otherwise contract a * b + c into
// one FMA) in the order of the CPU op, whose lines are candle's scalar ops
// (`x * mul + add`, the + 0 included), so the GPU gives the CPU's bits.
__device__ __forceinline__ float affine(float x, float mul) { return __fadd_rn(__fmul_rn(x, mul), 0.f); }

extern "C" __global__ void adamw_f32(float* p, const float* g, const float* m, const float* v, float* m2, float* v2,
                                     size_t n, int decay, float decay_factor, float one_minus_b1, float b2,
                                     float one_minus_b2, float inv_bc2, float eps, float step_size) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float pi = p[i];
        if (decay) pi = affine(pi, decay_factor);
        const float gi = g[i];
        const float mi = __fadd_rn(m[i], affine(__fsub_rn(gi, m[i]), one_minus_b1));
        const float vi = __fadd_rn(affine(v[i], b2), affine(__fmul_rn(gi, gi), one_minus_b2));
        const float denom = __fadd_rn(__fmul_rn(affine(__fsqrt_rn(vi), inv_bc2), 1.f), eps);
        p[i] = __fsub_rn(pi, affine(__fdiv_rn(mi, denom), step_size));
        m2[i] = mi;
        v2[i] = vi;
    }
}
