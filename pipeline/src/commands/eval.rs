//! `pipeline eval linprobe|knn CONFIG --checkpoint CKPT`: how good are the frozen backbone's features.
//!
//! The backbone's shape comes from the run that wrote the checkpoint
//! (`RUN/config.yaml`, one level above `RUN/ckpt`), falling back to CONFIG's
//! `model:` when the checkpoint lies elsewhere; the data (`data.train` for
//! the probe's training set, `data.test` for its top-1), the normalization
//! (`stages.augment`) and the evaluation settings (`eval:`) come from CONFIG.
//! Features: decode -> center crop / resize -> normalize (no masking) ->
//! frozen backbone -> cls token or mean of patch tokens
//! ([`crate::evaluate`]). The result is one JSON line on stdout.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;
use shards::Skips;
use stages::eval;

use crate::config;
use crate::evaluate::{checkpoint_model, eval_device, features_of, load_backbone, random_backbone};

/// Which evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    Linprobe,
    Knn,
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
}

/// Run `pipeline eval METHOD`.
pub fn run(method: Method, args: &EvalArgs) -> anyhow::Result<()> {
    let cfg = config::load(&args.config, &args.set)?;
    let started = Instant::now();
    let device = eval_device(&cfg)?;
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
        "eval": match method { Method::Linprobe => "linprobe", Method::Knn => "knn" },
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
    }
    line["seconds"] = json!(started.elapsed().as_secs_f64());
    println!("{line}");
    Ok(())
}
