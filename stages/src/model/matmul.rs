//! The f32 GEMM behind the Linear layers and the attention op, and its plain reference.
//!
//! Why our own: on the 2-core AVX2 machine the `gemm` crate behind candle's CPU
//! matmul reached about 20 GFLOP/s per core on our shapes (3200 x 192 x 768);
//! this BLIS-style loop nest (packed A and B panels, a register kernel) reaches
//! 90-100 with AVX2 and 140-165 with AVX-512 (README), and it can start C from a bias (the Linear layer's bias costs no
//! pass of its own) or overwrite C (no zero-fill).
//!
//! Threads: [`gemm`] splits the rows of C into at most one run per rayon thread. Every
//! element of C is summed by one task in a fixed k order (never split over the
//! reduction), so the bits do not depend on the thread count. [`gemm_reference`]
//! is the triple loop it is tested against; it also runs where the CPU lacks
//! AVX2 / FMA.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A strided 2-D view: element (i, j) is `data[off + i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major (rows, cols) matrix starting at `off` with row stride `ld`.
    pub fn rows(data: &'a [f32], off: usize, ld: usize) -> Self {
        Self {
            data,
            off,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with row stride `ld` (element (i, j) = M[j, i]).
    pub fn cols(data: &'a [f32], off: usize, ld: usize) -> Self {
        Self {
            data,
            off,
            rs: 1,
            cs: ld,
        }
    }

    #[inline]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[self.off + i * self.rs + j * self.cs]
    }

    /// The view that starts `i0` rows further down.
    fn skip_rows(self, i0: usize) -> Self {
        Self {
            off: self.off + i0 * self.rs,
            ..self
        }
    }
}

/// A raw pointer that rayon tasks writing disjoint parts of one buffer share
/// (the GEMM's row blocks, the attention heads' column blocks).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: users hand each task a disjoint set of elements.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the Sync wrapper, not the raw field).
    pub(crate) fn get(&self) -> *mut f32 {
        self.0
    }
}

/// What C starts from.
#[derive(Debug, Clone, Copy)]
pub enum Init<'a> {
    /// C = A B (whatever C held is overwritten).
    Zero,
    /// C = bias (one value per column) + A B.
    Bias(&'a [f32]),
    /// C += A B.
    Accumulate,
}

/// C (m, n), row stride `ldc`, from `init` and A (m, k) B (k, n).
/// `parallel`: split the rows of C over rayon's pool (same bits either way).
#[allow(clippy::too_many_arguments)]
pub fn gemm(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], ldc: usize, init: Init, parallel: bool) {
    gemm_on(backend(), m, n, k, a, b, c, ldc, init, parallel)
}

/// [`gemm`] into C through a pointer, for tasks that write disjoint blocks of one
/// buffer (the attention heads' columns).
///
/// # Safety
/// `c` must be valid for writes of m rows of stride `ldc` and n columns, and no one
/// else may access those elements during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_ptr(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: *mut f32,
    ldc: usize,
    init: Init,
    parallel: bool,
) {
    gemm_ptr_on(backend(), m, n, k, a, b, c, ldc, init, parallel)
}

/// [`gemm`] on a given backend (one of [`backends`]), to compare them in one process.
#[allow(clippy::too_many_arguments)]
pub fn gemm_on(
    backend: Backend,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    ldc: usize,
    init: Init,
    parallel: bool,
) {
    assert!(m == 0 || c.len() >= (m - 1) * ldc + n, "gemm: C too small");
    // SAFETY: C holds the m rows of stride ldc, checked above, and is borrowed mutably.
    unsafe { gemm_ptr_on(backend, m, n, k, a, b, c.as_mut_ptr(), ldc, init, parallel) }
}

/// # Safety
/// As [`gemm_ptr`]; `backend` must be one of [`backends`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_ptr_on(
    backend: Backend,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: *mut f32,
    ldc: usize,
    init: Init,
    parallel: bool,
) {
    if let Init::Bias(bias) = init {
        assert!(bias.len() >= n, "gemm: bias of {} for {n} columns", bias.len());
    }
    // The kernels and cblas read A and B through raw pointers: their last elements
    // must lie inside their slices.
    let fits = |x: &Mat, rows: usize, cols: usize| {
        rows == 0 || cols == 0 || x.off + (rows - 1) * x.rs + (cols - 1) * x.cs < x.data.len()
    };
    assert!(
        fits(&a, m, k),
        "gemm: A ({m} x {k}) reaches past its {} values",
        a.data.len()
    );
    assert!(
        fits(&b, k, n),
        "gemm: B ({k} x {n}) reaches past its {} values",
        b.data.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    match backend {
        #[cfg(openblas)]
        Backend::OpenBlas if blas::gemm(m, n, k, a, b, c, ldc, init, parallel) => return,
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 | Backend::OpenBlas if avx512_available() => {
            return x86::gemm::<x86::Avx512Tile>(m, n, k, a, b, c, ldc, init, parallel);
        }
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 | Backend::Avx2 | Backend::OpenBlas if x86_available() => {
            return x86::gemm::<x86::Avx2Tile>(m, n, k, a, b, c, ldc, init, parallel);
        }
        _ => {}
    }
    let _ = parallel;
    for i in 0..m {
        let row = std::slice::from_raw_parts_mut(c.add(i * ldc), n);
        gemm_reference(1, n, k, a.skip_rows(i), b, row, n, init);
    }
}

/// The plain triple loop, k innermost in increasing order.
#[allow(clippy::too_many_arguments)]
pub fn gemm_reference(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], ldc: usize, init: Init) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for kk in 0..k {
                acc += a.at(i, kk) * b.at(kk, j);
            }
            let o = &mut c[i * ldc + j];
            *o = match init {
                Init::Zero => acc,
                Init::Bias(bias) => bias[j] + acc,
                Init::Accumulate => *o + acc,
            };
        }
    }
}

/// Which GEMM runs. `CROSSMAE_GEMM=openblas|avx512|avx2|reference` picks one (`ours` =
/// the best of our kernels here), to compare them in one binary; the default is
/// the first of [`backends`]. A backend this CPU or build lacks falls to the next
/// (OpenBLAS where strides do not fit cblas, AVX-512 to AVX2, AVX2 to the reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    OpenBlas,
    Avx512,
    Avx2,
    Reference,
}

/// The backends this build and CPU can run, the default first.
pub fn backends() -> Vec<Backend> {
    let mut out = Vec::new();
    if cfg!(openblas) {
        out.push(Backend::OpenBlas);
    }
    if avx512_available() {
        out.push(Backend::Avx512);
    }
    if x86_available() {
        out.push(Backend::Avx2);
    }
    out.push(Backend::Reference);
    out
}

/// The GEMM in use (read once).
pub fn backend() -> Backend {
    static BACKEND: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();
    *BACKEND.get_or_init(|| {
        let all = backends();
        let named = match std::env::var("CROSSMAE_GEMM").as_deref() {
            Ok("openblas") => Some(Backend::OpenBlas),
            Ok("avx512") => Some(Backend::Avx512),
            Ok("avx2") => Some(Backend::Avx2),
            Ok("reference") => Some(Backend::Reference),
            Ok("ours") => all.iter().copied().find(|b| *b != Backend::OpenBlas),
            _ => None,
        };
        named.filter(|b| all.contains(b)).unwrap_or(all[0])
    })
}

/// OpenBLAS through cblas, one thread per call: we split C into one block per
/// rayon thread and run the blocks on rayon's pool. The bits do not depend on the
/// blocks, hence not on the thread count (see the rule in [`blas::gemm`]).
/// OpenBLAS's own threads are switched off (they would fight rayon's).
#[cfg(openblas)]
mod blas {
    use super::{Init, Mat, SendPtr};
    use rayon::prelude::*;
    use std::os::raw::c_int;

    const ROW_MAJOR: c_int = 101;
    const SPLIT_MIN_MNK: usize = 1 << 22;
    /// Row block edges fall on multiples of this: a multiple of every register tile
    /// side of OpenBLAS's sgemm kernels (4, 8, 16, 24, 32, 48).
    const EDGE_ALIGN: usize = 96;
    const NO_TRANS: c_int = 111;
    const TRANS: c_int = 112;

    extern "C" {
        #[allow(clippy::too_many_arguments)]
        fn cblas_sgemm(
            order: c_int,
            trans_a: c_int,
            trans_b: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f32,
            a: *const f32,
            lda: c_int,
            b: *const f32,
            ldb: c_int,
            beta: f32,
            c: *mut f32,
            ldc: c_int,
        );
        fn openblas_set_num_threads(n: c_int);
    }

    /// (transpose flag, leading dimension) of a view with `cols` columns, if cblas can take it.
    fn operand(x: &Mat, rows: usize, cols: usize) -> Option<(c_int, usize)> {
        if x.cs == 1 && x.rs >= cols.max(1) {
            Some((NO_TRANS, x.rs))
        } else if x.rs == 1 && x.cs >= rows.max(1) {
            Some((TRANS, x.cs))
        } else {
            None
        }
    }

    /// Runs the product on cblas; false when the strides do not fit it (then our kernel runs).
    ///
    /// # Safety
    /// As [`super::gemm_ptr`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: Mat,
        b: Mat,
        c: *mut f32,
        ldc: usize,
        init: Init,
        parallel: bool,
    ) -> bool {
        static ONE_THREAD: std::sync::Once = std::sync::Once::new();
        let (Some((ta, lda)), Some((tb, ldb))) = (operand(&a, m, k), operand(&b, k, n)) else {
            return false;
        };
        if k == 0 || [m, n, k, lda, ldb, ldc].iter().any(|&v| v > c_int::MAX as usize) {
            return false;
        }
        ONE_THREAD.call_once(|| openblas_set_num_threads(1));
        // Blocks of rows of C, one per thread. The blocks may follow the thread count
        // only where OpenBLAS sums each element over k in the same order whatever the
        // blocks: its k blocking depends on k alone, but (OpenBLAS 0.3.21, Zen 3,
        // measured with cblas on whole against split products) a block edge inside a
        // register tile of rows changes the bits, and so does a column edge anywhere
        // but at a multiple of its 320-column block. So C is split along its rows
        // only, at multiples of EDGE_ALIGN. Its small-matrix kernel (M*N*K up to about
        // 1e6 on Cooper Lake) sums in another order too, so no block goes below
        // SPLIT_MIN_MNK. The test runs 1, 2, 3 and 5 threads on both layouts: an
        // OpenBLAS that broke this would fail it.
        let threads = if parallel { rayon::current_num_threads() } else { 1 };
        let mut count = threads.clamp(1, (m / EDGE_ALIGN).max(1));
        while count > 1 && (m / count / EDGE_ALIGN * EDGE_ALIGN) * n * k < SPLIT_MIN_MNK {
            count -= 1;
        }
        let c_ptr = SendPtr(c);
        let edge = |i: usize| {
            if i == count {
                m
            } else {
                (m * i / count) / EDGE_ALIGN * EDGE_ALIGN
            }
        };
        // (first row, rows) of each block.
        let blocks: Vec<(usize, usize)> = (0..count).map(|i| (edge(i), edge(i + 1) - edge(i))).collect();
        let task = |(i0, mb): (usize, usize)| {
            let c0 = c_ptr.get().add(i0 * ldc);
            let beta = match init {
                Init::Zero => 0.0,
                Init::Accumulate => 1.0,
                Init::Bias(bias) => {
                    for i in 0..mb {
                        std::slice::from_raw_parts_mut(c0.add(i * ldc), n).copy_from_slice(&bias[..n]);
                    }
                    1.0
                }
            };
            cblas_sgemm(
                ROW_MAJOR,
                ta,
                tb,
                mb as c_int,
                n as c_int,
                k as c_int,
                1.0,
                a.data.as_ptr().add(a.off + i0 * a.rs),
                lda as c_int,
                b.data.as_ptr().add(b.off),
                ldb as c_int,
                beta,
                c0,
                ldc as c_int,
            );
        };
        if blocks.len() > 1 {
            blocks.into_par_iter().for_each(task);
        } else {
            blocks.into_iter().for_each(task);
        }
        true
    }
}

/// Whether our AVX2 kernel can run here.
fn x86_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether our AVX-512 kernel can run here.
fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `a (m, k) @ b (k, n)` with a backward pass; any strides. Runs at the thread's
/// precision (see [`super::autocast`]); this kernel for f32 CPU products.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    super::autocast::gemm(a, b, |a, b| {
        if a.rank() == 2 && b.rank() == 2 && a.device().is_cpu() && a.dtype() == candle_core::DType::F32 {
            a.apply_op2(b, MatMul)
        } else {
            a.matmul(b)
        }
    })
}

struct MatMul;

/// A 2-D layout as a [`Mat`] over `data`.
pub(crate) fn mat<'a>(data: &'a [f32], l: &Layout) -> Mat<'a> {
    let s = l.stride();
    Mat {
        data,
        off: l.start_offset(),
        rs: s[0],
        cs: s[1],
    }
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
        gemm(m, n, k, mat(a, l1), mat(b, l2), &mut c, n, Init::Zero, true);
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! BLIS's loop order, per thread: a slice of B's columns (packed into
    //! NR-wide panels, [`pack_b`]), a block of k, then the thread's blocks of MC
    //! rows of C. A row-major is read in place in full MR-row panels (its last
    //! partial panel packed); any other A is packed per row block and k block.
    //! Two register tiles ([`Tile`]): AVX-512 12 x 32 and AVX2 6 x 16. GFLOP/s
    //! on one core of a 2-core Intel Xeon (`examples/gemm_speed`, interleaved
    //! with OpenBLAS 0.3.21's SkylakeX kernels): AVX-512 forward 151-166
    //! (OpenBLAS 136-152), dW 137-145 (130-140); AVX2 forward 93-103.

    use super::{Init, Mat, SendPtr};
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// The k block. The same for every tile: each element of C is summed over k in
    /// the same order (one FMA per k, C updated once per k block), so the AVX-512
    /// and AVX2 tiles give the same bits.
    const KC: usize = 256;
    /// Rows of C per block (a multiple of every tile's MR): A's packed block,
    /// MC x KC, stays in L2.
    const MC: usize = 72;
    /// The largest MR x NR of a tile (the edge tiles' scratch).
    const MAX_TILE: usize = 12 * 32;

    /// C (MR x NR, row stride ldc) = [C +] [bias +] A (MR x kc; element (i, kk) at
    /// `a + i ia + kk ka`) B (kc x NR, row stride ldb). Unsafe to call: the CPU
    /// must have the tile's features, and the pointers cover what they describe.
    type Kernel = unsafe fn(
        kc: usize,
        a: *const f32,
        ia: usize,
        ka: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        acc: bool,
        bias: Option<&[f32]>,
    );

    /// A register tile: the MR x NR block of C its kernel keeps in registers.
    pub(super) trait Tile {
        const MR: usize;
        const NR: usize;
        const KERNEL: Kernel;
    }

    /// 6 x 16 in 12 AVX registers.
    pub(super) struct Avx2Tile;
    /// 12 x 32 in 24 of the 32 AVX-512 registers: per k, 2 loads of B and 12
    /// broadcasts of A feed 24 FMAs (the 6 x 16 tile: 2 and 6 feed 12).
    pub(super) struct Avx512Tile;

    thread_local! {
        /// Each thread's packing buffers (B's slice, then A's block), kept between
        /// products: a fresh zeroed 1 MiB per product was 1-2% of a training step
        /// in memset. Stale values never reach C: the columns of B past n and the
        /// rows of A past m only reach the scratch tile's unused columns and rows
        /// (a partial panel of B is zeroed anyway, so that they stay finite).
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// Columns of B per packed slice: a KC x NC slice (1 MiB) stays in a 2 MiB L2
    /// (Sapphire Rapids; a Zen 3's 512 KiB holds half of it) while every row
    /// block of the thread's run uses it.
    const NC: usize = 1024;
    /// Runs are added only while each gets this many multiply-adds on average
    /// (below it, rayon's fork and a second pack of B cost more than they save).
    const SPLIT_MIN_MNK: usize = 1 << 20;

    /// B's slice (rows pc..pc + kc, columns j0..j0 + nc) as panels of NR columns,
    /// panel pj's row kk at `(pj * kc + kk) * NR`, zero-padded past nc, into `out`
    /// (which starts on a 64-byte boundary where the allocator allows): every kernel row of B is one or two
    /// whole cache lines and a panel is on a few pages. Read in place, B's rows
    /// straddled two lines and each k of a panel was on another page (a 590 KiB
    /// W^T spans 144): on a Zen 3 core that cost the kernel a quarter of its speed.
    fn pack_b<T: Tile>(b: &Mat, pc: usize, kc: usize, j0: usize, nc: usize, out: &mut [f32]) {
        let nr = T::NR;
        let d = b.data;
        for (pj, panel) in out[..nc.div_ceil(nr) * kc * nr].chunks_mut(kc * nr).enumerate() {
            let (j, cols) = (j0 + pj * nr, nr.min(nc - pj * nr));
            if cols < nr {
                panel.fill(0.0);
            }
            if b.cs == 1 {
                for (kk, row) in panel.chunks_exact_mut(nr).enumerate() {
                    let src = b.off + (pc + kk) * b.rs + j;
                    row[..cols].copy_from_slice(&d[src..src + cols]);
                }
            } else if b.rs == 1 {
                // B^T row-major: each column of B is contiguous over k.
                for jj in 0..cols {
                    let src = &d[b.off + (j + jj) * b.cs + pc..][..kc];
                    for (kk, &v) in src.iter().enumerate() {
                        panel[kk * nr + jj] = v;
                    }
                }
            } else {
                for kk in 0..kc {
                    for jj in 0..cols {
                        panel[kk * nr + jj] = b.at(pc + kk, j + jj);
                    }
                }
            }
        }
    }

    /// # Safety
    /// The CPU has T's features (AVX2 / FMA, AVX-512F); `c` must be valid for m
    /// rows of stride `ldc` and n columns, owned by the caller; A and B hold
    /// (m, k) and (k, n) elements.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm<T: Tile>(
        m: usize,
        n: usize,
        k: usize,
        a: Mat,
        b: Mat,
        c: *mut f32,
        ldc: usize,
        init: Init,
        parallel: bool,
    ) {
        // The scratch tile holds a whole tile, and a block of MC rows is whole tiles
        // (packed A's buffer is MC x KC).
        const { assert!(T::MR * T::NR <= MAX_TILE && MC.is_multiple_of(T::MR)) };
        if k == 0 {
            for i in 0..m {
                let row = std::slice::from_raw_parts_mut(c.add(i * ldc), n);
                match init {
                    Init::Zero => row.fill(0.0),
                    Init::Bias(bias) => row.copy_from_slice(&bias[..n]),
                    Init::Accumulate => {}
                }
            }
            return;
        }
        let c_ptr = SendPtr(c);
        // One run of whole tiles per thread (an even split: a fixed grain of 72 rows
        // left one of 2 threads idle for a third of a 192-row dW). The split cannot
        // change the bits: every row of C is computed alike wherever the edges fall.
        let tiles = m.div_ceil(T::MR);
        let runs = if parallel {
            rayon::current_num_threads()
                .clamp(1, tiles)
                .min((m * n * k / SPLIT_MIN_MNK).max(1))
        } else {
            1
        };
        // The BLIS loop order: a slice of B's columns, a block of k, then the run's
        // blocks of MC rows. Each run packs the slices of B it uses itself, into a
        // buffer that stays in L2 (packing all of B once to memory cost a dW with
        // k = 3200 a fifth of its time, and its blocks read B back from L3).
        let task = |run: usize| {
            let first = (tiles * run / runs * T::MR).min(m);
            let end = (tiles * (run + 1) / runs * T::MR).min(m);
            let nc_max = NC.min(n).div_ceil(T::NR) * T::NR;
            let b_len = KC.min(k) * nc_max + 16;
            SCRATCH.with(|cell| {
                // A product inside a product on this thread (none today) gets its own.
                let (mut guard, mut own) = (cell.try_borrow_mut(), Vec::new());
                let buf = match guard {
                    Ok(ref mut kept) => &mut **kept,
                    Err(_) => &mut own,
                };
                if buf.len() < b_len + MC * KC {
                    buf.resize(b_len + MC * KC, 0.0);
                }
                let (b_buf, a_buf) = buf.split_at_mut(b_len);
                let aligned = b_buf.as_ptr().align_offset(64).min(16);
                let b_buf = &mut b_buf[aligned..];
                for j0 in (0..n).step_by(NC) {
                    let nc = NC.min(n - j0);
                    for pc in (0..k).step_by(KC) {
                        let kc = KC.min(k - pc);
                        pack_b::<T>(&b, pc, kc, j0, nc, b_buf);
                        // The first k block sets C from `init`; later ones accumulate.
                        let mode = match init {
                            _ if pc > 0 => Init::Accumulate,
                            Init::Bias(bias) => Init::Bias(&bias[j0..j0 + nc]),
                            other => other,
                        };
                        for i0 in (first..end).step_by(MC) {
                            let rows = MC.min(end - i0);
                            // SAFETY: rows [first, end) of C belong to this run alone.
                            unsafe {
                                block::<T>(
                                    rows,
                                    nc,
                                    (pc, kc),
                                    &a.skip_rows(i0),
                                    b_buf,
                                    a_buf,
                                    c_ptr.get().add(i0 * ldc + j0),
                                    ldc,
                                    mode,
                                )
                            };
                        }
                    }
                }
            });
        };
        if runs > 1 {
            (0..runs).into_par_iter().for_each(task);
        } else {
            task(0);
        }
    }

    /// Rows 0..m (m <= MC) and columns 0..n of C from columns pc..pc + kc of A and
    /// the packed slice `b` of B ([`pack_b`]).
    ///
    /// # Safety
    /// `c` must be valid for m rows of stride `ldc` and n columns, owned by the
    /// caller; A must hold m rows and pc + kc columns; `packed_a` holds MC x KC.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<T: Tile>(
        m: usize,
        n: usize,
        (pc, kc): (usize, usize),
        a: &Mat,
        b: &[f32],
        packed_a: &mut [f32],
        c: *mut f32,
        ldc: usize,
        mode: Init,
    ) {
        let (mr, nr) = (T::MR, T::NR);
        let full_rows = m / mr * mr;
        // A row-major is read in place (MR contiguous streams), its last partial
        // panel packed. A transposed (dW = g^T x) would give each k of a tile its
        // own cache line and, every few k, its own page: then every panel of the
        // block is packed, kc x MR each.
        let first = if a.cs != 1 { 0 } else { full_rows };
        // Rows past m in the last panel only reach the scratch tile's unused rows.
        if first < m {
            if a.rs == 1 {
                // Each k's rows are contiguous: MR values at a time, a copy of fixed
                // size (a memcpy call per 6 values cost a quarter of a dW product).
                for kk in 0..kc {
                    let src = &a.data[a.off + first + (pc + kk) * a.cs..][..m - first];
                    let (full, rest) = src.split_at(src.len() / mr * mr);
                    for (p, vals) in full.chunks_exact(mr).enumerate() {
                        let at = p * mr * kc + kk * mr;
                        packed_a[at..at + mr].copy_from_slice(vals);
                    }
                    if !rest.is_empty() {
                        let at = full.len() * kc + kk * mr;
                        packed_a[at..at + rest.len()].copy_from_slice(rest);
                    }
                }
            } else {
                for (p, panel) in packed_a.chunks_mut(mr * kc).take((m - first).div_ceil(mr)).enumerate() {
                    let (i0, rows) = (first + p * mr, mr.min(m - first - p * mr));
                    for (kk, dst) in panel.chunks_exact_mut(mr).enumerate() {
                        for (i, o) in dst[..rows].iter_mut().enumerate() {
                            *o = a.at(i0 + i, pc + kk);
                        }
                    }
                }
            }
        }
        let mut tmp = [0f32; MAX_TILE];
        let ad = a.data.as_ptr();
        for pj in 0..n.div_ceil(nr) {
            let cols = nr.min(n - pj * nr);
            let pb = b.as_ptr().add(pj * kc * nr);
            let bias = match mode {
                Init::Bias(bias) => Some(&bias[pj * nr..pj * nr + cols]),
                _ => None,
            };
            for i0 in (0..m).step_by(mr) {
                let rows = mr.min(m - i0);
                let c0 = c.add(i0 * ldc + pj * nr);
                let (pa, ia, ka) = if i0 >= first {
                    (packed_a.as_ptr().add((i0 - first) * kc), 1, mr)
                } else {
                    (ad.add(a.off + i0 * a.rs + pc * a.cs), a.rs, a.cs)
                };
                // SAFETY (both calls): the caller's CPU has T's features; pa covers
                // rows x kc of A, pb the kc x NR panel, and C (or tmp) the tile.
                if rows == mr && cols == nr {
                    (T::KERNEL)(kc, pa, ia, ka, pb, nr, c0, ldc, matches!(mode, Init::Accumulate), bias);
                } else {
                    // Edge tile: into a scratch tile, then what fits into C.
                    (T::KERNEL)(kc, pa, ia, ka, pb, nr, tmp.as_mut_ptr(), nr, false, None);
                    for i in 0..rows {
                        for jj in 0..cols {
                            let o = c0.add(i * ldc + jj);
                            let v = tmp[i * nr + jj];
                            *o = match mode {
                                Init::Zero => v,
                                Init::Bias(_) => bias.map_or(0.0, |b| b[jj]) + v,
                                Init::Accumulate => *o + v,
                            };
                        }
                    }
                }
            }
        }
    }

    impl Tile for Avx2Tile {
        const MR: usize = 6;
        const NR: usize = 16;
        const KERNEL: Kernel = kernel_avx2;
    }

    impl Tile for Avx512Tile {
        const MR: usize = 12;
        const NR: usize = 32;
        const KERNEL: Kernel = kernel_avx512;
    }

    /// The [`Kernel`] of a 6 x 16 tile in 12 AVX registers.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_avx2(
        kc: usize,
        a: *const f32,
        ia: usize,
        ka: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        acc: bool,
        bias: Option<&[f32]>,
    ) {
        let z = _mm256_setzero_ps();
        let (mut c00, mut c01, mut c10, mut c11, mut c20, mut c21) = (z, z, z, z, z, z);
        let (mut c30, mut c31, mut c40, mut c41, mut c50, mut c51) = (z, z, z, z, z, z);
        let (a0, a1, a2) = (a, a.add(ia), a.add(2 * ia));
        let (a3, a4, a5) = (a.add(3 * ia), a.add(4 * ia), a.add(5 * ia));
        for kk in 0..kc {
            let bk = b.add(kk * ldb);
            let b0 = _mm256_loadu_ps(bk);
            let b1 = _mm256_loadu_ps(bk.add(8));
            let o = kk * ka;
            let x = _mm256_broadcast_ss(&*a0.add(o));
            c00 = _mm256_fmadd_ps(x, b0, c00);
            c01 = _mm256_fmadd_ps(x, b1, c01);
            let x = _mm256_broadcast_ss(&*a1.add(o));
            c10 = _mm256_fmadd_ps(x, b0, c10);
            c11 = _mm256_fmadd_ps(x, b1, c11);
            let x = _mm256_broadcast_ss(&*a2.add(o));
            c20 = _mm256_fmadd_ps(x, b0, c20);
            c21 = _mm256_fmadd_ps(x, b1, c21);
            let x = _mm256_broadcast_ss(&*a3.add(o));
            c30 = _mm256_fmadd_ps(x, b0, c30);
            c31 = _mm256_fmadd_ps(x, b1, c31);
            let x = _mm256_broadcast_ss(&*a4.add(o));
            c40 = _mm256_fmadd_ps(x, b0, c40);
            c41 = _mm256_fmadd_ps(x, b1, c41);
            let x = _mm256_broadcast_ss(&*a5.add(o));
            c50 = _mm256_fmadd_ps(x, b0, c50);
            c51 = _mm256_fmadd_ps(x, b1, c51);
        }
        let (bias0, bias1) = match bias {
            Some(b) => (_mm256_loadu_ps(b.as_ptr()), _mm256_loadu_ps(b.as_ptr().add(8))),
            None => (z, z),
        };
        for (i, (lo, hi)) in [(c00, c01), (c10, c11), (c20, c21), (c30, c31), (c40, c41), (c50, c51)]
            .into_iter()
            .enumerate()
        {
            let row = c.add(i * ldc);
            let (lo, hi) = if acc {
                (
                    _mm256_add_ps(_mm256_loadu_ps(row), lo),
                    _mm256_add_ps(_mm256_loadu_ps(row.add(8)), hi),
                )
            } else if bias.is_some() {
                // bias + sum, the order of the reference.
                (_mm256_add_ps(bias0, lo), _mm256_add_ps(bias1, hi))
            } else {
                (lo, hi)
            };
            _mm256_storeu_ps(row, lo);
            _mm256_storeu_ps(row.add(8), hi);
        }
    }

    /// The [`Kernel`] of a 12 x 32 tile in 24 AVX-512 registers. The same operations per
    /// element as [`kernel_avx2`] (one FMA per k in k order, then C or the bias
    /// added once), so the same bits.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_avx512(
        kc: usize,
        a: *const f32,
        ia: usize,
        ka: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        acc: bool,
        bias: Option<&[f32]>,
    ) {
        const MR: usize = 12;
        let z = _mm512_setzero_ps();
        // Fixed-size arrays indexed by constants after unrolling: LLVM keeps them in
        // zmm registers (checked in the disassembly: no spills in the k loop).
        let mut lo = [z; MR];
        let mut hi = [z; MR];
        let rows: [*const f32; MR] = std::array::from_fn(|i| a.add(i * ia));
        for kk in 0..kc {
            let bk = b.add(kk * ldb);
            let b0 = _mm512_loadu_ps(bk);
            let b1 = _mm512_loadu_ps(bk.add(16));
            let o = kk * ka;
            for i in 0..MR {
                let x = _mm512_set1_ps(*rows[i].add(o));
                lo[i] = _mm512_fmadd_ps(x, b0, lo[i]);
                hi[i] = _mm512_fmadd_ps(x, b1, hi[i]);
            }
        }
        let (bias0, bias1) = match bias {
            Some(b) => (_mm512_loadu_ps(b.as_ptr()), _mm512_loadu_ps(b.as_ptr().add(16))),
            None => (z, z),
        };
        for i in 0..MR {
            let row = c.add(i * ldc);
            let (l, h) = if acc {
                (
                    _mm512_add_ps(_mm512_loadu_ps(row), lo[i]),
                    _mm512_add_ps(_mm512_loadu_ps(row.add(16)), hi[i]),
                )
            } else if bias.is_some() {
                (_mm512_add_ps(bias0, lo[i]), _mm512_add_ps(bias1, hi[i]))
            } else {
                (lo[i], hi[i])
            };
            _mm512_storeu_ps(row, l);
            _mm512_storeu_ps(row.add(16), h);
        }
    }
}

/// Column sums of a row-major (rows, d) slice (a bias gradient), deterministic:
/// partial sums over fixed blocks of rows in parallel, then the partials added in
/// block order. The bits do not depend on the thread count.
pub fn column_sums(x: &[f32], d: usize) -> Vec<f32> {
    const ROWS: usize = 64;
    let d = d.max(1);
    let partials: Vec<Vec<f32>> = x
        .par_chunks(ROWS * d)
        .map(|blk| {
            let mut s = vec![0f32; d];
            for row in blk.chunks_exact(d) {
                for (o, v) in s.iter_mut().zip(row) {
                    *o += v;
                }
            }
            s
        })
        .collect();
    let mut out = vec![0f32; d];
    for p in &partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{max_abs_diff, on_threads};
    use candle_core::{Device, Var};

    /// Odd sizes (partial MR/NR tiles, several KC blocks and row blocks) and
    /// transposed operands, against candle's matmul; values and gradients.
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

    /// `len` values uniform in [-1, 1).
    fn uniform(rng: &mut impl rand::Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// Every way C can start, named.
    fn inits(bias: &[f32]) -> [(&'static str, Init<'_>); 3] {
        [
            ("zero", Init::Zero),
            ("bias", Init::Bias(bias)),
            ("acc", Init::Accumulate),
        ]
    }

    /// Every backend here against the triple loop, every init mode, and the same bits
    /// for 1 thread and for several (C split into blocks, never the reduction):
    /// several row blocks with a ragged last one (600 rows), and a second column
    /// slice of our kernel (1,100 columns, where the bias is sliced per slice);
    /// and the AVX-512 and AVX2 tiles give the same bits.
    #[test]
    fn kernel_matches_reference_and_thread_count() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let both_tiles = [Backend::Avx512, Backend::Avx2].iter().all(|t| backends().contains(t));
        if !both_tiles {
            eprintln!(
                "kernel_matches_reference_and_thread_count: AVX-512 against AVX2 bits skipped, this CPU lacks one"
            );
        }
        // The last three are large enough for OpenBLAS blocks (row blocks, then column blocks).
        for (m, k, n) in [
            (1, 3, 1),
            (150, 257, 40),
            (73, 64, 197),
            (600, 19, 33),
            (100, 37, 700),
            (197, 64, 197),
            (700, 100, 200),
            (100, 300, 700),
            // Two k blocks, a ragged column panel, a packed row tail.
            (30, 260, 50),
            (13, 129, 17),
            (13, 600, 17),
            (25, 5, 33),
            (30, 260, 1100),
        ] {
            let [a, b, bias, start] = [m * k, k * n, n, m * n].map(|len| uniform(&mut rng, len));
            for (name, init) in inits(&bias) {
                // A transposed (column-major view) and B row-major, as in dW = g^T x;
                // A row-major and B transposed, as in the forward x W^T; both row-major (dx).
                for (at, bm) in [
                    (Mat::cols(&a, 0, m), Mat::rows(&b, 0, n)),
                    (Mat::rows(&a, 0, k), Mat::cols(&b, 0, k)),
                    (Mat::rows(&a, 0, k), Mat::rows(&b, 0, n)),
                ] {
                    let mut want = start.clone();
                    gemm_reference(m, n, k, at, bm, &mut want, n, init);
                    let mut tile_bits = Vec::new();
                    for backend in backends() {
                        let mut serial = start.clone();
                        gemm_on(backend, m, n, k, at, bm, &mut serial, n, init, false);
                        let on = |threads| {
                            let mut par = start.clone();
                            on_threads(threads, || gemm_on(backend, m, n, k, at, bm, &mut par, n, init, true));
                            par
                        };
                        let err = want
                            .iter()
                            .zip(&serial)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, f32::max);
                        assert!(err < 1e-4 * (k as f32).sqrt(), "{backend:?} {m}x{k}x{n} {name}: {err}");
                        for threads in [2, 3, 5] {
                            assert!(
                                serial.iter().zip(&on(threads)).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{backend:?} {m}x{k}x{n} {name}: {threads} threads changed the bits"
                            );
                        }
                        if matches!(backend, Backend::Avx512 | Backend::Avx2) {
                            tile_bits.push(serial.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
                        }
                    }
                    // The AVX-512 tile sums every element of C with the AVX2 tile's FMAs
                    // in the same order: the same bits, so a run resumes bit for bit on
                    // a CPU with the other tile.
                    if both_tiles {
                        let differ = tile_bits[0].iter().zip(&tile_bits[1]).filter(|(a, b)| a != b).count();
                        assert_eq!(
                            differ, 0,
                            "{m}x{k}x{n} {name}: {differ} elements differ between the tiles"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn column_sums_are_exact_sums_and_thread_independent() {
        let x: Vec<f32> = (0..1000 * 7).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01).collect();
        let a = on_threads(1, || column_sums(&x, 7));
        for threads in [2, 3] {
            let b = on_threads(threads, || column_sums(&x, 7));
            assert!(
                a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{threads} threads"
            );
        }
        for j in 0..7 {
            let want: f64 = x.chunks(7).map(|r| r[j] as f64).sum();
            assert!((a[j] as f64 - want).abs() < 1e-3, "column {j}");
        }
    }
}
