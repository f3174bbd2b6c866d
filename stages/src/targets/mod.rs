//! Per-patch targets F(x) on exactly the view the backbone sees: `pixel`
//! (MAE norm-pix), `hog` (MaskFeat), `canny` (edge map) and `clip` (a frozen
//! CLIP ViT-B/16 teacher, computed into the target cache). Each file names
//! its reference testvector and tolerance.

pub mod canny;
pub mod clip;
pub mod hog;
pub mod pixel;

use std::path::PathBuf;

use crate::sample::{Rgb8, StageError, Target};
use serde::{Deserialize, Serialize};
pub use shards::store::Dtype;

/// Which target a config asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// MAE's normalized pixels, P*P*3 per patch.
    Pixel,
    /// MaskFeat HOG, 108 per patch.
    Hog,
    /// Canny edges, P*P bits (or 1 fraction) per patch.
    Canny,
    /// CLIP ViT-B/16 patch tokens (512 per patch), batched: from the target cache only.
    Clip,
}

impl Kind {
    /// The name used in file names and logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pixel => "pixel",
            Kind::Hog => "hog",
            Kind::Canny => "canny",
            Kind::Clip => "clip",
        }
    }
}

/// `stages.targets.canny` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CannyConfig {
    /// Gaussian sigma before the gradient.
    pub sigma: f64,
    /// Hysteresis low threshold on the Sobel magnitude of the [0, 1] gray image.
    pub low: f64,
    /// Hysteresis high threshold.
    pub high: f64,
    /// One edge fraction per patch instead of P*P edge bits.
    pub fraction: bool,
}

impl Default for CannyConfig {
    fn default() -> Self {
        CannyConfig {
            sigma: 1.0,
            low: 0.1,
            high: 0.2,
            fraction: false,
        }
    }
}

/// What a run does when its targets config matches no complete store (`stages.targets.on_miss`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMiss {
    /// Stop with an error naming the store and what is missing.
    #[default]
    Error,
    /// Compute the missing views into the store (as `pipeline precompute` would), then train.
    Compute,
}

/// `stages.targets` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Targets computed for every sample, in this order.
    pub kinds: Vec<Kind>,
    /// Canny parameters.
    pub canny: CannyConfig,
    /// The CLIP teacher (kind `clip`).
    pub clip: Option<clip::ClipConfig>,
    /// The target cache's root directory (DESIGN.md, "Target cache"): when
    /// set, a run reads every target from the store of its spec under this
    /// directory and calls no extractor, and `pipeline precompute` fills it.
    pub cache: Option<PathBuf>,
    /// K: views per sample stored in the cache; a run feeds one of them per epoch.
    pub views: u32,
    /// The seed of the cached views (view v of sample s is drawn from (view_seed, s, v)).
    pub view_seed: u64,
    /// How the cache stores values: `f16`, or `int8` with a per-token scale.
    pub dtype: Dtype,
    /// A run whose config matches no complete store: `error` or `compute`.
    pub on_miss: OnMiss,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kinds: vec![Kind::Hog],
            canny: CannyConfig::default(),
            clip: None,
            cache: None,
            views: 8,
            view_seed: 0,
            dtype: Dtype::F16,
            on_miss: OnMiss::Error,
        }
    }
}

/// [`compute`] for a one-channel model: the target of the view's luma. `grey` is
/// the view with its three channels set to their luma ([`Rgb8::grey`]), `image`
/// the normalized luma plane (1 x H x W). HOG keeps the first of its three equal
/// channels (36 values per patch), the pixel target is one channel's.
pub fn compute_grey(kind: Kind, cfg: &Config, grey: &Rgb8, image: &[f32], patch: usize) -> Result<Target, StageError> {
    let (h, w) = (grey.height, grey.width);
    let values = match kind {
        Kind::Pixel => pixel::pixel_target(image, 1, h, w, patch)?,
        Kind::Hog => {
            let all = hog::hog_of_grey(grey, patch)?;
            // Per patch channel-major (`((c * 9 + bin) * 2 + cell_y) * 2 + cell_x`): keep channel 0.
            let per_channel = hog::DIMS / 3;
            all.chunks_exact(hog::DIMS)
                .flat_map(|patch| &patch[..per_channel])
                .copied()
                .collect()
        }
        Kind::Canny | Kind::Clip => return compute(kind, cfg, grey, image, patch),
    };
    let n = (h / patch) * (w / patch);
    Ok(Target {
        kind: kind.name().to_string(),
        dims: values.len() / n.max(1),
        values,
    })
}

/// Compute one target from the view's u8 pixels and its normalized C x H x W floats.
pub fn compute(kind: Kind, cfg: &Config, pixels: &Rgb8, image: &[f32], patch: usize) -> Result<Target, StageError> {
    let (h, w) = (pixels.height, pixels.width);
    let values = match kind {
        Kind::Pixel => pixel::pixel_target(image, 3, h, w, patch)?,
        Kind::Hog => hog::hog(pixels, patch)?,
        Kind::Canny => {
            let c = &cfg.canny;
            let edges = canny::canny(&canny::gray(pixels), h, w, c.sigma, c.low, c.high);
            canny::per_patch(&edges, h, w, patch, c.fraction)?
        }
        Kind::Clip => {
            return Err(StageError::Config(
                "clip targets are computed in batches into the target cache: set stages.targets.cache and run \
                 `pipeline precompute` (or stages.targets.on_miss: compute)"
                    .into(),
            ))
        }
    };
    let n = (h / patch) * (w / patch);
    Ok(Target {
        kind: kind.name().to_string(),
        dims: values.len() / n.max(1),
        values,
    })
}
