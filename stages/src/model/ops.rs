//! Differentiable building blocks that candle-nn gets wrong for training.
//!
//! candle-nn 0.11's `ops::softmax_last_dim`, `ops::layer_norm` and
//! `LayerNorm::forward` on contiguous input have no backward pass: gradients
//! silently stop there. These versions always have one. On the CPU they run as
//! custom ops with a hand-written backward (one pass over memory instead of a
//! dozen); elsewhere they fall back to compositions of basic ops, and a test
//! checks that both paths agree, forward and backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`,
/// biased variance as in PyTorch.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let normed = if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(Normalize { eps })?
    } else {
        normalize_slow(x, eps)?
    };
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension, from basic ops.
pub fn normalize_slow(x: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)? as f64;
    let mean = (x.sum_keepdim(D::Minus1)? / d)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / d)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

/// LeakyReLU: `x` for `x >= 0`, `slope * x` otherwise.
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    let zeros = x.zeros_like()?;
    x.maximum(&zeros)? + (x.minimum(&zeros)? * slope)?
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{what}: expected f32 storage, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Per-row normalization with a backward pass (the affine part stays outside).
struct Normalize {
    eps: f64,
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "crossmae-normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "normalize")?;
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let rstd = 1.0 / (var + self.eps as f32).sqrt();
            for (o, v) in o.iter_mut().zip(row) {
                *o = (v - mean) * rstd;
            }
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// With y = normalized x and g the incoming gradient, per row:
    /// dx = rstd * (g - mean(g) - y * mean(g * y)).
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let arg = arg.detach();
        let y = res.detach();
        let g = grad.contiguous()?;
        let packed = Tensor::stack(&[&arg, &y, &g], 0)?;
        Ok(Some(
            packed.apply_op1_no_bwd(&NormalizeBwd { eps: self.eps })?,
        ))
    }
}

/// Backward of [`Normalize`], fed `stack([x, y, g])`.
struct NormalizeBwd {
    eps: f64,
}

impl CustomOp1 for NormalizeBwd {
    fn name(&self) -> &'static str {
        "crossmae-normalize-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let all = f32_slice(s, l, "normalize-bwd")?;
        let n = all.len() / 3;
        let (x, rest) = all.split_at(n);
        let (y, g) = rest.split_at(n);
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; n];
        for (((xr, yr), gr), o) in x
            .chunks_exact(d)
            .zip(y.chunks_exact(d))
            .zip(g.chunks_exact(d))
            .zip(out.chunks_exact_mut(d))
        {
            let mean = xr.iter().sum::<f32>() / d as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let rstd = 1.0 / (var + self.eps as f32).sqrt();
            let mg = gr.iter().sum::<f32>() / d as f32;
            let mgy = gr.iter().zip(yr).map(|(g, y)| g * y).sum::<f32>() / d as f32;
            for ((o, g), y) in o.iter_mut().zip(gr).zip(yr) {
                *o = rstd * (g - mg - y * mgy);
            }
        }
        let dims = l.dims();
        Ok((CpuStorage::F32(out), Shape::from(dims[1..].to_vec())))
    }
}

/// Softmax over the last dimension with a backward pass.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "crossmae-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "softmax")?;
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, v) in o.iter_mut().zip(row) {
                *o = (v - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|o| *o *= inv);
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// dx = y * (g - sum(g * y)) per row.
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let packed = Tensor::stack(&[&res.detach(), &grad.contiguous()?], 0)?;
        Ok(Some(packed.apply_op1_no_bwd(&SoftmaxBwd)?))
    }
}

/// Backward of [`Softmax`], fed `stack([y, g])`.
struct SoftmaxBwd;

impl CustomOp1 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "crossmae-softmax-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let all = f32_slice(s, l, "softmax-bwd")?;
        let (y, g) = all.split_at(all.len() / 2);
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; y.len()];
        for ((yr, gr), o) in y
            .chunks_exact(d)
            .zip(g.chunks_exact(d))
            .zip(out.chunks_exact_mut(d))
        {
            let dot = yr.iter().zip(gr).map(|(y, g)| y * g).sum::<f32>();
            for ((o, y), g) in o.iter_mut().zip(yr).zip(gr) {
                *o = y * (g - dot);
            }
        }
        let dims = l.dims();
        Ok((CpuStorage::F32(out), Shape::from(dims[1..].to_vec())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff")
    }

    /// The fast CPU ops equal their basic-op compositions, values and gradients.
    #[test]
    fn custom_ops_match_compositions_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 5, 7), &dev)? + 0.5)?)?;
        let w = Tensor::randn(0f32, 1.0, (3, 5, 7), &dev)?;

        let fast = normalize_slow(&x, 1e-6)?; // reference first
        let fast_custom = x
            .as_tensor()
            .contiguous()?
            .apply_op1(Normalize { eps: 1e-6 })?;
        assert!(max_abs_diff(&fast, &fast_custom) < 1e-5);
        let g_ref = (fast * &w)?.sum_all()?.backward()?;
        let g_new = (fast_custom * &w)?.sum_all()?.backward()?;
        let (a, b) = (g_ref.get(&x).expect("grad"), g_new.get(&x).expect("grad"));
        assert!(
            max_abs_diff(a, b) < 1e-4,
            "normalize grad differs by {}",
            max_abs_diff(a, b)
        );

        let s_ref = candle_nn::ops::softmax(&x, D::Minus1)?;
        let s_new = softmax_last(&x)?;
        assert!(max_abs_diff(&s_ref, &s_new) < 1e-6);
        let g_ref = (s_ref * &w)?.sum_all()?.backward()?;
        let g_new = (s_new * &w)?.sum_all()?.backward()?;
        let (a, b) = (g_ref.get(&x).expect("grad"), g_new.get(&x).expect("grad"));
        assert!(
            max_abs_diff(a, b) < 1e-5,
            "softmax grad differs by {}",
            max_abs_diff(a, b)
        );
        Ok(())
    }

    #[test]
    fn leaky_relu_values() -> Result<()> {
        let x = Tensor::new(&[-2f32, -0.5, 0.0, 3.0], &Device::Cpu)?;
        assert_eq!(
            leaky_relu(&x, 0.2)?.to_vec1::<f32>()?,
            vec![-0.4, -0.1, 0.0, 3.0]
        );
        Ok(())
    }
}
