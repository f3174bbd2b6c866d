//! Evaluating a backbone's frozen features, as `pipeline eval`, the main job's
//! closing probe, `ablation` and `viz` / `export` (loading checkpoints) use it.
//!
//! The backbone's shape comes from the run that wrote the checkpoint
//! (`RUN/config.yaml`, one level above `RUN/ckpt`), falling back to the config's
//! `model:` when the checkpoint lies elsewhere. Features: decode -> center crop /
//! resize -> normalize (no masking) -> frozen backbone -> cls token or mean of
//! patch tokens ([`stages::eval`]).

use std::collections::{HashMap, HashSet};
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
pub fn load_model_tensors(ckpt: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let dir = checkpoint::resolve(ckpt)?;
    let path = dir.join(checkpoint::MODEL_FILE);
    candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| format!("reading {}", path.display()))
}

/// The backbone's tensors in a checkpoint, by timm name (`backbone.` dropped).
pub fn checkpoint_backbone_tensors(ckpt: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    Ok(load_model_tensors(ckpt)?
        .into_iter()
        .filter_map(|(name, t)| name.strip_prefix("backbone.").map(|n| (n.to_string(), t)))
        .collect())
}

/// The frozen backbone of a checkpoint; a missing or misshapen tensor is an
/// error naming it and the file.
pub fn load_backbone(ckpt: &Path, model: &ModelConfig, device: &Device) -> anyhow::Result<Vit> {
    let vb = VarBuilder::from_tensors(checkpoint_backbone_tensors(ckpt)?, DType::F32, device);
    Vit::new(&model.backbone, vb).with_context(|| format!("loading the backbone of {}", ckpt.display()))
}

/// The backbone's tensors as training initializes them from `seed` (the same
/// draw as a run's step 0), by timm name.
pub fn random_backbone_tensors(model: &ModelConfig, seed: u64) -> anyhow::Result<HashMap<String, Tensor>> {
    let varmap = candle_nn::VarMap::new();
    CrossMae::new(model, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    init_weights(&varmap, &mut shards::rng::stage_rng(seed, 0, "model", "init"))?;
    Ok(stages::model::named_vars(&varmap)?
        .into_iter()
        .filter_map(|(name, var)| {
            name.strip_prefix("backbone.")
                .map(|n| (n.to_string(), var.as_tensor().clone()))
        })
        .collect())
}

/// The backbone as training initializes it from `seed`.
pub fn random_backbone(model: &ModelConfig, seed: u64, device: &Device) -> anyhow::Result<Vit> {
    let vb = VarBuilder::from_tensors(random_backbone_tensors(model, seed)?, DType::F32, device);
    Ok(Vit::new(&model.backbone, vb)?)
}

/// Features of the labelled train and test shards of `cfg`, at most `limits`
/// samples each; the training features only of the `eval.label_fraction`
/// subset of the first `limits[0]`.
pub fn features_of(
    vit: &Vit,
    cfg: &RunConfig,
    limits: [Option<usize>; 2],
    skips: &Skips,
) -> anyhow::Result<(Features, Features)> {
    if cfg.data.test.is_empty() {
        bail!("data.test: no test shards given; the evaluation needs labelled test shards");
    }
    let keep = label_subset_of(cfg, limits[0], cfg.eval.label_fraction)?;
    let train = extract(vit, cfg, &cfg.data.train, limits[0], keep.as_ref(), skips).context("data.train")?;
    let test = extract(vit, cfg, &cfg.data.test, limits[1], None, skips).context("data.test")?;
    Ok((train, test))
}

/// A labelled sample's id: its shard's file name and its key (keys are unique
/// within a shard only), what label subsets are drawn by. The file name and not
/// the path, so that the subset stays when the shards move or a config names
/// them by another relative path; two shards of one name in two directories
/// would share ids.
fn sample_id(shard: &Path, key: &str) -> String {
    let name = shard.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    format!("{name}/{key}")
}

/// Visits the first `limit` labelled samples of `patterns` in shard order,
/// those in `keep` (by [`sample_id`]) only when given; a sample without a
/// class label is bad input under `data.on_error`. The limit counts labelled
/// samples before they are decoded, so that a label subset drawn from the
/// first `limit` is the same set whatever decodes.
pub fn for_each_labelled(
    cfg: &RunConfig,
    patterns: &[String],
    limit: Option<usize>,
    keep: Option<&HashSet<String>>,
    skips: &Skips,
    mut visit: impl FnMut(&Path, String, usize, shards::Sample) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let paths = shards::expand(patterns)?;
    if paths.is_empty() {
        bail!("no shards match {patterns:?}");
    }
    let (limit, mut seen) = (limit.unwrap_or(usize::MAX), 0usize);
    for path in &paths {
        for raw in shards::ShardReader::open(path, cfg.data.on_error, skips)? {
            if seen >= limit {
                return Ok(());
            }
            let raw = raw?;
            let label = match raw.class_index() {
                Some(c) if c >= 0 => c as usize,
                _ => {
                    shards::skips::handle_bad(cfg.data.on_error, skips, path, &raw.key, "no class label (KEY.cls)")?;
                    continue;
                }
            };
            seen += 1;
            let id = sample_id(path, &raw.key);
            if keep.is_none_or(|k| k.contains(&id)) {
                visit(path, id, label, raw)?;
            }
        }
    }
    Ok(())
}

/// The ids `eval.label_fraction` keeps of the first `limit` labelled training
/// samples (`None` at fraction 1: all of them).
pub fn label_subset_of(
    cfg: &RunConfig,
    limit: Option<usize>,
    fraction: f64,
) -> anyhow::Result<Option<HashSet<String>>> {
    if fraction >= 1.0 {
        return Ok(None);
    }
    let mut items = Vec::new();
    for_each_labelled(cfg, &cfg.data.train, limit, None, &Skips::quiet(), |_, id, label, _| {
        items.push((id, label));
        Ok(())
    })
    .context("data.train")?;
    let keep = eval::finetune::label_subset(&items, fraction, cfg.eval.label_seed);
    Ok(Some(
        items
            .into_iter()
            .zip(keep)
            .filter(|(_, k)| *k)
            .map(|((id, _), _)| id)
            .collect(),
    ))
}

/// Normalized evaluation views of labelled samples, a batch at a time:
/// decode -> center view ([`eval::eval_image`]) -> `on_batch(images (B, C, H, W), labels)`.
pub fn for_each_eval_batch(
    cfg: &RunConfig,
    patterns: &[String],
    limit: Option<usize>,
    keep: Option<&HashSet<String>>,
    skips: &Skips,
    device: &Device,
    mut on_batch: impl FnMut(&Tensor, &[usize]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let aug = &cfg.stages.augment;
    let (size, batch, channels) = (aug.size, cfg.eval.batch_size, cfg.stages.channels);
    let (mut images, mut labels) = (
        Vec::with_capacity(batch * channels * size * size),
        Vec::with_capacity(batch),
    );
    let mut flush = |images: &mut Vec<f32>, labels: &mut Vec<usize>| -> anyhow::Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let x = Tensor::from_slice(images, (labels.len(), channels, size, size), device)?;
        on_batch(&x, labels)?;
        images.clear();
        labels.clear();
        Ok(())
    };
    for_each_labelled(cfg, patterns, limit, keep, skips, |path, _, label, raw| {
        // The decode training cuts its views from: one luma channel in a one-channel run.
        let decode = &cfg.stages.decode;
        let view = if channels == 1 {
            stages::decode::apply_grey(decode, &raw).map(|g| eval::eval_image_grey(&g, aug, cfg.eval.crop_fraction))
        } else {
            stages::decode::apply(decode, &raw).map(|img| eval::eval_image(&img, aug, cfg.eval.crop_fraction, channels))
        };
        let view = match view {
            Ok(view) => view,
            Err(e) => {
                return shards::skips::handle_bad(cfg.data.on_error, skips, path, &raw.key, &format!("decode: {e}"))
                    .map_err(Into::into)
            }
        };
        images.extend(view);
        labels.push(label);
        if labels.len() == batch {
            flush(&mut images, &mut labels)?;
        }
        Ok(())
    })?;
    flush(&mut images, &mut labels)
}

/// Runs the shards' images through the frozen backbone in batches.
pub fn extract(
    vit: &Vit,
    cfg: &RunConfig,
    patterns: &[String],
    limit: Option<usize>,
    keep: Option<&HashSet<String>>,
    skips: &Skips,
) -> anyhow::Result<Features> {
    let mut out = Features {
        dim: vit.config().embed_dim,
        ..Features::default()
    };
    let device = vit.pos_embed().device().clone();
    for_each_eval_batch(cfg, patterns, limit, keep, skips, &device, |x, labels| {
        let f = eval::backbone_features(vit, x, cfg.eval.features)?;
        out.extend(&f.flatten_all()?.to_vec1::<f32>()?, labels);
        Ok(())
    })?;
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

/// The fine-tune `pipeline run` ends with: `eval.after_run_finetune_fraction`
/// of the labels, the checkpoint's backbone beside its random initialization,
/// both with `eval.finetune`'s recipe and top-1 on all of `data.test` (up to
/// `eval.test_limit`). Their metrics and plots go to RUN/finetune-pretrained
/// and RUN/finetune-random-init. Returns the JSON that goes into summary.json.
pub fn after_run_finetune(cfg: &RunConfig, run_dir: &Path) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    let ckpt = crate::trainer::checkpoint_dir(run_dir);
    let fraction = cfg.eval.after_run_finetune_fraction;
    let device = eval_device(cfg)?;
    let skips = Skips::quiet();
    let pretrained = checkpoint_backbone_tensors(&ckpt)?;
    let random = random_backbone_tensors(&cfg.model, cfg.seed)?;
    let mut reports = Vec::new();
    for (name, backbone) in [("pretrained", &pretrained), ("random-init", &random)] {
        let out = run_dir.join(format!("finetune-{name}"));
        let report = crate::finetune::finetune(cfg, &cfg.model, backbone, fraction, &device, Some(&out), &skips)
            .with_context(|| format!("fine-tuning the {name} backbone"))?;
        reports.push(report);
    }
    Ok(json!({
        "label_fraction": fraction,
        "epochs": reports[0].epochs,
        "train_samples": reports[0].train_samples,
        "test_samples": reports[0].test_samples,
        "pretrained_top1": reports[0].top1,
        "random_init_top1": reports[1].top1,
        "pretrained": &reports[0],
        "random_init": &reports[1],
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

/// [`after_run_finetune`], printed; a failure is a warning and an `error` entry.
pub fn after_run_finetune_report(cfg: &RunConfig, run_dir: &Path) -> serde_json::Value {
    match after_run_finetune(cfg, run_dir) {
        Ok(ft) => {
            println!(
                "fine-tune top-1 at {}% of the labels ({} train / {} test samples, {} epochs): pretrained {:.1}% vs random init {:.1}% ({:.0} s)",
                100.0 * ft["label_fraction"].as_f64().unwrap_or(f64::NAN),
                ft["train_samples"],
                ft["test_samples"],
                ft["epochs"],
                100.0 * ft["pretrained_top1"].as_f64().unwrap_or(f64::NAN),
                100.0 * ft["random_init_top1"].as_f64().unwrap_or(f64::NAN),
                ft["seconds"].as_f64().unwrap_or(0.0)
            );
            ft
        }
        Err(e) => {
            tracing::warn!("no fine-tune at the end of the run: {e:#}");
            json!({ "error": format!("{e:#}") })
        }
    }
}
