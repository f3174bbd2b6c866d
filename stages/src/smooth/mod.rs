//! smooth: the Gaussian-smoothed target x̂ of the normalized view.
//!
//! Reference: `../shared/testvectors/photo224_blur_sigma{10,1.25}.npy`, the
//! separable Gaussian of `photo224_normalized` with radius `ceil(3 sigma)`,
//! weights `exp(-k^2 / 2 sigma^2)` summing to 1, border `reflect` (mirror
//! without repeating the edge pixel). [`blur_exact`] is that definition
//! (f64 accumulation) and matches the vectors within 1e-4 (float32 storage
//! of the reference and of our input).
//!
//! [`blur_fast`] is what the chain runs:
//! - small sigma (radius <= [`FIR_MAX_RADIUS`]): the same FIR in f32, folded
//!   around the symmetric center, one vectorizable pass over whole rows for
//!   each axis (the horizontal pass works on a transposed plane);
//! - from sigma 8 on, on sizes that are multiples of 4 (the 224 px views):
//!   reduce 4x, blur the small image, interpolate back (`pyramid.rs`, whose
//!   doc gives the method and its error against the untruncated Gaussian);
//! - other large sigmas: Deriche's 4th-order recursive Gaussian (IIR, as two
//!   second-order sections in parallel: 8 multiply-adds per direction and
//!   pixel whatever sigma is), run over a signal extended by 3 sigma of
//!   reflected rows so the border matches.
//!
//! Both large-sigma paths stand for the untruncated Gaussian, while the
//! reference cuts at 3 sigma (0.27% of the mass) and renormalizes: that
//! alone moves values by up to 0.0067 on the testvector photos at sigma 10.
//! Max abs error against the reference there (test
//! `fast_path_error_against_reference_is_small`, bound 0.02 as the README
//! allows; the test prints the value): 0.0072 for the pyramid at sigma 10
//! (0.0063 for the recursive filter, which 224 px views no longer take).
//!
//! Blurring commutes with the per-channel normalization (weights sum to 1),
//! so this stage may equally be run on pixels before normalizing.

use crate::sample::{Rgb8, StageError};
use crate::simd::multiversion;
use serde::{Deserialize, Serialize};

mod pyramid;
pub use pyramid::PYRAMID_MIN_SIGMA;

/// `stages.smooth` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Gaussian sigma in pixels of the output view (paper: 10 at 224).
    pub sigma: f64,
    /// `fast` (recursive for large sigma) or `exact` (the reference FIR).
    pub method: Method,
}

/// Which implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The documented fast path (FIR for small sigma, Deriche IIR for large).
    #[default]
    Fast,
    /// The exact separable reference.
    Exact,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            sigma: 10.0,
            method: Method::Fast,
        }
    }
}

/// Largest kernel radius for which the fast path still uses the FIR.
pub const FIR_MAX_RADIUS: usize = 8;

/// Blur a C x H x W float image (each channel independently).
pub fn apply(
    cfg: &Config,
    image: &[f32],
    channels: usize,
    height: usize,
    width: usize,
) -> Result<Vec<f32>, StageError> {
    let mut out = Vec::new();
    apply_into(cfg, image, channels, height, width, &mut out)?;
    Ok(out)
}

/// A positive, finite sigma (an infinite one would size the kernels without bound).
fn check_sigma(cfg: &Config) -> Result<(), StageError> {
    if cfg.sigma > 0.0 && cfg.sigma.is_finite() {
        Ok(())
    } else {
        Err(StageError::Config(format!(
            "smooth.sigma {} must be positive and finite",
            cfg.sigma
        )))
    }
}

/// [`apply`] into `out` (cleared first; a caller's buffer, reused between calls).
pub fn apply_into(
    cfg: &Config,
    image: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    out: &mut Vec<f32>,
) -> Result<(), StageError> {
    check_sigma(cfg)?;
    if image.len() != channels * height * width {
        return Err(StageError::Config(format!(
            "smooth: image of {} values is not {channels}x{height}x{width}",
            image.len()
        )));
    }
    match cfg.method {
        Method::Exact => *out = blur_exact(image, channels, height, width, cfg.sigma),
        Method::Fast => blur_fast_into(image, channels, height, width, cfg.sigma, out),
    }
    Ok(())
}

/// The reference kernel: radius `ceil(3 sigma)`, `exp(-k^2 / 2 sigma^2)`, normalized.
pub fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    let r = (3.0 * sigma).ceil() as i64;
    let w: Vec<f64> = (-r..=r)
        .map(|k| (-(k * k) as f64 / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = w.iter().sum();
    w.into_iter().map(|v| v / s).collect()
}

/// numpy's `reflect` (PyTorch's reflect padding): `-1 -> 1`, `n -> n - 2`,
/// repeated for offsets longer than the signal.
#[inline]
pub fn reflect(i: i64, n: usize) -> usize {
    let n = n as i64;
    if n == 1 {
        return 0;
    }
    let period = 2 * n - 2;
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - m }) as usize
}

/// The exact separable Gaussian (rows then columns), f64 accumulation.
pub fn blur_exact(image: &[f32], channels: usize, height: usize, width: usize, sigma: f64) -> Vec<f32> {
    let k = gaussian_kernel(sigma);
    let r = (k.len() / 2) as i64;
    let plane = height * width;
    let mut out = vec![0f32; image.len()];
    let mut tmp = vec![0f64; plane];
    for c in 0..channels {
        let src = &image[c * plane..(c + 1) * plane];
        for y in 0..height {
            for x in 0..width {
                let mut acc = 0.0;
                for (j, &w) in k.iter().enumerate() {
                    acc += w * src[y * width + reflect(x as i64 + j as i64 - r, width)] as f64;
                }
                tmp[y * width + x] = acc;
            }
        }
        for y in 0..height {
            for x in 0..width {
                let mut acc = 0.0;
                for (j, &w) in k.iter().enumerate() {
                    acc += w * tmp[reflect(y as i64 + j as i64 - r, height) * width + x];
                }
                out[c * plane + y * width + x] = acc as f32;
            }
        }
    }
    out
}

/// The fast path (see the module doc for the method and its error).
pub fn blur_fast(image: &[f32], channels: usize, height: usize, width: usize, sigma: f64) -> Vec<f32> {
    let mut out = Vec::new();
    blur_fast_into(image, channels, height, width, sigma, &mut out);
    out
}

/// [`blur_fast`] into `out` (cleared first).
fn blur_fast_into(image: &[f32], channels: usize, height: usize, width: usize, sigma: f64, out: &mut Vec<f32>) {
    let radius = (3.0 * sigma).ceil() as usize;
    let plane = height * width;
    // Filled plane by plane; the pyramid path appends its rows, so the
    // output is never zero-filled first (a 600 kB memset per 224 px view).
    out.clear();
    out.reserve(image.len());
    // Temporaries live in per-thread buffers: allocating ~1 MB afresh per
    // image made the allocator hand pages back to the kernel and fault them
    // in again (a fifth of the chain's time in `pipeline bench data`).
    // They carry no state between calls: every element is written before read.
    thread_local! {
        static BUFFERS: std::cell::RefCell<[Vec<f32>; 3]> = Default::default();
    }
    let mut bufs = BUFFERS.with(|b| b.take());
    let iir = if radius > FIR_MAX_RADIUS {
        Some(Deriche::new(sigma))
    } else {
        None
    };
    let kernel: Vec<f32> = gaussian_kernel(sigma).into_iter().map(|v| v as f32).collect();
    for c in 0..channels {
        let src = &image[c * plane..(c + 1) * plane];
        let [t, u, scratch] = &mut bufs;
        if pyramid::applies(sigma, height, width) {
            pyramid::blur_plane(src, height, width, sigma, out, t, u);
            continue;
        }
        t.resize(plane, 0.0);
        u.resize(plane, 0.0);
        out.resize((c + 1) * plane, 0.0);
        let dst = &mut out[c * plane..(c + 1) * plane];
        // Along y on the plane, transpose, along y again (= along x), transpose back.
        match &iir {
            Some(d) => d.columns(src, u, height, width, scratch),
            None => fir_columns(src, u, height, width, &kernel),
        }
        transpose(u, t, height, width);
        match &iir {
            Some(d) => d.columns(t, u, width, height, scratch),
            None => fir_columns(t, u, width, height, &kernel),
        }
        transpose(u, dst, width, height);
    }
    BUFFERS.with(|b| b.replace(bufs));
}

/// `dst (w x h) = src (h x w)` transposed: 8 x 8 blocks in AVX registers
/// where the CPU has AVX, the scalar loop elsewhere and for the edges.
fn transpose(src: &[f32], dst: &mut [f32], h: usize, w: usize) {
    transpose_rows(src, w, dst, h, w)
}

/// [`transpose`] of the h x w matrix whose row y starts at `src[y * stride]`.
fn transpose_rows(src: &[f32], stride: usize, dst: &mut [f32], h: usize, w: usize) {
    if h == 0 || w == 0 {
        return;
    }
    let (src, dst) = (&src[..(h - 1) * stride + w], &mut dst[..h * w]);
    let (h8, w8) = (h / 8 * 8, w / 8 * 8);
    #[cfg(target_arch = "x86_64")]
    let done = if std::is_x86_feature_detected!("avx") {
        // SAFETY: AVX is present (checked above); every block read and write
        // is inside the slices, whose lengths are h * w (see transpose8x8_avx).
        unsafe { transpose_blocks_avx(src, stride, dst, h, w) };
        true
    } else {
        false
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = false;
    let (bh, bw) = if done { (h8, w8) } else { (0, 0) };
    // Whatever the blocks did not cover: columns >= bw of all rows, and rows
    // >= bh of the first bw columns.
    for y in 0..h {
        let x0 = if y < bh { bw } else { 0 };
        for x in x0..w {
            dst[x * h + y] = src[y * stride + x];
        }
    }
}

/// All full 8 x 8 blocks of an h x w transpose.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_blocks_avx(src: &[f32], stride: usize, dst: &mut [f32], h: usize, w: usize) {
    use std::arch::x86_64::*;
    assert!(stride >= w && src.len() >= (h - 1) * stride + w && dst.len() >= h * w);
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    for y0 in (0..h / 8 * 8).step_by(8) {
        for x0 in (0..w / 8 * 8).step_by(8) {
            // SAFETY: rows y0..y0+8 and columns x0..x0+8 are inside h x w,
            // and the transposed block inside w x h (asserted lengths).
            unsafe {
                let mut out: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(sp.add((y0 + i) * stride + x0)));
                crate::simd::transpose8x8(&mut out);
                for (i, v) in out.into_iter().enumerate() {
                    _mm256_storeu_ps(dp.add((x0 + i) * h + y0), v);
                }
            }
        }
    }
}

multiversion! {
/// FIR along y: each output row is a weighted sum of whole input rows
/// (contiguous inner loops), folded around the center tap.
fn fir_columns / fir_columns_scalar(src: &[f32], dst: &mut [f32], h: usize, w: usize, kernel: &[f32]) {
    let r = kernel.len() / 2;
    for y in 0..h {
        let out = &mut dst[y * w..(y + 1) * w];
        let center = &src[y * w..(y + 1) * w];
        for (o, &s) in out.iter_mut().zip(center) {
            *o = kernel[r] * s;
        }
        for k in 1..=r {
            let a = reflect(y as i64 - k as i64, h);
            let b = reflect(y as i64 + k as i64, h);
            let (ra, rb) = (&src[a * w..(a + 1) * w], &src[b * w..(b + 1) * w]);
            let wk = kernel[r + k];
            for ((o, &p), &q) in out.iter_mut().zip(ra).zip(rb) {
                *o += wk * (p + q);
            }
        }
    }
}
}

/// Deriche's 4th-order recursive approximation of the Gaussian (Deriche 1993,
/// "Recursively implementing the Gaussian and its derivatives"): for x >= 0,
/// `exp(-x^2/2s^2) ~ (a0 cos(w0 x/s) + a1 sin(w0 x/s)) e^{-b0 x/s}
///                 + (c0 cos(w1 x/s) + c1 sin(w1 x/s)) e^{-b1 x/s}`.
/// The causal part sums h(m) x(n - m) for m >= 0, the anticausal part
/// h(m) x(n + m) for m >= 1. Each of the two terms is a pair of complex
/// conjugate poles, run here as its own second-order recursion ("parallel
/// form") rather than one fourth-order recursion: the same filter, but two
/// independent chains of one multiply-add per sample instead of one chain,
/// so the recursion is no longer bound by the latency of its feedback.
/// Coefficients are derived from the poles and scaled to unit DC gain.
pub struct Deriche {
    /// Per section: causal numerator (a0, a1) on x[n], x[n-1].
    causal: [[f64; 2]; 2],
    /// Per section: anticausal numerator (c1, c2) on x[n+1], x[n+2].
    anti: [[f64; 2]; 2],
    /// Per section: denominator (b1, b2): `y[n] = ... - b1 y[n-1] - b2 y[n-2]`.
    den: [[f64; 2]; 2],
    /// Extension on each side, in samples (reflected signal).
    pad: usize,
}

#[derive(Clone, Copy)]
struct C(f64, f64);
impl C {
    fn mul(self, o: C) -> C {
        C(self.0 * o.0 - self.1 * o.1, self.0 * o.1 + self.1 * o.0)
    }
    fn conj(self) -> C {
        C(self.0, -self.1)
    }
}

impl Deriche {
    /// Coefficients for `sigma` (pixels).
    pub fn new(sigma: f64) -> Deriche {
        let (a0, a1, b0, b1, w0, w1, c0, c1) = (1.680, 3.735, 1.783, 1.723, 0.6318, 1.997, -0.6803, -0.2598);
        let pole = |b: f64, w: f64| {
            let m = (-b / sigma).exp();
            C(m * (w / sigma).cos(), m * (w / sigma).sin())
        };
        // h(n) = 2 Re(alpha p^n) per section, for n >= 0.
        let sections = [
            (pole(b0, w0), C(a0 / 2.0, -a1 / 2.0)),
            (pole(b1, w1), C(c0 / 2.0, -c1 / 2.0)),
        ];
        let (mut causal, mut anti, mut den) = ([[0.0; 2]; 2], [[0.0; 2]; 2], [[0.0; 2]; 2]);
        for (s, &(p, alpha)) in sections.iter().enumerate() {
            // alpha / (1 - p z^-1) + conj: numerator 2 Re(alpha) - 2 Re(alpha conj(p)) z^-1
            // over 1 - 2 Re(p) z^-1 + |p|^2 z^-2; the anticausal sum from m = 1
            // has numerator 2 Re(alpha p) z - 2 |p|^2 Re(alpha) z^2 over the mirrored denominator.
            let p2 = p.mul(p.conj()).0;
            den[s] = [-2.0 * p.0, p2];
            causal[s] = [2.0 * alpha.0, -2.0 * alpha.mul(p.conj()).0];
            anti[s] = [2.0 * alpha.mul(p).0, -2.0 * p2 * alpha.0];
        }
        // DC gain of h over all integers, summed over sections.
        let gain: f64 = (0..2)
            .map(|s| (causal[s][0] + causal[s][1] + anti[s][0] + anti[s][1]) / (1.0 + den[s][0] + den[s][1]))
            .sum();
        for s in 0..2 {
            for v in causal[s].iter_mut().chain(anti[s].iter_mut()) {
                *v /= gain;
            }
        }
        Deriche {
            causal,
            anti,
            den,
            // The slowest pole decays as e^{-1.723 n / sigma}; after 3 sigma
            // a start-up transient is down to 0.6% of its size, and it starts
            // small (the steady state of the nearest row). On the testvectors
            // 3 sigma and 4 sigma of padding give the same max error (0.0063),
            // 2 sigma 0.018; the two recursions run h + pad rows each.
            pad: (3.0 * sigma).ceil() as usize,
        }
    }

    /// Filter along y: `src` and `dst` are h x w (see [`deriche_columns`]).
    fn columns(&self, src: &[f32], dst: &mut [f32], h: usize, w: usize, scratch: &mut Vec<f32>) {
        deriche_columns(self, src, dst, h, w, scratch)
    }

    /// The coefficients as the loops use them.
    fn taps(&self) -> Taps {
        let f = |v: f64| v as f32;
        let steady = |num: [f64; 2], s: usize| f((num[0] + num[1]) / (1.0 + self.den[s][0] + self.den[s][1]));
        Taps {
            causal: [0, 1].map(|s| [f(self.causal[s][0]), f(self.causal[s][1])]),
            anti: [0, 1].map(|s| [f(self.anti[s][0]), f(self.anti[s][1])]),
            neg_den: [0, 1].map(|s| [f(-self.den[s][0]), f(-self.den[s][1])]),
            causal_steady: [0, 1].map(|s| steady(self.causal[s], s)),
            anti_steady: [0, 1].map(|s| steady(self.anti[s], s)),
        }
    }
}

/// [`Deriche`]'s coefficients in f32, denominators negated (every update is
/// then a chain of multiply-adds), and each section's gain on a constant
/// signal (its steady state, where a recursion starts).
#[derive(Clone, Copy)]
struct Taps {
    causal: [[f32; 2]; 2],
    anti: [[f32; 2]; 2],
    neg_den: [[f32; 2]; 2],
    causal_steady: [f32; 2],
    anti_steady: [f32; 2],
}

/// One step of a second-order section:
/// `y = (-b1) y1 + ((-b2) y2 + (n1 u1 + n0 u0))`, one rounding per multiply-add.
/// Every path (scalar, AVX2) evaluates exactly this, in this order.
#[inline(always)]
fn section(n: [f32; 2], neg_den: [f32; 2], u0: f32, u1: f32, y1: f32, y2: f32) -> f32 {
    neg_den[0].mul_add(y1, neg_den[1].mul_add(y2, n[1].mul_add(u1, n[0] * u0)))
}

/// Deriche along y, vectorized across the w columns: the causal and
/// anticausal recursions run over the signal extended by `pad` reflected rows
/// on each side, each started at the steady state of a constant signal equal
/// to its first row (the start-up transient then decays within the pad).
///
/// The columns go in strips (16 on AVX2, two registers of 8, whose state
/// stays in registers; single columns for the rest and on other CPUs);
/// `scratch` holds one strip's causal output, which the anticausal pass adds
/// to its own on the fly. Whole-plane passes spilled a 0.5 MB working set
/// out of L2 and ran at memory speed.
fn deriche_columns(d: &Deriche, src: &[f32], dst: &mut [f32], h: usize, w: usize, scratch: &mut Vec<f32>) {
    let pad = d.pad;
    let len = h + 2 * pad;
    assert!(src.len() >= h * w && dst.len() >= h * w);
    // Source row of each row of the extended signal.
    let rows: Vec<usize> = (0..len).map(|n| reflect(n as i64 - pad as i64, h)).collect();
    let taps = d.taps();
    scratch.resize(len * 16, 0.0);
    let mut x0 = 0;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        while x0 + 16 <= w {
            // SAFETY: AVX2 and FMA are present (checked above); columns
            // x0..x0 + 16 of every row are inside src and dst (asserted lengths).
            unsafe { avx2::deriche_strip16(&taps, src, dst, h, w, x0, &rows, scratch) };
            x0 += 16;
        }
    }
    for x in x0..w {
        deriche_strip(&taps, src, dst, h, w, x, &rows, scratch);
    }
}

/// [`deriche_columns`] on the single column `x`: the definition the AVX2
/// strips reproduce bit for bit.
#[allow(clippy::too_many_arguments)]
fn deriche_strip(
    t: &Taps,
    src: &[f32],
    dst: &mut [f32],
    h: usize,
    w: usize,
    x: usize,
    rows: &[usize],
    scratch: &mut [f32],
) {
    let (len, pad) = (rows.len(), (rows.len() - h) / 2);
    let load = |n: usize| src[rows[n] * w + x];
    // The causal output is needed on the image's rows only, so the causal
    // recursion stops at its last row (the anticausal one reads the bottom
    // pad's inputs itself).
    let yc = &mut scratch[..pad + h];
    // Causal, started at the steady state of the first row.
    let first = load(0);
    let mut u1 = first;
    let (mut a1, mut b1) = (t.causal_steady[0] * first, t.causal_steady[1] * first);
    let (mut a2, mut b2) = (a1, b1);
    for (k, yc) in yc.iter_mut().enumerate() {
        let u0 = load(k);
        let a = section(t.causal[0], t.neg_den[0], u0, u1, a1, a2);
        let b = section(t.causal[1], t.neg_den[1], u0, u1, b1, b2);
        *yc = a + b;
        (u1, a2, a1, b2, b1) = (u0, a1, a, b1, b);
    }
    // Anticausal (u1 = x[n + 1], u2 = x[n + 2]), started at the steady state
    // of the last row; rows inside the image are added to the causal output.
    let last = load(len - 1);
    let (mut u1, mut u2) = (last, last);
    let (mut a1, mut b1) = (t.anti_steady[0] * last, t.anti_steady[1] * last);
    let (mut a2, mut b2) = (a1, b1);
    for k in (pad..len).rev() {
        let a = section(t.anti[0], t.neg_den[0], u1, u2, a1, a2);
        let b = section(t.anti[1], t.neg_den[1], u1, u2, b1, b2);
        if k < pad + h {
            dst[(k - pad) * w + x] = yc[k] + (a + b);
        }
        (u2, u1, a2, a1, b2, b1) = (u1, load(k), a1, a, b1, b);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Taps;
    use std::arch::x86_64::*;

    /// [`super::section`] on 8 lanes (the same operations in the same order).
    #[inline(always)]
    unsafe fn section(n: [__m256; 2], neg_den: [__m256; 2], u0: __m256, u1: __m256, y1: __m256, y2: __m256) -> __m256 {
        _mm256_fmadd_ps(
            neg_den[0],
            y1,
            _mm256_fmadd_ps(neg_den[1], y2, _mm256_fmadd_ps(n[1], u1, _mm256_mul_ps(n[0], u0))),
        )
    }

    /// [`super::deriche_strip`] on columns `x0..x0 + 16`, as two independent
    /// strips of 8 interleaved in one loop (four independent recursions per
    /// row keep both multiply-add units busy).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn deriche_strip16(
        t: &Taps,
        src: &[f32],
        dst: &mut [f32],
        h: usize,
        w: usize,
        x0: usize,
        rows: &[usize],
        scratch: &mut [f32],
    ) {
        let (len, pad) = (rows.len(), (rows.len() - h) / 2);
        let (sp, dp, yc) = (src.as_ptr(), dst.as_mut_ptr(), scratch.as_mut_ptr());
        assert!(scratch.len() >= len * 16);
        let load = |n: usize, j: usize| _mm256_loadu_ps(sp.add(rows[n] * w + x0 + 8 * j));
        let set2 = |v: [f32; 2]| [_mm256_set1_ps(v[0]), _mm256_set1_ps(v[1])];
        let (ca, cb) = (set2(t.causal[0]), set2(t.causal[1]));
        let (aa, ab) = (set2(t.anti[0]), set2(t.anti[1]));
        let (da, db) = (set2(t.neg_den[0]), set2(t.neg_den[1]));
        let (sa, sb) = (_mm256_set1_ps(t.causal_steady[0]), _mm256_set1_ps(t.causal_steady[1]));
        let first = [load(0, 0), load(0, 1)];
        let mut u1 = first;
        let (mut a1, mut b1) = (first.map(|f| _mm256_mul_ps(sa, f)), first.map(|f| _mm256_mul_ps(sb, f)));
        let (mut a2, mut b2) = (a1, b1);
        for k in 0..pad + h {
            for j in 0..2 {
                let u0 = load(k, j);
                let a = section(ca, da, u0, u1[j], a1[j], a2[j]);
                let b = section(cb, db, u0, u1[j], b1[j], b2[j]);
                _mm256_storeu_ps(yc.add(k * 16 + 8 * j), _mm256_add_ps(a, b));
                (u1[j], a2[j], a1[j], b2[j], b1[j]) = (u0, a1[j], a, b1[j], b);
            }
        }
        let (sa, sb) = (_mm256_set1_ps(t.anti_steady[0]), _mm256_set1_ps(t.anti_steady[1]));
        let last = [load(len - 1, 0), load(len - 1, 1)];
        let (mut u1, mut u2) = (last, last);
        let (mut a1, mut b1) = (last.map(|l| _mm256_mul_ps(sa, l)), last.map(|l| _mm256_mul_ps(sb, l)));
        let (mut a2, mut b2) = (a1, b1);
        for k in (pad..len).rev() {
            for j in 0..2 {
                let a = section(aa, da, u1[j], u2[j], a1[j], a2[j]);
                let b = section(ab, db, u1[j], u2[j], b1[j], b2[j]);
                if k < pad + h {
                    let c = _mm256_loadu_ps(yc.add(k * 16 + 8 * j));
                    _mm256_storeu_ps(
                        dp.add((k - pad) * w + x0 + 8 * j),
                        _mm256_add_ps(c, _mm256_add_ps(a, b)),
                    );
                }
                (u2[j], u1[j], a2[j], a1[j], b2[j], b1[j]) = (u1[j], load(k, j), a1[j], a, b1[j], b);
            }
        }
    }
}

/// x̂ as u8 pixels, for the sink: blur the view's u8 pixels (H x W x 3) and
/// round back to u8 (H x W x 3). Blurring commutes with the normalization, so
/// normalizing this differs from blurring the normalized view only by the
/// rounding, at most 0.5 / 255 / std (DESIGN.md "Keep image data as u8"); with the
/// large-sigma paths (recursive or pyramid) also their DC-gain error times mean / std (< 2e-3).
pub fn apply_u8(cfg: &Config, pixels: &Rgb8) -> Result<Vec<u8>, StageError> {
    apply_u8_channels(cfg, &pixels.data, 3, pixels.height, pixels.width)
}

/// [`apply_u8`] of `channels` (1 or 3) interleaved u8 channels: a one-channel
/// view (`stages.channels: 1`) is blurred as its one plane.
pub fn apply_u8_channels(
    cfg: &Config,
    data: &[u8],
    channels: usize,
    h: usize,
    w: usize,
) -> Result<Vec<u8>, StageError> {
    let plane = h * w;
    if !(channels == 1 || channels == 3) || data.len() != channels * plane {
        return Err(StageError::Config(format!(
            "smooth: {} bytes are not {h}x{w} pixels of 1 or 3 channels ({channels} expected)",
            data.len()
        )));
    }
    // The u8 pyramid below runs before `apply_into`, which checks sigma too.
    check_sigma(cfg)?;
    // Plane by plane, and rounding as `+ 0.5` then truncation (the values
    // are clamped to [0, 255] first): `f32::round` is a libm call per value
    // on baseline x86-64, and the interleaved loops made this stage cost
    // twice the blur itself. One channel at a time: RGB split into u8 planes,
    // each blurred into its levels, the planes joined. The same values as
    // blurring the three float planes at once (the channels are independent),
    // with a third of the float memory: all three (1.2 MB with their blur)
    // pushed the view out of L2 before the targets stage read it.
    // The buffers are per thread (see blur_fast), every value written before read.
    thread_local! {
        static PLANES: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<u8>)> = Default::default();
    }
    let (mut a, mut b, mut split) = PLANES.with(|p| p.take());
    let source: &[u8] = if channels == 1 {
        data
    } else {
        split.resize(3 * plane, 0);
        let (r, rest) = split.split_at_mut(plane);
        let (g, bl) = rest.split_at_mut(plane);
        crate::simd::split_rgb(data, r, g, bl);
        &split
    };
    let mut levels = Vec::with_capacity(channels * plane);
    // The joined output is allocated before the blur, not after: allocated
    // after, it came from memory the allocator placed so that the blur's
    // transposes ran 60% slower (the smooth stage 8%, `bench data`).
    let mut out = Vec::with_capacity(if channels == 1 { 0 } else { 3 * plane });
    let mut done = Ok(());
    for c in 0..channels {
        done = blur_levels(
            cfg,
            &source[c * plane..(c + 1) * plane],
            h,
            w,
            &mut levels,
            &mut a,
            &mut b,
        );
        if done.is_err() {
            break;
        }
    }
    let out = if channels == 1 || done.is_err() {
        levels
    } else {
        let (r, rest) = levels.split_at(plane);
        let (g, bl) = rest.split_at(plane);
        // Written in place of zero-filling first.
        crate::simd::join_rgb(r, g, bl, &mut out.spare_capacity_mut()[..3 * plane]);
        // SAFETY: join_rgb wrote all 3 * plane values.
        unsafe { out.set_len(3 * plane) };
        out
    };
    PLANES.with(|p| p.replace((a, b, split)));
    done.map(|()| out)
}

/// One h x w plane of u8 levels blurred, its levels appended to `out`; `a` and
/// `b` are scratch. The pyramid reads and writes the levels itself (no
/// widened or rounded full-size plane); the other methods blur the widened
/// plane and round it: the same values either way.
fn blur_levels(
    cfg: &Config,
    plane: &[u8],
    h: usize,
    w: usize,
    out: &mut Vec<u8>,
    a: &mut Vec<f32>,
    b: &mut Vec<f32>,
) -> Result<(), StageError> {
    if cfg.method == Method::Fast && pyramid::applies(cfg.sigma, h, w) {
        pyramid::blur_plane(plane, h, w, cfg.sigma, out, a, b);
        return Ok(());
    }
    a.resize(plane.len(), 0.0);
    widen(plane, a);
    apply_into(cfg, a, 1, h, w, b)?;
    let start = out.len();
    out.resize(start + plane.len(), 0);
    round_to_levels(b, &mut out[start..]);
    Ok(())
}

multiversion! {
/// u8 values as f32.
fn widen / widen_scalar(bytes: &[u8], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(bytes) {
        *o = v as f32;
    }
}
}

multiversion! {
/// [`level`] of each value.
fn round_to_levels / round_to_levels_scalar(values: &[f32], out: &mut [u8]) {
    for (o, &v) in out.iter_mut().zip(values) {
        *o = level(v);
    }
}
}

/// A blurred value as a u8 level: clamped to [0, 255], rounded half up.
#[inline(always)]
fn level(v: f32) -> u8 {
    // max/min map NaN to 0 and keep the value in [0.5, 255.5), where the
    // unchecked conversion is defined (and vectorizes, unlike `as u8`'s
    // saturating conversion, which cost as much as the blur's first pass).
    // SAFETY: the argument is finite and in [0.5, 255.5).
    unsafe { (v.max(0.0).min(255.0) + 0.5).to_int_unchecked::<i32>() as u8 }
}

/// H x W x 3 u8 pixels into three f32 planes: the plain loop, the reference
/// for [`apply_u8_channels`]'s split-widen-blur-round-join (test).
#[cfg(test)]
fn to_planes_scalar(data: &[u8], planes: &mut [f32]) {
    let plane = data.len() / 3;
    let (r, rest) = planes.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (((p, r), g), b) in data.chunks_exact(3).zip(r).zip(g).zip(b) {
        (*r, *g, *b) = (p[0] as f32, p[1] as f32, p[2] as f32);
    }
}

/// Three f32 planes into H x W x 3 u8 pixels, rounded half up and clamped: the
/// plain loop, as [`to_planes_scalar`].
#[cfg(test)]
fn to_pixels_scalar(planes: &[f32], out: &mut [std::mem::MaybeUninit<u8>]) {
    let plane = planes.len() / 3;
    let (r, rest) = planes.split_at(plane);
    let (g, b) = rest.split_at(plane);
    for (((p, &r), &g), &b) in out.chunks_exact_mut(3).zip(r).zip(g).zip(b) {
        p[0].write(level(r));
        p[1].write(level(g));
        p[2].write(level(b));
    }
}

#[cfg(test)]
mod tests {
    /// One plane blurred alone is each channel of the three-channel blur of that
    /// plane replicated (a one-channel run's x̂ is what an RGB run's luma of x̂ was on grey).
    #[test]
    fn one_plane_blur_is_each_channel_of_the_replicated_blur() {
        let (h, w) = (20, 28);
        let plane: Vec<u8> = (0..h * w).map(|i| ((i * 37 + i / w * 11) % 256) as u8).collect();
        let rgb = crate::sample::Rgb8 {
            width: w,
            height: h,
            data: plane.iter().flat_map(|&v| [v; 3]).collect(),
        };
        for (sigma, method) in [
            (1.0, super::Method::Fast),
            (5.0, super::Method::Fast),
            (10.0, super::Method::Fast),
            (2.0, super::Method::Exact),
        ] {
            let cfg = super::Config { sigma, method };
            let three = super::apply_u8(&cfg, &rgb).unwrap();
            let one = super::apply_u8_channels(&cfg, &plane, 1, h, w).unwrap();
            for c in 0..3 {
                let channel: Vec<u8> = three.iter().skip(c).step_by(3).copied().collect();
                assert_eq!(channel, one, "sigma {sigma}, channel {c}");
            }
        }
        let cfg = super::Config {
            sigma: 1.0,
            method: super::Method::Fast,
        };
        assert!(super::apply_u8_channels(&cfg, &plane, 2, h, w).is_err());
    }

    /// The u8 x̂, normalized, is the blur of the normalized view up to the rounding
    /// to u8: at most 0.5 / 255 / std (plus f32 noise), for both methods.
    #[test]
    fn u8_smoothing_then_normalizing_matches_within_the_rounding() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (h, w) = (24, 20);
        // A smooth gradient plus noise, like a photo.
        let data: Vec<u8> = (0..h * w * 3)
            .map(|i| ((i / 3 % w) * 8 + rng.random_range(0..40)).min(255) as u8)
            .collect();
        let img = Rgb8 {
            width: w,
            height: h,
            data,
        };
        let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
        for (sigma, method) in [(1.25, Method::Fast), (10.0, Method::Fast), (2.0, Method::Exact)] {
            let cfg = Config { sigma, method };
            let want = apply(&cfg, &crate::augment::normalize(&img, mean, std), 3, h, w).unwrap();
            let u8s = Rgb8 {
                width: w,
                height: h,
                data: apply_u8(&cfg, &img).unwrap(),
            };
            let got = crate::augment::normalize(&u8s, mean, std);
            // Deriche's IIR (large sigma) has a DC gain a little off 1, so it commutes with
            // the normalization's offset -mean/std only up to that: 2e-3 more, still < 0.01.
            let iir = method == Method::Fast && (3.0 * sigma).ceil() as usize > FIR_MAX_RADIUS;
            for c in 0..3 {
                let bound = 0.5 / 255.0 / std[c] + if iir { 2e-3 } else { 1e-4 };
                let worst = (0..h * w)
                    .map(|i| (got[c * h * w + i] - want[c * h * w + i]).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst <= bound,
                    "sigma {sigma} {method:?} channel {c}: {worst} > {bound}"
                );
            }
        }
    }

    use super::*;
    use crate::npy::testvector;

    fn max_abs(a: &[f32], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max)
    }

    #[test]
    fn reflect_mirrors_without_repeating_the_edge() {
        let got: Vec<usize> = (-4..9).map(|i| reflect(i, 5)).collect();
        // numpy.pad(arange(5), 4, 'reflect')
        assert_eq!(got, vec![4, 3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1, 0]);
        assert_eq!(reflect(-3, 1), 0);
    }

    #[test]
    fn kernel_has_radius_ceil_3_sigma_and_sums_to_one() {
        assert_eq!(gaussian_kernel(10.0).len(), 61);
        assert_eq!(gaussian_kernel(1.25).len(), 9);
        assert!((gaussian_kernel(1.25).iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn exact_matches_testvectors() {
        let x = testvector("photo224_normalized.npy").to_f32();
        for (name, sigma) in [
            ("photo224_blur_sigma10.npy", 10.0),
            ("photo224_blur_sigma1.25.npy", 1.25),
        ] {
            let want = testvector(name);
            let plane = 3 * 224 * 224;
            // Two of the four photos keep the test quick at -O1.
            for i in 0..2 {
                let got = blur_exact(&x[i * plane..(i + 1) * plane], 3, 224, 224, sigma);
                let err = max_abs(&got, &want.data[i * plane..(i + 1) * plane]);
                assert!(err < 1e-4, "{name} photo {i}: max abs error {err}");
            }
        }
    }

    /// The fast path against the testvector (the reference), both sigmas, all
    /// four photos: within the README's 0.02 and printed.
    #[test]
    fn fast_path_error_against_reference_is_small() {
        let x = testvector("photo224_normalized.npy").to_f32();
        let plane = 3 * 224 * 224;
        for (name, sigma, bound) in [
            ("photo224_blur_sigma10.npy", 10.0, 0.02),
            ("photo224_blur_sigma1.25.npy", 1.25, 1e-4),
        ] {
            let want = testvector(name);
            let mut worst = 0f64;
            for i in 0..4 {
                let got = blur_fast(&x[i * plane..(i + 1) * plane], 3, 224, 224, sigma);
                worst = worst.max(max_abs(&got, &want.data[i * plane..(i + 1) * plane]));
            }
            println!("fast blur sigma {sigma}: max abs error {worst:.5} vs reference");
            // The baseline build of the FIR loops gives the same bits (the
            // recursive filter's paths: `deriche_strips_agree_with_single_columns`).
            let img = &x[..224 * 224];
            let (mut a, mut b) = (vec![0f32; 224 * 224], vec![0f32; 224 * 224]);
            let k: Vec<f32> = gaussian_kernel(sigma).iter().map(|&v| v as f32).collect();
            fir_columns(img, &mut a, 224, 224, &k);
            fir_columns_scalar(img, &mut b, 224, 224, &k);
            assert_eq!(a, b);
            assert!(worst < bound, "{name}: max abs error {worst}");
        }
    }

    /// Deriche's impulse response against the sampled Gaussian, and the
    /// fast path on small, odd-sized images against the exact one.
    #[test]
    fn recursive_impulse_response_is_gaussian() {
        for sigma in [3.0, 10.0, 25.0] {
            let n = 401;
            let mut img = vec![0f32; n];
            img[200] = 1.0;
            let d = Deriche::new(sigma);
            let mut out = vec![0f32; n];
            d.columns(&img, &mut out, n, 1, &mut Vec::new());
            let norm: f64 = (-200..=200)
                .map(|k: i64| (-((k * k) as f64) / (2.0 * sigma * sigma)).exp())
                .sum();
            let peak = 1.0 / norm;
            for (i, &o) in out.iter().enumerate() {
                let k = i as f64 - 200.0;
                let g = (-k * k / (2.0 * sigma * sigma)).exp() / norm;
                assert!((o as f64 - g).abs() < 2e-3 * peak, "sigma {sigma} at {k}: {o} vs {g}");
            }
        }
        let img: Vec<f32> = (0..3 * 37 * 53)
            .map(|i| ((i * 7919) % 97) as f32 / 40.0 - 1.2)
            .collect();
        for sigma in [0.8, 2.0, 4.0] {
            let a = blur_exact(&img, 3, 37, 53, sigma);
            let b = blur_fast(&img, 3, 37, 53, sigma);
            let err = b.iter().zip(&a).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            assert!(err < 0.03, "sigma {sigma}: {err}");
        }
    }

    /// The AVX block transpose and its scalar edges against the definition,
    /// on sizes with and without full 8 x 8 blocks.
    /// Strips of 16 columns (AVX2) and single columns give the same bits,
    /// and the tail of a width that is no multiple of 16 is filtered.
    #[test]
    fn deriche_strips_agree_with_single_columns() {
        let (h, w) = (37, 37);
        let src: Vec<f32> = (0..h * w).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let d = Deriche::new(6.0);
        let rows: Vec<usize> = (0..h + 2 * d.pad)
            .map(|n| reflect(n as i64 - d.pad as i64, h))
            .collect();
        let mut scratch = Vec::new();
        let mut strips = vec![f32::NAN; h * w];
        deriche_columns(&d, &src, &mut strips, h, w, &mut scratch);
        let mut single = vec![f32::NAN; h * w];
        for x in 0..w {
            deriche_strip(&d.taps(), &src, &mut single, h, w, x, &rows, &mut scratch);
        }
        assert!(single.iter().all(|v| v.is_finite()));
        assert_eq!(strips, single);
    }

    /// An independent f64 Gaussian without truncation (radius 8 sigma), reflect border.
    fn untruncated_gaussian(img: &[f32], h: usize, w: usize, sigma: f64) -> Vec<f64> {
        let r = (8.0 * sigma).ceil() as i64;
        let k: Vec<f64> = (-r..=r)
            .map(|j| (-((j * j) as f64) / (2.0 * sigma * sigma)).exp())
            .collect();
        let sum: f64 = k.iter().sum();
        let mut tmp = vec![0f64; h * w];
        for y in 0..h {
            for x in 0..w {
                tmp[y * w + x] = (-r..=r)
                    .map(|j| k[(j + r) as usize] * img[y * w + reflect(x as i64 + j, w)] as f64)
                    .sum::<f64>()
                    / sum;
            }
        }
        let mut out = vec![0f64; h * w];
        for y in 0..h {
            for x in 0..w {
                out[y * w + x] = (-r..=r)
                    .map(|j| k[(j + r) as usize] * tmp[reflect(y as i64 + j, h) * w + x])
                    .sum::<f64>()
                    / sum;
            }
        }
        out
    }

    /// The pyramid path against an independent untruncated Gaussian: on a
    /// testvector photo at sigma 10 (one channel; measured 0.0009), and on a synthetic image
    /// with sharp edges at sizes where the reflected border wraps (smaller
    /// than the blur's reach) and non-square. A position off by one pixel
    /// would cost about 0.05 at these edges.
    #[test]
    fn pyramid_is_close_to_the_untruncated_gaussian() {
        let x = testvector("photo224_normalized.npy").to_f32();
        let photo = &x[..224 * 224];
        assert!(pyramid::applies(10.0, 224, 224));
        let got = blur_fast(photo, 1, 224, 224, 10.0);
        let want = untruncated_gaussian(photo, 224, 224, 10.0);
        let err = max_abs(&got, &want);
        println!("pyramid sigma 10 vs untruncated Gaussian: max abs {err:.5}");
        assert!(err < 2e-3, "{err}");
        for (h, w, sigma) in [(64, 96, 8.0), (32, 48, 12.0), (224, 160, 25.0)] {
            assert!(pyramid::applies(sigma, h, w));
            // Squares of +-2 (a black-to-white edge after normalization) and a ramp.
            let img: Vec<f32> = (0..h * w)
                .map(|i| {
                    let (y, x) = (i / w, i % w);
                    (if (y / 11 + x / 7) % 2 == 0 { 2.0 } else { -2.0 }) + x as f32 / w as f32
                })
                .collect();
            let got = blur_fast(&img, 1, h, w, sigma);
            let want = untruncated_gaussian(&img, h, w, sigma);
            let err = max_abs(&got, &want);
            println!("pyramid {h}x{w} sigma {sigma} on squares of +-2: max abs {err:.5}");
            // Measured 0.0042 at sigma 8 (this harsh image), 0.0004 at 12.
            assert!(err < 6e-3, "{h}x{w} sigma {sigma}: {err}");
        }
        assert!(!pyramid::applies(7.9, 224, 224) && !pyramid::applies(10.0, 222, 224));
    }

    /// The pyramid's loops: the AVX2 build and the baseline give the same bits.
    #[test]
    fn pyramid_loops_agree_with_their_scalar_twins() {
        use pyramid::*;
        let (h, w) = (37, 29);
        let src: Vec<f32> = (0..h * w).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let rows: Vec<usize> = (0..20).map(|i| reflect(i as i64 - 3, h)).collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        reduce_rows(&src, &rows, w, &mut a, 9);
        reduce_rows_scalar(&src, &rows, w, &mut b, 9);
        assert_eq!((a.len(), &a), (9 * w, &b));
        let kernel = [0.1f32, 0.2, 0.4, 0.2, 0.1];
        fir_rows(&src, w, &mut a, h - 4, &kernel);
        fir_rows_scalar(&src, w, &mut b, h - 4, &kernel);
        assert_eq!((a.len(), &a), ((h - 4) * w, &b));
        let (mut a, mut b) = (Vec::<f32>::new(), Vec::new());
        expand_rows(&src, w, &mut a, 4 * (h - 5));
        expand_rows_scalar(&src, w, &mut b, 4 * (h - 5));
        assert_eq!((a.len(), &a), (4 * (h - 5) * w, &b));
        // u8 in and out: the f32 loops on the widened levels, then rounded.
        let levels: Vec<u8> = (0..h * w).map(|i| (i * 7919 % 256) as u8).collect();
        let widened: Vec<f32> = levels.iter().map(|&v| v as f32).collect();
        let (mut from_levels, mut from_floats) = (Vec::new(), Vec::new());
        reduce_rows(&levels, &rows, w, &mut from_levels, 9);
        reduce_rows(&widened, &rows, w, &mut from_floats, 9);
        assert_eq!(from_levels, from_floats);
        let (mut rounded, mut plain) = (Vec::<u8>::new(), Vec::<f32>::new());
        expand_rows(&src, w, &mut rounded, 4 * (h - 5));
        expand_rows(&src, w, &mut plain, 4 * (h - 5));
        assert!(rounded.iter().zip(&plain).all(|(&r, &p)| r == super::level(p)));
    }

    /// The u8 blur one channel at a time (split, widen, blur, round, join) is
    /// the plain composition's: the three float planes (`to_planes`) blurred
    /// at once and rounded (`to_pixels`), bit for bit, on the pyramid, FIR and
    /// exact paths, for views whose pixel count is and is not a multiple of 16;
    /// and the byte shuffles split and join as the plain loops do.
    #[test]
    fn channel_by_channel_u8_blur_is_the_plain_composition() {
        for (h, w, sigma, method) in [
            (224, 224, 10.0, super::Method::Fast),
            (20, 28, 1.5, super::Method::Fast),
            (13, 7, 2.0, super::Method::Exact),
        ] {
            let data: Vec<u8> = (0..3 * h * w)
                .map(|i| ((i * 7919 + i / (3 * w) * 31) % 256) as u8)
                .collect();
            let cfg = super::Config { sigma, method };
            let got = super::apply_u8_channels(&cfg, &data, 3, h, w).unwrap();
            let mut planes = vec![0f32; 3 * h * w];
            super::to_planes_scalar(&data, &mut planes);
            let blurred = super::apply(&cfg, &planes, 3, h, w).unwrap();
            let mut want = vec![std::mem::MaybeUninit::new(0u8); 3 * h * w];
            super::to_pixels_scalar(&blurred, &mut want);
            // SAFETY: every byte was initialized.
            let want: Vec<u8> = want.iter().map(|v| unsafe { v.assume_init() }).collect();
            assert!(got == want, "{h} x {w}, sigma {sigma}");
            let mut split = vec![0u8; 3 * h * w];
            {
                let (r, rest) = split.split_at_mut(h * w);
                let (g, b) = rest.split_at_mut(h * w);
                crate::simd::split_rgb(&data, r, g, b);
            }
            assert!(
                split.iter().zip(&planes).all(|(&a, &b)| a as f32 == b),
                "{h} x {w}: split"
            );
            let mut joined = vec![std::mem::MaybeUninit::new(0u8); 3 * h * w];
            let (r, rest) = split.split_at(h * w);
            let (g, b) = rest.split_at(h * w);
            crate::simd::join_rgb(r, g, b, &mut joined);
            // SAFETY: as above.
            assert!(
                joined.iter().zip(&data).all(|(a, &b)| unsafe { a.assume_init() } == b),
                "{h} x {w}: join"
            );
        }
    }

    #[test]
    fn transpose_is_a_transpose() {
        for (h, w) in [(224, 224), (13, 37), (8, 8), (7, 3), (16, 9)] {
            let src: Vec<f32> = (0..h * w).map(|i| i as f32).collect();
            let mut dst = vec![-1f32; h * w];
            transpose(&src, &mut dst, h, w);
            for y in 0..h {
                for x in 0..w {
                    assert_eq!(dst[x * h + y], src[y * w + x], "{h}x{w} at {y},{x}");
                }
            }
            // Every other row: the h / 2 x w matrix of rows 0, 2, 4, ...
            let half = h / 2;
            let mut dst = vec![-1f32; half * w];
            transpose_rows(&src, 2 * w, &mut dst, half, w);
            for y in 0..half {
                for x in 0..w {
                    assert_eq!(dst[x * half + y], src[2 * y * w + x], "{h}x{w} at {y},{x}");
                }
            }
        }
    }

    #[test]
    fn bad_config_and_shape_are_errors() {
        let cfg = Config {
            sigma: 0.0,
            ..Config::default()
        };
        assert!(apply(&cfg, &[0.0; 12], 3, 2, 2).is_err());
        assert!(apply(&Config::default(), &[0.0; 11], 3, 2, 2).is_err());
        // The u8 path checks sigma before its pyramid (an infinite sigma had
        // passed the pyramid's `sigma >= 8` and sized a kernel without bound).
        for sigma in [f64::INFINITY, f64::NAN, -1.0] {
            let cfg = Config {
                sigma,
                ..Config::default()
            };
            for channels in [1, 3] {
                let err = apply_u8_channels(&cfg, &vec![0u8; channels * 32 * 32], channels, 32, 32);
                assert!(err.is_err(), "sigma {sigma}, {channels} channels");
            }
        }
    }
}
