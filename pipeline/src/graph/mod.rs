//! The dataflow, top to bottom:
//!
//!     lanes source -> decode -> augment -> mask -> smooth -> targets -> sink -> trainer thread
//!
//! Every worker of every process builds this same graph (timely's model). The
//! timestamp is the global batch index. Each stage runs on the workers of its
//! role (`placement` in the config); a record moves to the next stage by an
//! exchange that routes it to one of that stage's workers, or keeps it on the
//! current worker when both stages share a worker set (fused: moved, not
//! copied). The sink, on one `train` worker, releases batch t when its input
//! frontier passes t: timely's progress tracking is the batch barrier.
//!
//! The driver loop beside the graph opens batch t only while fewer than
//! `run.window` batches are between the lanes and the trainer: timely's
//! queues are unbounded, so this probe is what keeps memory flat.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crossbeam::channel::Sender;
use shards::{LaneReader, OnError, Skips};
use stages::record::{Record, Stages};
use stages::sample::StageError;
use timely::dataflow::operators::{Input, Probe};
use timely::dataflow::{InputHandleVec as InputHandle, ProbeHandle, Stream};
use timely::worker::Worker;

use crate::metrics::{Counters, Stage};
use crate::placement::{Placement, StageSets};
use crate::plan::RunPlan;
pub mod operators;
pub mod sink;

use operators::{
    check, drain, fail, gather_by_frontier, posting_failure, route, stage, wait_for_window, BadInput, Failure, Routed,
};

use sink::{assemble_batch, ReadyBatch, Recycler, SinkShape};

/// What every worker needs to build and drive the graph.
pub struct GraphContext {
    /// The record stages (with the target cache a run reads, if any) and the run seed.
    pub stages: Stages,
    pub policy: OnError,
    pub shuffle_buffer: usize,
    pub plan: RunPlan,
    pub placement: Placement,
    /// Batches allowed between the lanes and the trainer.
    pub window: u64,
    /// The first batch to produce (after `--resume`).
    pub start_batch: u64,
    /// One past the last batch to produce (the plan's end, or `--stop-after-epochs`).
    pub stop_batch: u64,
    pub sink_shape: SinkShape,
    pub skips: Skips,
    pub counters: Arc<Counters>,
    /// The first failure of any worker of this process: every worker's driver
    /// loop checks it and stops, so one failing worker never leaves the others
    /// waiting for its progress.
    pub failure: Failure,
    /// Spent batches the sink refills (handed back by the trainer's upload,
    /// or by the sink itself when no trainer takes them).
    pub recycler: Recycler,
}

type Records<'s> = Stream<'s, u64, Vec<Record>>;

/// The lanes spread a record by (lane, position): deterministic, and even over the set.
impl Routed for Record {
    fn spread_hash(&self) -> u64 {
        (self.lane as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.position.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
    }
    fn origin(&self) -> (&str, &str) {
        (&self.shard, &self.key)
    }
}

/// One stage's function on a record: [`Stages::apply`] for that stage.
type StageFn = Box<dyn Fn(Record) -> Result<Record, StageError>>;

/// Consecutive stages on the same worker set run as one operator, all of
/// them on one record before the next (DESIGN.md: "fuse stages so a sample
/// stays in cache"). One operator per stage ran each stage over a whole
/// batch of records first: the decoded regions and views of hundreds of
/// samples went out of cache between stages, and augment and smooth took
/// twice as long in the graph as in `stages::chain` (`pipeline bench data`).
fn fused_groups(stages: Vec<(Stage, StageFn)>, sets: &StageSets) -> Vec<Vec<(Stage, StageFn)>> {
    let mut groups: Vec<Vec<(Stage, StageFn)>> = Vec::new();
    for (stage, f) in stages {
        match groups.last_mut() {
            Some(group) if sets.of(stage) == sets.before(stage) => group.push((stage, f)),
            _ => groups.push(vec![(stage, f)]),
        }
    }
    groups
}

/// A group of consecutive stages as one operator on `worker`:
/// records arrive by an exchange routed into the first stage's worker set,
/// and each stage's function is applied in turn (timed per stage); bad input
/// is a counted skip or, under `fail`, stops the run with shard, key and reason.
fn stage_group<'s>(input: Records<'s>, group: Vec<(Stage, StageFn)>, worker: usize, ctx: &GraphContext) -> Records<'s> {
    let first = group[0].0;
    let name = group
        .iter()
        .map(|(stage, _)| stage.name())
        .collect::<Vec<_>>()
        .join("+");
    let sets = &ctx.placement.sets;
    // Records stay on their worker between stages on the same workers (no
    // exchange), but the lanes are read by at most `data.lanes` workers: with
    // fewer lanes than decode workers, decode spreads them over all of them.
    // Without this, 16 workers with the default 4 lanes did the work of 4
    // (`bench data --only graph` on a 16-core machine: 1,050 to 1,710 images/s
    // where the chain alone gave 9,000).
    let spread = first == Stage::Decode && ctx.plan.lanes < sets.of(first).len();
    let pact = route(sets.before(first), sets.of(first), worker, spread);
    let bad = BadInput {
        policy: ctx.policy,
        skips: ctx.skips.clone(),
        failure: ctx.failure.clone(),
    };
    let counters = ctx.counters.clone();
    stage(input, &name, pact, bad, move |mut r, out| {
        for (stage, f) in &group {
            let start = Instant::now();
            let result = f(r);
            counters.record(*stage, start.elapsed(), result.is_ok());
            match result {
                Ok(next) => r = next,
                Err(e) => return Err(format!("{}: {e}", stage.name())),
            }
        }
        out.push(r);
        Ok(())
    })
}

/// The sink: gathers each batch, and once the frontier has passed its index,
/// orders it by (lane, position), assembles it and hands it to the trainer.
/// It holds the batch's capability until then, so the probe after it shows
/// exactly which batches have reached the trainer.
fn sink<'s>(
    input: Records<'s>,
    ctx: &GraphContext,
    to_trainer: Option<Sender<ReadyBatch>>,
) -> Stream<'s, u64, Vec<u64>> {
    let sink_worker = ctx.placement.sink_worker;
    let shape = ctx.sink_shape.clone();
    let plan = ctx.plan.clone();
    let counters = ctx.counters.clone();
    let failure = ctx.failure.clone();
    let recycler = ctx.recycler.clone();
    gather_by_frontier(
        input,
        "sink",
        move |_: &Record| sink_worker as u64,
        move |t, mut records| {
            records.sort_by_key(|r| (r.lane, r.position));
            for r in records
                .iter()
                .filter(|r| r.position % crate::metrics::WIRE_SAMPLE_EVERY == 0)
            {
                let bytes = bincode::serialized_size(r).unwrap_or(0);
                counters
                    .wire_bytes
                    .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                counters.wire_sampled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let start = Instant::now();
            let (epoch, _) = plan.locate(t);
            let n = records.len() as u64;
            let ready = assemble_batch(t, epoch, records, &shape, recycler.take());
            counters.record_many(Stage::Sink, n, start.elapsed());
            match (ready, &to_trainer) {
                (Ok(ready), Some(tx)) => {
                    // Blocks while the trainer is behind: this is where a
                    // slow trainer holds the data side back.
                    if tx.send(ready).is_err() {
                        fail(&failure, "the trainer stopped".into());
                    }
                }
                (Ok(ready), None) => recycler.give(ready.batch),
                (Err(e), _) => {
                    fail(&failure, format!("batch {t}: {e}"));
                }
            }
            vec![t]
        },
    )
}

/// Build the graph on this worker; returns its input (the lanes) and the probe after the sink.
fn build(
    worker: &mut Worker,
    ctx: &Arc<GraphContext>,
    to_trainer: Option<Sender<ReadyBatch>>,
) -> (InputHandle<u64, Record>, ProbeHandle<u64>) {
    let me = worker.index();
    let mut input = InputHandle::new();
    let probe = ProbeHandle::new();
    worker.dataflow::<u64, _, _>(|scope| {
        let lanes = scope.input_from(&mut input);
        // The one list of record stages (`stages::record`), as `stages dump` and
        // `bench data`'s chain run it too; the targets stage also counts where
        // its targets came from, for metrics.jsonl.
        let stages: Vec<(Stage, StageFn)> = Stage::RECORD
            .into_iter()
            .map(|stage| {
                let (list, counters) = (ctx.stages.clone(), ctx.counters.clone());
                let calls = list.config().targets.kinds.len() as u64;
                let f: StageFn = Box::new(move |r| {
                    let r = list.apply(stage, r)?;
                    if stage == Stage::Targets {
                        let counter = match list.reads_cache() {
                            true => (&counters.cache_reads, 1),
                            false => (&counters.extractor_calls, calls),
                        };
                        counter.0.fetch_add(counter.1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(r)
                });
                (stage, f)
            })
            .collect();
        let mut records = lanes;
        for group in fused_groups(stages, &ctx.placement.sets) {
            records = stage_group(records, group, me, ctx);
        }
        sink(records, ctx, to_trainer).probe_with(&probe);
    });
    (input, probe)
}

/// Build the graph and drive it to the end of the plan on this worker. An
/// error here is also posted to the process's shared failure, so the other
/// workers stop too instead of waiting for this one.
pub fn run_worker(
    worker: &mut Worker,
    ctx: Arc<GraphContext>,
    to_trainer: Option<Sender<ReadyBatch>>,
) -> anyhow::Result<()> {
    posting_failure(&ctx.failure, || drive(worker, &ctx, to_trainer))
}

fn drive(worker: &mut Worker, ctx: &Arc<GraphContext>, to_trainer: Option<Sender<ReadyBatch>>) -> anyhow::Result<()> {
    let failure = ctx.failure.clone();
    let (mut input, probe) = build(worker, ctx, to_trainer);
    let me = worker.index();
    let my_lanes = ctx.placement.lanes_of(me, ctx.plan.lanes);
    let per_lane = ctx.plan.per_lane as u64;
    let mut readers: HashMap<usize, LaneReader> = HashMap::new();
    let mut reader_epoch = u64::MAX;
    input.advance_to(ctx.start_batch);
    for t in ctx.start_batch..ctx.stop_batch {
        // Flow control: batch t opens once the sink has handed batch t - window to the trainer.
        wait_for_window(worker, &probe, (t, ctx.start_batch, ctx.window), &failure)?;
        let (epoch, b) = ctx.plan.locate(t);
        if !my_lanes.is_empty() && epoch != reader_epoch {
            let plan = ctx.plan.epoch_plan(ctx.stages.seed(), epoch);
            readers = my_lanes
                .iter()
                .map(|&lane| {
                    let reader = LaneReader::new(
                        &plan,
                        lane,
                        ctx.stages.seed(),
                        epoch,
                        ctx.shuffle_buffer,
                        ctx.policy,
                        &ctx.skips,
                    );
                    (lane, reader)
                })
                .collect();
            reader_epoch = epoch;
            // After --resume: the batches of this epoch before `b` were trained already.
            for reader in readers.values_mut() {
                for _ in 0..b * per_lane {
                    if let Some(r) = reader.next() {
                        r?;
                    }
                }
            }
        }
        for &lane in &my_lanes {
            let reader = readers.get_mut(&lane).expect("a reader per owned lane");
            for _ in 0..per_lane {
                let Some(item) = reader.next() else { break };
                ctx.counters.sourced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                input.send(source_record(t, epoch, item?));
            }
        }
        input.advance_to(t + 1);
        worker.step();
        check(&failure)?;
    }
    drain(worker, input, &probe, &failure)
}

/// The record the lanes send into the graph for a sample of batch `t`.
pub fn source_record(t: u64, epoch: u64, lr: shards::LaneRecord) -> Record {
    Record {
        batch: t,
        epoch,
        lane: lr.lane as u32,
        position: lr.position,
        shard: lr.shard.display().to_string(),
        class: lr.sample.class_index(),
        key: lr.sample.key,
        raw: stages::record::raw_members(lr.sample.files),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Between stages on the same workers a record stays where it is, unless
    /// spread (the lanes into decode when lanes are fewer than workers): then
    /// every worker of the set gets a share.
    #[test]
    fn route_stays_or_spreads() {
        let workers = [0usize, 1, 2, 3];
        let record = |lane: u32, position: u64| Record {
            lane,
            position,
            ..Record::default()
        };
        let mut stay = route::<Record>(&workers, &workers, 2, false);
        assert!((0..64).all(|p| stay(&record(0, p)) == 2));
        let mut spread = route::<Record>(&workers, &workers, 2, true);
        let mut seen = [0usize; 4];
        for p in 0..64 {
            seen[spread(&record(0, p)) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n >= 8), "{seen:?}");
        // Deterministic: the same record goes to the same worker from any worker.
        let mut other = route::<Record>(&workers, &workers, 0, true);
        assert!((0..64).all(|p| other(&record(1, p)) == spread(&record(1, p))));
    }
}
