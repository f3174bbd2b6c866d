//! Shared pieces of the CPU kernels: reading tensors as slices, fixed row
//! chunks, and a vectorizable exp.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Device, Layout, Result, Shape, Storage, Tensor};

/// Rows per rayon task in the row-parallel kernels: fixed, never derived from
/// the thread count, so every result is computed the same way on any pool.
pub(crate) const ROWS_PER_TASK: usize = 32;

/// The contiguous f32 values of a CPU storage.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{what}: expected f32 storage, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Runs `f` on the contiguous f32 values of CPU tensors (in a backward pass, where
/// several saved tensors meet and a custom op's three inputs would not do).
pub(crate) fn with_slices<const N: usize, R>(
    ts: [&Tensor; N],
    what: &str,
    f: impl FnOnce([&[f32]; N]) -> Result<R>,
) -> Result<R> {
    let owned: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: [&[f32]; N] = [&[]; N];
    for (i, (guard, layout)) in guards.iter().enumerate() {
        let Storage::Cpu(cpu) = &**guard else {
            candle_core::bail!("{what}: input {i} is not on the CPU")
        };
        slices[i] = f32_slice(cpu, layout, what)?;
    }
    f(slices)
}

/// A vector of `n` f32 for a kernel that writes every element before anything
/// reads it (a GEMM with a zero or bias initial C, the row kernels). It skips
/// calloc's zeroing, which on memory the allocator hands out again is a full
/// write pass: 3 to 4% of a training step's CPU time (`perf`, `bench train`).
pub(crate) fn output_vec(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: as candle's own `alloc_uninit`: every f32 bit pattern is valid, and
    // the callers overwrite each element before reading it.
    unsafe { v.set_len(n) };
    v
}

/// A CPU tensor from values.
pub(crate) fn tensor(values: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(values, shape.into(), &Device::Cpu)
}

/// e^x for f32, vectorizable (no libm call): x = n ln 2 + r with |r| <= ln 2 / 2,
/// the degree-6 Taylor polynomial of e^r, 2^n from the exponent bits. Relative error
/// about 2e-7 over [-87, 88]; below -87 it returns about 1e-38 rather than 0.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    // 2^n from the bits: adding 1.5 * 2^23 puts the integer n in the low mantissa
    // bits. Integer ops only, so this vectorizes; `n as i32` saturates (NaN -> 0),
    // which compiles to a scalar compare-and-select per lane and made GELU 4x slower.
    let n_bits = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    f32::from_bits(n_bits.wrapping_add(127) << 23) * p
}

/// erf(x) by Abramowitz & Stegun 7.1.26 (max abs error 1.5e-7 in exact arithmetic, under 5e-7 in f32), given exp(-x^2).
#[inline(always)]
pub(crate) fn erf_with(x: f32, exp_neg_x2: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp_neg_x2).copysign(x)
}

/// Sums per-block partials in block order: the deterministic end of a parallel reduction.
pub(crate) fn sum_partials(partials: &[Vec<f32>], d: usize) -> Vec<f32> {
    let mut out = vec![0f32; d];
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_and_erf_are_accurate() {
        let mut worst = 0f64;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let (got, want) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "exp relative error {worst}");
        for i in -600..=600 {
            let x = i as f32 * 0.01;
            let got = super::erf_with(x, (-x * x).exp()) as f64;
            let want = libm_erf(x as f64);
            assert!((got - want).abs() < 5e-7, "erf({x}) = {got}, want {want}");
        }
    }

    /// erf by its Taylor series / continued fraction in f64 (independent of A&S).
    fn libm_erf(x: f64) -> f64 {
        if x.abs() < 3.0 {
            let mut sum = 0.0;
            let mut term = x;
            let mut n = 0.0;
            while term.abs() > 1e-17 {
                sum += term / (2.0 * n + 1.0);
                n += 1.0;
                term *= -x * x / n;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc's asymptotic series, three terms: at |x| >= 3 the next is below 1e-7.
            let z = x.abs();
            let erfc = (-z * z).exp() / (z * std::f64::consts::PI.sqrt())
                * (1.0 - 1.0 / (2.0 * z * z) + 3.0 / (4.0 * z.powi(4)));
            (1.0 - erfc).copysign(x)
        }
    }
}
