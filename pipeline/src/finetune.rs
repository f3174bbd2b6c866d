//! Fine-tuning a backbone on labelled shards, end to end: what `pipeline eval
//! finetune`, the main job's closing fine-tune and `ablation` run.
//!
//! The `eval.label_fraction` subset of `data.train` ([`crate::evaluate::label_subset_of`])
//! is read once and held encoded in memory (1% of ImageNet is about 1.4 GB);
//! every epoch decodes it again and draws fresh views through the same
//! stages as training: decode, then RandomResizedCrop and flip
//! (`stages.augment` with `eval.finetune.scale`), then normalization, each
//! view from the stream (seed, epoch, sample id), the order from (seed,
//! epoch). Mixing, dropped paths and the optimizer are
//! [`stages::eval::finetune`]'s. Top-1 and top-5 are on the center views of
//! all of `data.test` (up to `eval.test_limit`).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde_json::json;
use shards::Skips;
use stages::eval::finetune::{top_k_hits, FineTuner};
use stages::model::ModelConfig;

use crate::config::RunConfig;
use crate::evaluate::{for_each_eval_batch, for_each_labelled, label_subset_of};

/// A labelled training sample, still encoded.
struct Labelled {
    id: String,
    label: usize,
    sample: shards::Sample,
}

/// What a fine-tune measured, as its JSON line and summary.json show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub top1: f64,
    /// `None` with 5 classes or fewer (it would always be 1).
    pub top5: Option<f64>,
    pub epochs: usize,
    pub train_samples: usize,
    pub test_samples: usize,
    pub label_fraction: f64,
    pub final_loss: f64,
    pub seconds: f64,
}

/// One epoch's line in the fine-tune's metrics.jsonl.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EpochLine {
    pub epoch: usize,
    pub train_loss: f64,
    pub lr: f64,
    pub test_top1: Option<f64>,
    pub test_top5: Option<f64>,
    pub seconds: f64,
}

/// Fine-tunes `backbone` (tensors by timm name, of `model.backbone`'s shape)
/// on `fraction` of `data.train`'s labels; writes `metrics.jsonl` and
/// `finetune.png` into `out_dir` when given.
pub fn finetune(
    cfg: &RunConfig,
    model: &ModelConfig,
    backbone: &HashMap<String, Tensor>,
    fraction: f64,
    device: &Device,
    out_dir: Option<&Path>,
    skips: &Skips,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let ft = &cfg.eval.finetune;
    if cfg.data.test.is_empty() {
        bail!("data.test: no test shards given; fine-tuning reports its top-1 on labelled test shards");
    }
    let keep = label_subset_of(cfg, cfg.eval.train_limit, fraction)?;
    let mut train = Vec::new();
    let mut classes = 0;
    for_each_labelled(
        cfg,
        &cfg.data.train,
        cfg.eval.train_limit,
        keep.as_ref(),
        skips,
        |path, id, label, sample| {
            // Bad images are found once here, not once per epoch.
            match stages::decode::apply(&cfg.stages.decode, &sample) {
                Ok(_) => {
                    classes = classes.max(label + 1);
                    train.push(Labelled { id, label, sample });
                    Ok(())
                }
                Err(e) => {
                    shards::skips::handle_bad(cfg.data.on_error, skips, path, &sample.key, &format!("decode: {e}"))
                        .map_err(Into::into)
                }
            }
        },
    )
    .context("data.train")?;
    if train.is_empty() {
        bail!("data.train: no labelled samples to fine-tune on ({:?})", cfg.data.train);
    }
    let batch = ft.batch_size.min(train.len());
    let steps_per_epoch = train.len().div_ceil(batch) as u64;
    // The lr follows the batch the steps take (fewer samples than eval.finetune.batch_size: all of them).
    let recipe = stages::eval::finetune::Config {
        batch_size: batch,
        ..ft.clone()
    };
    let mut tuner = FineTuner::new(&recipe, &model.backbone, classes, backbone, steps_per_epoch, device)?;
    let mut aug = cfg.stages.augment.clone();
    aug.scale = ft.scale;
    let (channels, size) = (cfg.stages.channels, aug.size);
    let per_image = channels * size * size;

    let mut lines = Vec::new();
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut last = (f64::NAN, f64::NAN, 0usize);
    for epoch in 0..ft.epochs {
        let e = epoch as u64;
        order.shuffle(&mut shards::rng::stage_rng(ft.seed, e, "", "finetune-order"));
        let lr = tuner.lr();
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        for (b, chunk) in order.chunks(batch).enumerate() {
            let views = chunk
                .par_iter()
                .map(|&i| {
                    let s = &train[i];
                    let decode = &cfg.stages.decode;
                    let mut rng = shards::rng::stage_rng(ft.seed, e, &s.id, "finetune-augment");
                    if channels == 1 {
                        // One luma channel, decoded as pre-training decodes it.
                        let img = stages::decode::apply_grey(decode, &s.sample)
                            .map_err(|e| anyhow::anyhow!("{}: decode: {e}", s.id))?;
                        let (view, _) = stages::augment::apply(&aug, &img, &mut rng)
                            .map_err(|e| anyhow::anyhow!("{}: augment: {e}", s.id))?;
                        let lut = stages::augment::normalize_lut(aug.mean, aug.std);
                        return Ok(view.data.iter().map(|&v| lut[0][v as usize]).collect());
                    }
                    let img = stages::decode::apply(decode, &s.sample)
                        .map_err(|e| anyhow::anyhow!("{}: decode: {e}", s.id))?;
                    let (view, _) = stages::augment::apply(&aug, &img, &mut rng)
                        .map_err(|e| anyhow::anyhow!("{}: augment: {e}", s.id))?;
                    Ok(stages::chain::normalize_channels(&view, &aug, channels))
                })
                .collect::<anyhow::Result<Vec<Vec<f32>>>>()?;
            let mut images = Vec::with_capacity(chunk.len() * per_image);
            views.iter().for_each(|v| images.extend_from_slice(v));
            let labels: Vec<usize> = chunk.iter().map(|&i| train[i].label).collect();
            let loss = tuner.step(images, [chunk.len(), channels, size, size], &labels, e, b as u64)?;
            loss_sum += loss * chunk.len() as f64;
            seen += chunk.len();
        }
        let last_epoch = epoch + 1 == ft.epochs;
        let evaluated = if last_epoch || (ft.eval_every > 0 && (epoch + 1) % ft.eval_every == 0) {
            let (top1, top5, n) = test_accuracy(&tuner, cfg, skips, device)?;
            last = (top1, top5, n);
            Some((top1, top5))
        } else {
            None
        };
        let line = EpochLine {
            epoch: epoch + 1,
            train_loss: loss_sum / seen.max(1) as f64,
            lr,
            test_top1: evaluated.map(|t| t.0),
            test_top5: evaluated.filter(|_| classes > 5).map(|t| t.1),
            seconds: started.elapsed().as_secs_f64(),
        };
        // Only the evaluated epochs at info: the main job fine-tunes twice after its run.
        let level_info = line.test_top1.is_some();
        let message = format!(
            "fine-tune epoch {}/{}: loss {:.4}{}",
            line.epoch,
            ft.epochs,
            line.train_loss,
            line.test_top1
                .map(|t| format!(", test top-1 {:.2}%", 100.0 * t))
                .unwrap_or_default()
        );
        if level_info {
            tracing::info!("{message}");
        } else {
            tracing::debug!("{message}");
        }
        lines.push(line);
    }
    let report = Report {
        top1: last.0,
        top5: (classes > 5).then_some(last.1),
        epochs: ft.epochs,
        train_samples: train.len(),
        test_samples: last.2,
        label_fraction: fraction,
        final_loss: lines.last().map_or(f64::NAN, |l| l.train_loss),
        seconds: started.elapsed().as_secs_f64(),
    };
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut text = String::new();
        for l in &lines {
            text.push_str(&serde_json::to_string(l)?);
            text.push('\n');
        }
        text.push_str(&serde_json::to_string(&json!({ "kind": "result", "result": &report }))?);
        text.push('\n');
        let metrics = dir.join("metrics.jsonl");
        std::fs::write(&metrics, text).with_context(|| format!("writing {}", metrics.display()))?;
        if let Err(e) = crate::plot::finetune_png(dir, &lines) {
            tracing::warn!("no fine-tune plot: {e:#}");
        }
    }
    Ok(report)
}

/// Top-1, top-5 and the sample count on the center views of `data.test`.
fn test_accuracy(
    tuner: &FineTuner,
    cfg: &RunConfig,
    skips: &Skips,
    device: &Device,
) -> anyhow::Result<(f64, f64, usize)> {
    let classes = tuner.classes();
    let (mut hits1, mut hits5, mut n) = (0usize, 0usize, 0usize);
    for_each_eval_batch(
        cfg,
        &cfg.data.test,
        cfg.eval.test_limit,
        None,
        skips,
        device,
        |x, labels| {
            let logits = tuner.logits(x)?.flatten_all()?.to_vec1::<f32>()?;
            // A test label the training labels never showed cannot be predicted: a miss.
            let (known, rows): (Vec<usize>, Vec<&[f32]>) = labels
                .iter()
                .zip(logits.chunks_exact(classes))
                .filter(|(l, _)| **l < classes)
                .map(|(l, r)| (*l, r))
                .unzip();
            let flat: Vec<f32> = rows.concat();
            hits1 += top_k_hits(&flat, classes, &known, 1);
            hits5 += top_k_hits(&flat, classes, &known, 5);
            n += labels.len();
            Ok(())
        },
    )
    .context("data.test")?;
    if n == 0 {
        bail!("data.test: no labelled samples ({:?})", cfg.data.test);
    }
    Ok((hits1 as f64 / n as f64, hits5 as f64 / n as f64, n))
}
