//! End-to-end fine-tuning of a backbone with a classifier head, after MAE's
//! `main_finetune.py` (`models_vit.py` with `global_pool`, `util/lr_decay.py`)
//! and timm's `Mixup` / `DropPath`. Each piece is a function of its inputs,
//! tested on its own; the loop over shards lives with the files (the pipeline
//! crate's `finetune`), which calls [`FineTuner::step`] per batch.
//!
//! - [`Classifier`]: the ViT, the mean of its patch tokens before the final
//!   norm, `fc_norm`, a Linear `head` (MAE: weight trunc_normal(std 2e-5), here
//!   normal(2e-5): a 2-sigma cut of so narrow a normal changes nothing). One
//!   difference: the sin-cos position embedding stays fixed, as in
//!   pre-training (it is not a parameter of our ViT); MAE fine-tunes it.
//! - [`lr_scale`]: layer-wise lr decay. Layer 0 is the embedding (`patch_embed`,
//!   `cls_token`), block i is layer i + 1, the rest (`norm`, `fc_norm`,
//!   `head`) layer depth + 1; a parameter of layer l gets
//!   `decay^(depth + 1 - l)` times the lr.
//! - [`decays`]: MAE's weight-decay groups: no decay for 1-D parameters,
//!   biases and `cls_token` / `pos_embed`.
//! - [`drop_path_scales`]: stochastic depth, rates rising linearly from 0 at
//!   block 0 to `drop_path` at the last block.
//! - [`mix_batch`]: mixup or cutmix of a batch with its reversed self, and the
//!   label-smoothed soft targets mixed by the same lambda.
//! - [`label_subset`]: a class-balanced, seeded fraction of the labels.
//!
//! Every random draw comes from a counter-based stream named by (seed, epoch,
//! batch), so a fine-tune is a function of its inputs on the CPU.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Module, VarBuilder, VarMap};
use rand::Rng;
use rand_distr::{Beta, Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::model::vit::{linear, LayerNorm, Linear, Vit, VitConfig};
use crate::train::optim::{AdamW, AdamWParams};
use crate::train::schedule::Schedule;

/// The `eval.finetune` section. MAE's ViT-B recipe is `epochs: 100, blr: 5e-4,
/// layer_decay: 0.65, drop_path: 0.1, mixup: 0.8, cutmix: 1.0,
/// label_smoothing: 0.1, warmup_epochs: 5, scale: [0.08, 1]`; the defaults
/// here are sized for the embedded default's small model and few labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub epochs: usize,
    pub batch_size: usize,
    /// Base lr: lr = blr * batch_size / 256 (MAE).
    pub blr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    /// Layer-wise lr decay; 1 gives every layer the same lr.
    pub layer_decay: f64,
    /// Stochastic depth rate of the last block.
    pub drop_path: f64,
    pub label_smoothing: f64,
    /// Mixup's Beta(alpha, alpha); 0 turns mixup off.
    pub mixup: f64,
    /// Cutmix's Beta(alpha, alpha); 0 turns cutmix off.
    pub cutmix: f64,
    /// Chance that a batch is mixed at all.
    pub mix_prob: f64,
    /// Chance of cutmix rather than mixup when both are on.
    pub switch_prob: f64,
    /// RandomResizedCrop's area range for the training views (its aspect
    /// range and flip come from `stages.augment`).
    pub scale: [f64; 2],
    /// Evaluate on the test set every this many epochs (and after the last); 0: only after the last.
    pub eval_every: usize,
    /// Seeds the head, the order, the views, the mixing and the dropped paths.
    pub seed: u64,
}

impl Default for Config {
    /// Chosen on the embedded default at 1% of the labels (100 images), top-1
    /// on the 10k test images, pretrained / random init: MAE's mixup 0.8 and
    /// cutmix 1.0 gave 55.2 / 49.1%, none 61.0 / 51.9%; RandomResizedCrop at
    /// scale [0.2, 1] 39.9 / 33.7%, [0.8, 1] 58.1 / 52.4%, [1, 1] (flip only:
    /// at area 1 every crop of another aspect falls back to the whole image)
    /// 61.0 / 51.9%; blr 5e-2 55.7 / 49.5%; 100 epochs 62.4 / 55.6% in twice the time.
    fn default() -> Self {
        Self {
            epochs: 50,
            batch_size: 16,
            blr: 2e-2,
            min_lr: 1e-6,
            warmup_epochs: 3.0,
            weight_decay: 0.05,
            layer_decay: 0.75,
            drop_path: 0.1,
            label_smoothing: 0.1,
            mixup: 0.0,
            cutmix: 0.0,
            mix_prob: 1.0,
            switch_prob: 0.5,
            scale: [1.0, 1.0],
            eval_every: 0,
            seed: 0,
        }
    }
}

impl Config {
    /// Rejects values that cannot train, naming the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let k = "eval.finetune";
        if self.epochs == 0 || self.batch_size == 0 {
            return Err(format!("{k}.epochs and {k}.batch_size must be positive"));
        }
        if !(self.blr > 0.0 && self.blr.is_finite()) {
            return Err(format!("{k}.blr {} must be positive", self.blr));
        }
        let unit = [
            ("min_lr", self.min_lr, f64::MAX),
            ("warmup_epochs", self.warmup_epochs, f64::MAX),
            ("weight_decay", self.weight_decay, f64::MAX),
            ("mixup", self.mixup, f64::MAX),
            ("cutmix", self.cutmix, f64::MAX),
            ("layer_decay", self.layer_decay, 1.0),
            ("mix_prob", self.mix_prob, 1.0),
            ("switch_prob", self.switch_prob, 1.0),
        ];
        for (name, v, hi) in unit {
            if !(v.is_finite() && v >= 0.0 && v <= hi) {
                return Err(format!("{k}.{name} {v} must be finite and in [0, {hi}]"));
            }
        }
        if self.layer_decay == 0.0 {
            return Err(format!("{k}.layer_decay must be positive (1 turns the decay off)"));
        }
        if !(0.0..1.0).contains(&self.drop_path) || !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(format!("{k}.drop_path and {k}.label_smoothing must lie in [0, 1)"));
        }
        let [lo, hi] = self.scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return Err(format!("{k}.scale [{lo}, {hi}] must satisfy 0 < lo <= hi <= 1"));
        }
        Ok(())
    }
}

/// The backbone with MAE's fine-tuning head: global average pool of the patch
/// tokens, `fc_norm`, `head` (timm's parameter names).
pub struct Classifier {
    pub vit: Vit,
    fc_norm: LayerNorm,
    head: Linear,
}

impl Classifier {
    /// Parameters are created as zeros; [`FineTuner::new`] fills them.
    pub fn new(cfg: &VitConfig, classes: usize, vb: VarBuilder) -> Result<Self> {
        let mut vit = Vit::new(cfg, vb.clone())?;
        vit.learn_pos_embed(&vb)?;
        Ok(Self {
            vit,
            fc_norm: LayerNorm::new(cfg.embed_dim, vb.pp("fc_norm"))?,
            head: linear(cfg.embed_dim, classes, vb.pp("head"))?,
        })
    }

    /// Images (B, C, H, W) -> logits (B, classes); `drop_path` at training only.
    pub fn forward(&self, images: &Tensor, drop_path: Option<&[[Tensor; 2]]>) -> Result<Tensor> {
        let x = self.vit.forward_unnormed(images, drop_path)?;
        let n = x.dim(1)? - 1;
        let pooled = x.narrow(1, 1, n)?.mean(1)?;
        self.head.forward(&self.fc_norm.forward(&pooled)?)
    }
}

/// The layer of a parameter for layer-wise decay (MAE `get_layer_id_for_vit`).
pub fn layer_id(name: &str, depth: usize) -> usize {
    if name == "cls_token" || name == "pos_embed" || name.starts_with("patch_embed.") {
        0
    } else if let Some(rest) = name.strip_prefix("blocks.") {
        rest.split('.')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .map_or(depth + 1, |i| i + 1)
    } else {
        depth + 1
    }
}

/// The lr multiplier of a parameter: `decay^(depth + 1 - layer)`.
pub fn lr_scale(name: &str, depth: usize, decay: f64) -> f64 {
    decay.powi((depth + 1 - layer_id(name, depth).min(depth + 1)) as i32)
}

/// Whether a parameter gets weight decay while fine-tuning.
pub fn decays(name: &str, dims: &[usize]) -> bool {
    crate::train::optim::decays(name, dims) && name != "cls_token" && name != "pos_embed"
}

/// Stochastic depth rate of each block: `linspace(0, rate, depth)` (timm).
pub fn drop_path_rates(rate: f64, depth: usize) -> Vec<f64> {
    match depth {
        0 => Vec::new(),
        1 => vec![0.0],
        _ => (0..depth).map(|i| rate * i as f64 / (depth - 1) as f64).collect(),
    }
}

/// Per-sample branch scales (B, 1, 1) of every block, two per block: 0 with
/// probability `rate`, else 1 / (1 - rate) (timm's `drop_path`, scaled by the
/// keep probability so that the expectation is the identity).
pub fn drop_path_scales(rates: &[f64], batch: usize, rng: &mut impl Rng, device: &Device) -> Result<Vec<[Tensor; 2]>> {
    let mut scale = |rate: f64| -> Result<Tensor> {
        let keep = 1.0 - rate;
        let v: Vec<f32> = (0..batch)
            .map(|_| {
                if rate == 0.0 {
                    1.0
                } else if rng.random::<f64>() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(v, (batch, 1, 1), device)
    };
    rates.iter().map(|&r| Ok([scale(r)?, scale(r)?])).collect()
}

/// How a batch was mixed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    /// The weight of each sample's own label (1: not mixed).
    pub lambda: f64,
    /// Cutmix's box `[top, bottom, left, right)` in pixels, pasted from the partner.
    pub cutmix_box: Option<[usize; 4]>,
}

/// Mixes the batch `images` (B, C, H, W, row-major) in place and returns its
/// soft targets (B, classes). Sample i's partner is sample B - 1 - i (timm's
/// batch mode). Mixup: `lam x + (1 - lam) x_partner`. Cutmix: the partner's
/// pixels in a box of area about `1 - lam`, lambda then corrected to the box's
/// actual area. Targets: `lam y + (1 - lam) y_partner` with label-smoothed
/// one-hot rows (`1 - s + s / classes` on the label, `s / classes` elsewhere).
pub fn mix_batch(
    cfg: &Config,
    images: &mut [f32],
    shape: [usize; 4],
    labels: &[usize],
    classes: usize,
    rng: &mut impl Rng,
) -> Result<(Vec<f32>, Mix)> {
    let [b, c, h, w] = shape;
    if images.len() != b * c * h * w || labels.len() != b || labels.iter().any(|&l| l >= classes) {
        candle_core::bail!(
            "mix_batch: {} values, {} labels for shape {shape:?} and {classes} classes",
            images.len(),
            labels.len()
        )
    }
    let beta = |alpha: f64, rng: &mut dyn rand::RngCore| -> Result<f64> {
        Beta::new(alpha, alpha)
            .map(|d| d.sample(rng))
            .map_err(|e| candle_core::Error::Msg(format!("beta({alpha}): {e}")))
    };
    let (mut lambda, mut cutmix) = (1.0, false);
    if (cfg.mixup > 0.0 || cfg.cutmix > 0.0) && rng.random::<f64>() < cfg.mix_prob {
        cutmix = if cfg.mixup > 0.0 && cfg.cutmix > 0.0 {
            rng.random::<f64>() < cfg.switch_prob
        } else {
            cfg.cutmix > 0.0
        };
        lambda = beta(if cutmix { cfg.cutmix } else { cfg.mixup }, rng)?;
    }
    let image = c * h * w;
    let original = images.to_vec();
    let mut cutmix_box = None;
    if lambda < 1.0 && cutmix {
        // timm's rand_bbox: a box of sides sqrt(1 - lam) H, W around a uniform centre, clipped.
        let ratio = (1.0 - lambda).sqrt();
        let (cut_h, cut_w) = ((h as f64 * ratio) as usize, (w as f64 * ratio) as usize);
        let (cy, cx) = (rng.random_range(0..h), rng.random_range(0..w));
        let (top, bottom) = (cy.saturating_sub(cut_h / 2), (cy + cut_h / 2).min(h));
        let (left, right) = (cx.saturating_sub(cut_w / 2), (cx + cut_w / 2).min(w));
        for i in 0..b {
            let partner = b - 1 - i;
            for ch in 0..c {
                for y in top..bottom {
                    let row = i * image + ch * h * w + y * w;
                    let from = partner * image + ch * h * w + y * w;
                    images[row + left..row + right].copy_from_slice(&original[from + left..from + right]);
                }
            }
        }
        lambda = 1.0 - ((bottom - top) * (right - left)) as f64 / (h * w) as f64;
        cutmix_box = Some([top, bottom, left, right]);
    } else if lambda < 1.0 {
        let (lam, rest) = (lambda as f32, (1.0 - lambda) as f32);
        for i in 0..b {
            let partner = b - 1 - i;
            for j in 0..image {
                images[i * image + j] = original[i * image + j] * lam + original[partner * image + j] * rest;
            }
        }
    }
    let off = cfg.label_smoothing / classes as f64;
    let on = 1.0 - cfg.label_smoothing + off;
    let mut targets = vec![0f32; b * classes];
    for (i, row) in targets.chunks_exact_mut(classes).enumerate() {
        for (k, t) in row.iter_mut().enumerate() {
            let own = if k == labels[i] { on } else { off };
            let other = if k == labels[b - 1 - i] { on } else { off };
            *t = (lambda * own + (1.0 - lambda) * other) as f32;
        }
    }
    Ok((targets, Mix { lambda, cutmix_box }))
}

/// Mean over rows of `-sum_k target_k log softmax(logits)_k` (timm's
/// `SoftTargetCrossEntropy`), differentiable (basic ops; the row max is a
/// constant shift and is detached).
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?.detach())?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_p = shifted.broadcast_sub(&log_z)?;
    (targets * log_p)?.sum(D::Minus1)?.neg()?.mean_all()
}

/// Which samples a label fraction keeps: of each class's `n` samples, the
/// `max(1, round(fraction n))` whose seeded hash of their id is smallest, so
/// the choice depends on the ids, the labels and the seed only (not on the
/// order the shards are read in). `items`: (id, label).
pub fn label_subset(items: &[(String, usize)], fraction: f64, seed: u64) -> Vec<bool> {
    if fraction >= 1.0 {
        return vec![true; items.len()];
    }
    let mut by_class: HashMap<usize, Vec<(u64, usize)>> = HashMap::new();
    for (i, (id, label)) in items.iter().enumerate() {
        let rank = shards::rng::stage_rng(seed, 0, id, "label-fraction").random::<u64>();
        by_class.entry(*label).or_default().push((rank, i));
    }
    let mut keep = vec![false; items.len()];
    for ranked in by_class.values_mut() {
        ranked.sort_unstable();
        let k = ((fraction * ranked.len() as f64).round() as usize).clamp(1, ranked.len());
        for &(_, i) in &ranked[..k] {
            keep[i] = true;
        }
    }
    keep
}

/// Hits of the true label among the `k` largest logits of each row. A tie
/// with another class counts against the label, and a row whose label logit
/// is not finite is a miss (NaN parameters must not read as accuracy).
pub fn top_k_hits(logits: &[f32], classes: usize, labels: &[usize], k: usize) -> usize {
    logits
        .chunks_exact(classes)
        .zip(labels)
        .filter(|(row, &label)| {
            let own = row[label];
            own.is_finite()
                && row
                    .iter()
                    .enumerate()
                    .filter(|&(j, &v)| j != label && !(v < own))
                    .count()
                    < k
        })
        .count()
}

/// The classifier, its optimizer and schedule: one fine-tuning run.
pub struct FineTuner {
    pub model: Classifier,
    varmap: VarMap,
    optim: AdamW,
    schedule: Schedule,
    rates: Vec<f64>,
    cfg: Config,
    classes: usize,
    step: u64,
}

impl FineTuner {
    /// Starts from `backbone` (the ViT's tensors by timm name; `norm.*` may be
    /// absent, the pooled head does not use it) with a fresh head.
    /// A missing or misshapen backbone tensor is an error naming it.
    pub fn new(
        cfg: &Config,
        vit: &VitConfig,
        classes: usize,
        backbone: &HashMap<String, Tensor>,
        steps_per_epoch: u64,
        device: &Device,
    ) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("{e}")
        }
        if classes < 2 {
            candle_core::bail!("fine-tuning needs at least 2 classes, the labels give {classes}")
        }
        let varmap = VarMap::new();
        let model = Classifier::new(vit, classes, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        let mut rng = shards::rng::stage_rng(cfg.seed, 0, "head", "finetune");
        let vars = crate::model::named_vars(&varmap)?;
        for (name, var) in &vars {
            let value = match name.as_str() {
                "head.weight" => {
                    let v: Vec<f32> = (0..var.elem_count())
                        .map(|_| 2e-5 * Distribution::<f32>::sample(&StandardNormal, &mut rng))
                        .collect();
                    Tensor::from_vec(v, var.dims(), device)?
                }
                "head.bias" | "fc_norm.bias" => var.zeros_like()?,
                "fc_norm.weight" => var.ones_like()?,
                "norm.weight" | "norm.bias" if !backbone.contains_key(name) => continue,
                // Our checkpoints hold no pos_embed (fixed in pre-training): it starts as the sin-cos.
                "pos_embed" if !backbone.contains_key(name) => {
                    let table = crate::model::patch::pos_embed_2d(vit.embed_dim, vit.grid(), true);
                    Tensor::from_vec(table, var.dims(), device)?
                }
                _ => {
                    let Some(t) = backbone.get(name) else {
                        candle_core::bail!("the backbone has no tensor {name}")
                    };
                    if t.dims() != var.dims() {
                        candle_core::bail!(
                            "backbone tensor {name} is {:?}, the model wants {:?}",
                            t.dims(),
                            var.dims()
                        )
                    }
                    t.to_dtype(DType::F32)?.to_device(device)?
                }
            };
            var.set(&value)?;
        }
        let params = AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: cfg.weight_decay,
        };
        let mut optim = AdamW::new(vars, params)?;
        let (depth, decay) = (vit.depth, cfg.layer_decay);
        optim.set_groups(|name, dims| (lr_scale(name, depth, decay), decays(name, dims)));
        let total_steps = cfg.epochs as u64 * steps_per_epoch;
        let schedule = Schedule {
            // `cfg.batch_size` is the batch the steps take (the caller clamps it to the data).
            base_lr: cfg.blr * cfg.batch_size as f64 / 256.0,
            min_lr: cfg.min_lr,
            // At most half the run, so a short fine-tune (2 epochs against 3 of
            // warmup) still reaches its peak lr and decays.
            warmup_steps: ((cfg.warmup_epochs * steps_per_epoch as f64).round() as u64).min(total_steps / 2),
            total_steps,
        };
        Ok(Self {
            model,
            varmap,
            optim,
            schedule,
            rates: drop_path_rates(cfg.drop_path, vit.depth),
            cfg: cfg.clone(),
            classes,
            step: 0,
        })
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.optim
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The lr of the next step (before layer decay).
    pub fn lr(&self) -> f64 {
        self.schedule.lr(self.step)
    }

    /// One step on normalized training views (B, C, H, W, row-major) with their
    /// labels: mix, drop paths, forward, soft cross-entropy, AdamW. `epoch`
    /// and `batch` name the random streams. Returns the loss.
    pub fn step(
        &mut self,
        mut images: Vec<f32>,
        shape: [usize; 4],
        labels: &[usize],
        epoch: u64,
        batch: u64,
    ) -> Result<f64> {
        let device = self.model.vit.pos_embed().device().clone();
        let stream = format!("batch{batch}");
        let mut rng = shards::rng::stage_rng(self.cfg.seed, epoch, &stream, "finetune-mix");
        let (targets, _) = mix_batch(&self.cfg, &mut images, shape, labels, self.classes, &mut rng)?;
        let mut rng = shards::rng::stage_rng(self.cfg.seed, epoch, &stream, "finetune-drop-path");
        let scales = drop_path_scales(&self.rates, shape[0], &mut rng, &device)?;
        let x = Tensor::from_vec(images, shape.to_vec(), &device)?;
        let targets = Tensor::from_vec(targets, (shape[0], self.classes), &device)?;
        let loss = soft_cross_entropy(&self.model.forward(&x, Some(&scales))?, &targets)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            candle_core::bail!("fine-tuning loss is {value} at step {}", self.step)
        }
        let grads = loss.backward()?;
        let by_name: HashMap<String, Tensor> = self
            .optim
            .vars()
            .filter_map(|(name, var)| grads.get(var).map(|g| (name.to_string(), g.clone())))
            .collect();
        self.optim.step(&by_name, self.schedule.lr(self.step))?;
        self.step += 1;
        Ok(value)
    }

    /// Logits (B, classes) of normalized evaluation views, no drop path.
    pub fn logits(&self, images: &Tensor) -> Result<Tensor> {
        self.model
            .forward(&images.detach(), None)?
            .detach()
            .to_dtype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn layer_decay_matches_the_closed_form() {
        let depth = 4;
        let d: f64 = 0.75;
        for i in 0..depth {
            for leaf in ["norm1.weight", "attn.qkv.weight", "mlp.fc2.bias"] {
                let s = lr_scale(&format!("blocks.{i}.{leaf}"), depth, d);
                assert!((s - d.powi((depth - i) as i32)).abs() < 1e-15, "block {i}: {s}");
            }
        }
        for name in ["cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias"] {
            assert!(
                (lr_scale(name, depth, d) - d.powi(depth as i32 + 1)).abs() < 1e-15,
                "{name}"
            );
        }
        for name in ["head.weight", "fc_norm.bias", "norm.weight"] {
            assert_eq!(lr_scale(name, depth, d), 1.0, "{name}");
        }
        assert!(!decays("cls_token", &[1, 1, 8]) && !decays("head.bias", &[10]) && decays("head.weight", &[10, 8]));
    }

    #[test]
    fn mixup_and_cutmix_mix_pixels_and_labels_by_the_same_lambda() {
        let (b, c, h, w, classes) = (4, 2, 8, 6, 5);
        let labels = [0, 3, 1, 4];
        // Image i is the constant i + 1, so a pixel tells whose it is.
        let base: Vec<f32> = (0..b).flat_map(|i| vec![(i + 1) as f32; c * h * w]).collect();
        for (mixup, cutmix) in [(0.8, 0.0), (0.0, 1.0)] {
            let cfg = Config {
                mixup,
                cutmix,
                label_smoothing: 0.1,
                ..Config::default()
            };
            let mut saw_mix = false;
            for seed in 0..20 {
                let mut images = base.clone();
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                let (targets, mix) = mix_batch(&cfg, &mut images, [b, c, h, w], &labels, classes, &mut rng).unwrap();
                let lam = mix.lambda;
                saw_mix |= lam < 1.0;
                for i in 0..b {
                    let (own, partner) = ((i + 1) as f32, (b - i) as f32);
                    let img = &images[i * c * h * w..(i + 1) * c * h * w];
                    // The share of the sample's own pixels is lambda.
                    let own_share = match mix.cutmix_box {
                        Some(_) => img.iter().filter(|&&v| v == own).count() as f64 / img.len() as f64,
                        None => {
                            assert!(img
                                .iter()
                                .all(|&v| (v - (own * lam as f32 + partner * (1.0 - lam) as f32)).abs() < 1e-5));
                            lam
                        }
                    };
                    if own != partner {
                        assert!(
                            (own_share - lam).abs() < 1e-12,
                            "seed {seed} cutmix {cutmix}: {own_share} vs {lam}"
                        );
                    }
                    let row = &targets[i * classes..(i + 1) * classes];
                    let (on, off) = (1.0 - 0.1 + 0.1 / 5.0, 0.1 / 5.0);
                    let (l, p) = (labels[i], labels[b - 1 - i]);
                    let want =
                        |k: usize| lam * if k == l { on } else { off } + (1.0 - lam) * if k == p { on } else { off };
                    for (k, &t) in row.iter().enumerate() {
                        assert!((t as f64 - want(k)).abs() < 1e-6, "seed {seed} sample {i} class {k}");
                    }
                    assert!((row.iter().map(|&v| v as f64).sum::<f64>() - 1.0).abs() < 1e-5);
                }
            }
            assert!(saw_mix, "mixup {mixup} cutmix {cutmix} never mixed");
        }
        // Mixing off: the images stay, the targets are the smoothed labels.
        let cfg = Config {
            mixup: 0.0,
            cutmix: 0.0,
            label_smoothing: 0.0,
            ..Config::default()
        };
        let mut images = base.clone();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let (targets, mix) = mix_batch(&cfg, &mut images, [b, c, h, w], &labels, classes, &mut rng).unwrap();
        assert_eq!((images, mix.lambda), (base, 1.0));
        assert_eq!((targets[0], targets[classes + 3]), (1.0, 1.0));
    }

    #[test]
    fn drop_path_keeps_the_expectation_and_is_off_at_rate_zero() {
        let rates = drop_path_rates(0.3, 4);
        assert_eq!(
            rates.iter().map(|r| (r * 10.0).round()).collect::<Vec<_>>(),
            [0.0, 1.0, 2.0, 3.0]
        );
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let n = 20_000;
        let scales = drop_path_scales(&rates, n, &mut rng, &Device::Cpu).unwrap();
        for (r, pair) in rates.iter().zip(&scales) {
            for s in pair {
                let v = s.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
                let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / n as f64;
                assert!((mean - 1.0).abs() < 0.03, "rate {r}: mean {mean}");
                assert!((dropped - r).abs() < 0.02, "rate {r}: dropped {dropped}");
            }
        }
        // At evaluation no scales are given: the classifier's forward equals the plain blocks.
        let cfg = VitConfig {
            embed_dim: 16,
            depth: 2,
            num_heads: 2,
            ..VitConfig::vit_tiny_patch4_28()
        };
        let varmap = VarMap::new();
        let vit = Vit::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        crate::model::init_weights(&varmap, &mut rand_chacha::ChaCha8Rng::seed_from_u64(2)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 1, 28, 28), &Device::Cpu).unwrap();
        let ones: Vec<[Tensor; 2]> = drop_path_scales(&drop_path_rates(0.0, 2), 3, &mut rng, &Device::Cpu).unwrap();
        let plain = vit.forward_unnormed(&x, None).unwrap();
        let kept = vit.forward_unnormed(&x, Some(&ones)).unwrap();
        let diff = (plain - kept)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        // Every branch dropped: the blocks are the identity, the patch rows are
        // the embedded patches plus their position embedding.
        let zeros: Vec<[Tensor; 2]> = (0..2)
            .map(|_| [0, 1].map(|_| Tensor::zeros((3, 1, 1), DType::F32, &Device::Cpu).unwrap()))
            .collect();
        let dropped = vit
            .forward_unnormed(&x, Some(&zeros))
            .unwrap()
            .narrow(1, 1, 49)
            .unwrap();
        let pos = vit.pos_embed().narrow(1, 1, 49).unwrap();
        let embedded = vit.patch_embed.forward(&x).unwrap().broadcast_add(&pos).unwrap();
        let gap = (dropped - embedded).unwrap().abs().unwrap().max_all().unwrap();
        let gap = gap.to_scalar::<f32>().unwrap();
        assert!(gap < 1e-6, "all paths dropped: {gap}");
    }

    #[test]
    fn label_subsets_are_class_balanced_seeded_and_order_free() {
        let items: Vec<(String, usize)> = (0..1000).map(|i| (format!("s{i:04}"), i % 10)).collect();
        let keep = label_subset(&items, 0.1, 7);
        let mut per_class = [0usize; 10];
        for (k, (_, l)) in keep.iter().zip(&items) {
            per_class[*l] += *k as usize;
        }
        assert_eq!(per_class, [10; 10]);
        assert_eq!(keep, label_subset(&items, 0.1, 7));
        assert_ne!(keep, label_subset(&items, 0.1, 8));
        // Reversed input order: the same ids are kept.
        let reversed: Vec<_> = items.iter().rev().cloned().collect();
        let kept = |items: &[(String, usize)], keep: &[bool]| {
            let mut ids: Vec<String> = items
                .iter()
                .zip(keep)
                .filter(|(_, k)| **k)
                .map(|(i, _)| i.0.clone())
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(kept(&items, &keep), kept(&reversed, &label_subset(&reversed, 0.1, 7)));
        // At least one per class, all at fraction 1.
        assert_eq!(label_subset(&items, 1e-6, 0).iter().filter(|k| **k).count(), 10);
        assert!(label_subset(&items, 1.0, 0).iter().all(|k| *k));
    }

    /// n images (n, 1, 28, 28) whose class is which half is bright, with noise.
    fn halves(n: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut images = Vec::with_capacity(n * 784);
        let labels: Vec<usize> = (0..n).map(|i| i % 2).collect();
        for &l in &labels {
            for _y in 0..28 {
                for x in 0..28 {
                    let bright = (x < 14) == (l == 0);
                    images.push(if bright { 1.0 } else { -1.0 } + 0.3 * rng.random::<f32>());
                }
            }
        }
        (images, labels)
    }

    /// Fine-tunes a small random ViT on `labels` and returns the test top-1.
    fn finetune_top1(train: &(Vec<f32>, Vec<usize>), test: &(Vec<f32>, Vec<usize>)) -> f64 {
        let vit = VitConfig {
            embed_dim: 16,
            depth: 1,
            num_heads: 2,
            ..VitConfig::vit_tiny_patch4_28()
        };
        let cfg = Config {
            epochs: 12,
            batch_size: 16,
            blr: 0.05,
            warmup_epochs: 1.0,
            mixup: 0.0,
            cutmix: 0.0,
            drop_path: 0.0,
            label_smoothing: 0.0,
            layer_decay: 1.0,
            ..Config::default()
        };
        let varmap = VarMap::new();
        let _ = crate::model::vit::Vit::new(&vit, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        crate::model::init_weights(&varmap, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3)).unwrap();
        let backbone: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let n = train.1.len();
        let mut ft = FineTuner::new(&cfg, &vit, 2, &backbone, n.div_ceil(16) as u64, &Device::Cpu).unwrap();
        // The position embedding starts as the sin-cos and is trained (MAE's fine-tuning).
        let sincos = crate::model::patch::pos_embed_2d(vit.embed_dim, vit.grid(), true);
        fn ft_pos(ft: &FineTuner) -> Vec<f32> {
            ft.model
                .vit
                .pos_embed()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        }
        assert_eq!(ft_pos(&ft), sincos);
        for epoch in 0..cfg.epochs as u64 {
            for (b, start) in (0..n).step_by(16).enumerate() {
                let end = (start + 16).min(n);
                let images = train.0[start * 784..end * 784].to_vec();
                ft.step(images, [end - start, 1, 28, 28], &train.1[start..end], epoch, b as u64)
                    .unwrap();
            }
        }
        assert_ne!(ft_pos(&ft), sincos, "pos_embed was not trained");
        let x = Tensor::from_slice(&test.0, (test.1.len(), 1, 28, 28), &Device::Cpu).unwrap();
        let logits = ft.logits(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        top_k_hits(&logits, 2, &test.1, 1) as f64 / test.1.len() as f64
    }

    #[test]
    fn finetuning_separates_separable_data_and_not_shuffled_labels() {
        let (train, test) = (halves(64, 1), halves(200, 2));
        let top1 = finetune_top1(&train, &test);
        assert_eq!(top1, 1.0, "separable data: top-1 {top1}");
        // The same images with labels that say nothing about them.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let shuffled = (
            train.0.clone(),
            train.1.iter().map(|_| rng.random_range(0..2)).collect::<Vec<_>>(),
        );
        let top1 = finetune_top1(&shuffled, &test);
        assert!(
            (0.3..=0.7).contains(&top1),
            "shuffled labels: top-1 {top1}, chance is 0.5"
        );
    }

    #[test]
    fn soft_cross_entropy_matches_a_direct_sum_and_top_k_counts() {
        let logits = Tensor::new(&[[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[[0.0f32, 1.0, 0.0], [0.2, 0.3, 0.5]], &Device::Cpu).unwrap();
        let got = soft_cross_entropy(&logits, &targets)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let rows = [[1.0f64, 2.0, 0.5], [0.0, -1.0, 3.0]];
        let t = [[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]];
        let mut want = 0.0;
        for (r, tr) in rows.iter().zip(&t) {
            let z = r.iter().map(|v| v.exp()).sum::<f64>().ln();
            want -= r.iter().zip(tr).map(|(v, p)| p * (v - z)).sum::<f64>();
        }
        assert!((got - want / 2.0).abs() < 1e-6, "{got} vs {}", want / 2.0);
        let flat = [1.0f32, 2.0, 0.5, 0.0, -1.0, 3.0];
        assert_eq!(top_k_hits(&flat, 3, &[1, 1], 1), 1);
        assert_eq!(top_k_hits(&flat, 3, &[1, 1], 2), 1);
        assert_eq!(top_k_hits(&flat, 3, &[0, 2], 2), 2);
        // Ties count against the label, NaN rows are misses.
        assert_eq!(top_k_hits(&[1.0, 1.0, 0.0], 3, &[0], 1), 0);
        assert_eq!(top_k_hits(&[f32::NAN, f32::NAN, f32::NAN], 3, &[0], 3), 0);
        assert_eq!(top_k_hits(&[0.0, f32::NAN, 1.0], 3, &[2], 1), 0);
    }
}
