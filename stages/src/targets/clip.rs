//! clip target: the frozen CLIP ViT-B/16 vision tower as a teacher (issue 6, item 5).
//!
//! Targets are the patch tokens (not CLS) of the last encoder layer after the
//! final layer norm (`post_layernorm`, OpenAI's `ln_post`) and the visual
//! projection (`visual_projection`, OpenAI's `proj`): 196 x 512 per 224 px view
//! for ViT-B/16. Inputs are normalized with CLIP's own mean and std
//! ([`CLIP_MEAN`], [`CLIP_STD`]), not ImageNet's.
//!
//! Weights are Hugging Face's `openai/clip-vit-base-patch16` `model.safetensors`
//! (the full CLIP; its `text_model.*` and `logit_scale` are ignored) or any
//! vision-only file with the same names. Nothing is downloaded: the README's
//! "CLIP targets" section says where to get the file and how to convert a
//! `pytorch_model.bin`. Every tensor the tower needs is checked against the
//! config before loading, so a missing or mismatched file gives an error naming
//! the file, the tensor and both shapes instead of a panic, and candle's
//! fallback of a *random* `class_embedding` when that tensor is absent
//! (`candle-transformers` `clip/vision_model.rs`) can never happen.
//!
//! The architecture comes from [`ClipConfig`]'s fields (Hugging Face
//! `config.json` `vision_config` names, ViT-B/16 defaults) rather than from a
//! `config.json` beside the weights: the config is then part of the target
//! cache's hash like any other extractor parameter, and a file that does not
//! match it is rejected tensor by tensor.
//!
//! Parity: `stages/tests/clip.rs` runs a tiny random CLIP saved in the HF layout
//! and compares it with a naive forward (plain loops in f64 over the stored
//! weights: patch conv, LN, softmax attention, quick_gelu) within 1e-4 absolute.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::Activation;
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use serde::{Deserialize, Serialize};

use crate::sample::Rgb8;

/// OpenAI CLIP's per-channel RGB mean (of [0, 1] pixels), as in `clip/clip.py` and HF's `CLIPImageProcessor`.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's per-channel RGB std.
#[allow(clippy::excessive_precision)] // OpenAI's published digits, kept verbatim.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Layer-norm epsilon of every CLIP layer norm; candle-transformers hard-codes the same 1e-5.
const LAYER_NORM_EPS: f64 = 1e-5;

/// `clip` extractor config: the weights file and the vision tower's architecture.
///
/// Field names follow Hugging Face's `config.json` (`vision_config.*` and the
/// top-level `projection_dim`); the defaults are `openai/clip-vit-base-patch16`
/// (<https://huggingface.co/openai/clip-vit-base-patch16/blob/main/config.json>).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipConfig {
    /// A safetensors file in the Hugging Face CLIP layout (`vision_model.*`, `visual_projection.weight`).
    pub weights: PathBuf,
    /// Input side in pixels (square).
    #[serde(default = "defaults::image_size")]
    pub image_size: usize,
    /// Patch side in pixels.
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    /// Token width of the tower.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// MLP width.
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// Transformer blocks.
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per block.
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Width after `visual_projection`: the target's values per patch.
    #[serde(default = "defaults::projection_dim")]
    pub projection_dim: usize,
}

/// ViT-B/16 values, one fn per field for serde's `default = "..."`.
mod defaults {
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        16
    }
    pub fn hidden_size() -> usize {
        768
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn projection_dim() -> usize {
        512
    }
}

impl ClipConfig {
    /// `openai/clip-vit-base-patch16`'s vision tower, weights from `weights`.
    pub fn vit_base_patch16(weights: impl Into<PathBuf>) -> ClipConfig {
        ClipConfig {
            weights: weights.into(),
            image_size: defaults::image_size(),
            patch_size: defaults::patch_size(),
            hidden_size: defaults::hidden_size(),
            intermediate_size: defaults::intermediate_size(),
            num_hidden_layers: defaults::num_hidden_layers(),
            num_attention_heads: defaults::num_attention_heads(),
            projection_dim: defaults::projection_dim(),
        }
    }

    /// Patches per view: `(image_size / patch_size)^2`.
    pub fn num_patches(&self) -> usize {
        let side = self.image_size / self.patch_size.max(1);
        side * side
    }

    /// Sizes that cannot build a tower, named by their config key.
    fn validate(&self) -> Result<(), ClipError> {
        let positive = [
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("projection_dim", self.projection_dim),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ClipError::Config(format!("clip.{key} must be positive")));
        }
        if self.image_size % self.patch_size != 0 {
            return Err(ClipError::Config(format!(
                "clip.patch_size {} does not divide clip.image_size {}",
                self.patch_size, self.image_size
            )));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(ClipError::Config(format!(
                "clip.num_attention_heads {} does not divide clip.hidden_size {}",
                self.num_attention_heads, self.hidden_size
            )));
        }
        Ok(())
    }

    /// Every tensor the vision tower reads, with its shape, in the HF layout.
    fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (d, m, p) = (self.hidden_size, self.intermediate_size, self.patch_size);
        let mut expected = vec![
            ("vision_model.embeddings.class_embedding".to_string(), vec![d]),
            (
                "vision_model.embeddings.patch_embedding.weight".to_string(),
                vec![d, 3, p, p],
            ),
            (
                "vision_model.embeddings.position_embedding.weight".to_string(),
                vec![self.num_patches() + 1, d],
            ),
        ];
        let norm = |expected: &mut Vec<(String, Vec<usize>)>, prefix: &str| {
            expected.push((format!("{prefix}.weight"), vec![d]));
            expected.push((format!("{prefix}.bias"), vec![d]));
        };
        // "pre_layrnorm" is HF's spelling, kept by every converted checkpoint.
        norm(&mut expected, "vision_model.pre_layrnorm");
        for i in 0..self.num_hidden_layers {
            let layer = format!("vision_model.encoder.layers.{i}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                expected.push((format!("{layer}.self_attn.{proj}.weight"), vec![d, d]));
                expected.push((format!("{layer}.self_attn.{proj}.bias"), vec![d]));
            }
            norm(&mut expected, &format!("{layer}.layer_norm1"));
            expected.push((format!("{layer}.mlp.fc1.weight"), vec![m, d]));
            expected.push((format!("{layer}.mlp.fc1.bias"), vec![m]));
            expected.push((format!("{layer}.mlp.fc2.weight"), vec![d, m]));
            expected.push((format!("{layer}.mlp.fc2.bias"), vec![d]));
            norm(&mut expected, &format!("{layer}.layer_norm2"));
        }
        norm(&mut expected, "vision_model.post_layernorm");
        expected.push(("visual_projection.weight".to_string(), vec![self.projection_dim, d]));
        expected
    }
}

/// Why the CLIP teacher could not load or run. Each names the file, tensor or config key.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    /// The weights file (or the file to hash) cannot be opened or read.
    #[error("{}: cannot read CLIP weights: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Not a safetensors file (a `pytorch_model.bin`, a truncated download...).
    #[error(
        "{}: not a readable safetensors file ({source}); a pytorch_model.bin must be converted first (README, \"CLIP targets\")",
        path.display()
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// candle's reason.
        source: candle_core::Error,
    },
    /// A tensor the tower needs is not in the file.
    #[error(
        "{}: CLIP tensor `{name}` is missing (expected shape {expected:?}); is this a Hugging Face CLIP checkpoint such as openai/clip-vit-base-patch16?",
        path.display()
    )]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// Full dotted name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor whose shape does not match the config.
    #[error(
        "{}: CLIP tensor `{name}` has shape {actual:?}, the clip config expects {expected:?} (check clip.image_size, patch_size, hidden_size, ...)",
        path.display()
    )]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// Full dotted name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        actual: Vec<usize>,
    },
    /// A tensor stored as integers or bools.
    #[error("{}: CLIP tensor `{name}` is stored as {dtype}, expected f32, f16 or bf16", path.display())]
    NotFloat {
        /// The file.
        path: PathBuf,
        /// Full dotted name.
        name: String,
        /// The stored dtype.
        dtype: String,
    },
    /// The file holds more encoder layers than the config asks for (a larger model).
    #[error(
        "{}: CLIP tensor `{name}` belongs to encoder layer {layer}, but clip.num_hidden_layers is {layers}",
        path.display()
    )]
    ExtraLayer {
        /// The file.
        path: PathBuf,
        /// Full dotted name.
        name: String,
        /// Its layer index.
        layer: usize,
        /// `clip.num_hidden_layers`.
        layers: usize,
    },
    /// A config that cannot build a tower.
    #[error("bad clip config: {0}")]
    Config(String),
    /// Images of the wrong shape or dtype.
    #[error("clip input: expected f32 images of shape (B, 3, {size}, {size}), got {dtype:?} {shape:?}")]
    Input {
        /// `clip.image_size`.
        size: usize,
        /// What was passed.
        shape: Vec<usize>,
        /// Its dtype.
        dtype: DType,
    },
    /// candle failed while building or running the tower.
    #[error("clip: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The frozen CLIP vision tower plus its projection, ready to compute targets.
pub struct ClipTeacher {
    cfg: ClipConfig,
    /// candle-transformers' tower: embeddings, `pre_layrnorm`, encoder (its own `post_layernorm` only sees CLS).
    vision: ClipVisionTransformer,
    /// `vision_model.post_layernorm`, applied here to every patch token.
    post_layernorm: candle_nn::LayerNorm,
    /// `visual_projection` (no bias), hidden_size -> projection_dim.
    visual_projection: candle_nn::Linear,
}

impl ClipTeacher {
    /// Check the weights file against `cfg` tensor by tensor, then load the tower onto `device` in f32.
    pub fn load(cfg: &ClipConfig, device: &Device) -> Result<ClipTeacher, ClipError> {
        cfg.validate()?;
        let path = &cfg.weights;
        std::fs::File::open(path).map_err(|source| ClipError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the file is mapped read-only; like every mmap loader (candle's
        // `from_mmaped_safetensors`), this assumes nobody truncates or rewrites the
        // weights file while the teacher is being built. All tensors are copied out
        // by the VarBuilder, so the mapping is dropped at the end of this function.
        let tensors =
            unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(|source| ClipError::Format {
                path: path.clone(),
                source,
            })?;
        check_tensors(cfg, &tensors)?;

        let vb = VarBuilder::from_backend(Box::new(tensors), DType::F32, device.clone());
        let vision_cfg = ClipVisionConfig {
            embed_dim: cfg.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: cfg.intermediate_size,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            projection_dim: cfg.projection_dim,
            num_channels: 3,
            image_size: cfg.image_size,
            patch_size: cfg.patch_size,
        };
        let vision = ClipVisionTransformer::new(vb.pp("vision_model"), &vision_cfg)?;
        let post_layernorm =
            candle_nn::layer_norm(cfg.hidden_size, LAYER_NORM_EPS, vb.pp("vision_model.post_layernorm"))?;
        let visual_projection =
            candle_nn::linear_no_bias(cfg.hidden_size, cfg.projection_dim, vb.pp("visual_projection"))?;
        Ok(ClipTeacher {
            cfg: cfg.clone(),
            vision,
            post_layernorm,
            visual_projection,
        })
    }

    /// Input side in pixels.
    pub fn image_size(&self) -> usize {
        self.cfg.image_size
    }

    /// Patch side in pixels.
    pub fn patch_size(&self) -> usize {
        self.cfg.patch_size
    }

    /// Values per patch token (`projection_dim`).
    pub fn out_dim(&self) -> usize {
        self.cfg.projection_dim
    }

    /// Patch tokens per view.
    pub fn num_patches(&self) -> usize {
        self.cfg.num_patches()
    }

    /// The config the teacher was built from.
    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }

    /// Targets of a batch of views.
    ///
    /// `images`: (B, 3, S, S) f32, normalized with [`CLIP_MEAN`] / [`CLIP_STD`]
    /// (see [`clip_normalized_chw`]), S = `image_size`, on the teacher's device.
    /// Returns (B, N, out_dim): the N = (S / P)^2 patch tokens in row-major patch
    /// order (CLS dropped) after `post_layernorm` and `visual_projection`.
    ///
    /// Peak memory holds every layer's hidden states of the batch (see below):
    /// about `num_hidden_layers * B * (N + 1) * hidden_size * 4` bytes, 232 MB for
    /// ViT-B/16 at B = 32; callers with big batches split them.
    pub fn targets(&self, images: &Tensor) -> Result<Tensor, ClipError> {
        let s = self.cfg.image_size;
        let dims = images.dims();
        if dims.len() != 4 || dims[1] != 3 || dims[2] != s || dims[3] != s || images.dtype() != DType::F32 {
            return Err(ClipError::Input {
                size: s,
                shape: dims.to_vec(),
                dtype: images.dtype(),
            });
        }
        // candle-transformers' `ClipVisionTransformer::forward` returns only the
        // pooled CLS token after post_layernorm, and its embeddings module is
        // private, so the tower cannot be re-assembled from public parts. Its
        // `output_hidden_states` (public, "required by LLaVA") gives every
        // encoder layer's output for all tokens, followed by the normed CLS; the
        // last encoder output is element `num_hidden_layers - 1`.
        let hidden = self.vision.output_hidden_states(images)?;
        let last = &hidden[self.cfg.num_hidden_layers - 1];
        let patches = last.narrow(1, 1, self.cfg.num_patches())?;
        let normed = self.post_layernorm.forward(&patches)?;
        Ok(self.visual_projection.forward(&normed)?)
    }
}

/// Compare the file's tensors with the ones `cfg` needs: presence, shape, float dtype, no extra layers.
fn check_tensors(cfg: &ClipConfig, tensors: &candle_core::safetensors::MmapedSafetensors) -> Result<(), ClipError> {
    let path = &cfg.weights;
    let stored: std::collections::HashMap<String, (Vec<usize>, safetensors::Dtype)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, (view.shape().to_vec(), view.dtype())))
        .collect();
    for (name, expected) in cfg.expected_tensors() {
        let Some((actual, dtype)) = stored.get(&name) else {
            return Err(ClipError::MissingTensor {
                path: path.clone(),
                name,
                expected,
            });
        };
        if *actual != expected {
            return Err(ClipError::ShapeMismatch {
                path: path.clone(),
                name,
                expected,
                actual: actual.clone(),
            });
        }
        if !matches!(
            dtype,
            safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
        ) {
            return Err(ClipError::NotFloat {
                path: path.clone(),
                name,
                dtype: format!("{dtype:?}"),
            });
        }
    }
    // A deeper checkpoint (ViT-L/14 has 24 layers) with matching widths would
    // otherwise load its first layers silently.
    let mut extra: Vec<(usize, &String)> = stored
        .keys()
        .filter_map(|name| {
            let rest = name.strip_prefix("vision_model.encoder.layers.")?;
            let layer = rest.split('.').next()?.parse::<usize>().ok()?;
            (layer >= cfg.num_hidden_layers).then_some((layer, name))
        })
        .collect();
    extra.sort();
    if let Some((layer, name)) = extra.first() {
        return Err(ClipError::ExtraLayer {
            path: path.clone(),
            name: name.to_string(),
            layer: *layer,
            layers: cfg.num_hidden_layers,
        });
    }
    Ok(())
}

/// BLAKE3 of the weights file as 64 hex digits: the weights' part of the target cache's hash.
pub fn weights_hash(path: &Path) -> Result<String, ClipError> {
    let io = |source| ClipError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = blake3::Hasher::new();
    // Streamed in 1 MiB blocks: the full CLIP file is ~600 MB.
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut block).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&block[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// A u8 RGB view as CLIP's input: C x H x W f32, `(x / 255 - CLIP_MEAN[c]) / CLIP_STD[c]`.
///
/// The view must already be `image_size` square (the view stage resizes); this
/// only changes layout and scale, like the tail of HF's `CLIPImageProcessor`.
pub fn clip_normalized_chw(pixels: &Rgb8) -> Vec<f32> {
    let plane = pixels.width * pixels.height;
    let mut out = vec![0f32; 3 * plane];
    for (i, rgb) in pixels.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (rgb[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    out
}
