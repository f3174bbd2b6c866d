//! What flows through the dataflow: one sample of one batch, filled in stage by stage.
//!
//! Each stage function here takes a record, calls the `stages` crate's pure
//! function for that stage with the rng of `(seed, epoch, key, stage)`, and
//! returns the record with its output filled in. The record is serde so it can
//! cross processes when two stages sit on different machines.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shards::rng::stage_rng;
use stages::chain::MASK_STREAM;
use stages::sample::{Mask, Rgb8, StageError, Target, View};
use stages::{augment, decode, mask, smooth, targets, StagesConfig};
use xxhash_rust::xxh3::Xxh3;

/// 8-bit RGB pixels (H x W x 3), the wire form of `stages::sample::Rgb8`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
    /// Where these pixels start in the source image: decode reads only the
    /// region the view's crop needs (0, 0 for a whole image or a view).
    pub left: usize,
    pub top: usize,
}

impl From<Rgb8> for Image {
    fn from(img: Rgb8) -> Image {
        Image {
            width: img.width,
            height: img.height,
            data: img.data,
            left: 0,
            top: 0,
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
    /// Per patch, 1 = removed (after mask).
    pub mask: Vec<u8>,
    /// Smoothed target x̂ as u8 pixels, H x W x 3, normalized on the training device (after smooth).
    pub smooth: Vec<u8>,
    /// Per-patch targets in config order, each patches x dims (after targets).
    pub targets: Vec<(usize, Vec<f32>)>,
    /// [`digest`] of this record, set after the last stage on the worker that
    /// ran it, so that the batch digest costs the one sink 16 bytes per record.
    pub digest: Option<[u8; 16]>,
}

/// decode: the pixels of the shard's image that the view needs. The view
/// (crop box, flip) is drawn here, from the augment stage's rng stream, out of
/// the header's size: it decides which rows and columns to decode.
pub fn decode(cfg: &StagesConfig, seed: u64, mut r: Record) -> Result<Record, StageError> {
    let raw = std::mem::take(&mut r.raw);
    let bytes = ["jpg", "jpeg", "png"]
        .iter()
        .find_map(|ext| raw.get(*ext))
        .ok_or(StageError::NoImage)?;
    let (width, height) = decode::image_size(bytes)?;
    // A run reading the target cache feeds one of the K cached views instead.
    let (view, _) = stages::views::run_view(cfg, seed, r.epoch, &r.key, width, height)?;
    let region = decode::decode_region(&cfg.decode, bytes, view.crop)?;
    r.view = view;
    r.pixels = Image {
        left: region.left,
        top: region.top,
        ..region.pixels.into()
    };
    Ok(r)
}

/// augment: resize and flip the view out of the decoded region. The view
/// stays u8 through the graph (DESIGN.md "Keep image data as u8"): the
/// training device normalizes it, and `targets` normalizes it for the pixel
/// target only.
pub fn augment(mut r: Record) -> Result<Record, StageError> {
    let Image { left, top, .. } = r.pixels;
    let region = decode::Region {
        pixels: std::mem::take(&mut r.pixels).into(),
        left,
        top,
        source_width: r.view.source_width,
        source_height: r.view.source_height,
    };
    let pixels = augment::apply_region(&region, &r.view)?;
    r.pixels = pixels.into();
    Ok(r)
}

/// mask: MAE random masking of the patches.
pub fn mask(cfg: &StagesConfig, seed: u64, mut r: Record) -> Result<Record, StageError> {
    let grid = cfg.augment.size / cfg.patch;
    let Mask { mask, .. } = mask::apply(
        &cfg.mask,
        grid * grid,
        &mut stage_rng(seed, r.epoch, &r.key, MASK_STREAM),
    )?;
    r.mask = mask;
    Ok(r)
}

/// smooth: the Gaussian-smoothed target x̂ of the u8 view, rounded to u8 (the
/// trainer normalizes it on its device; see `smooth::apply_u8` for the rounding).
pub fn smooth(cfg: &StagesConfig, mut r: Record) -> Result<Record, StageError> {
    let view = Rgb8 {
        width: r.pixels.width,
        height: r.pixels.height,
        data: std::mem::take(&mut r.pixels.data),
    };
    let smoothed = smooth::apply_u8(&cfg.smooth, &view);
    r.pixels.data = view.data;
    r.smooth = smoothed?;
    Ok(r)
}

/// targets: per-patch F(x) of the view, in the config's order.
pub fn targets(cfg: &StagesConfig, mut r: Record) -> Result<Record, StageError> {
    let pixels: Rgb8 = std::mem::take(&mut r.pixels).into();
    // MAE's norm-pix target works on the normalized view; HOG and Canny on
    // the u8 pixels (a 600 kB float copy per record otherwise).
    let image = if cfg.targets.kinds.contains(&targets::Kind::Pixel) {
        augment::normalize(&pixels, cfg.augment.mean, cfg.augment.std)
    } else {
        Vec::new()
    };
    r.targets = cfg
        .targets
        .kinds
        .iter()
        .map(|&kind| {
            targets::compute(kind, &cfg.targets, &pixels, &image, cfg.patch)
                .map(|Target { dims, values, .. }| (dims, values))
        })
        .collect::<Result<_, _>>()?;
    r.pixels = pixels.into();
    Ok(r)
}

/// xxh3-128 of what a record gives the trainer: key, view, u8 pixels, x̂,
/// mask and targets (floats as little-endian bytes). For the batch digest, a
/// determinism check, not a security boundary: xxh3 hashes about ten times as
/// fast as BLAKE3, which had cost the sink a sixth of the graph's time.
pub fn digest(r: &Record) -> [u8; 16] {
    let mut h = Xxh3::new();
    h.update(&(r.key.len() as u64).to_le_bytes());
    h.update(r.key.as_bytes());
    let v = &r.view;
    let c = &v.crop;
    for n in [
        v.source_width,
        v.source_height,
        c.top,
        c.left,
        c.height,
        c.width,
        v.size,
    ] {
        h.update(&(n as u64).to_le_bytes());
    }
    h.update(&[u8::from(v.flip)]);
    h.update(&r.pixels.data);
    h.update(&r.smooth);
    h.update(&r.mask);
    for (dims, values) in &r.targets {
        h.update(&(*dims as u64).to_le_bytes());
        if cfg!(target_endian = "little") {
            // Their memory is their little-endian bytes: hashed in place.
            h.update(bytemuck::cast_slice(values));
        } else {
            for x in values {
                h.update(&x.to_le_bytes());
            }
        }
    }
    h.digest128().to_le_bytes()
}

/// The record with its [`digest`] set (the graph's last step before the sink).
pub fn seal(mut r: Record) -> Record {
    r.digest = Some(digest(&r));
    r
}
