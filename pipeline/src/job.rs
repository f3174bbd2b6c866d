//! `pipeline run CONFIG`: pre-train through the dataflow.
//!
//! Sets up what the graph needs (the plan, the placement, the run directory,
//! the trainer thread), starts timely (one process, or a cluster with
//! `--processes N --process I --hostfile FILE`), and reports.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use shards::Skips;
use stages::record::Stages;

use crate::cluster::{exit_on_lost_peer, log_thread_budget, timely_config, ClusterArgs};
use crate::config::{self, RunConfig};
use crate::graph::sink::SinkShape;
use crate::graph::{run_worker, GraphContext};
use crate::metrics::Counters;
use crate::placement::Placement;
use crate::plan::{shard_keys, RunPlan, ShardKeys, ShardList};
use crate::trainer::{checkpoint_dir, make_trainer, train_loop, TrainerSetup};

/// Arguments of `pipeline run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The run config (YAML), e.g. configs/pretrain.yaml.
    pub config: PathBuf,
    /// Override config values: `--set train.epochs=5`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue the run in this directory from its last checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Stop cleanly after this many epochs (checkpoint written), as if the run
    /// had been cut there; `--resume` continues it.
    #[arg(long, value_name = "EPOCHS")]
    pub stop_after_epochs: Option<usize>,
}

fn run_dir(cfg: &RunConfig, args: &RunArgs) -> PathBuf {
    if let Some(dir) = &args.resume {
        return dir.clone();
    }
    cfg.run.dir.clone().unwrap_or_else(|| {
        let stem = args
            .config
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        PathBuf::from("runs").join(stem)
    })
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    log_thread_budget(args.cluster.workers);
    let cfg = config::load(&args.config, &args.set)?;
    if args.cluster.processes > 1 {
        exit_on_lost_peer(args.cluster.process);
    }
    let placement = Placement::resolve(
        &cfg.cluster,
        &cfg.placement,
        args.cluster.processes,
        args.cluster.workers,
    )?;
    let trains = placement.trains(args.cluster.process, args.cluster.workers);
    let timely_config = timely_config(&args.cluster)?;

    let skips = Skips::default();
    let (plan, keys) = plan_run(&cfg)?;
    let micro_batch = plan.lanes * plan.per_lane;
    // The resolved run, once, before any work: what the config and the shards came to.
    let st = &cfg.stages;
    let kinds: Vec<String> = st
        .targets
        .kinds
        .iter()
        .map(|&k| format!("{} {}", k.name(), st.target_dims(k)))
        .collect();
    tracing::info!(
        "{} shards, {} samples ({} bad, skipped each epoch); {} epochs of {:?} batches of {micro_batch} ({} lanes x {}); \
         lr {:.3e}; model input {} px x {} channel(s), {} patches; targets {}{}; workers per stage {}",
        keys.len(),
        keys.iter().map(|(_, k)| k.len()).sum::<usize>(),
        plan.bad_per_epoch,
        cfg.train.epochs,
        plan.batches,
        plan.lanes,
        plan.per_lane,
        cfg.train.peak_lr(),
        st.augment.size,
        st.channels,
        (st.augment.size / st.patch).pow(2),
        kinds.join(", "),
        if stages::views::cached(st) { " (from the target cache)" } else { "" },
        stages::record::Stage::RECORD
            .iter()
            .map(|&stage| format!("{} {:?}", stage.name(), placement.sets.of(stage)))
            .chain([format!("sink [{}]", placement.sink_worker)])
            .collect::<Vec<_>>()
            .join(", ")
    );

    let counters = Arc::new(Counters::default());
    let cache = crate::cache::prepare_run(&cfg, args.cluster.workers, &counters, Some(&keys))?;
    // Only the process that trains keeps the run directory (and hashes the keys).
    let shard_list = trains.then(|| ShardList::new(&cfg.data.train, &keys));
    drop(keys); // a run's whole key list (ImageNet: 1.28M keys); the lanes read their own
    let run_dir = run_dir(&cfg, args);
    let recycler = crate::graph::sink::Recycler::default();
    let (sender, trainer_thread) = if trains {
        let taken = run_dir.join("metrics.jsonl").exists() || checkpoint_dir(&run_dir).exists();
        if taken && args.resume.is_none() {
            bail!(
                "run directory {} already holds a run: continue it with --resume {0}, \
                 or start another with --set run.dir=NEW_DIR (or remove it)",
                run_dir.display()
            );
        }
        std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        std::fs::write(run_dir.join("config.yaml"), serde_norway::to_string(&cfg)?)
            .with_context(|| format!("writing {}", run_dir.display()))?;
        if let Some(list) = &shard_list {
            list.record(&run_dir, args.resume.is_some())?;
        }
        let setup = TrainerSetup {
            model: cfg.model.clone(),
            train: cfg.train.clone(),
            seed: cfg.seed,
            plan: plan.clone(),
            run_dir: run_dir.clone(),
            resume: args.resume.as_ref().map(|d| checkpoint_dir(d)),
            log_every: cfg.run.log_every,
            counters: counters.clone(),
            workers: args.cluster.workers,
            recycler: recycler.clone(),
            skips: skips.clone(),
            max_skip_fraction: cfg.data.max_skip_fraction,
        };
        let (trainer, start) = make_trainer(&setup)?;
        // One batch waits in the channel while the trainer works on the next.
        let (tx, rx) = crossbeam::channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || train_loop(setup, trainer, start, rx))
            .context("starting the trainer thread")?;
        (Some(tx), Some((thread, start)))
    } else {
        (None, None)
    };
    let start_batch = match (&trainer_thread, &args.resume) {
        (Some((_, start)), _) => *start,
        (None, Some(dir)) => resume_position(dir)?,
        (None, None) => 0,
    };
    let stop_batch = match args.stop_after_epochs {
        Some(e) => plan.offsets[e.min(plan.batches.len())],
        None => plan.total_batches(),
    };
    if start_batch >= stop_batch {
        bail!(
            "nothing to train: the run starts at batch {start_batch} and stops at {stop_batch} (of {} batches); \
             a run that trains nothing is an error (more epochs: --set train.epochs=N)",
            plan.total_batches()
        );
    }

    let ctx = Arc::new(GraphContext {
        stages: data_stages(&cfg, cache)?,
        policy: cfg.data.on_error,
        shuffle_buffer: cfg.data.shuffle_buffer,
        plan: plan.clone(),
        placement: placement.clone(),
        window: cfg.run.window,
        start_batch,
        stop_batch,
        sink_shape: SinkShape::of(&cfg.stages),
        skips: skips.clone(),
        counters: counters.clone(),
        failure: Default::default(),
        recycler: recycler.clone(),
    });
    let started = Instant::now();
    let sink_worker = placement.sink_worker;
    let worker_sender = sender.clone();
    let guards = timely::execute(timely_config, move |worker| {
        let to_trainer = if worker.index() == sink_worker {
            worker_sender.clone()
        } else {
            None
        };
        run_worker(worker, ctx.clone(), to_trainer)
    })
    .map_err(|e| anyhow::anyhow!("starting timely: {e}"))?;
    let worker_results: Vec<_> = guards.join();
    drop(sender);
    let trained = match trainer_thread {
        Some((thread, _)) => Some(
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("the trainer thread panicked"))?,
        ),
        None => None,
    };
    // The trainer's own error explains a worker's "the trainer stopped".
    let summary = match trained {
        Some(result) => Some(result?),
        None => None,
    };
    for (i, result) in worker_results.into_iter().enumerate() {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.context(format!("worker {i} of process {}", args.cluster.process))),
            Err(e) => bail!(
                "worker {i} of process {} stopped: {e}{}",
                args.cluster.process,
                if args.cluster.processes > 1 {
                    "\n(a process of the cluster is gone: rerun every process with --resume RUN_DIR)"
                } else {
                    ""
                }
            ),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let workers = args.cluster.workers;
    for r in crate::metrics::rates(&Default::default(), &counters.snapshot(), seconds, workers) {
        tracing::info!(
            "stage {:8} {:8.0} records/s, busy {:5.1}% of {workers} worker(s)",
            r.stage,
            r.records_per_s,
            r.busy * 100.0
        );
    }
    println!(
        "skipped: {} samples, {} shards {:?}",
        skips.total(),
        skips.shards(),
        skips.by_reason()
    );
    if let Some(summary) = summary {
        if summary.batches == 0 {
            bail!(
                "the run trained no batch ({} skipped samples); a run that trains nothing is an error",
                summary.skipped_samples
            );
        }
        println!(
            "trained {} batches ({} samples) in {seconds:.1} s: {:.0} samples/s, loss {:.4} -> {:.4}, data wait {:.0}%",
            summary.batches,
            summary.samples,
            summary.samples as f64 / seconds.max(1e-9),
            summary.first_loss.unwrap_or(f64::NAN),
            summary.last_loss.unwrap_or(f64::NAN),
            summary.data_wait * 100.0
        );
        println!("run directory: {}", run_dir.display());
        let mut summary = serde_json::to_value(&summary)?;
        if cfg.eval.after_run {
            summary["probe"] = crate::evaluate::after_run_report(&cfg, &run_dir);
            if cfg.eval.after_run_finetune_fraction > 0.0 {
                summary["finetune"] = crate::evaluate::after_run_finetune_report(&cfg, &run_dir);
            }
        }
        std::fs::write(run_dir.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    } else {
        println!("data process {} done in {seconds:.1} s", args.cluster.process);
    }
    Ok(())
}

/// The batch layout of a run, from the training shards' keys (read once here;
/// a run with a target cache checks its views against the same keys).
fn plan_run(cfg: &RunConfig) -> anyhow::Result<(RunPlan, ShardKeys)> {
    let shard_paths = cfg.train_shards()?;
    // Stops at the first shard found (one HEAD request for shards on object storage).
    let mut any_exists = false;
    for path in &shard_paths {
        match shards::storage::exists(path) {
            Ok(false) => {}
            Ok(true) => {
                any_exists = true;
                break;
            }
            Err(e) => bail!("data.train: {}: {e}", path.display()),
        }
    }
    if !any_exists {
        let missing = &shard_paths;
        let shown: Vec<String> = missing.iter().take(3).map(|p| p.display().to_string()).collect();
        bail!(
            "data.train: none of the {} shards exists ({}{}; patterns {:?})",
            missing.len(),
            shown.join(", "),
            if missing.len() > 3 { ", ..." } else { "" },
            cfg.data.train
        );
    }
    // Bad input found while counting is reported when the lanes read it.
    let found = Skips::quiet();
    let keys = shard_keys(&shard_paths, cfg.data.on_error, &found, cfg.data.key_cache().as_ref())?;
    let counts: Vec<u64> = keys.iter().map(|(_, k)| k.len() as u64).collect();
    let micro_batch = cfg.train.batch_size / cfg.train.accum_iter;
    let mut plan = RunPlan::new(
        shard_paths,
        &counts,
        cfg.seed,
        cfg.train.epochs,
        cfg.data.lanes,
        micro_batch,
    )?;
    plan.bad_per_epoch = found.total();
    Ok((plan, keys))
}

/// The record stages of a run: its `stages:` config and seed, reading the target
/// cache when it has one (the list every command runs, `stages::record`).
pub fn data_stages(cfg: &RunConfig, cache: Option<Arc<crate::cache::CachedTargets>>) -> anyhow::Result<Stages> {
    let stages = Stages::new(cfg.stages.clone(), cfg.seed).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(match cache {
        Some(cache) => stages.with_cache(cache),
        None => stages,
    })
}

/// [`data_stages`] for a command that shows or times the stages outside a run
/// (`stages dump`, `viz`, `bench data`): with a target cache, opened (and under
/// `on_miss: compute` filled) as a run opens it.
pub fn standalone_stages(cfg: &RunConfig) -> anyhow::Result<Stages> {
    data_stages(cfg, crate::cache::prepare_run(cfg, 1, &Counters::default(), None)?)
}

/// What the data side delivers to a trainer that never waits (`pipeline bench
/// data`'s graph figure): samples through the whole graph, sink included, on
/// this process of `cluster`.
pub struct DataThroughput {
    pub stage_rates: Vec<crate::metrics::StageRate>,
    /// Samples the sink assembled into batches (0 on a process without the sink).
    pub delivered: u64,
    pub seconds: f64,
    /// bincode bytes per record as the sink received it (what timely sends per
    /// record when the stage before the sink runs on another process), from
    /// the records sampled; 0 without the sink.
    pub wire_bytes_per_record: f64,
}

pub fn data_throughput(cfg: &RunConfig, cluster: &ClusterArgs, epochs: usize) -> anyhow::Result<DataThroughput> {
    let mut cfg = cfg.clone();
    cfg.train.epochs = epochs.max(1);
    let (counters, seconds) = run_data_graph(&cfg, cluster, None)?;
    let snapshot = counters.snapshot();
    let delivered = snapshot.stages[crate::metrics::Stage::Sink.index()][1];
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let sampled = load(&counters.wire_sampled);
    Ok(DataThroughput {
        stage_rates: crate::metrics::rates(&Default::default(), &snapshot, seconds, cluster.workers),
        delivered,
        seconds,
        wire_bytes_per_record: load(&counters.wire_bytes) as f64 / sampled.max(1) as f64,
    })
}

/// The graph of `cfg` on this process of `cluster`, every batch of its plan,
/// handed to `to_trainer` (dropped when `None`). Returns the counters and seconds.
fn run_data_graph(
    cfg: &RunConfig,
    cluster: &ClusterArgs,
    to_trainer: Option<crossbeam::channel::Sender<crate::graph::sink::ReadyBatch>>,
) -> anyhow::Result<(Arc<Counters>, f64)> {
    let timely_config = timely_config(cluster)?;
    if cluster.processes > 1 {
        exit_on_lost_peer(cluster.process);
    }
    let (plan, keys) = plan_run(cfg)?;
    let placement = Placement::resolve(&cfg.cluster, &cfg.placement, cluster.processes, cluster.workers)?;
    let counters = Arc::new(Counters::default());
    let cache = crate::cache::prepare_run(cfg, cluster.workers, &counters, Some(&keys))?;
    let ctx = Arc::new(GraphContext {
        stages: data_stages(cfg, cache)?,
        policy: cfg.data.on_error,
        shuffle_buffer: cfg.data.shuffle_buffer,
        placement,
        window: cfg.run.window,
        start_batch: 0,
        stop_batch: plan.total_batches(),
        plan,
        sink_shape: SinkShape::of(&cfg.stages),
        skips: Skips::default(),
        counters: counters.clone(),
        failure: Default::default(),
        recycler: Default::default(),
    });
    // `execute` returns once a cluster's connections are up: timed from there.
    let guards = timely::execute(timely_config, move |worker| {
        run_worker(worker, ctx.clone(), to_trainer.clone())
    })
    .map_err(|e| anyhow::anyhow!("starting timely: {e}"))?;
    let started = Instant::now();
    let results = guards.join();
    for result in results {
        result.map_err(|e| anyhow::anyhow!("a worker stopped: {e}"))??;
    }
    Ok((counters, started.elapsed().as_secs_f64()))
}

/// A data process resuming reads where the trainer will continue from the checkpoint's state.
fn resume_position(dir: &std::path::Path) -> anyhow::Result<u64> {
    let path = checkpoint_dir(dir).join(stages::train::checkpoint::STATE_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let state: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    state["data_position"]
        .as_u64()
        .with_context(|| format!("{}: no data_position", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::sink::assemble_batch;
    use shards::LaneReader;

    /// The digests of the batches the graph assembles on `workers` workers, in batch order.
    fn graph_digests(cfg: &RunConfig, workers: usize) -> Vec<(u64, String)> {
        let (tx, rx) = crossbeam::channel::unbounded();
        run_data_graph(cfg, &ClusterArgs::local(workers), Some(tx)).unwrap();
        let mut got: Vec<(u64, String)> = rx.iter().map(|b| (b.index, b.digest)).collect();
        got.sort();
        got
    }

    /// The same batches from a plain loop: each epoch's lanes read in order, the
    /// record stages run on one sample after another, a failing sample skipped.
    fn sequential_digests(cfg: &RunConfig, list: &Stages) -> Vec<(u64, String)> {
        let (plan, _) = plan_run(cfg).unwrap();
        let shape = SinkShape::of(&cfg.stages);
        let skips = Skips::quiet();
        let mut out = Vec::new();
        for epoch in 0..cfg.train.epochs as u64 {
            let epoch_plan = plan.epoch_plan(cfg.seed, epoch);
            let mut lanes: Vec<LaneReader> = (0..plan.lanes)
                .map(|lane| {
                    LaneReader::new(
                        &epoch_plan,
                        lane,
                        cfg.seed,
                        epoch,
                        cfg.data.shuffle_buffer,
                        cfg.data.on_error,
                        &skips,
                    )
                })
                .collect();
            for b in 0..plan.batches[epoch as usize] {
                let t = plan.offsets[epoch as usize] + b;
                let mut records = Vec::new();
                for lane in &mut lanes {
                    for item in lane.by_ref().take(plan.per_lane) {
                        let r = crate::graph::source_record(t, epoch, item.unwrap());
                        if let Ok(r) = list.run(r) {
                            records.push(r);
                        }
                    }
                }
                out.push((t, assemble_batch(t, epoch, records, &shape, None).unwrap().digest));
            }
        }
        out
    }

    /// Two epochs of the first three embedded shards (3,750 images) in 3 lanes of 8.
    fn embedded(sets: &[&str]) -> RunConfig {
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let text = std::fs::read_to_string(base.join("pretrain.yaml")).unwrap();
        let mut all: Vec<String> = [
            "data.train=['../shards/data/fashion-mnist/train-{000000..000002}.tar.zst']",
            "data.lanes=3",
            "train.batch_size=24",
            "train.epochs=2",
            "seed=7",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        all.extend(sets.iter().map(|s| s.to_string()));
        crate::config::parse(&text, &all, &base).unwrap()
    }

    fn check_graph_equals_loop(cfg: &RunConfig) {
        let cache = crate::cache::prepare_run(cfg, 1, &Counters::default(), None).unwrap();
        let cached = cache.is_some();
        let want = sequential_digests(cfg, &data_stages(cfg, cache).unwrap());
        assert_eq!(want.len() as u64, plan_run(cfg).unwrap().0.total_batches());
        for workers in [1, 3] {
            assert_eq!(graph_digests(cfg, workers), want, "{workers} workers, cached {cached}");
        }
    }

    /// The batches `pipeline run` assembles are, bit for bit (keys, views, u8
    /// pixels, x̂, masks, targets), those of a sequential loop over the same lanes
    /// and the same stage list.
    #[test]
    fn the_graph_assembles_the_batches_of_a_plain_loop() {
        check_graph_equals_loop(&embedded(&[]));
    }

    /// The same with a target cache: the graph feeds the cached view and reads its targets.
    #[test]
    fn with_a_target_cache_the_graph_assembles_the_batches_of_a_plain_loop() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = format!("stages.targets.cache={}", tmp.path().display());
        let cfg = embedded(&[&cache, "stages.targets.views=2"]);
        crate::cache::fill::fill(&cfg, &crate::cache::fill::FillOptions::local(1)).unwrap();
        check_graph_equals_loop(&cfg);
        // And the cache changed what was fed: the batches differ from the uncached run's.
        let uncached = embedded(&[]);
        let a = sequential_digests(&uncached, &data_stages(&uncached, None).unwrap());
        let b = graph_digests(&cfg, 1);
        assert!(a.iter().zip(&b).all(|(x, y)| x.1 != y.1));
    }
}
