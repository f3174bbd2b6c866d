//! The attention core, `softmax(q k^T * scale) v` for every head, as one op.
//!
//! The input is the qkv projection as it comes out of its Linear layer, (B, T, 3D)
//! with D = H d: q, k and v of head h are the (T, d) column blocks at `h d`,
//! `D + h d` and `2D + h d`, read through strides, so no q / k / v copies are made
//! (forward), and the backward writes dq, dk, dv straight into one (B, T, 3D)
//! gradient (no gradient scatter through candle's narrow / permute). The output
//! is (B, T, D), heads side by side: what the output projection takes.
//!
//! One rayon task per (sample, head). The forward keeps the logsumexp of each row
//! of scores (B, H, T), not the (T, T) probabilities; the backward recomputes
//! `P = exp(S * scale - lse)` from q and k (FlashAttention's recipe, and what a GPU
//! kernel wants: no (B, H, T, T) tensor is saved). With dO the output gradient:
//! dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)) scale, dQ = dS K, dK = dS^T Q.

use super::cpu::{exp, f32_slice, output_vec, tensor, with_slices};
use super::strided_product::Product;
use crate::model::autocast;
use crate::model::matmul::{gemm, gemm_ptr, Init, Mat, SendPtr};
use crate::simd::multiversion;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Multi-head attention on packed `qkv (B, T, 3 H d)` -> (B, T, H d).
pub fn attention(qkv: &Tensor, num_heads: usize, scale: f64) -> Result<Tensor> {
    let (b, t, three_d) = qkv.dims3()?;
    if num_heads == 0 || three_d % (3 * num_heads) != 0 {
        candle_core::bail!("attention: qkv width {three_d} is not 3 x {num_heads} heads")
    }
    #[cfg(feature = "cuda")]
    if super::fused(qkv) && qkv.device().is_cuda() {
        autocast::add_flops(4 * (b * t * t * (three_d / 3)) as u64);
        let op = Attention {
            core: Core {
                heads: num_heads,
                scale: scale as f32,
            },
            lse: OnceLock::new(),
        };
        // The products at this thread's precision: under bf16, bf16 operands, f32
        // accumulation, f32 scores and dP, bf16 P and dS; f32 again at the output.
        let dtype = autocast::gemm_dtype();
        return qkv.contiguous()?.to_dtype(dtype)?.apply_op1(op)?.to_dtype(DType::F32);
    }
    if super::fused(qkv) && autocast::gemm_dtype() == DType::F32 {
        let d = three_d / 3;
        autocast::add_flops(4 * (b * t * t * d) as u64);
        let op = Attention {
            core: Core {
                heads: num_heads,
                scale: scale as f32,
            },
            lse: OnceLock::new(),
        };
        qkv.contiguous()?.apply_op1(op)
    } else {
        attention_reference(qkv, num_heads, scale)
    }
}

/// The basic-op twin: timm's layout and candle's differentiable softmax.
pub fn attention_reference(qkv: &Tensor, num_heads: usize, scale: f64) -> Result<Tensor> {
    let (b, t, three_d) = qkv.dims3()?;
    let (h, d) = (num_heads, three_d / 3);
    // (B, T, 3D) -> (3, B, H, T, D/H).
    let qkv = qkv.reshape((b, t, 3, h, d / h))?.permute((2, 0, 3, 1, 4))?;
    let q = (qkv.get(0)?.contiguous()? * scale)?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let scores = autocast::gemm(&q, &k.t()?, |a, b| a.matmul(b))?;
    let attn = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?;
    autocast::gemm(&attn, &v, |a, b| a.matmul(b))?
        .transpose(1, 2)?
        .reshape((b, t, d))
}

struct Attention {
    core: Core,
    /// (B, H, T): logsumexp of each row of scaled scores, set by the forward.
    lse: OnceLock<Tensor>,
}

/// The heads and the score scale: what the slice-level kernels need (also run
/// inside the fused transformer block, `block.rs`).
pub(crate) struct Core {
    pub(crate) heads: usize,
    pub(crate) scale: f32,
}

/// Where head h of sample b lives in packed qkv (B, T, 3D).
struct HeadView {
    t: usize,
    d: usize,
    hd: usize,
    /// Offset of sample b's first row.
    row0: usize,
    /// Offset of the head's columns.
    col: usize,
}

impl HeadView {
    fn q<'a>(&self, qkv: &'a [f32]) -> Mat<'a> {
        Mat::rows(qkv, self.row0 + self.col, 3 * self.d)
    }
    fn k<'a>(&self, qkv: &'a [f32]) -> Mat<'a> {
        Mat::rows(qkv, self.row0 + self.d + self.col, 3 * self.d)
    }
    fn k_t<'a>(&self, qkv: &'a [f32]) -> Mat<'a> {
        Mat::cols(qkv, self.row0 + self.d + self.col, 3 * self.d)
    }
    fn v<'a>(&self, qkv: &'a [f32]) -> Mat<'a> {
        Mat::rows(qkv, self.row0 + 2 * self.d + self.col, 3 * self.d)
    }
    fn v_t<'a>(&self, qkv: &'a [f32]) -> Mat<'a> {
        Mat::cols(qkv, self.row0 + 2 * self.d + self.col, 3 * self.d)
    }
}

impl Core {
    fn view(&self, t: usize, d: usize, task: usize) -> HeadView {
        let (b, h) = (task / self.heads, task % self.heads);
        let hd = d / self.heads;
        HeadView {
            t,
            d,
            hd,
            row0: b * t * 3 * d,
            col: h * hd,
        }
    }

    /// Scores S = q k^T of one head into `s` (T, T).
    fn scores(&self, qkv: &[f32], hv: &HeadView, s: &mut [f32]) {
        gemm(hv.t, hv.t, hv.hd, hv.q(qkv), hv.k_t(qkv), s, hv.t, Init::Zero, false);
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "crossmae-attention"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(st, l, "attention qkv")?;
        let (b, t, three_d) = l.shape().dims3()?;
        let d = three_d / 3;
        let mut out = output_vec(b * t * d);
        let mut lse = output_vec(b * self.core.heads * t);
        self.core.forward_into(qkv, t, d, &mut out, &mut lse);
        let _ = self.lse.set(tensor(lse, (b, self.core.heads, t))?);
        Ok((CpuStorage::F32(out), Shape::from((b, t, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage as _;
        match s.dtype() {
            DType::F32 => self.cuda_forward::<f32>(s, l, "f32"),
            DType::BF16 => self.cuda_forward::<half::bf16>(s, l, "bf16"),
            other => candle_core::bail!("attention: qkv in {other:?}, kernels for f32 and bf16"),
        }
    }

    fn bwd(&self, qkv: &Tensor, out: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let Some(lse) = self.lse.get() else {
            candle_core::bail!("attention backward before its forward")
        };
        #[cfg(feature = "cuda")]
        if super::cuda::on_cuda(qkv) {
            return match qkv.dtype() {
                DType::F32 => self.cuda_backward::<f32>(qkv, g, lse, "f32"),
                DType::BF16 => self.cuda_backward::<half::bf16>(qkv, g, lse, "bf16"),
                other => candle_core::bail!("attention backward: qkv in {other:?}"),
            }
            .map(Some);
        }
        let (b, t, three_d) = qkv.dims3()?;
        with_slices([qkv, out, g, lse], "attention backward", |[qkv, out, g, lse]| {
            let mut dqkv = output_vec(b * t * three_d);
            self.core.backward_into(qkv, out, g, lse, t, three_d / 3, &mut dqkv);
            Ok(Some(tensor(dqkv, (b, t, three_d))?))
        })
    }
}

/// The attention core's products on the packed buffers, for one head: what the CUDA
/// side runs on cuBLAS, batched over the samples. Buffers: qkv and dqkv (B, T, 3D),
/// out and its gradient (B, T, D), scores, probabilities and their gradients
/// (B, H, T, T). A row-major (T, d) block with row stride 3D is, to column-major
/// cuBLAS, its transpose; so with S = q k^T each product is written transposed.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct HeadProducts {
    /// S^T = k q^T (qkv, qkv -> scores).
    pub(crate) scores: Product,
    /// O^T = v^T P^T (qkv, probabilities -> out).
    pub(crate) out: Product,
    /// dP^T = v dO^T (qkv, d out -> d probabilities).
    pub(crate) d_probs: Product,
    /// dV^T = dO^T P (d out, probabilities -> dqkv).
    pub(crate) dv: Product,
    /// dQ^T = k^T dS^T (qkv, d scores -> dqkv); dS includes the scale.
    pub(crate) dq: Product,
    /// dK^T = q^T dS (qkv, d scores -> dqkv).
    pub(crate) dk: Product,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl HeadProducts {
    pub(crate) fn new(b: usize, t: usize, d: usize, heads: usize, head: usize) -> Self {
        let hd = d / heads;
        let (q, k, v) = (head * hd, d + head * hd, 2 * d + head * hd);
        let packed = (3 * d, t * 3 * d);
        let rows_of_d = (d, t * d);
        let (scores_at, square) = (head * t * t, (t, heads * t * t));
        Self {
            scores: Product::new(true, false, t, t, hd, b)
                .a(k, packed)
                .b(q, packed)
                .c(scores_at, square),
            out: Product::new(false, false, hd, t, t, b)
                .a(v, packed)
                .b(scores_at, square)
                .c(head * hd, rows_of_d),
            d_probs: Product::new(true, false, t, t, hd, b)
                .a(v, packed)
                .b(head * hd, rows_of_d)
                .c(scores_at, square),
            dv: Product::new(false, true, hd, t, t, b)
                .a(head * hd, rows_of_d)
                .b(scores_at, square)
                .c(v, packed),
            dq: Product::new(false, false, hd, t, t, b)
                .a(k, packed)
                .b(scores_at, square)
                .c(q, packed),
            dk: Product::new(false, true, hd, t, t, b)
                .a(q, packed)
                .b(scores_at, square)
                .c(k, packed),
        }
    }
}

/// The CUDA side: per head the [`HeadProducts`] on cuBLAS, between them the row
/// kernels of attention.cu. The scores (B, H, T, T) live only inside the forward and
/// inside the backward, which recomputes P from the saved logsumexp.
#[cfg(feature = "cuda")]
impl Attention {
    fn cuda_forward<T: super::cuda::Scalar>(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        suffix: &str,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, launch};
        let qkv = cuda::view::<T>(s, l, "attention qkv")?;
        let (b, t, three_d) = l.shape().dims3()?;
        let (d, h) = (three_d / 3, self.core.heads);
        let dev = &s.device;
        let heads: Vec<HeadProducts> = (0..h).map(|head| HeadProducts::new(b, t, d, h, head)).collect();
        // f32 scores (as FlashAttention keeps them), P in T for the next product.
        let mut scores = cuda::alloc::<f32>(dev, b * h * t * t)?;
        let probs = cuda::alloc::<T>(dev, b * h * t * t)?;
        let mut out = cuda::alloc::<T>(dev, b * t * d)?;
        let lse = cuda::alloc::<f32>(dev, b * h * t)?;
        for p in &heads {
            p.scores.run_to_f32(dev, &qkv, &qkv, &mut scores)?;
        }
        let (n, scale) = (t as i32, self.core.scale);
        let softmax = format!("attention_softmax_fwd_{suffix}");
        let rows = cuda::per_row(b * h * t, cuda::ROW_THREADS);
        launch!(dev, cuda::ATTENTION, &softmax, rows, &scores, &probs, &lse, &n, &scale);
        drop(scores);
        let probs_v = probs.slice(..);
        for p in &heads {
            p.out.run(dev, &qkv, &probs_v, &mut out)?;
        }
        let _ = self.lse.set(cuda::tensor(lse, dev, (b, h, t)));
        Ok((cuda::storage(out, dev), Shape::from((b, t, d))))
    }

    fn cuda_backward<T: super::cuda::Scalar>(
        &self,
        qkv: &Tensor,
        g: &Tensor,
        lse: &Tensor,
        suffix: &str,
    ) -> Result<Tensor> {
        use super::cuda::{self, launch};
        let (b, t, three_d) = qkv.dims3()?;
        let (d, h) = (three_d / 3, self.core.heads);
        let heads: Vec<HeadProducts> = (0..h).map(|head| HeadProducts::new(b, t, d, h, head)).collect();
        cuda::with_views::<1, f32, _>([lse], "attention backward", |_, [lse]| {
            cuda::with_views::<2, T, _>([qkv, g], "attention backward", |dev, [qkv_v, g_v]| {
                // f32 scores and dP (as in the forward), P and dS in T for the products.
                let mut scores = cuda::alloc::<f32>(dev, b * h * t * t)?;
                let probs = cuda::alloc::<T>(dev, b * h * t * t)?;
                let ds = cuda::alloc::<T>(dev, b * h * t * t)?;
                let mut dqkv = cuda::alloc::<T>(dev, b * t * three_d)?;
                for p in &heads {
                    p.scores.run_to_f32(dev, &qkv_v, &qkv_v, &mut scores)?;
                }
                let (total, n, scale) = (b * h * t * t, t as i32, self.core.scale);
                let from_lse = format!("attention_softmax_from_lse_{suffix}");
                let cfg = cuda::elementwise(total);
                launch!(
                    dev,
                    cuda::ATTENTION,
                    &from_lse,
                    cfg,
                    &scores,
                    &probs,
                    &lse,
                    &total,
                    &n,
                    &scale
                );
                // dP into the scores' buffer: they are not needed again.
                let mut dp = scores;
                for p in &heads {
                    p.d_probs.run_to_f32(dev, &qkv_v, &g_v, &mut dp)?;
                }
                let softmax_bwd = format!("attention_softmax_bwd_{suffix}");
                let rows = cuda::per_row(b * h * t, cuda::ROW_THREADS);
                launch!(dev, cuda::ATTENTION, &softmax_bwd, rows, &probs, &dp, &ds, &n, &scale);
                drop(dp);
                let (p_v, ds_v) = (probs.slice(..), ds.slice(..));
                for p in &heads {
                    p.dv.run(dev, &g_v, &p_v, &mut dqkv)?;
                    p.dq.run(dev, &qkv_v, &ds_v, &mut dqkv)?;
                    p.dk.run(dev, &qkv_v, &ds_v, &mut dqkv)?;
                }
                Ok(cuda::tensor(dqkv, dev, (b, t, three_d)))
            })
        })
    }
}

impl Core {
    /// The forward on slices: packed `qkv` (B, T, 3D) into `out` (B, T, D) and the
    /// logsumexp of every row of scores into `lse` (B, H, T).
    pub(crate) fn forward_into(&self, qkv: &[f32], t: usize, d: usize, out: &mut [f32], lse: &mut [f32]) {
        let out_ptr = SendPtr(out.as_mut_ptr());
        lse.par_chunks_mut(t.max(1)).enumerate().for_each(|(task, lse)| {
            let hv = self.view(t, d, task);
            let mut p = output_vec(t * t);
            self.scores(qkv, &hv, &mut p);
            softmax_rows(&mut p, t, self.scale, lse);
            let o_off = (task / self.heads) * t * d + hv.col;
            // SAFETY: this task alone writes the head's (T, d) column block of `out`.
            unsafe {
                let out_ptr = out_ptr;
                gemm_ptr(
                    t,
                    hv.hd,
                    t,
                    Mat::rows(&p, 0, t),
                    hv.v(qkv),
                    out_ptr.get().add(o_off),
                    d,
                    Init::Zero,
                    false,
                )
            };
        });
    }

    /// The backward on slices: from qkv, the forward's `out` and `lse`, and the
    /// output gradient `g`, writes every element of `dqkv` (B, T, 3D).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward_into(
        &self,
        qkv: &[f32],
        out: &[f32],
        g: &[f32],
        lse: &[f32],
        t: usize,
        d: usize,
        dqkv: &mut [f32],
    ) {
        let three_d = 3 * d;
        let dptr = SendPtr(dqkv.as_mut_ptr());
        lse.par_chunks(t.max(1)).enumerate().for_each(|(task, lse)| {
            let hv = self.view(t, d, task);
            let o_off = (task / self.heads) * t * d + hv.col;
            let d_o = Mat::rows(g, o_off, d);
            let mut p = output_vec(t * t);
            self.scores(qkv, &hv, &mut p);
            probabilities(&mut p, t, self.scale, lse);
            let dptr = dptr;
            // SAFETY (the three writes below): this task alone writes head h's dq, dk
            // and dv column blocks of sample b in dqkv.
            unsafe {
                let dv = dptr.get().add(hv.row0 + 2 * d + hv.col);
                gemm_ptr(t, hv.hd, t, Mat::cols(&p, 0, t), d_o, dv, three_d, Init::Zero, false);
            }
            let mut ds = output_vec(t * t);
            gemm(t, t, hv.hd, d_o, hv.v_t(qkv), &mut ds, t, Init::Zero, false);
            softmax_backward_rows(&mut ds, &p, t, g, out, o_off, d, hv.hd, self.scale);
            unsafe {
                let dq = dptr.get().add(hv.row0 + hv.col);
                gemm_ptr(
                    t,
                    hv.hd,
                    t,
                    Mat::rows(&ds, 0, t),
                    hv.k(qkv),
                    dq,
                    three_d,
                    Init::Zero,
                    false,
                );
                let dk = dptr.get().add(hv.row0 + d + hv.col);
                gemm_ptr(
                    t,
                    hv.hd,
                    t,
                    Mat::cols(&ds, 0, t),
                    hv.q(qkv),
                    dk,
                    three_d,
                    Init::Zero,
                    false,
                );
            }
        });
    }
}

multiversion! {
    /// Rows (width t) of scores -> their softmax of `row * scale` in place, and each row's logsumexp.
    fn softmax_rows / softmax_rows_scalar(p: &mut [f32], t: usize, scale: f32, lse: &mut [f32]) {
        for (row, l) in p.chunks_exact_mut(t).zip(lse.iter_mut()) {
            *l = softmax_row(row, scale);
        }
    }
}

multiversion! {
    /// Rows of scores -> the probabilities `exp(S * scale - lse)` again, in place.
    fn probabilities / probabilities_scalar(p: &mut [f32], t: usize, scale: f32, lse: &[f32]) {
        for (row, &l) in p.chunks_exact_mut(t).zip(lse) {
            for s in row.iter_mut() {
                *s = exp(*s * scale - l);
            }
        }
    }
}

/// Row of scores -> its softmax of `row * scale`, in place; returns the logsumexp.
/// Sums run in 8 lanes (element i into lane i % 8), added in a fixed order: the
/// loops vectorize without reassociating anything.
#[inline(always)]
fn softmax_row(row: &mut [f32], scale: f32) -> f32 {
    let (chunks, tail) = row.as_chunks_mut::<8>();
    let mut m = [f32::NEG_INFINITY; 8];
    for c in chunks.iter_mut() {
        for i in 0..8 {
            c[i] *= scale;
            m[i] = m[i].max(c[i]);
        }
    }
    for (i, s) in tail.iter_mut().enumerate() {
        *s *= scale;
        m[i] = m[i].max(*s);
    }
    let max = m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut acc = [0f32; 8];
    for c in chunks.iter_mut() {
        for i in 0..8 {
            c[i] = exp(c[i] - max);
            acc[i] += c[i];
        }
    }
    for (i, s) in tail.iter_mut().enumerate() {
        *s = exp(*s - max);
        acc[i] += *s;
    }
    let sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    let inv = 1.0 / sum;
    for s in row.iter_mut() {
        *s *= inv;
    }
    max + sum.ln()
}

multiversion! {
    /// dS = P (dP - rowsum(dO O)) scale, in place on `ds` (which holds dP = dO V^T),
    /// rows of width t; dO and O rows (width hd) at `o_off + i * ld`.
    #[allow(clippy::too_many_arguments)]
    fn softmax_backward_rows / softmax_backward_rows_scalar(ds: &mut [f32], p: &[f32], t: usize, g: &[f32], out: &[f32], o_off: usize, ld: usize, hd: usize, scale: f32) {
        for (i, (dsr, pr)) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
            let (go, o) = (&g[o_off + i * ld..][..hd], &out[o_off + i * ld..][..hd]);
            let mut acc = [0f32; 8];
            let (gc, gt) = go.as_chunks::<8>();
            let (oc, ot) = o.as_chunks::<8>();
            for (a, b) in gc.iter().zip(oc) {
                for l in 0..8 {
                    acc[l] += a[l] * b[l];
                }
            }
            for (l, (a, b)) in gt.iter().zip(ot).enumerate() {
                acc[l] += a * b;
            }
            let di = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
            for (s, &pv) in dsr.iter_mut().zip(pr) {
                *s = pv * (*s - di) * scale;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{compare_with_reference, finite_difference_check, on_threads, seeded};

    /// The CUDA side's product list ([`HeadProducts`]) run through the cuBLAS
    /// interpreter, with the row kernels' arithmetic (softmax with the scale and the
    /// logsumexp; P again from the logsumexp; dS = scale P (dP - rowsum(P dP))) in
    /// between: the value and the qkv gradient of the basic-op attention, and every
    /// element of dqkv written. So the layout algebra is checked without a GPU.
    #[test]
    fn the_cuda_product_list_computes_attention() -> Result<()> {
        for (b, t, heads, hd) in [(2, 7, 3, 4), (1, 197, 2, 8)] {
            let d = heads * hd;
            let scale = 1.0 / (hd as f64).sqrt();
            let qkv = candle_core::Var::from_tensor(&seeded(&[b, t, 3 * d], 1, 1.0)?)?;
            let g = seeded(&[b, t, d], 2, 1.0)?;
            let want = attention_reference(&qkv, heads, scale)?;
            let want_grad = (&want * &g)?.sum_all()?.backward()?;
            let want_grad = want_grad.get(&qkv).expect("dqkv");
            let (q, gv) = (qkv.flatten_all()?.to_vec1::<f32>()?, g.flatten_all()?.to_vec1::<f32>()?);
            let list: Vec<HeadProducts> = (0..heads).map(|h| HeadProducts::new(b, t, d, heads, h)).collect();
            let sc = scale as f32;
            // Forward: scores, softmax rows (+ logsumexp), out.
            let mut probs = vec![f32::NAN; b * heads * t * t];
            for p in &list {
                p.scores.run_reference(&q, &q, &mut probs)?;
            }
            let scores = probs.clone();
            let mut lse = vec![0f32; b * heads * t];
            for (row, l) in probs.chunks_mut(t).zip(lse.iter_mut()) {
                let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * sc));
                let z: f32 = row.iter().map(|&v| (v * sc - m).exp()).sum();
                row.iter_mut().for_each(|v| *v = (*v * sc - m).exp() / z);
                *l = m + z.ln();
            }
            let mut out = vec![f32::NAN; b * t * d];
            for p in &list {
                p.out.run_reference(&q, &probs, &mut out)?;
            }
            let out = Tensor::from_vec(out, (b, t, d), &candle_core::Device::Cpu)?;
            assert!(
                crate::model::ops::tests::max_abs_diff(&out, &want) < 1e-5,
                "value, t {t}"
            );
            // Backward: P from the logsumexp, dP, dS, then dV, dQ, dK into one dqkv.
            let p2: Vec<f32> = scores
                .iter()
                .enumerate()
                .map(|(i, &v)| (v * sc - lse[i / t]).exp())
                .collect();
            let mut ds = vec![f32::NAN; b * heads * t * t];
            for p in &list {
                p.d_probs.run_reference(&q, &gv, &mut ds)?;
            }
            for (dr, pr) in ds.chunks_mut(t).zip(p2.chunks(t)) {
                let delta: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                dr.iter_mut().zip(pr).for_each(|(x, &p)| *x = sc * p * (*x - delta));
            }
            let mut dqkv = vec![f32::NAN; b * t * 3 * d];
            for p in &list {
                p.dv.run_reference(&gv, &p2, &mut dqkv)?;
                p.dq.run_reference(&q, &ds, &mut dqkv)?;
                p.dk.run_reference(&q, &ds, &mut dqkv)?;
            }
            assert!(dqkv.iter().all(|v| v.is_finite()), "every element of dqkv is written");
            let dqkv = Tensor::from_vec(dqkv, (b, t, 3 * d), &candle_core::Device::Cpu)?;
            let e = crate::model::ops::tests::max_abs_diff(&dqkv, want_grad);
            assert!(e < 1e-5, "dqkv differs by {e}, t {t}");
        }
        Ok(())
    }

    /// Values and the gradient of packed qkv against the composition, and central
    /// differences; N = 197 with d = 64 (ViT at 224 px), odd T, batch 1.
    #[test]
    fn attention_matches_reference_and_finite_differences() -> Result<()> {
        for (b, t, heads, hd) in [(1, 197, 2, 64), (3, 50, 3, 8), (2, 7, 1, 5)] {
            let d = heads * hd;
            let scale = 1.0 / (hd as f64).sqrt();
            let inputs = [seeded(&[b, t, 3 * d], 1, 1.0)?];
            compare_with_reference("attention", &inputs, &[0], 2e-5, |v| attention(&v[0], heads, scale))?;
            let last = b * t * 3 * d - 1;
            finite_difference_check("attention", &inputs, 0, &[0, hd, d + 1, 2 * d + 3, last], 2e-3, |x| {
                attention(&x[0], heads, scale)
            })?;
        }
        Ok(())
    }

    #[test]
    fn attention_bits_do_not_depend_on_threads() -> Result<()> {
        let x = candle_core::Var::from_tensor(&seeded(&[3, 41, 3 * 24], 2, 1.0)?)?;
        let r = seeded(&[3, 41, 24], 3, 1.0)?;
        let run = |threads: usize| -> Result<(Vec<f32>, Vec<f32>)> {
            on_threads(threads, || {
                let y = attention(&x, 3, 0.3)?;
                let g = (&y * &r)?.sum_all()?.backward()?;
                Ok((
                    y.flatten_all()?.to_vec1()?,
                    g.get(&x).expect("grad").flatten_all()?.to_vec1()?,
                ))
            })
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let a = run(1)?;
        for threads in [2, 3] {
            let b = run(threads)?;
            assert_eq!(bits(&a.0), bits(&b.0), "attention values on 1 and {threads} threads");
            assert_eq!(bits(&a.1), bits(&b.1), "attention gradient on 1 and {threads} threads");
        }
        Ok(())
    }
}
