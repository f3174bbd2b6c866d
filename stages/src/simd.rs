//! Function multiversioning for the data stages' hot loops.
//!
//! The crates build for the baseline x86-64 target (SSE2); the loops of the
//! stages are written so the compiler vectorizes them, and [`multiversion!`]
//! compiles the same body a second time with AVX2 enabled, picked at run time
//! when the CPU has it (one cached feature check per call). The body is one
//! source, so both versions compute the same thing: integer loops give equal
//! results, and float loops do too because Rust never reassociates or fuses
//! float operations on its own. Tests compare the two versions anyway.

/// `multiversion!(pub fn name / name_scalar<T: Bound>(args) -> R { body })` (the
/// generics optional) defines
/// `name` (AVX2 when available) and `name_scalar` (baseline only).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident / $scalar:ident $(<$($g:ident : $bound:path),+>)? ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[inline(always)]
        #[allow(dead_code)]
        $vis fn $scalar $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? $body

        $(#[$m])*
        $vis fn $name $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2 $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
                    $scalar($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $scalar($($arg),*)
        }
    };
}

pub(crate) use multiversion;

/// Whether the CPU has the AVX-512 subsets the hand-written AVX-512 loops use
/// (F, BW, DQ and VL).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512dq")
        && std::is_x86_feature_detected!("avx512vl")
}

/// Transpose 8 x 8 f32 in AVX registers: `r[i]` lane `j` becomes `r[j]` lane `i`.
///
/// # Safety
/// The CPU must have AVX; callers are `#[target_feature]` functions that checked it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn transpose8x8(r: &mut [std::arch::x86_64::__m256; 8]) {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    r[0] = _mm256_permute2f128_ps::<0x20>(s0, s4);
    r[1] = _mm256_permute2f128_ps::<0x20>(s1, s5);
    r[2] = _mm256_permute2f128_ps::<0x20>(s2, s6);
    r[3] = _mm256_permute2f128_ps::<0x20>(s3, s7);
    r[4] = _mm256_permute2f128_ps::<0x31>(s0, s4);
    r[5] = _mm256_permute2f128_ps::<0x31>(s1, s5);
    r[6] = _mm256_permute2f128_ps::<0x31>(s2, s6);
    r[7] = _mm256_permute2f128_ps::<0x31>(s3, s7);
}

/// Which byte of each 16-byte third of 48 interleaved RGB bytes holds pixel x's
/// channel `c` (-1: none), for x in 0..16: the shuffles of [`deinterleave_rgb`]
/// and, read the other way, of [`interleave_rgb`].
#[cfg(target_arch = "x86_64")]
const fn rgb_mask(c: usize, third: usize) -> [i8; 16] {
    let mut m = [-1i8; 16];
    let mut x = 0;
    while x < 16 {
        let at = x * 3 + c;
        if at / 16 == third {
            m[x] = (at % 16) as i8;
        }
        x += 1;
    }
    m
}

/// RGB pixels into three planes (`r`, `g`, `b`: a value per pixel), by byte
/// shuffles for whole 16-pixel steps where the CPU has AVX2, the rest one by one.
pub(crate) fn split_rgb(row: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    let done = if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked).
        unsafe { deinterleave_rgb(row, r, g, b) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (x, p) in row.chunks_exact(3).enumerate().skip(done) {
        (r[x], g[x], b[x]) = (p[0], p[1], p[2]);
    }
}

/// The inverse of [`split_rgb`]: three planes into RGB pixels (`row`, all written).
pub(crate) fn join_rgb(r: &[u8], g: &[u8], b: &[u8], row: &mut [std::mem::MaybeUninit<u8>]) {
    #[cfg(target_arch = "x86_64")]
    let done = if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked).
        unsafe { interleave_rgb(r, g, b, row) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (x, p) in row.chunks_exact_mut(3).enumerate().skip(done) {
        p[0].write(r[x]);
        p[1].write(g[x]);
        p[2].write(b[x]);
    }
}

/// Split the first multiple of 16 pixels of an RGB row into planes; returns
/// how many pixels it did (the caller does the rest).
///
/// # Safety
/// The CPU must have AVX2 (the function is compiled for it; its shuffles are SSSE3's).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn deinterleave_rgb(row: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    let n = (row.len() / 3).min(r.len()).min(g.len()).min(b.len()) / 16 * 16;
    // For each plane, or-ing the shuffles of the three thirds gives 16 pixels of it.
    // Plain loops and loads: closures over intrinsics (`[_; 3].map`) were not
    // inlined here, a call per 16 pixels.
    let mut masks = [[_mm_setzero_si128(); 3]; 3];
    for (c, plane) in masks.iter_mut().enumerate() {
        for (t, m) in plane.iter_mut().enumerate() {
            *m = _mm_loadu_si128(rgb_mask(c, t).as_ptr() as *const __m128i);
        }
    }
    let src = row.as_ptr();
    let outs = [r.as_mut_ptr(), g.as_mut_ptr(), b.as_mut_ptr()];
    let mut x = 0;
    while x < n {
        let p0 = _mm_loadu_si128(src.add(x * 3) as *const __m128i);
        let p1 = _mm_loadu_si128(src.add(x * 3 + 16) as *const __m128i);
        let p2 = _mm_loadu_si128(src.add(x * 3 + 32) as *const __m128i);
        for c in 0..3 {
            let v = _mm_or_si128(
                _mm_or_si128(_mm_shuffle_epi8(p0, masks[c][0]), _mm_shuffle_epi8(p1, masks[c][1])),
                _mm_shuffle_epi8(p2, masks[c][2]),
            );
            _mm_storeu_si128(outs[c].add(x) as *mut __m128i, v);
        }
        x += 16;
    }
    n
}

/// The inverse of [`deinterleave_rgb`]: the first multiple of 16 pixels of three
/// planes into an RGB row; returns how many pixels it did.
///
/// # Safety
/// As [`deinterleave_rgb`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn interleave_rgb(r: &[u8], g: &[u8], b: &[u8], row: &mut [std::mem::MaybeUninit<u8>]) -> usize {
    use std::arch::x86_64::*;
    let n = (row.len() / 3).min(r.len()).min(g.len()).min(b.len()) / 16 * 16;
    // Third t of the row takes, from plane c, the bytes whose place in the
    // row falls in that third: the inverse shuffle of `rgb_mask(c, t)`.
    const fn inverse(c: usize, third: usize) -> [i8; 16] {
        let forward = rgb_mask(c, third);
        let mut m = [-1i8; 16];
        let mut x = 0;
        while x < 16 {
            if forward[x] >= 0 {
                m[forward[x] as usize] = x as i8;
            }
            x += 1;
        }
        m
    }
    let mut masks = [[_mm_setzero_si128(); 3]; 3];
    for (t, third) in masks.iter_mut().enumerate() {
        for (c, m) in third.iter_mut().enumerate() {
            *m = _mm_loadu_si128(inverse(c, t).as_ptr() as *const __m128i);
        }
    }
    let dst = row.as_mut_ptr() as *mut u8;
    let mut x = 0;
    while x < n {
        let pr = _mm_loadu_si128(r.as_ptr().add(x) as *const __m128i);
        let pg = _mm_loadu_si128(g.as_ptr().add(x) as *const __m128i);
        let pb = _mm_loadu_si128(b.as_ptr().add(x) as *const __m128i);
        for (t, m) in masks.iter().enumerate() {
            let v = _mm_or_si128(
                _mm_or_si128(_mm_shuffle_epi8(pr, m[0]), _mm_shuffle_epi8(pg, m[1])),
                _mm_shuffle_epi8(pb, m[2]),
            );
            _mm_storeu_si128(dst.add(x * 3 + 16 * t) as *mut __m128i, v);
        }
        x += 16;
    }
    n
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    /// The shuffles split and join RGB rows as the plain loops do, for rows of
    /// 0 to 50 pixels (the tails left to the caller), and the two are inverse.
    #[test]
    fn rgb_shuffles_split_and_join_as_the_loops_do() {
        if !std::is_x86_feature_detected!("avx2") {
            println!("no AVX2 on this CPU: the RGB shuffles not checked");
            return;
        }
        for n in 0..50usize {
            let row: Vec<u8> = (0..3 * n).map(|i| (i * 89 % 256) as u8).collect();
            let (mut r, mut g, mut b) = (vec![0u8; n], vec![0u8; n], vec![0u8; n]);
            // SAFETY: AVX2 is present (checked above).
            let done = unsafe { super::deinterleave_rgb(&row, &mut r, &mut g, &mut b) };
            assert_eq!(done, n / 16 * 16);
            for x in 0..done {
                assert_eq!(
                    [r[x], g[x], b[x]],
                    [row[3 * x], row[3 * x + 1], row[3 * x + 2]],
                    "{n} px, pixel {x}"
                );
            }
            let mut back = vec![std::mem::MaybeUninit::new(7u8); 3 * n];
            // SAFETY: as above.
            let joined = unsafe { super::interleave_rgb(&r, &g, &b, &mut back) };
            assert_eq!(joined, done);
            // SAFETY: every byte was initialized (to 7, then maybe overwritten).
            let back: Vec<u8> = back.iter().map(|v| unsafe { v.assume_init() }).collect();
            assert_eq!(&back[..3 * done], &row[..3 * done], "{n} px");
            assert!(
                back[3 * done..].iter().all(|&v| v == 7),
                "{n} px: the tail is the caller's"
            );
        }
    }
}
