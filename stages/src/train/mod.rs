//! Training: optimizer, schedule, EMA, checkpoints, and the step that ties them.
//!
//! Like MAE's `engine_pretrain.py`, the loop lives apart from the model:
//! [`Trainer::step`] takes one (micro-)batch of plain vectors, runs the forward
//! pass and backward, accumulates gradients over `train.accum_iter` batches, and
//! then clips (optionally), sets the per-iteration lr and makes one AdamW update
//! and one EMA update. A non-finite loss is an error naming the step; nothing is
//! updated and no checkpoint is written, so the last good one stays.
//!
//! ```
//! use stages::model::ModelConfig;
//! use stages::train::{Batch, TrainConfig, Trainer};
//! let mut model = ModelConfig::default();
//! model.backbone.depth = 1; // keep the doc test quick
//! let train = TrainConfig { batch_size: 2, epochs: 1, warmup_epochs: 0.0, ..TrainConfig::default() };
//! let mut trainer = Trainer::new(&model, &train, &candle_core::Device::Cpu, 7, 10)?;
//! let (n, px) = (49, 28 * 28);
//! let batch = Batch {
//!     keys: vec!["a".into(), "b".into()],
//!     epoch: 0,
//!     images: vec![0.5; 2 * px],
//!     shape: [2, 1, 28, 28],
//!     mask: (0..2 * n).map(|i| (i % 4 != 0) as u8).collect(),
//!     smoothed: Some(vec![0.5; 2 * px]),
//!     targets: Some(vec![1.0; 2 * n * 36]),
//!     pixels: None,
//! };
//! let stats = trainer.step(&batch)?;
//! assert!(stats.loss.is_finite() && stats.updated);
//! # Ok::<(), stages::train::TrainError>(())
//! ```

pub mod bench;
pub mod checkpoint;
pub mod device;
pub mod ema;
pub mod feed;
pub mod optim;
pub mod schedule;

use crate::model::autocast::{self, Precision};
use crate::model::{init_weights, CrossMae, DrawMode, Inputs, ModelConfig, TargetSource};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ema::Ema;
pub use feed::{U8Pixels, Uploaded, Uploader};
use optim::{AdamW, AdamWParams};
use schedule::{ema_momentum, Schedule};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The `train:` section of a run config. Defaults: the paper's recipe (Table 16).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Images per optimizer step (all accumulated micro-batches together); sets lr.
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step (MAE's `accum_iter`).
    pub accum_iter: usize,
    pub epochs: usize,
    /// Linear warmup length, in epochs (fractions allowed).
    pub warmup_epochs: f64,
    /// Base lr: lr = blr * batch_size / 256 (MAE).
    pub blr: f64,
    /// Absolute lr; overrides `blr` when set.
    pub lr: Option<f64>,
    /// The cosine ends here.
    pub min_lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Clip the global gradient norm to this (none by default, as MAE).
    pub clip_grad: Option<f64>,
    /// EMA target: momentum at step 0 (cosine to 1 at the end).
    pub ema_momentum: f64,
    /// Where to train: `cpu`, `cuda` or `cuda:N` (CUDA needs a `--features cuda` build).
    pub device: String,
    /// Matrix products in `f32`, `tf32` (CUDA tensor cores) or `bf16` (f32 master weights
    /// and optimizer state either way; see `model::autocast`).
    pub precision: Precision,
    /// Also write the checkpoint every this many optimizer steps, besides each
    /// epoch's end, so a killed run loses at most that many (`--resume` continues
    /// at the exact data position). Not part of the config hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<u64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 512,
            accum_iter: 1,
            epochs: 300,
            warmup_epochs: 20.0,
            blr: 1.5e-4,
            lr: None,
            min_lr: 0.0,
            weight_decay: 0.05,
            betas: [0.9, 0.95],
            eps: 1e-8,
            clip_grad: None,
            ema_momentum: 0.996,
            device: "cpu".into(),
            precision: Precision::F32,
            checkpoint_every: None,
        }
    }
}

impl TrainConfig {
    /// The peak lr: `lr`, or `blr * batch_size / 256`.
    pub fn peak_lr(&self) -> f64 {
        self.lr.unwrap_or(self.blr * self.batch_size as f64 / 256.0)
    }

    /// Rejects values that cannot train, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.checkpoint_every == Some(0) {
            return Err("train.checkpoint_every is 0: give a step count of at least 1, or leave it out".into());
        }
        if self.epochs == 0 {
            return Err("train.epochs is 0: a run must train at least 1 epoch".into());
        }
        if !(self.warmup_epochs >= 0.0 && self.warmup_epochs.is_finite()) {
            return Err(format!("train.warmup_epochs {} must be 0 or more", self.warmup_epochs));
        }
        if self.batch_size == 0 || self.accum_iter == 0 {
            return Err("train.batch_size and train.accum_iter must be positive".into());
        }
        if self.batch_size % self.accum_iter != 0 {
            return Err(format!(
                "train.batch_size {} is not divisible by train.accum_iter {}",
                self.batch_size, self.accum_iter
            ));
        }
        if !(self.peak_lr() > 0.0 && self.peak_lr().is_finite()) {
            return Err(format!(
                "train.blr / train.lr give lr {}, which must be positive",
                self.peak_lr()
            ));
        }
        if !(0.0..1.0).contains(&self.betas[0]) || !(0.0..1.0).contains(&self.betas[1]) {
            return Err(format!("train.betas {:?} must lie in [0, 1)", self.betas));
        }
        if !(0.0..=1.0).contains(&self.ema_momentum) {
            return Err(format!("train.ema_momentum {} must lie in [0, 1]", self.ema_momentum));
        }
        if self.clip_grad.is_some_and(|c| c.is_nan() || c <= 0.0) {
            return Err("train.clip_grad must be positive".into());
        }
        if self.warmup_epochs.is_nan() || self.warmup_epochs < 0.0 {
            return Err("train.warmup_epochs must be >= 0".into());
        }
        device::DeviceSpec::parse(&self.device)?;
        Ok(())
    }
}

/// Training errors. Each names what failed: the config key, the step, the file.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config: {0}")]
    Config(String),
    #[error("batch {position}: {msg}")]
    Batch { position: u64, msg: String },
    #[error("non-finite {what} {value} at step {step} (batch {position}); stopping, the last good checkpoint is kept")]
    NonFinite {
        what: &'static str,
        value: f64,
        step: u64,
        position: u64,
    },
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// One (micro-)batch as the data stages produce it: plain vectors, row-major.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Sample keys (B); noise z is drawn from `stage_rng(run_seed, epoch, key, "noise")`.
    pub keys: Vec<String>,
    pub epoch: u64,
    /// Normalized images, shape `shape` = (B, C, H, W); empty when `pixels` holds them.
    pub images: Vec<f32>,
    pub shape: [usize; 4],
    /// (B, N), 1 = removed.
    pub mask: Vec<u8>,
    /// x̂, (B, C, H, W); needed by `draw.mode: coarse`.
    pub smoothed: Option<Vec<f32>>,
    /// F(x), (B, N, D_t); needed by `target: batch`.
    pub targets: Option<Vec<f32>>,
    /// The images (and x̂) as u8, normalized on the device; replaces `images` (and `smoothed`).
    pub pixels: Option<U8Pixels>,
}

impl Batch {
    /// Checks every length against the model config.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<(), String> {
        let [b, c, h, w] = self.shape;
        let v = &cfg.backbone;
        if [c, h, w] != [v.in_chans, v.img_size, v.img_size] {
            return Err(format!(
                "images are {b} x {c} x {h} x {w}, the model takes B x {} x {} x {}",
                v.in_chans, v.img_size, v.img_size
            ));
        }
        if b == 0 || self.keys.len() != b {
            return Err(format!("{} keys for {b} images", self.keys.len()));
        }
        let check = |what: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(format!("{what} has {got} values, expected {want}"))
            }
        };
        check("mask", self.mask.len(), b * v.num_patches())?;
        let coarse = cfg.draw.mode == DrawMode::Coarse;
        match &self.pixels {
            Some(px) => {
                check("u8 images", px.images.len(), b * c * h * w)?;
                check("normalization mean", px.mean.len(), c)?;
                check("normalization std", px.std.len(), c)?;
                match (&px.smoothed, &self.smoothed) {
                    (Some(s), _) if coarse => check("u8 smoothed", s.len(), b * c * h * w)?,
                    (None, Some(s)) if coarse => check("smoothed", s.len(), b * c * h * w)?,
                    (None, None) if coarse => return Err("draw.mode coarse needs the smoothed image".into()),
                    _ => {}
                }
            }
            None => {
                check("images", self.images.len(), b * c * h * w)?;
                if coarse {
                    let s = self
                        .smoothed
                        .as_ref()
                        .ok_or("draw.mode coarse needs the smoothed image")?;
                    check("smoothed", s.len(), b * c * h * w)?;
                }
            }
        }
        if cfg.target == TargetSource::Batch {
            let t = self.targets.as_ref().ok_or("target: batch needs per-patch targets")?;
            check("targets", t.len(), b * v.num_patches() * cfg.target_dim)?;
        }
        Ok(())
    }
}

/// What one call of [`Trainer::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Optimizer steps done after this call.
    pub step: u64,
    pub loss: f64,
    pub loss_draw: f64,
    pub loss_pred: f64,
    /// The lr of the update (of the next update while accumulating).
    pub lr: f64,
    /// Global gradient norm before clipping; 0 while accumulating.
    pub grad_norm: f64,
    /// Whether an optimizer update happened (false mid-accumulation).
    pub updated: bool,
}

/// Owns the model, its optimizer, EMA and schedule.
pub struct Trainer {
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    device: Device,
    run_seed: u64,
    varmap: VarMap,
    model: CrossMae,
    ema: Option<Ema>,
    optim: AdamW,
    schedule: Schedule,
    /// Gradients summed over the micro-batches of the current step.
    accum: HashMap<String, Tensor>,
    micro: usize,
    position: u64,
    epoch: u64,
    last_loss: Option<f64>,
    /// When set, each step waits for the device after each phase and adds its
    /// time here (`bench train`'s phase breakdown; off in training).
    phase_ms: Option<Vec<(&'static str, f64)>>,
    phase_clock: Option<std::time::Instant>,
}

impl Trainer {
    /// Validates both configs, builds and initializes the model from `run_seed`.
    /// `steps_per_epoch`: optimizer steps per epoch (for warmup and cosine).
    pub fn new(
        model_cfg: &ModelConfig,
        train_cfg: &TrainConfig,
        device: &Device,
        run_seed: u64,
        steps_per_epoch: u64,
    ) -> Result<Self, TrainError> {
        model_cfg.validate().map_err(TrainError::Config)?;
        train_cfg.validate().map_err(TrainError::Config)?;
        if device.is_cuda() {
            train_cfg.precision.configure_cuda();
        }
        if steps_per_epoch == 0 {
            return Err(TrainError::Config(
                "steps per epoch must be positive (is the dataset empty?)".into(),
            ));
        }
        let varmap = VarMap::new();
        let model = CrossMae::new(model_cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        init_weights(&varmap, &mut shards::rng::stage_rng(run_seed, 0, "model", "init"))?;
        let ema = match model_cfg.target {
            TargetSource::Ema => Some(Ema::new(&model_cfg.backbone, &varmap, "backbone.", device)?),
            TargetSource::Batch => None,
        };
        let params = AdamWParams {
            beta1: train_cfg.betas[0],
            beta2: train_cfg.betas[1],
            eps: train_cfg.eps,
            weight_decay: train_cfg.weight_decay,
        };
        let optim = AdamW::new(crate::model::named_vars(&varmap)?, params)?;
        let schedule = Schedule {
            base_lr: train_cfg.peak_lr(),
            min_lr: train_cfg.min_lr,
            warmup_steps: (train_cfg.warmup_epochs * steps_per_epoch as f64).round() as u64,
            total_steps: train_cfg.epochs as u64 * steps_per_epoch,
        };
        Ok(Self {
            model_cfg: model_cfg.clone(),
            train_cfg: train_cfg.clone(),
            device: device.clone(),
            run_seed,
            varmap,
            model,
            ema,
            optim,
            schedule,
            accum: HashMap::new(),
            micro: 0,
            position: 0,
            epoch: 0,
            last_loss: None,
            phase_ms: None,
            phase_clock: None,
        })
    }

    /// Times the phases of each step (see [`Trainer::phase_ms`]). Every phase then
    /// ends with a device synchronization, so steps get slower: for diagnosis only.
    pub fn time_phases(&mut self, on: bool) {
        self.phase_ms = on.then(Vec::new);
    }

    /// Milliseconds spent in each phase of the steps since [`Trainer::time_phases`],
    /// in the order the phases run.
    pub fn phase_ms(&self) -> &[(&'static str, f64)] {
        self.phase_ms.as_deref().unwrap_or(&[])
    }

    /// Ends the current phase (when timing phases): waits for the device, adds the
    /// time since the previous mark to `phase`.
    fn mark(&mut self, phase: &'static str) -> Result<(), TrainError> {
        let Some(times) = self.phase_ms.as_mut() else {
            return Ok(());
        };
        self.device.synchronize()?;
        let now = std::time::Instant::now();
        // "start" only sets the clock: the time between steps is not a phase.
        if let Some(t0) = self.phase_clock.replace(now).filter(|_| phase != "start") {
            let ms = (now - t0).as_secs_f64() * 1e3;
            match times.iter_mut().find(|(p, _)| *p == phase) {
                Some((_, total)) => *total += ms,
                None => times.push((phase, ms)),
            }
        }
        Ok(())
    }

    pub fn model(&self) -> &CrossMae {
        &self.model
    }

    /// Where the parameters live (names as in the checkpoint).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Optimizer steps done.
    pub fn steps(&self) -> u64 {
        self.optim.steps()
    }

    /// Batches consumed = the global index of the next batch.
    pub fn data_position(&self) -> u64 {
        self.position
    }

    /// The trainable parameters by name, sorted.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.optim
            .vars()
            .map(|(n, v)| (n.to_string(), v.as_tensor().clone()))
            .collect()
    }

    /// The backbone with timm names (no prefix, `pos_embed` included), for export.
    pub fn backbone_tensors(&self) -> HashMap<String, Tensor> {
        let mut out: HashMap<String, Tensor> = self
            .parameters()
            .into_iter()
            .filter_map(|(n, t)| n.strip_prefix("backbone.").map(|s| (s.to_string(), t)))
            .collect();
        out.insert("pos_embed".into(), self.model.backbone.pos_embed().clone());
        out
    }

    /// Copies batches to this trainer's device; can run on another thread (prefetch).
    pub fn uploader(&self) -> Uploader {
        Uploader {
            model_cfg: self.model_cfg.clone(),
            device: self.device.clone(),
            run_seed: self.run_seed,
            noise_dim: self.model.noise_dim(),
            batch_targets: self.ema.is_none(),
        }
    }

    /// z for each sample: D_h draws of N(0, 1) from `stage_rng(run_seed, epoch, key, "noise")`.
    pub fn noise(&self, keys: &[String], epoch: u64) -> Result<Option<Tensor>, TrainError> {
        self.uploader().noise(keys, epoch)
    }

    /// The batch as model inputs on the device (EMA targets computed here).
    pub fn inputs(&self, batch: &Batch) -> Result<Inputs, TrainError> {
        let _precision = autocast::scoped(self.train_cfg.precision);
        let _ops = crate::model::ops::scoped_reference(self.model_cfg.reference_ops);
        self.inputs_from(self.uploader().upload(batch, self.position)?)
    }

    /// Model inputs from an uploaded batch: the EMA targets are computed here.
    fn inputs_from(&self, up: Uploaded) -> Result<Inputs, TrainError> {
        let targets = match (&self.ema, up.targets) {
            (Some(ema), _) => ema.targets(&up.images)?,
            (None, Some(t)) => t,
            (None, None) => {
                return Err(TrainError::Batch {
                    position: self.position,
                    msg: "no per-patch targets".into(),
                })
            }
        };
        Ok(Inputs {
            images: up.images,
            smoothed: up.smoothed,
            mask: up.mask,
            targets,
            noise: up.noise,
        })
    }

    /// Forward, backward, and (every `accum_iter` calls) one optimizer update.
    pub fn step(&mut self, batch: &Batch) -> Result<StepStats, TrainError> {
        self.mark("start")?;
        let up = self.uploader().upload(batch, self.position)?;
        self.mark("upload")?;
        self.step_uploaded(up)
    }

    /// [`Trainer::step`] on a batch already on the device (see [`Uploader`]).
    pub fn step_uploaded(&mut self, up: Uploaded) -> Result<StepStats, TrainError> {
        let _precision = autocast::scoped(self.train_cfg.precision);
        let _ops = crate::model::ops::scoped_reference(self.model_cfg.reference_ops);
        let step = self.optim.steps();
        let epoch = up.epoch;
        self.mark("start")?;
        let inputs = self.inputs_from(up)?;
        self.mark("inputs")?;
        let losses = self.model.forward(&inputs)?;
        self.mark("forward")?;
        let loss = losses.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss.is_finite() {
            return Err(TrainError::NonFinite {
                what: "loss",
                value: loss,
                step,
                position: self.position,
            });
        }
        let grads = (losses.loss / self.train_cfg.accum_iter as f64)?.backward()?;
        self.mark("backward")?;
        for (name, var) in self.optim.vars() {
            if let Some(g) = grads.get(var) {
                let sum = match self.accum.remove(name) {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                };
                self.accum.insert(name.to_string(), sum);
            }
        }
        self.micro += 1;
        self.position += 1;
        self.epoch = epoch;
        self.last_loss = Some(loss);
        let mut stats = StepStats {
            step,
            loss,
            loss_draw: losses.loss_draw.to_dtype(DType::F64)?.to_scalar()?,
            loss_pred: losses.loss_pred.to_dtype(DType::F64)?.to_scalar()?,
            lr: self.schedule.lr(step),
            grad_norm: 0.0,
            updated: false,
        };
        if self.micro < self.train_cfg.accum_iter {
            return Ok(stats);
        }
        let mut grads = std::mem::take(&mut self.accum);
        self.micro = 0;
        self.mark("accumulate")?;
        let norm = global_norm(&grads, self.optim.names())?;
        if !norm.is_finite() {
            return Err(TrainError::NonFinite {
                what: "gradient norm",
                value: norm,
                step,
                position: self.position,
            });
        }
        if let Some(max) = self.train_cfg.clip_grad {
            clip(&mut grads, norm, max)?;
        }
        self.mark("grad_norm")?;
        self.optim.step(&grads, stats.lr)?;
        self.mark("adamw")?;
        if let Some(ema) = &self.ema {
            ema.update(ema_momentum(
                self.train_cfg.ema_momentum,
                step,
                self.schedule.total_steps,
            ))?;
            self.mark("ema")?;
        }
        stats.step = self.optim.steps();
        stats.grad_norm = norm;
        stats.updated = true;
        Ok(stats)
    }

    /// The hash that ties a checkpoint to these configs. Device and precision say how
    /// to compute, not what: a run may resume on another device or precision.
    pub fn config_hash(&self) -> String {
        let train = TrainConfig {
            device: TrainConfig::default().device,
            precision: Precision::default(),
            checkpoint_every: None,
            ..self.train_cfg.clone()
        };
        let model = ModelConfig {
            reference_ops: false,
            ..self.model_cfg.clone()
        };
        checkpoint::config_hash(&(&model, &train))
    }

    /// Writes a checkpoint to `dir` atomically. Only between optimizer steps.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        if self.micro != 0 {
            return Err(TrainError::Checkpoint {
                path: dir.to_path_buf(),
                msg: format!(
                    "cannot save in the middle of gradient accumulation ({} of {})",
                    self.micro, self.train_cfg.accum_iter
                ),
            });
        }
        let mut model: HashMap<String, Tensor> = self.parameters().into_iter().collect();
        model.insert("backbone.pos_embed".into(), self.model.backbone.pos_embed().clone());
        if let Some(ema) = &self.ema {
            model.extend(ema.tensors().into_iter().map(|(k, v)| (format!("ema.{k}"), v)));
        }
        let state = checkpoint::TrainState {
            version: 1,
            step: self.optim.steps(),
            epoch: self.epoch,
            data_position: self.position,
            run_seed: self.run_seed,
            config_hash: self.config_hash(),
            last_loss: self.last_loss,
        };
        checkpoint::save(dir, &model, &self.optim.state_tensors(), &state)
    }

    /// Continues from the checkpoint at `dir`: parameters, EMA, moments, step,
    /// epoch and data position. The configs and run seed must be the ones saved.
    pub fn resume(&mut self, dir: &Path) -> Result<checkpoint::TrainState, TrainError> {
        let loaded = checkpoint::load(dir, &self.device)?;
        let state = loaded.state;
        let err = |msg: String| TrainError::Checkpoint {
            path: dir.to_path_buf(),
            msg,
        };
        if state.config_hash != self.config_hash() {
            return Err(err(format!(
                "saved with another model/train config (hash {}, this run {}); resume with the run's own config",
                state.config_hash,
                self.config_hash()
            )));
        }
        if state.run_seed != self.run_seed {
            return Err(err(format!(
                "saved with run seed {}, this run has {}",
                state.run_seed, self.run_seed
            )));
        }
        for (name, var) in self.optim.vars() {
            let t = loaded
                .model
                .get(name)
                .ok_or_else(|| err(format!("{} lacks parameter {name}", checkpoint::MODEL_FILE)))?;
            if t.dims() != var.dims() {
                return Err(err(format!(
                    "{name}: shape {:?} in the checkpoint, {:?} in the model",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        if let Some(ema) = &self.ema {
            ema.load(&loaded.model, "ema.").map_err(|e| err(e.to_string()))?;
        }
        self.optim
            .load_state(&loaded.optim, state.step)
            .map_err(|e| err(e.to_string()))?;
        self.accum.clear();
        self.micro = 0;
        self.position = state.data_position;
        self.epoch = state.epoch;
        self.last_loss = state.last_loss;
        Ok(state)
    }
}

/// sqrt of the sum of squares of every gradient, summed in `order` (deterministic).
///
/// On the CPU one pass per gradient ([`sum_of_squares`]); elsewhere, or with
/// `model.reference_ops`, candle's basic ops ([`global_norm_reference`]). The two
/// sum in different orders (f64 chunks here, f32 per tensor there), so they agree
/// to rounding, not in every bit.
pub fn global_norm<'a>(
    grads: &HashMap<String, Tensor>,
    order: impl Iterator<Item = &'a str>,
) -> Result<f64, TrainError> {
    let grads: Vec<&Tensor> = order.filter_map(|name| grads.get(name)).collect();
    let fused = !crate::model::ops::reference() && grads.iter().all(|g| g.device().is_cpu() && g.dtype() == DType::F32);
    if !fused {
        return global_norm_reference(&grads);
    }
    let mut total = 0f64;
    for g in grads {
        total += crate::model::ops::with_slices([g], "gradient norm", |[x]| Ok(sum_of_squares(x)))?;
    }
    Ok(total.sqrt())
}

/// The sum of `x[i]^2` in f64: fixed chunks (so the bits do not depend on the thread
/// count), eight independent lanes per chunk (so it vectorizes), chunks added in order.
pub fn sum_of_squares(x: &[f32]) -> f64 {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let partials: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|chunk| {
            let mut lanes = [0f64; 8];
            let mut rows = chunk.chunks_exact(8);
            for row in &mut rows {
                for (l, v) in lanes.iter_mut().zip(row) {
                    *l += (*v as f64) * (*v as f64);
                }
            }
            for (l, v) in lanes.iter_mut().zip(rows.remainder()) {
                *l += (*v as f64) * (*v as f64);
            }
            lanes.iter().sum::<f64>()
        })
        .collect();
    partials.iter().sum()
}

/// [`global_norm`] from candle's basic ops, on any device. Summed on the device and
/// read once: on a GPU each read waits for the queue to drain.
pub fn global_norm_reference(grads: &[&Tensor]) -> Result<f64, TrainError> {
    let squares = grads
        .iter()
        .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64))
        .collect::<candle_core::Result<Vec<Tensor>>>()?;
    if squares.is_empty() {
        return Ok(0.0);
    }
    let total = Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f64>()?;
    Ok(total.sqrt())
}

/// PyTorch's `clip_grad_norm_`: scale by `max / (norm + 1e-6)` when that is below 1.
pub fn clip(grads: &mut HashMap<String, Tensor>, norm: f64, max: f64) -> Result<(), TrainError> {
    let coef = max / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(())
}
