//! The one counter every skipped sample goes through.
//!
//! Under `on_error: skip` a bad sample is logged as `shard:key: reason` and
//! counted here; the run goes on and the counts appear in its summary. Under
//! `fail` the same finding becomes an error naming shard and key instead.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What to do with bad input (`data.on_error` in the config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Count the sample, log shard, key and reason, and go on.
    #[default]
    Skip,
    /// Stop with an error naming shard and key.
    Fail,
}

/// One skipped sample (or shard, with key `*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipRecord {
    /// The shard it came from.
    pub shard: String,
    /// The sample key, `*` for a whole shard, `?` when no key was readable.
    pub key: String,
    /// Why it was skipped.
    pub reason: String,
}

/// How many records are kept verbatim; beyond this only counts grow, so a
/// badly broken dataset cannot fill memory with skip records.
const KEEP_RECORDS: usize = 1000;

#[derive(Debug, Default)]
struct Inner {
    /// Counting only: a pre-pass (sample counts) must not log every bad sample twice.
    quiet: bool,
    samples: u64,
    shards: u64,
    by_reason: BTreeMap<String, u64>,
    records: Vec<SkipRecord>,
}

/// A shared, cheap-to-clone skip counter.
#[derive(Debug, Clone, Default)]
pub struct Skips(Arc<Mutex<Inner>>);

impl Skips {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // A panic elsewhere must not hide the counts: take them even if poisoned.
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A counter that counts without logging, for passes that read the data twice.
    pub fn quiet() -> Skips {
        Skips(Arc::new(Mutex::new(Inner {
            quiet: true,
            ..Default::default()
        })))
    }

    /// Count and log one skipped sample. `reason` starts with a short kind
    /// (`truncated tar`, `zero-length member`, ...), used for the per-reason
    /// counts: everything before the first `:`.
    pub fn record(&self, shard: &str, key: &str, reason: &str) {
        self.with(|inner| {
            if !inner.quiet {
                tracing::warn!("{shard}:{key}: {reason} (skipped)");
            }
            inner.samples += 1;
            *inner.by_reason.entry(reason_kind(reason)).or_default() += 1;
            if inner.records.len() < KEEP_RECORDS {
                inner.records.push(SkipRecord {
                    shard: shard.into(),
                    key: key.into(),
                    reason: reason.into(),
                });
            }
        });
    }

    /// Count and log a whole shard that could not be read at all.
    pub fn record_shard(&self, shard: &str, reason: &str) {
        self.with(|inner| {
            if !inner.quiet {
                tracing::warn!("{shard}: {reason} (shard skipped)");
            }
            inner.shards += 1;
            *inner.by_reason.entry(reason_kind(reason)).or_default() += 1;
            if inner.records.len() < KEEP_RECORDS {
                inner.records.push(SkipRecord {
                    shard: shard.into(),
                    key: "*".into(),
                    reason: reason.into(),
                });
            }
        });
    }

    /// Skipped samples.
    pub fn total(&self) -> u64 {
        self.with(|inner| inner.samples)
    }

    /// Skipped whole shards.
    pub fn shards(&self) -> u64 {
        self.with(|inner| inner.shards)
    }

    /// Counts per reason kind.
    pub fn by_reason(&self) -> BTreeMap<String, u64> {
        self.with(|inner| inner.by_reason.clone())
    }

    /// The first skip records (at most 1000).
    pub fn records(&self) -> Vec<SkipRecord> {
        self.with(|inner| inner.records.clone())
    }
}

/// The reason kind of a shard cut short by its storage (retries exhausted, a
/// download that stopped), not by its content: the same shard may read whole
/// next time, so what was read of it must not be remembered as the shard (the
/// key cache leaves it out).
pub const UNAVAILABLE: &str = "shard unavailable";

/// Whether a read error came from the transport rather than the bytes: a remote
/// stream's exhausted retries ([`std::io::ErrorKind::TimedOut`]), a download
/// task that stopped, a connection gone.
pub fn is_unavailable(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        TimedOut | BrokenPipe | ConnectionReset | ConnectionAborted | NotConnected
    )
}

fn reason_kind(reason: &str) -> String {
    reason.split(':').next().unwrap_or(reason).trim().to_string()
}

/// Apply the policy to one bad sample: count it under `Skip`, error under `Fail`.
pub fn handle_bad(policy: OnError, skips: &Skips, shard: &Path, key: &str, reason: &str) -> Result<()> {
    match policy {
        OnError::Skip => {
            skips.record(&shard.display().to_string(), key, reason);
            Ok(())
        }
        OnError::Fail => Err(Error::BadSample {
            shard: shard.to_path_buf(),
            key: key.to_string(),
            reason: reason.to_string(),
        }),
    }
}
