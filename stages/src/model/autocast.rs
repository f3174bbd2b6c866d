//! Mixed precision for the GEMMs, and a count of their FLOPs.
//!
//! `train.precision: bf16` is PyTorch's autocast recipe: parameters, AdamW
//! moments, LayerNorm, softmax and the losses stay f32; only the matrix products
//! (Linear layers, the patch stems, attention's two batched products) cast their
//! operands to bf16 and their result back to f32. `to_dtype` is differentiable,
//! so the backward products run in bf16 too and the gradients arrive in f32 at
//! the f32 master weights. The products are >95% of a ViT step's FLOPs.
//!
//! Why a thread-local rather than a field in every layer: the trainer sets the
//! precision once around a step ([`scoped`]), the model structs stay what the
//! checkpoint holds, and tests running in parallel threads do not see each other.
//! The same hook counts the FLOPs of the products ([`count_flops`]), which checks
//! the closed form of `bench train`'s model FLOP utilization against the model.

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::cell::Cell;

/// `train.precision`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Full f32 products (on CUDA with TF32 switched off).
    #[default]
    F32,
    /// f32 tensors, products with TF32 tensor cores on CUDA (same as f32 on the CPU).
    Tf32,
    /// bf16 products with f32 accumulation; f32 everything else.
    Bf16,
}

impl Precision {
    /// The dtype the products run in.
    pub fn gemm_dtype(self) -> DType {
        match self {
            Precision::F32 | Precision::Tf32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// Switches candle's cuBLAS settings for this precision, deliberately rather than by
    /// default: TF32 only for `tf32`; for `bf16`, reduced-precision reductions allowed
    /// (cuBLAS may then use its fastest bf16 tensor-core kernels). No effect without CUDA.
    pub fn configure_cuda(self) {
        candle_core::cuda::set_gemm_reduced_precision_f32(self == Precision::Tf32);
        candle_core::cuda::set_gemm_reduced_precision_bf16(self == Precision::Bf16);
    }
}

thread_local! {
    static GEMM_DTYPE: Cell<DType> = const { Cell::new(DType::F32) };
    static FLOPS: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Restores the previous precision of this thread when dropped.
pub struct PrecisionGuard(DType);

impl Drop for PrecisionGuard {
    fn drop(&mut self) {
        GEMM_DTYPE.with(|d| d.set(self.0));
    }
}

/// Runs this thread's products at `precision` until the guard drops.
pub fn scoped(precision: Precision) -> PrecisionGuard {
    PrecisionGuard(GEMM_DTYPE.with(|d| d.replace(precision.gemm_dtype())))
}

/// Runs `f` and returns its result with the FLOPs (2 per multiply-add) of the
/// products it ran through [`gemm`] on this thread. Backward products run inside
/// candle's `backward` and are not counted: count a forward.
pub fn count_flops<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let prev = FLOPS.with(|c| c.replace(Some(0)));
    let r = f();
    let n = FLOPS.with(|c| c.replace(prev)).unwrap_or(0);
    (r, n)
}

/// The dtype this thread's products run in.
pub fn gemm_dtype() -> DType {
    GEMM_DTYPE.with(|d| d.get())
}

/// Counts a product of `flops` (2 per multiply-add) run outside [`gemm`] (the fused ops).
pub(crate) fn add_flops(flops: u64) {
    FLOPS.with(|c| {
        if let Some(n) = c.get() {
            c.set(Some(n + flops));
        }
    });
}

/// `a (.., m, k) @ b (.., k, n)` at this thread's precision; `direct` is the f32 product.
pub fn gemm(a: &Tensor, b: &Tensor, direct: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
    FLOPS.with(|c| {
        if let Some(n) = c.get() {
            let (m, k) = (a.dim(candle_core::D::Minus2)?, a.dim(candle_core::D::Minus1)?);
            let cols = b.dim(candle_core::D::Minus1)?;
            let batch = a.elem_count() / (m * k).max(1);
            c.set(Some(n + 2 * (batch * m * k * cols) as u64));
        }
        Ok::<(), candle_core::Error>(())
    })?;
    let dtype = GEMM_DTYPE.with(|d| d.get());
    if dtype == a.dtype() || a.dtype() != DType::F32 {
        return direct(a, b);
    }
    a.to_dtype(dtype)?.matmul(&b.to_dtype(dtype)?)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn bf16_products_are_close_to_f32_and_differentiable() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 9, 40), &dev)?)?;
        let b = Tensor::randn(0f32, 1.0, (2, 40, 7), &dev)?;
        let full = gemm(&a, &b, |a, b| a.matmul(b))?;
        let (half, flops) = count_flops(|| {
            let _bf16 = scoped(Precision::Bf16);
            gemm(&a, &b, |a, b| a.matmul(b))
        });
        let half = half?;
        assert_eq!(flops, 2 * 2 * 9 * 40 * 7);
        assert_eq!(half.dtype(), DType::F32);
        // bf16 keeps 8 mantissa bits: relative error per operand 2^-9, sums of 40 terms of size ~1.
        let diff = (&full - &half)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            diff > 0.0 && diff < 40f32.sqrt() * 4.0 * 2f32.powi(-8),
            "max diff {diff}"
        );
        let g = half.sum_all()?.backward()?;
        let g = g.get(&a).expect("gradient reaches the f32 operand");
        assert_eq!(g.dtype(), DType::F32);
        // d(sum(a b))/da = row sums of b, broadcast; bf16 rounding again.
        let want = b.sum_keepdim(2)?.transpose(1, 2)?.broadcast_as(a.shape())?;
        let gdiff = (g - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(gdiff < 7f32.sqrt() * 4.0 * 2f32.powi(-8), "grad diff {gdiff}");
        // The guard restored f32: back to the exact product.
        let again = gemm(&a, &b, |a, b| a.matmul(b))?;
        assert_eq!((&full - &again)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
