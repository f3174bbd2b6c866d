//! `pipeline export CKPT --format timm --out FILE.safetensors`: the backbone
//! with timm's names and shapes ([`stages::model::export`]), so that
//!
//! ```python
//! import timm, safetensors.torch as st
//! m = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
//! m.load_state_dict(st.load_file("vit.safetensors"), strict=True)
//! ```
//!
//! loads it and gives the same features (`m.forward_features(x)[:, 0]` is our
//! cls feature). For a size timm has no preset for (the embedded tiny model),
//! the file's metadata `timm_kwargs` holds the `VisionTransformer(**kwargs)`
//! arguments; `timm_model` names the preset when there is one.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use stages::model::export::{timm_preset_name, timm_state_dict};

use crate::evaluate::{load_model_tensors, run_config_of};

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// timm `vit_*` state dict (safetensors).
    Timm,
}

/// Arguments of `pipeline export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The checkpoint directory (RUN/ckpt); RUN/config.yaml gives the backbone's shape.
    pub checkpoint: PathBuf,
    #[arg(long, value_enum, default_value = "timm")]
    pub format: Format,
    /// The safetensors file to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// Run `pipeline export`.
pub fn run(args: &ExportArgs) -> anyhow::Result<()> {
    let cfg = run_config_of(&args.checkpoint)?.with_context(|| {
        format!(
            "{}: no config.yaml in the run directory above the checkpoint; export needs the run's model config",
            args.checkpoint.display()
        )
    })?;
    let vit = &cfg.model.backbone;
    let tensors = load_model_tensors(&args.checkpoint)?;
    let state = timm_state_dict(&tensors, vit).map_err(|e| anyhow::anyhow!("{}: {e}", args.checkpoint.display()))?;
    let bytes: HashMap<String, (Vec<usize>, Vec<u8>)> = state
        .iter()
        .map(|(name, t)| {
            let values = t.flatten_all()?.to_vec1::<f32>()?;
            Ok((
                name.clone(),
                (t.dims().to_vec(), bytemuck::cast_slice(&values).to_vec()),
            ))
        })
        .collect::<candle_core::Result<_>>()?;
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(name, (shape, data))| Ok((name.clone(), TensorView::new(Dtype::F32, shape.clone(), data)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let kwargs = json!({
        "img_size": vit.img_size, "patch_size": vit.patch_size, "in_chans": vit.in_chans,
        "embed_dim": vit.embed_dim, "depth": vit.depth, "num_heads": vit.num_heads,
        "mlp_ratio": vit.mlp_ratio, "num_classes": 0,
    });
    let mut metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("timm_kwargs".to_string(), kwargs.to_string()),
    ]);
    if let Some(name) = timm_preset_name(vit) {
        metadata.insert("timm_model".into(), name.into());
    }
    if let Some(dir) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    safetensors::serialize_to_file(views, Some(metadata), &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "wrote {} ({} tensors, timm {}; load with strict=True and num_classes=0)",
        args.out.display(),
        state.len(),
        timm_preset_name(vit).map_or(format!("VisionTransformer(**{kwargs})"), |n| n.to_string())
    );
    Ok(())
}
