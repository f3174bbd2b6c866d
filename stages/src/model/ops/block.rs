//! A whole pre-norm transformer block as one op:
//! `x1 = x + proj(attention(qkv(norm1(x))))`, `y = x1 + fc2(GELU(fc1(norm2(x1))))`.
//!
//! Why one op and not the composition of the ops beside it: candle's backward
//! gives every input of every node its own zero-filled gradient buffer and adds
//! the node's gradient into it (`GradStore::or_insert`, then `add`). A block
//! built from ten nodes paid about twenty of those passes over (B, T, D) to
//! (B, T, 4D) activations in every backward, and its two residual adds were
//! passes of their own, forward and backward. Here the backward is written out:
//! - one buffer per gradient; the residual's gradient is accumulated by the
//!   LayerNorm backward kernels (no add pass);
//! - the residual adds are the initial C of the proj and fc2 products (under
//!   drop path, [`block_drop_path`], the scaled branch is added after its product);
//! - the independent products of each layer (dW and dx) run side by side.
//!
//! The arithmetic is the ops' own: the same GEMM, LayerNorm, attention and GELU
//! kernels on slices, so [`block_reference`] (the composition, which the model
//! ran before) is the twin it is tested against, and the split into fixed row
//! blocks keeps the bits independent of the thread count.
//!
//! The twelve weights enter as one flat tensor, concatenated in [`NAMES`] order:
//! candle's custom ops take at most three inputs. The concatenation and its
//! backward cost a few passes over the weights, small beside the activations.
//!
//! Saved for the backward (CPU vectors in the op): both LayerNorms' outputs and
//! (mean, rstd), qkv, the attention output and its logsumexp, x1, and the GELU's
//! output and derivative at fc1's output (computed in one pass, so the backward
//! does not evaluate erf and exp again). No (B, H, T, T) tensor.

use super::attention::Core;
use super::cpu::{f32_slice, output_vec, tensor, with_slices, ROWS_PER_TASK};
use super::{attention, gelu, layer_norm, linear};
use crate::model::autocast;
use crate::model::matmul::{column_sums, gemm, Init, Mat};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

/// The weights [`block`] takes, in order (timm's names inside a block).
pub const NAMES: [&str; 12] = [
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
];

/// Element counts of the weights, in [`NAMES`] order, for width `d` and MLP width `h`.
fn sizes(d: usize, h: usize) -> [usize; 12] {
    [d, d, 3 * d * d, 3 * d, d * d, d, d, d, h * d, h, d * h, d]
}

/// Shapes of the weights, in [`NAMES`] order.
fn shapes(d: usize, h: usize) -> [Vec<usize>; 12] {
    [
        vec![d],
        vec![d],
        vec![3 * d, d],
        vec![3 * d],
        vec![d, d],
        vec![d],
        vec![d],
        vec![d],
        vec![h, d],
        vec![h],
        vec![d, h],
        vec![d],
    ]
}

/// A transformer block on `x (B, T, D)` with `heads` heads, LayerNorm eps `eps`.
pub fn block(x: &Tensor, weights: [&Tensor; 12], heads: usize, eps: f64) -> Result<Tensor> {
    block_with(x, weights, heads, eps, None)
}

/// [`block`] under stochastic depth (timm's `DropPath` on both residual
/// branches): `x1 = x + s0 * attn(norm1(x))`, `y = x1 + s1 * mlp(norm2(x1))`,
/// `scales` the two branches' (B, 1, 1) per-sample scales (0 or 1 / keep;
/// constants, no gradient).
pub fn block_drop_path(
    x: &Tensor,
    weights: [&Tensor; 12],
    heads: usize,
    eps: f64,
    scales: &[Tensor; 2],
) -> Result<Tensor> {
    block_with(x, weights, heads, eps, Some(scales))
}

fn block_with(
    x: &Tensor,
    weights: [&Tensor; 12],
    heads: usize,
    eps: f64,
    scales: Option<&[Tensor; 2]>,
) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let h = weights[8].dim(0)?;
    if heads == 0 || d % heads != 0 {
        candle_core::bail!("block: {heads} heads do not divide width {d}")
    }
    for ((w, want), name) in weights.iter().zip(shapes(d, h)).zip(NAMES) {
        if w.dims() != want.as_slice() {
            candle_core::bail!("block: {name} is {:?}, expected {want:?} (width {d})", w.dims())
        }
    }
    if let Some(s) = scales {
        if s.iter().any(|s| s.elem_count() != b) {
            candle_core::bail!(
                "block: drop-path scales of {:?} and {:?} for a batch of {b}",
                s[0].dims(),
                s[1].dims()
            )
        }
    }
    if !(super::fused_cpu(x) && autocast::gemm_dtype() == DType::F32) {
        return match scales {
            None => block_reference(x, weights, heads, eps),
            Some(s) => block_drop_path_reference(x, weights, heads, eps, s),
        };
    }
    let branch_scales = match scales {
        None => None,
        Some([s0, s1]) => Some([s0.flatten_all()?.to_vec1::<f32>()?, s1.flatten_all()?.to_vec1::<f32>()?]),
    };
    let r = b * t;
    // As the composition counts them: the four products, then the attention core.
    autocast::add_flops((2 * r * (3 * d * d + d * d + 2 * d * h) + 4 * b * t * t * d) as u64);
    let flat = weights.iter().map(|w| w.flatten_all()).collect::<Result<Vec<_>>>()?;
    let packed = Tensor::cat(&flat, 0)?;
    let op = BlockOp {
        d,
        h,
        core: Core {
            heads,
            scale: scale(d, heads) as f32,
        },
        eps: eps as f32,
        branch_scales,
        saved: OnceLock::new(),
    };
    x.contiguous()?.apply_op2(&packed, op)
}

/// The attention's score scale, 1 / sqrt(head width).
fn scale(d: usize, heads: usize) -> f64 {
    1.0 / ((d / heads) as f64).sqrt()
}

/// The twin: the block composed of the ops beside it (each its own graph node).
pub fn block_reference(x: &Tensor, w: [&Tensor; 12], heads: usize, eps: f64) -> Result<Tensor> {
    let d = x.dim(2)?;
    let qkv = linear(&layer_norm(x, w[0], w[1], eps)?, w[2], w[3])?;
    let x1 = (x + linear(&attention(&qkv, heads, scale(d, heads))?, w[4], w[5])?)?;
    let hidden = gelu(&linear(&layer_norm(&x1, w[6], w[7], eps)?, w[8], w[9])?)?;
    &x1 + linear(&hidden, w[10], w[11])?
}

/// The twin of [`block_drop_path`]: the composition with each branch scaled per sample.
pub fn block_drop_path_reference(
    x: &Tensor,
    w: [&Tensor; 12],
    heads: usize,
    eps: f64,
    s: &[Tensor; 2],
) -> Result<Tensor> {
    let d = x.dim(2)?;
    let qkv = linear(&layer_norm(x, w[0], w[1], eps)?, w[2], w[3])?;
    let attn = linear(&attention(&qkv, heads, scale(d, heads))?, w[4], w[5])?;
    let x1 = (x + attn.broadcast_mul(&s[0])?)?;
    let hidden = gelu(&linear(&layer_norm(&x1, w[6], w[7], eps)?, w[8], w[9])?)?;
    &x1 + linear(&hidden, w[10], w[11])?.broadcast_mul(&s[1])?
}

struct BlockOp {
    d: usize,
    h: usize,
    core: Core,
    eps: f32,
    /// Under drop path, the attention and MLP branches' scale per sample.
    branch_scales: Option<[Vec<f32>; 2]>,
    saved: OnceLock<Saved>,
}

/// What the forward keeps for the backward.
struct Saved {
    t: usize,
    ln1: Vec<f32>,
    stats1: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    lse: Vec<f32>,
    x1: Vec<f32>,
    ln2: Vec<f32>,
    stats2: Vec<f32>,
    /// GELU's derivative at fc1's output.
    dact_dpre: Vec<f32>,
    /// GELU(pre): fc2's input.
    act: Vec<f32>,
}

/// `p` cut into the twelve weights.
fn split<'a>(mut p: &'a [f32], sizes: [usize; 12]) -> [&'a [f32]; 12] {
    sizes.map(|n| {
        let (a, rest) = p.split_at(n);
        p = rest;
        a
    })
}

/// `p` cut into the twelve weight gradients.
fn split_mut(mut p: &mut [f32], sizes: [usize; 12]) -> [&mut [f32]; 12] {
    sizes.map(|n| {
        let (a, rest) = std::mem::take(&mut p).split_at_mut(n);
        p = rest;
        a
    })
}

/// Rows of `x` plus the row `b`: the initial C of a product that adds a residual.
fn residual_plus_bias(x: &[f32], b: &[f32]) -> Vec<f32> {
    let n = b.len().max(1);
    let mut c = output_vec(x.len());
    c.par_chunks_mut(ROWS_PER_TASK * n)
        .zip(x.par_chunks(ROWS_PER_TASK * n))
        .for_each(|(c, x)| {
            for (cr, xr) in c.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
                for ((o, &v), &bv) in cr.iter_mut().zip(xr).zip(b) {
                    *o = v + bv;
                }
            }
        });
    c
}

/// `base + a w^T + bias` (rows of width `bias.len()`), a branch's residual add:
/// without drop path the residual and bias are the product's initial C; with
/// it, `base + s_b (a w^T + bias)` for the rows of sample b (`t` rows each),
/// in the twin's order (the branch, scaled, then added).
#[allow(clippy::too_many_arguments)]
fn add_branch(base: &[f32], a: Mat, k: usize, w: &[f32], bias: &[f32], scales: Option<&[f32]>, t: usize) -> Vec<f32> {
    let n = bias.len();
    let r = base.len() / n.max(1);
    match scales {
        None => {
            let mut out = residual_plus_bias(base, bias);
            gemm(r, n, k, a, Mat::cols(w, 0, k), &mut out, n, Init::Accumulate, true);
            out
        }
        Some(scales) => {
            let mut out = output_vec(r * n);
            gemm(r, n, k, a, Mat::cols(w, 0, k), &mut out, n, Init::Bias(bias), true);
            per_sample(&mut out, base, scales, t * n, |o, x, s| *o = x + *o * s);
            out
        }
    }
}

/// `g` with the rows of sample b (`t` rows of width `n`) times `scales[b]`: a
/// drop-path branch's output gradient.
fn scale_samples(g: &[f32], scales: &[f32], t: usize, n: usize) -> Vec<f32> {
    let mut out = output_vec(g.len());
    per_sample(&mut out, g, scales, t * n, |o, g, s| *o = g * s);
    out
}

/// `f(out, src, scales[b])` on every element of sample b's `len` values.
fn per_sample(out: &mut [f32], src: &[f32], scales: &[f32], len: usize, f: impl Fn(&mut f32, f32, f32) + Sync) {
    out.par_chunks_mut(len)
        .zip(src.par_chunks(len))
        .zip(scales.par_iter())
        .for_each(|((o, x), &s)| o.iter_mut().zip(x).for_each(|(o, &x)| f(o, x, s)));
}

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        "crossmae-block"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "block x")?;
        let p = f32_slice(s2, l2, "block weights")?;
        let (b, t, d) = l1.shape().dims3()?;
        let (h, r) = (self.h, b * t);
        if d != self.d || p.len() != sizes(d, h).iter().sum::<usize>() {
            candle_core::bail!(
                "block: x {:?} and {} weight values for width {}",
                l1.dims(),
                p.len(),
                self.d
            )
        }
        let [n1w, n1b, qkv_w, qkv_b, proj_w, proj_b, n2w, n2b, fc1_w, fc1_b, fc2_w, fc2_b] = split(p, sizes(d, h));

        let (mut ln1, mut stats1) = (output_vec(r * d), output_vec(2 * r));
        layer_norm::forward_into(x, n1w, n1b, self.eps, &mut ln1, &mut stats1);
        let mut qkv = output_vec(r * 3 * d);
        let ln1_m = Mat::rows(&ln1, 0, d);
        gemm(
            r,
            3 * d,
            d,
            ln1_m,
            Mat::cols(qkv_w, 0, d),
            &mut qkv,
            3 * d,
            Init::Bias(qkv_b),
            true,
        );
        let (mut attn, mut lse) = (output_vec(r * d), output_vec(b * self.core.heads * t));
        self.core.forward_into(&qkv, t, d, &mut attn, &mut lse);
        let [s_attn, s_mlp] = match &self.branch_scales {
            Some([a, m]) => [Some(a.as_slice()), Some(m.as_slice())],
            None => [None, None],
        };
        let x1 = add_branch(x, Mat::rows(&attn, 0, d), d, proj_w, proj_b, s_attn, t);

        let (mut ln2, mut stats2) = (output_vec(r * d), output_vec(2 * r));
        layer_norm::forward_into(&x1, n2w, n2b, self.eps, &mut ln2, &mut stats2);
        let mut pre = output_vec(r * h);
        let ln2_m = Mat::rows(&ln2, 0, d);
        gemm(
            r,
            h,
            d,
            ln2_m,
            Mat::cols(fc1_w, 0, d),
            &mut pre,
            h,
            Init::Bias(fc1_b),
            true,
        );
        let (mut act, mut dact_dpre) = (output_vec(r * h), output_vec(r * h));
        gelu::forward_with_derivative_into(&pre, &mut act, &mut dact_dpre);
        drop(pre);
        let y = add_branch(&x1, Mat::rows(&act, 0, h), h, fc2_w, fc2_b, s_mlp, t);

        let saved = Saved {
            t,
            ln1,
            stats1,
            qkv,
            attn,
            lse,
            x1,
            ln2,
            stats2,
            dact_dpre,
            act,
        };
        let _ = self.saved.set(saved);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, p: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(s) = self.saved.get() else {
            candle_core::bail!("block backward before its forward")
        };
        let (d, h) = (self.d, self.h);
        with_slices([x, p, g], "block backward", |[xs, ps, dy]| {
            let r = xs.len() / d;
            let [n1w, _, qkv_w, _, proj_w, _, n2w, _, fc1_w, _, fc2_w, _] = split(ps, sizes(d, h));
            let mut dp = output_vec(ps.len());
            let [dn1w, dn1b, dqkv_w, dqkv_b, dproj_w, dproj_b, dn2w, dn2b, dfc1_w, dfc1_b, dfc2_w, dfc2_b] =
                split_mut(&mut dp, sizes(d, h));

            // Under drop path each branch's output gradient is the residual's scaled.
            let branch_grad = |g: &[f32], which: usize| {
                self.branch_scales
                    .as_ref()
                    .map(|sc| scale_samples(g, &sc[which], s.t, d))
            };
            // fc2, then the GELU in place: dpre.
            let dy_branch = branch_grad(dy, 1);
            let dyb = dy_branch.as_deref().unwrap_or(dy);
            let mut dpre = output_vec(r * h);
            let dy_m = Mat::rows(dyb, 0, d);
            rayon::join(
                || {
                    gemm(
                        d,
                        h,
                        r,
                        Mat::cols(dyb, 0, d),
                        Mat::rows(&s.act, 0, h),
                        dfc2_w,
                        h,
                        Init::Zero,
                        true,
                    )
                },
                || gemm(r, h, d, dy_m, Mat::rows(fc2_w, 0, h), &mut dpre, h, Init::Zero, true),
            );
            dfc2_b.copy_from_slice(&column_sums(dyb, d));
            gelu::backward_with_derivative(&s.dact_dpre, &mut dpre);

            // fc1, then norm2 with the residual: dx1 = dy + norm2's dx.
            let mut dln2 = output_vec(r * d);
            let dpre_m = Mat::rows(&dpre, 0, h);
            rayon::join(
                || {
                    gemm(
                        h,
                        d,
                        r,
                        Mat::cols(&dpre, 0, h),
                        Mat::rows(&s.ln2, 0, d),
                        dfc1_w,
                        d,
                        Init::Zero,
                        true,
                    )
                },
                || gemm(r, d, h, dpre_m, Mat::rows(fc1_w, 0, d), &mut dln2, d, Init::Zero, true),
            );
            dfc1_b.copy_from_slice(&column_sums(&dpre, h));
            drop(dpre);
            let mut dx1 = dy.to_vec();
            let (gw, gb) = layer_norm::backward_into(&s.x1, &dln2, n2w, &s.stats2, &mut dx1, true);
            dn2w.copy_from_slice(&gw);
            dn2b.copy_from_slice(&gb);

            // proj (its output gradient is dx1, scaled under drop path), then the attention core.
            let dx1_branch = branch_grad(&dx1, 0);
            let dx1b = dx1_branch.as_deref().unwrap_or(&dx1);
            let mut dattn = dln2;
            let dx1_m = Mat::rows(dx1b, 0, d);
            rayon::join(
                || {
                    gemm(
                        d,
                        d,
                        r,
                        Mat::cols(dx1b, 0, d),
                        Mat::rows(&s.attn, 0, d),
                        dproj_w,
                        d,
                        Init::Zero,
                        true,
                    )
                },
                || gemm(r, d, d, dx1_m, Mat::rows(proj_w, 0, d), &mut dattn, d, Init::Zero, true),
            );
            dproj_b.copy_from_slice(&column_sums(dx1b, d));
            let mut dqkv = output_vec(r * 3 * d);
            self.core
                .backward_into(&s.qkv, &s.attn, &dattn, &s.lse, s.t, d, &mut dqkv);

            // qkv, then norm1 with the residual: dx = dx1 + norm1's dx.
            let mut dln1 = dattn;
            let dqkv_m = Mat::rows(&dqkv, 0, 3 * d);
            rayon::join(
                || {
                    let a = Mat::cols(&dqkv, 0, 3 * d);
                    gemm(3 * d, d, r, a, Mat::rows(&s.ln1, 0, d), dqkv_w, d, Init::Zero, true)
                },
                || {
                    gemm(
                        r,
                        d,
                        3 * d,
                        dqkv_m,
                        Mat::rows(qkv_w, 0, d),
                        &mut dln1,
                        d,
                        Init::Zero,
                        true,
                    )
                },
            );
            dqkv_b.copy_from_slice(&column_sums(&dqkv, 3 * d));
            drop(dqkv);
            let mut dx = dx1;
            let (gw, gb) = layer_norm::backward_into(xs, &dln1, n1w, &s.stats1, &mut dx, true);
            dn1w.copy_from_slice(&gw);
            dn1b.copy_from_slice(&gb);

            Ok((
                Some(tensor(dx, x.shape().clone())?),
                Some(tensor(dp, p.shape().clone())?),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{compare_with_reference, finite_difference_check, max_rel_diff, on_threads, seeded};
    use candle_core::Var;

    /// Inputs: x, then the twelve weights (LayerNorm gains near 1).
    fn inputs(b: usize, t: usize, d: usize, h: usize) -> Result<Vec<Tensor>> {
        let mut v = vec![seeded(&[b, t, d], 1, 1.0)?];
        for (i, shape) in shapes(d, h).iter().enumerate() {
            let w = seeded(shape, 10 + i as u64, 0.1)?;
            v.push(if NAMES[i].starts_with("norm") && NAMES[i].ends_with("weight") {
                (w + 1.0)?
            } else {
                w
            });
        }
        Ok(v)
    }

    fn run(v: &[Tensor], heads: usize) -> Result<Tensor> {
        let w: [&Tensor; 12] = std::array::from_fn(|i| &v[i + 1]);
        block(&v[0], w, heads, 1e-6)
    }

    /// The same on variables (their tensors keep the variables' ids).
    fn run_vars(v: &[Var], heads: usize) -> Result<Tensor> {
        run(&v.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>(), heads)
    }

    /// Values and the gradients of x and all twelve weights against the basic-op
    /// composition, and central differences in f64; T = 197 with head width 64
    /// (ViT at 224 px), odd T and widths, batch 1.
    #[test]
    fn block_matches_reference_and_finite_differences() -> Result<()> {
        for (b, t, heads, hd) in [(1, 197, 2, 64), (3, 50, 3, 8), (2, 7, 1, 5)] {
            let d = heads * hd;
            let h = 4 * d;
            let v = inputs(b, t, d, h)?;
            let all: Vec<usize> = (0..13).collect();
            compare_with_reference("block", &v, &all, 1e-4, |v| run_vars(v, heads))?;
            for (i, positions) in [
                (0, vec![0, d + 1, b * t * d - 1]),
                (3, vec![0, 3 * d * d - 1]),
                (9, vec![1]),
                (7, vec![0]),
            ] {
                finite_difference_check("block", &v, i, &positions, 3e-3, |t| run(t, heads))?;
            }
        }
        Ok(())
    }

    /// The fused block against the composition of the fused ops (what it
    /// replaces), tightly; also under drop path (what fine-tuning ran before).
    #[test]
    fn block_matches_the_composition_of_the_fused_ops() -> Result<()> {
        let (b, t, heads, d) = (4, 50, 3, 48);
        let v: Vec<Var> = inputs(b, t, d, 4 * d)?
            .iter()
            .map(Var::from_tensor)
            .collect::<Result<_>>()?;
        let w: [&Tensor; 12] = std::array::from_fn(|i| v[i + 1].as_tensor());
        let r = seeded(&[b, t, d], 99, 1.0)?;
        for scales in [None, Some(drop_path_scales(b)?)] {
            let (fused, composed) = match &scales {
                None => (block(&v[0], w, heads, 1e-6)?, block_reference(&v[0], w, heads, 1e-6)?),
                Some(s) => (
                    block_drop_path(&v[0], w, heads, 1e-6, s)?,
                    block_drop_path_reference(&v[0], w, heads, 1e-6, s)?,
                ),
            };
            let what = if scales.is_some() { "block drop path" } else { "block" };
            assert!(max_rel_diff(&fused, &composed) < 1e-5, "{what} value");
            let gf = (&fused * &r)?.sum_all()?.backward()?;
            let gc = (&composed * &r)?.sum_all()?.backward()?;
            for (i, var) in v.iter().enumerate() {
                let (a, c) = (gf.get(var).expect("fused grad"), gc.get(var).expect("composed grad"));
                let e = max_rel_diff(a, c);
                assert!(
                    e < 5e-5,
                    "{what}: gradient of input {i} differs from the composition by {e}"
                );
            }
        }
        Ok(())
    }

    /// Per-sample branch scales: 1 / keep on some samples, 0 (the branch
    /// dropped) on others, different for the two branches.
    fn drop_path_scales(b: usize) -> Result<[Tensor; 2]> {
        let attn: Vec<f32> = (0..b).map(|i| if i % 2 == 0 { 1.25 } else { 0.0 }).collect();
        let mlp: Vec<f32> = (0..b).map(|i| if i % 3 == 1 { 0.0 } else { 1.25 }).collect();
        Ok([
            Tensor::from_vec(attn, (b, 1, 1), &candle_core::Device::Cpu)?,
            Tensor::from_vec(mlp, (b, 1, 1), &candle_core::Device::Cpu)?,
        ])
    }

    /// Under drop path: values and the gradients of x and all twelve weights
    /// against the basic-op composition with scaled branches, and central
    /// differences (odd T and widths, batch 1 with its attention branch dropped).
    #[test]
    fn drop_path_block_matches_reference_and_finite_differences() -> Result<()> {
        for (b, t, heads, hd) in [(3, 50, 3, 8), (2, 7, 1, 5), (1, 9, 2, 4)] {
            let d = heads * hd;
            let v = inputs(b, t, d, 4 * d)?;
            let scales = drop_path_scales(b)?;
            // The finite differences run in f64: the scales follow x's dtype.
            let go = |v: &[Tensor]| {
                let w: [&Tensor; 12] = std::array::from_fn(|i| &v[i + 1]);
                let [a, m] = &scales;
                let scales = [a.to_dtype(v[0].dtype())?, m.to_dtype(v[0].dtype())?];
                block_drop_path(&v[0], w, heads, 1e-6, &scales)
            };
            let all: Vec<usize> = (0..13).collect();
            compare_with_reference("block drop path", &v, &all, 1e-4, |v| {
                go(&v.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>())
            })?;
            for (i, positions) in [(0, vec![0, b * t * d - 1]), (5, vec![0]), (11, vec![1])] {
                finite_difference_check("block drop path", &v, i, &positions, 3e-3, go)?;
            }
        }
        Ok(())
    }

    #[test]
    fn block_bits_do_not_depend_on_threads() -> Result<()> {
        let (b, t, heads, d) = (3, 41, 2, 24);
        let v: Vec<Var> = inputs(b, t, d, 4 * d)?
            .iter()
            .map(Var::from_tensor)
            .collect::<Result<_>>()?;
        let r = seeded(&[b, t, d], 7, 1.0)?;
        let drop_path = drop_path_scales(b)?;
        let go = |threads: usize, scales: Option<&[Tensor; 2]>| -> Result<Vec<Vec<u32>>> {
            on_threads(threads, || {
                let w: [&Tensor; 12] = std::array::from_fn(|i| v[i + 1].as_tensor());
                let y = match scales {
                    None => block(&v[0], w, heads, 1e-6)?,
                    Some(s) => block_drop_path(&v[0], w, heads, 1e-6, s)?,
                };
                let g = (&y * &r)?.sum_all()?.backward()?;
                let mut out = vec![y];
                out.extend(v.iter().map(|var| g.get(var).cloned().expect("grad")));
                out.iter()
                    .map(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect()))
                    .collect()
            })
        };
        for scales in [None, Some(&drop_path)] {
            let one = go(1, scales)?;
            assert_eq!(one, go(2, scales)?, "block bits differ on 1 and 2 threads");
            assert_eq!(one, go(3, scales)?, "block bits differ on 1 and 3 threads");
        }
        Ok(())
    }

    #[test]
    fn block_names_a_misshapen_weight() -> Result<()> {
        let mut v = inputs(1, 5, 8, 32)?;
        v[10] = seeded(&[31], 1, 1.0)?; // mlp.fc1.bias (v[0] is x)
        let err = run(&v, 2).expect_err("bad shape accepted");
        assert!(err.to_string().contains("mlp.fc1.bias"), "{err}");
        Ok(())
    }
}
