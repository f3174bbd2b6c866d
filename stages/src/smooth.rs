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
//! - large sigma: Deriche's 4th-order recursive Gaussian (IIR, 8 multiply-adds
//!   per direction and pixel whatever sigma is), run over a reflect-extended
//!   signal so the border matches. Its kernel is the untruncated Gaussian,
//!   while the reference cuts at 3 sigma (0.27% of the mass) and renormalizes;
//!   together with Deriche's approximation error this leaves a max abs error
//!   against the reference of about 0.01 on normalized photos (test:
//!   `fast_path_error_against_reference_is_small`, bound 0.02 as the README
//!   allows; the measured value is printed by that test).
//!
//! Blurring commutes with the per-channel normalization (weights sum to 1),
//! so this stage may equally be run on pixels before normalizing.

use crate::sample::{Rgb8, StageError};
use crate::simd::multiversion;
use serde::{Deserialize, Serialize};

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
    if !(cfg.sigma > 0.0 && cfg.sigma.is_finite()) {
        return Err(StageError::Config(format!(
            "smooth.sigma {} must be positive",
            cfg.sigma
        )));
    }
    if image.len() != channels * height * width {
        return Err(StageError::Config(format!(
            "smooth: image of {} values is not {channels}x{height}x{width}",
            image.len()
        )));
    }
    Ok(match cfg.method {
        Method::Exact => blur_exact(image, channels, height, width, cfg.sigma),
        Method::Fast => blur_fast(image, channels, height, width, cfg.sigma),
    })
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
    let radius = (3.0 * sigma).ceil() as usize;
    let plane = height * width;
    let mut out = vec![0f32; image.len()];
    // Temporaries live in per-thread buffers: allocating ~1 MB afresh per
    // image made the allocator hand pages back to the kernel and fault them
    // in again (a fifth of the chain's time in `pipeline bench data`).
    // They carry no state between calls: every element is written before read.
    thread_local! {
        static BUFFERS: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> = Default::default();
    }
    let mut bufs = BUFFERS.with(|b| b.take());
    let (t, u, scratch) = (&mut bufs.0, &mut bufs.1, &mut bufs.2);
    t.resize(plane, 0.0);
    u.resize(plane, 0.0);
    let iir = if radius > FIR_MAX_RADIUS {
        Some(Deriche::new(sigma))
    } else {
        None
    };
    let kernel: Vec<f32> = gaussian_kernel(sigma).into_iter().map(|v| v as f32).collect();
    for c in 0..channels {
        let src = &image[c * plane..(c + 1) * plane];
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
    out
}

/// `dst (w x h) = src (h x w)` transposed: 8 x 8 blocks in AVX registers
/// where the CPU has AVX, the scalar loop elsewhere and for the edges.
fn transpose(src: &[f32], dst: &mut [f32], h: usize, w: usize) {
    let (src, dst) = (&src[..h * w], &mut dst[..h * w]);
    let (h8, w8) = (h / 8 * 8, w / 8 * 8);
    #[cfg(target_arch = "x86_64")]
    let done = if std::is_x86_feature_detected!("avx") {
        // SAFETY: AVX is present (checked above); every block read and write
        // is inside the slices, whose lengths are h * w (see transpose8x8_avx).
        unsafe { transpose_blocks_avx(src, dst, h, w) };
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
            dst[x * h + y] = src[y * w + x];
        }
    }
}

/// All full 8 x 8 blocks of an h x w transpose.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_blocks_avx(src: &[f32], dst: &mut [f32], h: usize, w: usize) {
    use std::arch::x86_64::*;
    assert!(src.len() >= h * w && dst.len() >= h * w);
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    for y0 in (0..h / 8 * 8).step_by(8) {
        for x0 in (0..w / 8 * 8).step_by(8) {
            // SAFETY: rows y0..y0+8 and columns x0..x0+8 are inside h x w,
            // and the transposed block inside w x h (asserted lengths).
            unsafe {
                let r = |i: usize| _mm256_loadu_ps(sp.add((y0 + i) * w + x0));
                let (r0, r1, r2, r3, r4, r5, r6, r7) = (r(0), r(1), r(2), r(3), r(4), r(5), r(6), r(7));
                let t0 = _mm256_unpacklo_ps(r0, r1);
                let t1 = _mm256_unpackhi_ps(r0, r1);
                let t2 = _mm256_unpacklo_ps(r2, r3);
                let t3 = _mm256_unpackhi_ps(r2, r3);
                let t4 = _mm256_unpacklo_ps(r4, r5);
                let t5 = _mm256_unpackhi_ps(r4, r5);
                let t6 = _mm256_unpacklo_ps(r6, r7);
                let t7 = _mm256_unpackhi_ps(r6, r7);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let out = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
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
/// h(m) x(n + m) for m >= 1; both share the denominator. Coefficients are
/// derived here from the poles (complex arithmetic) and scaled to unit DC gain.
pub struct Deriche {
    /// Causal numerator b0..b3 (taps x[n], x[n-1], ...).
    causal: [f64; 4],
    /// Anticausal numerator (taps x[n+1] .. x[n+4]).
    anti: [f64; 4],
    /// Denominator d1..d4 (y[n] = num - d1 y[n-1] - ...).
    den: [f64; 4],
    /// Extension on each side, in samples (reflected signal).
    pad: usize,
}

#[derive(Clone, Copy)]
struct C(f64, f64);
impl C {
    fn mul(self, o: C) -> C {
        C(self.0 * o.0 - self.1 * o.1, self.0 * o.1 + self.1 * o.0)
    }
    fn add(self, o: C) -> C {
        C(self.0 + o.0, self.1 + o.1)
    }
    fn scale(self, s: f64) -> C {
        C(self.0 * s, self.1 * s)
    }
}

/// Multiply polynomials (coefficient of z^-i at index i).
fn poly_mul(a: &[C], b: &[C]) -> Vec<C> {
    let mut out = vec![C(0.0, 0.0); a.len() + b.len() - 1];
    for (i, &x) in a.iter().enumerate() {
        for (j, &y) in b.iter().enumerate() {
            out[i + j] = out[i + j].add(x.mul(y));
        }
    }
    out
}

impl Deriche {
    /// Coefficients for `sigma` (pixels).
    pub fn new(sigma: f64) -> Deriche {
        let (a0, a1, b0, b1, w0, w1, c0, c1) = (1.680, 3.735, 1.783, 1.723, 0.6318, 1.997, -0.6803, -0.2598);
        let pole = |b: f64, w: f64| {
            let m = (-b / sigma).exp();
            C(m * (w / sigma).cos(), m * (w / sigma).sin())
        };
        let (p0, p1) = (pole(b0, w0), pole(b1, w1));
        let poles = [p0, C(p0.0, -p0.1), p1, C(p1.0, -p1.1)];
        // h(n) = sum_k alpha_k p_k^n for n >= 0.
        let alpha = [
            C(a0 / 2.0, -a1 / 2.0),
            C(a0 / 2.0, a1 / 2.0),
            C(c0 / 2.0, -c1 / 2.0),
            C(c0 / 2.0, c1 / 2.0),
        ];
        // Denominator prod (1 - p_k z^-1).
        let mut den = vec![C(1.0, 0.0)];
        for &p in &poles {
            den = poly_mul(&den, &[C(1.0, 0.0), p.scale(-1.0)]);
        }
        // Causal numerator sum_k alpha_k prod_{j != k} (1 - p_j z^-1);
        // anticausal (in powers of z) sum_k alpha_k p_k z prod_{j != k} (1 - p_j z).
        let mut causal = vec![C(0.0, 0.0); 4];
        let mut anti = vec![C(0.0, 0.0); 5];
        for k in 0..4 {
            let mut num = vec![alpha[k]];
            for (j, &p) in poles.iter().enumerate() {
                if j != k {
                    num = poly_mul(&num, &[C(1.0, 0.0), p.scale(-1.0)]);
                }
            }
            for i in 0..4 {
                causal[i] = causal[i].add(num[i]);
                anti[i + 1] = anti[i + 1].add(num[i].mul(poles[k]));
            }
        }
        // DC gain of h over all integers: (sum causal + sum anti) / sum den.
        let sum = |v: &[C]| v.iter().map(|c| c.0).sum::<f64>();
        let gain = (sum(&causal) + sum(&anti)) / sum(&den);
        Deriche {
            causal: [
                causal[0].0 / gain,
                causal[1].0 / gain,
                causal[2].0 / gain,
                causal[3].0 / gain,
            ],
            anti: [anti[1].0 / gain, anti[2].0 / gain, anti[3].0 / gain, anti[4].0 / gain],
            den: [den[1].0, den[2].0, den[3].0, den[4].0],
            // The slowest pole decays as e^{-1.723 n / sigma}; after 4 sigma
            // a start-up transient is down to 1e-3 of its size (and it starts
            // small: the steady state of the nearest row).
            pad: (4.0 * sigma).ceil() as usize,
        }
    }

    /// Filter along y: `src` and `dst` are h x w (see [`deriche_columns`]).
    fn columns(&self, src: &[f32], dst: &mut [f32], h: usize, w: usize, scratch: &mut Vec<f32>) {
        deriche_columns(self, src, dst, h, w, scratch)
    }
}

multiversion! {
/// Deriche along y, vectorized across the w columns: the causal and
/// anticausal recursions run over the signal extended by `pad` reflected rows
/// on each side, each started at the steady state of a constant signal equal
/// to its first row (the start-up transient then decays within the pad).
///
/// The columns go in strips of 8 whose recursion state stays in registers;
/// `scratch` holds one strip's causal output (`len` rows of 8), which the
/// anticausal pass adds to its own on the fly. Whole-plane passes spilled a
/// 0.5 MB working set out of L2 and ran at memory speed.
fn deriche_columns / deriche_columns_scalar(
    d: &Deriche,
    src: &[f32],
    dst: &mut [f32],
    h: usize,
    w: usize,
    scratch: &mut Vec<f32>,
) {
    let pad = d.pad;
    let len = h + 2 * pad;
    // Source row of each row of the extended signal.
    let rows: Vec<usize> = (0..len).map(|n| reflect(n as i64 - pad as i64, h)).collect();
    scratch.resize(len * LANES, 0.0);
    let mut x0 = 0;
    while x0 + LANES <= w {
        deriche_strip::<LANES>(d, src, dst, w, x0, &rows, scratch);
        x0 += LANES;
    }
    for x in x0..w {
        deriche_strip::<1>(d, src, dst, w, x, &rows, scratch);
    }
}
}

/// Columns per strip: one AVX register of f32 (16, two registers, measured
/// slower: the state no longer fits in registers).
const LANES: usize = 8;

/// [`deriche_columns`] on columns `x0..x0 + L`. Every strip width gives the
/// same bits (the same expressions per column). The feedback of the newest
/// output `y1` is subtracted last: each row then waits on one multiply and
/// one subtract of the previous row, not on the whole sum (the recursion was
/// latency-bound).
#[inline(always)]
fn deriche_strip<const L: usize>(
    d: &Deriche,
    src: &[f32],
    dst: &mut [f32],
    w: usize,
    x0: usize,
    rows: &[usize],
    scratch: &mut [f32],
) {
    type V<const L: usize> = [f32; L];
    let (len, pad) = (rows.len(), d.pad);
    let h = len - 2 * pad;
    let load = |n: usize| -> V<L> { src[rows[n] * w + x0..][..L].try_into().unwrap() };
    let [n0, n1, n2, n3] = d.causal.map(|v| v as f32);
    let [m1, m2, m3, m4] = d.anti.map(|v| v as f32);
    let [d1, d2, d3, d4] = d.den.map(|v| v as f32);
    let dsum = 1.0 + d1 + d2 + d3 + d4;
    let yc = &mut scratch[..len * L];
    // Causal, started at the steady state of the first row.
    let gc = (n0 + n1 + n2 + n3) / dsum;
    let first = load(0);
    let (mut x1, mut x2, mut x3) = (first, first, first);
    let mut y1: V<L> = std::array::from_fn(|i| gc * first[i]);
    let (mut y2, mut y3, mut y4) = (y1, y1, y1);
    for k in 0..len {
        let x = load(k);
        let y: V<L> = std::array::from_fn(|i| {
            (n0 * x[i] + n1 * x1[i] + n2 * x2[i] + n3 * x3[i] - d4 * y4[i] - d3 * y3[i] - d2 * y2[i]) - d1 * y1[i]
        });
        yc[k * L..][..L].copy_from_slice(&y);
        (x3, x2, x1) = (x2, x1, x);
        (y4, y3, y2, y1) = (y3, y2, y1, y);
    }
    // Anticausal, started at the steady state of the last row; rows inside
    // the image are summed with the causal output and written out.
    let ga = (m1 + m2 + m3 + m4) / dsum;
    let last = load(len - 1);
    let (mut x1, mut x2, mut x3, mut x4) = (last, last, last, last);
    let mut y1: V<L> = std::array::from_fn(|i| ga * last[i]);
    let (mut y2, mut y3, mut y4) = (y1, y1, y1);
    for k in (pad..len).rev() {
        let y: V<L> = std::array::from_fn(|i| {
            (m1 * x1[i] + m2 * x2[i] + m3 * x3[i] + m4 * x4[i] - d4 * y4[i] - d3 * y3[i] - d2 * y2[i]) - d1 * y1[i]
        });
        if k < pad + h {
            let c = &yc[k * L..][..L];
            let out = &mut dst[(k - pad) * w + x0..][..L];
            for i in 0..L {
                out[i] = c[i] + y[i];
            }
        }
        (x4, x3, x2, x1) = (x3, x2, x1, load(k));
        (y4, y3, y2, y1) = (y3, y2, y1, y);
    }
}

/// x̂ as u8 pixels, for the sink: blur the view's u8 pixels (H x W x 3) and
/// round back to u8 (H x W x 3). Blurring commutes with the normalization, so
/// normalizing this differs from blurring the normalized view only by the
/// rounding, at most 0.5 / 255 / std (DESIGN.md "Keep image data as u8"); with the
/// recursive filter (large sigma) also its DC-gain error times mean / std (< 2e-3).
pub fn apply_u8(cfg: &Config, pixels: &Rgb8) -> Result<Vec<u8>, StageError> {
    let (h, w) = (pixels.height, pixels.width);
    let plane = h * w;
    if pixels.data.len() != 3 * plane {
        return Err(StageError::Config(format!(
            "smooth: {} bytes are not {h}x{w} RGB pixels",
            pixels.data.len()
        )));
    }
    // Plane by plane, and rounding as `+ 0.5` then truncation (the values
    // are clamped to [0, 255] first): `f32::round` is a libm call per value
    // on baseline x86-64, and the interleaved loops made this stage cost
    // twice the blur itself.
    let mut planes = vec![0f32; 3 * plane];
    to_planes(&pixels.data, &mut planes);
    let blurred = apply(cfg, &planes, 3, h, w)?;
    let mut out = vec![0u8; 3 * plane];
    to_pixels(&blurred, &mut out);
    Ok(out)
}

multiversion! {
/// H x W x 3 u8 pixels into three f32 planes.
fn to_planes / to_planes_scalar(data: &[u8], planes: &mut [f32]) {
    let plane = data.len() / 3;
    let (r, rest) = planes.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (((p, r), g), b) in data.chunks_exact(3).zip(r).zip(g).zip(b) {
        (*r, *g, *b) = (p[0] as f32, p[1] as f32, p[2] as f32);
    }
}
}

multiversion! {
/// Three f32 planes into H x W x 3 u8 pixels, rounded half up and clamped.
fn to_pixels / to_pixels_scalar(planes: &[f32], out: &mut [u8]) {
    let plane = planes.len() / 3;
    let (r, rest) = planes.split_at(plane);
    let (g, b) = rest.split_at(plane);
    let to_u8 = |v: f32| (v.clamp(0.0, 255.0) + 0.5) as u8;
    for (((p, &r), &g), &b) in out.chunks_exact_mut(3).zip(r).zip(g).zip(b) {
        (p[0], p[1], p[2]) = (to_u8(r), to_u8(g), to_u8(b));
    }
}
}

#[cfg(test)]
mod tests {
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
            // The baseline build of the same loops gives the same bits.
            let d = Deriche::new(sigma);
            let img = &x[..224 * 224];
            let (mut a, mut b) = (vec![0f32; 224 * 224], vec![0f32; 224 * 224]);
            deriche_columns(&d, img, &mut a, 224, 224, &mut Vec::new());
            deriche_columns_scalar(&d, img, &mut b, 224, 224, &mut Vec::new());
            assert_eq!(a, b);
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
    /// Strips of 8 columns (AVX2 and baseline builds) and single columns give
    /// the same bits, and the odd tail of a width that is no multiple of 8 is filtered.
    #[test]
    fn deriche_strips_agree_with_single_columns() {
        let (h, w) = (37, 21);
        let src: Vec<f32> = (0..h * w).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let d = Deriche::new(6.0);
        let rows: Vec<usize> = (0..h + 2 * d.pad)
            .map(|n| reflect(n as i64 - d.pad as i64, h))
            .collect();
        let mut scratch = Vec::new();
        let (mut simd, mut scalar) = (vec![f32::NAN; h * w], vec![f32::NAN; h * w]);
        deriche_columns(&d, &src, &mut simd, h, w, &mut scratch);
        deriche_columns_scalar(&d, &src, &mut scalar, h, w, &mut scratch);
        let mut single = vec![f32::NAN; h * w];
        scratch.resize(rows.len(), 0.0);
        for x in 0..w {
            deriche_strip::<1>(&d, &src, &mut single, w, x, &rows, &mut scratch);
        }
        assert!(single.iter().all(|v| v.is_finite()));
        assert_eq!(simd, single);
        assert_eq!(scalar, single);
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
    }
}
