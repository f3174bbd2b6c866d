//! `pipeline eval linprobe|knn|finetune CONFIG --checkpoint CKPT`: how good
//! are the frozen backbone's features (linear probe, kNN), and what does the
//! backbone give when fine-tuned end to end with a classifier head
//! ([`crate::finetune`], MAE's recipe under `eval.finetune`).
//!
//! The backbone's shape comes from the run that wrote the checkpoint
//! (`RUN/config.yaml`, one level above `RUN/ckpt`), falling back to CONFIG's
//! `model:` when the checkpoint lies elsewhere; the data (`data.train` for
//! the probe's training set, `data.test` for its top-1), the normalization
//! (`stages.augment`) and the evaluation settings (`eval:`) come from CONFIG.
//! Features: decode -> center crop / resize -> normalize (no masking) ->
//! frozen backbone -> cls token or mean of patch tokens
//! ([`crate::evaluate`]). All three train on the `eval.label_fraction`
//! subset of `data.train`. The result is one JSON line on stdout; a fine-tune
//! also writes its metrics.jsonl and finetune.png into `--out`.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;
use shards::Skips;
use stages::eval;

use crate::config;
use crate::evaluate::{
    checkpoint_backbone_tensors, checkpoint_model, eval_device, features_of, load_backbone, random_backbone,
    random_backbone_tensors,
};
use anyhow::Context;

/// Which evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    Linprobe,
    Knn,
    Finetune,
}

/// Arguments of `pipeline eval linprobe|knn`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// The config naming the labelled shards (`data.train`, `data.test`) and the `eval:` settings.
    pub config: PathBuf,
    /// The checkpoint directory (RUN/ckpt) whose backbone to evaluate.
    #[arg(long, required_unless_present = "random_init")]
    pub checkpoint: Option<PathBuf>,
    /// Evaluate the config's model at its random initialization (seed `seed`) instead.
    #[arg(long, conflicts_with = "checkpoint")]
    pub random_init: bool,
    /// Override config values: `--set eval.features=mean`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Where a fine-tune writes metrics.jsonl and finetune.png (default:
    /// RUN/finetune next to RUN/ckpt, or runs/finetune-random-init).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Run `pipeline eval METHOD`.
pub fn run(method: Method, args: &EvalArgs) -> anyhow::Result<()> {
    let cfg = config::load(&args.config, &args.set)?;
    let started = Instant::now();
    let device = eval_device(&cfg)?;
    if method == Method::Finetune {
        return finetune(&cfg, args, &device);
    }
    let (backbone, source) = match &args.checkpoint {
        Some(ckpt) => (
            load_backbone(ckpt, &checkpoint_model(ckpt, &cfg)?, &device)?,
            ckpt.display().to_string(),
        ),
        None => (
            random_backbone(&cfg.model, cfg.seed, &device)?,
            format!("random init (seed {})", cfg.seed),
        ),
    };
    let skips = Skips::default();
    let limits = [cfg.eval.train_limit, cfg.eval.test_limit];
    let (train, test) = features_of(&backbone, &cfg, limits, &skips)?;
    let mut line = json!({
        "eval": match method { Method::Linprobe => "linprobe", Method::Knn => "knn", Method::Finetune => "finetune" },
        "backbone": source,
        "features": cfg.eval.features,
        "train_samples": train.len(),
        "test_samples": test.len(),
        "skipped": skips.total(),
    });
    match method {
        Method::Linprobe => {
            let r = eval::linprobe::evaluate(&cfg.eval.linprobe, &train, &test, &device)?;
            line["top1"] = json!(r.test_top1);
            line["train_top1"] = json!(r.train_top1);
        }
        Method::Knn => {
            let top1 = eval::knn::evaluate(&cfg.eval.knn, &train, &test, &device)?;
            line["top1"] = json!(top1);
            line["k"] = json!(cfg.eval.knn.k);
        }
        Method::Finetune => unreachable!("fine-tuning returned above"),
    }
    line["seconds"] = json!(started.elapsed().as_secs_f64());
    println!("{line}");
    Ok(())
}

/// `pipeline eval finetune`.
fn finetune(cfg: &config::RunConfig, args: &EvalArgs, device: &candle_core::Device) -> anyhow::Result<()> {
    let (model, backbone, source, out) = match &args.checkpoint {
        Some(ckpt) => {
            let model = checkpoint_model(ckpt, cfg)?;
            let run = ckpt.parent().unwrap_or(std::path::Path::new("."));
            (
                model,
                checkpoint_backbone_tensors(ckpt)?,
                ckpt.display().to_string(),
                run.join("finetune"),
            )
        }
        None => (
            cfg.model.clone(),
            random_backbone_tensors(&cfg.model, cfg.seed)?,
            format!("random init (seed {})", cfg.seed),
            PathBuf::from("runs/finetune-random-init"),
        ),
    };
    let out = args.out.clone().unwrap_or(out);
    let skips = Skips::default();
    let report = crate::finetune::finetune(
        cfg,
        &model,
        &backbone,
        cfg.eval.label_fraction,
        device,
        Some(&out),
        &skips,
    )
    .with_context(|| format!("fine-tuning {source}"))?;
    let mut line = serde_json::to_value(&report)?;
    line["eval"] = json!("finetune");
    line["backbone"] = json!(source);
    line["out"] = json!(out.display().to_string());
    line["skipped"] = json!(skips.total());
    println!("{line}");
    Ok(())
}
