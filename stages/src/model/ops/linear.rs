//! A Linear layer, `y = x W^T + b`, as one op: the bias is where the GEMM's C
//! starts (no pass of its own), and the backward makes dx = g W, dW = g^T x and
//! db = the column sums of g (fixed-block partials, thread-independent bits).
//! dx is skipped when x needs no gradient (a stem on the images).

use super::cpu::{f32_slice, output_vec, tensor, with_slices};
use crate::model::autocast;
use crate::model::matmul::{column_sums, gemm, matmul, Init, Mat};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// `x (.., in) -> (.., out)` with `weight (out, in)`, `bias (out)`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let k = dims.last().copied().unwrap_or(0);
    let rows = x.elem_count() / k.max(1);
    let n = weight.dim(0)?;
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    #[cfg(feature = "cuda")]
    if super::fused(x) && x.device().is_cuda() {
        // cuBLAS at this thread's precision, then the bias by its kernel (one pass; the
        // basic ops' broadcast add indexes every element through all dimensions).
        let y = matmul(&x.reshape((rows, k))?, &weight.t()?)?;
        return y.apply_op2(&bias.contiguous()?, BiasAdd)?.reshape(out_dims);
    }
    if super::fused(x) && autocast::gemm_dtype() == DType::F32 {
        autocast::add_flops(2 * (rows * k * n) as u64);
        // Any rank in and out: a reshape node would cost two passes in candle's backward.
        x.contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, LinearOp)
    } else {
        linear_reference(&x.reshape((rows, k))?, weight, bias)?.reshape(out_dims)
    }
}

/// The basic-op twin: a matmul, then a broadcast add.
pub fn linear_reference(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    matmul(x, &weight.t()?)?.broadcast_add(bias)
}

struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "crossmae-linear"
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
        let x = f32_slice(s1, l1, "linear x")?;
        let w = f32_slice(s2, l2, "linear weight")?;
        let b = f32_slice(s3, l3, "linear bias")?;
        let k = l1.dims().last().copied().unwrap_or(0);
        let rows = x.len() / k.max(1);
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 || b.len() != n {
            candle_core::bail!("linear: x {:?}, weight {:?}, bias {}", l1.dims(), l2.dims(), b.len())
        }
        let mut y = output_vec(rows * n);
        gemm(
            rows,
            n,
            k,
            Mat::rows(x, 0, k),
            Mat::cols(w, 0, k),
            &mut y,
            n,
            Init::Bias(b),
            true,
        );
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let k = w.dim(1)?;
        let rows = x.elem_count() / k.max(1);
        let n = w.dim(0)?;
        let want_dx = x.track_op();
        with_slices([x, w, g], "linear backward", |[xs, ws, gs]| {
            let dx = if want_dx {
                let mut dx = output_vec(rows * k);
                gemm(
                    rows,
                    k,
                    n,
                    Mat::rows(gs, 0, n),
                    Mat::rows(ws, 0, k),
                    &mut dx,
                    k,
                    Init::Zero,
                    true,
                );
                Some(tensor(dx, x.shape().clone())?)
            } else {
                None
            };
            let mut dw = output_vec(n * k);
            gemm(
                n,
                k,
                rows,
                Mat::cols(gs, 0, n),
                Mat::rows(xs, 0, k),
                &mut dw,
                k,
                Init::Zero,
                true,
            );
            let db = column_sums(gs, n);
            Ok((dx, Some(tensor(dw, (n, k))?), Some(tensor(db, n)?)))
        })
    }
}

/// `y = x + bias` over the rows of a (rows, n) product, on CUDA (the CPU's Linear
/// starts its GEMM from the bias instead); the backward passes the gradient through
/// to x and makes the bias's by a column reduction.
#[cfg(feature = "cuda")]
struct BiasAdd;

#[cfg(feature = "cuda")]
impl candle_core::CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "crossmae-bias-add"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("bias add: a CUDA kernel only (the CPU's Linear adds its bias inside the GEMM)")
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, launch};
        let x = cuda::view::<f32>(s1, l1, "bias add x")?;
        let b = cuda::view::<f32>(s2, l2, "bias add bias")?;
        if l1.dims().last() != Some(&b.len()) {
            candle_core::bail!("bias add: x {:?}, bias {}", l1.dims(), b.len())
        }
        let dev = &s1.device;
        let y = cuda::alloc::<f32>(dev, x.len())?;
        let (total, width) = (x.len(), b.len() as i32);
        launch!(
            dev,
            cuda::COLUMN_SUMS,
            "bias_add_f32",
            cuda::elementwise(total),
            &x,
            &b,
            &y,
            &total,
            &width
        );
        Ok((cuda::storage(y, dev), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, bias: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = bias.elem_count();
        let rows = x.elem_count() / n.max(1);
        let db = super::cuda::with_views::<1, f32, _>([g], "bias add backward", |dev, [gs]| {
            super::cuda::column_sums(dev, &gs, rows, n)
        })?;
        Ok((Some(g.clone()), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{compare_with_reference, finite_difference_check, seeded};

    #[test]
    fn linear_matches_reference_and_finite_differences() -> Result<()> {
        // Rows not a multiple of the tile, batch 1, odd widths.
        for (rows, k, n) in [(1, 5, 3), (197, 64, 37), (75, 300, 20)] {
            let inputs = [
                seeded(&[rows, k], 1, 1.0)?,
                seeded(&[n, k], 2, 0.3)?,
                seeded(&[n], 3, 0.5)?,
            ];
            compare_with_reference("linear", &inputs, &[0, 1, 2], 2e-5, |v| linear(&v[0], &v[1], &v[2]))?;
            for i in 0..3 {
                finite_difference_check("linear", &inputs, i, &[0, 2], 2e-3, |t| linear(&t[0], &t[1], &t[2]))?;
            }
        }
        Ok(())
    }
}
