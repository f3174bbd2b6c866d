//! LayerNorm over the last dimension, `(x - mean) / sqrt(var + eps) * gamma + beta`
//! (biased variance, as PyTorch), with its backward. The forward saves mean and
//! rstd per row; the backward makes, per row, with xh = (x - mean) rstd and gh = g gamma,
//! `dx = rstd (gh - mean(gh) - xh mean(gh xh))`, and dgamma = sum g xh, dbeta = sum g
//! over rows as fixed-block partials (thread-independent bits).

use super::cpu::{f32_slice, output_vec, sum_partials, tensor, with_slices, ROWS_PER_TASK};
use crate::simd::multiversion;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::OnceLock;

/// LayerNorm of `x (.., d)` with `weight`, `bias (d)`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if super::fused(x) {
        let op = LayerNormOp {
            eps: eps as f32,
            stats: OnceLock::new(),
        };
        x.contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
    } else {
        layer_norm_reference(x, weight, bias, eps)
    }
}

/// The basic-op twin.
pub fn layer_norm_reference(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    normalize_reference(x, eps)?.broadcast_mul(weight)?.broadcast_add(bias)
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension, from basic ops.
pub fn normalize_reference(x: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)? as f64;
    let mean = (x.sum_keepdim(D::Minus1)? / d)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / d)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)
}

/// (rows, d) of x (.., d) with weight and bias (d): the shapes both forwards check.
fn rows_and_width(x: &Layout, w: &Layout, b: &Layout) -> Result<(usize, usize)> {
    let (wn, bn) = (w.shape().elem_count(), b.shape().elem_count());
    if x.dims().last() != Some(&wn) || bn != wn {
        candle_core::bail!("layer-norm: x {:?}, weight {wn}, bias {bn}", x.dims())
    }
    let d = wn.max(1);
    Ok((x.shape().elem_count() / d, d))
}

struct LayerNormOp {
    eps: f32,
    /// (rows, 2): mean and rstd of each row, set by the forward.
    stats: OnceLock<Tensor>,
}

/// Sum of a slice in 8 independent lanes (vectorizes without reassociation), lanes added in order.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += f(c[i]);
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for &v in tail {
        s += f(v);
    }
    s
}

multiversion! {
    /// Rows of x -> rows of y and (mean, rstd) per row.
    fn forward_rows / forward_rows_scalar(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32], stats: &mut [f32]) {
        let d = w.len();
        for ((xr, yr), st) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(stats.chunks_exact_mut(2)) {
            let mean = lane_sum(xr, |v| v) / d as f32;
            let var = lane_sum(xr, |v| (v - mean) * (v - mean)) / d as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for (((o, &v), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *o = (v - mean) * rstd * w + b;
            }
            st[0] = mean;
            st[1] = rstd;
        }
    }
}

multiversion! {
    /// dx for rows of (x, g); adds this block's dgamma and dbeta into `dw`, `db`.
    /// With `accumulate`, dx is added to what `dx` holds (a residual's gradient).
    #[allow(clippy::too_many_arguments)]
    fn backward_rows / backward_rows_scalar(x: &[f32], g: &[f32], w: &[f32], stats: &[f32], dx: &mut [f32], dw: &mut [f32], db: &mut [f32], accumulate: bool) {
        let d = w.len();
        for (((xr, gr), o), st) in x.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)).zip(stats.chunks_exact(2)) {
            let (mean, rstd) = (st[0], st[1]);
            let (mut sg, mut sgx) = ([0f32; 8], [0f32; 8]);
            // Element i into lane i % 8, in chunks of 8 so the loop vectorizes.
            let (xc, xt) = xr.as_chunks::<8>();
            let (gc, gt) = gr.as_chunks::<8>();
            let (wc, wt) = w.as_chunks::<8>();
            let (dwc, dwt) = dw.as_chunks_mut::<8>();
            let (dbc, dbt) = db.as_chunks_mut::<8>();
            for ((((x8, g8), w8), dw8), db8) in xc.iter().zip(gc).zip(wc).zip(dwc.iter_mut()).zip(dbc.iter_mut()) {
                for l in 0..8 {
                    let xh = (x8[l] - mean) * rstd;
                    let gh = g8[l] * w8[l];
                    sg[l] += gh;
                    sgx[l] += gh * xh;
                    dw8[l] += g8[l] * xh;
                    db8[l] += g8[l];
                }
            }
            for (l, ((((&xv, &gv), &wv), dwv), dbv)) in xt.iter().zip(gt).zip(wt).zip(dwt.iter_mut()).zip(dbt.iter_mut()).enumerate() {
                let xh = (xv - mean) * rstd;
                let gh = gv * wv;
                sg[l] += gh;
                sgx[l] += gh * xh;
                *dwv += gv * xh;
                *dbv += gv;
            }
            let lanes = |a: [f32; 8]| ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
            let (mg, mgx) = (lanes(sg) / d as f32, lanes(sgx) / d as f32);
            if accumulate {
                for i in 0..d {
                    let xh = (xr[i] - mean) * rstd;
                    o[i] += rstd * (gr[i] * w[i] - mg - xh * mgx);
                }
            } else {
                for i in 0..d {
                    let xh = (xr[i] - mean) * rstd;
                    o[i] = rstd * (gr[i] * w[i] - mg - xh * mgx);
                }
            }
        }
    }
}

/// The forward on slices: rows of `x` (width `w.len()`) into `y`, (mean, rstd) per row into `stats`.
pub(crate) fn forward_into(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32], stats: &mut [f32]) {
    let d = w.len().max(1);
    y.par_chunks_mut(ROWS_PER_TASK * d)
        .zip(stats.par_chunks_mut(ROWS_PER_TASK * 2))
        .zip(x.par_chunks(ROWS_PER_TASK * d))
        .for_each(|((y, st), x)| forward_rows(x, w, b, eps, y, st));
}

/// The backward on slices: dx into `dx` (added to it with `accumulate`), and (dgamma, dbeta).
pub(crate) fn backward_into(
    x: &[f32],
    g: &[f32],
    w: &[f32],
    stats: &[f32],
    dx: &mut [f32],
    accumulate: bool,
) -> (Vec<f32>, Vec<f32>) {
    let d = w.len().max(1);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(ROWS_PER_TASK * d)
        .zip(x.par_chunks(ROWS_PER_TASK * d))
        .zip(g.par_chunks(ROWS_PER_TASK * d))
        .zip(stats.par_chunks(ROWS_PER_TASK * 2))
        .map(|(((dx, x), g), st)| {
            let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
            backward_rows(x, g, w, st, dx, &mut dw, &mut db, accumulate);
            (dw, db)
        })
        .collect();
    let (dws, dbs): (Vec<Vec<f32>>, Vec<Vec<f32>>) = partials.into_iter().unzip();
    (sum_partials(&dws, d), sum_partials(&dbs, d))
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
        let (rows, _) = rows_and_width(l1, l2, l3)?;
        let mut y = output_vec(x.len());
        let mut stats = output_vec(2 * rows);
        forward_into(x, w, b, self.eps, &mut y, &mut stats);
        let _ = self.stats.set(tensor(stats, (rows, 2))?);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
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
        let x = cuda::view::<f32>(s1, l1, "layer-norm x")?;
        let w = cuda::view::<f32>(s2, l2, "layer-norm weight")?;
        let b = cuda::view::<f32>(s3, l3, "layer-norm bias")?;
        let (rows, d) = rows_and_width(l1, l2, l3)?;
        let dev = &s1.device;
        let y = cuda::alloc::<f32>(dev, x.len())?;
        let stats = cuda::alloc::<f32>(dev, 2 * rows)?;
        let (width, eps) = (d as i32, self.eps);
        launch!(
            dev,
            cuda::LAYER_NORM,
            "layer_norm_fwd_f32",
            cuda::per_row(rows, cuda::ROW_THREADS),
            &x,
            &w,
            &b,
            &y,
            &stats,
            &width,
            &eps
        );
        let _ = self.stats.set(cuda::tensor(stats, dev, (rows, 2)));
        Ok((cuda::storage(y, dev), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.stats.get() else {
            candle_core::bail!("layer-norm backward before its forward")
        };
        #[cfg(feature = "cuda")]
        if super::cuda::on_cuda(x) {
            return cuda_backward(x, w, g, stats).map(|(dx, dw, db)| (Some(dx), Some(dw), Some(db)));
        }
        with_slices([x, w, g, stats], "layer-norm backward", |[xs, ws, gs, st]| {
            let mut dx = output_vec(xs.len());
            let (dw, db) = backward_into(xs, gs, ws, st, &mut dx, false);
            Ok((
                Some(tensor(dx, x.shape().clone())?),
                Some(tensor(dw, w.shape().clone())?),
                Some(tensor(db, w.shape().clone())?),
            ))
        })
    }
}

/// The backward's kernels: dx (one block per row), then dgamma and dbeta by a
/// column reduction over the rows (partials per chunk of rows, added in order).
#[cfg(feature = "cuda")]
fn cuda_backward(x: &Tensor, w: &Tensor, g: &Tensor, stats: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    use super::cuda::{self, launch};
    cuda::with_views::<4, f32, _>([x, w, g, stats], "layer-norm backward", |dev, [xs, ws, gs, st]| {
        let d = ws.len().max(1);
        let rows = xs.len() / d;
        let dx = cuda::alloc::<f32>(dev, xs.len())?;
        let (r, width) = (rows as i32, d as i32);
        launch!(
            dev,
            cuda::LAYER_NORM,
            "layer_norm_bwd_dx_f32",
            cuda::per_row(rows, cuda::ROW_THREADS),
            &xs,
            &gs,
            &ws,
            &st,
            &dx,
            &width
        );
        let (cfg, chunks) = cuda::column_partial(rows, d);
        let (pw, pb) = (
            cuda::alloc::<f32>(dev, chunks * d)?,
            cuda::alloc::<f32>(dev, chunks * d)?,
        );
        launch!(
            dev,
            cuda::LAYER_NORM,
            "layer_norm_bwd_params_partial_f32",
            cfg,
            &xs,
            &gs,
            &st,
            &pw,
            &pb,
            &r,
            &width
        );
        Ok((
            cuda::tensor(dx, dev, x.shape().clone()),
            cuda::finish_columns(dev, &pw, chunks, d)?,
            cuda::finish_columns(dev, &pb, chunks, d)?,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{compare_with_reference, finite_difference_check, on_threads, seeded};

    #[test]
    fn layer_norm_matches_reference_and_finite_differences() -> Result<()> {
        for dims in [vec![1, 1, 7], vec![3, 197, 64], vec![2, 5, 192]] {
            let d = dims[2];
            let x = (seeded(&dims, 1, 2.0)? + 0.5)?;
            let inputs = [x, (seeded(&[d], 2, 0.5)? + 1.0)?, seeded(&[d], 3, 0.5)?];
            compare_with_reference("layer-norm", &inputs, &[0, 1, 2], 5e-5, |v| {
                layer_norm(&v[0], &v[1], &v[2], 1e-6)
            })?;
            for i in 0..3 {
                finite_difference_check("layer-norm", &inputs, i, &[0, d - 1], 2e-3, |t| {
                    layer_norm(&t[0], &t[1], &t[2], 1e-6)
                })?;
            }
        }
        Ok(())
    }

    /// A weight or bias of the wrong width is an error naming the shapes, not a panic.
    #[test]
    fn mismatched_widths_are_errors() -> Result<()> {
        let x = seeded(&[2, 3, 8], 1, 1.0)?;
        let (w7, b8) = (seeded(&[7], 2, 1.0)?, seeded(&[8], 3, 1.0)?);
        let err = layer_norm(&x, &w7, &b8, 1e-6).expect_err("width 7 for rows of 8");
        assert!(
            err.to_string().contains("layer-norm: x [2, 3, 8], weight 7, bias 8"),
            "{err}"
        );
        Ok(())
    }

    /// dgamma / dbeta sum over row blocks: the same bits on 1 and on 3 threads,
    /// and the scalar and AVX2 versions of the row loops agree bitwise.
    #[test]
    fn layer_norm_bits_do_not_depend_on_threads_or_simd() -> Result<()> {
        let x = Var::from_tensor(&seeded(&[7, 131, 48], 4, 1.0)?)?;
        let w = Var::from_tensor(&(seeded(&[48], 5, 0.3)? + 1.0)?)?;
        let b = Var::from_tensor(&seeded(&[48], 6, 0.3)?)?;
        let r = seeded(&[7, 131, 48], 7, 1.0)?;
        let run = |threads: usize| -> Result<Vec<Vec<u32>>> {
            on_threads(threads, || {
                let y = layer_norm(&x, &w, &b, 1e-6)?;
                let g = (&y * &r)?.sum_all()?.backward()?;
                [
                    y,
                    g.get(&x).cloned().expect("dx"),
                    g.get(&w).cloned().expect("dw"),
                    g.get(&b).cloned().expect("db"),
                ]
                .iter()
                .map(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect()))
                .collect()
            })
        };
        let one = run(1)?;
        assert_eq!(one, run(2)?, "layer-norm bits differ on 1 and 2 threads");
        assert_eq!(one, run(3)?, "layer-norm bits differ on 1 and 3 threads");
        let (xs, ws, bs) = (
            x.flatten_all()?.to_vec1::<f32>()?,
            w.to_vec1::<f32>()?,
            b.to_vec1::<f32>()?,
        );
        let rows = xs.len() / 48;
        let (mut y1, mut y2) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
        let (mut s1, mut s2) = (vec![0f32; 2 * rows], vec![0f32; 2 * rows]);
        forward_rows(&xs, &ws, &bs, 1e-6, &mut y1, &mut s1);
        forward_rows_scalar(&xs, &ws, &bs, 1e-6, &mut y2, &mut s2);
        assert!(y1.iter().zip(&y2).all(|(a, b)| a.to_bits() == b.to_bits()));
        let g = r.flatten_all()?.to_vec1::<f32>()?;
        let (mut d1, mut d2) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
        let (mut w1, mut w2, mut b1, mut b2) = (vec![0f32; 48], vec![0f32; 48], vec![0f32; 48], vec![0f32; 48]);
        backward_rows(&xs, &g, &ws, &s1, &mut d1, &mut w1, &mut b1, false);
        backward_rows_scalar(&xs, &g, &ws, &s1, &mut d2, &mut w2, &mut b2, false);
        assert!(d1
            .iter()
            .chain(&w1)
            .chain(&b1)
            .zip(d2.iter().chain(&w2).chain(&b2))
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        Ok(())
    }

    use candle_core::Var;
}
