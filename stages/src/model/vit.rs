//! The ViT backbone, trainable, with timm's parameter names.
//!
//! Mirrors timm's `VisionTransformer` as MAE uses it (`models_mae.py`, encoder
//! part): `patch_embed.proj` (a conv with stride = kernel = patch, applied here
//! as one matmul on the flattened patches), `cls_token`, a fixed 2D sin-cos
//! `pos_embed` (not trained: a buffer, saved for export), `blocks.i.{norm1,
//! attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`. No classifier head.
//! LayerNorm eps 1e-6 and exact (erf) GELU, as in MAE.
//!
//! ```
//! use stages::model::vit::{Vit, VitConfig};
//! let cfg = VitConfig::vit_tiny_patch4_28();
//! let varmap = candle_nn::VarMap::new();
//! let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &candle_core::Device::Cpu);
//! let vit = Vit::new(&cfg, vb)?;
//! let x = candle_core::Tensor::zeros((2, 1, 28, 28), candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! assert_eq!(vit.forward(&x)?.dims(), &[2, 50, 192]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use super::ops;
use super::patch::pos_embed_2d;
use candle_core::{Result, Tensor};
use candle_nn::{Init, Module, VarBuilder};
use serde::{Deserialize, Serialize};

/// Every parameter is created as zeros; [`super::crossmae::init_weights`] fills
/// them all in one place, from a seeded generator.
pub(crate) const ZERO: Init = Init::Const(0.0);

/// Sizes of a ViT. Presets follow timm's configs
/// (<https://github.com/huggingface/pytorch-image-models/blob/main/timm/models/vision_transformer.py>).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VitConfig {
    /// Square input side in pixels.
    pub img_size: usize,
    /// Square patch side in pixels.
    pub patch_size: usize,
    /// Input channels (1 for Fashion-MNIST, 3 for RGB).
    pub in_chans: usize,
    /// Token width D.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads; must divide `embed_dim`.
    pub num_heads: usize,
    /// MLP hidden width = `mlp_ratio * embed_dim`.
    pub mlp_ratio: f64,
}

impl Default for VitConfig {
    fn default() -> Self {
        Self::vit_tiny_patch4_28()
    }
}

impl VitConfig {
    /// The embedded default: 28 x 28 Fashion-MNIST, 1 channel, patch 4, D 192, depth 6, 3 heads.
    pub fn vit_tiny_patch4_28() -> Self {
        Self {
            img_size: 28,
            patch_size: 4,
            in_chans: 1,
            embed_dim: 192,
            depth: 6,
            num_heads: 3,
            mlp_ratio: 4.0,
        }
    }

    /// timm `vit_small_patch16_224`: D 384, depth 12, 6 heads.
    pub fn vit_small_patch16_224() -> Self {
        Self {
            img_size: 224,
            patch_size: 16,
            in_chans: 3,
            embed_dim: 384,
            depth: 12,
            num_heads: 6,
            mlp_ratio: 4.0,
        }
    }

    /// timm `vit_base_patch16_224`: D 768, depth 12, 12 heads.
    pub fn vit_base_patch16_224() -> Self {
        Self {
            img_size: 224,
            patch_size: 16,
            in_chans: 3,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            mlp_ratio: 4.0,
        }
    }

    /// A preset by name (`vit_tiny_patch4_28`, `vit_small_patch16_224`, `vit_base_patch16_224`).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "vit_tiny_patch4_28" => Some(Self::vit_tiny_patch4_28()),
            "vit_small_patch16_224" => Some(Self::vit_small_patch16_224()),
            "vit_base_patch16_224" => Some(Self::vit_base_patch16_224()),
            _ => None,
        }
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size.max(1)
    }

    /// Patches per image, N.
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Values per patch, P * P * C.
    pub fn patch_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.in_chans
    }

    /// MLP hidden width.
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Checks that the shapes fit; `key` is the config path used in messages.
    pub fn validate(&self, key: &str) -> std::result::Result<(), String> {
        let (s, p) = (self.img_size, self.patch_size);
        if p == 0 || s == 0 || s % p != 0 {
            return Err(format!("{key}.img_size {s} is not divisible by {key}.patch_size {p}"));
        }
        if self.in_chans == 0 || self.depth == 0 {
            return Err(format!("{key}.in_chans and {key}.depth must be positive"));
        }
        let (d, h) = (self.embed_dim, self.num_heads);
        if h == 0 || d == 0 || d % h != 0 {
            return Err(format!("{key}.num_heads {h} does not divide {key}.embed_dim {d}"));
        }
        // The sin-cos embedding splits D into 4 equal parts (row/column x sin/cos).
        if d % 4 != 0 {
            return Err(format!(
                "{key}.embed_dim {d} must be a multiple of 4 (2D sin-cos position embedding)"
            ));
        }
        if self.mlp_hidden() == 0 {
            return Err(format!("{key}.mlp_ratio {} gives an empty MLP", self.mlp_ratio));
        }
        Ok(())
    }
}

/// A linear layer `weight (out, in)`, `bias (out)`: `x W^T + b` on the last dimension.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

/// A [`Linear`] created as zeros (filled by `init_weights`).
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", ZERO)?;
    let bias = vb.get_with_hints(out_dim, "bias", ZERO)?;
    Ok(Linear { weight, bias })
}

impl Module for Linear {
    /// (.., in) -> (.., out) (see [`ops::linear`]).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, &self.bias)
    }
}

/// LayerNorm with a backward pass (see [`ops::layer_norm`]), eps 1e-6 as in MAE.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", ZERO)?,
            bias: vb.get_with_hints(dim, "bias", ZERO)?,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, 1e-6)
    }
}

/// `patch_embed.proj`: conv weight (D, C, P, P) applied to conv-ordered patches.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    weight: Tensor,
    bias: Tensor,
    patch: usize,
}

impl PatchEmbed {
    pub fn new(in_chans: usize, patch: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("proj");
        let weight = vb.get_with_hints((dim, in_chans, patch, patch), "weight", ZERO)?;
        let bias = vb.get_with_hints(dim, "bias", ZERO)?;
        Ok(Self { weight, bias, patch })
    }

    /// (B, N, C*P*P) patches in conv order (c, row, col) -> (B, N, D) tokens.
    pub fn forward_patches(&self, patches: &Tensor) -> Result<Tensor> {
        let k = patches.dim(2)?;
        let d = self.weight.dim(0)?;
        ops::linear(patches, &self.weight.reshape((d, k))?, &self.bias)
    }

    /// (B, C, H, W) images -> (B, N, D) tokens, as the stride-P conv would.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.forward_patches(&ops::pixels::patchify_conv_order(images, self.patch)?)
    }
}

/// Multi-head self-attention, `qkv` fused as in timm.
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    pub fn new(dim: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        let qkv = linear(dim, 3 * dim, vb.pp("qkv"))?;
        let proj = linear(dim, dim, vb.pp("proj"))?;
        let scale = 1.0 / ((dim / num_heads) as f64).sqrt();
        Ok(Self {
            qkv,
            proj,
            num_heads,
            scale,
        })
    }

    /// (B, T, D) -> (B, T, D): qkv, the attention core on the packed heads, proj.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        self.proj.forward(&ops::attention(&qkv, self.num_heads, self.scale)?)
    }
}

/// `fc1 -> GELU (erf) -> fc2`.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(dim, hidden, vb.pp("fc1"))?,
            fc2: linear(hidden, dim, vb.pp("fc2"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::gelu(&self.fc1.forward(x)?)?.apply(&self.fc2)
    }
}

/// Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    pub fn new(dim: usize, num_heads: usize, mlp_hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(dim, vb.pp("norm1"))?,
            attn: Attention::new(dim, num_heads, vb.pp("attn"))?,
            norm2: LayerNorm::new(dim, vb.pp("norm2"))?,
            mlp: Mlp::new(dim, mlp_hidden, vb.pp("mlp"))?,
        })
    }
}

impl Block {
    /// The weights in [`ops::block::NAMES`] order.
    fn weights(&self) -> [&Tensor; 12] {
        [
            &self.norm1.weight,
            &self.norm1.bias,
            &self.attn.qkv.weight,
            &self.attn.qkv.bias,
            &self.attn.proj.weight,
            &self.attn.proj.bias,
            &self.norm2.weight,
            &self.norm2.bias,
            &self.mlp.fc1.weight,
            &self.mlp.fc1.bias,
            &self.mlp.fc2.weight,
            &self.mlp.fc2.bias,
        ]
    }
}

impl Module for Block {
    /// `x + attn(norm1(x))`, then `x + mlp(norm2(x))`, as one op ([`ops::block`];
    /// its twin `block_reference` is this composition of the layers above).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::block(x, self.weights(), self.attn.num_heads, 1e-6)
    }
}

impl Block {
    /// The block under stochastic depth (timm's `DropPath` on both residual
    /// branches): `x1 = x + s1 * attn(norm1(x))`, `x1 + s2 * mlp(norm2(x1))`,
    /// with `s1`, `s2` (B, 1, 1) per-sample scales, 0 or 1 / keep, as one op
    /// ([`ops::block_drop_path`]; fine-tuning only, pre-training drops no
    /// path). The composition it replaced took 12-15% longer per fine-tune.
    pub fn forward_drop_path(&self, x: &Tensor, scales: &[Tensor; 2]) -> Result<Tensor> {
        ops::block_drop_path(x, self.weights(), self.attn.num_heads, 1e-6, scales)
    }
}

/// The backbone f_net.
#[derive(Debug, Clone)]
pub struct Vit {
    pub patch_embed: PatchEmbed,
    cls_token: Tensor,
    /// (1, 1 + N, D), fixed sin-cos, row 0 (cls) zero (a parameter in fine-tuning).
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    cfg: VitConfig,
}

impl Vit {
    pub fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate("vit") {
            candle_core::bail!("{e}")
        }
        let d = cfg.embed_dim;
        let patch_embed = PatchEmbed::new(cfg.in_chans, cfg.patch_size, d, vb.pp("patch_embed"))?;
        let cls_token = vb.get_with_hints((1, 1, d), "cls_token", ZERO)?;
        let n = cfg.num_patches();
        let pos_embed = Tensor::from_vec(pos_embed_2d(d, cfg.grid(), true), (1, n + 1, d), vb.device())?;
        let vb_b = vb.pp("blocks");
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(d, cfg.num_heads, cfg.mlp_hidden(), vb_b.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(d, vb.pp("norm"))?;
        Ok(Self {
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// Makes the position embedding the parameter `pos_embed` of `vb`, as MAE's
    /// fine-tuning trains it (its pre-training, like ours, keeps it fixed). The
    /// parameter starts as zeros: the caller sets it (the sin-cos, or a checkpoint's).
    pub fn learn_pos_embed(&mut self, vb: &VarBuilder) -> Result<()> {
        self.pos_embed = vb.get_with_hints(self.pos_embed.dims(), "pos_embed", ZERO)?;
        Ok(())
    }

    /// The position embedding (1, 1 + N, D), for export under `pos_embed`: the
    /// fixed sin-cos unless [`Vit::learn_pos_embed`] made it a parameter.
    pub fn pos_embed(&self) -> &Tensor {
        &self.pos_embed
    }

    /// Embedded patch tokens (B, N, D), before position embedding -> (B, 1 + N, D)
    /// after the blocks and the final norm; row 0 is the cls token.
    pub fn forward_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        self.blocks_of(tokens, None)?.apply(&self.norm)
    }

    /// Images (B, C, H, W) -> (B, 1 + N, D) after the blocks, before the final
    /// norm (what fine-tuning pools: MAE's global pool replaces `norm` by
    /// `fc_norm`). `drop_path[i]`: block i's branch scales
    /// ([`Block::forward_drop_path`]); `None` at evaluation.
    pub fn forward_unnormed(&self, images: &Tensor, drop_path: Option<&[[Tensor; 2]]>) -> Result<Tensor> {
        self.blocks_of(&self.patch_embed.forward(images)?, drop_path)
    }

    fn blocks_of(&self, tokens: &Tensor, drop_path: Option<&[[Tensor; 2]]>) -> Result<Tensor> {
        let (b, n, d) = tokens.dims3()?;
        let x = tokens.broadcast_add(&self.pos_embed.narrow(1, 1, n)?)?;
        let cls = (&self.cls_token + self.pos_embed.narrow(1, 0, 1)?)?.broadcast_as((b, 1, d))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?;
        match drop_path {
            Some(scales) if scales.len() != self.blocks.len() => {
                candle_core::bail!(
                    "drop path: {} scale pairs for {} blocks",
                    scales.len(),
                    self.blocks.len()
                )
            }
            Some(scales) => {
                for (block, s) in self.blocks.iter().zip(scales) {
                    x = block.forward_drop_path(&x, s)?;
                }
            }
            None => {
                for block in &self.blocks {
                    x = x.apply(block)?;
                }
            }
        }
        Ok(x)
    }

    /// Images (B, C, H, W) -> (B, 1 + N, D).
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        self.forward_tokens(&self.patch_embed.forward(images)?)
    }
}

/// Drops the cls row: (B, 1 + N, D) -> (B, N, D).
pub fn patch_tokens(x: &Tensor) -> Result<Tensor> {
    let t = x.dim(1)?;
    x.narrow(1, 1, t - 1)
}
