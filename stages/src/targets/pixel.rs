//! pixel target: MAE's normalized pixels per patch (`norm_pix_loss`).
//!
//! References: `../shared/testvectors/patchify_{in,p16,p4}.npy` (layout: patches
//! row-major, inside a patch row p, column q, channel c with c fastest) and
//! `norm_pix_p16.npy` (per patch `(x - mean) / sqrt(var + 1e-6)`, var
//! unbiased). Tolerance 1e-5 absolute: a pure reordering is exact, and the
//! normalization differs only by f32 vs f64 rounding.

use crate::sample::StageError;

/// `(C, H, W)` to `(N, P * P * C)`: MAE's `patchify`.
pub fn patchify(image: &[f32], channels: usize, height: usize, width: usize, p: usize) -> Result<Vec<f32>, StageError> {
    if p == 0 || height % p != 0 || width % p != 0 || image.len() != channels * height * width {
        return Err(StageError::Config(format!(
            "patchify: {channels}x{height}x{width} ({} values) does not split into {p} px patches",
            image.len()
        )));
    }
    let (gh, gw) = (height / p, width / p);
    let dims = p * p * channels;
    let mut out = vec![0f32; gh * gw * dims];
    for gy in 0..gh {
        for gx in 0..gw {
            let patch = &mut out[(gy * gw + gx) * dims..(gy * gw + gx + 1) * dims];
            for py in 0..p {
                for px in 0..p {
                    for c in 0..channels {
                        patch[(py * p + px) * channels + c] =
                            image[c * height * width + (gy * p + py) * width + gx * p + px];
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Normalize each row of `patches` (`dims` wide) in place: `(x - mean) / sqrt(var + eps)`,
/// var unbiased (n - 1), as MAE's `forward_loss` with `norm_pix_loss`.
pub fn norm_pix(patches: &mut [f32], dims: usize, eps: f64) {
    for row in patches.chunks_exact_mut(dims) {
        let n = row.len() as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        let inv = 1.0 / (var + eps).sqrt();
        for v in row.iter_mut() {
            *v = ((*v as f64 - mean) * inv) as f32;
        }
    }
}

/// The pixel target of a C x H x W normalized image: `(N, P*P*C)`.
pub fn pixel_target(
    image: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    p: usize,
) -> Result<Vec<f32>, StageError> {
    let mut patches = patchify(image, channels, height, width, p)?;
    norm_pix(&mut patches, p * p * channels, 1e-6);
    Ok(patches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npy::testvector;

    fn close(a: &[f32], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            assert!((x as f64 - y).abs() <= tol, "index {i}: {x} vs {y}");
        }
    }

    #[test]
    fn patchify_matches_testvectors() {
        let x = testvector("patchify_in.npy");
        assert_eq!(x.shape, vec![2, 3, 32, 32]);
        let x = x.to_f32();
        for (name, p) in [("patchify_p16.npy", 16), ("patchify_p4.npy", 4)] {
            let want = testvector(name);
            let per = want.len() / 2;
            for b in 0..2 {
                let got = patchify(&x[b * 3072..(b + 1) * 3072], 3, 32, 32, p).unwrap();
                close(&got, &want.data[b * per..(b + 1) * per], 0.0);
            }
        }
    }

    #[test]
    fn norm_pix_matches_testvector() {
        let x = testvector("patchify_in.npy").to_f32();
        let want = testvector("norm_pix_p16.npy");
        for b in 0..2 {
            let got = pixel_target(&x[b * 3072..(b + 1) * 3072], 3, 32, 32, 16).unwrap();
            close(&got, &want.data[b * 3072..(b + 1) * 3072], 1e-5);
        }
    }

    #[test]
    fn each_normalized_patch_has_zero_mean_and_unit_unbiased_var() {
        let img: Vec<f32> = (0..3 * 8 * 8).map(|i| ((i * 37) % 11) as f32).collect();
        let t = pixel_target(&img, 3, 8, 8, 4).unwrap();
        for row in t.chunks_exact(48) {
            let m: f64 = row.iter().map(|&v| v as f64).sum::<f64>() / 48.0;
            let v: f64 = row.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / 47.0;
            assert!(m.abs() < 1e-5 && (v - 1.0).abs() < 1e-4, "{m} {v}");
        }
        assert!(patchify(&img, 3, 8, 8, 3).is_err());
    }
}
