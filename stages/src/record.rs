//! The one composition of the data stages: a record, filled in stage by stage,
//! and the list of stage functions every command runs on it.
//!
//! ```text
//! decode -> augment -> mask -> smooth -> targets
//! ```
//!
//! `pipeline run`'s graph applies [`Stages::apply`] stage by stage on the workers
//! of each stage's role; `stages dump`, `viz`, `bench data`'s chain figure and
//! [`crate::chain::process`] apply [`Stages::run`], the same functions in the same
//! order, on one record. So what they show and time is what training gets: the
//! view stays u8 through every stage (DESIGN.md "Keep image data as u8"), x̂ is
//! the blur of the u8 view, and a run with a target cache feeds its cached view
//! and reads the cached targets. Each stage takes a record and returns it with
//! its output filled in, or a stage error; none knows of timely or files.
//!
//! The record is serde, so it can cross processes when two stages sit on
//! different machines.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shards::rng::stage_rng;

use crate::chain::{StagesConfig, MASK_STREAM};
use crate::sample::{Grey8, Image8, Mask, Rgb8, StageError, Target, View};
use crate::{augment, decode, mask, smooth, targets, views};

/// The stages of the graph, in their order: the five record stages, then the
/// sink, which assembles a batch from the records (no record function).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Decode,
    Augment,
    Mask,
    Smooth,
    Targets,
    Sink,
}

impl Stage {
    /// Every stage, in graph order.
    pub const ALL: [Stage; 6] = [
        Stage::Decode,
        Stage::Augment,
        Stage::Mask,
        Stage::Smooth,
        Stage::Targets,
        Stage::Sink,
    ];

    /// The stages that run a function on each record ([`Stages::apply`]), in order.
    pub const RECORD: [Stage; 5] = [
        Stage::Decode,
        Stage::Augment,
        Stage::Mask,
        Stage::Smooth,
        Stage::Targets,
    ];

    /// The name in logs, metrics.jsonl and the config (`placement.decode`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Augment => "augment",
            Stage::Mask => "mask",
            Stage::Smooth => "smooth",
            Stage::Targets => "targets",
            Stage::Sink => "sink",
        }
    }

    /// The position in [`Stage::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The stage before this one (`None` for decode, which the lanes feed).
    pub fn previous(self) -> Option<Stage> {
        self.index().checked_sub(1).map(|i| Stage::ALL[i])
    }
}

/// 8-bit pixels (H x W x 3, or H x W in a one-channel run), the wire form of
/// [`Rgb8`] / [`Grey8`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    /// As bytes on the wire (one copy), not a sequence of u8 (a call per byte):
    /// see [`Record`].
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Where these pixels start in the source image: decode reads only the
    /// region the view's crop needs (0, 0 for a whole image or a view).
    pub left: usize,
    pub top: usize,
}

impl<const C: usize> From<Image8<C>> for Image {
    fn from(img: Image8<C>) -> Image {
        Image {
            width: img.width,
            height: img.height,
            data: img.data,
            left: 0,
            top: 0,
        }
    }
}

impl Image {
    /// Channels per pixel: 3 (RGB), or 1 in a one-channel run (`stages.channels:
    /// 1`), whose decode gives one luma channel.
    pub fn channels(&self) -> usize {
        if self.data.len() == self.width * self.height && self.width * self.height > 0 {
            1
        } else {
            3
        }
    }
}

impl From<Image> for Rgb8 {
    /// A one-channel view becomes three equal channels (lossless: its luma is itself).
    fn from(img: Image) -> Rgb8 {
        let data = if img.channels() == 1 {
            img.data.iter().flat_map(|&v| [v; 3]).collect()
        } else {
            img.data
        };
        Rgb8 {
            width: img.width,
            height: img.height,
            data,
        }
    }
}

/// One sample on its way to the trainer.
///
/// Its byte vectors cross processes as bytes (`serde_bytes`): serde's default,
/// a sequence of u8, had timely's bincode encode and decode a 224 px record
/// (387 kB) one byte at a time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    pub raw: BTreeMap<String, serde_bytes::ByteBuf>,
    /// Decoded pixels (RGB), then (after augment) the u8 view: RGB, or its luma
    /// alone in a one-channel run.
    pub pixels: Image,
    /// How the view was cut (after decode, which draws it).
    pub view: View,
    /// The masking (after mask); the trainer reads `mask.mask` (per patch, 1 = removed).
    pub mask: Mask,
    /// Smoothed target x̂ as u8 pixels, H x W x C (the view's channels), normalized on the training device (after smooth).
    #[serde(with = "serde_bytes")]
    pub smooth: Vec<u8>,
    /// Per-patch targets in config order, each patches x dims (after targets).
    #[serde(with = "targets_as_bytes")]
    pub targets: Vec<(usize, Vec<f32>)>,
    /// [`digest`] of this record, set after the last stage on the worker that
    /// ran it, so that the batch digest costs the one sink 16 bytes per record.
    pub digest: Option<[u8; 16]>,
}

impl Record {
    /// A record of `sample` in `epoch`, before any stage (batch, lane and position 0).
    pub fn of_sample(sample: &shards::Sample, epoch: u64) -> Record {
        Record {
            epoch,
            key: sample.key.clone(),
            class: sample.class_index(),
            raw: raw_members(sample.files.clone()),
            ..Record::default()
        }
    }
}

/// The targets on the wire: each one's floats as their little-endian bytes, in
/// one piece, rather than serde's sequence of f32 (a call per float: 21,168 for
/// HOG at 224 px). `serde_bytes` covers `Vec<u8>` only.
mod targets_as_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(targets: &[(usize, Vec<f32>)], s: S) -> Result<S::Ok, S::Error> {
        let le: Vec<(usize, std::borrow::Cow<[u8]>)> = targets
            .iter()
            .map(|(dims, values)| {
                let bytes = if cfg!(target_endian = "little") {
                    std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
                } else {
                    std::borrow::Cow::Owned(values.iter().flat_map(|x| x.to_le_bytes()).collect())
                };
                (*dims, bytes)
            })
            .collect();
        s.collect_seq(le.iter().map(|(dims, bytes)| (*dims, Bytes::new(bytes))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(usize, Vec<f32>)>, D::Error> {
        let wire: Vec<(usize, ByteBuf)> = Vec::deserialize(d)?;
        wire.into_iter()
            .map(|(dims, bytes)| {
                if bytes.len() % 4 != 0 {
                    return Err(serde::de::Error::custom(format!(
                        "a target of {} bytes is not whole f32s",
                        bytes.len()
                    )));
                }
                let values = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Ok((dims, values))
            })
            .collect()
    }
}

/// A sample's members as a record holds them.
pub fn raw_members(files: BTreeMap<String, Vec<u8>>) -> BTreeMap<String, serde_bytes::ByteBuf> {
    files
        .into_iter()
        .map(|(k, v)| (k, serde_bytes::ByteBuf::from(v)))
        .collect()
}

/// Where a run with a target cache reads the targets of a record's view.
pub trait TargetReader: Send + Sync {
    /// The targets of view `pick(seed, epoch, key, K)` of the record's sample
    /// (the view its decode stage cut), from every store, in config order.
    fn read(&self, seed: u64, r: &Record) -> Result<Vec<(usize, Vec<f32>)>, StageError>;
}

/// The data stages of one run: its `stages:` config, its seed and, with a target
/// cache, where the targets stage reads from.
#[derive(Clone)]
pub struct Stages {
    cfg: Arc<StagesConfig>,
    seed: u64,
    cache: Option<Arc<dyn TargetReader>>,
}

impl Stages {
    /// The stages of a run with seed `seed`, after checking the config.
    pub fn new(cfg: StagesConfig, seed: u64) -> Result<Stages, StageError> {
        cfg.validate()?;
        Ok(Stages {
            cfg: Arc::new(cfg),
            seed,
            cache: None,
        })
    }

    /// The same stages with the targets stage reading from `cache`.
    pub fn with_cache(mut self, cache: Arc<dyn TargetReader>) -> Stages {
        self.cache = Some(cache);
        self
    }

    pub fn config(&self) -> &StagesConfig {
        &self.cfg
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Whether the targets stage reads a target cache (else it computes).
    pub fn reads_cache(&self) -> bool {
        self.cache.is_some()
    }

    /// One record stage on `r` (the sink is not one: it returns `r` unchanged).
    pub fn apply(&self, stage: Stage, r: Record) -> Result<Record, StageError> {
        match stage {
            Stage::Decode => decode_stage(&self.cfg, self.seed, r),
            Stage::Augment => augment_stage(&self.cfg, r),
            Stage::Mask => mask_stage(&self.cfg, self.seed, r),
            Stage::Smooth => smooth_stage(&self.cfg, r),
            Stage::Targets => {
                let mut r = match &self.cache {
                    Some(cache) => {
                        let targets = cache.read(self.seed, &r)?;
                        Record { targets, ..r }
                    }
                    None => targets_stage(&self.cfg, r)?,
                };
                // The last stage seals the record, on the worker that ran it.
                r.digest = Some(digest(&r));
                Ok(r)
            }
            Stage::Sink => Ok(r),
        }
    }

    /// Every record stage on `r`, in order; the error names the stage that failed.
    pub fn run(&self, mut r: Record) -> Result<Record, (Stage, StageError)> {
        for stage in Stage::RECORD {
            r = self.apply(stage, r).map_err(|e| (stage, e))?;
        }
        Ok(r)
    }
}

/// decode: the pixels of the shard's image that the view needs. The view
/// (crop box, flip) is drawn here, from the augment stage's rng stream, out of
/// the header's size: it decides which rows and columns to decode. A run
/// reading the target cache cuts one of the K cached views instead.
fn decode_stage(cfg: &StagesConfig, seed: u64, mut r: Record) -> Result<Record, StageError> {
    let raw = std::mem::take(&mut r.raw);
    let bytes = ["jpg", "jpeg", "png"]
        .iter()
        .find_map(|ext| raw.get(*ext))
        .map(|b| b.as_slice())
        .ok_or(StageError::NoImage)?;
    let (width, height) = decode::image_size(bytes)?;
    let (view, _) = views::run_view(cfg, seed, r.epoch, &r.key, width, height)?;
    // A one-channel run decodes to one luma channel (a colour JPEG's chroma is
    // never decoded); the record's pixels are then one byte per pixel.
    r.pixels = if cfg.channels == 1 {
        let region = decode::decode_region_grey(&cfg.decode, bytes, view.crop)?;
        Image {
            left: region.left,
            top: region.top,
            ..region.pixels.into()
        }
    } else {
        let region = decode::decode_region(&cfg.decode, bytes, view.crop)?;
        Image {
            left: region.left,
            top: region.top,
            ..region.pixels.into()
        }
    };
    r.view = view;
    Ok(r)
}

/// augment: resize and flip the view out of the decoded region. The view stays
/// u8: the training device normalizes it, and `targets` normalizes it for the
/// pixel target only.
///
/// A one-channel run (`stages.channels: 1`) crops its one luma channel: x̂, the
/// targets, the wire and the sink then handle a third of the bytes.
fn augment_stage(cfg: &StagesConfig, mut r: Record) -> Result<Record, StageError> {
    let one_channel = r.pixels.channels() == 1;
    let Image {
        width,
        height,
        data,
        left,
        top,
    } = std::mem::take(&mut r.pixels);
    let (source_width, source_height) = (r.view.source_width, r.view.source_height);
    r.pixels = if one_channel {
        let region = decode::Region {
            pixels: Grey8 { width, height, data },
            left,
            top,
            source_width,
            source_height,
        };
        augment::apply_region(&region, &r.view)?.into()
    } else {
        let region = decode::Region {
            pixels: Rgb8 { width, height, data },
            left,
            top,
            source_width,
            source_height,
        };
        let pixels = augment::apply_region(&region, &r.view)?;
        // An RGB region in a one-channel run (not what decode gives it): its luma.
        if cfg.channels == 1 {
            pixels.luma().into()
        } else {
            pixels.into()
        }
    };
    Ok(r)
}

/// mask: MAE random masking of the patches.
fn mask_stage(cfg: &StagesConfig, seed: u64, mut r: Record) -> Result<Record, StageError> {
    let grid = cfg.augment.size / cfg.patch;
    r.mask = mask::apply(
        &cfg.mask,
        grid * grid,
        &mut stage_rng(seed, r.epoch, &r.key, MASK_STREAM),
    )?;
    Ok(r)
}

/// smooth: the Gaussian-smoothed target x̂ of the u8 view, rounded to u8 (the
/// trainer normalizes it on its device; see `smooth::apply_u8` for the rounding).
fn smooth_stage(cfg: &StagesConfig, mut r: Record) -> Result<Record, StageError> {
    let p = &r.pixels;
    r.smooth = smooth::apply_u8_channels(&cfg.smooth, &p.data, p.channels(), p.height, p.width)?;
    Ok(r)
}

/// targets: per-patch F(x) of the view, in the config's order.
fn targets_stage(cfg: &StagesConfig, mut r: Record) -> Result<Record, StageError> {
    // An RGB view is lent to the extractors and taken back; a one-channel view is
    // lent as three equal channels (its luma), and the record keeps its one.
    let one_channel = r.pixels.channels() == 1;
    let targets = if one_channel {
        grey_targets(cfg, &cfg.targets.kinds, &r.pixels.clone().into())?
    } else {
        let pixels: Rgb8 = std::mem::take(&mut r.pixels).into();
        let targets = view_targets(cfg, &cfg.targets.kinds, &pixels)?;
        r.pixels = pixels.into();
        targets
    };
    r.targets = targets
        .into_iter()
        .map(|Target { dims, values, .. }| (dims, values))
        .collect();
    Ok(r)
}

/// The targets of `kinds` for a u8 view, as the model sees it (`stages.channels`):
/// the targets stage's function, and the target cache's for every kind but CLIP.
pub fn view_targets(cfg: &StagesConfig, kinds: &[targets::Kind], pixels: &Rgb8) -> Result<Vec<Target>, StageError> {
    let pixel = kinds.contains(&targets::Kind::Pixel);
    if cfg.channels == 1 {
        // A one-channel model: the targets of the luma view.
        return grey_targets(cfg, kinds, &pixels.grey());
    }
    // MAE's norm-pix target works on the normalized view; HOG and Canny on
    // the u8 pixels (a 600 kB float copy per record otherwise).
    let image = if pixel {
        augment::normalize(pixels, cfg.augment.mean, cfg.augment.std)
    } else {
        Vec::new()
    };
    kinds
        .iter()
        .map(|&kind| targets::compute(kind, &cfg.targets, pixels, &image, cfg.patch))
        .collect()
}

/// The targets of a one-channel model's view, given as three equal channels (its
/// luma): [`view_targets`]'s for `channels: 1`, and the targets stage's for the
/// one-plane records the augment stage leaves.
pub fn grey_targets(cfg: &StagesConfig, kinds: &[targets::Kind], grey: &Rgb8) -> Result<Vec<Target>, StageError> {
    let image = if kinds.contains(&targets::Kind::Pixel) {
        crate::chain::normalize_channels(grey, &cfg.augment, 1)
    } else {
        Vec::new()
    };
    kinds
        .iter()
        .map(|&kind| targets::compute_grey(kind, &cfg.targets, grey, &image, cfg.patch))
        .collect()
}

/// xxh3-128 of what a record gives the trainer: key, view, u8 pixels, x̂,
/// mask and targets (floats as little-endian bytes). For the batch digest, a
/// determinism check, not a security boundary: xxh3 hashes about ten times as
/// fast as BLAKE3, which had cost the sink a sixth of the graph's time.
/// twox-hash's xxh3 picks AVX2 at run time (xxhash-rust's only when the
/// build targets it, which ours does not); the same hash either way (tested).
pub fn digest(r: &Record) -> [u8; 16] {
    let mut h = twox_hash::XxHash3_128::new();
    h.write(&(r.key.len() as u64).to_le_bytes());
    h.write(r.key.as_bytes());
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
        h.write(&(n as u64).to_le_bytes());
    }
    h.write(&[u8::from(v.flip)]);
    h.write(&r.pixels.data);
    h.write(&r.smooth);
    h.write(&r.mask.mask);
    for (dims, values) in &r.targets {
        h.write(&(*dims as u64).to_le_bytes());
        if cfg!(target_endian = "little") {
            // Their memory is their little-endian bytes: hashed in place.
            h.write(bytemuck::cast_slice(values));
        } else {
            for x in values {
                h.write(&x.to_le_bytes());
            }
        }
    }
    h.finish_128().to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record digest's xxh3-128 is xxhash-rust's (an independent
    /// implementation), for inputs in pieces of 0 to 1 MB (the short and
    /// long paths, stripes and blocks across piece boundaries).
    #[test]
    fn the_digest_hash_is_xxh3_128() {
        let data: Vec<u8> = (0..1_100_000usize).map(|i| (i * 2654435761 >> 13) as u8).collect();
        for pieces in [
            vec![0usize],
            vec![1],
            vec![16, 1],
            vec![129, 240, 17],
            vec![1024, 150_528, 150_528, 84_672],
            vec![1_000_000],
        ] {
            let (mut ours, mut theirs) = (twox_hash::XxHash3_128::new(), xxhash_rust::xxh3::Xxh3::new());
            let mut at = 0;
            for n in &pieces {
                ours.write(&data[at..at + n]);
                theirs.update(&data[at..at + n]);
                at += n;
            }
            assert_eq!(ours.finish_128(), theirs.digest128(), "pieces {pieces:?}");
        }
    }

    /// A record crosses processes as timely sends it (bincode) and comes back
    /// bit for bit: bytes, targets (their floats' bits, -0.0 and subnormals
    /// included) and the rest; a target whose bytes are not whole f32s is an error.
    #[test]
    fn a_record_round_trips_through_bincode_bit_for_bit() {
        let floats: Vec<f32> = vec![1.5, -0.0, f32::MIN_POSITIVE / 4.0, -3.25e7, 0.1];
        let r = Record {
            batch: 7,
            epoch: 2,
            lane: 3,
            position: 11,
            shard: "s-000001.tar".into(),
            key: "k".into(),
            class: Some(4),
            raw: raw_members(BTreeMap::from([("png".to_string(), vec![0u8, 255, 7])])),
            pixels: Image {
                width: 2,
                height: 1,
                data: vec![1, 2, 3, 4, 5, 6],
                left: 5,
                top: 6,
            },
            smooth: vec![9; 6],
            targets: vec![(5, floats.clone()), (0, vec![])],
            mask: Mask {
                mask: vec![1, 0],
                ids_keep: vec![1],
                ids_restore: vec![1, 0],
            },
            digest: Some([3; 16]),
            ..Record::default()
        };
        let wire = bincode::serialize(&r).unwrap();
        let back: Record = bincode::deserialize(&wire).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.targets[0].1), bits(&floats));
        assert_eq!(back, r);
        let mut bad = r.clone();
        bad.targets = vec![];
        let mut wire = bincode::serialize(&bad).unwrap();
        // Splice in a target of 3 bytes where the empty list was.
        let empty = bincode::serialize(&Vec::<(usize, serde_bytes::ByteBuf)>::new()).unwrap();
        let three = bincode::serialize(&vec![(1usize, serde_bytes::ByteBuf::from(vec![1u8, 2, 3]))]).unwrap();
        let at = wire.windows(empty.len()).rposition(|w| w == empty.as_slice()).unwrap();
        wire.splice(at..at + empty.len(), three);
        assert!(bincode::deserialize::<Record>(&wire).is_err());
    }
}
