//! Evaluation of a frozen backbone: the features it gives, a linear probe and a kNN classifier on them.
//!
//! Features go through the same data path as training, minus the randomness
//! (MAE's `main_linprobe.py` eval transform): decode -> center crop ->
//! bicubic resize -> normalize, no masking, no flip. [`eval_view`] reuses the
//! augment stage's resampler and normalization. The crop is a square of
//! `crop_fraction` of the short side (MAE on ImageNet: Resize(256) +
//! CenterCrop(224), a fraction of 0.875); at fraction 1 on a square image of
//! the model's size (the embedded 28 px Fashion-MNIST) it is the identity.
//!
//! The backbone's output is pooled by [`Pool`]: the cls token after the final
//! norm (MAE's linear probe, and timm's `forward_features(x)[:, 0]`) or the
//! mean of the patch tokens after the final norm.
//!
//! [`linprobe`] and [`knn`] are pure functions of feature matrices
//! ([`Features`]) so they are tested on features with a known answer.

pub mod finetune;
pub mod knn;
pub mod linprobe;

use crate::augment;
use crate::model::vit::Vit;
use crate::sample::{CropBox, Rgb8};
use candle_core::{Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// What one image's feature vector is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The cls token after the final norm (MAE's linear probe).
    Cls,
    /// The mean of the patch tokens after the final norm.
    Mean,
}

/// The `eval:` section of a run config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// `cls | mean`.
    pub features: Pool,
    /// Images per backbone forward pass while extracting features.
    pub batch_size: usize,
    /// Center crop side as a fraction of the short side, before resizing to
    /// `stages.augment.size` (MAE on ImageNet: 224 / 256 = 0.875).
    pub crop_fraction: f64,
    /// Use only the first N labelled training samples (all when unset).
    pub train_limit: Option<usize>,
    /// Use only the first N test samples (all when unset).
    pub test_limit: Option<usize>,
    /// The linear probe's head and optimizer.
    pub linprobe: linprobe::Config,
    /// The kNN classifier.
    pub knn: knn::Config,
    /// End-to-end fine-tuning (`pipeline eval finetune`).
    pub finetune: finetune::Config,
    /// The share of `data.train`'s labels that fine-tuning, the linear probe
    /// and kNN train on: a class-balanced subset drawn by `eval.label_seed`
    /// ([`finetune::label_subset`]). Top-1 is always on all of `data.test`
    /// (up to `test_limit`).
    pub label_fraction: f64,
    /// Seeds the label subset.
    pub label_seed: u64,
    /// `pipeline run` ends with a linear probe of the pretrained backbone
    /// beside the same probe on its random initialization.
    pub after_run: bool,
    /// Training / test samples of that probe (kept small: it should cost
    /// well under a minute on the embedded default).
    pub after_run_samples: [usize; 2],
    /// `pipeline run` also fine-tunes on this share of `data.train`'s labels,
    /// the pretrained backbone beside its random initialization, with
    /// `eval.finetune`'s recipe; 0 turns it off.
    pub after_run_finetune_fraction: f64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            // Our losses act on the patch tokens only and never on the cls
            // row's output, so after a short pre-training the cls token
            // carries less than the mean patch token (embedded default:
            // linear probe 75.8% cls vs 77.3% mean); MAE's probe uses `cls`.
            features: Pool::Mean,
            batch_size: 256,
            crop_fraction: 1.0,
            train_limit: None,
            test_limit: None,
            linprobe: linprobe::Config::default(),
            knn: knn::Config::default(),
            after_run: true,
            after_run_samples: [10_000, 10_000],
            finetune: finetune::Config::default(),
            label_fraction: 1.0,
            label_seed: 0,
            after_run_finetune_fraction: 0.01,
        }
    }
}

impl EvalConfig {
    /// Rejects values that cannot work, naming the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.batch_size == 0 {
            return Err("eval.batch_size must be positive".into());
        }
        if !(self.crop_fraction > 0.0 && self.crop_fraction <= 1.0) {
            return Err(format!("eval.crop_fraction {} must be in (0, 1]", self.crop_fraction));
        }
        if self.after_run_samples.contains(&0) {
            return Err("eval.after_run_samples must both be positive".into());
        }
        if !(self.label_fraction > 0.0 && self.label_fraction <= 1.0) {
            return Err(format!(
                "eval.label_fraction {} must lie in (0, 1]",
                self.label_fraction
            ));
        }
        if !(0.0..=1.0).contains(&self.after_run_finetune_fraction) {
            return Err(format!(
                "eval.after_run_finetune_fraction {} must lie in [0, 1] (0: no fine-tune after the run)",
                self.after_run_finetune_fraction
            ));
        }
        self.linprobe.validate()?;
        self.knn.validate()?;
        self.finetune.validate()
    }
}

/// Labelled feature vectors: `values` is `labels.len() x dim`, row-major.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Features {
    pub values: Vec<f32>,
    pub dim: usize,
    /// Class index per row.
    pub labels: Vec<usize>,
}

impl Features {
    /// Rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Appends `rows` (n x dim) with their labels.
    pub fn extend(&mut self, rows: &[f32], labels: &[usize]) {
        self.values.extend_from_slice(rows);
        self.labels.extend_from_slice(labels);
    }

    /// Checks the shape, naming `what`.
    pub fn check(&self, what: &str) -> std::result::Result<(), String> {
        if self.dim == 0 || self.values.len() != self.labels.len() * self.dim {
            return Err(format!(
                "{what}: {} values for {} rows of {} features",
                self.values.len(),
                self.labels.len(),
                self.dim
            ));
        }
        if self.is_empty() {
            return Err(format!("{what}: no samples"));
        }
        Ok(())
    }
}

/// Classes seen in either set: 1 + the largest label.
pub fn num_classes(train: &Features, test: &Features) -> usize {
    train.labels.iter().chain(&test.labels).max().map_or(0, |m| m + 1)
}

/// Fraction of rows where `predicted` equals `labels`.
pub fn top1(predicted: &[usize], labels: &[usize]) -> f64 {
    let hits = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
    hits as f64 / labels.len().max(1) as f64
}

/// The evaluation view of a decoded image: a centered square of
/// `crop_fraction` of the short side, resized (PIL bicubic) to `size`. No
/// flip, nothing random.
pub fn eval_view<const C: usize>(
    img: &crate::sample::Image8<C>,
    size: usize,
    crop_fraction: f64,
) -> crate::sample::Image8<C> {
    let side =
        ((img.width.min(img.height) as f64 * crop_fraction).round() as usize).clamp(1, img.width.min(img.height));
    let crop = CropBox {
        // torchvision's CenterCrop rounds the offsets: int(round((h - side) / 2)).
        top: ((img.height - side) as f64 / 2.0).round_ties_even() as usize,
        left: ((img.width - side) as f64 / 2.0).round_ties_even() as usize,
        height: side,
        width: side,
    };
    augment::resize_bicubic(img, crop, size, size, false)
}

/// The normalized floats of a one-channel run's [`eval_view`] of its grey decode
/// (`decode::apply_grey`, what its training views are cut from).
pub fn eval_image_grey(img: &crate::sample::Grey8, cfg: &augment::Config, crop_fraction: f64) -> Vec<f32> {
    let lut = augment::normalize_lut(cfg.mean, cfg.std);
    eval_view(img, cfg.size, crop_fraction)
        .data
        .iter()
        .map(|&v| lut[0][v as usize])
        .collect()
}

/// The normalized C x H x W floats of [`eval_view`], as training normalizes them
/// (`channels` 1: the luma plane; a one-channel run's own evaluation decodes grey
/// instead, [`eval_image_grey`]).
pub fn eval_image(img: &Rgb8, cfg: &augment::Config, crop_fraction: f64, channels: usize) -> Vec<f32> {
    crate::chain::normalize_channels(&eval_view(img, cfg.size, crop_fraction), cfg, channels)
}

/// Frozen-backbone features of normalized images (B, C, H, W) -> (B, D).
pub fn backbone_features(vit: &Vit, images: &Tensor, pool: Pool) -> Result<Tensor> {
    let tokens = vit.forward(&images.detach())?; // (B, 1 + N, D) after the final norm
    match pool {
        Pool::Cls => tokens.narrow(1, 0, 1)?.squeeze(1),
        Pool::Mean => {
            let n = tokens.dim(1)? - 1;
            tokens.narrow(1, 1, n)?.mean(D::Minus2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_view_is_the_identity_at_the_model_size_and_centers_a_crop() {
        let img = Rgb8 {
            width: 28,
            height: 28,
            data: (0..28 * 28 * 3).map(|i| (i * 7 % 251) as u8).collect(),
        };
        assert_eq!(eval_view(&img, 28, 1.0), img);
        // A 40 x 20 image at fraction 1: the middle 20 x 20 square, unchanged.
        let wide = Rgb8 {
            width: 40,
            height: 20,
            data: (0..40 * 20 * 3).map(|i| (i * 13 % 253) as u8).collect(),
        };
        let got = eval_view(&wide, 20, 1.0);
        for y in 0..20 {
            for x in 0..20 {
                for c in 0..3 {
                    assert_eq!(got.at(x, y, c), wide.at(x + 10, y, c), "({x}, {y}, {c})");
                }
            }
        }
    }

    #[test]
    fn top1_counts_matches() {
        assert_eq!(top1(&[1, 2, 3, 0], &[1, 2, 0, 0]), 0.75);
    }
}
