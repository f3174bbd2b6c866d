//! Linear probe: BatchNorm without affine, then a Linear head, trained with
//! cross-entropy by SGD (momentum) or LARS under a warmup + cosine schedule.
//!
//! Mirrors MAE's `main_linprobe.py`: `head = Sequential(BatchNorm1d(D,
//! affine=False, eps=1e-6), Linear(D, classes))`, head weight trunc_normal(0.01)
//! (here normal(0.01): the 2-sigma cutoff hardly matters), bias 0, LARS
//! (`util/lars.py`: trust coefficient 0.001, no adaptation or weight decay on
//! 1-D parameters), per-iteration lr from `util/lr_sched.py`.
//!
//! One difference, and why: the features are frozen, so the BatchNorm here
//! normalizes with the mean and (biased) variance of the whole training set,
//! which is what BatchNorm's running statistics converge to; MAE normalizes
//! each training batch by its own statistics. This keeps the probe a
//! deterministic function of (features, config).
//!
//! The head is linear and the loss softmax cross-entropy, so the gradient is
//! written out (`(softmax - onehot)^T x / B`) instead of going through
//! autograd: a few matmuls per step.

use super::Features;
use crate::train::schedule::Schedule;
use candle_core::{DType, Device, Result, Tensor, D};
use rand::seq::SliceRandom;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// The optimizer of the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// SGD with (PyTorch) momentum.
    Sgd,
    /// LARS as in MAE's linear probe.
    Lars,
}

/// The `eval.linprobe` section. Defaults: SGD that fits a 96-wide head on
/// 3k-60k images in seconds (on the embedded default, 20 epochs at blr 0.1
/// left the probe at 74% training accuracy, 100 at blr 1.0 reach 82%); MAE's ImageNet recipe is
/// `optimizer: lars, blr: 0.1, batch_size: 16384, epochs: 90, warmup_epochs: 10`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub optimizer: Optimizer,
    pub epochs: usize,
    pub batch_size: usize,
    /// Base lr: lr = blr * batch_size / 256 (MAE).
    pub blr: f64,
    pub momentum: f64,
    /// Applied to the weight matrix only.
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    /// Seeds the head's init and the per-epoch shuffles.
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            optimizer: Optimizer::Sgd,
            epochs: 100,
            batch_size: 256,
            blr: 1.0,
            momentum: 0.9,
            weight_decay: 0.0,
            warmup_epochs: 1.0,
            seed: 0,
        }
    }
}

impl Config {
    /// Rejects values that cannot train, naming the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.epochs == 0 || self.batch_size == 0 {
            return Err("eval.linprobe.epochs and eval.linprobe.batch_size must be positive".into());
        }
        if !(self.blr > 0.0 && self.blr.is_finite()) {
            return Err(format!("eval.linprobe.blr {} must be positive", self.blr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(format!("eval.linprobe.momentum {} must lie in [0, 1)", self.momentum));
        }
        if self.weight_decay.is_nan()
            || self.weight_decay < 0.0
            || self.warmup_epochs.is_nan()
            || self.warmup_epochs < 0.0
        {
            return Err("eval.linprobe.weight_decay and warmup_epochs must be >= 0".into());
        }
        Ok(())
    }
}

/// LARS trust coefficient (MAE `util/lars.py`).
const TRUST_COEFFICIENT: f64 = 1e-3;
/// BatchNorm eps (MAE's probe head).
const BN_EPS: f64 = 1e-6;

/// A trained probe: normalization statistics and the Linear head.
#[derive(Debug, Clone)]
pub struct Probe {
    /// (1, D) mean and 1 / sqrt(var + eps) of the training features.
    mean: Tensor,
    inv_std: Tensor,
    /// (classes, D) and (classes).
    weight: Tensor,
    bias: Tensor,
}

fn matrix(f: &Features, device: &Device) -> Result<Tensor> {
    Tensor::from_slice(&f.values, (f.len(), f.dim), device)
}

impl Probe {
    /// Logits (n, classes) of raw (unnormalized) features (n, D).
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.broadcast_sub(&self.mean)?.broadcast_mul(&self.inv_std)?;
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }

    /// The predicted class of each row.
    pub fn predict(&self, f: &Features, device: &Device) -> Result<Vec<usize>> {
        let mut out = Vec::with_capacity(f.len());
        for start in (0..f.len()).step_by(4096) {
            let n = (f.len() - start).min(4096);
            let x = Tensor::from_slice(&f.values[start * f.dim..(start + n) * f.dim], (n, f.dim), device)?;
            let pred = self.logits(&x)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
            out.extend(pred.into_iter().map(|p| p as usize));
        }
        Ok(out)
    }
}

/// Trains the probe on `train` for `classes` classes.
pub fn train(cfg: &Config, train: &Features, classes: usize, device: &Device) -> Result<Probe> {
    if let Err(e) = train.check("linear probe training features").and(cfg.validate()) {
        candle_core::bail!("{e}")
    }
    if classes == 0 || train.labels.iter().any(|&l| l >= classes) {
        candle_core::bail!("linear probe: labels must lie in 0..{classes}")
    }
    let (n, d) = (train.len(), train.dim);
    let x_all = matrix(train, device)?;
    let mean = x_all.mean_keepdim(0)?;
    let var = x_all.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?;
    let inv_std = (var + BN_EPS)?.sqrt()?.recip()?;
    let x_all = x_all.broadcast_sub(&mean)?.broadcast_mul(&inv_std)?;

    let mut rng = shards::rng::stage_rng(cfg.seed, 0, "head", "linprobe");
    let w0: Vec<f32> = (0..classes * d)
        .map(|_| 0.01 * Distribution::<f32>::sample(&StandardNormal, &mut rng))
        .collect();
    let mut weight = Tensor::from_vec(w0, (classes, d), device)?;
    let mut bias = Tensor::zeros(classes, DType::F32, device)?;
    let mut w_mom = weight.zeros_like()?;
    let mut b_mom = bias.zeros_like()?;

    let batch = cfg.batch_size.min(n);
    let steps_per_epoch = n.div_ceil(batch) as u64;
    let schedule = Schedule {
        base_lr: cfg.blr * batch as f64 / 256.0,
        min_lr: 0.0,
        warmup_steps: (cfg.warmup_epochs * steps_per_epoch as f64).round() as u64,
        total_steps: cfg.epochs as u64 * steps_per_epoch,
    };
    let eye = Tensor::eye(classes, DType::F32, device)?;
    let labels = Tensor::from_vec(train.labels.iter().map(|&l| l as u32).collect::<Vec<_>>(), n, device)?;
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut step = 0u64;
    for _ in 0..cfg.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(batch) {
            let idx = Tensor::from_slice(chunk, chunk.len(), device)?;
            let x = x_all.index_select(&idx, 0)?;
            let onehot = eye.index_select(&labels.index_select(&idx, 0)?, 0)?;
            let logits = x.matmul(&weight.t()?)?.broadcast_add(&bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&logits)?;
            let g = ((probs - onehot)? / chunk.len() as f64)?; // dL/dlogits of the mean loss
            let mut gw = g.t()?.matmul(&x)?;
            let gb = g.sum(0)?;
            if cfg.weight_decay > 0.0 {
                gw = (gw + (&weight * cfg.weight_decay)?)?;
            }
            if cfg.optimizer == Optimizer::Lars {
                gw = (gw.clone() * lars_trust_ratio(&weight, &gw)?)?;
            }
            let lr = schedule.lr(step);
            w_mom = ((w_mom * cfg.momentum)? + gw)?;
            b_mom = ((b_mom * cfg.momentum)? + gb)?;
            weight = (weight - (&w_mom * lr)?)?;
            bias = (bias - (&b_mom * lr)?)?;
            step += 1;
        }
    }
    Ok(Probe {
        mean,
        inv_std,
        weight,
        bias,
    })
}

/// LARS's layer-wise scale `eta ||w|| / ||g||`, 1 when either norm is zero.
fn lars_trust_ratio(w: &Tensor, g: &Tensor) -> Result<f64> {
    let norm = |t: &Tensor| -> Result<f64> {
        t.sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()
            .map(f64::sqrt)
    };
    let (wn, gn) = (norm(w)?, norm(g)?);
    Ok(if wn > 0.0 && gn > 0.0 {
        TRUST_COEFFICIENT * wn / gn
    } else {
        1.0
    })
}

/// What [`evaluate`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Report {
    pub train_top1: f64,
    pub test_top1: f64,
}

/// Trains on `train`, reports top-1 on both sets.
pub fn evaluate(cfg: &Config, train: &Features, test: &Features, device: &Device) -> Result<Report> {
    if let Err(e) = test.check("linear probe test features") {
        candle_core::bail!("{e}")
    }
    if test.dim != train.dim {
        candle_core::bail!(
            "linear probe: train features have {} values, test {}",
            train.dim,
            test.dim
        )
    }
    let classes = super::num_classes(train, test);
    let probe = self::train(cfg, train, classes, device)?;
    Ok(Report {
        train_top1: super::top1(&probe.predict(train, device)?, &train.labels),
        test_top1: super::top1(&probe.predict(test, device)?, &test.labels),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Features that are the labels one-hot, scaled, plus a constant column.
    fn one_hot(n: usize, classes: usize) -> Features {
        let dim = classes + 1;
        let mut f = Features {
            dim,
            ..Features::default()
        };
        for i in 0..n {
            let label = (i * 7 + i / 3) % classes;
            let mut row = vec![0f32; dim];
            row[label] = 3.0;
            row[classes] = 1.0;
            f.extend(&row, &[label]);
        }
        f
    }

    /// Two Gaussian blobs per class in 16 dims, separable by a margin; class
    /// centers random, so the probe must learn the directions.
    fn blobs(n: usize, classes: usize, seed: u64) -> Features {
        let dim = 16;
        let mut rng = shards::rng::stage_rng(99, 0, "centers", "test");
        let centers: Vec<f32> = (0..classes * dim).map(|_| rng.random_range(-4.0..4.0)).collect();
        let mut rng = shards::rng::stage_rng(seed, 0, "points", "test");
        let mut f = Features {
            dim,
            ..Features::default()
        };
        for i in 0..n {
            let label = i % classes;
            let row: Vec<f32> = (0..dim)
                .map(|j| centers[label * dim + j] + 0.3 * Distribution::<f32>::sample(&StandardNormal, &mut rng))
                .collect();
            f.extend(&row, &[label]);
        }
        f
    }

    #[test]
    fn one_hot_label_features_give_100_percent_with_sgd_and_lars() -> Result<()> {
        let (train, test) = (one_hot(500, 10), one_hot(200, 10));
        for optimizer in [Optimizer::Sgd, Optimizer::Lars] {
            let cfg = Config {
                optimizer,
                // LARS's steps are relative to ||w||, which starts at 0.01-scale: more of them.
                epochs: if optimizer == Optimizer::Lars { 30 } else { 5 },
                batch_size: 64,
                // LARS scales each step by 0.001 ||w|| / ||g||: it needs MAE's large base lr.
                blr: if optimizer == Optimizer::Lars { 50.0 } else { 0.1 },
                ..Config::default()
            };
            let r = evaluate(&cfg, &train, &test, &Device::Cpu)?;
            assert_eq!((r.train_top1, r.test_top1), (1.0, 1.0), "{optimizer:?}");
        }
        Ok(())
    }

    #[test]
    fn separable_blobs_are_separated_and_shuffled_labels_are_not() -> Result<()> {
        let (train, test) = (blobs(1000, 5, 1), blobs(500, 5, 2));
        let r = evaluate(&Config::default(), &train, &test, &Device::Cpu)?;
        assert_eq!(r.test_top1, 1.0, "{r:?}");
        // With the test labels permuted away from the features, the probe
        // cannot beat chance by much: it is not reading the labels from elsewhere.
        let mut wrong = test.clone();
        wrong.labels = wrong.labels.iter().map(|l| (l + 1) % 5).collect();
        let r = evaluate(&Config::default(), &train, &wrong, &Device::Cpu)?;
        assert_eq!(r.test_top1, 0.0, "{r:?}");
        Ok(())
    }

    #[test]
    fn bad_shapes_and_labels_are_errors() {
        let mut f = one_hot(10, 3);
        f.values.pop();
        assert!(train(&Config::default(), &f, 3, &Device::Cpu).is_err());
        let f = one_hot(10, 3);
        let err = train(&Config::default(), &f, 2, &Device::Cpu)
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("labels")));
    }
}
