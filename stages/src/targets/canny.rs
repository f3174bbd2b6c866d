//! canny target: an edge map of the view, per patch.
//!
//! Reference: `../shared/testvectors/photo224_canny_sigma1_lo0.1_hi0.2.npy`,
//! scikit-image's `feature.canny(gray, sigma=1, low_threshold=0.1,
//! high_threshold=0.2)` of `photo224_gray.npy`. This file follows that
//! implementation step by step: Gaussian with truncate 4 and zero padding,
//! divided by the blurred all-ones mask (scikit-image's bleed-over
//! compensation); scipy's `sobel` (`[1, 2, 1] x [-1, 0, 1]`, border
//! `reflect` = half-sample symmetric); the image border removed (eroded
//! mask); bilinear non-maximum suppression; hysteresis keeping the
//! 8-connected low-threshold segments that touch a high-threshold pixel.
//! The test compares edge pixels by F1 (>= 0.9, the README's bound; float
//! rounding flips a few pixels at exact NMS ties) and prints the value.
//!
//! Gray from RGB is PIL's `convert("L")` (ITU-R 601-2 luma in 16-bit fixed
//! point, rounded to u8) divided by 255: `photo224_gray.npy` is exactly that
//! (checked by the test; scikit-image's `rgb2gray` weights are off by 0.02).

use crate::sample::{Rgb8, StageError};

/// PIL's `convert("L")` of u8 pixels, / 255: H x W in [0, 1].
pub fn gray(img: &Rgb8) -> Vec<f32> {
    img.data
        .chunks_exact(3)
        .map(|p| crate::sample::luma(p) as f32 / 255.0)
        .collect()
}

/// scipy's `gaussian_filter1d` weights, radius `int(4 sigma + 0.5)`.
fn kernel(sigma: f64) -> Vec<f64> {
    let r = (4.0 * sigma + 0.5) as i64;
    let w: Vec<f64> = (-r..=r)
        .map(|k| (-0.5 * (k * k) as f64 / (sigma * sigma)).exp())
        .collect();
    let s: f64 = w.iter().sum();
    w.into_iter().map(|v| v / s).collect()
}

/// scipy's `reflect` border (half-sample symmetric: `d c b a | a b c d`).
#[inline]
fn sym(i: i64, n: usize) -> usize {
    let n = n as i64;
    let m = i.rem_euclid(2 * n);
    (if m < n { m } else { 2 * n - 1 - m }) as usize
}

/// Canny edges of a [0, 1] gray image (H x W): 1 = edge.
pub fn canny(gray: &[f32], height: usize, width: usize, sigma: f64, low: f64, high: f64) -> Vec<u8> {
    let (h, w) = (height, width);
    // 1. Gaussian with zero padding, normalized by the blurred mask.
    let k = kernel(sigma);
    let r = (k.len() / 2) as i64;
    let support = |i: usize, n: usize| -> f64 {
        (0..k.len())
            .filter(|&j| (0..n as i64).contains(&(i as i64 + j as i64 - r)))
            .map(|j| k[j])
            .sum()
    };
    let (sx, sy): (Vec<f64>, Vec<f64>) = (
        (0..w).map(|x| support(x, w)).collect(),
        (0..h).map(|y| support(y, h)).collect(),
    );
    let mut tmp = vec![0f64; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (j, &kj) in k.iter().enumerate() {
                let xx = x as i64 + j as i64 - r;
                if xx >= 0 && xx < w as i64 {
                    acc += kj * gray[y * w + xx as usize] as f64;
                }
            }
            tmp[y * w + x] = acc;
        }
    }
    let mut smooth = vec![0f64; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (j, &kj) in k.iter().enumerate() {
                let yy = y as i64 + j as i64 - r;
                if yy >= 0 && yy < h as i64 {
                    acc += kj * tmp[yy as usize * w + x];
                }
            }
            smooth[y * w + x] = acc / (sx[x] * sy[y] + f64::EPSILON);
        }
    }
    // 2. Sobel (scipy): isobel along rows (axis 0), jsobel along columns.
    let at = |y: i64, x: i64| smooth[sym(y, h) * w + sym(x, w)];
    let mut isobel = vec![0f64; h * w];
    let mut jsobel = vec![0f64; h * w];
    let mut mag = vec![0f64; h * w];
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let i = (at(y + 1, x - 1) + 2.0 * at(y + 1, x) + at(y + 1, x + 1))
                - (at(y - 1, x - 1) + 2.0 * at(y - 1, x) + at(y - 1, x + 1));
            let j = (at(y - 1, x + 1) + 2.0 * at(y, x + 1) + at(y + 1, x + 1))
                - (at(y - 1, x - 1) + 2.0 * at(y, x - 1) + at(y + 1, x - 1));
            let idx = y as usize * w + x as usize;
            isobel[idx] = i;
            jsobel[idx] = j;
            mag[idx] = i.hypot(j);
        }
    }
    // 3. Bilinear non-maximum suppression inside the eroded mask (1 px border off).
    let mut low_mask = vec![false; h * w];
    let mut strong = vec![false; h * w];
    let m_at = |y: usize, x: usize| mag[y * w + x];
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let m = m_at(y, x);
            if m < low {
                continue;
            }
            let (is, js) = (isobel[y * w + x], jsobel[y * w + x]);
            let (up, down, right, left) = (is >= 0.0, is <= 0.0, js >= 0.0, js <= 0.0);
            let cond1 = (up && right) || (down && left);
            let cond2 = (down && right) || (up && left);
            if !cond1 && !cond2 {
                continue;
            }
            let (ai, aj) = (is.abs(), js.abs());
            let (wt, n11, n12, n21, n22) = if cond1 {
                if ai > aj {
                    (
                        aj / ai,
                        m_at(y + 1, x),
                        m_at(y + 1, x + 1),
                        m_at(y - 1, x),
                        m_at(y - 1, x - 1),
                    )
                } else {
                    (
                        ai / aj,
                        m_at(y, x + 1),
                        m_at(y + 1, x + 1),
                        m_at(y, x - 1),
                        m_at(y - 1, x - 1),
                    )
                }
            } else if ai < aj {
                (
                    ai / aj,
                    m_at(y, x + 1),
                    m_at(y - 1, x + 1),
                    m_at(y, x - 1),
                    m_at(y + 1, x - 1),
                )
            } else {
                (
                    aj / ai,
                    m_at(y - 1, x),
                    m_at(y - 1, x + 1),
                    m_at(y + 1, x),
                    m_at(y + 1, x - 1),
                )
            };
            if n12 * wt + n11 * (1.0 - wt) <= m && n22 * wt + n21 * (1.0 - wt) <= m {
                low_mask[y * w + x] = true;
                strong[y * w + x] = m >= high;
            }
        }
    }
    // 4. Hysteresis: flood from strong pixels through 8-connected low pixels.
    let mut out = vec![0u8; h * w];
    let mut stack: Vec<usize> = (0..h * w).filter(|&i| strong[i]).collect();
    for &i in &stack {
        out[i] = 1;
    }
    while let Some(i) = stack.pop() {
        let (y, x) = ((i / w) as i64, (i % w) as i64);
        for dy in -1..=1 {
            for dx in -1..=1 {
                let (yy, xx) = (y + dy, x + dx);
                if yy < 0 || xx < 0 || yy >= h as i64 || xx >= w as i64 {
                    continue;
                }
                let j = yy as usize * w + xx as usize;
                if low_mask[j] && out[j] == 0 {
                    out[j] = 1;
                    stack.push(j);
                }
            }
        }
    }
    out
}

/// Per-patch layout of an edge map: `(N, P * P)` bits (row-major inside the
/// patch), or `(N, 1)` edge fractions.
pub fn per_patch(edges: &[u8], height: usize, width: usize, p: usize, fraction: bool) -> Result<Vec<f32>, StageError> {
    if p == 0 || height % p != 0 || width % p != 0 || edges.len() != height * width {
        return Err(StageError::Config(format!(
            "canny: {height}x{width} does not split into {p} px patches"
        )));
    }
    let (gh, gw) = (height / p, width / p);
    let dims = if fraction { 1 } else { p * p };
    let mut out = vec![0f32; gh * gw * dims];
    for gy in 0..gh {
        for gx in 0..gw {
            let n = gy * gw + gx;
            for py in 0..p {
                for px in 0..p {
                    let e = edges[(gy * p + py) * width + gx * p + px] as f32;
                    if fraction {
                        out[n] += e / (p * p) as f32;
                    } else {
                        out[n * dims + py * p + px] = e;
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npy::testvector;

    #[test]
    fn gray_matches_testvector() {
        let want = testvector("photo224_gray.npy");
        for i in 0..4 {
            let img = crate::npy::photo224_pixels(i);
            let got = gray(&img);
            let plane = 224 * 224;
            let worst = got
                .iter()
                .zip(&want.data[i * plane..(i + 1) * plane])
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-5, "photo {i}: {worst}");
        }
    }

    #[test]
    fn edges_match_scikit_image_by_f1() {
        let g = testvector("photo224_gray.npy").to_f32();
        let want = testvector("photo224_canny_sigma1_lo0.1_hi0.2.npy");
        let plane = 224 * 224;
        for i in 0..4 {
            let got = canny(&g[i * plane..(i + 1) * plane], 224, 224, 1.0, 0.1, 0.2);
            let (mut tp, mut fp, mut fneg) = (0usize, 0usize, 0usize);
            for (j, &e) in got.iter().enumerate() {
                match (e == 1, want.data[i * plane + j] > 0.0) {
                    (true, true) => tp += 1,
                    (true, false) => fp += 1,
                    (false, true) => fneg += 1,
                    _ => {}
                }
            }
            // An image without edges in either map agrees perfectly.
            let f1 = if tp + fp + fneg == 0 {
                1.0
            } else {
                2.0 * tp as f64 / (2 * tp + fp + fneg) as f64
            };
            println!("canny photo {i}: F1 {f1:.4} ({tp} common, {fp} extra, {fneg} missed)");
            assert!(f1 >= 0.9, "photo {i}: F1 {f1}");
        }
    }

    /// A bright square on black: edges lie on its outline, nowhere else.
    #[test]
    fn square_outline() {
        let (h, w) = (32, 32);
        let mut g = vec![0f32; h * w];
        for y in 10..22 {
            for x in 10..22 {
                g[y * w + x] = 1.0;
            }
        }
        let e = canny(&g, h, w, 1.0, 0.1, 0.2);
        for y in 0..h {
            for x in 0..w {
                let near = (8..=23).contains(&y)
                    && (8..=23).contains(&x)
                    && !((12..=19).contains(&y) && (12..=19).contains(&x));
                if e[y * w + x] == 1 {
                    assert!(near, "edge at {x},{y}");
                }
            }
        }
        assert!(e.iter().filter(|&&v| v == 1).count() >= 40);
        let bits = per_patch(&e, h, w, 16, false).unwrap();
        assert_eq!(bits.len(), 4 * 256);
        let frac = per_patch(&e, h, w, 16, true).unwrap();
        for n in 0..4 {
            let s: f32 = bits[n * 256..(n + 1) * 256].iter().sum();
            assert!((frac[n] - s / 256.0).abs() < 1e-6);
        }
    }
}
