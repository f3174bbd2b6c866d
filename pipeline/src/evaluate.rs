//! Evaluating a backbone's frozen features, as `pipeline eval`, the main job's
//! closing probe, `ablation` and `viz` / `export` (loading checkpoints) use it.
//!
//! The backbone's shape comes from the run that wrote the checkpoint
//! (`RUN/config.yaml`, one level above `RUN/ckpt`), falling back to the config's
//! `model:` when the checkpoint lies elsewhere. Features: decode -> center crop /
//! resize -> normalize (no masking) -> frozen backbone -> cls token or mean of
//! patch tokens ([`stages::eval`]).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::json;
use shards::Skips;
use stages::eval::{self, Features};
use stages::model::{init_weights, CrossMae, ModelConfig, Vit};
use stages::train::checkpoint;

use crate::config::{self, RunConfig};

/// The device the evaluation runs on: the config's `train.device` (cpu, cuda:N).
pub fn eval_device(cfg: &RunConfig) -> anyhow::Result<Device> {
    stages::train::device::open(&cfg.train.device).context("opening train.device for the evaluation")
}

/// The config of the run whose checkpoint this is: `CKPT/../config.yaml`, if there.
pub fn run_config_of(ckpt: &Path) -> anyhow::Result<Option<RunConfig>> {
    let Some(path) = ckpt.parent().map(|run| run.join("config.yaml")) else {
        return Ok(None);
    };
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // Paths in a run's config.yaml were already resolved when the run started.
    let cfg = config::parse(&text, &[], Path::new("")).with_context(|| format!("config {}", path.display()))?;
    Ok(Some(cfg))
}

/// The model config the checkpoint was trained with (see the module doc).
pub fn checkpoint_model(ckpt: &Path, cfg: &RunConfig) -> anyhow::Result<ModelConfig> {
    let model = match run_config_of(ckpt)? {
        Some(run) => run.model,
        None => {
            tracing::warn!(
                "no config.yaml next to {}: taking the backbone's shape from the eval config",
                ckpt.display()
            );
            cfg.model.clone()
        }
    };
    let (size, patch) = (cfg.stages.augment.size, cfg.stages.patch);
    if model.backbone.in_chans != cfg.stages.channels {
        bail!(
            "the checkpoint's backbone takes {} channel(s), the eval config's stages.channels gives {}",
            model.backbone.in_chans,
            cfg.stages.channels
        );
    }
    if model.backbone.img_size != size || model.backbone.patch_size != patch {
        bail!(
            "the checkpoint's backbone takes {} px images in {} px patches, the eval config's stages give {size} px in {patch} px patches",
            model.backbone.img_size,
            model.backbone.patch_size
        );
    }
    Ok(model)
}

/// The model's tensors from `CKPT/model.safetensors` (or the `.old` copy of an interrupted save).
pub fn load_model_tensors(ckpt: &Path) -> anyhow::Result<std::collections::HashMap<String, Tensor>> {
    let dir = checkpoint::resolve(ckpt)?;
    let path = dir.join(checkpoint::MODEL_FILE);
    candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| format!("reading {}", path.display()))
}

/// The frozen backbone of a checkpoint; a missing or misshapen tensor is an
/// error naming it and the file.
pub fn load_backbone(ckpt: &Path, model: &ModelConfig, device: &Device) -> anyhow::Result<Vit> {
    let tensors: std::collections::HashMap<String, Tensor> = load_model_tensors(ckpt)?
        .into_iter()
        .filter_map(|(name, t)| name.strip_prefix("backbone.").map(|n| (n.to_string(), t)))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    Vit::new(&model.backbone, vb).with_context(|| format!("loading the backbone of {}", ckpt.display()))
}

/// The backbone as training initializes it from `seed` (the same draw as a run's step 0).
pub fn random_backbone(model: &ModelConfig, seed: u64, device: &Device) -> anyhow::Result<Vit> {
    let varmap = candle_nn::VarMap::new();
    let full = CrossMae::new(model, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    init_weights(&varmap, &mut shards::rng::stage_rng(seed, 0, "model", "init"))?;
    Ok(full.backbone)
}

/// Features of the labelled train and test shards of `cfg`, at most `limits` samples each.
pub fn features_of(
    vit: &Vit,
    cfg: &RunConfig,
    limits: [Option<usize>; 2],
    skips: &Skips,
) -> anyhow::Result<(Features, Features)> {
    if cfg.data.test.is_empty() {
        bail!("data.test: no test shards given; the evaluation needs labelled test shards");
    }
    let train = extract(vit, cfg, &cfg.data.train, limits[0], skips).context("data.train")?;
    let test = extract(vit, cfg, &cfg.data.test, limits[1], skips).context("data.test")?;
    Ok((train, test))
}

/// Runs the shards' images through the frozen backbone in batches.
pub fn extract(
    vit: &Vit,
    cfg: &RunConfig,
    patterns: &[String],
    limit: Option<usize>,
    skips: &Skips,
) -> anyhow::Result<Features> {
    let paths = shards::expand(patterns)?;
    if paths.is_empty() {
        bail!("no shards match {patterns:?}");
    }
    let aug = &cfg.stages.augment;
    let (size, batch) = (aug.size, cfg.eval.batch_size);
    let per_image = 3 * size * size;
    let limit = limit.unwrap_or(usize::MAX);
    let mut out = Features {
        dim: vit.config().embed_dim,
        ..Features::default()
    };
    let (mut images, mut labels) = (Vec::with_capacity(batch * per_image), Vec::with_capacity(batch));
    let flush = |images: &mut Vec<f32>, labels: &mut Vec<usize>, out: &mut Features| -> anyhow::Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let x = Tensor::from_slice(
            images,
            (labels.len(), cfg.stages.channels, size, size),
            vit.pos_embed().device(),
        )?;
        let f = eval::backbone_features(vit, &x, cfg.eval.features)?;
        out.extend(&f.flatten_all()?.to_vec1::<f32>()?, labels);
        images.clear();
        labels.clear();
        Ok(())
    };
    'shards: for path in &paths {
        for raw in shards::ShardReader::open(path, cfg.data.on_error, skips)? {
            if out.len() + labels.len() >= limit {
                break 'shards;
            }
            let raw = raw?;
            let label = match raw.class_index() {
                Some(c) if c >= 0 => c as usize,
                _ => {
                    shards::skips::handle_bad(cfg.data.on_error, skips, path, &raw.key, "no class label (KEY.cls)")?;
                    continue;
                }
            };
            let decoded = match stages::decode::apply(&cfg.stages.decode, &raw) {
                Ok(img) => img,
                Err(e) => {
                    shards::skips::handle_bad(cfg.data.on_error, skips, path, &raw.key, &format!("decode: {e}"))?;
                    continue;
                }
            };
            images.extend(eval::eval_image(
                &decoded,
                aug,
                cfg.eval.crop_fraction,
                cfg.stages.channels,
            ));
            labels.push(label);
            if labels.len() == batch {
                flush(&mut images, &mut labels, &mut out)?;
            }
        }
    }
    flush(&mut images, &mut labels, &mut out)?;
    if out.is_empty() {
        bail!("no labelled samples in {patterns:?}");
    }
    Ok(out)
}

/// The probe `pipeline run` ends with: the linear probe of the checkpoint's
/// backbone beside the same probe on its random initialization, on the first
/// `eval.after_run_samples` train / test samples. Returns the JSON that goes
/// into summary.json.
pub fn after_run(cfg: &RunConfig, run_dir: &Path) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    let ckpt = crate::trainer::checkpoint_dir(run_dir);
    let [n_train, n_test] = cfg.eval.after_run_samples;
    let limits = [Some(n_train), Some(n_test)];
    let skips = Skips::quiet();
    let device = eval_device(cfg)?;
    let mut top1 = Vec::new();
    for vit in [
        load_backbone(&ckpt, &cfg.model, &device)?,
        random_backbone(&cfg.model, cfg.seed, &device)?,
    ] {
        let (train, test) = features_of(&vit, cfg, limits, &skips)?;
        top1.push((
            eval::linprobe::evaluate(&cfg.eval.linprobe, &train, &test, &device)?,
            train.len(),
            test.len(),
        ));
    }
    Ok(json!({
        "features": cfg.eval.features,
        "train_samples": top1[0].1,
        "test_samples": top1[0].2,
        "pretrained_top1": top1[0].0.test_top1,
        "random_init_top1": top1[1].0.test_top1,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

/// [`after_run`], printed: the line a newcomer reads at the end of `pipeline
/// run`. A failed probe is a warning (the run itself succeeded) and an
/// `error` entry in summary.json.
pub fn after_run_report(cfg: &RunConfig, run_dir: &Path) -> serde_json::Value {
    match after_run(cfg, run_dir) {
        Ok(probe) => {
            println!(
                "linear probe top-1 ({} train / {} test samples, {} features): pretrained {:.1}% vs random init {:.1}% ({:.0} s)",
                probe["train_samples"],
                probe["test_samples"],
                probe["features"].as_str().unwrap_or("?"),
                100.0 * probe["pretrained_top1"].as_f64().unwrap_or(f64::NAN),
                100.0 * probe["random_init_top1"].as_f64().unwrap_or(f64::NAN),
                probe["seconds"].as_f64().unwrap_or(0.0)
            );
            probe
        }
        Err(e) => {
            tracing::warn!("no linear probe at the end of the run: {e:#}");
            json!({ "error": format!("{e:#}") })
        }
    }
}
