//! The trainer thread: owns the model and the device, takes complete batches
//! from the sink over a bounded channel, steps, logs `metrics.jsonl`, and
//! writes checkpoints at epoch ends.
//!
//! A prefetch thread copies the next batch to the device (u8 images,
//! normalized there) while the current step computes; `data_wait_s` in
//! `metrics.jsonl` is the time the step loop waited for that thread.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use crossbeam::channel::Receiver;
use serde_json::json;
use stages::model::ModelConfig;
use stages::train::{TrainConfig, Trainer};

use crate::graph::sink::{ReadyBatch, Recycler};
use crate::metrics::{rates, Counters};
use crate::plan::RunPlan;

/// Everything the trainer thread needs.
pub struct TrainerSetup {
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub seed: u64,
    pub plan: RunPlan,
    pub run_dir: PathBuf,
    /// Checkpoint to continue from.
    pub resume: Option<PathBuf>,
    /// Write per-stage rates every this many batches.
    pub log_every: u64,
    pub counters: Arc<Counters>,
    /// Workers of this process (for busy fractions).
    pub workers: usize,
    /// Where uploaded batches go back to the sink (see [`Recycler`]).
    pub recycler: Recycler,
    /// Samples this process skipped, with their reasons: its lanes' readers and,
    /// under `on_error: skip`, its stages.
    pub skips: shards::Skips,
    /// `data.max_skip_fraction`: the run stops past it.
    pub max_skip_fraction: f64,
}

/// Samples skipped as bad input, counted so that a cluster's train process sees
/// the skips of its data processes too (their readers and stages run elsewhere,
/// with their own counters):
/// - in the stages: a batch that reaches the trainer short of `lanes x
///   per_lane` samples lost the rest to skips, wherever they happened;
/// - in the readers: the plan's count of the shards found `bad_per_epoch` bad
///   samples among `good_samples`, which the lanes skip again as they read
///   past them; each batch trained adds its share, `bad x batch / good` (the
///   tails of longer lanes, left unread, skip none).
///
/// Each is at least this process's own live count (the reasons it logged), so a
/// single process sees its skips as soon as they happen, in-flight ones included.
#[derive(Debug, Default)]
struct SkipTally {
    short: u64,
    read_share: f64,
}

impl SkipTally {
    fn add_batch(&mut self, plan: &RunPlan, samples: u64) {
        let full = (plan.lanes * plan.per_lane) as u64;
        self.short += full - samples.min(full);
        self.read_share += plan.bad_per_epoch as f64 * full as f64 / plan.good_samples.max(1) as f64;
    }

    /// Samples skipped so far and samples seen (skipped plus trained).
    fn counts(&self, setup: &TrainerSetup, trained: u64) -> (u64, u64) {
        let in_stages: u64 = crate::metrics::skipped_by_stage(&setup.counters)
            .iter()
            .map(|(_, n)| n)
            .sum();
        // The process's `Skips` logs the readers' skips and the stages' (under `skip`).
        let in_readers = setup.skips.total().saturating_sub(in_stages);
        let skipped = in_readers.max(self.read_share.round() as u64) + in_stages.max(self.short);
        (skipped, skipped + trained)
    }
}

/// What the run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TrainSummary {
    pub batches: u64,
    pub samples: u64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub seconds: f64,
    /// Fraction of the time the trainer waited for data.
    pub data_wait: f64,
    /// Samples skipped as bad input (readers and stages), and their fraction of those seen.
    pub skipped_samples: u64,
    pub skipped_fraction: f64,
}

/// The checkpoint directory inside a run directory.
pub fn checkpoint_dir(run_dir: &std::path::Path) -> PathBuf {
    run_dir.join("ckpt")
}

/// Build the trainer (resuming if asked): returns it and the first batch to train on.
pub fn make_trainer(setup: &TrainerSetup) -> anyhow::Result<(Trainer, u64)> {
    let steps_per_epoch = (setup.plan.batches[0] / setup.train.accum_iter as u64).max(1);
    let device = stages::train::device::open(&setup.train.device).context("opening the training device")?;
    let mut trainer =
        Trainer::new(&setup.model, &setup.train, &device, setup.seed, steps_per_epoch).context("building the model")?;
    let mut start = 0;
    if let Some(dir) = &setup.resume {
        let state = trainer
            .resume(dir)
            .with_context(|| format!("resuming from {}", dir.display()))?;
        start = state.data_position;
        tracing::info!("resumed from {} at step {}, batch {start}", dir.display(), state.step);
    }
    Ok((trainer, start))
}

/// A batch copied to the device by the prefetch thread (the batch itself emptied of its data).
type Prefetched = (ReadyBatch, Result<stages::train::Uploaded, stages::train::TrainError>);

/// Starts the prefetch thread: it copies each batch from `batches` to the device
/// and hands it over one at a time (a bounded channel of one: one batch waits
/// while another trains). It stops when either channel closes.
fn prefetch(
    uploader: stages::train::Uploader,
    batches: Receiver<ReadyBatch>,
    recycler: Recycler,
) -> anyhow::Result<crossbeam::channel::Receiver<Prefetched>> {
    let (tx, rx) = crossbeam::channel::bounded::<Prefetched>(1);
    std::thread::Builder::new()
        .name("prefetch".into())
        .spawn(move || {
            for mut ready in batches {
                let up = uploader.upload(&ready.batch, ready.index);
                // The step needs only the keys count and the index from here on;
                // the buffers go back to the sink to be filled again.
                let mut spent = std::mem::take(&mut ready.batch);
                ready.batch.keys = std::mem::take(&mut spent.keys);
                recycler.give(spent);
                if tx.send((ready, up)).is_err() {
                    break; // the step loop stopped
                }
            }
        })
        .context("starting the prefetch thread")?;
    Ok(rx)
}

/// Samples seen before the skip fraction is checked during a run (one bad
/// sample in the first batch is not a broken dataset); the end of the run
/// checks it whatever the count.
const MIN_SEEN_FOR_SKIP_CHECK: u64 = 1000;

/// An error once more than `data.max_skip_fraction` of the samples seen were
/// skipped (checked only from `min_seen` samples seen on).
fn check_skips(setup: &TrainerSetup, tally: &SkipTally, trained: u64, min_seen: u64) -> anyhow::Result<()> {
    let (skipped, seen) = tally.counts(setup, trained);
    if seen < min_seen || skipped as f64 <= setup.max_skip_fraction * seen as f64 {
        return Ok(());
    }
    bail!(
        "{skipped} of the {seen} samples seen so far were skipped as bad input ({:.1}%), more than \
         data.max_skip_fraction {} allows ({} missing from the batches trained, {} bad in the shards \
         each epoch; this process logged, by reason: {:?}, stages {:?}); fix the data, or raise \
         data.max_skip_fraction if this much loss is expected",
        100.0 * skipped as f64 / seen as f64,
        setup.max_skip_fraction,
        tally.short,
        setup.plan.bad_per_epoch,
        setup.skips.by_reason(),
        crate::metrics::skipped_by_stage(&setup.counters),
    )
}

/// On `--resume` from batch `start`: drops the lines of batches from `start` on
/// (trained again now) and a line cut short by a kill, so metrics.jsonl reads as
/// one uninterrupted run. Written to a temporary file, then renamed.
fn keep_metrics_before(path: &std::path::Path, start: u64) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(()); // no metrics yet
    };
    let mut kept = String::with_capacity(text.len());
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let batch = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("batch").and_then(|b| b.as_u64()));
        if batch.is_none_or(|b| b < start) {
            kept.push_str(line);
        }
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// metrics.jsonl is flushed at least this often (seconds), besides every `run.log_every` batches.
const FLUSH_EVERY_S: f64 = 2.0;

/// Train on every batch the sink sends until the channel closes.
pub fn train_loop(
    setup: TrainerSetup,
    mut trainer: Trainer,
    start: u64,
    batches: Receiver<ReadyBatch>,
) -> anyhow::Result<TrainSummary> {
    let metrics_path = setup.run_dir.join("metrics.jsonl");
    if start > 0 {
        keep_metrics_before(&metrics_path, start)?;
    }
    let file: File = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;
    let mut metrics = BufWriter::new(file);
    let total = setup.plan.total_batches();
    let progress = indicatif::ProgressBar::new(total).with_position(start);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} batches {per_sec} eta {eta} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut summary = TrainSummary::default();
    let mut tally = SkipTally::default();
    let started = Instant::now();
    let mut waited = 0.0;
    let mut last_counts = (setup.counters.snapshot(), Instant::now());
    let mut checkpoint_due = false;
    let uploaded = prefetch(trainer.uploader(), batches, setup.recycler.clone())?;
    let mut wait_start = Instant::now();
    let mut last_flush = Instant::now();
    for (ready, upload) in uploaded.iter() {
        let data_wait = wait_start.elapsed().as_secs_f64();
        waited += data_wait;
        let step_start = Instant::now();
        let stats = upload
            .and_then(|up| trainer.step_uploaded(up))
            .with_context(|| format!("training on batch {}", ready.index))?;
        let step_s = step_start.elapsed().as_secs_f64();
        let samples = ready.batch.keys.len() as u64;
        summary.batches += 1;
        summary.samples += samples;
        summary.first_loss.get_or_insert(stats.loss);
        summary.last_loss = Some(stats.loss);
        let line = json!({
            "kind": "step", "batch": ready.index, "epoch": ready.epoch, "step": stats.step,
            "loss": stats.loss, "loss_draw": stats.loss_draw, "loss_pred": stats.loss_pred,
            "lr": stats.lr, "grad_norm": stats.grad_norm, "updated": stats.updated,
            "samples": samples, "batch_digest": ready.digest,
            "data_wait_s": data_wait, "step_s": step_s,
        });
        writeln!(metrics, "{line}")?;
        tally.add_batch(&setup.plan, samples);
        if let Err(e) = check_skips(&setup, &tally, summary.samples, MIN_SEEN_FOR_SKIP_CHECK) {
            metrics.flush()?;
            return Err(e);
        }
        // At least every few seconds, so the file can be followed live and a kill
        // loses little (a ViT-S step on CPU takes ~10 s, log_every 20 of them).
        if last_flush.elapsed().as_secs_f64() >= FLUSH_EVERY_S {
            metrics.flush()?;
            last_flush = Instant::now();
        }
        if (ready.index + 1) % setup.log_every == 0 {
            let now = (setup.counters.snapshot(), Instant::now());
            let seconds = now.1.duration_since(last_counts.1).as_secs_f64();
            let stage_rates = rates(&last_counts.0, &now.0, seconds, setup.workers);
            for r in &stage_rates {
                tracing::debug!(
                    "{}: {:.0} records/s, busy {:.2}, queue {}",
                    r.stage,
                    r.records_per_s,
                    r.busy,
                    r.queue
                );
            }
            writeln!(
                metrics,
                "{}",
                json!({"kind": "stages", "batch": ready.index, "stages": stage_rates})
            )?;
            metrics.flush()?;
            last_counts = now;
        }
        progress.set_message(format!("epoch {} loss {:.4}", ready.epoch, stats.loss));
        progress.inc(1);
        if setup.plan.offsets.get(ready.epoch as usize + 1) == Some(&(ready.index + 1)) {
            checkpoint_due = true;
        }
        if stats.updated && setup.train.checkpoint_every.is_some_and(|n| stats.step % n == 0) {
            checkpoint_due = true;
        }
        // Checkpoints only between optimizer steps (never mid-accumulation).
        if checkpoint_due && stats.updated {
            metrics.flush()?;
            trainer
                .save(&checkpoint_dir(&setup.run_dir))
                .context("writing the checkpoint")?;
            checkpoint_due = false;
        }
        wait_start = Instant::now();
    }
    // Zero extractor calls is how a run shows it trained on cached targets only.
    let load = |count: &std::sync::atomic::AtomicU64| count.load(std::sync::atomic::Ordering::Relaxed);
    let (extractor_calls, cache_reads) = (load(&setup.counters.extractor_calls), load(&setup.counters.cache_reads));
    writeln!(
        metrics,
        "{}",
        json!({"kind": "targets", "extractor_calls": extractor_calls, "cache_reads": cache_reads})
    )?;
    metrics.flush()?;
    progress.finish_and_clear();
    if let Err(e) = crate::plot::loss_png(&setup.run_dir) {
        tracing::warn!("no loss plot: {e:#}");
    }
    summary.seconds = started.elapsed().as_secs_f64();
    summary.data_wait = waited / summary.seconds.max(1e-9);
    check_skips(&setup, &tally, summary.samples, 0)?;
    let (skipped, seen) = tally.counts(&setup, summary.samples);
    summary.skipped_samples = skipped;
    summary.skipped_fraction = skipped as f64 / seen.max(1) as f64;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On resume from batch 3: the step and stage lines of batches 3 on go, so
    /// does a line a kill cut short; lines without a batch (targets) stay.
    #[test]
    fn resume_keeps_the_metrics_of_the_batches_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut text = String::new();
        for b in 0..5 {
            text.push_str(&format!("{{\"kind\":\"step\",\"batch\":{b}}}\n"));
        }
        text.push_str("{\"kind\":\"stages\",\"batch\":1}\n{\"kind\":\"stages\",\"batch\":4}\n");
        text.push_str("{\"kind\":\"targets\",\"extractor_calls\":0}\n{\"kind\":\"step\",\"ba");
        std::fs::write(&path, text).unwrap();
        keep_metrics_before(&path, 3).unwrap();
        let kept = std::fs::read_to_string(&path).unwrap();
        let want =
            "{\"kind\":\"step\",\"batch\":0}\n{\"kind\":\"step\",\"batch\":1}\n{\"kind\":\"step\",\"batch\":2}\n\
                    {\"kind\":\"stages\",\"batch\":1}\n{\"kind\":\"targets\",\"extractor_calls\":0}\n";
        assert_eq!(kept, want);
        // No metrics file yet: nothing to do.
        keep_metrics_before(&dir.path().join("none.jsonl"), 3).unwrap();
    }
}
