//! A 2-D f32 matmul for the CPU with a backward pass, for the Linear layers.
//!
//! Why: on the 2-core AVX2 machine the `gemm` crate behind candle's CPU matmul
//! reaches about 20 GFLOP/s per core on our shapes (3200 x 192 x 768), a third
//! of OpenBLAS; this BLIS-style loop nest (packed A and B panels, a 6 x 16
//! AVX2/FMA register kernel) reaches about 60. It is used only for 2-D f32 CPU
//! tensors on x86-64 with AVX2 and FMA; everything else goes to candle's matmul.
//!
//! Every element of C is summed by one thread in a fixed k order, so results do
//! not depend on the thread count. A test compares it with candle's matmul,
//! values and gradients, on odd sizes and transposed (strided) operands.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `a (m, k) @ b (k, n)` with a backward pass; any strides. Runs at the thread's
/// precision (see [`super::autocast`]): this kernel only for f32 CPU products.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    super::autocast::gemm(a, b, |a, b| {
        if a.rank() == 2 && b.rank() == 2 && a.device().is_cpu() && a.dtype() == candle_core::DType::F32 && available()
        {
            a.apply_op2(b, MatMul)
        } else {
            a.matmul(b)
        }
    })
}

/// Whether the fast kernel can run here.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

struct MatMul;

/// (start offset, row stride, column stride) of a 2-D layout.
fn strides2(l: &Layout) -> (usize, usize, usize) {
    let s = l.stride();
    (l.start_offset(), s[0], s[1])
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "crossmae-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("matmul: f32 only, got {:?} and {:?}", s1.dtype(), s2.dtype())
        };
        let (m, k) = (l1.dims()[0], l1.dims()[1]);
        let (k2, n) = (l2.dims()[0], l2.dims()[1]);
        if k != k2 {
            candle_core::bail!("matmul: shapes {:?} and {:?} do not chain", l1.dims(), l2.dims())
        }
        let mut c = vec![0f32; m * n];
        if m > 0 && n > 0 && k > 0 {
            #[cfg(target_arch = "x86_64")]
            {
                let (ao, ars, acs) = strides2(l1);
                let (bo, brs, bcs) = strides2(l2);
                let a = Operand {
                    data: a,
                    off: ao,
                    rs: ars,
                    cs: acs,
                };
                let b = Operand {
                    data: b,
                    off: bo,
                    rs: brs,
                    cs: bcs,
                };
                x86::gemm_threads(m, n, k, &a, &b, &mut c);
            }
        }
        Ok((CpuStorage::F32(c), Shape::from((m, n))))
    }

    /// dA = g b^T, dB = a^T g.
    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.detach();
        let da = g.apply_op2_no_bwd(&b.detach().t()?, &MatMul)?;
        let db = a.detach().t()?.apply_op2_no_bwd(&g, &MatMul)?;
        Ok((Some(da), Some(db)))
    }
}

/// A strided 2-D view: element (i, j) is `data[off + i * rs + j * cs]`.
#[allow(dead_code)]
struct Operand<'a> {
    data: &'a [f32],
    off: usize,
    rs: usize,
    cs: usize,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Operand;
    use std::arch::x86_64::*;

    const MR: usize = 6;
    const NR: usize = 16;
    const KC: usize = 256;
    const MC: usize = 72;
    const NC: usize = 1024;

    /// C (m, n) row-major = A B, the columns of C split over candle's thread count.
    pub(super) fn gemm_threads(m: usize, n: usize, k: usize, a: &Operand, b: &Operand, c: &mut [f32]) {
        let threads = candle_core::utils::get_num_threads().max(1);
        let work = m * n * k;
        assert_eq!(c.len(), m * n, "matmul output size");
        let c_ptr = SendPtr(c.as_mut_ptr());
        if threads == 1 || work < 1 << 21 {
            // SAFETY: c holds m * n values; this call alone writes them.
            unsafe { gemm(m, 0, n, k, a, b, &c_ptr, 0, n) };
            return;
        }
        // Split the longer side into NR / MR aligned chunks, one per thread;
        // each thread writes a disjoint block of C through the raw pointer.
        std::thread::scope(|s| {
            let c_ptr = &c_ptr;
            if n >= m {
                let per = n.div_ceil(threads).div_ceil(NR) * NR;
                for j0 in (0..n).step_by(per) {
                    let cols = per.min(n - j0);
                    // SAFETY: columns [j0, j0 + cols) of C are this thread's only.
                    s.spawn(move || unsafe { gemm(m, j0, cols, k, a, b, c_ptr, 0, n) });
                }
            } else {
                let per = m.div_ceil(threads).div_ceil(MR) * MR;
                for i0 in (0..m).step_by(per) {
                    let rows = per.min(m - i0);
                    let a = Operand {
                        data: a.data,
                        off: a.off + i0 * a.rs,
                        rs: a.rs,
                        cs: a.cs,
                    };
                    // SAFETY: rows [i0, i0 + rows) of C are this thread's only.
                    s.spawn(move || unsafe { gemm(rows, 0, n, k, &a, b, c_ptr, i0 * n, n) });
                }
            }
        });
    }

    struct SendPtr(*mut f32);
    // SAFETY: only used to hand disjoint column ranges of one buffer to scoped threads.
    unsafe impl Sync for SendPtr {}
    unsafe impl Send for SendPtr {}

    /// C[c_off.., j0..j0+n] (row stride ldc) += A (m, k) B[:, j0..j0+n].
    ///
    /// # Safety
    /// `c` must point to at least `c_off + m * ldc` values, of which the caller
    /// owns rows 0..m, columns j0..j0+n (relative to `c_off`).
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        j0: usize,
        n: usize,
        k: usize,
        a: &Operand,
        b: &Operand,
        c: &SendPtr,
        c_off: usize,
        ldc: usize,
    ) {
        let mut bp = vec![0f32; KC * NC];
        let mut ap = vec![0f32; MC * KC];
        let mut tmp = [0f32; MR * NR];
        let (ad, bd) = (a.data.as_ptr(), b.data.as_ptr());
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            let np = nc.div_ceil(NR);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                // Pack B[pc.., j0+jc..] into np panels of kc x NR, zero-padded.
                bp[..np * kc * NR].fill(0.0);
                for p in 0..np {
                    let panel = bp.as_mut_ptr().add(p * kc * NR);
                    let cols = NR.min(nc - p * NR);
                    let src = bd.add(b.off + pc * b.rs + (j0 + jc + p * NR) * b.cs);
                    // Walk the operand in its memory order (B^T views have rs = 1).
                    if b.rs < b.cs {
                        for jj in 0..cols {
                            let col = src.add(jj * b.cs);
                            for kk in 0..kc {
                                *panel.add(kk * NR + jj) = *col.add(kk * b.rs);
                            }
                        }
                    } else {
                        for kk in 0..kc {
                            let (dst, row) = (panel.add(kk * NR), src.add(kk * b.rs));
                            for jj in 0..cols {
                                *dst.add(jj) = *row.add(jj * b.cs);
                            }
                        }
                    }
                }
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    let mp = mc.div_ceil(MR);
                    // Pack A[ic.., pc..] into mp panels of kc x MR, zero-padded.
                    ap[..mp * kc * MR].fill(0.0);
                    for p in 0..mp {
                        let panel = ap.as_mut_ptr().add(p * kc * MR);
                        let rows = MR.min(mc - p * MR);
                        let src = ad.add(a.off + (ic + p * MR) * a.rs + pc * a.cs);
                        if a.rs < a.cs {
                            for kk in 0..kc {
                                let (dst, col) = (panel.add(kk * MR), src.add(kk * a.cs));
                                for i in 0..rows {
                                    *dst.add(i) = *col.add(i * a.rs);
                                }
                            }
                        } else {
                            for i in 0..rows {
                                let row = src.add(i * a.rs);
                                for kk in 0..kc {
                                    *panel.add(kk * MR + i) = *row.add(kk * a.cs);
                                }
                            }
                        }
                    }
                    for pj in 0..np {
                        let cols = NR.min(nc - pj * NR);
                        for pi in 0..mp {
                            let rows = MR.min(mc - pi * MR);
                            let c0 = c.0.add(c_off + (ic + pi * MR) * ldc + j0 + jc + pj * NR);
                            let (pa, pb) = (ap.as_ptr().add(pi * kc * MR), bp.as_ptr().add(pj * kc * NR));
                            if rows == MR && cols == NR {
                                kernel(kc, pa, pb, c0, ldc);
                            } else {
                                // Edge tile: accumulate into a zeroed scratch tile, add what fits.
                                tmp.fill(0.0);
                                kernel(kc, pa, pb, tmp.as_mut_ptr(), NR);
                                for i in 0..rows {
                                    for jj in 0..cols {
                                        *c0.add(i * ldc + jj) += tmp[i * NR + jj];
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// C (MR x NR, row stride ldc) += A panel (kc x MR)^T B panel (kc x NR), in 12 AVX registers.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
        let z = _mm256_setzero_ps();
        let (mut c00, mut c01, mut c10, mut c11, mut c20, mut c21) = (z, z, z, z, z, z);
        let (mut c30, mut c31, mut c40, mut c41, mut c50, mut c51) = (z, z, z, z, z, z);
        for kk in 0..kc {
            let b0 = _mm256_loadu_ps(b.add(kk * NR));
            let b1 = _mm256_loadu_ps(b.add(kk * NR + 8));
            let ak = a.add(kk * MR);
            let x = _mm256_broadcast_ss(&*ak);
            c00 = _mm256_fmadd_ps(x, b0, c00);
            c01 = _mm256_fmadd_ps(x, b1, c01);
            let x = _mm256_broadcast_ss(&*ak.add(1));
            c10 = _mm256_fmadd_ps(x, b0, c10);
            c11 = _mm256_fmadd_ps(x, b1, c11);
            let x = _mm256_broadcast_ss(&*ak.add(2));
            c20 = _mm256_fmadd_ps(x, b0, c20);
            c21 = _mm256_fmadd_ps(x, b1, c21);
            let x = _mm256_broadcast_ss(&*ak.add(3));
            c30 = _mm256_fmadd_ps(x, b0, c30);
            c31 = _mm256_fmadd_ps(x, b1, c31);
            let x = _mm256_broadcast_ss(&*ak.add(4));
            c40 = _mm256_fmadd_ps(x, b0, c40);
            c41 = _mm256_fmadd_ps(x, b1, c41);
            let x = _mm256_broadcast_ss(&*ak.add(5));
            c50 = _mm256_fmadd_ps(x, b0, c50);
            c51 = _mm256_fmadd_ps(x, b1, c51);
        }
        for (i, (lo, hi)) in [(c00, c01), (c10, c11), (c20, c21), (c30, c31), (c40, c41), (c50, c51)]
            .into_iter()
            .enumerate()
        {
            let row = c.add(i * ldc);
            _mm256_storeu_ps(row, _mm256_add_ps(_mm256_loadu_ps(row), lo));
            _mm256_storeu_ps(row.add(8), _mm256_add_ps(_mm256_loadu_ps(row.add(8)), hi));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::max_abs_diff;
    use candle_core::{Device, Var};

    /// Odd sizes (partial MR/NR tiles, several KC and NC blocks, both thread splits)
    /// and transposed operands, against candle's matmul; values and gradients.
    #[test]
    fn matches_candle_matmul_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (m, k, n) in [
            (1, 1, 1),
            (7, 5, 3),
            (13, 300, 37),
            (200, 70, 600),
            (600, 70, 200),
            (5, 513, 17),
        ] {
            let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, k), &dev)?)?;
            let bt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, k), &dev)?)?;
            let w = Tensor::randn(0f32, 1.0, (m, n), &dev)?;
            let want = a.matmul(&bt.t()?)?;
            let got = matmul(&a, &bt.t()?)?;
            let tol = 1e-5 * (k as f32).sqrt() * 4.0;
            assert!(
                max_abs_diff(&want, &got) < tol,
                "{m}x{k}x{n}: {}",
                max_abs_diff(&want, &got)
            );
            let g_want = (want * &w)?.sum_all()?.backward()?;
            let g_got = (got * &w)?.sum_all()?.backward()?;
            for v in [&a, &bt] {
                let (x, y) = (g_want.get(v).expect("grad"), g_got.get(v).expect("grad"));
                let tol = 1e-5 * ((m.max(n)) as f32).sqrt() * 4.0;
                assert!(max_abs_diff(x, y) < tol, "{m}x{k}x{n} grad: {}", max_abs_diff(x, y));
            }
        }
        Ok(())
    }
}
