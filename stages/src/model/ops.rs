//! Differentiable building blocks that candle-nn gets wrong for training.
//!
//! candle-nn 0.11's `ops::softmax_last_dim`, `ops::layer_norm` and
//! `LayerNorm::forward` on contiguous input have no backward pass: gradients
//! silently stop there. These versions always have one. On the CPU they run as
//! custom ops with a hand-written backward (one pass over memory instead of a
//! dozen); elsewhere they fall back to compositions of basic ops, and a test
//! checks that both paths agree, forward and backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`,
/// biased variance as in PyTorch.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fast_path(x) {
        x.contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNormOp { eps })
    } else {
        normalize_slow(x, eps)?.broadcast_mul(weight)?.broadcast_add(bias)
    }
}

/// `x + bias` with the bias broadcast over the last dimension (a Linear layer's bias).
/// On the CPU its backward sums the bias gradient in one pass.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if fast_path(x) {
        x.contiguous()?.apply_op2(&bias.contiguous()?, AddBias)
    } else {
        x.broadcast_add(bias)
    }
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

/// Sum over all rows of a (R, D) row-major slice, into `out` (D).
fn column_sums(x: &[f32], d: usize, out: &mut [f32]) {
    for row in x.chunks_exact(d) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
}

/// LayerNorm with weight and bias in one op, and its backward.
struct LayerNormOp {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "crossmae-layer-norm"
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
        let x = f32_slice(s1, l1, "layer-norm x")?;
        let (w, b) = (
            f32_slice(s2, l2, "layer-norm weight")?,
            f32_slice(s3, l3, "layer-norm bias")?,
        );
        let d = last_dim(l1);
        if w.len() != d || b.len() != d {
            candle_core::bail!("layer-norm: weight {} / bias {} for width {d}", w.len(), b.len())
        }
        let mut out = vec![0f32; x.len()];
        for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let rstd = 1.0 / (var + self.eps as f32).sqrt();
            for (((o, v), w), b) in o.iter_mut().zip(row).zip(w).zip(b) {
                *o = (v - mean) * rstd * w + b;
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// With xh = normalized x, gh = g * weight, per row:
    /// dx = rstd * (gh - mean(gh) - xh * mean(gh * xh)); dweight = sum g * xh; dbias = sum g.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let n = x.elem_count();
        let packed = x
            .detach()
            .apply_op3_no_bwd(&w.detach(), &grad.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, d)?.reshape(w.shape())?;
        let db = packed.narrow(0, n + d, d)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Backward of [`LayerNormOp`], fed (x, weight, g); returns `[dx ; dweight ; dbias]` flat.
struct LayerNormBwd {
    eps: f64,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "crossmae-layer-norm-bwd"
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
        let x = f32_slice(s1, l1, "layer-norm-bwd x")?;
        let w = f32_slice(s2, l2, "layer-norm-bwd weight")?;
        let g = f32_slice(s3, l3, "layer-norm-bwd grad")?;
        let d = last_dim(l1);
        let n = x.len();
        let mut out = vec![0f32; n + 2 * d];
        let (dx, rest) = out.split_at_mut(n);
        let (dw, db) = rest.split_at_mut(d);
        let mut xh = vec![0f32; d];
        let mut gh = vec![0f32; d];
        for ((xr, gr), o) in x.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let mean = xr.iter().sum::<f32>() / d as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let rstd = 1.0 / (var + self.eps as f32).sqrt();
            let (mut sg, mut sgx) = (0f32, 0f32);
            for i in 0..d {
                xh[i] = (xr[i] - mean) * rstd;
                gh[i] = gr[i] * w[i];
                sg += gh[i];
                sgx += gh[i] * xh[i];
                dw[i] += gr[i] * xh[i];
                db[i] += gr[i];
            }
            let (mg, mgx) = (sg / d as f32, sgx / d as f32);
            for i in 0..d {
                o[i] = rstd * (gh[i] - mg - xh[i] * mgx);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * d)))
    }
}

/// `x + bias` over the last dimension.
struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "crossmae-add-bias"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "add-bias x")?;
        let b = f32_slice(s2, l2, "add-bias bias")?;
        let d = last_dim(l1);
        if b.len() != d {
            candle_core::bail!("add-bias: bias of {} for width {d}", b.len())
        }
        let mut out = x.to_vec();
        for row in out.chunks_exact_mut(d) {
            for (o, b) in row.iter_mut().zip(b) {
                *o += b;
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = grad.contiguous()?.apply_op1_no_bwd(&ColumnSums)?.reshape(b.shape())?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

/// Sums a (.., D) tensor over everything but the last dimension.
struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "crossmae-column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "column-sums")?;
        let d = last_dim(l);
        let mut out = vec![0f32; d];
        column_sums(x, d, &mut out);
        Ok((CpuStorage::F32(out), Shape::from(d)))
    }
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
    if fast_path(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

/// Exact GELU, `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))` (timm's default, not the tanh form).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fast_path(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu_erf()
    }
}

/// erf(x) by Abramowitz & Stegun 7.1.26 (max abs error 1.5e-7, below f32's
/// resolution near 1), with exp(-x^2) shared with the caller.
#[inline]
fn erf_with(x: f32, exp_neg_x2: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_neg_x2;
    if x < 0.0 {
        -y
    } else {
        y
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "crossmae-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu")?;
        let out = x
            .iter()
            .map(|&v| {
                let u = v * FRAC_1_SQRT_2;
                0.5 * v * (1.0 + erf_with(u, (-u * u).exp()))
            })
            .collect();
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// d/dx x Phi(x) = Phi(x) + x phi(x), with phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let packed = Tensor::stack(&[&arg.detach(), &grad.contiguous()?], 0)?;
        Ok(Some(packed.apply_op1_no_bwd(&GeluBwd)?))
    }
}

/// Backward of [`Gelu`], fed `stack([x, g])`.
struct GeluBwd;

impl CustomOp1 for GeluBwd {
    fn name(&self) -> &'static str {
        "crossmae-gelu-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let all = f32_slice(s, l, "gelu-bwd")?;
        let (x, g) = all.split_at(all.len() / 2);
        let out = x
            .iter()
            .zip(g)
            .map(|(&v, &g)| {
                let u = v * FRAC_1_SQRT_2;
                let e = (-u * u).exp(); // = exp(-x^2 / 2)
                let cdf = 0.5 * (1.0 + erf_with(u, e));
                g * (cdf + v * FRAC_1_SQRT_2PI * e)
            })
            .collect();
        let dims = l.dims();
        Ok((CpuStorage::F32(out), Shape::from(dims[1..].to_vec())))
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
        for ((yr, gr), o) in y.chunks_exact(d).zip(g.chunks_exact(d)).zip(out.chunks_exact_mut(d)) {
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
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Largest absolute elementwise difference (also used by matmul's tests).
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff")
    }

    /// The fast softmax equals candle-nn's differentiable one, values and gradients.
    #[test]
    fn softmax_matches_composition_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 5, 7), &dev)? + 0.5)?)?;
        let w = Tensor::randn(0f32, 1.0, (3, 5, 7), &dev)?;
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

    /// The fused LayerNorm and bias add equal their compositions, values and all gradients.
    #[test]
    fn layer_norm_and_bias_match_compositions() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 5, 7), &dev)? + 0.5)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, 7, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, 7, &dev)?)?;
        let r = Tensor::randn(0f32, 1.0, (3, 5, 7), &dev)?;
        let slow = normalize_slow(&x, 1e-6)?.broadcast_mul(&w)?.broadcast_add(&b)?;
        let fast = layer_norm(&x, &w, &b, 1e-6)?;
        assert!(max_abs_diff(&slow, &fast) < 1e-5);
        let gs = (slow * &r)?.sum_all()?.backward()?;
        let gf = (fast * &r)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
            let (a, c) = (gs.get(v).expect("grad"), gf.get(v).expect("grad"));
            assert!(
                max_abs_diff(a, c) < 1e-4,
                "layer-norm d{name} differs by {}",
                max_abs_diff(a, c)
            );
        }
        let slow = x.broadcast_add(&b)?;
        let fast = add_bias(&x, &b)?;
        assert_eq!(max_abs_diff(&slow, &fast), 0.0);
        let gs = (slow * &r)?.sum_all()?.backward()?;
        let gf = (fast * &r)?.sum_all()?.backward()?;
        for v in [&x, &b] {
            let (a, c) = (gs.get(v).expect("grad"), gf.get(v).expect("grad"));
            assert!(
                max_abs_diff(a, c) < 1e-5,
                "add-bias grad differs by {}",
                max_abs_diff(a, c)
            );
        }
        Ok(())
    }

    /// The fast GELU equals candle's erf GELU (which uses libm's erff), values and gradients.
    #[test]
    fn gelu_matches_candle_erf_gelu() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (4, 1000), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (4, 1000), &dev)?;
        let (a, b) = (x.gelu_erf()?, gelu(&x)?);
        assert!(max_abs_diff(&a, &b) < 1e-6, "gelu differs by {}", max_abs_diff(&a, &b));
        let g_ref = (a * &w)?.sum_all()?.backward()?;
        let g_new = (b * &w)?.sum_all()?.backward()?;
        let (a, b) = (g_ref.get(&x).expect("grad"), g_new.get(&x).expect("grad"));
        assert!(max_abs_diff(a, b) < 1e-5, "gelu grad differs by {}", max_abs_diff(a, b));
        Ok(())
    }

    #[test]
    fn leaky_relu_values() -> Result<()> {
        let x = Tensor::new(&[-2f32, -0.5, 0.0, 3.0], &Device::Cpu)?;
        assert_eq!(leaky_relu(&x, 0.2)?.to_vec1::<f32>()?, vec![-0.4, -0.1, 0.0, 3.0]);
        Ok(())
    }
}
