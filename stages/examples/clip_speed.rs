//! CPU time of the CLIP teacher per 224 px view, on random ViT-B/16-shaped weights.
//!
//! Writes a vision-only `model.safetensors` in the Hugging Face layout (random
//! values, same shapes as `openai/clip-vit-base-patch16`, ~345 MB) to a temp
//! dir, loads it with [`ClipTeacher::load`] and times [`ClipTeacher::targets`].
//! Speed does not depend on the values, so this stands in for the real weights,
//! which are not downloaded here. A speed figure, so an example and not a test:
//!
//!     cargo run --release -p stages --example clip_speed -- [BATCH] [REPEATS]

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use stages::targets::clip::{ClipConfig, ClipTeacher};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let batch: usize = args.next().map_or(Ok(8), |a| a.parse())?;
    let repeats: usize = args.next().map_or(Ok(3), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model.safetensors");
    let cfg = ClipConfig::vit_base_patch16(&path);
    let (d, m, p) = (cfg.hidden_size, cfg.intermediate_size, cfg.patch_size);

    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("vision_model.embeddings.class_embedding".into(), vec![d]),
        (
            "vision_model.embeddings.patch_embedding.weight".into(),
            vec![d, 3, p, p],
        ),
        (
            "vision_model.embeddings.position_embedding.weight".into(),
            vec![cfg.num_patches() + 1, d],
        ),
        ("visual_projection.weight".into(), vec![cfg.projection_dim, d]),
    ];
    let mut prefixes = vec![
        "vision_model.pre_layrnorm".to_string(),
        "vision_model.post_layernorm".to_string(),
    ];
    for i in 0..cfg.num_hidden_layers {
        let l = format!("vision_model.encoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            shapes.push((format!("{l}.self_attn.{proj}.weight"), vec![d, d]));
            shapes.push((format!("{l}.self_attn.{proj}.bias"), vec![d]));
        }
        shapes.push((format!("{l}.mlp.fc1.weight"), vec![m, d]));
        shapes.push((format!("{l}.mlp.fc1.bias"), vec![m]));
        shapes.push((format!("{l}.mlp.fc2.weight"), vec![d, m]));
        shapes.push((format!("{l}.mlp.fc2.bias"), vec![d]));
        prefixes.push(format!("{l}.layer_norm1"));
        prefixes.push(format!("{l}.layer_norm2"));
    }
    for prefix in prefixes {
        shapes.push((format!("{prefix}.weight"), vec![d]));
        shapes.push((format!("{prefix}.bias"), vec![d]));
    }
    let mut tensors = HashMap::new();
    for (name, shape) in shapes {
        tensors.insert(name, (Tensor::randn(0f32, 1.0, shape, &Device::Cpu)? * 0.02)?);
    }
    candle_core::safetensors::save(&tensors, &path)?;
    drop(tensors);

    let start = Instant::now();
    let teacher = ClipTeacher::load(&cfg, &Device::Cpu)?;
    println!(
        "load: {:.2} s ({} MB)",
        start.elapsed().as_secs_f64(),
        std::fs::metadata(&path)?.len() >> 20
    );
    let s = teacher.image_size();
    let images = Tensor::randn(0f32, 1.0, (batch, 3, s, s), &Device::Cpu)?.to_dtype(DType::F32)?;
    // One warm-up batch, then the timed ones.
    teacher.targets(&images)?;
    let start = Instant::now();
    for _ in 0..repeats {
        let out = teacher.targets(&images)?;
        assert_eq!(out.dims(), &[batch, teacher.num_patches(), teacher.out_dim()]);
    }
    let per_view = start.elapsed().as_secs_f64() / (batch * repeats) as f64;
    println!(
        "ViT-B/16 at {s} px, batch {batch}, {repeats} repeats, {} threads: {:.1} ms per view ({:.2} views/s)",
        candle_core::utils::get_num_threads(),
        per_view * 1e3,
        1.0 / per_view
    );
    Ok(())
}
