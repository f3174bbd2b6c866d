//! `pipeline viz CKPT --shards PATTERN --out FILE.png [--n 8]`: the paper's
//! Figure 3 as a grid. One row per image, five panels: the image x, the
//! smoothed x̂, the masked x_M (removed patches in magenta, a colour no grey
//! image has), and two drawings x_draw from two noise draws z (visible patches
//! copied from x, removed ones drawn).
//!
//! The model and the data stages come from the run's `config.yaml` (one level
//! above CKPT); the images go through the training chain of epoch `--epoch`
//! (crop, flip, mask as training drew them). z number j of sample KEY is drawn
//! from `stage_rng(seed, epoch, KEY, "viz-noise-j")`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand_distr::{Distribution, StandardNormal};
use stages::model::{CrossMae, NoiseMode};

use crate::evaluate::{load_model_tensors, run_config_of};

/// The marker colour of removed patches in the x_M panel.
pub const MASK_RGB: [u8; 3] = [255, 0, 255];
/// Panels per row.
pub const PANELS: usize = 5;
/// Background between panels.
const GAP: usize = 2;

/// Arguments of `pipeline viz`.
#[derive(Debug, clap::Args)]
pub struct VizArgs {
    /// The checkpoint directory (RUN/ckpt); RUN/config.yaml gives the model and stages.
    pub checkpoint: PathBuf,
    /// Shards to take the images from (brace patterns).
    #[arg(long, value_name = "PATTERN", required = true)]
    pub shards: Vec<String>,
    /// The PNG to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Rows (images).
    #[arg(long, default_value_t = 8)]
    pub n: usize,
    /// Epoch whose crops and masks to use.
    #[arg(long, default_value_t = 0)]
    pub epoch: u64,
    /// Each image pixel becomes scale x scale pixels.
    #[arg(long, default_value_t = 4)]
    pub scale: usize,
}

/// Run `pipeline viz`.
pub fn run(args: &VizArgs) -> anyhow::Result<()> {
    if args.n == 0 || args.scale == 0 {
        bail!("--n and --scale must be positive");
    }
    let cfg = run_config_of(&args.checkpoint)?.with_context(|| {
        format!(
            "{}: no config.yaml in the run directory above the checkpoint; viz needs the run's model and stages",
            args.checkpoint.display()
        )
    })?;
    let tensors: HashMap<String, Tensor> = load_model_tensors(&args.checkpoint)?;
    let model = CrossMae::new(&cfg.model, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
        .with_context(|| format!("loading the model of {}", args.checkpoint.display()))?;
    if model.draw.is_none() {
        bail!(
            "{}: the model has draw.mode none: there is no drawing head to show",
            args.checkpoint.display()
        );
    }
    if cfg.model.noise == NoiseMode::None {
        tracing::warn!("the model takes no noise (model.noise: none): both drawings are the same");
    }

    let paths = shards::expand(&args.shards)?;
    if paths.is_empty() {
        bail!("no shards match {:?}", args.shards);
    }
    // The run's own record stages, reading its target cache when it has one.
    let data_stages = crate::job::standalone_stages(&cfg)?;
    let skips = shards::Skips::default();
    let mut examples = Vec::new();
    'shards: for path in &paths {
        let shard = path.display().to_string();
        for raw in shards::ShardReader::open(path, cfg.data.on_error, &skips)? {
            if examples.len() == args.n {
                break 'shards;
            }
            let ex =
                stages::chain::process_or_skip(&data_stages, &raw?, args.epoch, cfg.data.on_error, &skips, &shard)?;
            examples.extend(ex);
        }
    }
    if examples.is_empty() {
        bail!("no usable images in {:?}", args.shards);
    }
    let (b, size) = (examples.len(), cfg.stages.augment.size);
    let n = examples[0].num_patches();
    let dev = Device::Cpu;
    let images = Tensor::from_vec(
        examples
            .iter()
            .flat_map(|e| e.image.iter().copied())
            .collect::<Vec<_>>(),
        (b, cfg.stages.channels, size, size),
        &dev,
    )?;
    let mask_vals: Vec<f32> = examples
        .iter()
        .flat_map(|e| e.mask.mask.iter().map(|&m| (m != 0) as u8 as f32))
        .collect();
    let mask = Tensor::from_vec(mask_vals, (b, n), &dev)?;
    let dim = model.noise_dim();
    let mut drawings = Vec::new();
    for j in 0..2 {
        let z = if dim == 0 {
            None
        } else {
            let mut z = Vec::with_capacity(b * dim);
            for e in &examples {
                let mut rng = shards::rng::stage_rng(cfg.seed, args.epoch, &e.key, &format!("viz-noise-{j}"));
                z.extend((0..dim).map(|_| Distribution::<f32>::sample(&StandardNormal, &mut rng)));
            }
            Some(Tensor::from_vec(z, (b, dim), &dev)?)
        };
        let drawn = model.draw_image(&images, &mask, z.as_ref())?;
        drawings.push(drawn.flatten_from(1)?.to_vec2::<f32>()?);
    }

    let aug = &cfg.stages.augment;
    let panel = size * args.scale;
    let width = PANELS * panel + (PANELS + 1) * GAP;
    let height = b * panel + (b + 1) * GAP;
    let mut canvas = vec![255u8; width * height * 3];
    for (row, ex) in examples.iter().enumerate() {
        let p = ex.patch;
        let masked = |x: usize, y: usize| ex.mask.mask[(y / p) * (size / p) + x / p] != 0;
        // A one-channel model's planes drawn grey: each RGB channel reads plane 0.
        let one = cfg.stages.channels == 1;
        let at = |plane: &[f32], x: usize, y: usize, c: usize| {
            let c = if one { 0 } else { c };
            to_u8(plane[(c * size + y) * size + x], aug.mean[c], aug.std[c])
        };
        let panels: [&dyn Fn(usize, usize, usize) -> u8; PANELS] = [
            &|x, y, c| at(&ex.image, x, y, c),
            &|x, y, c| at(&ex.smooth, x, y, c),
            &|x, y, c| {
                if masked(x, y) {
                    MASK_RGB[c]
                } else {
                    at(&ex.image, x, y, c)
                }
            },
            &|x, y, c| at(&drawings[0][row], x, y, c),
            &|x, y, c| at(&drawings[1][row], x, y, c),
        ];
        for (col, value) in panels.iter().enumerate() {
            let (top, left) = (GAP + row * (panel + GAP), GAP + col * (panel + GAP));
            for py in 0..panel {
                for px in 0..panel {
                    let at = ((top + py) * width + left + px) * 3;
                    for c in 0..3 {
                        canvas[at + c] = value(px / args.scale, py / args.scale, c);
                    }
                }
            }
        }
    }
    write_png(&args.out, width, height, &canvas)?;
    println!(
        "wrote {} ({b} rows: x, smoothed x̂, masked x_M, drawing z1, drawing z2)",
        args.out.display()
    );
    Ok(())
}

/// A normalized value back to a u8 pixel (inverse of the augment stage's normalization).
fn to_u8(v: f32, mean: f32, std: f32) -> u8 {
    ((v * std + mean) * 255.0).round().clamp(0.0, 255.0) as u8
}

fn write_png(path: &std::path::Path, width: usize, height: usize, rgb: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder
        .write_header()
        .with_context(|| format!("writing {}", path.display()))?;
    writer
        .write_image_data(rgb)
        .with_context(|| format!("writing {}", path.display()))?;
    writer.finish().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
