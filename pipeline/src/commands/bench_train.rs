//! `pipeline bench train`: ms per training step of the config's model on a
//! fixed synthetic batch (no data stages), images/s and model FLOP utilization,
//! one JSON line. The device and precision are the config's `train.device` and
//! `train.precision` (`--set train.device=cuda:0 --set train.precision=bf16`).

use std::path::PathBuf;

use anyhow::Context;
use stages::model::autocast::Precision;
use stages::train::device::DeviceSpec;

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
    /// The device's peak for the model FLOP utilization, TFLOP/s. Default on CUDA: an
    /// H100 SXM's dense peak for the precision (bf16 989, tf32 494, f32 67); on the CPU none.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
}

/// The default peak of a CUDA device for `precision`: H100 SXM (also H200) dense figures.
pub fn default_peak_tflops(device: DeviceSpec, precision: Precision) -> Option<f64> {
    match (device, precision) {
        (DeviceSpec::Cpu, _) => None,
        (DeviceSpec::Cuda(_), Precision::Bf16) => Some(989.0),
        (DeviceSpec::Cuda(_), Precision::Tf32) => Some(494.0),
        (DeviceSpec::Cuda(_), Precision::F32) => Some(67.0),
    }
}

/// Run `pipeline bench train`.
pub fn run(args: &BenchTrainArgs) -> anyhow::Result<()> {
    let cfg = crate::config::load(&args.config, &args.set)?;
    let batch = args.batch.unwrap_or(cfg.train.batch_size / cfg.train.accum_iter);
    anyhow::ensure!(batch > 0, "--batch must be positive");
    anyhow::ensure!(
        args.peak_tflops.is_none_or(|p| p > 0.0),
        "--peak-tflops must be positive"
    );
    let spec = DeviceSpec::parse(&cfg.train.device).map_err(anyhow::Error::msg)?;
    let device = spec.open().context("opening the training device")?;
    let peak = args.peak_tflops.or(default_peak_tflops(spec, cfg.train.precision));
    let result =
        stages::train::bench::bench_train(&cfg.model, &cfg.train, &device, batch, args.warmup, args.steps, peak)
            .with_context(|| format!("benchmarking training steps at batch {batch} on {}", spec.name()))?;
    println!(
        "{}",
        serde_json::json!({
            "figure": "train_step", "device": spec.name(), "precision": cfg.train.precision,
            "config": args.config, "set": args.set, "result": result,
        })
    );
    Ok(())
}
