//! `pipeline bench train`: ms per training step of the config's model on a
//! fixed synthetic batch (no data stages), one JSON line.

use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `pipeline bench train`.
#[derive(Debug, clap::Args)]
pub struct BenchTrainArgs {
    /// The run config (YAML): its `model:` and `train:` sections are measured.
    pub config: PathBuf,
    /// Override config values: `--set model.backbone.depth=12`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Images per step (default: the config's micro-batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
}

/// Run `pipeline bench train`.
pub fn run(args: &BenchTrainArgs) -> anyhow::Result<()> {
    let cfg = crate::config::load(&args.config, &args.set)?;
    let batch = args.batch.unwrap_or(cfg.train.batch_size / cfg.train.accum_iter);
    anyhow::ensure!(batch > 0, "--batch must be positive");
    let result = stages::train::bench::bench_train(
        &cfg.model,
        &cfg.train,
        &candle_core::Device::Cpu,
        batch,
        args.warmup,
        args.steps,
    )
    .context("benchmarking training steps")?;
    println!(
        "{}",
        serde_json::json!({"figure": "train_step", "device": "cpu", "result": result})
    );
    Ok(())
}
