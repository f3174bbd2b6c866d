//! The run plan: which global batch index belongs to which epoch, and how
//! many samples each lane gives each batch. Every process computes the same
//! plan from the config and the shards, so nothing needs to be agreed at run time.
//!
//! Batch membership (DESIGN.md): batch b of an epoch takes positions
//! `[b * per_lane, (b + 1) * per_lane)` of every lane. An epoch has as many
//! batches as its shortest lane fills; the rest of the longer lanes is left
//! for that epoch (counted in the summary). Lane lengths come from counting
//! the samples of each shard once at start.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use shards::key_cache::{KeyCache, ShardKeysEntry};
use shards::{plan_epoch, EpochPlan, OnError, ShardReader, SkipRecord, Skips};

/// The sample keys of each shard, read once at the start of a run (bad samples
/// left out, counted in `skips`): the lane lengths of the plan and the views a
/// target cache must hold both come from them.
pub type ShardKeys = Vec<(PathBuf, Vec<String>)>;

/// [`ShardKeys`] of `shards`, in their order. With a key cache, a shard whose
/// version the cache holds is not read (the cache is checked against every
/// shard's current version first: one listing per prefix on object storage),
/// and each shard read is added to it. The others are read several at a time
/// (8 when any is on object storage, where the time is the network's; the
/// cores otherwise): at the scale of a bucket of shards this pass is the
/// start-up time of a run that has no key cache yet.
pub fn shard_keys(
    shards: &[PathBuf],
    policy: OnError,
    skips: &Skips,
    cache: Option<&KeyCache>,
) -> anyhow::Result<ShardKeys> {
    let started = std::time::Instant::now();
    // A shard whose version cannot be found is read, and its errors are handled there.
    let versions: Vec<Option<String>> = match cache {
        Some(_) => shards::storage::versions(shards)
            .into_iter()
            .map(|v| {
                v.unwrap_or_else(|e| {
                    tracing::debug!("{e} (its keys are read)");
                    None
                })
            })
            .collect(),
        None => vec![None; shards.len()],
    };
    let readers = if shards.iter().any(shards::storage::is_remote) {
        8
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
    .min(shards.len())
    .max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let from_cache = std::sync::atomic::AtomicUsize::new(0);
    type Slot = std::sync::Mutex<Option<anyhow::Result<(Vec<String>, Vec<SkipRecord>)>>>;
    let slots: Vec<Slot> = shards.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..readers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(path) = shards.get(i) else { break };
                let cached = match (cache, &versions[i]) {
                    (Some(cache), Some(version)) => cache
                        .get(path, version)
                        // Under `fail` a bad sample must stop the run, as reading the shard would.
                        .filter(|entry| policy == OnError::Skip || entry.skipped.is_empty()),
                    _ => None,
                };
                let keys = match cached {
                    Some(entry) => {
                        from_cache.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Ok((entry.keys, entry.skipped))
                    }
                    None => read_keys(path, policy).map(|(keys, found)| {
                        let skipped = found.records();
                        // Keep it only if every bad sample is on record (Skips keeps the first
                        // 1,000), and not when the storage cut the read short: the shard may
                        // read whole next time.
                        if let (Some(cache), Some(version)) = (cache, &versions[i]) {
                            let cut_short = found.by_reason().contains_key(shards::skips::UNAVAILABLE);
                            if skipped.len() as u64 == found.total() + found.shards() && !cut_short {
                                let entry = ShardKeysEntry {
                                    shard: path.to_string_lossy().into_owned(),
                                    version: version.clone(),
                                    keys: keys.clone(),
                                    skipped: skipped.clone(),
                                };
                                if let Err(e) = cache.put(&entry) {
                                    tracing::warn!(
                                        "key cache {}: {e} (the keys are read again next run)",
                                        cache.dir().display()
                                    );
                                }
                            }
                        }
                        (keys, skipped)
                    }),
                };
                *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(keys);
            });
        }
    });
    let keys = shards
        .iter()
        .zip(slots)
        .map(|(path, slot)| {
            let (keys, skipped) = slot
                .into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every shard was read by one of the threads")?;
            for record in skipped {
                if record.key == "*" {
                    skips.record_shard(&record.shard, &record.reason);
                } else {
                    skips.record(&record.shard, &record.key, &record.reason);
                }
            }
            Ok((path.clone(), keys))
        })
        .collect::<anyhow::Result<ShardKeys>>()
        .context("reading the keys of the training shards")?;
    if let Some(cache) = cache {
        let hits = from_cache.into_inner();
        tracing::info!(
            "keys of {} shards: {hits} from the key cache ({}), {} read ({:.1} s)",
            shards.len(),
            cache.dir().display(),
            shards.len() - hits,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(keys)
}

/// The good keys of one shard, and its bad samples counted on their own.
fn read_keys(path: &Path, policy: OnError) -> anyhow::Result<(Vec<String>, Skips)> {
    let found = Skips::quiet();
    let keys = ShardReader::open(path, policy, &found)
        .and_then(|reader| reader.map(|s| s.map(|s| s.key)).collect::<Result<Vec<_>, _>>())?;
    Ok((keys, found))
}

/// `RUN/shards.json`: what a run's `data.train` patterns resolved to, each shard
/// with its sample count and a digest of its keys in order. The checkpoint's data
/// position counts batches of this list: a resumed run over another list (a shard
/// added under the pattern, one rewritten) would train other batches while saying
/// it continued, so `--resume` checks it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardList {
    pub patterns: Vec<String>,
    pub shards: Vec<ListedShard>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ListedShard {
    pub path: String,
    pub samples: usize,
    /// BLAKE3 of the shard's good keys, each followed by a newline.
    pub keys_blake3: String,
}

impl ShardList {
    pub const FILE: &'static str = "shards.json";

    pub fn new(patterns: &[String], keys: &ShardKeys) -> Self {
        let shards = keys
            .iter()
            .map(|(path, keys)| {
                let mut hash = blake3::Hasher::new();
                for key in keys {
                    hash.update(key.as_bytes());
                    hash.update(b"\n");
                }
                ListedShard {
                    path: path.display().to_string(),
                    samples: keys.len(),
                    keys_blake3: hash.finalize().to_hex().to_string(),
                }
            })
            .collect();
        Self {
            patterns: patterns.to_vec(),
            shards,
        }
    }

    /// Writes the list into `run_dir`. When resuming, the list already there must
    /// hold the same shards, in the same order, with the same keys: the paths may
    /// differ (shards moved, or read from a bucket instead of a disk), which is
    /// logged. A run from before this file existed has none to check.
    pub fn record(&self, run_dir: &Path, resuming: bool) -> anyhow::Result<()> {
        let path = run_dir.join(Self::FILE);
        if resuming && path.exists() {
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let before: ShardList =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            self.check_continues(&before)
                .with_context(|| format!("--resume: the shards differ from those of {}", path.display()))?;
            if before == *self {
                return Ok(());
            }
            tracing::info!(
                "the shards' paths changed since {} (the same keys): {:?} -> {:?}",
                path.display(),
                before.patterns,
                self.patterns
            );
        }
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// Whether this list reads the same samples as `before`: the first difference named.
    fn check_continues(&self, before: &ShardList) -> anyhow::Result<()> {
        for (i, (was, now)) in before.shards.iter().zip(&self.shards).enumerate() {
            if was.samples != now.samples || was.keys_blake3 != now.keys_blake3 {
                bail!(
                    "shard {i} was {} with {} samples (keys blake3 {}), now {} with {} samples (keys blake3 {})",
                    was.path,
                    was.samples,
                    was.keys_blake3.chars().take(16).collect::<String>(),
                    now.path,
                    now.samples,
                    now.keys_blake3.chars().take(16).collect::<String>()
                );
            }
        }
        if before.shards.len() != self.shards.len() {
            let (longer, what) = if self.shards.len() > before.shards.len() {
                (&self.shards, "now also")
            } else {
                (&before.shards, "no longer")
            };
            let first = &longer[before.shards.len().min(self.shards.len())];
            bail!(
                "{} shards then, {} now: the patterns {:?} {what} match {} (and {} more)",
                before.shards.len(),
                self.shards.len(),
                self.patterns,
                first.path,
                before.shards.len().abs_diff(self.shards.len()) - 1
            );
        }
        Ok(())
    }
}

/// The whole run's batch layout.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// Shards, in config order.
    pub shards: Vec<PathBuf>,
    /// Lanes per epoch.
    pub lanes: usize,
    /// Samples each lane gives each batch.
    pub per_lane: usize,
    /// Batches of each epoch.
    pub batches: Vec<u64>,
    /// Global index of each epoch's first batch (and the total at the end).
    pub offsets: Vec<u64>,
    /// Samples left unread per epoch because a lane is longer than the shortest.
    pub left_over: Vec<u64>,
    /// Bad samples the count of the shards found (the lanes skip them again
    /// each epoch, on whichever process reads them), and the good ones.
    pub bad_per_epoch: u64,
    pub good_samples: u64,
}

impl RunPlan {
    /// Plan `epochs` epochs over `shards` with `counts[i]` samples in shard `i`.
    pub fn new(
        shards: Vec<PathBuf>,
        counts: &[u64],
        seed: u64,
        epochs: usize,
        lanes: usize,
        batch: usize,
    ) -> anyhow::Result<RunPlan> {
        if batch % lanes != 0 {
            bail!("the batch of {batch} samples is not divisible by data.lanes {lanes}: every lane gives each batch the same count");
        }
        let per_lane = batch / lanes;
        let mut plan = RunPlan {
            shards,
            lanes,
            per_lane,
            batches: vec![],
            offsets: vec![0],
            left_over: vec![],
            bad_per_epoch: 0,
            good_samples: counts.iter().sum(),
        };
        for epoch in 0..epochs as u64 {
            let lane_lengths = plan.lane_lengths(counts, seed, epoch);
            let shortest = lane_lengths.iter().copied().min().unwrap_or(0);
            let batches = shortest / per_lane as u64;
            if batches == 0 {
                bail!(
                    "epoch {epoch}: the shortest lane has {shortest} samples, less than one batch ({per_lane} per lane); \
                     use fewer data.lanes, a smaller batch, or more shards (lane lengths {lane_lengths:?})"
                );
            }
            plan.left_over
                .push(lane_lengths.iter().map(|l| l - batches * per_lane as u64).sum());
            plan.batches.push(batches);
            plan.offsets.push(plan.offsets[epoch as usize] + batches);
        }
        Ok(plan)
    }

    fn lane_lengths(&self, counts: &[u64], seed: u64, epoch: u64) -> Vec<u64> {
        let index: std::collections::HashMap<&PathBuf, u64> = self.shards.iter().zip(counts.iter().copied()).collect();
        self.epoch_plan(seed, epoch)
            .lanes
            .iter()
            .map(|lane| lane.iter().map(|s| index[s]).sum())
            .collect()
    }

    /// The shard-to-lane plan of one epoch.
    pub fn epoch_plan(&self, seed: u64, epoch: u64) -> EpochPlan {
        plan_epoch(&self.shards, seed, epoch, self.lanes)
    }

    /// Total batches.
    pub fn total_batches(&self) -> u64 {
        *self.offsets.last().unwrap_or(&0)
    }

    /// (epoch, batch within the epoch) of global batch `t`.
    pub fn locate(&self, t: u64) -> (u64, u64) {
        let epoch = self.offsets.partition_point(|&o| o <= t).saturating_sub(1);
        (epoch as u64, t - self.offsets[epoch])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_locate_agree() {
        let shards: Vec<PathBuf> = (0..6).map(|i| PathBuf::from(format!("s{i}"))).collect();
        let counts = [10, 10, 10, 10, 10, 7];
        let plan = RunPlan::new(shards, &counts, 1, 3, 2, 4).unwrap();
        for e in 0..3 {
            // Lanes of 3 shards: 30 or 27 samples; the shortest decides: 27 / 2 = 13 batches.
            assert_eq!(plan.batches[e], 13);
            assert_eq!(plan.left_over[e], (30 - 26) + (27 - 26));
        }
        assert_eq!(plan.total_batches(), 39);
        assert_eq!(plan.locate(0), (0, 0));
        assert_eq!(plan.locate(12), (0, 12));
        assert_eq!(plan.locate(13), (1, 0));
        assert_eq!(plan.locate(38), (2, 12));
    }

    #[test]
    fn batch_must_split_over_lanes() {
        let shards: Vec<PathBuf> = (0..2).map(|i| PathBuf::from(format!("s{i}"))).collect();
        assert!(RunPlan::new(shards.clone(), &[10, 10], 1, 1, 2, 5).is_err());
        assert!(RunPlan::new(shards, &[1, 1], 1, 1, 2, 4).is_err());
    }
}
