//! `pipeline check-ops --device cuda:0`: every fused op on the device (its CUDA
//! kernels) against the same op on the CPU, at ViT-B/16's shapes, in f32 and in
//! bf16 ([`stages::model::ops::device_check`]). One JSON line per op; exits with an
//! error naming the ops that are off. scripts/gpu-check.sh runs it first.
//!
//! On `--device cpu` it checks the basic-op references against the fused CPU ops
//! instead (what CI's test of the harness does): a way to try the command anywhere.

use anyhow::Context;
use stages::model::autocast::Precision;
use stages::model::ops::device_check::{check_ops, Shapes, Side};

/// Arguments of `pipeline check-ops`.
#[derive(Debug, clap::Args)]
pub struct CheckOpsArgs {
    /// The device to check (`cuda:0`, or `cpu`).
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// The precisions of the device side, comma separated (`f32`, `bf16`).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    pub precision: Vec<String>,
    /// The shapes: `vit-b16` (197 tokens, 768 wide, 12 heads) or `tiny` (the embedded model).
    #[arg(long, default_value = "vit-b16")]
    pub shapes: String,
    /// Samples per batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
}

/// Run `pipeline check-ops`.
pub fn run(args: &CheckOpsArgs) -> anyhow::Result<()> {
    let device = stages::train::device::open(&args.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let side = if device.is_cpu() { Side::Reference } else { Side::Fused };
    let shapes = match args.shapes.as_str() {
        "vit-b16" => Shapes::vit_b16(args.batch),
        "tiny" => Shapes::tiny(args.batch),
        other => anyhow::bail!("--shapes {other}: expected vit-b16 or tiny"),
    };
    let mut failed = Vec::new();
    let mut checked = 0;
    for name in &args.precision {
        let precision = match name.as_str() {
            "f32" => Precision::F32,
            "bf16" => Precision::Bf16,
            other => anyhow::bail!("--precision {other}: expected f32 or bf16"),
        };
        precision.configure_cuda();
        let checks = check_ops(&device, side, precision, &shapes, 1.0)
            .with_context(|| format!("checking the ops on {} in {name}", args.device))?;
        for c in checks {
            let mut line = serde_json::to_value(&c)?;
            line["check"] = serde_json::json!(format!("op {} ({name})", c.op));
            println!("{line}");
            checked += 1;
            if !c.ok {
                failed.push(format!("{} ({name})", c.op));
            }
        }
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "{} of {checked} op checks on {} are outside their tolerance: {}",
            failed.len(),
            args.device,
            failed.join(", ")
        );
    }
    eprintln!("all {checked} op checks on {} within tolerance", args.device);
    Ok(())
}
