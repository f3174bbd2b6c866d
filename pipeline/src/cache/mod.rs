//! The target cache from a config's side: the store spec of each extractor,
//! what the training shards want from the stores, and the targets stage of a
//! run that reads them (DESIGN.md, "Target cache").
//!
//! A run with `stages.targets.cache: DIR` looks up the store of each of its
//! target kinds under DIR by the hash of its spec; a store that is missing or
//! lacks some wanted view is an error naming it (or, with `on_miss: compute`,
//! the missing views are computed into it first), never a silent mismatch.
//! Its decode stage then feeds view `v = pick(run seed, epoch, key, K)`
//! ([`stages::views::run_view`]) and its targets stage reads view v's targets
//! from the stores instead of calling an extractor.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context};
use serde_json::json;
use shards::store::{Store, StoreIndex, StoreReader, StoreSpec, FORMAT};
use shards::Skips;
use stages::sample::StageError;
use stages::targets::{clip, hog, Kind, OnMiss};
use stages::StagesConfig;

pub mod fill;
pub mod index;

use crate::config::RunConfig;
use crate::metrics::Counters;
use index::Entry;
use stages::record::Record;

/// The store spec of one target kind of a config. `weights_blake3` is the
/// CLIP weights file's hash (see [`weights_blake3`]).
pub fn store_spec(stages: &StagesConfig, kind: Kind, weights_blake3: Option<String>) -> StoreSpec {
    let a = &stages.augment;
    let t = &stages.targets;
    let (params, mean, std) = match kind {
        Kind::Pixel => (json!({"norm_pix": true, "eps": 1e-6}), a.mean, a.std),
        // HOG and Canny read the u8 view: the normalization is recorded, but it does not change them.
        Kind::Hog => (json!({"bins": hog::BINS, "cells_per_patch": 4}), a.mean, a.std),
        Kind::Canny => (
            serde_json::to_value(&t.canny).expect("canny config serializes"),
            a.mean,
            a.std,
        ),
        Kind::Clip => {
            let mut params = serde_json::to_value(&t.clip).expect("clip config serializes");
            // The weights' path is not what matters, their hash is.
            if let Some(map) = params.as_object_mut() {
                map.remove("weights");
            }
            (params, clip::CLIP_MEAN, clip::CLIP_STD)
        }
    };
    let mut view =
        json!({"scale": a.scale, "ratio": a.ratio, "flip_p": a.flip_p, "resize": "bicubic (PIL, antialiased)"});
    // A one-channel run's views are other pixels (a grey decode, cropped in one
    // channel): its stores are its own. Only then, so RGB stores keep their hash.
    if stages.channels == 1 {
        view["channels"] = json!("1: libjpeg grayscale, else the luma of the RGB decode; cropped in one channel");
    }
    StoreSpec {
        format: FORMAT,
        extractor: kind.name().to_string(),
        params,
        weights_blake3,
        view_seed: t.view_seed,
        view,
        image_size: a.size,
        patch: stages.patch,
        tokens: (a.size / stages.patch.max(1)).pow(2),
        dims: stages.target_dims(kind),
        mean,
        std,
        dtype: t.dtype,
    }
}

/// BLAKE3 of the CLIP weights when the config has clip targets.
pub fn weights_blake3(stages: &StagesConfig) -> anyhow::Result<Option<String>> {
    if !stages.targets.kinds.contains(&Kind::Clip) {
        return Ok(None);
    }
    let clip = stages
        .targets
        .clip
        .as_ref()
        .context("stages.targets.clip: not set, but kinds has clip")?;
    Ok(Some(
        clip::weights_hash(&clip.weights).context("stages.targets.clip.weights")?,
    ))
}

/// The spec of every target kind of the config, in config order.
pub fn store_specs(stages: &StagesConfig) -> anyhow::Result<Vec<StoreSpec>> {
    let weights = weights_blake3(stages)?;
    Ok(stages
        .targets
        .kinds
        .iter()
        .map(|&kind| store_spec(stages, kind, if kind == Kind::Clip { weights.clone() } else { None }))
        .collect())
}

/// The cache root of a config.
pub fn cache_root(cfg: &RunConfig) -> anyhow::Result<&Path> {
    cfg.stages
        .targets
        .cache
        .as_deref()
        .context("stages.targets.cache: not set (the target cache's root directory)")
}

/// Every (store, key, view) the shards want for `k` views per sample.
pub fn wanted(keys: &[(PathBuf, Vec<String>)], stores: usize, k: u32) -> Vec<Entry> {
    let mut out = Vec::new();
    for (_, shard_keys) in keys {
        for key in shard_keys {
            for store in 0..stores as u32 {
                for v in 0..k {
                    out.push((store, key.clone(), v));
                }
            }
        }
    }
    out
}

/// The stored entries of the stores' indexes.
pub fn present(indexes: &[StoreIndex]) -> Vec<Entry> {
    indexes
        .iter()
        .enumerate()
        .flat_map(|(i, index)| index.views().map(move |(key, v)| (i as u32, key.clone(), *v)))
        .collect()
}

/// The stores a run reads, for its targets stage.
pub struct CachedTargets {
    readers: Vec<StoreReader>,
    dims: Vec<usize>,
    views: u32,
}

/// Memory for decoded store shards, per store and process: a lane's data
/// shards map to a few store shards, and each lane holds about two at once.
const CACHE_BYTES: u64 = 1 << 30;

/// How many shards of `index` fit in [`CACHE_BYTES`] (at least two).
fn cached_shards(spec: &StoreSpec, index: &StoreIndex) -> usize {
    let views = index.views().count().max(1) as u64;
    let per_shard = views / index.shards.len().max(1) as u64 * spec.dtype.encoded_len(spec.tokens, spec.dims) as u64;
    (CACHE_BYTES / per_shard.max(1)).max(2) as usize
}

impl stages::record::TargetReader for CachedTargets {
    /// The targets of the view the record holds (view `pick(seed, epoch, key, K)`,
    /// the one its decode stage cut), from every store, in config order.
    fn read(&self, seed: u64, r: &Record) -> Result<Vec<(usize, Vec<f32>)>, StageError> {
        let v = stages::views::pick(seed, r.epoch, &r.key, self.views);
        self.readers
            .iter()
            .zip(&self.dims)
            .map(|(reader, &dims)| {
                let values = reader.get(&r.key, v).map_err(|e| StageError::Cache(e.to_string()))?;
                Ok((dims, values))
            })
            .collect()
    }
}

/// Open the stores a run with a cache reads, checking they hold every view
/// its shards want. Under `on_miss: compute` the missing views are computed
/// first (their count is added to the extractor calls). `None` for a run
/// without a cache.
pub fn prepare_run(
    cfg: &RunConfig,
    workers: usize,
    counters: &Counters,
    keys: Option<&crate::plan::ShardKeys>,
) -> anyhow::Result<Option<Arc<CachedTargets>>> {
    if !stages::views::cached(&cfg.stages) {
        return Ok(None);
    }
    let root = cache_root(cfg)?;
    let specs = store_specs(&cfg.stages)?;
    let k = cfg.stages.targets.views;
    let read;
    let keys = match keys {
        Some(keys) => keys,
        None => {
            read = crate::plan::shard_keys(
                &cfg.train_shards()?,
                cfg.data.on_error,
                &Skips::quiet(),
                cfg.data.key_cache().as_ref(),
            )?;
            &read
        }
    };
    let wanted = wanted(keys, specs.len(), k);
    let mut computed_here = false;
    loop {
        let mut stores = Vec::new();
        let mut indexes = Vec::new();
        let mut absent = Vec::new();
        for spec in &specs {
            match Store::find(root, spec)? {
                Some(store) => {
                    indexes.push(store.load_index(false)?);
                    stores.push(Some(store));
                }
                None => {
                    absent.push(root.join(spec.dir_name()));
                    indexes.push(StoreIndex::default());
                    stores.push(None);
                }
            }
        }
        let missing = index::missing(wanted.clone(), present(&indexes));
        if missing.is_empty() {
            let stores: Vec<Store> = stores.into_iter().flatten().collect();
            tracing::info!(
                "target cache: {} store(s) under {} hold all {} wanted views",
                stores.len(),
                root.display(),
                wanted.len()
            );
            let readers = stores
                .iter()
                .zip(&indexes)
                .map(|(s, i)| s.reader(i, cached_shards(&s.spec, i)))
                .collect();
            let dims = specs.iter().map(|s| s.dims).collect();
            return Ok(Some(Arc::new(CachedTargets {
                readers,
                dims,
                views: k,
            })));
        }
        if cfg.stages.targets.on_miss == OnMiss::Error || computed_here {
            let (store, key, v) = &missing[0];
            let dir = root.join(specs[*store as usize].dir_name());
            let what = if absent.is_empty() {
                format!(
                    "the store lacks {} of {} wanted views (first: {key} view {v} in {})",
                    missing.len(),
                    wanted.len(),
                    dir.display()
                )
            } else {
                format!(
                    "no store matches this targets config: looked for {}",
                    absent
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            bail!(
                "stages.targets.cache {}: {what}; run `pipeline precompute CONFIG` with the same stages section \
                 (or set stages.targets.on_miss: compute)",
                root.display()
            );
        }
        tracing::info!(
            "target cache: {} views missing, computing them (on_miss: compute)",
            missing.len()
        );
        let report = crate::cache::fill::fill(cfg, &crate::cache::fill::FillOptions::local(workers))?;
        counters.extractor_calls.fetch_add(report.computed, Ordering::Relaxed);
        computed_here = true;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use shards::{OnError, ShardReader};
    use stages::record::Stage;
    use stages::sample::Rgb8;

    /// configs/targets-hog.yaml on the first embedded shard, the cache under `cache`, plus `sets`.
    pub(crate) fn embedded_config(cache: &Path, sets: &[&str]) -> RunConfig {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let text = std::fs::read_to_string(base.join("targets-hog.yaml")).unwrap();
        let mut all = vec![
            "data.train=['../shards/data/fashion-mnist/train-000000.tar.zst']".to_string(),
            "data.lanes=1".to_string(),
            format!("stages.targets.cache={}", cache.display()),
        ];
        all.extend(sets.iter().map(|s| s.to_string()));
        crate::config::parse(&text, &all, &base).unwrap()
    }

    #[test]
    fn a_cached_run_feeds_view_pick_and_reads_the_targets_of_that_view() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = embedded_config(tmp.path(), &["stages.targets.views=3", "stages.targets.view_seed=5"]);
        check_cached_run(&cfg, 1250);
    }

    /// The same on JPEG photos, where the run decodes only each view's crop
    /// (`decode_region`) and precompute the whole image once.
    #[test]
    fn on_jpeg_photos_too_the_cached_target_is_that_of_the_fed_view() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = std::env::var_os("CROSSMAE_SHARED")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
        let shard = format!("data.train=['{}']", shared.join("data/photos-000000.tar").display());
        let cfg = embedded_config(
            tmp.path(),
            &["stages.targets.views=3", "stages.targets.view_seed=5", &shard],
        );
        check_cached_run(&cfg, 256);
    }

    /// Fill the store for `cfg` (`samples` samples), then run the first few
    /// samples through the run's stage functions for three epochs.
    fn check_cached_run(cfg: &RunConfig, samples: u64) {
        let counters = Counters::default();
        let err = prepare_run(cfg, 1, &counters, None).err().expect("no store yet");
        assert!(format!("{err:#}").contains("no store matches"), "{err:#}");
        let report = crate::cache::fill::fill(cfg, &crate::cache::fill::FillOptions::local(1)).unwrap();
        assert_eq!(report.computed, 3 * samples);
        let cache = prepare_run(cfg, 1, &counters, None).unwrap().expect("a cached run");
        let run_stages = stages::record::Stages::new(cfg.stages.clone(), cfg.seed)
            .unwrap()
            .with_cache(cache);
        let shard = &cfg.train_shards().unwrap()[0];
        let mut views_seen = std::collections::BTreeSet::new();
        for (i, sample) in ShardReader::open(shard, OnError::Fail, &Skips::default())
            .unwrap()
            .take(8)
            .enumerate()
        {
            let sample = sample.unwrap();
            for epoch in 0..3 {
                // The run's own stage functions, as the graph chains them.
                let mut r = Record::of_sample(&sample, epoch);
                for stage in [Stage::Decode, Stage::Augment] {
                    r = run_stages.apply(stage, r).unwrap();
                }
                let v = stages::views::pick(cfg.seed, epoch, &sample.key, 3);
                views_seen.insert((i, v));
                let (w, h) = (r.view.source_width, r.view.source_height);
                let want = stages::views::sample_view(&cfg.stages.augment, w, h, 5, &sample.key, v).unwrap();
                assert_eq!(r.view, want, "{}: epoch {epoch} should feed view {v}", sample.key);
                let pixels: Rgb8 = r.pixels.clone().into();
                let r = run_stages.apply(Stage::Targets, r).unwrap();
                // The cached target is HOG of exactly the pixels the backbone is fed.
                let fresh = stages::targets::hog::hog(&pixels, cfg.stages.patch).unwrap();
                assert_eq!(r.targets.len(), 1);
                assert_eq!(r.targets[0].0, 108);
                for (a, b) in fresh.iter().zip(&r.targets[0].1) {
                    assert!((a - b).abs() <= a.abs() * 4.9e-4 + 1e-6, "{}: {a} vs {b}", sample.key);
                }
            }
        }
        // 8 samples x 3 epochs draw more than one view per sample somewhere.
        assert!(views_seen.len() > 8, "{views_seen:?}");
    }
}
