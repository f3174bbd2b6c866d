//! `pipeline shards inspect`: what a set of shards holds, and what is wrong with it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::{OnError, Result, ShardReader, SkipRecord, Skips};

/// One shard's counts.
#[derive(Debug, Clone, Serialize)]
pub struct ShardSummary {
    /// The shard.
    pub path: PathBuf,
    /// Good samples.
    pub samples: u64,
    /// Payload bytes of the good samples.
    pub bytes: u64,
    /// Bad samples (skipped).
    pub bad_samples: u64,
}

/// The whole report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InspectReport {
    /// Shards named by the patterns.
    pub shards: usize,
    /// Shards that could not be opened.
    pub bad_shards: u64,
    /// Good samples.
    pub samples: u64,
    /// Bad samples.
    pub bad_samples: u64,
    /// Payload bytes of the good samples.
    pub bytes: u64,
    /// How many good samples carry each extension.
    pub extensions: BTreeMap<String, u64>,
    /// Bad samples per reason.
    pub bad_by_reason: BTreeMap<String, u64>,
    /// The bad samples (first 1000): shard, key, reason.
    pub bad: Vec<SkipRecord>,
    /// Per-shard counts.
    pub per_shard: Vec<ShardSummary>,
}

/// Read every shard (skipping and recording bad input) and count.
pub fn inspect(shards: &[PathBuf]) -> Result<InspectReport> {
    let skips = Skips::default();
    let mut report = InspectReport {
        shards: shards.len(),
        ..Default::default()
    };
    for path in shards {
        let before = skips.total();
        let mut summary = ShardSummary {
            path: path.clone(),
            samples: 0,
            bytes: 0,
            bad_samples: 0,
        };
        for sample in ShardReader::open(path, OnError::Skip, &skips)? {
            let sample = sample?;
            summary.samples += 1;
            summary.bytes += sample.bytes() as u64;
            for ext in sample.files.keys() {
                *report.extensions.entry(ext.clone()).or_default() += 1;
            }
        }
        summary.bad_samples = skips.total() - before;
        report.samples += summary.samples;
        report.bytes += summary.bytes;
        report.per_shard.push(summary);
    }
    report.bad_samples = skips.total();
    report.bad_shards = skips.shards();
    report.bad_by_reason = skips.by_reason();
    report.bad = skips.records();
    Ok(report)
}
