//! The CLIP teacher on a tiny random CLIP written by the test in Hugging Face's
//! safetensors layout (hidden 32, 2 layers, 2 heads, patch 4, image 16,
//! projection 8, plus `text_model.*` tensors that must be ignored).
//!
//! What can fail here: tensor names or shapes that drift from the HF layout, CLS
//! kept or the wrong layer taken, post_layernorm or the projection skipped,
//! GELU instead of quick_gelu, a missing or mismatched tensor that loads (or
//! panics) instead of an error naming it, output that differs between runs.
//!
//! Numbers are checked against [`naive_forward`]: the HF `CLIPVisionModelWithProjection`
//! forward (`modeling_clip.py`: CLIPVisionEmbeddings, pre_layrnorm, CLIPEncoderLayer,
//! post_layernorm on `last_hidden_state`, visual_projection) written as plain
//! loops in f64 over the stored weights. Tolerance 1e-4 absolute: candle runs in
//! f32, with outputs of order 1 after the final layer norm, so the sums of
//! 32-64 products differ from f64 by about 1e-6.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use stages::sample::Rgb8;
use stages::targets::clip::{
    clip_normalized_chw, weights_hash, ClipConfig, ClipError, ClipTeacher, CLIP_MEAN, CLIP_STD,
};

const HIDDEN: usize = 32;
const MLP: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 2;
const PATCH: usize = 4;
const IMAGE: usize = 16;
const PROJ: usize = 8;
const GRID: usize = IMAGE / PATCH;
const TOKENS: usize = GRID * GRID + 1;

/// Name -> (shape, values), in the HF layout.
type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn tiny_config(weights: &Path) -> ClipConfig {
    ClipConfig {
        weights: weights.to_path_buf(),
        image_size: IMAGE,
        patch_size: PATCH,
        hidden_size: HIDDEN,
        intermediate_size: MLP,
        num_hidden_layers: LAYERS,
        num_attention_heads: HEADS,
        projection_dim: PROJ,
    }
}

/// Random weights scaled so activations stay of order 1 (uniform, std ~ 1/sqrt(fan_in));
/// layer-norm gains around 1 and non-zero biases, so every term of the forward matters.
fn tiny_weights(seed: u64) -> Weights {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut w = Weights::new();
    let mut put = |name: &str, shape: Vec<usize>, center: f32, scale: f32| {
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|_| center + scale * rng.random_range(-1.0f32..1.0))
            .collect();
        w.insert(name.to_string(), (shape, values));
    };
    let fan = |n: usize| (3.0 / n as f32).sqrt();
    let (d, m) = (HIDDEN, MLP);
    put("vision_model.embeddings.class_embedding", vec![d], 0.0, 1.0);
    put(
        "vision_model.embeddings.patch_embedding.weight",
        vec![d, 3, PATCH, PATCH],
        0.0,
        fan(3 * PATCH * PATCH),
    );
    put(
        "vision_model.embeddings.position_embedding.weight",
        vec![TOKENS, d],
        0.0,
        0.5,
    );
    let mut norms = vec![
        "vision_model.pre_layrnorm".to_string(),
        "vision_model.post_layernorm".to_string(),
    ];
    for i in 0..LAYERS {
        let l = format!("vision_model.encoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            put(&format!("{l}.self_attn.{proj}.weight"), vec![d, d], 0.0, fan(d));
            put(&format!("{l}.self_attn.{proj}.bias"), vec![d], 0.0, 0.2);
        }
        put(&format!("{l}.mlp.fc1.weight"), vec![m, d], 0.0, fan(d));
        put(&format!("{l}.mlp.fc1.bias"), vec![m], 0.0, 0.2);
        put(&format!("{l}.mlp.fc2.weight"), vec![d, m], 0.0, fan(m));
        put(&format!("{l}.mlp.fc2.bias"), vec![d], 0.0, 0.2);
        norms.push(format!("{l}.layer_norm1"));
        norms.push(format!("{l}.layer_norm2"));
    }
    for p in norms {
        put(&format!("{p}.weight"), vec![d], 1.0, 0.3);
        put(&format!("{p}.bias"), vec![d], 0.0, 0.3);
    }
    put("visual_projection.weight", vec![PROJ, d], 0.0, fan(d));
    // The full CLIP file also holds the text tower: ignored.
    put("text_model.embeddings.token_embedding.weight", vec![50, 16], 0.0, 1.0);
    put("text_model.final_layer_norm.weight", vec![16], 1.0, 0.0);
    put("text_projection.weight", vec![PROJ, 16], 0.0, 0.25);
    put("logit_scale", vec![], 2.0, 0.0);
    // HF keeps this buffer in some checkpoints; the loader must not care.
    let ids = (0..TOKENS).map(|i| i as f32).collect();
    w.insert("vision_model.embeddings.position_ids".into(), (vec![1, TOKENS], ids));
    w
}

fn save(weights: &Weights, path: &Path) {
    let tensors: HashMap<String, Tensor> = weights
        .iter()
        .map(|(name, (shape, values))| {
            (
                name.clone(),
                Tensor::from_vec(values.clone(), shape.as_slice(), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&tensors, path).unwrap();
}

/// Normalized random images, (B, 3, IMAGE, IMAGE) row-major.
fn random_images(batch: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..batch * 3 * IMAGE * IMAGE)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect()
}

fn layer_norm(x: &[f64], gain: &[f32], bias: &[f32]) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let inv = 1.0 / (var + 1e-5).sqrt();
    x.iter()
        .enumerate()
        .map(|(i, v)| (v - mean) * inv * gain[i] as f64 + bias[i] as f64)
        .collect()
}

/// y = W x + b with W stored (out, in) as in torch.nn.Linear.
fn linear(x: &[f64], weight: &[f32], bias: Option<&[f32]>, out: usize) -> Vec<f64> {
    let inp = x.len();
    (0..out)
        .map(|o| {
            let dot: f64 = (0..inp).map(|i| weight[o * inp + i] as f64 * x[i]).sum();
            dot + bias.map_or(0.0, |b| b[o] as f64)
        })
        .collect()
}

/// HF CLIPVisionModelWithProjection on one image, patch tokens only: (GRID^2, PROJ).
fn naive_forward(w: &Weights, image: &[f32]) -> Vec<Vec<f64>> {
    let get = |name: &str| -> &[f32] { &w[name].1 };
    let d = HIDDEN;
    // Embeddings: CLS, then the patch conv (stride = kernel = PATCH, no bias) in row-major patch order.
    let conv = get("vision_model.embeddings.patch_embedding.weight");
    let class = get("vision_model.embeddings.class_embedding");
    let mut tokens: Vec<Vec<f64>> = vec![class.iter().map(|&v| v as f64).collect()];
    for gy in 0..GRID {
        for gx in 0..GRID {
            let token = (0..d)
                .map(|o| {
                    let mut sum = 0.0;
                    for c in 0..3 {
                        for ky in 0..PATCH {
                            for kx in 0..PATCH {
                                let pixel = image[(c * IMAGE + gy * PATCH + ky) * IMAGE + gx * PATCH + kx];
                                sum += conv[((o * 3 + c) * PATCH + ky) * PATCH + kx] as f64 * pixel as f64;
                            }
                        }
                    }
                    sum
                })
                .collect();
            tokens.push(token);
        }
    }
    let pos = get("vision_model.embeddings.position_embedding.weight");
    for (t, token) in tokens.iter_mut().enumerate() {
        for (j, v) in token.iter_mut().enumerate() {
            *v += pos[t * d + j] as f64;
        }
    }
    let ln = |x: &[f64], p: &str| layer_norm(x, get(&format!("{p}.weight")), get(&format!("{p}.bias")));
    let mut x: Vec<Vec<f64>> = tokens.iter().map(|t| ln(t, "vision_model.pre_layrnorm")).collect();
    let head = d / HEADS;
    for i in 0..LAYERS {
        let l = format!("vision_model.encoder.layers.{i}");
        let lin = |x: &[f64], name: &str, out: usize| {
            linear(
                x,
                get(&format!("{l}.{name}.weight")),
                Some(get(&format!("{l}.{name}.bias"))),
                out,
            )
        };
        // Attention block, pre-norm, scale head^-0.5 on q.
        let h: Vec<Vec<f64>> = x.iter().map(|t| ln(t, &format!("{l}.layer_norm1"))).collect();
        let q: Vec<Vec<f64>> = h.iter().map(|t| lin(t, "self_attn.q_proj", d)).collect();
        let k: Vec<Vec<f64>> = h.iter().map(|t| lin(t, "self_attn.k_proj", d)).collect();
        let v: Vec<Vec<f64>> = h.iter().map(|t| lin(t, "self_attn.v_proj", d)).collect();
        let scale = 1.0 / (head as f64).sqrt();
        let mut attended = vec![vec![0.0; d]; TOKENS];
        for hd in 0..HEADS {
            let r = hd * head..(hd + 1) * head;
            for a in 0..TOKENS {
                let logits: Vec<f64> = (0..TOKENS)
                    .map(|b| r.clone().map(|j| q[a][j] * k[b][j]).sum::<f64>() * scale)
                    .collect();
                let max = logits.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = logits.iter().map(|z| (z - max).exp()).collect();
                let total: f64 = e.iter().sum();
                for j in r.clone() {
                    attended[a][j] = (0..TOKENS).map(|b| e[b] / total * v[b][j]).sum();
                }
            }
        }
        for (t, a) in x.iter_mut().zip(&attended) {
            let out = lin(a, "self_attn.out_proj", d);
            t.iter_mut().zip(out).for_each(|(v, o)| *v += o);
        }
        // MLP block with quick_gelu: x * sigmoid(1.702 x).
        for t in x.iter_mut() {
            let h = ln(t, &format!("{l}.layer_norm2"));
            let quick_gelu = |z: f64| z / (1.0 + (-1.702 * z).exp());
            let hidden: Vec<f64> = lin(&h, "mlp.fc1", MLP).into_iter().map(quick_gelu).collect();
            let out = lin(&hidden, "mlp.fc2", d);
            t.iter_mut().zip(out).for_each(|(v, o)| *v += o);
        }
    }
    x[1..]
        .iter()
        .map(|t| {
            linear(
                &ln(t, "vision_model.post_layernorm"),
                get("visual_projection.weight"),
                None,
                PROJ,
            )
        })
        .collect()
}

fn error_of(cfg: &ClipConfig) -> String {
    match ClipTeacher::load(cfg, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", cfg.weights.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn tiny_clip_matches_naive_forward_and_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let weights = tiny_weights(1);
    save(&weights, &path);
    let teacher = ClipTeacher::load(&tiny_config(&path), &Device::Cpu).unwrap();
    assert_eq!(
        (teacher.image_size(), teacher.patch_size(), teacher.out_dim()),
        (IMAGE, PATCH, PROJ)
    );
    assert_eq!(teacher.num_patches(), GRID * GRID);

    let batch = 3;
    let pixels = random_images(batch, 2);
    let images = Tensor::from_vec(pixels.clone(), (batch, 3, IMAGE, IMAGE), &Device::Cpu).unwrap();
    let first = teacher.targets(&images).unwrap();
    assert_eq!(first.dims(), &[batch, GRID * GRID, PROJ]);
    let second = teacher.targets(&images).unwrap();
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (a, b) = (values(&first), values(&second));
    assert_eq!(a, b, "two runs on the same batch differ");

    let plane = 3 * IMAGE * IMAGE;
    let mut worst = 0f64;
    for i in 0..batch {
        let expected = naive_forward(&weights, &pixels[i * plane..(i + 1) * plane]);
        for (p, row) in expected.iter().enumerate() {
            for (j, e) in row.iter().enumerate() {
                let got = a[(i * GRID * GRID + p) * PROJ + j] as f64;
                worst = worst.max((got - e).abs());
            }
        }
    }
    assert!(worst < 1e-4, "max |candle - naive| = {worst:e}");
    // The check has teeth: the images differ, and so must their targets.
    let per_image = GRID * GRID * PROJ;
    assert!(a[..per_image]
        .iter()
        .zip(&a[per_image..2 * per_image])
        .any(|(x, y)| (x - y).abs() > 1e-3));
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "vision_model.embeddings.class_embedding",
        "vision_model.encoder.layers.1.mlp.fc2.weight",
        "vision_model.post_layernorm.bias",
        "visual_projection.weight",
    ] {
        let mut weights = tiny_weights(3);
        let expected = weights.remove(name).unwrap().0;
        let path = dir.path().join("missing.safetensors");
        save(&weights, &path);
        let msg = error_of(&tiny_config(&path));
        assert!(msg.contains(&format!("`{name}` is missing")), "{msg}");
        assert!(msg.contains(&format!("{expected:?}")), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wrong.safetensors");
    let mut weights = tiny_weights(4);
    weights.insert(
        "visual_projection.weight".into(),
        (vec![7, HIDDEN], vec![0.0; 7 * HIDDEN]),
    );
    save(&weights, &path);
    let msg = error_of(&tiny_config(&path));
    assert!(msg.contains("`visual_projection.weight` has shape [7, 32]"), "{msg}");
    assert!(msg.contains("expects [8, 32]"), "{msg}");

    // A config whose image size disagrees with the stored position embeddings.
    save(&tiny_weights(4), &path);
    let cfg = ClipConfig {
        image_size: 20,
        ..tiny_config(&path)
    };
    let msg = error_of(&cfg);
    assert!(
        msg.contains("`vision_model.embeddings.position_embedding.weight` has shape [17, 32]"),
        "{msg}"
    );
    assert!(msg.contains("expects [26, 32]"), "{msg}");
}

#[test]
fn deeper_checkpoint_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deeper.safetensors");
    save(&tiny_weights(5), &path);
    let cfg = ClipConfig {
        num_hidden_layers: 1,
        ..tiny_config(&path)
    };
    let msg = error_of(&cfg);
    assert!(
        msg.contains("encoder layer 1, but clip.num_hidden_layers is 1"),
        "{msg}"
    );
}

#[test]
fn missing_or_foreign_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent.safetensors");
    let msg = error_of(&tiny_config(&absent));
    assert!(
        msg.contains(&absent.display().to_string()) && msg.contains("cannot read"),
        "{msg}"
    );

    // A pickled pytorch_model.bin starts with a zip or pickle header, not a safetensors one.
    let bin = dir.path().join("pytorch_model.bin");
    std::fs::write(&bin, b"PK\x03\x04 not a safetensors file at all").unwrap();
    let msg = error_of(&tiny_config(&bin));
    assert!(
        msg.contains(&bin.display().to_string()) && msg.contains("converted"),
        "{msg}"
    );

    let msg = weights_hash(&absent).unwrap_err().to_string();
    assert!(msg.contains(&absent.display().to_string()), "{msg}");
}

#[test]
fn bad_config_and_bad_input_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    save(&tiny_weights(6), &path);
    let cfg = ClipConfig {
        num_attention_heads: 5,
        ..tiny_config(&path)
    };
    assert!(matches!(
        ClipTeacher::load(&cfg, &Device::Cpu),
        Err(ClipError::Config(_))
    ));

    let teacher = ClipTeacher::load(&tiny_config(&path), &Device::Cpu).unwrap();
    let small = Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    let msg = teacher.targets(&small).unwrap_err().to_string();
    assert!(msg.contains("(B, 3, 16, 16)") && msg.contains("[1, 3, 8, 8]"), "{msg}");
    let wrong_dtype = Tensor::zeros((1, 3, 16, 16), candle_core::DType::F64, &Device::Cpu).unwrap();
    assert!(matches!(teacher.targets(&wrong_dtype), Err(ClipError::Input { .. })));
}

#[test]
fn config_defaults_are_vit_b16_and_unknown_keys_fail() {
    let cfg: ClipConfig = serde_json::from_str(r#"{"weights": "clip.safetensors"}"#).unwrap();
    assert_eq!(cfg, ClipConfig::vit_base_patch16("clip.safetensors"));
    assert_eq!(
        (cfg.image_size, cfg.patch_size, cfg.hidden_size, cfg.projection_dim),
        (224, 16, 768, 512)
    );
    assert_eq!(cfg.num_patches(), 196);
    let err = serde_json::from_str::<ClipConfig>(r#"{"weights": "w", "hiden_size": 3}"#).unwrap_err();
    assert!(err.to_string().contains("hiden_size"), "{err}");
    assert!(
        serde_json::from_str::<ClipConfig>(r#"{"image_size": 224}"#).is_err(),
        "weights is required"
    );
}

#[test]
fn weights_hash_is_blake3_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    // Over one read block (1 MiB) so the streaming loop runs more than once.
    let mut bytes: Vec<u8> = (0..(1 << 20) + 12345).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let hash = weights_hash(&path).unwrap();
    assert_eq!(hash, blake3::hash(&bytes).to_hex().to_string());
    assert_eq!(hash.len(), 64);
    bytes[5] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert_ne!(weights_hash(&path).unwrap(), hash);
}

#[test]
#[allow(clippy::excessive_precision)] // OpenAI's published digits, kept verbatim.
fn normalization_is_clip_mean_std_in_chw() {
    // 2 wide x 1 high: pixel (0, 0) pure red, pixel (1, 0) mid grey.
    let pixels = Rgb8 {
        width: 2,
        height: 1,
        data: vec![255, 0, 0, 128, 128, 128],
    };
    let chw = clip_normalized_chw(&pixels);
    assert_eq!(chw.len(), 6);
    for c in 0..3 {
        let red = if c == 0 { 1.0 } else { 0.0 };
        assert!((chw[c * 2] - (red - CLIP_MEAN[c]) / CLIP_STD[c]).abs() < 1e-6);
        assert!((chw[c * 2 + 1] - (128.0 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]).abs() < 1e-6);
    }
    // OpenAI's published values (clip/clip.py `_transform`).
    assert_eq!(CLIP_MEAN, [0.48145466, 0.4578275, 0.40821073]);
    assert_eq!(CLIP_STD, [0.26862954, 0.26130258, 0.27577711]);
}
