//! The model's fused ops, each a candle custom op with its own backward, one op per file.
//!
//! Why: candle-nn 0.11's `softmax_last_dim`, `layer_norm`, `rms_norm`, `sdpa` and
//! `LayerNorm::forward` have no backward (gradients silently stop), and building
//! the ops from candle's basic ops costs a pass over memory per basic op, forward
//! and backward. Each op here is one pass (or one per input gradient), vectorized
//! and parallel over rows on rayon's pool:
//!
//! | file | op | saved for the backward |
//! |---|---|---|
//! | [`linear`] | `x W^T + b` on our GEMM (bias folded in) | nothing but the inputs |
//! | [`layer_norm`] | LayerNorm (x, gamma, beta) | mean, rstd per row |
//! | [`attention`] | `softmax(q k^T * scale) v` per head, on packed qkv | logsumexp per row (P is recomputed) |
//! | [`gelu`] | exact (erf) GELU | the input |
//! | [`block`] | a whole pre-norm transformer block, on the kernels above | both norms' outputs and stats, qkv, attention output and logsumexp, x1, fc1's output and GELU |
//! | [`pixels`] | patchify in conv order; compose `mask * drawn + (1 - mask) * x` in conv order | the mask |
//! | [`draw_loss`] | masked MSE of the drawing to x̂ (read from the image) | the inputs |
//! | [`pred_loss`] | masked `2 - 2 cos` | the inputs |
//!
//! AdamW's fused update is in `train/optim.rs`, on the same helpers.
//!
//! **Reference twins.** Every op's file also holds its basic-op composition (what
//! the model ran before these ops existed). The public function runs the fused
//! op for f32 tensors on the CPU (and on CUDA, built with the `cuda` feature) and
//! the composition otherwise: for other dtypes and devices, and when
//! [`scoped_reference`] is on (`model.reference_ops: true`), which is how the
//! tests compare the two, op by op and step by step.
//!
//! **Determinism.** Work is split into fixed chunks of rows, never by thread
//! count, and reductions across rows (dgamma, dbeta, dbias, the losses) sum
//! fixed-size partials in a fixed order: the bits do not depend on
//! `RAYON_NUM_THREADS`.
//!
//! **On CUDA** (the `cuda` feature): each op struct has a `cuda_fwd` beside its
//! `cpu_fwd`, and its `bwd` launches kernels when the inputs are on a CUDA device
//! (the `.cu` file beside each op; `cuda.rs` loads them, [`device_check`] checks
//! them against the CPU kernels). The saved state is a tensor on the op's device;
//! the block, a CPU-only sequence of the other ops' kernels, runs on CUDA as the
//! composition of the ops it fuses.

pub mod attention;
pub mod basic;
pub mod block;
mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod device_check;
pub mod draw_loss;
pub mod gelu;
pub mod layer_norm;
pub mod linear;
pub mod pixels;
pub mod pred_loss;
mod strided_product;

pub use attention::attention;
pub use basic::leaky_relu;
pub use block::{block, block_drop_path};
pub(crate) use cpu::{output_vec, with_slices};
pub use draw_loss::draw_loss;
pub use gelu::gelu;
pub use layer_norm::layer_norm;
pub use linear::linear;
pub use pred_loss::pred_loss;

use candle_core::{DType, Tensor};
use std::cell::Cell;

thread_local! {
    static REFERENCE: Cell<bool> = const { Cell::new(false) };
}

/// Restores the previous choice of this thread when dropped.
pub struct ReferenceGuard(bool);

impl Drop for ReferenceGuard {
    fn drop(&mut self) {
        REFERENCE.with(|r| r.set(self.0));
    }
}

/// Runs this thread's model ops as their basic-op references (`on`) or fused
/// (`!on`, the default) until the guard drops. A thread-local for the same reason
/// as the precision (`autocast`): the trainer sets it around a step, and tests in
/// parallel threads do not see each other.
pub fn scoped_reference(on: bool) -> ReferenceGuard {
    ReferenceGuard(REFERENCE.with(|r| r.replace(on)))
}

/// Whether this thread runs the reference compositions.
pub fn reference() -> bool {
    REFERENCE.with(|r| r.get())
}

/// Whether the fused op runs for `x`: its CPU kernels for f32 CPU tensors, its
/// CUDA kernels (built with the `cuda` feature) for f32 CUDA tensors.
pub(crate) fn fused(x: &Tensor) -> bool {
    !reference() && x.dtype() == DType::F32 && (x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda()))
}

/// Whether the fused op that has CPU kernels only (the block) runs for `x`; on
/// CUDA the block runs as the composition of the ops it fuses.
pub(crate) fn fused_cpu(x: &Tensor) -> bool {
    !reference() && x.device().is_cpu() && x.dtype() == DType::F32
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{Device, Result, Tensor, Var};

    /// Runs `f` on a rayon pool of `threads` threads (the thread-count tests
    /// compare 1, 2 and 3).
    pub(crate) fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a rayon pool")
            .install(f)
    }

    /// Largest absolute elementwise difference (also used by matmul's tests).
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff")
    }

    /// Largest |a - b| / (1 + |b|).
    pub(crate) fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).and_then(|d| d.abs()).expect("diff");
        let s = (b.abs().expect("abs") + 1.0).expect("add");
        (d / s)
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("rel")
    }

    /// Runs `f` fused and as the reference on the same inputs, with the same random
    /// upstream gradient; checks the values and the gradient of every input in
    /// `check` (indices into `inputs`) within `tol` (relative, see [`max_rel_diff`]).
    pub(crate) fn compare_with_reference(
        name: &str,
        inputs: &[Tensor],
        check: &[usize],
        tol: f32,
        f: impl Fn(&[Var]) -> Result<Tensor>,
    ) -> Result<()> {
        let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let run = |reference: bool| -> Result<(Tensor, Vec<Tensor>)> {
            let _r = super::scoped_reference(reference);
            let y = f(&vars)?;
            let w = seeded_like(&y, 11)?;
            let grads = (&y * &w)?.sum_all()?.backward()?;
            let gs = check
                .iter()
                .map(|&i| {
                    grads
                        .get(&vars[i])
                        .cloned()
                        .ok_or_else(|| candle_core::Error::Msg(format!("{name}: no gradient for input {i}")))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((y, gs))
        };
        let (y_fast, g_fast) = run(false)?;
        let (y_ref, g_ref) = run(true)?;
        let e = max_rel_diff(&y_fast, &y_ref);
        assert!(e < tol, "{name}: value differs by {e} (tolerance {tol})");
        for ((i, a), b) in check.iter().zip(&g_fast).zip(&g_ref) {
            assert_eq!(a.dims(), b.dims(), "{name}: gradient {i} shape");
            let e = max_rel_diff(a, b);
            assert!(
                e < tol,
                "{name}: gradient of input {i} differs by {e} (tolerance {tol})"
            );
        }
        Ok(())
    }

    /// Deterministic pseudo-random values with the shape of `like` (no global RNG).
    pub(crate) fn seeded_like(like: &Tensor, seed: u64) -> Result<Tensor> {
        seeded(like.dims(), seed, 1.0)
    }

    pub(crate) use super::device_check::seeded;

    /// d(sum(f(x) * w))/dx by central differences in f64, at a few positions of input `i`.
    pub(crate) fn finite_difference_check(
        name: &str,
        inputs: &[Tensor],
        i: usize,
        positions: &[usize],
        tol: f64,
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<()> {
        // The fused op's gradient (f32) ...
        let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts)?;
        let w = seeded_like(&y, 13)?;
        let grads = (&y * &w)?.sum_all()?.backward()?;
        let g = grads.get(&vars[i]).expect("gradient").flatten_all()?.to_vec1::<f32>()?;
        // ... against central differences of the reference composition in f64.
        let _r = super::scoped_reference(true);
        let w64 = w.to_dtype(candle_core::DType::F64)?;
        let base: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_dtype(candle_core::DType::F64))
            .collect::<Result<_>>()?;
        let eval = |x: &[Tensor]| -> Result<f64> { (f(x)? * &w64)?.sum_all()?.to_scalar::<f64>() };
        let flat = base[i].flatten_all()?.to_vec1::<f64>()?;
        for &p in positions {
            let h = 1e-4 * (1.0 + flat[p].abs());
            let at = |delta: f64| -> Result<f64> {
                let mut v = flat.clone();
                v[p] += delta;
                let mut xs = base.clone();
                xs[i] = Tensor::from_vec(v, base[i].dims(), &Device::Cpu)?;
                eval(&xs)
            };
            let fd = (at(h)? - at(-h)?) / (2.0 * h);
            let got = g[p] as f64;
            assert!(
                (got - fd).abs() <= tol * (1.0 + fd.abs()),
                "{name}: d/dx[{p}] fused {got} vs finite difference {fd}"
            );
        }
        Ok(())
    }
}
