//! `pipeline`: CrossMAE pre-training as a dataflow of streaming stages.
//!
//! `main` parses the command line and hands it to [`run_command`]: one match,
//! one module per subcommand. Errors are printed once, with their chain.

mod bench_data;
mod bench_train;
mod config;
mod graph;
mod metrics;
mod placement;
mod plan;
mod plot;
mod record;
mod run;
mod shards_cmd;
mod sink;
mod stages_dump;
mod trainer;

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
    Run(run::RunArgs),
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
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Shards { command } => shards_cmd::run(command),
        Command::Stages {
            command: StagesCommand::Dump(args),
        } => stages_dump::run(&args),
        Command::Bench {
            command: BenchCommand::Data(args),
        } => bench_data::run(&args),
        Command::Bench {
            command: BenchCommand::Train(args),
        } => bench_train::run(&args),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
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
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
