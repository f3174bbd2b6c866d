//! `pipeline`: CrossMAE pre-training as a dataflow of streaming stages.
//!
//! `main` parses the command line and hands it to [`run_command`]: one match,
//! one module per subcommand. Errors are printed once, with their chain.

mod cache;
mod cluster;
mod commands;
mod config;
mod evaluate;
mod finetune;
mod graph;
mod job;
mod metrics;
mod placement;
mod plan;
mod plot;
mod trainer;

use commands::{
    ablation, bench_cache, bench_data, bench_train, check_ops, eval, export, precompute, shards as shards_cmd,
    stages_dump, viz,
};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// CrossMAE pre-training pipeline: shards -> decode -> augment -> mask -> smooth -> targets -> trainer.
#[derive(Debug, Parser)]
#[command(name = "pipeline", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pre-train: shards -> data stages -> trainer, as a timely dataflow.
    Run(job::RunArgs),
    /// Make and check WebDataset shards.
    Shards {
        #[command(subcommand)]
        command: shards_cmd::ShardsCommand,
    },
    /// Look at what the stages produce.
    Stages {
        #[command(subcommand)]
        command: StagesCommand,
    },
    /// Evaluate a checkpoint's backbone: linear probe or kNN top-1 of its frozen features, or an end-to-end fine-tune, as a JSON line.
    Eval {
        #[arg(value_enum)]
        method: eval::Method,
        #[command(flatten)]
        args: eval::EvalArgs,
    },
    /// Fill the target cache: every missing view's targets into the store.
    Precompute(precompute::PrecomputeArgs),
    /// Pre-train every config of a directory (the paper's Table 8 rows), N seeds each, and write a markdown table of linear-probe, kNN and fine-tune top-1 (mean ± std).
    Ablation(ablation::AblationArgs),
    /// Draw the paper's Figure 3: x, smoothed x̂, masked x_M and two drawings per image, as a PNG grid.
    Viz(viz::VizArgs),
    /// Write the backbone with timm's names (`--format timm`) as safetensors.
    Export(export::ExportArgs),
    /// Check every fused op on a device (a GPU) against the same op on the CPU: values and input gradients, one JSON line per op.
    CheckOps(check_ops::CheckOpsArgs),
    /// Measure throughput.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum StagesCommand {
    /// Write what the model would be fed, per sample, as .npy and .json files.
    Dump(stages_dump::DumpArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Images/s through each data stage and the whole chain.
    Data(bench_data::BenchDataArgs),
    /// Milliseconds per training step on a synthetic batch.
    Train(bench_train::BenchTrainArgs),
    /// Views/s read from the target cache into batches, and bytes per view.
    Cache(bench_cache::BenchCacheArgs),
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => job::run(&args),
        Command::Shards { command } => shards_cmd::run(command),
        Command::Precompute(args) => precompute::run(&args),
        Command::Eval { method, args } => eval::run(method, &args),
        Command::Ablation(args) => ablation::run(&args),
        Command::Viz(args) => viz::run(&args),
        Command::Export(args) => export::run(&args),
        Command::CheckOps(args) => check_ops::run(&args),
        Command::Stages {
            command: StagesCommand::Dump(args),
        } => stages_dump::run(&args),
        Command::Bench {
            command: BenchCommand::Data(args),
        } => bench_data::run(&args),
        Command::Bench {
            command: BenchCommand::Train(args),
        } => bench_train::run(&args),
        Command::Bench {
            command: BenchCommand::Cache(args),
        } => bench_cache::run(&args),
    }
}

/// Keep freed memory in the process. Each sample allocates a few buffers of
/// 0.2 to 1 MB (decoded region, normalized view, x̂), and a training step
/// allocates and frees tensors of up to 40 MB (a (64, 196, 768) f32 patch
/// tensor at 224 px) and a few hundred MB in all. glibc serves large blocks with
/// mmap and unmaps them on free, and it trims the heap top past its threshold,
/// so every such buffer paid page faults and kernel zeroing: 21% of the data
/// chain's time (`bench data --only chain`), and half the near-zero-FLOP
/// 224 px training step (`bench train`: 409-425 ms with these settings, 778-840
/// without, in one interleaved run).
/// - No mmap at all: glibc refuses an mmap threshold above 32 MiB (64 MiB was
///   silently ignored once, so the results are checked), and the step's
///   tensors are larger. Thread arenas still map blocks over their 64 MiB heap.
/// - Trim only past 2 GiB free at the top of the heap: a step frees more than
///   the old 256 MiB between its forward and its next upload.
///
/// jemalloc was tried: it zeroes a reused large block for calloc (candle's
/// `zeros`) with `madvise(DONTNEED)`, so the page faults stayed.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        let threshold = libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        let no_mmap = libc::mallopt(libc::M_MMAP_MAX, 0);
        let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, 2 << 30);
        if threshold != 1 || no_mmap != 1 || trim != 1 {
            eprintln!(
                "warning: mallopt refused the allocator settings \
                 (mmap threshold {threshold}, mmap max {no_mmap}, trim {trim})"
            );
        }
    }
}

/// The trainer's threads, for every command (`run`, `bench train`, ...), unless the
/// user set the variables: rayon, which runs our fused ops and the GEMM blocks,
/// gets every core; candle's own pool, which runs only its basic elementwise ops
/// now, gets none beyond the calling thread. That pool's workers spin for 25,000
/// pauses after each op, so with a pool of 2 they took a core from the GEMM that
/// followed: `bench train` on the tiny CPU shape (batch 64, 2 rayon threads), four
/// interleaved pairs, CANDLE_NUM_THREADS 1 / 2: median 629 / 632, 555 / 563,
/// 531 / 545, 637 / 574 ms, CPU time 2-5% lower with 1 in all four.
/// Called before any thread starts.
fn default_thread_counts() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (var, value) in [("RAYON_NUM_THREADS", cores), ("CANDLE_NUM_THREADS", 1)] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, value.to_string());
        }
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    default_thread_counts();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, not in log files and pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run_command(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A closed pipe (`pipeline shards inspect ... | head`) is not an error.
            if err.chain().any(|e| {
                e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {}", error_text(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `: `-joined as anyhow's `{:#}` does, but a cause
/// whose text the message before it already ends with is said once (our
/// `shards::Error::Io` names its path and its source, and is the source's
/// parent as well).
fn error_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.ends_with(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_already_in_its_parent_is_said_once() {
        let io = std::io::Error::other("HEAD failed after 6 retries: 501");
        let err = anyhow::Error::new(shards::Error::io("gs://b/spec.json", io)).context("stages.targets.cache gs://b");
        assert_eq!(
            super::error_text(&err),
            "stages.targets.cache gs://b: gs://b/spec.json: HEAD failed after 6 retries: 501"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_text(&plain), "outer: inner");
    }
}
