//! The large-sigma fast path: reduce the image 4x, blur it there, interpolate back.
//!
//! A Gaussian of sigma 10 px leaves almost nothing above a quarter of the
//! sampling rate (its response at 1/8 cycle per pixel is e^-30), so the blur
//! does not need every pixel: two 2x reductions with the binomial [1 3 3 1] / 8
//! (variance 0.75 sample^2 per level, a triple zero at the folding frequency,
//! so aliasing is negligible), a Gaussian of the remaining variance
//! `(sigma^2 - 3.75) / 16` on the 16x smaller image, and cubic (Catmull-Rom)
//! interpolation back to full size. Two full-size passes remain (the first
//! reduction and the last interpolation, 4 multiply-adds per value each),
//! where the recursive filter needs four of 8 plus two transposes.
//!
//! Borders: the full-size signal is reflected (the reference's `reflect`) far
//! enough that every reduced sample the blur reads exists, so the small image
//! needs no border rule of its own. Positions: reduced sample n sits at
//! full-size coordinate 4 n + 1.5, so pixel y = 4 q + s is read at n = q +
//! (s - 1.5) / 4, four fixed phases.
//!
//! Error against the untruncated Gaussian (test
//! `pyramid_is_close_to_the_untruncated_gaussian`): 0.0009 on a testvector
//! photo at sigma 10 (a numpy model of the method gave at most 0.0013 over the
//! four); on squares of +-2 (black-white edges, normalized) 0.0042 at sigma 8
//! and 0.0004 at sigma 12. The reference truncates at 3 sigma, which alone
//! moves values by up to 0.0067 on the photos; the total against it is
//! printed by `fast_path_error_against_reference_is_small`.

use super::{reflect, transpose};
use crate::simd::multiversion;

/// Smallest sigma (px) served by the pyramid: the reduced image's Gaussian is
/// then at least sqrt(64 - 3.75) / 4 = 1.9 samples wide.
pub const PYRAMID_MIN_SIGMA: f64 = 8.0;

/// Binomial reduction taps: output m reads inputs 2m - 1 .. 2m + 2.
const REDUCE: [f32; 4] = [0.125, 0.375, 0.375, 0.125];

/// Variance (full-size px^2) the two reductions add: 0.75 + 4 * 0.75.
const REDUCE_VARIANCE: f64 = 3.75;

/// Whether [`blur_plane`] serves this blur.
pub fn applies(sigma: f64, height: usize, width: usize) -> bool {
    sigma >= PYRAMID_MIN_SIGMA && height % 4 == 0 && width % 4 == 0 && height >= 8 && width >= 8
}

/// The reduced-size Gaussian, radius ceil(4 sigma_r) (mass left out: 6e-5),
/// normalized: the untruncated Gaussian the recursive filter also stands for.
fn reduced_kernel(sigma: f64) -> Vec<f32> {
    let s = (sigma * sigma - REDUCE_VARIANCE).sqrt() / 4.0;
    let r = (4.0 * s).ceil() as i64;
    let w: Vec<f64> = (-r..=r).map(|k| (-((k * k) as f64) / (2.0 * s * s)).exp()).collect();
    let sum: f64 = w.iter().sum();
    w.into_iter().map(|v| (v / sum) as f32).collect()
}

/// Catmull-Rom weights of taps n - 1, n, n + 1, n + 2 at n + t.
fn catmull_rom(t: f64) -> [f32; 4] {
    let (t2, t3) = (t * t, t * t * t);
    [
        (-t3 + 2.0 * t2 - t) / 2.0,
        (3.0 * t3 - 5.0 * t2 + 2.0) / 2.0,
        (-3.0 * t3 + 4.0 * t2 + t) / 2.0,
        (t3 - t2) / 2.0,
    ]
    .map(|v| v as f32)
}

/// Per phase s = y mod 4: the interpolation weights and the first of the four
/// reduced samples read, relative to q = y / 4 (pixel y sits at n = q + (s - 1.5) / 4).
fn phases() -> [([f32; 4], i64); 4] {
    [0usize, 1, 2, 3].map(|s| {
        let u = (s as f64 - 1.5) / 4.0;
        let base = u.floor();
        (catmull_rom(u - base), base as i64 - 1)
    })
}

/// Extents along one axis of n full-size samples: the reduced samples the
/// interpolation reads are n' in [-2, n/4 + 2), the blur reads `r` more on
/// each side, and level 1 covers what level 2 reads.
struct Axis {
    /// How many level-2 samples are computed (from -2 - r on).
    count2: usize,
    /// First level-1 sample computed and how many.
    first1: i64,
    count1: usize,
}

impl Axis {
    fn new(n: usize, r: usize) -> Axis {
        let first2 = -2 - r as i64;
        let count2 = n / 4 + 4 + 2 * r;
        Axis {
            count2,
            first1: 2 * first2 - 1,
            count1: 2 * count2 + 2,
        }
    }
}

/// A value the blur reads: f32, or a u8 level (read as its f32 value, what
/// widening the plane first gives).
pub trait Sample: Copy {
    fn value(self) -> f32;
}

impl Sample for f32 {
    #[inline(always)]
    fn value(self) -> f32 {
        self
    }
}

impl Sample for u8 {
    #[inline(always)]
    fn value(self) -> f32 {
        self as f32
    }
}

/// A value the blur writes: f32, or a u8 level (`smooth::level`, what rounding
/// the f32 output afterwards gives).
pub trait Output: Copy {
    fn of(v: f32) -> Self;
}

impl Output for f32 {
    #[inline(always)]
    fn of(v: f32) -> f32 {
        v
    }
}

impl Output for u8 {
    #[inline(always)]
    fn of(v: f32) -> u8 {
        super::level(v)
    }
}

/// Blurs one h x w plane into `out` (appended, h x w); `a` and `b` are scratch
/// (any contents, reused between calls). A u8 plane in and out reads and
/// writes its levels in the first and last passes: the same values as
/// widening it first and rounding the result after, without those two passes
/// over the full-size plane.
pub fn blur_plane<T: Sample, O: Output>(
    src: &[T],
    h: usize,
    w: usize,
    sigma: f64,
    out: &mut Vec<O>,
    a: &mut Vec<f32>,
    b: &mut Vec<f32>,
) {
    let kernel = reduced_kernel(sigma);
    let r = kernel.len() / 2;
    let (ay, ax) = (Axis::new(h, r), Axis::new(w, r));
    // Along y: full-size rows (reflected) -> level 1 -> level 2, then transpose.
    let rows: Vec<usize> = (0..2 * ay.count1 + 2)
        .map(|i| reflect(2 * ay.first1 - 1 + i as i64, h))
        .collect();
    reduce_rows(src, &rows, w, a, ay.count1);
    let rows: Vec<usize> = (0..2 * ay.count2 + 2).collect();
    reduce_rows(&a[..], &rows, w, b, ay.count2);
    a.resize(w * ay.count2, 0.0);
    transpose(b, a, ay.count2, w);
    // Along x, the same on the transposed plane: rows are now columns.
    let rows: Vec<usize> = (0..2 * ax.count1 + 2)
        .map(|i| reflect(2 * ax.first1 - 1 + i as i64, w))
        .collect();
    reduce_rows(&a[..], &rows, ay.count2, b, ax.count1);
    let rows: Vec<usize> = (0..2 * ax.count2 + 2).collect();
    reduce_rows(&b[..], &rows, ay.count2, a, ax.count2);
    // The Gaussian along x (rows of the transposed plane), then along y.
    let (nx, ny) = (w / 4 + 4, h / 4 + 4);
    fir_rows(&a[..], ay.count2, b, nx, &kernel);
    a.resize(ay.count2 * nx, 0.0);
    transpose(b, a, nx, ay.count2);
    fir_rows(&a[..], nx, b, ny, &kernel);
    // Back to full size: along x on the transposed small plane, then along y.
    a.resize(nx * ny, 0.0);
    transpose(b, a, ny, nx);
    b.clear();
    expand_rows(&a[..], ny, b, w);
    a.resize(ny * w, 0.0);
    transpose(b, a, w, ny);
    expand_rows(&a[..], w, out, h);
}

multiversion! {
/// `dst` = `count` rows of width w, row j = sum_t REDUCE[t] * src row `rows[2 j + t]`.
pub(super) fn reduce_rows / reduce_rows_scalar<T: Sample>(src: &[T], rows: &[usize], w: usize, dst: &mut Vec<f32>, count: usize) {
    // Plain loops over sized slices: `extend` with a mapped iterator left the
    // loop in a generic `fold` that was not inlined here, so it ran without AVX.
    // Written in place of zero-filling first (a memset of the scratch plane).
    dst.clear();
    dst.reserve(count * w);
    let spare = &mut dst.spare_capacity_mut()[..count * w];
    // The taps are symmetric: 1/8 on the outer two, 3/8 on the inner two.
    let (k0, k1) = (REDUCE[0], REDUCE[1]);
    for (j, out) in spare.chunks_exact_mut(w).enumerate() {
        let row = |t: usize| &src[rows[2 * j + t] * w..][..w];
        let (p, q, r, s) = (row(0), row(1), row(2), row(3));
        for ((((o, &p), &q), &r), &s) in out.iter_mut().zip(p).zip(q).zip(r).zip(s) {
            o.write(k0 * (p.value() + s.value()) + k1 * (q.value() + r.value()));
        }
    }
    // SAFETY: the loop above wrote all count * w values (chunks_exact over
    // exactly that many, every element of each chunk).
    unsafe { dst.set_len(count * w) };
}
}

multiversion! {
/// `dst` = `count` rows of width w, row j = sum_k kernel[k] * src row j + k
/// (the kernel folded around its center: it is symmetric).
pub(super) fn fir_rows / fir_rows_scalar(src: &[f32], w: usize, dst: &mut Vec<f32>, count: usize, kernel: &[f32]) {
    let r = kernel.len() / 2;
    dst.clear();
    dst.resize(count * w, 0.0);
    for (j, out) in dst.chunks_exact_mut(w).enumerate() {
        let center = &src[(j + r) * w..][..w];
        for (o, &c) in out.iter_mut().zip(center) {
            *o = kernel[r] * c;
        }
        for k in 1..=r {
            let (a, b) = (&src[(j + r - k) * w..][..w], &src[(j + r + k) * w..][..w]);
            let g = kernel[r + k];
            for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                *o += g * (a + b);
            }
        }
    }
}
}

multiversion! {
/// Appends `count` rows of width w to `dst`: row y = 4 q + s interpolates the
/// four rows of `src` (row i = reduced sample i - 2) of its phase s.
pub(super) fn expand_rows / expand_rows_scalar<O: Output>(src: &[f32], w: usize, dst: &mut Vec<O>, count: usize) {
    let phases = phases();
    // Written in place of zero-filling first (the output is the whole image).
    let start = dst.len();
    dst.reserve(count * w);
    let spare = &mut dst.spare_capacity_mut()[..count * w];
    for (y, out) in spare.chunks_exact_mut(w).enumerate() {
        let ([c0, c1, c2, c3], first) = phases[y % 4];
        let i = (y / 4) as i64 + first + 2;
        let row = |k: i64| &src[(i + k) as usize * w..][..w];
        let (p, q, r, s) = (row(0), row(1), row(2), row(3));
        for ((((o, &p), &q), &r), &s) in out.iter_mut().zip(p).zip(q).zip(r).zip(s) {
            o.write(O::of(c0 * p + c1 * q + c2 * r + c3 * s));
        }
    }
    // SAFETY: the loop above wrote all count * w values after `start`
    // (chunks_exact over exactly that many, every element of each chunk).
    unsafe { dst.set_len(start + count * w) };
}
}
