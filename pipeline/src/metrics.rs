//! Per-stage counters shared by the workers of one process, read by the
//! trainer thread for `metrics.jsonl` and by `pipeline bench data`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

pub use stages::record::Stage;

/// Counters of one stage.
#[derive(Debug, Default)]
pub struct StageCounter {
    /// Records that came in.
    pub received: AtomicU64,
    /// Records passed on.
    pub done: AtomicU64,
    /// Records dropped as bad input.
    pub skipped: AtomicU64,
    /// Time spent in the stage's function, in nanoseconds, over all workers.
    pub busy_ns: AtomicU64,
}

/// All stages' counters plus the source's, for one process.
#[derive(Debug, Default)]
pub struct Counters {
    /// Records the lanes sent into the graph.
    pub sourced: AtomicU64,
    pub stages: [StageCounter; 6],
    /// Target extractor calls (one per view and target kind), including a
    /// cached run's `on_miss: compute`; zero when every target came from the cache.
    pub extractor_calls: AtomicU64,
    /// Records whose targets were read from the target cache.
    pub cache_reads: AtomicU64,
    /// bincode bytes of the records the sink sampled (one in [`WIRE_SAMPLE_EVERY`]), and their count.
    pub wire_bytes: AtomicU64,
    pub wire_sampled: AtomicU64,
}

/// The sink measures one record in this many: sizing a record walks its bytes.
pub const WIRE_SAMPLE_EVERY: u64 = 64;

impl Counters {
    /// Count one call of `stage`.
    pub fn record(&self, stage: Stage, busy: Duration, passed: bool) {
        let c = &self.stages[stage.index()];
        c.received.fetch_add(1, Ordering::Relaxed);
        c.busy_ns.fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
        if passed {
            c.done.fetch_add(1, Ordering::Relaxed);
        } else {
            c.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count `n` records through stage `index` that took `busy` together.
    pub fn record_many(&self, stage: Stage, n: u64, busy: Duration) {
        let c = &self.stages[stage.index()];
        c.received.fetch_add(n, Ordering::Relaxed);
        c.done.fetch_add(n, Ordering::Relaxed);
        c.busy_ns.fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
    }

    /// A copy of the counts now.
    pub fn snapshot(&self) -> Snapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            sourced: load(&self.sourced),
            stages: std::array::from_fn(|i| {
                let c = &self.stages[i];
                [load(&c.received), load(&c.done), load(&c.skipped), load(&c.busy_ns)]
            }),
        }
    }
}

/// Records each stage dropped as bad input, by stage name (those with any).
pub fn skipped_by_stage(c: &Counters) -> Vec<(&'static str, u64)> {
    Stage::ALL
        .iter()
        .zip(&c.stages)
        .map(|(stage, s)| (stage.name(), s.skipped.load(Ordering::Relaxed)))
        .filter(|&(_, n)| n > 0)
        .collect()
}

/// Counts at one moment: per stage [received, done, skipped, busy_ns].
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub sourced: u64,
    pub stages: [[u64; 4]; 6],
}

/// One stage over an interval, as written to `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StageRate {
    pub stage: &'static str,
    /// Records through the stage per second of wall time.
    pub records_per_s: f64,
    /// Fraction of the interval the stage's function ran, per worker of this process.
    pub busy: f64,
    /// Records handed to the stage and not yet through it (this process).
    pub queue: u64,
}

/// Rates between two snapshots taken `seconds` apart by a process with `workers` workers.
pub fn rates(before: &Snapshot, after: &Snapshot, seconds: f64, workers: usize) -> Vec<StageRate> {
    let seconds = seconds.max(1e-9);
    Stage::ALL
        .iter()
        .map(|stage| {
            let i = stage.index();
            let upstream_done = if i == 0 { after.sourced } else { after.stages[i - 1][1] };
            StageRate {
                stage: stage.name(),
                records_per_s: (after.stages[i][0] - before.stages[i][0]) as f64 / seconds,
                busy: (after.stages[i][3] - before.stages[i][3]) as f64 / 1e9 / seconds / workers.max(1) as f64,
                queue: upstream_done.saturating_sub(after.stages[i][0]),
            }
        })
        .collect()
}
