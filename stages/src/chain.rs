//! The data stages' configuration (the `stages:` section of a run config), and
//! the chain on one raw sample: [`process`] runs the stage list of
//! [`crate::record`] (decode -> augment -> mask -> smooth -> targets), the one the
//! training graph runs, and shows the result as an [`Example`].
//!
//! Every random draw comes from `stage_rng(run seed, epoch, key, STAGE)` with
//! the stage's own name, so an example depends only on (config, seed, epoch,
//! sample), never on the thread or the order (test below runs it on threads).

use crate::record::{Record, Stages};
use crate::sample::{Example, Rgb8, StageError, Target};
use crate::{augment, decode, mask, smooth, targets};
use serde::{Deserialize, Serialize};

/// Configuration of every data stage, as the `stages:` section of a run config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StagesConfig {
    /// Patch side in pixels, shared by masking and the per-patch targets (ViT-B/16: 16).
    pub patch: usize,
    /// Channels the model sees: 3 (RGB), or 1 (luma; for grey datasets). With 1
    /// the stages decode to one channel (libjpeg's grayscale, else the luma of
    /// the RGB decode) and crop, blur, extract and pack that one plane.
    pub channels: usize,
    /// Decoding (pixel limit).
    pub decode: decode::Config,
    /// Crop, flip and normalization.
    pub augment: augment::Config,
    /// Masking ratio.
    pub mask: mask::Config,
    /// Smoothed target sigma and method.
    pub smooth: smooth::Config,
    /// Which per-patch targets, and their parameters.
    pub targets: targets::Config,
}

impl Default for StagesConfig {
    fn default() -> Self {
        StagesConfig {
            patch: 16,
            channels: 3,
            decode: Default::default(),
            augment: Default::default(),
            mask: Default::default(),
            smooth: Default::default(),
            targets: Default::default(),
        }
    }
}

impl StagesConfig {
    /// Values per patch of a target kind.
    pub fn target_dims(&self, kind: targets::Kind) -> usize {
        let p = self.patch;
        match kind {
            targets::Kind::Pixel => p * p * self.channels,
            targets::Kind::Hog => targets::hog::DIMS / 3 * self.channels,
            targets::Kind::Canny if self.targets.canny.fraction => 1,
            targets::Kind::Canny => p * p,
            targets::Kind::Clip => self.targets.clip.as_ref().map_or(0, |c| c.projection_dim),
        }
    }

    /// Check combinations no single stage can see (patch vs image size).
    pub fn validate(&self) -> Result<(), StageError> {
        let (size, p) = (self.augment.size, self.patch);
        if p == 0 || size == 0 || size % p != 0 {
            return Err(StageError::Config(format!(
                "stages.augment.size {size} is not a multiple of stages.patch {p}"
            )));
        }
        // A sigma beyond the image would only cost memory (the kernels and
        // the recursive filter's border extension grow with it).
        let limit = size as f64;
        for (name, sigma) in [
            ("smooth.sigma", self.smooth.sigma),
            ("targets.canny.sigma", self.targets.canny.sigma),
        ] {
            if !(sigma > 0.0 && sigma <= limit) {
                return Err(StageError::Config(format!(
                    "stages.{name} {sigma} must be in (0, augment.size = {size}]"
                )));
            }
        }
        if !(0.0..1.0).contains(&self.mask.ratio) {
            return Err(StageError::Config(format!(
                "stages.mask.ratio {} must be in [0, 1): it is the fraction of patches removed",
                self.mask.ratio
            )));
        }
        if ![1, 3].contains(&self.channels) {
            return Err(StageError::Config(format!(
                "stages.channels is {}: 3 (RGB) or 1 (luma)",
                self.channels
            )));
        }
        if self.channels == 1 && self.targets.kinds.contains(&targets::Kind::Clip) {
            return Err(StageError::Config(
                "stages.channels 1 with clip targets: CLIP sees RGB views (set stages.channels: 3)".into(),
            ));
        }
        if self.targets.kinds.contains(&targets::Kind::Hog) && p % 2 != 0 {
            return Err(StageError::Config(format!("hog needs an even stages.patch, got {p}")));
        }
        crate::views::validate(self)?;
        Ok(())
    }
}

/// The name of the augment stage's rng stream (`stage_rng(seed, epoch, key, name)`).
pub const AUGMENT_STREAM: &str = "augment";
/// The name of the mask stage's rng stream.
pub const MASK_STREAM: &str = "mask";

/// A stage failure, with the sample key and the stage's name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {stage}: {error}")]
pub struct ChainError {
    /// The sample key.
    pub key: String,
    /// Which stage failed.
    pub stage: &'static str,
    /// Why.
    pub error: StageError,
}

/// Run every stage on one raw sample in `epoch`: [`Stages::run`], the list the
/// training graph runs, on one record, shown as an [`Example`] (the view and x̂
/// normalized as the training device normalizes them).
pub fn process(stages: &Stages, raw: &shards::Sample, epoch: u64) -> Result<Example, ChainError> {
    let record = stages
        .run(Record::of_sample(raw, epoch))
        .map_err(|(stage, error)| ChainError {
            key: raw.key.clone(),
            stage: stage.name(),
            error,
        })?;
    Ok(example(stages.config(), record))
}

/// The normalized view as the model sees it, C x H x W: RGB, or with
/// `channels` 1 the luma plane normalized with the first mean and std.
pub fn normalize_channels(img: &Rgb8, a: &augment::Config, channels: usize) -> Vec<f32> {
    if channels == 1 {
        let lut = augment::normalize_lut(a.mean, a.std);
        img.data
            .chunks_exact(3)
            .map(|p| lut[0][crate::sample::luma(p) as usize])
            .collect()
    } else {
        augment::normalize(img, a.mean, a.std)
    }
}

/// A finished record as an [`Example`]: the u8 view and x̂ normalized with the
/// config's mean and std (as the model sees them: `channels` planes), the
/// targets named by their kinds.
pub fn example(cfg: &StagesConfig, r: Record) -> Example {
    let a = &cfg.augment;
    // A one-channel run's view and x̂ are luma planes already; the view to look at
    // is RGB (a luma view as three equal channels, whose luma is itself).
    let one_channel = r.pixels.channels() == 1;
    let pixels: Rgb8 = r.pixels.into();
    let image = normalize_channels(&pixels, a, cfg.channels);
    let smooth = if one_channel {
        let lut = augment::normalize_lut(a.mean, a.std);
        r.smooth.iter().map(|&v| lut[0][v as usize]).collect()
    } else {
        let smooth = Rgb8 {
            width: pixels.width,
            height: pixels.height,
            data: r.smooth,
        };
        normalize_channels(&smooth, a, cfg.channels)
    };
    let targets = cfg
        .targets
        .kinds
        .iter()
        .zip(r.targets)
        .map(|(kind, (dims, values))| Target {
            kind: kind.name().to_string(),
            dims,
            values,
        })
        .collect();
    Example {
        key: r.key,
        class: r.class,
        view: r.view,
        pixels,
        image,
        patch: cfg.patch,
        mask: r.mask,
        smooth,
        targets,
    }
}

/// [`process`] under an `on_error` policy: a failure is counted in `skips`
/// (logged as `shard:key: reason`) and gives `Ok(None)` under `Skip`, and is
/// returned under `Fail`.
pub fn process_or_skip(
    stages: &Stages,
    raw: &shards::Sample,
    epoch: u64,
    policy: shards::OnError,
    skips: &shards::Skips,
    shard: &str,
) -> Result<Option<Example>, ChainError> {
    match process(stages, raw, epoch) {
        Ok(ex) => Ok(Some(ex)),
        Err(e) if policy == shards::OnError::Skip => {
            skips.record(shard, &e.key, &format!("{}: {}", e.stage, e.error));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg_sample(key: &str) -> shards::Sample {
        use image::codecs::jpeg::JpegEncoder;
        let (w, h) = (120u32, 90u32);
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| ((i / 3) % w * 2 + (i % 3) * 40) as u8).collect();
        let mut bytes = Vec::new();
        JpegEncoder::new_with_quality(&mut bytes, 90)
            .encode(&rgb, w, h, image::ExtendedColorType::Rgb8)
            .unwrap();
        shards::Sample::new(key).with("jpg", bytes).with("cls", b"7".to_vec())
    }

    fn small_cfg() -> StagesConfig {
        let mut cfg = StagesConfig::default();
        cfg.augment.size = 64;
        cfg.smooth.sigma = 3.0;
        cfg.targets.kinds = vec![targets::Kind::Pixel, targets::Kind::Hog, targets::Kind::Canny];
        cfg
    }

    #[test]
    fn shapes_and_independent_recomputation() {
        let cfg = small_cfg();
        let ex = process(&Stages::new(cfg.clone(), 1).unwrap(), &jpeg_sample("a"), 0).unwrap();
        assert_eq!(ex.class, Some(7));
        assert_eq!(
            (ex.view.source_width, ex.view.source_height, ex.view.size),
            (120, 90, 64)
        );
        assert_eq!(ex.image.len(), 3 * 64 * 64);
        assert_eq!(ex.smooth.len(), 3 * 64 * 64);
        assert_eq!(ex.num_patches(), 16);
        assert_eq!(ex.mask.mask.len(), 16);
        assert_eq!(ex.mask.mask.iter().filter(|&&m| m == 0).count(), 4);
        let dims: Vec<usize> = ex.targets.iter().map(|t| t.dims).collect();
        assert_eq!(dims, vec![768, 108, 256]);
        // The chain's pieces, recomputed one by one from the recorded view.
        let decoded = decode::apply(&cfg.decode, &jpeg_sample("a")).unwrap();
        let again = augment::resize_bicubic(&decoded, ex.view.crop, 64, 64, ex.view.flip);
        assert_eq!(again, ex.pixels);
        let normalized = augment::normalize(&again, cfg.augment.mean, cfg.augment.std);
        assert_eq!(normalized, ex.image);
        // x̂ is the blur of the u8 view, rounded to u8: within that rounding
        // (0.5 / 255 / std) and the fast blur's error of the exact blur of the normalized view.
        let exact = smooth::blur_exact(&normalized, 3, 64, 64, 3.0);
        let err = exact
            .iter()
            .zip(&ex.smooth)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 0.02, "smooth error {err}");
    }

    /// `stages.channels: 1`: the model sees the view's luma (exact on a grey
    /// image), the pixel target is one channel's, HOG the first of its three
    /// equal channels per cell (checked: the three are equal), Canny unchanged.
    #[test]
    fn one_channel_sees_the_luma_view_and_its_targets() {
        assert!((0..=255u8).all(|v| crate::sample::luma(&[v, v, v]) == v));
        let mut cfg = small_cfg();
        let rgb = process(&Stages::new(cfg.clone(), 1).unwrap(), &jpeg_sample("a"), 0).unwrap();
        cfg.channels = 1;
        let grey = process(&Stages::new(cfg.clone(), 1).unwrap(), &jpeg_sample("a"), 0).unwrap();
        assert_eq!(grey.image.len(), 64 * 64);
        assert_eq!(grey.smooth.len(), 64 * 64);
        let dims: Vec<usize> = grey.targets.iter().map(|t| t.dims).collect();
        assert_eq!(dims, vec![256, 36, 256]);
        assert_eq!(
            dims,
            cfg.targets
                .kinds
                .iter()
                .map(|&k| cfg.target_dims(k))
                .collect::<Vec<_>>()
        );
        // The same view and mask as the RGB run; the image is the luma of its pixels.
        assert_eq!((grey.view, &grey.mask), (rgb.view, &rgb.mask));
        let lut = augment::normalize_lut(cfg.augment.mean, cfg.augment.std);
        let want: Vec<f32> = rgb
            .pixels
            .data
            .chunks_exact(3)
            .map(|p| lut[0][crate::sample::luma(p) as usize])
            .collect();
        assert_eq!(grey.image, want);
        // HOG of the luma view: per patch 3 equal channel blocks, of which the target keeps the first.
        let full = targets::hog::hog(&rgb.pixels.grey(), cfg.patch).unwrap();
        let c = targets::hog::DIMS / 3;
        for (patch, kept) in full.chunks_exact(3 * c).zip(grey.targets[1].values.chunks_exact(c)) {
            assert_eq!(&patch[..c], kept);
            assert_eq!(&patch[..c], &patch[c..2 * c]);
            assert_eq!(&patch[..c], &patch[2 * c..]);
        }
        assert!(matches!(
            Stages::new(
                StagesConfig {
                    channels: 2,
                    ..cfg.clone()
                },
                0
            ),
            Err(StageError::Config(_))
        ));
    }

    #[test]
    fn same_inputs_same_example_on_other_threads_epochs_differ() {
        let stages = Stages::new(small_cfg(), 5).unwrap();
        let here = process(&stages, &jpeg_sample("k1"), 2).unwrap();
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let stages = stages.clone();
                std::thread::spawn(move || process(&stages, &jpeg_sample("k1"), 2).unwrap())
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), here);
        }
        let other = process(&stages, &jpeg_sample("k1"), 3).unwrap();
        assert_ne!(other.mask, here.mask);
        let other_key = process(&stages, &jpeg_sample("k2"), 2).unwrap();
        assert_ne!(other_key.mask, here.mask);
    }

    #[test]
    fn bad_samples_skip_or_fail_by_policy() {
        let cfg = small_cfg();
        let stages = Stages::new(cfg.clone(), 0).unwrap();
        let skips = shards::Skips::default();
        let bad = shards::Sample::new("bad").with("jpg", b"\xFF\xD8\xFF\xE0garbage".to_vec());
        let got = process_or_skip(&stages, &bad, 0, shards::OnError::Skip, &skips, "s.tar").unwrap();
        assert!(got.is_none());
        assert_eq!(skips.total(), 1);
        let e = process_or_skip(&stages, &bad, 0, shards::OnError::Fail, &skips, "s.tar").unwrap_err();
        assert_eq!((e.key.as_str(), e.stage), ("bad", "decode"));
        assert!(e.to_string().starts_with("bad: decode: corrupt image"), "{e}");
        let mut wrong = cfg.clone();
        wrong.patch = 24;
        assert!(matches!(Stages::new(wrong, 0), Err(StageError::Config(_))));
        let mut wrong = cfg.clone();
        wrong.smooth.sigma = 1e9;
        assert!(matches!(Stages::new(wrong, 0), Err(StageError::Config(_))));
    }

    #[test]
    fn config_reads_from_yaml_like_json_and_rejects_unknown_keys() {
        let cfg: StagesConfig =
            serde_json::from_str(r#"{"mask": {"ratio": 0.5}, "smooth": {"sigma": 2.0, "method": "exact"}}"#).unwrap();
        assert_eq!(cfg.mask.ratio, 0.5);
        assert_eq!(cfg.smooth.method, smooth::Method::Exact);
        assert_eq!(cfg.augment, augment::Config::default());
        assert!(serde_json::from_str::<StagesConfig>(r#"{"mask": {"ratoi": 0.5}}"#).is_err());
        assert!(serde_json::from_str::<StagesConfig>(r#"{"maks": {}}"#).is_err());
    }
}
