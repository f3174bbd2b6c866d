//! Per-patch targets F(x) on exactly the view the backbone sees: `pixel`
//! (MAE norm-pix), `hog` (MaskFeat) and `canny` (edge map). Each file names
//! its reference testvector and tolerance.

pub mod canny;
pub mod hog;
pub mod pixel;

use crate::sample::{Rgb8, StageError, Target};
use serde::{Deserialize, Serialize};

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
}

impl Kind {
    /// The name used in file names and logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pixel => "pixel",
            Kind::Hog => "hog",
            Kind::Canny => "canny",
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

/// `stages.targets` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Targets computed for every sample, in this order.
    pub kinds: Vec<Kind>,
    /// Canny parameters.
    pub canny: CannyConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kinds: vec![Kind::Hog],
            canny: CannyConfig::default(),
        }
    }
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
    };
    let n = (h / patch) * (w / patch);
    Ok(Target {
        kind: kind.name().to_string(),
        dims: values.len() / n.max(1),
        values,
    })
}
