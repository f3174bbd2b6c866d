//! Exact GELU, `x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))` (timm's default, not the
//! tanh form), with its exact derivative `Phi(x) + x phi(x)`, phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
//! erf by Abramowitz & Stegun 7.1.26 on our vectorizable exp.

use super::cpu::{erf_with, exp, f32_slice, output_vec, tensor, with_slices};
use crate::simd::multiversion;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task (fixed: the split does not depend on the thread count).
const CHUNK: usize = 1 << 14;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// GELU (erf), elementwise.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if super::fused(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        gelu_reference(x)
    }
}

/// The basic-op twin: candle's erf GELU (libm's erff), which has a backward.
pub fn gelu_reference(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

multiversion! {
    fn forward_chunk / forward_chunk_scalar(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            let u = v * FRAC_1_SQRT_2;
            *o = 0.5 * v * (1.0 + erf_with(u, exp(-u * u)));
        }
    }
}

multiversion! {
    fn backward_chunk / backward_chunk_scalar(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((o, &v), &g) in dx.iter_mut().zip(x).zip(g) {
            let u = v * FRAC_1_SQRT_2;
            let e = exp(-u * u); // = exp(-x^2 / 2)
            let cdf = 0.5 * (1.0 + erf_with(u, e));
            *o = g * (cdf + v * FRAC_1_SQRT_2PI * e);
        }
    }
}

multiversion! {
    /// y = GELU(x) and its derivative at x, in one pass (the block saves the
    /// derivative, so its backward is one multiply instead of a second erf and exp).
    fn forward_with_derivative_chunk / forward_with_derivative_chunk_scalar(x: &[f32], y: &mut [f32], dy_dx: &mut [f32]) {
        for ((o, dv), &v) in y.iter_mut().zip(dy_dx.iter_mut()).zip(x) {
            let u = v * FRAC_1_SQRT_2;
            let e = exp(-u * u);
            let one_plus_erf = 1.0 + erf_with(u, e);
            *o = 0.5 * v * one_plus_erf; // as forward_chunk, bit for bit
            *dv = 0.5 * one_plus_erf + v * FRAC_1_SQRT_2PI * e;
        }
    }
}

/// `y = GELU(x)` and `dy_dx = GELU'(x)` on slices, parallel over fixed chunks.
pub(crate) fn forward_with_derivative_into(x: &[f32], y: &mut [f32], dy_dx: &mut [f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(dy_dx.par_chunks_mut(CHUNK))
        .zip(x.par_chunks(CHUNK))
        .for_each(|((y, dv), x)| forward_with_derivative_chunk(x, y, dv));
}

/// The backward from a saved derivative, in place: `g *= dy_dx`.
pub(crate) fn backward_with_derivative(dy_dx: &[f32], g: &mut [f32]) {
    g.par_chunks_mut(CHUNK).zip(dy_dx.par_chunks(CHUNK)).for_each(|(g, d)| {
        for (g, &d) in g.iter_mut().zip(d) {
            *g *= d;
        }
    });
}

/// The forward on slices, `y = GELU(x)`, parallel over fixed chunks.
pub(crate) fn forward_into(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| forward_chunk(x, y));
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "crossmae-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu")?;
        let mut y = output_vec(x.len());
        forward_into(x, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, launch};
        let x = cuda::view::<f32>(s, l, "gelu")?;
        let dev = &s.device;
        let y = cuda::alloc::<f32>(dev, x.len())?;
        let n = x.len();
        launch!(dev, cuda::GELU, "gelu_fwd_f32", cuda::elementwise(n), &x, &y, &n);
        Ok((cuda::storage(y, dev), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if super::cuda::on_cuda(x) {
            use super::cuda::{self, launch};
            return cuda::with_views::<2, f32, _>([x, g], "gelu backward", |dev, [xs, gs]| {
                let n = xs.len();
                let dx = cuda::alloc::<f32>(dev, n)?;
                launch!(dev, cuda::GELU, "gelu_bwd_f32", cuda::elementwise(n), &xs, &gs, &dx, &n);
                Ok(Some(cuda::tensor(dx, dev, x.shape().clone())))
            });
        }
        with_slices([x, g], "gelu backward", |[xs, gs]| {
            let mut dx = output_vec(xs.len());
            dx.par_chunks_mut(CHUNK)
                .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
                .for_each(|(dx, (x, g))| backward_chunk(x, g, dx));
            Ok(Some(tensor(dx, x.shape().clone())?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{compare_with_reference, finite_difference_check, seeded};

    #[test]
    fn gelu_matches_reference_and_finite_differences() -> Result<()> {
        let inputs = [seeded(&[3, 197, 37], 1, 3.0)?];
        compare_with_reference("gelu", &inputs, &[0], 2e-6, |v| gelu(&v[0]))?;
        finite_difference_check("gelu", &inputs, 0, &[0, 1, 2, 100, 1000], 1e-3, |t| gelu(&t[0]))?;
        // The AVX2 and scalar loops agree bitwise.
        let x = inputs[0].flatten_all()?.to_vec1::<f32>()?;
        let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        forward_chunk(&x, &mut a);
        forward_chunk_scalar(&x, &mut b);
        assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
        // The one-pass value and derivative are the forward's and the backward's bits.
        let (mut y, mut dy_dx) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        forward_with_derivative_into(&x, &mut y, &mut dy_dx);
        let g: Vec<f32> = (0..x.len()).map(|i| (i % 7) as f32 - 3.0).collect();
        let (mut dx, mut dx_saved) = (vec![0f32; x.len()], g.clone());
        backward_chunk(&x, &g, &mut dx);
        backward_with_derivative(&dy_dx, &mut dx_saved);
        assert!(y.iter().zip(&a).all(|(p, q)| p.to_bits() == q.to_bits()));
        assert!(dx.iter().zip(&dx_saved).all(|(p, q)| p.to_bits() == q.to_bits()));
        Ok(())
    }
}
