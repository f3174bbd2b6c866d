//! augment: torchvision's `RandomResizedCrop` + `RandomHorizontalFlip`, then
//! normalization, where the data becomes float.
//!
//! Reference: `../shared/testvectors/photo224_normalized.npy` (four photos
//! resized to 224 px with PIL's bicubic, ImageNet-normalized). The resampler
//! ([`crate::resize`]) is PIL's `ImagingResample` in f32: bicubic a = -0.5,
//! support scaled by the downscale factor (antialias), horizontal pass then
//! vertical, each rounded and clipped to u8. The test decodes the
//! same JPEGs (photos 514, 525, 526, 529 of photos-000002.tar), resizes the
//! whole image to 224 and must match within 6 levels, mean under 0.5: the
//! difference is the JPEG decoder's (zune-jpeg vs PIL's libjpeg-turbo differ
//! by up to 4 levels, mean 0.07 to 0.34, on these photos). On the same decoded
//! pixels this resampler (f32 weights and sums) and PIL's fixed point differ
//! by one level on about 0.005% of the values (max diff 0 before the switch
//! to f32, 1 after, on photos 0, 2 and 3, whose decoders agree).
//! The normalization matches the floats exactly after `round((x * std + mean) * 255)`.
//!
//! Sampling follows `torchvision.transforms.RandomResizedCrop.get_params`
//! line by line: area fraction uniform in `scale`, log-uniform aspect ratio,
//! `w = round(sqrt(area * ratio))` (Python's round: half to even), up to 10
//! tries, then the center crop clamped to the ratio range. The flip is applied
//! after resizing, as torchvision's transform order does; we write the
//! horizontal pass's output mirrored, so it costs nothing.

pub use crate::resize::{resize_bicubic, resize_bicubic_scalar};
use crate::sample::{CropBox, Rgb8, StageError, View};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// `stages.augment` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Output side in pixels (square).
    pub size: usize,
    /// Range of the crop's area as a fraction of the image (MAE: 0.2 to 1).
    pub scale: [f64; 2],
    /// Range of the crop's aspect ratio w / h, sampled log-uniformly.
    pub ratio: [f64; 2],
    /// Probability of a horizontal flip.
    pub flip_p: f64,
    /// Per-channel mean of the [0, 1] pixels (ImageNet).
    pub mean: [f32; 3],
    /// Per-channel standard deviation (ImageNet).
    pub std: [f32; 3],
}

impl Default for Config {
    fn default() -> Self {
        Config {
            size: 224,
            scale: [0.2, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            flip_p: 0.5,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

/// Crop, resize and flip one decoded image; returns the u8 view and its record.
///
/// The rng must be `stage_rng(seed, epoch, key, "augment")`.
pub fn apply<const C: usize>(
    cfg: &Config,
    img: &crate::sample::Image8<C>,
    rng: &mut impl Rng,
) -> Result<(crate::sample::Image8<C>, View), StageError> {
    let view = sample_view(cfg, img.width, img.height, rng)?;
    let out = resize_bicubic(img, view.crop, cfg.size, cfg.size, view.flip);
    Ok((out, view))
}

/// Draw the view (crop box, flip) of a `width x height` image, before any
/// pixel is decoded, so that decode can read only the crop
/// ([`crate::decode::decode_region`]). Draws in the same order as [`apply`].
pub fn sample_view(cfg: &Config, width: usize, height: usize, rng: &mut impl Rng) -> Result<View, StageError> {
    if cfg.size == 0 {
        return Err(StageError::Config("augment.size must be positive".into()));
    }
    if width == 0 || height == 0 {
        return Err(StageError::Corrupt(format!("empty image {width}x{height}")));
    }
    let crop = random_resized_crop_params(width, height, cfg.scale, cfg.ratio, rng);
    let flip = rng.random::<f64>() < cfg.flip_p;
    Ok(View {
        source_width: width,
        source_height: height,
        crop,
        flip,
        size: cfg.size,
    })
}

/// Resize and flip `view` out of a decoded region that holds its crop.
pub fn apply_region<const C: usize>(
    region: &crate::decode::Region<C>,
    view: &View,
) -> Result<crate::sample::Image8<C>, StageError> {
    if (region.source_width, region.source_height) != (view.source_width, view.source_height) {
        return Err(StageError::Corrupt(format!(
            "decoded {}x{} image, header said {}x{}",
            region.source_width, region.source_height, view.source_width, view.source_height
        )));
    }
    let crop = region.local(view.crop).ok_or_else(|| {
        StageError::Corrupt(format!(
            "decoded region {}x{}+{}+{} does not hold the crop {:?}",
            region.pixels.width, region.pixels.height, region.left, region.top, view.crop
        ))
    })?;
    Ok(resize_bicubic(&region.pixels, crop, view.size, view.size, view.flip))
}

/// torchvision's `RandomResizedCrop.get_params` for an image of `width x height`.
pub fn random_resized_crop_params(
    width: usize,
    height: usize,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut impl Rng,
) -> CropBox {
    let area = (width * height) as f64;
    let (log_lo, log_hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale[0], scale[1]);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let w = (target_area * aspect).sqrt().round_ties_even() as usize;
        let h = (target_area / aspect).sqrt().round_ties_even() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    center_crop_fallback(width, height, ratio)
}

/// `torch.empty(1).uniform_(lo, hi)`.
fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// The fallback after 10 failed tries: the whole image, trimmed to the ratio range.
pub fn center_crop_fallback(width: usize, height: usize, ratio: [f64; 2]) -> CropBox {
    let in_ratio = width as f64 / height as f64;
    let (min_r, max_r) = (ratio[0].min(ratio[1]), ratio[0].max(ratio[1]));
    let (w, h) = if in_ratio < min_r {
        (
            width,
            ((width as f64 / min_r).round_ties_even() as usize).clamp(1, height),
        )
    } else if in_ratio > max_r {
        (
            ((height as f64 * max_r).round_ties_even() as usize).clamp(1, width),
            height,
        )
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// Per-channel lookup tables `(v / 255 - mean) / std` for every u8 value, in f32 as
/// the reference computes it.
pub fn normalize_lut(mean: [f32; 3], std: [f32; 3]) -> [[f32; 256]; 3] {
    let mut lut = [[0f32; 256]; 3];
    for c in 0..3 {
        for v in 0..256 {
            lut[c][v] = (v as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    lut
}

/// The normalized view, C x H x W, from u8 H x W x 3 pixels.
pub fn normalize(img: &Rgb8, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let lut = normalize_lut(mean, std);
    // Plane by plane into reserved memory: no zero-filling first (reused
    // heap memory would cost a memset of the whole output).
    let mut out = Vec::with_capacity(3 * img.width * img.height);
    for (c, lut) in lut.iter().enumerate() {
        out.extend(img.data.chunks_exact(3).map(|p| lut[p[c] as usize]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npy::testvector;
    use rand::SeedableRng;

    /// The four photos behind `photo224_*` (photos-000002.tar, keys found by
    /// matching PIL's resize of every photo against the testvector: exact).
    fn testvector_photos() -> Vec<shards::Sample> {
        let path = crate::npy::shared_dir().join("data/photos-000002.tar");
        let skips = shards::Skips::default();
        let all: Vec<shards::Sample> = shards::ShardReader::open(&path, shards::OnError::Fail, &skips)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .map(|s| s.unwrap())
            .collect();
        ["photo0000514", "photo0000525", "photo0000526", "photo0000529"]
            .iter()
            .map(|k| {
                all.iter()
                    .find(|s| s.key == *k)
                    .unwrap_or_else(|| panic!("{k} not in {}", path.display()))
                    .clone()
            })
            .collect()
    }

    /// Decode + PIL-bicubic resize of the whole image to 224 reproduces the u8
    /// pixels behind `photo224_normalized` (within the decoders' 1-2 levels).
    #[test]
    fn resize_matches_pil_bicubic_testvector() {
        let want = testvector("photo224_normalized.npy");
        assert_eq!(want.shape, vec![4, 3, 224, 224]);
        let cfg = Config::default();
        let plane = 224 * 224;
        for (i, s) in testvector_photos().iter().enumerate() {
            let img = crate::decode::apply(&Default::default(), s).unwrap();
            let full = CropBox {
                top: 0,
                left: 0,
                height: img.height,
                width: img.width,
            };
            let out = resize_bicubic(&img, full, 224, 224, false);
            let (mut worst, mut sum) = (0i32, 0i64);
            for c in 0..3 {
                for p in 0..plane {
                    let x = want.data[(i * 3 + c) * plane + p] as f32;
                    let u = ((x * cfg.std[c] + cfg.mean[c]) * 255.0).round() as i32;
                    let d = (u - out.data[p * 3 + c] as i32).abs();
                    worst = worst.max(d);
                    sum += d as i64;
                }
            }
            let mean = sum as f64 / (3 * plane) as f64;
            println!("photo {i}: max diff {worst}, mean {mean:.5} levels");
            assert!(worst <= 6 && mean < 0.5, "photo {i}: max diff {worst}, mean {mean}");
        }
    }

    /// Our normalization of the recovered u8 pixels equals the testvector's floats.
    #[test]
    fn normalize_matches_testvector() {
        let want = testvector("photo224_normalized.npy");
        let cfg = Config::default();
        let plane = 224 * 224;
        let mut img = Rgb8::zeros(224, 224);
        for c in 0..3 {
            for p in 0..plane {
                let x = want.data[c * plane + p] as f32;
                img.data[p * 3 + c] = ((x * cfg.std[c] + cfg.mean[c]) * 255.0).round() as u8;
            }
        }
        let got = normalize(&img, cfg.mean, cfg.std);
        let worst = got
            .iter()
            .zip(&want.data[..3 * plane])
            .map(|(a, &b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "max abs diff {worst}");
    }

    /// An independent float resampler (direct evaluation of PIL's formula in
    /// f64, no fixed point, no pass rounding) agrees within one level.
    #[test]
    fn resize_agrees_with_float_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (w, h) = (57, 41);
        let img = Rgb8 {
            width: w,
            height: h,
            data: (0..w * h * 3).map(|_| rng.random()).collect(),
        };
        for (crop, ow, oh) in [
            (
                CropBox {
                    top: 3,
                    left: 5,
                    height: 30,
                    width: 40,
                },
                16,
                12,
            ),
            (
                CropBox {
                    top: 0,
                    left: 0,
                    height: 41,
                    width: 57,
                },
                90,
                70,
            ),
            (
                CropBox {
                    top: 10,
                    left: 20,
                    height: 7,
                    width: 9,
                },
                9,
                7,
            ),
        ] {
            for flip in [false, true] {
                let got = resize_bicubic(&img, crop, ow, oh, flip);
                assert_eq!(resize_bicubic_scalar(&img, crop, ow, oh, flip), got);
                let wx = float_weights(crop.width, ow);
                let wy = float_weights(crop.height, oh);
                for y in 0..oh {
                    for x in 0..ow {
                        for c in 0..3 {
                            let mut acc = 0.0;
                            for (j, &a) in wy[y].iter().enumerate() {
                                let mut row = 0.0;
                                for (i, &b) in wx[x].iter().enumerate() {
                                    row += b * img.at(crop.left + i, crop.top + j, c) as f64;
                                }
                                acc += a * row.round().clamp(0.0, 255.0);
                            }
                            let ox = if flip { ow - 1 - x } else { x };
                            let g = got.at(ox, y, c) as f64;
                            assert!(
                                (g - acc.clamp(0.0, 255.0)).abs() <= 1.0,
                                "{crop:?} {x},{y},{c}: {g} vs {acc}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Dense f64 weights of PIL's antialiased bicubic (a row per output index).
    fn float_weights(n_in: usize, n_out: usize) -> Vec<Vec<f64>> {
        let scale = n_in as f64 / n_out as f64;
        let fs = scale.max(1.0);
        (0..n_out)
            .map(|o| {
                let center = (o as f64 + 0.5) * scale;
                let lo = (center - 2.0 * fs + 0.5).floor().max(0.0);
                let hi = (center + 2.0 * fs + 0.5).floor().min(n_in as f64);
                let mut w: Vec<f64> = (0..n_in)
                    .map(|i| {
                        let i = i as f64;
                        if i >= lo && i < hi {
                            crate::resize::bicubic((i - center + 0.5) / fs)
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let s: f64 = w.iter().sum();
                w.iter_mut().for_each(|v| *v /= s);
                w
            })
            .collect()
    }

    /// Crop boxes stay inside the image, and over many draws the accepted
    /// area fraction and log-ratio are uniform over their ranges (compared
    /// with the analytic mean and spread), as torchvision samples them.
    #[test]
    fn crop_params_in_bounds_and_distributed_like_torchvision() {
        let (w, h) = (500usize, 375usize);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let cfg = Config::default();
        let n = 20_000;
        let (mut fracs, mut logr) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let b = random_resized_crop_params(w, h, cfg.scale, cfg.ratio, &mut rng);
            assert!(b.width >= 1 && b.height >= 1);
            assert!(b.left + b.width <= w && b.top + b.height <= h, "{b:?}");
            fracs.push((b.width * b.height) as f64 / (w * h) as f64);
            logr.push((b.width as f64 / b.height as f64).ln());
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        // The independent computation: torchvision accepts a draw (s, log r),
        // s ~ U(0.2, 1), log r ~ U(ln 3/4, ln 4/3), when the rounded box fits;
        // retries make the accepted draws distributed as the uniform density
        // restricted to the acceptance region (the fallback after 10 misses
        // is negligible here). Integrate that on a fine grid.
        let (g, lr) = (600, (4.0f64 / 3.0).ln());
        let (mut z, mut es, mut el, mut el2) = (0.0, 0.0, 0.0, 0.0);
        for a in 0..g {
            for b in 0..g {
                let s = 0.2 + 0.8 * (a as f64 + 0.5) / g as f64;
                let l = -lr + 2.0 * lr * (b as f64 + 0.5) / g as f64;
                let area = s * (w * h) as f64;
                let bw = (area * l.exp()).sqrt().round_ties_even() as usize;
                let bh = (area / l.exp()).sqrt().round_ties_even() as usize;
                if bw <= w && bh <= h {
                    z += 1.0;
                    es += s;
                    el += l;
                    el2 += l * l;
                }
            }
        }
        let (want_s, want_l) = (es / z, el / z);
        let want_var = el2 / z - want_l * want_l;
        let m = mean(&fracs);
        assert!((m - want_s).abs() < 0.01, "area mean {m} vs {want_s}");
        assert!(fracs.iter().all(|&f| (0.19..=1.0).contains(&f)));
        let lm = mean(&logr);
        let var = logr.iter().map(|x| (x - lm).powi(2)).sum::<f64>() / n as f64;
        assert!((lm - want_l).abs() < 0.01, "log ratio mean {lm} vs {want_l}");
        assert!((var / want_var - 1.0).abs() < 0.1, "log ratio var {var} vs {want_var}");
        assert!(logr.iter().all(|&r| r.abs() <= (4.0f64 / 3.0).ln() + 0.02));
    }

    #[test]
    fn fallback_is_the_ratio_clamped_center_crop() {
        // A 1000 x 10 strip never fits a crop of ratio <= 4/3 with area >= 20%.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let b = random_resized_crop_params(1000, 10, [0.2, 1.0], [0.75, 4.0 / 3.0], &mut rng);
        assert_eq!(
            b,
            CropBox {
                top: 0,
                left: (1000 - 13) / 2,
                height: 10,
                width: 13
            }
        );
        assert_eq!(
            center_crop_fallback(10, 1000, [0.75, 4.0 / 3.0]),
            CropBox {
                top: (1000 - 13) / 2,
                left: 0,
                height: 13,
                width: 10
            }
        );
        assert_eq!(
            center_crop_fallback(40, 40, [0.75, 4.0 / 3.0]),
            CropBox {
                top: 0,
                left: 0,
                height: 40,
                width: 40
            }
        );
    }

    #[test]
    fn flip_mirrors_the_unflipped_view_and_rate_is_half() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let img = Rgb8 {
            width: 40,
            height: 30,
            data: (0..40 * 30 * 3).map(|_| rng.random()).collect(),
        };
        let crop = CropBox {
            top: 2,
            left: 3,
            height: 25,
            width: 33,
        };
        let a = resize_bicubic(&img, crop, 20, 20, false);
        let b = resize_bicubic(&img, crop, 20, 20, true);
        for y in 0..20 {
            for x in 0..20 {
                for c in 0..3 {
                    assert_eq!(a.at(x, y, c), b.at(19 - x, y, c));
                }
            }
        }
        let cfg = Config {
            size: 8,
            ..Config::default()
        };
        let flips = (0..2000)
            .filter(|i| {
                let mut r = shards::rng::stage_rng(1, 0, &format!("k{i}"), "augment");
                apply(&cfg, &img, &mut r).unwrap().1.flip
            })
            .count();
        assert!((900..1100).contains(&flips), "{flips} flips of 2000");
    }

    #[test]
    fn same_key_same_view_on_another_thread_other_epoch_differs() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let img = Rgb8 {
            width: 64,
            height: 48,
            data: (0..64 * 48 * 3).map(|_| rng.random()).collect(),
        };
        let cfg = Config {
            size: 32,
            ..Config::default()
        };
        let run =
            |img: &Rgb8, epoch| apply(&cfg, img, &mut shards::rng::stage_rng(7, epoch, "key", "augment")).unwrap();
        let here = run(&img, 0);
        let img2 = img.clone();
        let cfg2 = cfg.clone();
        let there = std::thread::spawn(move || {
            apply(&cfg2, &img2, &mut shards::rng::stage_rng(7, 0, "key", "augment")).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(here, there);
        assert!((1..6).any(|e| run(&img, e).1 != here.1));
    }
}
