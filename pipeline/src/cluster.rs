//! Starting and joining timely workers: where this process stands in the
//! cluster (`--workers`, `--processes`, `--process`, `--hostfile`), timely's
//! config from it, what a lost peer does to the others, and the thread budget
//! the log reports.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

/// Where this process stands in the cluster (`pipeline run` and `pipeline precompute`).
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Worker threads per process.
    #[arg(long, short = 'w', default_value_t = 1)]
    pub workers: usize,
    /// Processes in the cluster.
    #[arg(long, short = 'n', default_value_t = 1)]
    pub processes: usize,
    /// This process's index (0-based).
    #[arg(long, short = 'p', default_value_t = 0)]
    pub process: usize,
    /// One `host:port` per line, a line per process.
    #[arg(long, short = 'H')]
    pub hostfile: Option<PathBuf>,
}

impl ClusterArgs {
    /// One process of `workers` workers.
    pub fn local(workers: usize) -> ClusterArgs {
        ClusterArgs {
            workers,
            processes: 1,
            process: 0,
            hostfile: None,
        }
    }
}

pub fn timely_config(args: &ClusterArgs) -> anyhow::Result<timely::Config> {
    if args.workers == 0 || args.processes == 0 || args.process >= args.processes {
        bail!("--workers and --processes must be positive and --process below --processes");
    }
    if args.processes == 1 {
        return Ok(timely::Config::process(args.workers));
    }
    let hostfile = args
        .hostfile
        .as_ref()
        .context("--processes > 1 needs --hostfile (one host:port per process)")?;
    let text = std::fs::read_to_string(hostfile).with_context(|| format!("reading {}", hostfile.display()))?;
    let addresses: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if addresses.len() != args.processes {
        bail!(
            "{}: {} addresses for {} processes",
            hostfile.display(),
            addresses.len(),
            args.processes
        );
    }
    Ok(timely::Config {
        communication: timely::CommunicationConfig::Cluster {
            threads: args.workers,
            process: args.process,
            addresses,
            report: false,
            zerocopy: false,
        },
        worker: timely::WorkerConfig::default(),
    })
}

/// When a process of the cluster dies, timely's network threads panic
/// ("timely communication error: ... socket closed") and the panic cascades
/// through the workers. Turn the first such panic into one clear message and
/// a non-zero exit, at once, rather than a page of backtraces or a hang.
pub fn exit_on_lost_peer(process: usize) {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("timely communication error") || message.contains("MergeQueue poisoned") {
            eprintln!(
                "error: process {process} lost its connection to the cluster ({message}): another process stopped or died.\n\
                 Rerun every process with --resume RUN_DIR to continue from the last checkpoint."
            );
            std::process::exit(2);
        }
        default_hook(info);
    }));
}

/// Logs the thread budget of a process: its timely workers run the data stages,
/// and the trainer's rayon pool gets every core (`default_thread_counts` in
/// main.rs). The data stages run at most `run.window` batches ahead and then wait
/// on the trainer, so they leave their cores idle most of the time: giving the
/// trainer only the cores left over (1 of 2 here) made the embedded default train
/// 1.4x slower (`pipeline run configs/pretrain.yaml --set train.epochs=1`: 36.1 /
/// 35.4 s against 26.3 / 25.2 s, interleaved, data wait 1%).
pub fn log_thread_budget(workers: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    tracing::info!(
        "{cores} cores: {workers} timely worker(s); trainer threads RAYON_NUM_THREADS={}, CANDLE_NUM_THREADS={}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
        std::env::var("CANDLE_NUM_THREADS").unwrap_or_default()
    );
}
