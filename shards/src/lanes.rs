//! The epoch plan: shards permuted per epoch and dealt into a fixed number of lanes.
//!
//! DESIGN.md, batch membership: the plan permutes the shard list with the
//! epoch's seed and deals the shards round-robin into `lanes` lanes (a config
//! value, independent of machines and workers). A lane reads its shards in
//! order through a seeded shuffle buffer. Which worker owns a lane changes
//! nothing: the sequence of a lane depends only on (seed, epoch, lane, shards).

use std::collections::VecDeque;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use rand::Rng;

use crate::rng::{stage_rng, ChaCha8Rng};
use crate::{storage, OnError, Result, Sample, ShardReader, Skips};

/// The shards of each lane for one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochPlan {
    /// `lanes[l]` is the shard list lane `l` reads, in order.
    pub lanes: Vec<Vec<PathBuf>>,
}

/// Permute `shards` with `(seed, epoch)` and deal them into `num_lanes` lanes.
///
/// With fewer shards than lanes some lanes are empty; a config check should
/// prevent that for training, where every lane feeds every batch.
pub fn plan_epoch(shards: &[PathBuf], seed: u64, epoch: u64, num_lanes: usize) -> EpochPlan {
    let num_lanes = num_lanes.max(1);
    let mut order: Vec<PathBuf> = shards.to_vec();
    let mut rng = stage_rng(seed, epoch, "", "epoch-plan");
    // Fisher-Yates, spelled out so the permutation is pinned to this code and
    // not to a library's shuffle, which may change between versions.
    for i in (1..order.len()).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    let mut lanes = vec![Vec::new(); num_lanes];
    for (i, shard) in order.into_iter().enumerate() {
        lanes[i % num_lanes].push(shard);
    }
    EpochPlan { lanes }
}

/// One sample of a lane with its place in the lane's sequence.
#[derive(Debug, Clone)]
pub struct LaneRecord {
    /// The lane it came from.
    pub lane: usize,
    /// Its position in the lane's sequence this epoch (0, 1, 2, ...).
    pub position: u64,
    /// The shard it was read from (for error messages).
    pub shard: Arc<PathBuf>,
    /// The sample.
    pub sample: Sample,
}

/// Reads one lane: its shards in order, through a seeded shuffle buffer.
pub struct LaneReader {
    lane: usize,
    shards: std::vec::IntoIter<PathBuf>,
    current: Option<(Arc<PathBuf>, ShardReader)>,
    /// The next shards, already opened: a remote one streams into its
    /// read-ahead while the current one is read (`storage.prefetch_shards`).
    upcoming: VecDeque<(PathBuf, std::io::Result<Box<dyn Read + Send>>)>,
    prefetch: usize,
    buffer: Vec<(Arc<PathBuf>, Sample)>,
    buffer_size: usize,
    rng: ChaCha8Rng,
    position: u64,
    policy: OnError,
    skips: Skips,
}

impl LaneReader {
    /// Read lane `lane` of `plan` for `(seed, epoch)` with a shuffle buffer of
    /// `buffer_size` samples (0 or 1: file order).
    pub fn new(
        plan: &EpochPlan,
        lane: usize,
        seed: u64,
        epoch: u64,
        buffer_size: usize,
        policy: OnError,
        skips: &Skips,
    ) -> LaneReader {
        let shards = plan.lanes.get(lane).cloned().unwrap_or_default();
        LaneReader {
            lane,
            shards: shards.into_iter(),
            current: None,
            upcoming: VecDeque::new(),
            prefetch: storage::options().prefetch_shards,
            buffer: Vec::with_capacity(buffer_size.min(1 << 16)),
            buffer_size: buffer_size.max(1),
            rng: stage_rng(seed, epoch, &format!("lane-{lane}"), "shuffle"),
            position: 0,
            policy,
            skips: skips.clone(),
        }
    }

    /// The next sample in file order, across the lane's shards.
    fn next_in_order(&mut self) -> Option<Result<(Arc<PathBuf>, Sample)>> {
        loop {
            if let Some((path, reader)) = self.current.as_mut() {
                match reader.next() {
                    Some(Ok(sample)) => return Some(Ok((path.clone(), sample))),
                    Some(Err(e)) => return Some(Err(e)),
                    None => self.current = None,
                }
            }
            let (shard, opened) = match self.upcoming.pop_front() {
                Some(next) => next,
                None => {
                    let shard = self.shards.next()?;
                    let opened = storage::open_read(&shard);
                    (shard, opened)
                }
            };
            while self.upcoming.len() < self.prefetch {
                let Some(next) = self.shards.next() else { break };
                let opened = storage::open_read(&next);
                self.upcoming.push_back((next, opened));
            }
            match ShardReader::from_stream(&shard, opened, self.policy, &self.skips) {
                Ok(reader) => self.current = Some((Arc::new(shard), reader)),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

impl Iterator for LaneReader {
    type Item = Result<LaneRecord>;

    fn next(&mut self) -> Option<Result<LaneRecord>> {
        while self.buffer.len() < self.buffer_size {
            match self.next_in_order() {
                Some(Ok(item)) => self.buffer.push(item),
                Some(Err(e)) => return Some(Err(e)),
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let pick = self.rng.random_range(0..self.buffer.len());
        let (shard, sample) = self.buffer.swap_remove(pick);
        let record = LaneRecord {
            lane: self.lane,
            position: self.position,
            shard,
            sample,
        };
        self.position += 1;
        Some(Ok(record))
    }
}
