//! hog target: MaskFeat's histograms of oriented gradients per patch.
//!
//! Reference: `../shared/testvectors/photo224_hog.npy` (4 x 196 x 108), made
//! from the u8 pixels of `photo224_normalized`: reflect pad 1, per-channel
//! Sobel `gx = left - right`, `gy = top - bottom`, magnitude
//! `sqrt(gx^2 + gy^2)`, `bin = floor(atan2(gx, gy) / pi * 9) mod 9`,
//! magnitudes summed per cell of P/2 x P/2 px, each cell's 9 bins
//! L2-normalized per channel (eps 1e-12), laid out per patch at
//! `((c * 9 + bin) * 2 + cell_y) * 2 + cell_x` (108 values for P = 16).
//! Compared per patch by cosine similarity (mean at least 0.995, 1st
//! percentile at least 0.98, the README's bounds), because hard binning at the 0 / pi
//! boundary is sensitive to the sign of a float zero in the reference.
//!
//! Working from the u8 pixels with integer gradients keeps flat cells exactly
//! zero (and normalization cannot change HOG: each cell is L2-normalized per
//! channel). [`hog_reference`] bins with `atan2`; [`hog`] (the chain's path)
//! folds the gradient into the upper half-plane and counts the bin borders
//! `k pi / 9` it passes with cross products, no trigonometry. Integer
//! gradients never lie exactly on a border other than 0, so the two agree
//! bin for bin (test `fast_binning_equals_atan2_binning`).

use crate::sample::{Rgb8, StageError};
use crate::simd::multiversion;

/// Orientation bins (unsigned, over pi).
pub const BINS: usize = 9;

/// Values per patch: 3 channels x 9 bins x 2 x 2 cells.
pub const DIMS: usize = 3 * BINS * 4;

/// Per-pixel Sobel gradients of one channel with reflect-1 borders (i32).
#[inline]
fn sobel_at(img: &Rgb8, x: usize, y: usize, c: usize) -> (i32, i32) {
    let (w, h) = (img.width, img.height);
    let xm = if x == 0 { 1.min(w - 1) } else { x - 1 };
    let xp = if x + 1 == w { x.saturating_sub(1) } else { x + 1 };
    let ym = if y == 0 { 1.min(h - 1) } else { y - 1 };
    let yp = if y + 1 == h { y.saturating_sub(1) } else { y + 1 };
    let p = |x: usize, y: usize| img.at(x, y, c) as i32;
    let gx = (p(xm, ym) + 2 * p(xm, y) + p(xm, yp)) - (p(xp, ym) + 2 * p(xp, y) + p(xp, yp));
    let gy = (p(xm, ym) + 2 * p(x, ym) + p(xp, ym)) - (p(xm, yp) + 2 * p(x, yp) + p(xp, yp));
    (gx, gy)
}

/// `floor(atan2(gx, gy) / pi * 9) mod 9`, the reference definition.
pub fn bin_atan2(gx: i32, gy: i32) -> usize {
    let t = (gx as f64).atan2(gy as f64) / std::f64::consts::PI * BINS as f64;
    (t.floor() as i64).rem_euclid(BINS as i64) as usize
}

/// Cotangents of the bin borders k pi / 9, k = 1..8, for [`bin_fast`].
fn borders() -> [f32; BINS - 1] {
    std::array::from_fn(|k| {
        let a = (k + 1) as f64 * std::f64::consts::PI / BINS as f64;
        (a.cos() / a.sin()) as f32
    })
}

/// The same bin as [`bin_atan2`] without trigonometry: rotate by pi into
/// atan2's [0, pi) (unsigned orientation; atan2's first argument, gx, is the
/// angle's "y"), then count the borders at or below the angle. On (0, pi)
/// the cotangent `gy / gx` decreases with the angle, so for gx > 0 the angle
/// is >= a exactly when `gy <= gx cot a`: 8 multiplies and compares that
/// vectorize, no division (a test checks every integer gradient). The angle 0
/// with gx = 0 (gy > 0) passes no border: bin 0, as atan2 gives; gx = gy = 0
/// counts as bin 8, where its magnitude 0 changes nothing.
#[inline(always)]
fn bin_fast(gx: i32, gy: i32, cot: &[f32; BINS - 1]) -> u32 {
    let flip = gx < 0 || (gx == 0 && gy < 0);
    let (fx, fy) = if flip {
        (-gx as f32, -gy as f32)
    } else {
        (gx as f32, gy as f32)
    };
    let mut bin = 0u32;
    for c in cot {
        bin += u32::from(fy <= fx * *c);
    }
    bin
}

fn check(img: &Rgb8, patch: usize) -> Result<(usize, usize), StageError> {
    if patch < 2
        || patch % 2 != 0
        || img.width % patch != 0
        || img.height % patch != 0
        || img.width < 2
        || img.height < 2
    {
        return Err(StageError::Config(format!(
            "hog: {}x{} image does not split into {patch} px patches of 2x2 cells",
            img.width, img.height
        )));
    }
    Ok((img.width / patch, img.height / patch))
}

/// Shared back half: cell histograms `[cy][cx][c][bin]` to per-patch layout,
/// each cell L2-normalized per channel on the way.
fn layout(hist: &[f32], gw: usize, gh: usize) -> Vec<f32> {
    // All the norms first, then their reciprocals, then one multiply per
    // value: done cell by cell, each cell's square root and division waited
    // on its sum (a chain of 9 adds), and this function took an eighth of HOG.
    let inverse_norms: Vec<f64> = hist
        .chunks_exact(BINS)
        .map(|cell| cell.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .collect::<Vec<f64>>()
        .into_iter()
        .map(|sum| 1.0 / sum.sqrt().max(1e-12))
        .collect();
    let cw = gw * 2;
    // Two passes: every cell normalized in place of its histogram (contiguous,
    // so it vectorizes), then each patch's four cells interleaved into its
    // layout. One scattered pass with a multiply per store took a fifth of HOG.
    let normed = normalize_cells(hist, &inverse_norms);
    // Written in place of zero-filling first (an 85 kB memset per 224 px view).
    let mut out: Vec<f32> = Vec::with_capacity(gw * gh * DIMS);
    for (p, dst) in out.spare_capacity_mut()[..gw * gh * DIMS]
        .chunks_exact_mut(DIMS)
        .enumerate()
    {
        let (py, px) = (p / gw, p % gw);
        // The cells (cy, cx) = (0, 0), (0, 1), (1, 0), (1, 1): q = cy * 2 + cx.
        let cell = |cy: usize, cx: usize| -> &[f32; 3 * BINS] {
            let at = ((py * 2 + cy) * cw + px * 2 + cx) * 3 * BINS;
            normed[at..at + 3 * BINS].try_into().expect("3 x BINS values")
        };
        let cells = [cell(0, 0), cell(0, 1), cell(1, 0), cell(1, 1)];
        // Value (c, b) of cell q goes to ((c * BINS + b) * 2 + cy) * 2 + cx = (c * BINS + b) * 4 + q.
        for (cb, four) in dst.chunks_exact_mut(4).enumerate() {
            for (q, v) in four.iter_mut().enumerate() {
                v.write(cells[q][cb]);
            }
        }
    }
    // SAFETY: each patch's DIMS values were written above (3 x BINS groups of 4).
    unsafe { out.set_len(gw * gh * DIMS) };
    out
}

multiversion! {
/// Each cell channel's 9 bins times its inverse norm, in f64 and rounded to f32.
fn normalize_cells / normalize_cells_scalar(hist: &[f32], inverse_norms: &[f64]) -> Vec<f32> {
    let cells = hist.len() / BINS;
    assert!(inverse_norms.len() >= cells, "an inverse norm per cell channel");
    // Written in place of zero-filling first.
    let mut normed: Vec<f32> = Vec::with_capacity(cells * BINS);
    let spare = &mut normed.spare_capacity_mut()[..cells * BINS];
    for ((out, bins), &inv) in spare.chunks_exact_mut(BINS).zip(hist.chunks_exact(BINS)).zip(inverse_norms) {
        for (o, &v) in out.iter_mut().zip(bins) {
            o.write((v as f64 * inv) as f32);
        }
    }
    // SAFETY: the loop wrote all cells * BINS values (`inverse_norms` has one
    // per chunk, asserted above).
    unsafe { normed.set_len(cells * BINS) };
    normed
}
}

/// HOG by the letter of the definition (atan2 binning): `(N, 108)`.
pub fn hog_reference(img: &Rgb8, patch: usize) -> Result<Vec<f32>, StageError> {
    let (gw, gh) = check(img, patch)?;
    let cell = patch / 2;
    let cw = gw * 2;
    let mut hist = vec![0f32; gw * gh * 4 * 3 * BINS];
    for y in 0..img.height {
        for x in 0..img.width {
            for c in 0..3 {
                let (gx, gy) = sobel_at(img, x, y, c);
                let mag = ((gx * gx + gy * gy) as f64).sqrt();
                hist[((y / cell) * cw + x / cell) * 3 * BINS + c * BINS + bin_atan2(gx, gy)] += mag as f32;
            }
        }
    }
    Ok(layout(&hist, gw, gh))
}

/// The chain's HOG: the same result as [`hog_reference`] (up to the order of
/// float sums). 8 px cells (16 px patches, the paper's) take [`cells8`]
/// (AVX-512 or AVX2, or its scalar twin: the same bits on each); other cell sizes
/// take [`hog_rows`].
pub fn hog(img: &Rgb8, patch: usize) -> Result<Vec<f32>, StageError> {
    hog_channels(img, patch, 3)
}

/// [`hog`] of a grey image given as three equal channels (`Rgb8::grey`, what a
/// one-channel run's targets see): the cells of the first channel only, copied
/// to the other two, which are equal by construction. The same bits as [`hog`]
/// (tested) for a third of the cells' work.
pub fn hog_of_grey(img: &Rgb8, patch: usize) -> Result<Vec<f32>, StageError> {
    hog_channels(img, patch, 1)
}

/// HOG from the cells of the first `channels` channels (3, or 1 for three equal ones).
fn hog_channels(img: &Rgb8, patch: usize, channels: usize) -> Result<Vec<f32>, StageError> {
    let (gw, gh) = check(img, patch)?;
    if patch != 16 {
        return hog_rows(img, patch);
    }
    // Per-thread buffers, not zero-filled per image (2% of the chain): the
    // planes get every byte from `padded_planes`, the histograms every cell
    // from `cells8` (test `cells8_paths_agree` starts them as NaN).
    thread_local! {
        static BUFFERS: std::cell::RefCell<(Vec<u8>, Vec<f32>)> = Default::default();
    }
    let (mut planes, mut hist) = BUFFERS.with(|b| b.take());
    padded_planes(img, &mut planes);
    hist.resize(gw * gh * 4 * 3 * BINS, 0.0);
    cells8_fastest(&planes, img.width, img.height, channels, &mut hist);
    if channels == 1 {
        for cell in hist.chunks_exact_mut(3 * BINS) {
            let (first, rest) = cell.split_at_mut(BINS);
            rest[..BINS].copy_from_slice(first);
            rest[BINS..].copy_from_slice(first);
        }
    }
    let out = layout(&hist, gw, gh);
    BUFFERS.with(|b| b.replace((planes, hist)));
    Ok(out)
}

/// [`cells8`] on the widest vectors this CPU has: AVX-512, AVX2 or none (the
/// same bits on each: test `cells8_paths_agree`).
fn cells8_fastest(planes: &[u8], w: usize, h: usize, channels: usize, hist: &mut [f32]) {
    let cot = borders();
    #[cfg(target_arch = "x86_64")]
    {
        if avx512::available() {
            // SAFETY: AVX-512F, AVX-512DQ, AVX2 and FMA are present (checked).
            return unsafe { avx512::cells8(planes, w, h, channels, &cot, hist) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA are present (checked).
            return unsafe { avx2::cells8(planes, w, h, channels, &cot, hist) };
        }
    }
    cells8(planes, w, h, channels, &cot, hist)
}

/// The image as three u8 planes with a 1 px reflected border ((h + 2) x (w + 2)
/// each): the Sobel taps of every pixel are then plain offsets.
fn padded_planes(img: &Rgb8, planes: &mut Vec<u8>) {
    let (w, h) = (img.width, img.height);
    let (pw, ph) = (w + 2, h + 2);
    // Every byte is written below (rows 0..ph, columns 1..=w, then 0 and w + 1).
    planes.resize(3 * pw * ph, 0);
    for y in 0..ph {
        let sy = crate::smooth::reflect(y as i64 - 1, h);
        let row = &img.data[sy * w * 3..][..w * 3];
        let (r, rest) = planes[y * pw..].split_at_mut(ph * pw);
        let (g, rest) = rest.split_at_mut(ph * pw);
        crate::simd::split_rgb(row, &mut r[1..=w], &mut g[1..=w], &mut rest[1..=w]);
        for c in 0..3 {
            let out = &mut planes[(c * ph + y) * pw..][..pw];
            out[0] = out[2.min(w)];
            out[w + 1] = out[(w - 1).max(1)];
        }
    }
}

/// Orientation histograms of 8 x 8 px cells, `hist[((cy * cells_x + cx) * 3 + c) * 9 + bin]`,
/// from [`padded_planes`], in 8 lanes (one per pixel of a cell row) the way
/// [`avx2::cells8`] computes them: cumulative sums `C_k` = the magnitudes
/// of the pixels whose bin is k or more, per lane over the cell's 8 rows in
/// order (adding 0 for the others), the lanes summed as
/// `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`, and bin b is
/// `C_b - C_(b+1)`. An empty bin has `C_b` and `C_(b+1)` summed from the same
/// values in the same order: exactly 0. The differences round a little
/// differently from direct sums (about 1e-7 of the cell's total magnitude).
/// Channels `0..channels` only (the others' cells are left as they are).
fn cells8(planes: &[u8], w: usize, h: usize, channels: usize, cot: &[f32; BINS - 1], hist: &mut [f32]) {
    let (pw, ph) = (w + 2, h + 2);
    for cy in 0..h / 8 {
        for c in 0..channels.min(3) {
            for cx in 0..w / 8 {
                let mut acc = [[0f32; 8]; BINS];
                for y in cy * 8..cy * 8 + 8 {
                    let row = |dy: usize| &planes[(c * ph + y + dy) * pw + cx * 8..][..10];
                    let (t, m, b) = (row(0), row(1), row(2));
                    for l in 0..8 {
                        let p = |r: &[u8], dx: usize| r[l + dx] as i32;
                        let gx = (p(t, 0) + 2 * p(m, 0) + p(b, 0)) - (p(t, 2) + 2 * p(m, 2) + p(b, 2));
                        let gy = (p(t, 0) + 2 * p(t, 1) + p(t, 2)) - (p(b, 0) + 2 * p(b, 1) + p(b, 2));
                        let mag = ((gx * gx + gy * gy) as f32).sqrt();
                        let bin = bin_fast(gx, gy, cot) as usize;
                        for (k, a) in acc.iter_mut().enumerate() {
                            a[l] += if bin >= k { mag } else { 0.0 };
                        }
                    }
                }
                let sums = acc.map(|a| ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])));
                let cell = &mut hist[((cy * (w / 8) + cx) * 3 + c) * BINS..][..BINS];
                for (k, o) in cell.iter_mut().enumerate() {
                    *o = sums[k] - sums.get(k + 1).copied().unwrap_or(0.0);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::BINS;
    use std::arch::x86_64::*;

    /// [`super::cells8`] with the 8 lanes in one register: `C_k` adds the
    /// magnitude where the pixel passed border k (`gy < gx cot k` with one
    /// rounding, which bins every integer gradient as `gy <= gx cot k` with two
    /// does, so the scalar twin's bins and sums are the same; the borders
    /// passed are a prefix, so that is where its bin is k or more).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn cells8(planes: &[u8], w: usize, h: usize, channels: usize, cot: &[f32; BINS - 1], hist: &mut [f32]) {
        let (pw, ph) = (w + 2, h + 2);
        assert!(planes.len() >= 3 * pw * ph && hist.len() >= (h / 8) * (w / 8) * 3 * BINS);
        let cot: [__m256; BINS - 1] = std::array::from_fn(|k| _mm256_set1_ps(cot[k]));
        for cy in 0..h / 8 {
            for c in 0..channels.min(3) {
                for cx in 0..w / 8 {
                    cell8(planes, w, h, c, cy, cx, &cot, hist);
                }
            }
        }
    }

    /// One cell of [`cells8`]: channel `c` of cell (`cx`, `cy`).
    ///
    /// # Safety
    /// AVX2 and FMA; `planes` and `hist` as [`cells8`] asserts them, `cx < w / 8`, `cy < h / 8`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn cell8(
        planes: &[u8],
        w: usize,
        h: usize,
        c: usize,
        cy: usize,
        cx: usize,
        cot: &[__m256; BINS - 1],
        hist: &mut [f32],
    ) {
        let (pw, ph) = (w + 2, h + 2);
        let zero = _mm256_setzero_si256();
        let load = |p: *const u8| _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
        // Gradients of the cell's 8 rows first, then the votes:
        // in one loop, the 9 accumulators and the Sobel taps did
        // not fit in the 16 registers and went through the stack.
        // Uninitialized, each row written below (a zeroed array was a memset
        // call per cell; `array::from_fn` a call per row).
        let mut rows = [const { std::mem::MaybeUninit::<[__m256; 3]>::uninit() }; 8];
        for (dy, row) in rows.iter_mut().enumerate() {
            let base = planes.as_ptr().add((c * ph + cy * 8 + dy) * pw + cx * 8);
            let (t, m, b) = (base, base.add(pw), base.add(2 * pw));
            let (tl, tc, tr) = (load(t), load(t.add(1)), load(t.add(2)));
            let (ml, mr) = (load(m), load(m.add(2)));
            let (bl, bc, br) = (load(b), load(b.add(1)), load(b.add(2)));
            let left = _mm256_add_epi32(_mm256_add_epi32(tl, bl), _mm256_slli_epi32::<1>(ml));
            let right = _mm256_add_epi32(_mm256_add_epi32(tr, br), _mm256_slli_epi32::<1>(mr));
            let top = _mm256_add_epi32(_mm256_add_epi32(tl, tr), _mm256_slli_epi32::<1>(tc));
            let bottom = _mm256_add_epi32(_mm256_add_epi32(bl, br), _mm256_slli_epi32::<1>(bc));
            let gx = _mm256_sub_epi32(left, right);
            let gy = _mm256_sub_epi32(top, bottom);
            // Rotate by pi where gx < 0, or gx = 0 and gy < 0; negating
            // the integers keeps a zero +0.0, as the scalar path has it.
            let flip = _mm256_or_si256(
                _mm256_cmpgt_epi32(zero, gx),
                _mm256_and_si256(_mm256_cmpeq_epi32(gx, zero), _mm256_cmpgt_epi32(zero, gy)),
            );
            let fx = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_xor_si256(gx, flip), flip));
            let fy = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_xor_si256(gy, flip), flip));
            // Exact in f32 (at most 2 * 1020^2 < 2^24), as the scalar i32 sum.
            let mag = _mm256_sqrt_ps(_mm256_fmadd_ps(fx, fx, _mm256_mul_ps(fy, fy)));
            row.write([fx, fy, mag]);
        }
        let mut acc = [_mm256_setzero_ps(); BINS];
        for row in &rows {
            // SAFETY: the loop above wrote all 8 rows.
            let [fx, fy, mag] = row.assume_init();
            acc[0] = _mm256_add_ps(acc[0], mag);
            for k in 1..BINS {
                // Border k passed where fy - fx cot k < 0 (one rounding, so
                // its sign is exact; never -0 as fy is never -0): the sign
                // bit picks mag. Two instructions instead of multiply,
                // compare and mask; the same bins for every integer
                // gradient (test `fast_binning_equals_atan2_binning`).
                let d = _mm256_fnmadd_ps(fx, cot[k - 1], fy);
                acc[k] = _mm256_add_ps(acc[k], _mm256_blendv_ps(_mm256_setzero_ps(), mag, d));
            }
        }
        let sums = acc.map(|a| lanes_sum(a));
        let cell = hist.as_mut_ptr().add(((cy * (w / 8) + cx) * 3 + c) * BINS);
        for k in 0..BINS {
            *cell.add(k) = sums[k] - if k + 1 < BINS { sums[k + 1] } else { 0.0 };
        }
    }

    /// The 8 lanes of a cell summed as [`super::cells8`] sums them:
    /// (l0 + l4, l1 + l5, l2 + l6, l3 + l7), then pairs 0 + 2 and 1 + 3, then the two.
    ///
    /// # Safety
    /// The CPU must have AVX; callers are `#[target_feature]` functions that checked it.
    #[inline(always)]
    unsafe fn lanes_sum(a: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let t = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps::<1>(t, t)))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::BINS;
    use std::arch::x86_64::*;

    /// Whether this CPU runs [`cells8`] (the AVX-512 the data stages' loops use,
    /// with the AVX2 path's FMA for an odd last cell).
    pub fn available() -> bool {
        crate::simd::avx512() && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }

    /// [`super::avx2::cells8`] on two cells side by side: lanes 0..8 are the 8
    /// columns of cell `cx`, lanes 8..16 those of cell `cx + 1`. Each lane sums
    /// the same magnitudes in the same order as an AVX2 lane, and each half is
    /// summed in [`super::avx2::lanes_sum`]'s order (one shuffle tree for both
    /// halves), so the cells get
    /// the AVX2 path's bits, and the scalar twin's. A border's sign bit is a
    /// mask for a masked add where the AVX2 path adds +0.0: the same sum, as
    /// one of non-negative magnitudes from +0.0 is never -0.0. An odd last cell
    /// takes the AVX2 cell.
    ///
    /// Why: on this CPU the AVX2 path's blend is several uops per 8 lanes, the
    /// masked add one per 16; the cells were a sixth of the data graph's time.
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    pub unsafe fn cells8(planes: &[u8], w: usize, h: usize, channels: usize, cot: &[f32; BINS - 1], hist: &mut [f32]) {
        let (pw, ph) = (w + 2, h + 2);
        assert!(planes.len() >= 3 * pw * ph && hist.len() >= (h / 8) * (w / 8) * 3 * BINS);
        let cot8: [__m256; BINS - 1] = std::array::from_fn(|k| _mm256_set1_ps(cot[k]));
        let cot: [__m512; BINS - 1] = std::array::from_fn(|k| _mm512_set1_ps(cot[k]));
        let zero = _mm512_setzero_si512();
        // 16 bytes at p as i32 lanes (a pair's last load ends at byte
        // (cx + 1) * 8 + 9 <= w + 1 of its padded row).
        let load = |p: *const u8| _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
        let cells_x = w / 8;
        for cy in 0..h / 8 {
            for c in 0..channels.min(3) {
                for cx in (0..cells_x - cells_x % 2).step_by(2) {
                    // Per padded row p: D = left - right and S = left + 2 centre +
                    // right of its three taps. Output row y's Sobel is then
                    // gx = D(y) + 2 D(y + 1) + D(y + 2) and gy = S(y) - S(y + 2):
                    // the AVX2 path's integers, from 10 rows of loads instead of 24.
                    let sums_of = |p: usize| {
                        let base = planes.as_ptr().add((c * ph + cy * 8 + p) * pw + cx * 8);
                        let (l, m, r) = (load(base), load(base.add(1)), load(base.add(2)));
                        let d = _mm512_sub_epi32(l, r);
                        let s = _mm512_add_epi32(_mm512_add_epi32(l, r), _mm512_slli_epi32::<1>(m));
                        (d, s)
                    };
                    let mut rows = [const { std::mem::MaybeUninit::<[__m512; 3]>::uninit() }; 8];
                    let (mut above, mut here) = (sums_of(0), sums_of(1));
                    for (dy, row) in rows.iter_mut().enumerate() {
                        let below = sums_of(dy + 2);
                        let gx = _mm512_add_epi32(_mm512_add_epi32(above.0, below.0), _mm512_slli_epi32::<1>(here.0));
                        let gy = _mm512_sub_epi32(above.1, below.1);
                        (above, here) = (here, below);
                        // The AVX2 path's rotation by pi: negated integers, so a zero stays +0.0.
                        let flip = _mm512_cmplt_epi32_mask(gx, zero)
                            | (_mm512_cmpeq_epi32_mask(gx, zero) & _mm512_cmplt_epi32_mask(gy, zero));
                        let fx = _mm512_cvtepi32_ps(_mm512_mask_sub_epi32(gx, flip, zero, gx));
                        let fy = _mm512_cvtepi32_ps(_mm512_mask_sub_epi32(gy, flip, zero, gy));
                        let mag = _mm512_sqrt_ps(_mm512_fmadd_ps(fx, fx, _mm512_mul_ps(fy, fy)));
                        row.write([fx, fy, mag]);
                    }
                    let mut acc = [_mm512_setzero_ps(); BINS];
                    for row in &rows {
                        // SAFETY: the loop above wrote all 8 rows.
                        let [fx, fy, mag] = row.assume_init();
                        acc[0] = _mm512_add_ps(acc[0], mag);
                        for k in 1..BINS {
                            let passed =
                                _mm512_movepi32_mask(_mm512_castps_si512(_mm512_fnmadd_ps(fx, cot[k - 1], fy)));
                            acc[k] = _mm512_mask_add_ps(acc[k], passed, acc[k], mag);
                        }
                    }
                    // Both cells' lane sums at once, in the tree of `avx2::lanes_sum`
                    // (per 8-lane half: lanes l and l + 4, then 0 + 2 and 1 + 3, then
                    // the two): the sum lands in lane 0 of each half.
                    let sums = acc.map(|a| {
                        let s = _mm512_add_ps(a, _mm512_shuffle_f32x4::<0b10_11_00_01>(a, a));
                        let t = _mm512_add_ps(s, _mm512_permute_ps::<0b01_00_11_10>(s));
                        _mm512_add_ps(t, _mm512_permute_ps::<0b00_00_00_01>(t))
                    });
                    let (first, second) = (
                        hist.as_mut_ptr().add(((cy * cells_x + cx) * 3 + c) * BINS),
                        hist.as_mut_ptr().add(((cy * cells_x + cx + 1) * 3 + c) * BINS),
                    );
                    for k in 0..BINS {
                        let next = if k + 1 < BINS { sums[k + 1] } else { _mm512_setzero_ps() };
                        let bin = _mm512_sub_ps(sums[k], next);
                        *first.add(k) = _mm512_cvtss_f32(bin);
                        *second.add(k) = _mm_cvtss_f32(_mm512_extractf32x4_ps::<2>(bin));
                    }
                }
                if cells_x % 2 == 1 {
                    super::avx2::cell8(planes, w, h, c, cy, cells_x - 1, &cot8, hist);
                }
            }
        }
    }
}

multiversion! {
/// HOG of any cell size: row-wise integer Sobel and trig-free binning in
/// loops the compiler vectorizes, magnitudes scattered into the cells.
pub fn hog_rows / hog_rows_scalar(img: &Rgb8, patch: usize) -> Result<Vec<f32>, StageError> {
    let (gw, gh) = check(img, patch)?;
    let (w, h) = (img.width, img.height);
    let cell = patch / 2;
    let cw = gw * 2;
    let cot = borders();
    // Four copies of the histograms, for pixels x mod 4: neighbors often
    // share a bin, and one copy made each add wait on the previous one's
    // store (summed in a fixed order at the end, so the result is the same
    // on every CPU).
    let cells = gw * gh * 4 * 3 * BINS;
    let mut hists = vec![0f32; 4 * cells];
    // Per row: vertical [1 2 1] sums and top - bottom differences for all
    // channel-pixels (contiguous), then the horizontal parts.
    let n = w * 3;
    let mut vs = vec![0i32; n]; // top + 2 mid + bottom
    let mut vd = vec![0i32; n]; // top - bottom
    let mut gxs = vec![0i32; n];
    let mut gys = vec![0i32; n];
    let mut mags = vec![0f32; n];
    let mut bins = vec![0u32; n];
    for y in 0..h {
        let ym = if y == 0 { 1 } else { y - 1 };
        let yp = if y + 1 == h { y - 1 } else { y + 1 };
        // Every slice re-cut to exactly n so the loops carry no bounds checks.
        let top = &img.data[ym * n..][..n];
        let mid = &img.data[y * n..][..n];
        let bot = &img.data[yp * n..][..n];
        let (vs, vd) = (&mut vs[..n], &mut vd[..n]);
        for i in 0..n {
            let (t, m, bo) = (top[i] as i32, mid[i] as i32, bot[i] as i32);
            vs[i] = t + 2 * m + bo;
            vd[i] = t - bo;
        }
        // Interior columns (x - 1 and x + 1 are 3 values away), then the
        // reflected borders (x - 1 = x + 1 there).
        {
            let m = n - 6;
            let (gx, gy) = (&mut gxs[3..][..m], &mut gys[3..][..m]);
            let (sl, sr) = (&vs[..m], &vs[6..][..m]);
            let (dl, dc, dr) = (&vd[..m], &vd[3..][..m], &vd[6..][..m]);
            for i in 0..m {
                gx[i] = sl[i] - sr[i];
                gy[i] = dl[i] + 2 * dc[i] + dr[i];
            }
        }
        for c in 0..3 {
            gxs[c] = 0;
            gys[c] = 2 * vd[3 + c] + 2 * vd[c];
            let l = n - 3 + c;
            gxs[l] = 0;
            gys[l] = 2 * vd[l - 3] + 2 * vd[l];
        }
        {
            let (gx, gy, mg, bn) = (&gxs[..n], &gys[..n], &mut mags[..n], &mut bins[..n]);
            for i in 0..n {
                mg[i] = ((gx[i] * gx[i] + gy[i] * gy[i]) as f32).sqrt();
                bn[i] = bin_fast(gx[i], gy[i], &cot);
            }
        }
        // Scatter into the cells of this row: a run of `cell` pixels per cell.
        let hrow = (y / cell) * cw;
        for cx in 0..cw {
            let at = (hrow + cx) * 3 * BINS;
            let lo = cx * cell * 3;
            let pixels = mags[lo..lo + cell * 3].chunks_exact(3).zip(bins[lo..lo + cell * 3].chunks_exact(3));
            for (j, (m, b)) in pixels.enumerate() {
                let hist = &mut hists[(j % 4) * cells + at..][..3 * BINS];
                hist[(b[0] as usize).min(BINS - 1)] += m[0];
                hist[BINS + (b[1] as usize).min(BINS - 1)] += m[1];
                hist[2 * BINS + (b[2] as usize).min(BINS - 1)] += m[2];
            }
        }
    }
    let (first, rest) = hists.split_at_mut(cells);
    for copy in rest.chunks_exact(cells) {
        for (h, &v) in first.iter_mut().zip(copy) {
            *h += v;
        }
    }
    Ok(layout(first, gw, gh))
}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npy::{photo224_pixels as photo_pixels, testvector};

    fn cosines(got: &[f32], want: &[f64]) -> Vec<f64> {
        got.chunks_exact(DIMS)
            .zip(want.chunks_exact(DIMS))
            .filter_map(|(a, b)| {
                let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y).sum();
                let na = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
                let nb = b.iter().map(|&y| y * y).sum::<f64>().sqrt();
                // Flat patches are zero in both: nothing to compare.
                match (na > 0.0, nb > 0.0) {
                    (true, true) => Some(dot / (na * nb)),
                    (false, false) => None,
                    _ => Some(0.0),
                }
            })
            .collect()
    }

    #[test]
    fn matches_testvector_by_patch_cosine() {
        let want = testvector("photo224_hog.npy");
        assert_eq!(want.shape, vec![4, 196, 108]);
        let per = 196 * DIMS;
        let mut all = Vec::new();
        for i in 0..4 {
            let img = photo_pixels(i);
            let got = hog(&img, 16).unwrap();
            all.extend(cosines(&got, &want.data[i * per..(i + 1) * per]));
            let reference = hog_reference(&img, 16).unwrap();
            all.extend(cosines(&reference, &want.data[i * per..(i + 1) * per]));
        }
        all.sort_by(f64::total_cmp);
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        let p1 = all[all.len() / 100];
        println!("hog vs testvector: per-patch cosine mean {mean:.6}, 1st percentile {p1:.6}");
        assert!(mean >= 0.995 && p1 >= 0.98, "cosine mean {mean}, 1st percentile {p1}");
    }

    #[test]
    fn fast_binning_equals_atan2_binning() {
        // Every integer Sobel gradient of u8 pixels (|g| <= 4 * 255) but
        // (0, 0), whose bin does not matter (magnitude 0).
        let cot = borders();
        // The AVX2 cells' test: border passed where fy - fx cot < 0, rounded once.
        let fused = |gx: i32, gy: i32| {
            let flip = gx < 0 || (gx == 0 && gy < 0);
            let (fx, fy) = if flip {
                (-gx as f32, -gy as f32)
            } else {
                (gx as f32, gy as f32)
            };
            cot.iter().filter(|&&c| (-fx).mul_add(c, fy) < 0.0).count()
        };
        for gx in -1020..=1020 {
            for gy in -1020..=1020 {
                if (gx, gy) != (0, 0) {
                    let want = bin_atan2(gx, gy);
                    assert_eq!(bin_fast(gx, gy, &cot) as usize, want, "gx {gx} gy {gy}");
                    assert_eq!(fused(gx, gy), want, "fused: gx {gx} gy {gy}");
                }
            }
        }
    }

    #[test]
    fn fast_equals_reference_and_flat_is_zero() {
        let img = photo_pixels(1);
        let a = hog(&img, 16).unwrap();
        let r = hog_reference(&img, 16).unwrap();
        let worst = a.iter().zip(&r).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-5, "{worst}");
        // A flat image has no gradient: exact zeros, not unit vectors of noise.
        let flat = Rgb8 {
            width: 32,
            height: 32,
            data: vec![117; 32 * 32 * 3],
        };
        assert!(hog(&flat, 16).unwrap().iter().all(|&v| v == 0.0));
        // Cell size follows the patch: 8 px patches on a 32 px image, 4 px cells.
        assert_eq!(hog(&img_small(), 8).unwrap().len(), 16 * DIMS);
        assert!(hog(&img_small(), 12).is_err());
    }

    /// The two-pass layout is the definition, value by value, bit for bit:
    /// patch value ((c * 9 + b) * 2 + cy) * 2 + cx is bin b of channel c of
    /// cell (cy, cx) times that cell channel's inverse L2 norm (f64, then f32).
    #[test]
    fn layout_is_the_definition_bit_for_bit() {
        let (gw, gh) = (3, 2);
        let cw = gw * 2;
        let hist: Vec<f32> = (0..gw * gh * 4 * 3 * BINS)
            .map(|i| {
                if i % 29 == 0 {
                    0.0
                } else {
                    ((i * 7919) % 1000) as f32 / 7.0
                }
            })
            .collect();
        let got = layout(&hist, gw, gh);
        assert_eq!(got.len(), gw * gh * DIMS);
        for py in 0..gh {
            for px in 0..gw {
                for (cy, cx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    let cell = ((py * 2 + cy) * cw + px * 2 + cx) * 3;
                    for c in 0..3 {
                        let bins = &hist[(cell + c) * BINS..][..BINS];
                        let sum: f64 = bins.iter().map(|&v| (v as f64) * (v as f64)).sum();
                        let inv = 1.0 / sum.sqrt().max(1e-12);
                        for (b, &v) in bins.iter().enumerate() {
                            let at = (py * gw + px) * DIMS + ((c * BINS + b) * 2 + cy) * 2 + cx;
                            assert_eq!(
                                got[at].to_bits(),
                                ((v as f64 * inv) as f32).to_bits(),
                                "patch ({py}, {px}) cell ({cy}, {cx}) c {c} b {b}"
                            );
                        }
                    }
                }
            }
        }
        assert_eq!(
            normalize_cells(&hist, &vec![0.5; hist.len() / BINS]),
            normalize_cells_scalar(&hist, &vec![0.5; hist.len() / BINS])
        );
    }

    /// Each vector path's cells (AVX-512, AVX2, where the CPU has them) on
    /// `img`, 1 and 3 channels, against the scalar twin's bits.
    fn vector_cells_give_the_scalar_bits(img: &Rgb8) {
        let cells = (img.width / 8) * (img.height / 8) * 3 * BINS;
        let mut planes = Vec::new();
        padded_planes(img, &mut planes);
        for channels in [1, 3] {
            let mut scalar = vec![f32::NAN; cells];
            cells8(&planes, img.width, img.height, channels, &borders(), &mut scalar);
            #[cfg(target_arch = "x86_64")]
            {
                let run = |name: &str, path: unsafe fn(&[u8], usize, usize, usize, &[f32; BINS - 1], &mut [f32])| {
                    let mut h = vec![f32::NAN; cells];
                    // SAFETY: the caller checked the path's CPU features.
                    unsafe { path(&planes, img.width, img.height, channels, &borders(), &mut h) };
                    let same = h.iter().zip(&scalar).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{name}, {} x {}, {channels} channels", img.width, img.height);
                };
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    run("AVX2", avx2::cells8);
                } else {
                    println!("no AVX2 and FMA on this CPU: the AVX2 cells not checked");
                }
                if avx512::available() {
                    run("AVX-512", avx512::cells8);
                } else {
                    println!("no AVX-512F and DQ on this CPU: the AVX-512 cells not checked");
                }
            }
        }
    }

    /// The vector cells and their scalar twin give the same bits, and all
    /// agree with the row path (any cell size) up to the order of the sums.
    #[test]
    fn cells8_paths_agree() {
        vector_cells_give_the_scalar_bits(&photo_pixels(2));
        // An odd number of cells across (5): the AVX-512 pairs and a last AVX2 cell.
        let odd = Rgb8 {
            width: 40,
            height: 24,
            data: (0..40 * 24 * 3).map(|i| (i * 7919 % 253) as u8).collect(),
        };
        vector_cells_give_the_scalar_bits(&odd);
        let img = photo_pixels(2);
        let (gw, gh) = (img.width / 16, img.height / 16);
        // Planes over stale bytes: every one must be written.
        let mut planes = vec![0xAB; 7];
        padded_planes(&img, &mut planes);
        let mut fresh = vec![0u8; 3 * (img.width + 2) * (img.height + 2)];
        let mut stale = vec![0xCDu8; fresh.len()];
        padded_planes(&img, &mut fresh);
        padded_planes(&img, &mut stale);
        assert_eq!(fresh, stale);
        let mut scalar = vec![f32::NAN; gw * gh * 4 * 3 * BINS];
        cells8(&planes, img.width, img.height, 3, &borders(), &mut scalar);
        assert!(scalar.iter().all(|v| v.is_finite()));
        let got = hog(&img, 16).unwrap();
        assert_eq!(got, layout(&scalar, gw, gh));
        let rows = hog_rows(&img, 16).unwrap();
        let worst = got.iter().zip(&rows).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-5, "{worst}");
        // Odd sizes: reflected borders of a 16 x 32 image.
        let small = Rgb8 {
            width: 32,
            height: 16,
            data: (0..32 * 16 * 3).map(|i| (i * 37 % 251) as u8).collect(),
        };
        let (a, b) = (hog(&small, 16).unwrap(), hog_reference(&small, 16).unwrap());
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-5, "{worst}");
    }

    /// HOG of a grey image from its first channel's cells is [`hog`]'s, bit for bit
    /// (16 px patches: the cells path; other sizes take the row path either way),
    /// and the one-channel cells of both paths are the three-channel run's first.
    #[test]
    fn hog_of_grey_gives_the_three_channel_bits() {
        for seed in [2, 3] {
            let grey = photo_pixels(seed).grey();
            assert_eq!(hog_of_grey(&grey, 16).unwrap(), hog(&grey, 16).unwrap(), "photo {seed}");
        }
        let img = photo_pixels(2);
        let cells = (img.width / 8) * (img.height / 8);
        let mut planes = Vec::new();
        padded_planes(&img, &mut planes);
        let mut three = vec![f32::NAN; cells * 3 * BINS];
        cells8(&planes, img.width, img.height, 3, &borders(), &mut three);
        let mut one = vec![f32::NAN; cells * 3 * BINS];
        cells8(&planes, img.width, img.height, 1, &borders(), &mut one);
        #[cfg(target_arch = "x86_64")]
        let one_avx2 = (std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")).then(|| {
            let mut h = vec![f32::NAN; cells * 3 * BINS];
            // SAFETY: AVX2 and FMA are present (checked just above).
            unsafe { avx2::cells8(&planes, img.width, img.height, 1, &borders(), &mut h) };
            h
        });
        #[cfg(not(target_arch = "x86_64"))]
        let one_avx2: Option<Vec<f32>> = None;
        for (c, (t, o)) in three.chunks_exact(3 * BINS).zip(one.chunks_exact(3 * BINS)).enumerate() {
            assert_eq!(&t[..BINS], &o[..BINS], "cell {c}: channel 0");
            assert!(
                o[BINS..].iter().all(|v| v.is_nan()),
                "cell {c}: channels 1 and 2 left alone"
            );
            if let Some(a) = &one_avx2 {
                assert_eq!(&a[c * 3 * BINS..][..BINS], &o[..BINS], "cell {c}: AVX2");
            }
        }
        // Not a shortcut for colour: channels that differ give other cells.
        let rgb = img_small();
        assert!(hog_of_grey(&rgb, 16).unwrap() != hog(&rgb, 16).unwrap());
    }

    fn img_small() -> Rgb8 {
        Rgb8 {
            width: 32,
            height: 32,
            data: (0..32 * 32 * 3).map(|i| (i * 31 % 256) as u8).collect(),
        }
    }

    /// A vertical edge (dark left, bright right) has gx < 0, gy = 0:
    /// atan2(gx, 0) = -pi/2, -4.5 bins, floor -5, mod 9 = bin 4, in the
    /// cells that touch the edge; each such cell is a unit vector.
    #[test]
    fn vertical_edge_lands_in_bin_four() {
        let mut img = Rgb8::zeros(16, 16);
        for y in 0..16 {
            for x in 8..16 {
                for c in 0..3 {
                    img.data[(y * 16 + x) * 3 + c] = 200;
                }
            }
        }
        let h = hog(&img, 16).unwrap();
        for c in 0..3 {
            for cy in 0..2 {
                for cx in 0..2 {
                    assert!((h[((c * BINS + 4) * 2 + cy) * 2 + cx] - 1.0).abs() < 1e-6);
                    for bin in (0..BINS).filter(|&b| b != 4) {
                        assert_eq!(h[((c * BINS + bin) * 2 + cy) * 2 + cx], 0.0);
                    }
                }
            }
        }
    }
}
