//! What flows through the dataflow: one sample of one batch, filled in stage by stage.
//!
//! Each stage function here takes a record, calls the `stages` crate's pure
//! function for that stage with the rng of `(seed, epoch, key, stage)`, and
//! returns the record with its output filled in. The record is serde so it can
//! cross processes when two stages sit on different machines.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shards::rng::stage_rng;
use stages::chain::{AUGMENT, MASK};
use stages::sample::{Mask, Rgb8, StageError, Target, View};
use stages::{augment, decode, mask, smooth, targets, StagesConfig};

/// 8-bit RGB pixels (H x W x 3), the wire form of `stages::sample::Rgb8`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl From<Rgb8> for Image {
    fn from(img: Rgb8) -> Image {
        Image {
            width: img.width,
            height: img.height,
            data: img.data,
        }
    }
}

impl From<Image> for Rgb8 {
    fn from(img: Image) -> Rgb8 {
        Rgb8 {
            width: img.width,
            height: img.height,
            data: img.data,
        }
    }
}

/// One sample on its way to the trainer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    /// The global batch index (also the timely timestamp).
    pub batch: u64,
    /// The epoch of the batch.
    pub epoch: u64,
    /// Lane and position in the lane: the sink orders a batch by these.
    pub lane: u32,
    pub position: u64,
    /// Where it came from, for error messages.
    pub shard: String,
    pub key: String,
    pub class: Option<i64>,
    /// The shard members, until decode.
    pub raw: BTreeMap<String, Vec<u8>>,
    /// Decoded pixels, then (after augment) the u8 view.
    pub pixels: Image,
    /// How the view was cut (after augment).
    pub view: View,
    /// Normalized view, C x H x W (after augment).
    pub image: Vec<f32>,
    /// Per patch, 1 = removed (after mask).
    pub mask: Vec<u8>,
    /// Smoothed target x̂, C x H x W (after smooth).
    pub smooth: Vec<f32>,
    /// Per-patch targets in config order, each patches x dims (after targets).
    pub targets: Vec<(usize, Vec<f32>)>,
}

/// decode: shard members -> RGB pixels.
pub fn decode(cfg: &StagesConfig, mut r: Record) -> Result<Record, StageError> {
    let sample = shards::Sample {
        key: std::mem::take(&mut r.key),
        files: std::mem::take(&mut r.raw),
    };
    let decoded = decode::apply(&cfg.decode, &sample);
    r.key = sample.key;
    r.pixels = decoded?.into();
    Ok(r)
}

/// augment: random resized crop + flip, then normalization (where data becomes float).
pub fn augment(cfg: &StagesConfig, seed: u64, mut r: Record) -> Result<Record, StageError> {
    let mut rng = stage_rng(seed, r.epoch, &r.key, AUGMENT);
    let decoded: Rgb8 = std::mem::take(&mut r.pixels).into();
    let (pixels, view) = augment::apply(&cfg.augment, &decoded, &mut rng)?;
    r.image = augment::normalize(&pixels, cfg.augment.mean, cfg.augment.std);
    r.pixels = pixels.into();
    r.view = view;
    Ok(r)
}

/// mask: MAE random masking of the patches.
pub fn mask(cfg: &StagesConfig, seed: u64, mut r: Record) -> Result<Record, StageError> {
    let grid = cfg.augment.size / cfg.patch;
    let Mask { mask, .. } = mask::apply(&cfg.mask, grid * grid, &mut stage_rng(seed, r.epoch, &r.key, MASK))?;
    r.mask = mask;
    Ok(r)
}

/// smooth: the Gaussian-smoothed target x̂ of the normalized view.
pub fn smooth(cfg: &StagesConfig, mut r: Record) -> Result<Record, StageError> {
    let size = cfg.augment.size;
    r.smooth = smooth::apply(&cfg.smooth, &r.image, 3, size, size)?;
    Ok(r)
}

/// targets: per-patch F(x) of the view, in the config's order.
pub fn targets(cfg: &StagesConfig, mut r: Record) -> Result<Record, StageError> {
    let pixels: Rgb8 = std::mem::take(&mut r.pixels).into();
    r.targets = cfg
        .targets
        .kinds
        .iter()
        .map(|&kind| {
            targets::compute(kind, &cfg.targets, &pixels, &r.image, cfg.patch)
                .map(|Target { dims, values, .. }| (dims, values))
        })
        .collect::<Result<_, _>>()?;
    r.pixels = pixels.into();
    Ok(r)
}
