//! Training-step benchmark on synthetic batches (for `pipeline bench train`).
//!
//! Times complete steps (inputs to the device, forward, backward, AdamW, EMA)
//! of a [`Trainer`] fed one fixed synthetic batch, so the data stages do not count.
//! Model FLOP utilization = the step's matrix-product FLOPs ([`step_flops`]) per
//! second over the device's peak.

use super::{Batch, TrainConfig, TrainError, Trainer, U8Pixels};
use crate::model::flops::{step_flops, StepFlops};
use crate::model::ModelConfig;
use candle_core::Device;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

/// One benchmark result (one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub batch: usize,
    pub steps: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub images_per_s: f64,
    /// Process CPU time per step (all threads; Linux only), a load-independent figure.
    pub cpu_ms: Option<f64>,
    pub threads: usize,
    /// Matrix-product FLOPs per image of one step (see `model::flops`).
    pub flops: StepFlops,
    /// Achieved TFLOP/s at the median step time.
    pub tflops: f64,
    /// The peak the utilization is taken against, TFLOP/s.
    pub peak_tflops: Option<f64>,
    /// Model FLOP utilization: `tflops / peak_tflops`.
    pub mfu: Option<f64>,
    /// Where a step's time goes: ms per step in each phase (upload, inputs, forward,
    /// backward, accumulate, grad_norm, adamw, ema), from extra steps that wait for
    /// the device after every phase. Their sum exceeds `median_ms` by the lost overlap.
    pub phases_ms: Vec<(String, f64)>,
}

/// User + system CPU time of this process in ms, from `/proc/self/stat` (Linux).
pub fn process_cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the ")" that closes the command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks * 10.0) // USER_HZ is 100 on Linux
}

/// A batch of `b` random images, 75% masked, random targets. The images and x̂
/// are u8, as the sink sends them (normalized on the device).
pub fn synthetic_batch(cfg: &ModelConfig, b: usize, seed: u64) -> Batch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v = &cfg.backbone;
    let (px, n) = (v.in_chans * v.img_size * v.img_size, v.num_patches());
    let images: Vec<u8> = (0..b * px).map(|_| rng.random()).collect();
    let mask = (0..b * n).map(|_| rng.random_bool(0.75) as u8).collect();
    let targets = (0..b * n * cfg.target_dim)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Batch {
        keys: (0..b).map(|i| format!("bench-{i}")).collect(),
        epoch: 0,
        images: vec![],
        shape: [b, v.in_chans, v.img_size, v.img_size],
        mask,
        smoothed: None,
        targets: Some(targets),
        pixels: Some(U8Pixels {
            smoothed: Some(images.iter().map(|&x| x / 2 + 64).collect()),
            images,
            mean: vec![0.5; v.in_chans],
            std: vec![0.25; v.in_chans],
        }),
    }
}

/// Runs `warmup` untimed and `steps` timed training steps at batch `b`.
pub fn bench_train(
    model: &ModelConfig,
    train: &TrainConfig,
    device: &Device,
    b: usize,
    warmup: usize,
    steps: usize,
    peak_tflops: Option<f64>,
) -> Result<BenchResult, TrainError> {
    let train = TrainConfig {
        batch_size: b,
        accum_iter: 1,
        ..train.clone()
    };
    let mut trainer = Trainer::new(model, &train, device, 0, 1000)?;
    let batch = synthetic_batch(model, b, 0);
    for _ in 0..warmup {
        trainer.step(&batch)?;
    }
    let mut ms = Vec::with_capacity(steps);
    let cpu0 = process_cpu_ms();
    for _ in 0..steps.max(1) {
        let t0 = Instant::now();
        trainer.step(&batch)?;
        device.synchronize()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let cpu_ms = match (cpu0, process_cpu_ms()) {
        (Some(a), Some(b)) => Some((b - a) / ms.len() as f64),
        _ => None,
    };
    let phase_steps = steps.clamp(1, 3);
    trainer.time_phases(true);
    for _ in 0..phase_steps {
        trainer.step(&batch)?;
    }
    let phases_ms = trainer
        .phase_ms()
        .iter()
        .map(|&(phase, total)| (phase.to_string(), total / phase_steps as f64))
        .collect();
    ms.sort_by(f64::total_cmp);
    let median_ms = ms[ms.len() / 2];
    let flops = step_flops(model);
    let tflops = (flops.train_step * b as u64) as f64 / (median_ms / 1e3) / 1e12;
    Ok(BenchResult {
        batch: b,
        steps: ms.len(),
        median_ms,
        min_ms: ms[0],
        images_per_s: b as f64 / (median_ms / 1e3),
        cpu_ms,
        threads: candle_core::utils::get_num_threads(),
        flops,
        tflops,
        peak_tflops,
        mfu: peak_tflops.map(|p| tflops / p),
        phases_ms,
    })
}
