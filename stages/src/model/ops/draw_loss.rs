//! L_draw, the mean over masked patches of the per-pixel squared error of the
//! drawing to its target, as one op that reads the target straight from the
//! (B, C, H, W) image (x̂, or x for `draw.mode: original`): no patchified copy.
//! `L = sum_n mask_n mean_k (drawn_nk - t_nk)^2 / max(1, sum_n mask_n)`;
//! d drawn = 2 g mask_n (drawn - t) / (K max(1, sum mask)).
//! Per-sample partial sums, added in sample order (thread-independent bits).

use super::cpu::{f32_slice, tensor, with_slices};
use crate::model::patch::patchify;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::OnceLock;

/// drawn (B, N, P P C) MAE order, target image (B, C, H, W), mask (B, N) 1 = masked -> scalar.
pub fn draw_loss(drawn: &Tensor, target: &Tensor, mask: &Tensor, p: usize) -> Result<Tensor> {
    if super::fused(drawn) && !target.track_op() && !mask.track_op() {
        drawn.contiguous()?.apply_op3(
            &target.contiguous()?,
            &mask.contiguous()?,
            DrawLoss {
                p,
                count: OnceLock::new(),
            },
        )
    } else {
        draw_loss_reference(drawn, target, mask, p)
    }
}

/// The basic-op twin.
pub fn draw_loss_reference(drawn: &Tensor, target: &Tensor, mask: &Tensor, p: usize) -> Result<Tensor> {
    let target = patchify(target, p)?;
    let (b, n, _) = drawn.dims3()?;
    let mask = mask.reshape((b, n, 1))?;
    let per_patch = (drawn - target)?.sqr()?.mean_keepdim(D::Minus1)?;
    per_patch.mul(&mask)?.sum_all()? / mask.sum_all()?.maximum(1.0)?
}

struct DrawLoss {
    p: usize,
    /// sum(mask) (a 1-value device tensor), set by the CUDA forward for its backward;
    /// the CPU backward sums again.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    count: OnceLock<Tensor>,
}

/// Patches per block of the CUDA forward: one warp each (`PATCHES_PER_BLOCK`).
#[cfg(feature = "cuda")]
const CUDA_PATCHES_PER_BLOCK: usize = 8;

/// Calls `f(pixel index in MAE order, target value)` for every value of patch n.
#[inline]
fn for_patch_target(t: &[f32], c: usize, h: usize, w: usize, p: usize, n: usize, mut f: impl FnMut(usize, f32)) {
    let gw = w / p;
    let (gy, gx) = (n / gw, n % gw);
    for r in 0..p {
        for ch in 0..c {
            let row = &t[(ch * h + gy * p + r) * w + gx * p..][..p];
            for (col, &v) in row.iter().enumerate() {
                f((r * p + col) * c + ch, v);
            }
        }
    }
}

impl DrawLoss {
    fn dims(&self, l_drawn: &Layout, l_t: &Layout) -> Result<(usize, usize, usize, usize, usize, usize)> {
        let (b, n, k) = l_drawn.shape().dims3()?;
        let (b2, c, h, w) = l_t.shape().dims4()?;
        let p = self.p;
        if b != b2 || p == 0 || h % p != 0 || w % p != 0 || n != (h / p) * (w / p) || k != p * p * c {
            candle_core::bail!(
                "draw loss: drawn {:?} does not match target {:?} in {p} px patches",
                l_drawn.dims(),
                l_t.dims()
            )
        }
        Ok((b, n, k, c, h, w))
    }
}

impl CustomOp3 for DrawLoss {
    fn name(&self) -> &'static str {
        "crossmae-draw-loss"
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
        let drawn = f32_slice(s1, l1, "draw loss drawn")?;
        let t = f32_slice(s2, l2, "draw loss target")?;
        let mask = f32_slice(s3, l3, "draw loss mask")?;
        let (b, n, k, c, h, w) = self.dims(l1, l2)?;
        if mask.len() != b * n {
            candle_core::bail!("draw loss: mask {:?} for {b} x {n} patches", l3.dims())
        }
        let img = c * h * w;
        let per_sample: Vec<f32> = (0..b)
            .into_par_iter()
            .map(|bi| {
                let mut sum = 0f32;
                for ni in 0..n {
                    if mask[bi * n + ni] == 0.0 {
                        continue;
                    }
                    let d = &drawn[(bi * n + ni) * k..][..k];
                    let mut e = 0f32;
                    for_patch_target(&t[bi * img..][..img], c, h, w, self.p, ni, |i, v| {
                        e += (d[i] - v) * (d[i] - v);
                    });
                    sum += mask[bi * n + ni] * (e / k as f32);
                }
                sum
            })
            .collect();
        let total: f32 = per_sample.iter().sum();
        let count: f32 = mask.iter().sum();
        Ok((CpuStorage::F32(vec![total / count.max(1.0)]), Shape::from(())))
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
        let drawn = cuda::view::<f32>(s1, l1, "draw loss drawn")?;
        let t = cuda::view::<f32>(s2, l2, "draw loss target")?;
        let mask = cuda::view::<f32>(s3, l3, "draw loss mask")?;
        let (b, n, k, c, h, w) = self.dims(l1, l2)?;
        if mask.len() != b * n {
            candle_core::bail!("draw loss: mask {:?} for {b} x {n} patches", l3.dims())
        }
        let dev = &s1.device;
        let blocks = (b * n).div_ceil(CUDA_PATCHES_PER_BLOCK).max(1);
        let partial = cuda::alloc::<f32>(dev, 2 * blocks)?;
        let [patches, n, k, c, h, w, p] = [b * n, n, k, c, h, w, self.p].map(|v| v as i32);
        let cfg = cuda::per_row(blocks, 32 * CUDA_PATCHES_PER_BLOCK as u32);
        launch!(
            dev,
            cuda::DRAW_LOSS,
            "draw_loss_partial_f32",
            cfg,
            &drawn,
            &t,
            &mask,
            &partial,
            &patches,
            &n,
            &k,
            &c,
            &h,
            &w,
            &p
        );
        let (loss, count) = cuda::finish_loss(dev, &partial, blocks)?;
        let _ = self.count.set(count);
        Ok((cuda::storage(loss, dev), Shape::from(())))
    }

    fn bwd(
        &self,
        drawn: &Tensor,
        target: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n, k) = drawn.dims3()?;
        let (_, c, h, w) = target.dims4()?;
        let p = self.p;
        #[cfg(feature = "cuda")]
        if super::cuda::on_cuda(drawn) {
            use super::cuda::{self, launch};
            let Some(count) = self.count.get() else {
                candle_core::bail!("draw loss backward before its forward")
            };
            let views = [drawn, target, mask, grad, count];
            return cuda::with_views::<5, f32, _>(views, "draw loss backward", |dev, [d, t, m, g, cnt]| {
                let total = b * n * k;
                let dd = cuda::alloc::<f32>(dev, total)?;
                let [n, k, c, h, w, p] = [n, k, c, h, w, p].map(|v| v as i32);
                launch!(
                    dev,
                    cuda::DRAW_LOSS,
                    "draw_loss_bwd_f32",
                    cuda::elementwise(total),
                    &d,
                    &t,
                    &m,
                    &g,
                    &cnt,
                    &dd,
                    &total,
                    &n,
                    &k,
                    &c,
                    &h,
                    &w,
                    &p
                );
                Ok((Some(cuda::tensor(dd, dev, (b, n as usize, k as usize))), None, None))
            });
        }
        with_slices([drawn, target, mask, grad], "draw loss backward", |[d, t, mask, g]| {
            let count: f32 = mask.iter().sum();
            let coef = g[0] * 2.0 / (k as f32 * count.max(1.0));
            let img = c * h * w;
            let mut dd = vec![0f32; b * n * k];
            dd.par_chunks_mut(k).enumerate().for_each(|(bn, o)| {
                let m = mask[bn];
                if m == 0.0 {
                    return;
                }
                let (bi, ni) = (bn / n, bn % n);
                let dr = &d[bn * k..][..k];
                for_patch_target(&t[bi * img..][..img], c, h, w, p, ni, |i, v| {
                    o[i] = coef * m * (dr[i] - v);
                });
            });
            Ok((Some(tensor(dd, (b, n, k))?), None, None))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{compare_with_reference, finite_difference_check, seeded};

    #[test]
    fn draw_loss_matches_reference_and_finite_differences() -> Result<()> {
        for (b, c, s, p) in [(1, 1, 8, 4), (3, 3, 28, 4), (2, 3, 32, 16)] {
            let n = (s / p) * (s / p);
            let target = seeded(&[b, c, s, s], 1, 1.0)?;
            let mask_v: Vec<f32> = (0..b * n).map(|i| ((i * 5) % 4 != 0) as u8 as f32).collect();
            let mask = Tensor::from_vec(mask_v, (b, n), &candle_core::Device::Cpu)?;
            let inputs = [seeded(&[b, n, p * p * c], 2, 1.0)?];
            compare_with_reference("draw loss", &inputs, &[0], 1e-5, |v| {
                draw_loss(&v[0], &target, &mask, p)
            })?;
            let (t64, m64) = (
                target.to_dtype(candle_core::DType::F64)?,
                mask.to_dtype(candle_core::DType::F64)?,
            );
            finite_difference_check("draw loss", &inputs, 0, &[0, 1, p * p * c + 2], 2e-3, |x| {
                if x[0].dtype() == candle_core::DType::F64 {
                    draw_loss(&x[0], &t64, &m64, p)
                } else {
                    draw_loss(&x[0], &target, &mask, p)
                }
            })?;
        }
        Ok(())
    }
}
