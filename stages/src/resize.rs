//! Bicubic resampling of a crop of 3 (RGB) or 1 interleaved u8 channels: PIL's `ImagingResample` (bicubic
//! a = -0.5, support widened by the downscale factor, horizontal pass then
//! vertical, each rounded and clipped to u8 levels), computed in f32.
//!
//! PIL itself uses 22-bit fixed-point weights and i32 sums; here the weights
//! are PIL's normalized weights rounded to f32 and each tap is one fused
//! multiply-add, which agrees with a direct f64 evaluation of PIL's formula
//! within one level (test `resize_agrees_with_float_reference` in augment.rs)
//! and runs as one FMA per tap and 8 values on AVX2, where the i32 version
//! needed a widening, a 2-uop multiply, an add and a load and store of the
//! accumulator per tap and 8 values.
//!
//! Both passes are vectorized across 8 rows at a time (AVX2 path; on AVX-512
//! the FMAs of both passes take 16 lanes: 16 rows per block, 64 values per
//! step, the same arithmetic per value):
//! 1. 8 source rows of the crop are widened to f32 and transposed in
//!    registers, so `t[e][k]` holds byte `e` of row `k` (e = column * C + channel);
//! 2. the horizontal pass sums whole 8-row vectors `t[(start + i) * C + c]`
//!    with a broadcast weight per tap (no gathers, no byte transposes in
//!    memory, which were half of the previous version's time);
//! 3. its output is transposed back in registers into row-major rows;
//! 4. the vertical pass sums whole rows (kept as bytes), 32 values per step.
//!
//! [`resize_bicubic_scalar`] is the same arithmetic in plain loops (the same
//! operations in the same order, so the same bits; tests compare them).

use crate::sample::{CropBox, Image8};

/// PIL's bicubic kernel, a = -0.5.
pub(crate) fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Resampling weights of one axis: for each output index, the first input
/// index, the number of taps and the normalized weights (PIL's
/// `precompute_coeffs`, in f32 instead of `normalize_coeffs_8bpc`'s fixed point).
struct Coeffs {
    start: Vec<usize>,
    len: Vec<usize>,
    ksize: usize,
    weights: Vec<f32>,
    /// One past the last input index any output reads (the vector passes' bound).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    reads: usize,
}

impl Coeffs {
    fn taps(&self, out: usize) -> (usize, &[f32]) {
        let n = self.len[out];
        (self.start[out], &self.weights[out * self.ksize..][..n])
    }
}

/// The weights of resizing `in_size` to `out_size` samples, computed once per
/// thread and size pair: a run's crops come in a few hundred sizes, and
/// computing them afresh (in f64, a division per weight) was a twentieth of
/// the augment stage. The cache holds at most [`COEFFS_CACHE_BYTES`] of
/// weights per thread (about 400 pairs at 224 px; cleared when full).
fn coeffs(in_size: usize, out_size: usize) -> std::rc::Rc<Coeffs> {
    type Cache = (std::collections::HashMap<(usize, usize), std::rc::Rc<Coeffs>>, usize);
    thread_local! {
        static CACHE: std::cell::RefCell<Cache> = Default::default();
    }
    CACHE.with(|cache| {
        let (pairs, bytes) = &mut *cache.borrow_mut();
        if let Some(c) = pairs.get(&(in_size, out_size)) {
            return c.clone();
        }
        let c = std::rc::Rc::new(compute_coeffs(in_size, out_size));
        let size = c.weights.len() * 4 + (c.start.len() + c.len.len()) * 8;
        if *bytes + size > COEFFS_CACHE_BYTES {
            pairs.clear();
            *bytes = 0;
        }
        *bytes += size;
        pairs.insert((in_size, out_size), c.clone());
        c
    })
}

/// The most bytes of weights [`coeffs`] keeps per thread.
const COEFFS_CACHE_BYTES: usize = 8 << 20;

fn compute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut c = Coeffs {
        start: Vec::with_capacity(out_size),
        len: Vec::with_capacity(out_size),
        ksize,
        weights: vec![0.0; out_size * ksize],
        reads: 0,
    };
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // `(int)` in C truncates toward zero; both values are >= -0.5 + ...
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
        let n = (xmax - xmin).min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..n {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            c.weights[xx * ksize + x] = w as f32;
        }
        c.start.push(xmin);
        c.len.push(n);
        c.reads = c.reads.max(xmin + n);
    }
    c
}

/// A sum rounded half up to a u8 level after clipping to [0, 255]
/// (PIL's `clip8`; truncation is the floor of a non-negative value).
#[inline(always)]
fn level(acc: f32) -> u8 {
    (acc.clamp(0.0, 255.0) + 0.5) as u8
}

/// The crop rows the vertical pass reads: (first, count), in crop coordinates.
fn rows_needed(vc: &Coeffs) -> (usize, usize) {
    let first = vc.start.iter().copied().min().unwrap_or(0);
    let last = (0..vc.start.len()).map(|y| vc.start[y] + vc.len[y]).max().unwrap_or(0);
    (first, last.saturating_sub(first))
}

/// Resize the `crop` of `img` to `out_w x out_h` with PIL's bicubic, mirrored
/// left-right when `flip`. Equivalent to `img.crop(box).resize((w, h), BICUBIC)`
/// followed by a horizontal flip, reading only the rows the crop needs.
///
/// # Panics
/// When `crop` is empty or reaches outside `img` (a caller's bug: the augment
/// stage draws crops inside the image). The AVX2 path reads through raw
/// pointers, so this is checked here, for every caller, before it runs.
pub fn resize_bicubic<const C: usize>(
    img: &Image8<C>,
    crop: CropBox,
    out_w: usize,
    out_h: usize,
    flip: bool,
) -> Image8<C> {
    let inside = crop.width > 0
        && crop.height > 0
        && crop.left.checked_add(crop.width).is_some_and(|r| r <= img.width)
        && crop.top.checked_add(crop.height).is_some_and(|b| b <= img.height)
        && img.data.len() >= img.width * img.height * C;
    assert!(
        inside,
        "resize_bicubic: crop {crop:?} is empty or outside the {} x {} image ({} bytes)",
        img.width,
        img.height,
        img.data.len()
    );
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { avx2::resize_bicubic(img, crop, out_w, out_h, flip, crate::simd::avx512()) };
        }
    }
    resize_bicubic_scalar(img, crop, out_w, out_h, flip)
}

/// [`resize_bicubic`] in plain loops: the reference for the AVX2 path, and
/// what other CPUs run.
pub fn resize_bicubic_scalar<const C: usize>(
    img: &Image8<C>,
    crop: CropBox,
    out_w: usize,
    out_h: usize,
    flip: bool,
) -> Image8<C> {
    let hc = coeffs(crop.width, out_w);
    let vc = coeffs(crop.height, out_h);
    let (row_first, rows) = rows_needed(&vc);
    let row_len = out_w * C;
    // Horizontal pass into u8 levels (kept as f32), mirrored when flipping.
    let mut tmp = vec![0f32; rows * row_len];
    for r in 0..rows {
        let src = &img.data[((crop.top + row_first + r) * img.width + crop.left) * C..][..crop.width * C];
        for x in 0..out_w {
            let (s, w) = hc.taps(if flip { out_w - 1 - x } else { x });
            for c in 0..C {
                let mut acc = 0f32;
                for (i, &k) in w.iter().enumerate() {
                    acc = k.mul_add(src[(s + i) * C + c] as f32, acc);
                }
                tmp[r * row_len + x * C + c] = level(acc) as f32;
            }
        }
    }
    let mut out = Image8::<C>::zeros(out_w, out_h);
    for y in 0..out_h {
        let (s, w) = vc.taps(y);
        let s = s - row_first;
        for e in 0..row_len {
            let mut acc = 0f32;
            for (i, &k) in w.iter().enumerate() {
                acc = k.mul_add(tmp[(s + i) * row_len + e], acc);
            }
            out.data[y * row_len + e] = level(acc);
        }
    }
    out
}

/// The vector operations of the horizontal pass's FMA step, on AVX2's 8 lanes
/// or AVX-512's 16 (one row of the block per lane), so one loop serves both.
///
/// # Safety
/// Callers are `#[target_feature]` functions that checked the CPU has the
/// implementation's features; the methods are inlined into them.
#[cfg(target_arch = "x86_64")]
trait Lanes {
    const N: usize;
    type V: Copy;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(k: f32) -> Self::V;
    /// `k * (N values at p) + a`, one rounding.
    unsafe fn fmadd_load(k: Self::V, p: *const f32, a: Self::V) -> Self::V;
    /// [`level`] of each lane, as i32 bits, to N values at p.
    unsafe fn store_level(p: *mut f32, a: Self::V);
}

/// Step 2 of the horizontal pass on `L::N` rows: output pixel x's channels of
/// every row of the block (`hrows[(x * C + c) * N + k]`), as levels (i32 bits
/// in the f32 buffer: the transpose moves bits), from `t[e * N + k]` = byte e
/// of row k, the taps of `hc`, mirrored when `flip`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn horizontal_lanes<L: Lanes, const C: usize>(
    t: &[f32],
    hc: &Coeffs,
    out_w: usize,
    flip: bool,
    hrows: &mut [f32],
) {
    assert!(t.len() >= hc.reads * C * L::N && hrows.len() >= out_w * C * L::N);
    let (tp, hp) = (t.as_ptr(), hrows.as_mut_ptr());
    for x in 0..out_w {
        let (s, w) = hc.taps(if flip { out_w - 1 - x } else { x });
        // One accumulator per channel (C vectors of N rows per pixel).
        let base = tp.add(s * L::N * C);
        let mut a = [L::zero(); C];
        for (i, k) in w.iter().enumerate() {
            let k = L::splat(*k);
            for (c, a) in a.iter_mut().enumerate() {
                *a = L::fmadd_load(k, base.add((i * C + c) * L::N), *a);
            }
        }
        for (c, a) in a.iter().enumerate() {
            L::store_level(hp.add((x * C + c) * L::N), *a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{coeffs, rows_needed, Coeffs};
    use crate::sample::{CropBox, Image8};
    use crate::simd::transpose8x8 as transpose8;
    use std::arch::x86_64::*;

    /// [`super::level`] on 8 lanes, as i32.
    #[inline(always)]
    unsafe fn level(acc: __m256) -> __m256i {
        let clipped = _mm256_max_ps(_mm256_min_ps(acc, _mm256_set1_ps(255.0)), _mm256_setzero_ps());
        _mm256_cvttps_epi32(_mm256_add_ps(clipped, _mm256_set1_ps(0.5)))
    }

    /// 8 bytes at `p` as f32.
    #[inline(always)]
    unsafe fn widen(p: *const u8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }

    /// See [`super::resize_bicubic`]; the caller checked AVX2 and FMA, and
    /// AVX-512F, BW, DQ and VL when `wide` (the FMAs of both passes on 16
    /// lanes; the same bits either way).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn resize_bicubic<const C: usize>(
        img: &Image8<C>,
        crop: CropBox,
        out_w: usize,
        out_h: usize,
        flip: bool,
        wide: bool,
    ) -> Image8<C> {
        let hc = coeffs(crop.width, out_w);
        let vc = coeffs(crop.height, out_h);
        let (row_first, rows) = rows_needed(&vc);
        let in_len = crop.width * C;
        let row_len = out_w * C;
        // Rows of the horizontal pass's output are padded to whole vectors.
        let stride = row_len.div_ceil(8) * 8;
        // Temporaries live in per-thread buffers (fresh large allocations per
        // image cost page faults); every value read was written first.
        thread_local! {
            static BUFFERS: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<u8>)> = Default::default();
        }
        let mut bufs = BUFFERS.with(|b| b.take());
        let (t, hrows, h) = (&mut bufs.0, &mut bufs.1, &mut bufs.2);
        // The horizontal pass's levels as bytes: 4 times less than f32, so
        // that a 224 px output's intermediate stays in L2.
        h.resize(rows * stride, 0);
        let data = img.data.as_ptr();
        let row_ptr = |r: usize| data.add(((crop.top + row_first + r) * img.width + crop.left) * C);
        // Rows per block: 16 (two 8-row transposes into the halves of each
        // 16-lane vector) where the FMAs run on AVX-512, else 8.
        let lanes = if wide { 16 } else { 8 };
        t.resize(in_len * lanes, 0.0);
        // `hrows` lanes past `row_len` stay zero: they are transposed into the padding.
        hrows.clear();
        hrows.resize(stride * lanes, 0.0);
        for b0 in (0..rows).step_by(lanes) {
            let valid = (rows - b0).min(lanes);
            // 1. t[e * lanes + k] = byte e of row b0 + k (rows past the end repeat the last).
            for half in (0..lanes).step_by(8) {
                let src: [*const u8; 8] = std::array::from_fn(|k| row_ptr(b0 + (half + k).min(valid - 1)));
                rows_to_lanes(src, in_len, t.as_mut_ptr().add(half), lanes);
            }
            // 2. horizontal: output x of all the block's rows, mirrored when flipping.
            if wide {
                // SAFETY: the CPU has AVX-512F, BW, DQ and VL (`wide`); the
                // buffers hold 16 lanes per value (checked there).
                super::avx512::horizontal::<C>(t, &hc, out_w, flip, hrows);
            } else {
                super::horizontal_lanes::<Lanes8, C>(t, &hc, out_w, flip, hrows);
            }
            // 3. back to rows.
            for half in (0..valid).step_by(8) {
                let dst = h.as_mut_ptr().add((b0 + half) * stride);
                lanes_to_rows(hrows.as_ptr().add(half), lanes, stride, (valid - half).min(8), dst);
            }
        }
        // 4. vertical: whole rows.
        let data = if wide {
            // SAFETY: the CPU has AVX-512F, BW, DQ and VL (checked), and `h`
            // holds `rows` rows of `stride` >= row_len bytes.
            super::avx512::vertical(h, stride, row_first, &vc, row_len, out_h)
        } else {
            vertical(h, stride, row_first, &vc, row_len, out_h)
        };
        BUFFERS.with(|b| b.replace(bufs));
        Image8 {
            width: out_w,
            height: out_h,
            data,
        }
    }

    /// Step 1 of the horizontal pass for 8 rows: `t[e * lanes + k]` = byte e of
    /// row `src[k]` as f32, for the `in_len` bytes of each row (8 x 8 blocks
    /// transposed in registers, the last bytes one by one).
    ///
    /// # Safety
    /// AVX2; each row has `in_len` bytes, `t` room for `in_len * lanes` values.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn rows_to_lanes(src: [*const u8; 8], in_len: usize, t: *mut f32, lanes: usize) {
        let mut e = 0;
        while e + 8 <= in_len {
            let mut v: [__m256; 8] = std::array::from_fn(|k| widen(src[k].add(e)));
            transpose8(&mut v);
            for (k, v) in v.iter().enumerate() {
                _mm256_storeu_ps(t.add((e + k) * lanes), *v);
            }
            e += 8;
        }
        for e in e..in_len {
            for (k, s) in src.iter().enumerate() {
                *t.add(e * lanes + k) = *s.add(e) as f32;
            }
        }
    }

    /// AVX2's 8 lanes for [`super::horizontal_lanes`].
    struct Lanes8;

    impl super::Lanes for Lanes8 {
        const N: usize = 8;
        type V = __m256;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(k: f32) -> __m256 {
            _mm256_set1_ps(k)
        }
        #[inline(always)]
        unsafe fn fmadd_load(k: __m256, p: *const f32, a: __m256) -> __m256 {
            _mm256_fmadd_ps(k, _mm256_loadu_ps(p), a)
        }
        #[inline(always)]
        unsafe fn store_level(p: *mut f32, a: __m256) {
            _mm256_storeu_ps(p, _mm256_castsi256_ps(level(a)))
        }
    }

    /// Step 3 for 8 rows: the levels `hp[e * lanes + k]` (i32 bits) of the
    /// first `valid` rows k back into byte rows `dst + k * stride`, 8 values e
    /// at a time over the whole `stride`.
    ///
    /// # Safety
    /// AVX2; `hp` holds `stride * lanes` values, `dst` room for `valid` rows of `stride`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn lanes_to_rows(hp: *const f32, lanes: usize, stride: usize, valid: usize, dst: *mut u8) {
        for e0 in (0..stride).step_by(8) {
            let mut v: [__m256; 8] = std::array::from_fn(|k| _mm256_loadu_ps(hp.add((e0 + k) * lanes)));
            transpose8(&mut v);
            for (k, v) in v.iter().enumerate().take(valid) {
                let v = _mm256_castps_si256(*v);
                let words = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
                let bytes = _mm_packus_epi16(words, words);
                _mm_storel_epi64(dst.add(k * stride + e0) as *mut __m128i, bytes);
            }
        }
    }

    /// The vertical pass of [`resize_bicubic`]: output row y sums the taps of
    /// `vc` over the rows of `h` (bytes, `stride` apart, the first being crop
    /// row `row_first`), 32 values per step, then 8 (the padding lanes are
    /// computed and dropped).
    ///
    /// # Safety
    /// AVX2 and FMA; `h` holds every row `vc` reads, each `stride >= row_len`
    /// bytes with `stride` a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn vertical(
        h: &[u8],
        stride: usize,
        row_first: usize,
        vc: &Coeffs,
        row_len: usize,
        out_h: usize,
    ) -> Vec<u8> {
        // Not zero-filled first: every byte of every row is written below.
        let mut data: Vec<u8> = Vec::with_capacity(row_len * out_h);
        let hp = h.as_ptr();
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for y in 0..out_h {
            let (s, w) = vc.taps(y);
            let first = hp.add((s - row_first) * stride);
            let dst = data.as_mut_ptr().add(y * row_len);
            let mut e = 0;
            while e + 32 <= row_len {
                let mut a = [_mm256_setzero_ps(); 4];
                for (i, k) in w.iter().enumerate() {
                    let k = _mm256_set1_ps(*k);
                    let p = first.add(i * stride + e);
                    for (j, a) in a.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(k, widen(p.add(8 * j)), *a);
                    }
                }
                let l01 = _mm256_packus_epi32(level(a[0]), level(a[1]));
                let l23 = _mm256_packus_epi32(level(a[2]), level(a[3]));
                let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(l01, l23), order);
                _mm256_storeu_si256(dst.add(e) as *mut __m256i, bytes);
                e += 32;
            }
            while e < row_len {
                let mut a = _mm256_setzero_ps();
                for (i, k) in w.iter().enumerate() {
                    a = _mm256_fmadd_ps(_mm256_set1_ps(*k), widen(first.add(i * stride + e)), a);
                }
                let mut lanes = [0i32; 8];
                _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, level(a));
                for (j, &l) in lanes.iter().enumerate().take(row_len - e) {
                    *dst.add(e + j) = l as u8;
                }
                e += 8;
            }
        }
        data.set_len(row_len * out_h);
        data
    }
}

/// The vertical pass on 16 lanes: the AVX2 one's per-value arithmetic (the
/// same FMAs in the same tap order, the same clamp and rounding), so the same
/// bits, for half the instructions; with masked loads and stores, the last
/// values of a row need no scalar loop.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Coeffs;
    use std::arch::x86_64::*;

    /// [`super::horizontal_lanes`] on 16 rows: `t[e * 16 + k]`, `hrows[(x * C + c) * 16 + k]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    pub(super) unsafe fn horizontal<const C: usize>(
        t: &[f32],
        hc: &Coeffs,
        out_w: usize,
        flip: bool,
        hrows: &mut [f32],
    ) {
        super::horizontal_lanes::<Lanes16, C>(t, hc, out_w, flip, hrows)
    }

    /// AVX-512's 16 lanes for [`super::horizontal_lanes`].
    struct Lanes16;

    impl super::Lanes for Lanes16 {
        const N: usize = 16;
        type V = __m512;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(k: f32) -> __m512 {
            _mm512_set1_ps(k)
        }
        #[inline(always)]
        unsafe fn fmadd_load(k: __m512, p: *const f32, a: __m512) -> __m512 {
            _mm512_fmadd_ps(k, _mm512_loadu_ps(p), a)
        }
        #[inline(always)]
        unsafe fn store_level(p: *mut f32, a: __m512) {
            _mm512_storeu_ps(p, _mm512_castsi512_ps(level(a)))
        }
    }

    /// [`super::level`] on 16 lanes, as i32.
    #[inline(always)]
    unsafe fn level(a: __m512) -> __m512i {
        let clipped = _mm512_max_ps(_mm512_min_ps(a, _mm512_set1_ps(255.0)), _mm512_setzero_ps());
        _mm512_cvttps_epi32(_mm512_add_ps(clipped, _mm512_set1_ps(0.5)))
    }

    /// [`super::avx2::vertical`] on AVX-512.
    ///
    /// # Safety
    /// AVX-512F, BW, DQ and VL; `h` holds every row `vc` reads, each `stride >= row_len` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    pub(super) unsafe fn vertical(
        h: &[u8],
        stride: usize,
        row_first: usize,
        vc: &Coeffs,
        row_len: usize,
        out_h: usize,
    ) -> Vec<u8> {
        let mut data: Vec<u8> = Vec::with_capacity(row_len * out_h);
        let hp = h.as_ptr();
        // Levels as in super::level, as bytes.
        let level = |a: __m512| _mm512_cvtepi32_epi8(level(a));
        let widen = |m: __mmask16, p: *const u8| {
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p as *const i8)))
        };
        for y in 0..out_h {
            let (s, w) = vc.taps(y);
            let first = hp.add((s - row_first) * stride);
            let dst = data.as_mut_ptr().add(y * row_len);
            let mut e = 0;
            while e + 64 <= row_len {
                let mut a = [_mm512_setzero_ps(); 4];
                for (i, k) in w.iter().enumerate() {
                    let k = _mm512_set1_ps(*k);
                    let p = first.add(i * stride + e);
                    for (j, a) in a.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(k, widen(!0, p.add(16 * j)), *a);
                    }
                }
                for (j, a) in a.iter().enumerate() {
                    _mm_storeu_si128(dst.add(e + 16 * j) as *mut __m128i, level(*a));
                }
                e += 64;
            }
            while e < row_len {
                // Lanes past the row are neither read nor written.
                let m: __mmask16 = if row_len - e >= 16 {
                    !0
                } else {
                    (1u16 << (row_len - e)) - 1
                };
                let mut a = _mm512_setzero_ps();
                for (i, k) in w.iter().enumerate() {
                    a = _mm512_fmadd_ps(_mm512_set1_ps(*k), widen(m, first.add(i * stride + e)), a);
                }
                _mm_mask_storeu_epi8(dst.add(e) as *mut i8, m, level(a));
                e += 16;
            }
        }
        data.set_len(row_len * out_h);
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{Grey8, Rgb8};

    /// Both vector paths (8 and 16 rows per block) give the scalar twin's
    /// bits: RGB and one channel, down- and upscales (rows past a block's end
    /// repeat), flips, odd crops.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn both_vector_widths_give_the_scalar_bits() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            println!("no AVX2 and FMA on this CPU: the vector resizes not checked");
            return;
        }
        let (w, h) = (203, 149);
        let rgb = Rgb8 {
            width: w,
            height: h,
            data: (0..w * h * 3)
                .map(|i| ((i * 7919 + i / (3 * w) * 13) % 256) as u8)
                .collect(),
        };
        let grey = Grey8 {
            width: w,
            height: h,
            data: rgb.data[..w * h].to_vec(),
        };
        let crop = |top, left, height, width| CropBox {
            top,
            left,
            height,
            width,
        };
        let cases = [
            (crop(0, 0, h, w), 64, 64, false),
            (crop(7, 11, 131, 170), 224, 224, true),
            (crop(3, 5, 17, 23), 40, 37, false),
            (crop(20, 9, 100, 61), 24, 9, true),
        ];
        let mut widths = vec![false];
        if crate::simd::avx512() {
            widths.push(true);
        } else {
            println!("no AVX-512 on this CPU: the 16-row blocks not checked");
        }
        for (crop, ow, oh, flip) in cases {
            for &wide in &widths {
                // SAFETY: AVX2 and FMA are present, and AVX-512 when `wide` (checked above).
                let (a, b) = unsafe {
                    (
                        avx2::resize_bicubic(&rgb, crop, ow, oh, flip, wide),
                        avx2::resize_bicubic(&grey, crop, ow, oh, flip, wide),
                    )
                };
                assert!(
                    a == resize_bicubic_scalar(&rgb, crop, ow, oh, flip),
                    "RGB {crop:?} -> {ow} x {oh}, wide {wide}"
                );
                assert!(
                    b == resize_bicubic_scalar(&grey, crop, ow, oh, flip),
                    "grey {crop:?} -> {ow} x {oh}, wide {wide}"
                );
            }
        }
    }

    /// The AVX-512 vertical pass gives the AVX2 one's bits, and both the scalar
    /// vertical pass's: rows of 13 to 700 values (masked tails of 1 to 15,
    /// whole 64-value steps), down- and upscales, bytes over the whole range.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vertical_passes_agree() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            println!("no AVX2 and FMA on this CPU: the vertical passes not checked");
            return;
        }
        for (row_len, in_rows, out_h) in [
            (13usize, 40, 17),
            (64, 9, 30),
            (200, 300, 224),
            (700, 224, 224),
            (79, 5, 5),
        ] {
            let vc = coeffs(in_rows, out_h);
            let (row_first, rows) = rows_needed(&vc);
            let stride = row_len.div_ceil(8) * 8;
            let h: Vec<u8> = (0..rows * stride).map(|i| (i * 7919 % 256) as u8).collect();
            let scalar: Vec<u8> = (0..out_h)
                .flat_map(|y| {
                    let (s, w) = vc.taps(y);
                    let h = &h;
                    (0..row_len).map(move |e| {
                        let acc = w.iter().enumerate().fold(0f32, |acc, (i, &k)| {
                            k.mul_add(h[(s - row_first + i) * stride + e] as f32, acc)
                        });
                        level(acc)
                    })
                })
                .collect();
            // SAFETY: AVX2 and FMA are present (checked above); `h` holds `rows` rows of `stride`.
            let avx2 = unsafe { avx2::vertical(&h, stride, row_first, &vc, row_len, out_h) };
            assert!(avx2 == scalar, "AVX2, {row_len} values x {in_rows} -> {out_h} rows");
            if crate::simd::avx512() {
                // SAFETY: as above, and the CPU has AVX-512F, BW, DQ and VL (checked).
                let avx512 = unsafe { avx512::vertical(&h, stride, row_first, &vc, row_len, out_h) };
                assert!(
                    avx512 == scalar,
                    "AVX-512, {row_len} values x {in_rows} -> {out_h} rows"
                );
            } else {
                println!("no AVX-512 on this CPU: the AVX-512 vertical pass not checked");
            }
        }
    }

    /// One channel resized alone is each channel of the three-channel resize of
    /// it replicated, bit for bit, on the AVX2 path and on its scalar twin, for
    /// down- and upscales, odd crops and flips.
    #[test]
    fn one_channel_is_each_channel_of_the_replicated_resize() {
        let (w, h) = (61, 47);
        let grey = Grey8 {
            width: w,
            height: h,
            data: (0..w * h).map(|i| ((i * 37 + (i / w) * 11) % 256) as u8).collect(),
        };
        let rgb = grey.to_rgb();
        let crops = [
            (
                CropBox {
                    top: 0,
                    left: 0,
                    height: h,
                    width: w,
                },
                32,
                32,
            ),
            (
                CropBox {
                    top: 3,
                    left: 5,
                    height: 40,
                    width: 51,
                },
                24,
                17,
            ),
            (
                CropBox {
                    top: 10,
                    left: 7,
                    height: 9,
                    width: 13,
                },
                40,
                33,
            ),
            // Rows of 28 and 13 values: the horizontal pass's padding lanes.
            (
                CropBox {
                    top: 1,
                    left: 2,
                    height: 44,
                    width: 57,
                },
                28,
                28,
            ),
            (
                CropBox {
                    top: 0,
                    left: 9,
                    height: 30,
                    width: 30,
                },
                13,
                19,
            ),
        ];
        for (crop, ow, oh) in crops {
            for flip in [false, true] {
                let one = resize_bicubic(&grey, crop, ow, oh, flip);
                assert_eq!(
                    one,
                    resize_bicubic_scalar(&grey, crop, ow, oh, flip),
                    "{crop:?} flip {flip}: AVX2 vs scalar"
                );
                let three = resize_bicubic(&rgb, crop, ow, oh, flip);
                for c in 0..3 {
                    let channel: Vec<u8> = three.data.iter().skip(c).step_by(3).copied().collect();
                    assert_eq!(channel, one.data, "{crop:?} flip {flip}: channel {c}");
                }
            }
        }
    }

    /// A crop outside the image is refused before the AVX2 path reads through
    /// raw pointers; one that touches the border is fine.
    #[test]
    fn crops_outside_the_image_are_refused() {
        let img = Rgb8::zeros(20, 10);
        let edge = CropBox {
            top: 2,
            left: 5,
            height: 8,
            width: 15,
        };
        assert_eq!(resize_bicubic(&img, edge, 4, 4, false).data.len(), 4 * 4 * 3);
        for bad in [
            CropBox {
                top: 3,
                left: 5,
                height: 8,
                width: 15,
            },
            CropBox {
                top: 0,
                left: 6,
                height: 8,
                width: 15,
            },
            CropBox {
                top: 0,
                left: 0,
                height: 0,
                width: 4,
            },
            CropBox {
                top: 0,
                left: usize::MAX,
                height: 1,
                width: 2,
            },
        ] {
            let caught = std::panic::catch_unwind(|| resize_bicubic(&img, bad, 4, 4, false));
            let msg = caught.expect_err("crop accepted");
            let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(msg.contains("outside the 20 x 10 image"), "{msg}");
        }
    }
}
