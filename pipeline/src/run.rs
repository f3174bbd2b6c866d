//! `pipeline run CONFIG`: for now, stream one epoch of the data path.
//!
//! Until the trainer and the timely graph exist (later issues), `run` reads
//! every lane of epoch 0 through its shuffle buffer, one thread per lane, and
//! prints a summary: samples, bytes, classes, skipped input, samples/s.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use shards::{plan_epoch, LaneReader, Skips};

use crate::config;

/// Arguments of `pipeline run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The run config (YAML), e.g. configs/pretrain.yaml.
    pub config: PathBuf,
    /// Override config values: `--set data.lanes=8`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// What one lane read.
#[derive(Debug, Default)]
struct LaneTally {
    samples: u64,
    bytes: u64,
    per_class: Vec<u64>,
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let cfg = config::load(&args.config, &args.set)?;
    eprintln!("resolved config:\n{}", serde_norway::to_string(&cfg)?);
    let shard_paths = cfg.train_shards()?;
    let plan = plan_epoch(&shard_paths, cfg.seed, 0, cfg.data.lanes);
    let skips = Skips::default();
    let progress = indicatif::ProgressBar::new_spinner().with_message("reading lanes");
    progress.enable_steady_tick(std::time::Duration::from_millis(200));
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tallies: Vec<LaneTally> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..cfg.data.lanes)
            .map(|lane| {
                let (plan, skips, counter, progress) = (&plan, &skips, counter.clone(), progress.clone());
                let (seed, buffer, policy) = (cfg.seed, cfg.data.shuffle_buffer, cfg.data.on_error);
                scope.spawn(move || -> anyhow::Result<LaneTally> {
                    let mut tally = LaneTally::default();
                    for record in LaneReader::new(plan, lane, seed, 0, buffer, policy, skips) {
                        let record = record.with_context(|| format!("lane {lane}"))?;
                        tally.samples += 1;
                        tally.bytes += record.sample.bytes() as u64;
                        if let Some(class) = record.sample.class_index().and_then(|c| usize::try_from(c).ok()) {
                            if tally.per_class.len() <= class {
                                tally.per_class.resize(class + 1, 0);
                            }
                            tally.per_class[class] += 1;
                        }
                        let total = counter.fetch_add(1, Ordering::Relaxed) + 1;
                        if total % 256 == 0 {
                            progress.set_message(format!("{total} samples"));
                        }
                    }
                    Ok(tally)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a lane thread panicked"))?)
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    progress.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let samples: u64 = tallies.iter().map(|t| t.samples).sum();
    let bytes: u64 = tallies.iter().map(|t| t.bytes).sum();
    let mut per_class = Vec::<u64>::new();
    for tally in &tallies {
        per_class.resize(per_class.len().max(tally.per_class.len()), 0);
        for (class, count) in tally.per_class.iter().enumerate() {
            per_class[class] += count;
        }
    }
    println!(
        "epoch 0: {samples} samples, {bytes} bytes from {} shards in {} lanes",
        shard_paths.len(),
        cfg.data.lanes
    );
    println!("per lane: {:?}", tallies.iter().map(|t| t.samples).collect::<Vec<_>>());
    println!("per class: {per_class:?}");
    println!(
        "skipped: {} samples, {} shards {:?}",
        skips.total(),
        skips.shards(),
        skips.by_reason()
    );
    println!("{:.0} samples/s ({seconds:.2} s)", samples as f64 / seconds.max(1e-9));
    Ok(())
}
