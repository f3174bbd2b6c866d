//! A strided-batched matrix product as cuBLAS takes it (`cublasSgemmStridedBatched`):
//! column-major, `C_i = op(A_i) op(B_i)`, (m x n) = (m x k)(k x n), each operand an
//! element offset, a leading dimension and a batch stride into its buffer.
//!
//! The attention core's CUDA side is a list of these (`attention::HeadProducts`):
//! q, k, v and their gradients are column blocks of the packed qkv, addressed by
//! offset and leading dimension, so none is copied out. The layout algebra is the
//! error-prone part, so it lives here, without CUDA: [`Product::run_reference`]
//! interprets a product on slices exactly as cuBLAS defines it, and the attention's
//! test runs its whole product list that way against the basic-op attention (CI has
//! no GPU). `model::ops::cuda` runs the same structs on cuBLAS.

use candle_core::Result;

/// (element offset, (leading dimension, batch stride)) of one operand.
pub(crate) type Operand = (usize, (usize, usize));

#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct Product {
    pub(crate) transa: bool,
    pub(crate) transb: bool,
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) batch: usize,
    pub(crate) a: Operand,
    pub(crate) b: Operand,
    pub(crate) c: Operand,
}

// Built by the attention's CUDA side (and its test) only.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Product {
    pub(crate) fn new(transa: bool, transb: bool, m: usize, n: usize, k: usize, batch: usize) -> Self {
        Self {
            transa,
            transb,
            m,
            n,
            k,
            batch,
            a: (0, (1, 0)),
            b: (0, (1, 0)),
            c: (0, (1, 0)),
        }
    }

    pub(crate) fn a(mut self, offset: usize, ld_stride: (usize, usize)) -> Self {
        self.a = (offset, ld_stride);
        self
    }

    pub(crate) fn b(mut self, offset: usize, ld_stride: (usize, usize)) -> Self {
        self.b = (offset, ld_stride);
        self
    }

    pub(crate) fn c(mut self, offset: usize, ld_stride: (usize, usize)) -> Self {
        self.c = (offset, ld_stride);
        self
    }

    /// (rows, cols) of A and B as stored (column-major): op(A) is m x k, op(B) is k x n.
    fn stored(&self) -> ((usize, usize), (usize, usize)) {
        let a = if self.transa {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let b = if self.transb {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        (a, b)
    }

    /// Checks that every element the product touches lies inside buffers of these
    /// lengths, and that each leading dimension covers its operand's rows.
    pub(crate) fn check(&self, a_len: usize, b_len: usize, c_len: usize) -> Result<()> {
        let ((ar, ac), (br, bc)) = self.stored();
        for (what, (off, (ld, stride)), rows, cols, len) in [
            ("A", self.a, ar, ac, a_len),
            ("B", self.b, br, bc, b_len),
            ("C", self.c, self.m, self.n, c_len),
        ] {
            let end = off + (self.batch.max(1) - 1) * stride + (cols.max(1) - 1) * ld + rows;
            if ld < rows.max(1) || end > len {
                candle_core::bail!(
                    "strided product: operand {what} ({rows} x {cols}, ld {ld}, offset {off}, batch stride {stride}, \
                     batch {}) reaches element {end} of {len}",
                    self.batch
                )
            }
        }
        Ok(())
    }

    /// The product on slices, element by element as cuBLAS defines it (C overwritten):
    /// `C[i + j ldc] = sum_l op(A)[i, l] op(B)[l, j]`, with `A[r, c] = a[off + r + c lda]`.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn run_reference(&self, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
        self.check(a.len(), b.len(), c.len())?;
        let at = |(off, (ld, stride)): Operand, batch: usize, r: usize, col: usize| off + batch * stride + r + col * ld;
        for batch in 0..self.batch {
            for i in 0..self.m {
                for j in 0..self.n {
                    let mut sum = 0f32;
                    for l in 0..self.k {
                        let x = if self.transa {
                            a[at(self.a, batch, l, i)]
                        } else {
                            a[at(self.a, batch, i, l)]
                        };
                        let y = if self.transb {
                            b[at(self.b, batch, j, l)]
                        } else {
                            b[at(self.b, batch, l, j)]
                        };
                        sum += x * y;
                    }
                    c[at(self.c, batch, i, j)] = sum;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The interpreter against plain row-major loops: a batch of (2 x 3)(3 x 4), stored
    /// row-major, which column-major cuBLAS sees transposed: C^T = B^T A^T.
    #[test]
    fn interprets_row_major_products_through_the_transpose() -> Result<()> {
        let (m, k, n, batch) = (2, 3, 4, 2);
        let a: Vec<f32> = (0..batch * m * k).map(|i| i as f32 * 0.5 - 2.0).collect();
        let b: Vec<f32> = (0..batch * k * n).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut want = vec![0f32; batch * m * n];
        for p in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    want[p * m * n + i * n + j] = (0..k)
                        .map(|l| a[p * m * k + i * k + l] * b[p * k * n + l * n + j])
                        .sum();
                }
            }
        }
        let mut got = vec![0f32; batch * m * n];
        Product::new(false, false, n, m, k, batch)
            .a(0, (n, k * n))
            .b(0, (k, m * k))
            .c(0, (n, m * n))
            .run_reference(&b, &a, &mut got)?;
        assert_eq!(got, want);
        // One element past the buffer is refused.
        let short = Product::new(false, false, n, m, k, batch)
            .a(1, (n, k * n))
            .b(0, (k, m * k))
            .c(0, (n, m * n));
        assert!(short.check(b.len(), a.len(), got.len()).is_err());
        Ok(())
    }
}
