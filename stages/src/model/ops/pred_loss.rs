//! L_pred, the mean of `2 - 2 cos(pred, target)` over the patches in `weight`
//! whose target has nonzero norm, as one op. With pn = sqrt(|p|^2 + 1e-12) and
//! t̂ = t / max(|t|, 1e-12): cos = (p . t̂) / pn, and
//! d pred = -2 g valid / max(1, sum valid) (t̂ / pn - cos p / pn^2).
//! Partial sums over fixed blocks of rows, added in order (thread-independent bits).

use super::cpu::{f32_slice, tensor, with_slices, ROWS_PER_TASK};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::OnceLock;

/// pred, target (B, N, D_t); weight (B, N) or (B, N, 1) -> scalar.
pub fn pred_loss(pred: &Tensor, target: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if super::fused(pred) && !weight.track_op() {
        let op = PredLoss { count: OnceLock::new() };
        pred.contiguous()?
            .apply_op3(&target.detach().contiguous()?, &weight.contiguous()?, op)
    } else {
        pred_loss_reference(pred, target, weight)
    }
}

/// The basic-op twin.
pub fn pred_loss_reference(pred: &Tensor, target: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (b, n, _) = pred.dims3()?;
    let weight = weight.reshape((b, n, 1))?;
    let target = target.detach();
    let t_norm = target.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    let valid = t_norm.gt(0.0)?.to_dtype(pred.dtype())?.mul(&weight)?;
    let t_hat = target.broadcast_div(&t_norm.maximum(1e-12)?)?;
    // F.normalize-like; the eps keeps the gradient finite at pred = 0.
    let p_hat = pred.broadcast_div(&(pred.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?)?;
    let cos = (p_hat * t_hat)?.sum_keepdim(D::Minus1)?;
    let per_patch = (2.0 - (cos * 2.0)?)?;
    per_patch.mul(&valid)?.sum_all()? / valid.sum_all()?.maximum(1.0)?
}

/// D_t of pred and target (B, N, D_t) with weight (B, N): the shapes both forwards check.
fn target_width(pred: &Layout, target: &Layout, weight: &Layout) -> Result<usize> {
    let dt = pred.dims().last().copied().unwrap_or(1).max(1);
    let n = pred.shape().elem_count();
    if target.shape().elem_count() != n || weight.shape().elem_count() * dt != n {
        candle_core::bail!(
            "pred loss: pred {:?}, target {:?}, weight {:?}",
            pred.dims(),
            target.dims(),
            weight.dims()
        )
    }
    Ok(dt)
}

struct PredLoss {
    /// The number of patches counted (a 1-value device tensor), set by the CUDA forward
    /// for its backward; the CPU backward counts again.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    count: OnceLock<Tensor>,
}

/// Patches (rows) per block of the CUDA kernels: one warp each (`ROWS_PER_BLOCK`).
#[cfg(feature = "cuda")]
const CUDA_ROWS_PER_BLOCK: usize = 8;

/// Per row: (valid weight, cos, 1 / pn, 1 / max(|t|, 1e-12)).
#[inline]
fn row_terms(p: &[f32], t: &[f32], w: f32) -> (f32, f32, f32, f32) {
    let (mut pp, mut tt, mut pt) = (0f32, 0f32, 0f32);
    for (&a, &b) in p.iter().zip(t) {
        pp += a * a;
        tt += b * b;
        pt += a * b;
    }
    let tn = tt.sqrt();
    let valid = if tn > 0.0 { w } else { 0.0 };
    let inv_t = 1.0 / tn.max(1e-12);
    let inv_p = 1.0 / (pp + 1e-12).sqrt();
    (valid, pt * inv_t * inv_p, inv_p, inv_t)
}

impl CustomOp3 for PredLoss {
    fn name(&self) -> &'static str {
        "crossmae-pred-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = f32_slice(s1, l1, "pred loss pred")?;
        let t = f32_slice(s2, l2, "pred loss target")?;
        let w = f32_slice(s3, l3, "pred loss weight")?;
        let dt = target_width(l1, l2, l3)?;
        let partials: Vec<(f32, f32)> = p
            .par_chunks(ROWS_PER_TASK * dt)
            .zip(t.par_chunks(ROWS_PER_TASK * dt))
            .zip(w.par_chunks(ROWS_PER_TASK))
            .map(|((p, t), w)| {
                let (mut loss, mut count) = (0f32, 0f32);
                for ((p, t), &w) in p.chunks_exact(dt).zip(t.chunks_exact(dt)).zip(w) {
                    let (valid, cos, _, _) = row_terms(p, t, w);
                    loss += (2.0 - 2.0 * cos) * valid;
                    count += valid;
                }
                (loss, count)
            })
            .collect();
        let (loss, count) = partials.iter().fold((0f32, 0f32), |(a, b), (l, c)| (a + l, b + c));
        Ok((CpuStorage::F32(vec![loss / count.max(1.0)]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, launch};
        let p = cuda::view::<f32>(s1, l1, "pred loss pred")?;
        let t = cuda::view::<f32>(s2, l2, "pred loss target")?;
        let w = cuda::view::<f32>(s3, l3, "pred loss weight")?;
        let dt = target_width(l1, l2, l3)?;
        let dev = &s1.device;
        let rows = w.len();
        let blocks = rows.div_ceil(CUDA_ROWS_PER_BLOCK).max(1);
        let partial = cuda::alloc::<f32>(dev, 2 * blocks)?;
        let (r, width) = (rows as i32, dt as i32);
        let cfg = cuda::per_row(blocks, 32 * CUDA_ROWS_PER_BLOCK as u32);
        launch!(
            dev,
            cuda::PRED_LOSS,
            "pred_loss_partial_f32",
            cfg,
            &p,
            &t,
            &w,
            &partial,
            &r,
            &width
        );
        let (loss, count) = cuda::finish_loss(dev, &partial, blocks)?;
        let _ = self.count.set(count);
        Ok((cuda::storage(loss, dev), Shape::from(())))
    }

    fn bwd(
        &self,
        pred: &Tensor,
        target: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dt = pred.dim(D::Minus1)?.max(1);
        #[cfg(feature = "cuda")]
        if super::cuda::on_cuda(pred) {
            use super::cuda::{self, launch};
            let Some(count) = self.count.get() else {
                candle_core::bail!("pred loss backward before its forward")
            };
            let views = [pred, target, weight, grad, count];
            return cuda::with_views::<5, f32, _>(views, "pred loss backward", |dev, [p, t, w, g, c]| {
                let rows = w.len();
                let dp = cuda::alloc::<f32>(dev, p.len())?;
                let (r, width) = (rows as i32, dt as i32);
                let cfg = cuda::per_row(
                    rows.div_ceil(CUDA_ROWS_PER_BLOCK).max(1),
                    32 * CUDA_ROWS_PER_BLOCK as u32,
                );
                launch!(
                    dev,
                    cuda::PRED_LOSS,
                    "pred_loss_bwd_f32",
                    cfg,
                    &p,
                    &t,
                    &w,
                    &g,
                    &c,
                    &dp,
                    &r,
                    &width
                );
                Ok((Some(cuda::tensor(dp, dev, pred.shape().clone())), None, None))
            });
        }
        with_slices([pred, target, weight, grad], "pred loss backward", |[p, t, w, g]| {
            let count: f32 = p
                .chunks_exact(dt)
                .zip(t.chunks_exact(dt))
                .zip(w)
                .map(|((p, t), &w)| row_terms(p, t, w).0)
                .sum();
            let coef = -2.0 * g[0] / count.max(1.0);
            let mut dp = vec![0f32; p.len()];
            dp.par_chunks_mut(dt)
                .zip(p.par_chunks(dt).zip(t.par_chunks(dt)))
                .zip(w.par_iter())
                .for_each(|((o, (p, t)), &w)| {
                    let (valid, cos, inv_p, inv_t) = row_terms(p, t, w);
                    if valid == 0.0 {
                        return;
                    }
                    let c = coef * valid;
                    for ((o, &a), &b) in o.iter_mut().zip(p).zip(t) {
                        *o = c * (b * inv_t * inv_p - cos * a * inv_p * inv_p);
                    }
                });
            Ok((Some(tensor(dp, pred.shape().clone())?), None, None))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{compare_with_reference, finite_difference_check, seeded};
    use candle_core::DType;

    #[test]
    fn pred_loss_matches_reference_and_finite_differences() -> Result<()> {
        for (b, n, dt) in [(1, 1, 3), (3, 49, 108), (2, 197, 36)] {
            // Some targets are exactly zero (flat HOG patches) and left out.
            let t = seeded(&[b, n, dt], 1, 1.0)?;
            let keep: Vec<f32> = (0..b * n).map(|i| (i % 5 != 3) as u8 as f32).collect();
            let t = t.broadcast_mul(&Tensor::from_vec(keep, (b, n, 1), &candle_core::Device::Cpu)?)?;
            let w_v: Vec<f32> = (0..b * n).map(|i| (i % 3 != 1) as u8 as f32).collect();
            let w = Tensor::from_vec(w_v, (b, n), &candle_core::Device::Cpu)?;
            let inputs = [seeded(&[b, n, dt], 2, 1.0)?];
            compare_with_reference("pred loss", &inputs, &[0], 1e-5, |v| pred_loss(&v[0], &t, &w))?;
            let (t64, w64) = (t.to_dtype(DType::F64)?, w.to_dtype(DType::F64)?);
            finite_difference_check("pred loss", &inputs, 0, &[0, 1, b * n * dt - 1], 2e-3, |x| {
                if x[0].dtype() == DType::F64 {
                    pred_loss(&x[0], &t64, &w64)
                } else {
                    pred_loss(&x[0], &t, &w)
                }
            })?;
        }
        Ok(())
    }
}
