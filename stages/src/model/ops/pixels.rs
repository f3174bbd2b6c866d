//! The pixel-space path around the drawing: images to conv-ordered patches (the
//! stems' input), and `x_draw = mask * drawn + (1 - mask) * x` composed straight
//! into conv order from the drawing (MAE order) and the image, so no MAE-order
//! copy of the image and no reorder pass exist. The mask is exactly 0 or 1, so
//! the select gives the bits of the reference's arithmetic.
//!
//! Orders (see `model::patch`): MAE order inside a patch is (row, column,
//! channel), channel fastest; conv order is (channel, row, column).

use super::cpu::{f32_slice, tensor, with_slices};
use crate::model::patch::{mae_to_conv_order, patchify, patchify_conv};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Images (B, C, H, W) -> patches (B, N, C P P) in conv order.
pub fn patchify_conv_order(images: &Tensor, p: usize) -> Result<Tensor> {
    if super::fused(images) && !images.track_op() {
        images.contiguous()?.apply_op1_no_bwd(&PatchifyConv { p })
    } else {
        patchify_conv(images, p)
    }
}

/// x_draw in conv order (B, N, C P P): the drawing (B, N, P P C, MAE order) where
/// `mask` (B, N) is 1, the image (B, C, H, W) where it is 0. Differentiable in `drawn`.
pub fn compose_conv_order(drawn: &Tensor, images: &Tensor, mask: &Tensor, p: usize) -> Result<Tensor> {
    if super::fused(drawn) && !images.track_op() && !mask.track_op() {
        drawn
            .contiguous()?
            .apply_op3(&images.contiguous()?, &mask.contiguous()?, Compose { p })
    } else {
        compose_conv_order_reference(drawn, images, mask, p)
    }
}

/// The basic-op twin: patchify, compose, reorder.
pub fn compose_conv_order_reference(drawn: &Tensor, images: &Tensor, mask: &Tensor, p: usize) -> Result<Tensor> {
    let c = images.dim(1)?;
    let x_p = patchify(images, p)?;
    let (b, n) = (x_p.dim(0)?, x_p.dim(1)?);
    let mask = mask.reshape((b, n, 1))?;
    let x_draw = (drawn.broadcast_mul(&mask)? + x_p.broadcast_mul(&(1.0 - &mask)?)?)?;
    mae_to_conv_order(&x_draw, p, c)
}

/// Image geometry of a (B, C, H, W) layout cut into p x p patches.
#[derive(Clone, Copy)]
struct Grid {
    c: usize,
    h: usize,
    w: usize,
    p: usize,
}

impl Grid {
    fn new(l: &Layout, p: usize) -> Result<(usize, Self)> {
        let (b, c, h, w) = l.shape().dims4()?;
        if p == 0 || h % p != 0 || w % p != 0 {
            candle_core::bail!("patches: {h} x {w} images do not split into {p} px patches")
        }
        Ok((b, Self { c, h, w, p }))
    }
    fn patches(&self) -> usize {
        (self.h / self.p) * (self.w / self.p)
    }
    fn k(&self) -> usize {
        self.c * self.p * self.p
    }
    /// Offset in the image of patch n's row r, channel ch (p contiguous pixels follow).
    fn pixel_row(&self, n: usize, ch: usize, r: usize) -> usize {
        let gw = self.w / self.p;
        let (gy, gx) = (n / gw, n % gw);
        (ch * self.h + gy * self.p + r) * self.w + gx * self.p
    }
}

struct PatchifyConv {
    p: usize,
}

impl CustomOp1 for PatchifyConv {
    fn name(&self) -> &'static str {
        "crossmae-patchify-conv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "patchify images")?;
        let (b, g) = Grid::new(l, self.p)?;
        let (n, k, p) = (g.patches(), g.k(), g.p);
        let img = g.c * g.h * g.w;
        let mut out = vec![0f32; b * n * k];
        out.par_chunks_mut(k).enumerate().for_each(|(bn, o)| {
            let (bi, ni) = (bn / n, bn % n);
            let x = &x[bi * img..(bi + 1) * img];
            for ch in 0..g.c {
                for r in 0..p {
                    let src = g.pixel_row(ni, ch, r);
                    o[(ch * p + r) * p..][..p].copy_from_slice(&x[src..src + p]);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, n, k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, launch};
        let x = cuda::view::<f32>(s, l, "patchify images")?;
        let (b, g) = Grid::new(l, self.p)?;
        let (n, k) = (g.patches(), g.k());
        let dev = &s.device;
        let total = b * n * k;
        let out = cuda::alloc::<f32>(dev, total)?;
        let [n32, c, h, w, p] = [n, g.c, g.h, g.w, g.p].map(|v| v as i32);
        launch!(
            dev,
            cuda::PIXELS,
            "patchify_conv_f32",
            cuda::elementwise(total),
            &x,
            &out,
            &total,
            &n32,
            &c,
            &h,
            &w,
            &p
        );
        Ok((cuda::storage(out, dev), Shape::from((b, n, k))))
    }
}

struct Compose {
    p: usize,
}

impl Compose {
    /// The batch and geometry of the images, with the drawing and mask checked
    /// against them (both forwards).
    fn grid(&self, drawn: &Layout, images: &Layout, mask: &Layout) -> Result<(usize, Grid)> {
        let (b, g) = Grid::new(images, self.p)?;
        let (n, k) = (g.patches(), g.k());
        if drawn.shape().elem_count() != b * n * k || mask.shape().elem_count() != b * n {
            candle_core::bail!(
                "compose: drawn {:?}, mask {:?} for {b} x {n} patches of {k}",
                drawn.dims(),
                mask.dims()
            )
        }
        Ok((b, g))
    }
}

impl CustomOp3 for Compose {
    fn name(&self) -> &'static str {
        "crossmae-compose-conv"
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
        let drawn = f32_slice(s1, l1, "compose drawn")?;
        let x = f32_slice(s2, l2, "compose images")?;
        let mask = f32_slice(s3, l3, "compose mask")?;
        let (b, g) = self.grid(l1, l2, l3)?;
        let (n, k, p, c) = (g.patches(), g.k(), g.p, g.c);
        let img = c * g.h * g.w;
        let mut out = vec![0f32; b * n * k];
        out.par_chunks_mut(k).enumerate().for_each(|(bn, o)| {
            let (bi, ni) = (bn / n, bn % n);
            if mask[bn] != 0.0 {
                // MAE order (r, col, ch) -> conv order (ch, r, col).
                let d = &drawn[bn * k..(bn + 1) * k];
                for ch in 0..c {
                    for r in 0..p {
                        for col in 0..p {
                            o[(ch * p + r) * p + col] = d[(r * p + col) * c + ch];
                        }
                    }
                }
            } else {
                let x = &x[bi * img..(bi + 1) * img];
                for ch in 0..c {
                    for r in 0..p {
                        let src = g.pixel_row(ni, ch, r);
                        o[(ch * p + r) * p..][..p].copy_from_slice(&x[src..src + p]);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, n, k))))
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
        let drawn = cuda::view::<f32>(s1, l1, "compose drawn")?;
        let x = cuda::view::<f32>(s2, l2, "compose images")?;
        let mask = cuda::view::<f32>(s3, l3, "compose mask")?;
        let (b, g) = self.grid(l1, l2, l3)?;
        let (n, k) = (g.patches(), g.k());
        let dev = &s1.device;
        let total = b * n * k;
        let out = cuda::alloc::<f32>(dev, total)?;
        let [n32, c, h, w, p] = [n, g.c, g.h, g.w, g.p].map(|v| v as i32);
        let cfg = cuda::elementwise(total);
        launch!(
            dev,
            cuda::PIXELS,
            "compose_conv_f32",
            cfg,
            &drawn,
            &x,
            &mask,
            &out,
            &total,
            &n32,
            &c,
            &h,
            &w,
            &p
        );
        Ok((cuda::storage(out, dev), Shape::from((b, n, k))))
    }

    /// d drawn = mask * g, back in MAE order; the image and mask get none.
    fn bwd(
        &self,
        drawn: &Tensor,
        images: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n, k) = drawn.dims3()?;
        let c = images.dim(1)?;
        let p = self.p;
        #[cfg(feature = "cuda")]
        if super::cuda::on_cuda(drawn) {
            use super::cuda::{self, launch};
            return cuda::with_views::<2, f32, _>([grad, mask], "compose backward", |dev, [g, m]| {
                let total = b * n * k;
                let dd = cuda::alloc::<f32>(dev, total)?;
                let (c, p) = (c as i32, p as i32);
                launch!(
                    dev,
                    cuda::PIXELS,
                    "compose_conv_bwd_f32",
                    cuda::elementwise(total),
                    &g,
                    &m,
                    &dd,
                    &total,
                    &c,
                    &p
                );
                Ok((Some(cuda::tensor(dd, dev, (b, n, k))), None, None))
            });
        }
        with_slices([grad, mask], "compose backward", |[g, mask]| {
            let mut dd = vec![0f32; b * n * k];
            dd.par_chunks_mut(k).enumerate().for_each(|(bn, o)| {
                if mask[bn] != 0.0 {
                    let g = &g[bn * k..(bn + 1) * k];
                    for ch in 0..c {
                        for r in 0..p {
                            for col in 0..p {
                                o[(r * p + col) * c + ch] = g[(ch * p + r) * p + col];
                            }
                        }
                    }
                }
            });
            Ok((Some(tensor(dd, (b, n, k))?), None, None))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{compare_with_reference, seeded};

    #[test]
    fn pixel_path_matches_reference_bitwise() -> Result<()> {
        for (b, c, s, p) in [(1, 3, 28, 4), (2, 1, 12, 4), (2, 3, 32, 16)] {
            let n = (s / p) * (s / p);
            let images = seeded(&[b, c, s, s], 1, 1.0)?;
            let mask_v: Vec<f32> = (0..b * n).map(|i| ((i * 7) % 4 != 0) as u8 as f32).collect();
            let mask = Tensor::from_vec(mask_v, (b, n), &candle_core::Device::Cpu)?;
            let fast = patchify_conv_order(&images, p)?;
            let slow = patchify_conv(&images, p)?;
            assert_eq!(crate::model::ops::tests::max_abs_diff(&fast, &slow), 0.0);
            let drawn = seeded(&[b, n, p * p * c], 2, 1.0)?;
            // Exact (tolerance 0): a select and a reorder.
            compare_with_reference("compose", &[drawn, images.clone(), mask.clone()], &[0], 1e-30, |v| {
                compose_conv_order(&v[0], &images, &mask, p)
            })?;
        }
        Ok(())
    }
}
