//! The drawing head E_draw: draws the masked patches of an image from its visible ones.
//!
//! DESIGN.md, "The CrossMAE model", step 3: a patch stem on the masked image
//! (masked positions replaced by a learned `mask_token`), the fixed 2D sin-cos
//! position embedding, then transformer blocks. Noise z ~ N(0, I) of width D_h
//! per sample enters as one extra token: block 0 sees `[z ; tokens]`, block 1
//! sees `[w ; tokens]` with `w = mapping(z)` (pixel-norm, then 3 x (Linear +
//! LeakyReLU 0.2), as StyleGAN's mapping network); the extra token is dropped
//! after each block. LayerNorm, then a Linear to P*P*C pixels per patch (MAE order).
//!
//! Noise modes (paper Table 8): `none` (no extra token), `concat` (z itself is
//! the extra token of both blocks, no mapping network), `mapping` (the default).
//! Blocks beyond the second see no extra token.
//!
//! Parameter names: `patch_embed.proj`, `mask_token`, `mapping.{0,1,2}`,
//! `blocks.i.*` (timm block names), `norm`, `head`.

use super::ops;
use super::patch::pos_embed_2d;
use super::vit::{linear, Block, LayerNorm, Linear, PatchEmbed, VitConfig, ZERO};
use super::NoiseMode;
use candle_core::{Result, Tensor, D};
use candle_nn::{Module, VarBuilder};
use serde::{Deserialize, Serialize};

/// What the drawing head draws towards (paper Table 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrawMode {
    /// No drawing head: the MAE-style baseline (the backbone sees the masked
    /// image with mask tokens and predicts the target).
    None,
    /// L_draw is the MSE to the original image x.
    Original,
    /// L_draw is the MSE to the smoothed image x̂ (the paper's method).
    Coarse,
}

/// The `model.draw:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrawConfig {
    /// `none | original | coarse` (default coarse).
    pub mode: DrawMode,
    /// Token width D_h (also the width of z and w).
    pub embed_dim: usize,
    /// Transformer blocks (the paper: 2).
    pub depth: usize,
    /// Attention heads; must divide `embed_dim`.
    pub num_heads: usize,
    pub mlp_ratio: f64,
    /// Cut L_pred's gradient into the drawing head (x_draw is detached before the backbone).
    pub detach: bool,
}

impl Default for DrawConfig {
    fn default() -> Self {
        Self {
            mode: DrawMode::Coarse,
            embed_dim: 128,
            depth: 2,
            num_heads: 4,
            mlp_ratio: 4.0,
            detach: false,
        }
    }
}

impl DrawConfig {
    /// The drawing head's sizes as a ViT config on the backbone's image and patch.
    pub fn vit(&self, backbone: &VitConfig) -> VitConfig {
        VitConfig {
            embed_dim: self.embed_dim,
            depth: self.depth,
            num_heads: self.num_heads,
            mlp_ratio: self.mlp_ratio,
            ..backbone.clone()
        }
    }
}

/// E_draw.
#[derive(Debug, Clone)]
pub struct DrawHead {
    patch_embed: PatchEmbed,
    mask_token: Tensor,
    /// (1, N, D_h), fixed, no cls row.
    pos_embed: Tensor,
    mapping: Vec<Linear>,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Linear,
    noise: NoiseMode,
    dim: usize,
}

impl DrawHead {
    pub fn new(cfg: &DrawConfig, backbone: &VitConfig, noise: NoiseMode, vb: VarBuilder) -> Result<Self> {
        let v = cfg.vit(backbone);
        let d = v.embed_dim;
        let patch_embed = PatchEmbed::new(v.in_chans, v.patch_size, d, vb.pp("patch_embed"))?;
        let mask_token = vb.get_with_hints((1, 1, d), "mask_token", ZERO)?;
        let n = v.num_patches();
        let pos_embed = Tensor::from_vec(pos_embed_2d(d, v.grid(), false), (1, n, d), vb.device())?;
        let mapping = match noise {
            NoiseMode::Mapping => (0..3)
                .map(|i| linear(d, d, vb.pp("mapping").pp(i)))
                .collect::<Result<_>>()?,
            _ => vec![],
        };
        let blocks = (0..v.depth)
            .map(|i| Block::new(d, v.num_heads, v.mlp_hidden(), vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(d, vb.pp("norm"))?;
        let head = linear(d, v.patch_dim(), vb.pp("head"))?;
        Ok(Self {
            patch_embed,
            mask_token,
            pos_embed,
            mapping,
            blocks,
            norm,
            head,
            noise,
            dim: d,
        })
    }

    /// Width of z.
    pub fn noise_dim(&self) -> usize {
        self.dim
    }

    /// w = mapping(z): pixel-norm, then 3 x (Linear + LeakyReLU 0.2). (B, D_h) -> (B, D_h).
    pub fn map_noise(&self, z: &Tensor) -> Result<Tensor> {
        let rms = (z.sqr()?.mean_keepdim(D::Minus1)? + 1e-8)?.sqrt()?;
        let mut w = z.broadcast_div(&rms)?;
        for layer in &self.mapping {
            w = ops::leaky_relu(&layer.forward(&w)?, 0.2)?;
        }
        Ok(w)
    }

    /// Draws every patch.
    ///
    /// - `patches`: (B, N, C*P*P) the image in conv order (see `patch.rs`)
    /// - `mask`: (B, N, 1) f32, 1 = removed (replaced by the mask token)
    /// - `z`: (B, D_h) noise, required unless the noise mode is `none`
    ///
    /// Returns (B, N, P*P*C) pixels in MAE order.
    pub fn forward(&self, patches: &Tensor, mask: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
        let x = self.patch_embed.forward_patches(patches)?;
        let (b, n, d) = x.dims3()?;
        let keep = (1.0 - mask)?;
        let x = (x.broadcast_mul(&keep)? + self.mask_token.broadcast_mul(mask)?)?;
        let mut x = x.broadcast_add(&self.pos_embed)?;
        let extra = match (self.noise, z) {
            (NoiseMode::None, _) => vec![],
            (_, None) => candle_core::bail!("draw head: noise mode {:?} needs z", self.noise),
            (NoiseMode::Concat, Some(z)) => vec![z.clone(), z.clone()],
            (NoiseMode::Mapping, Some(z)) => vec![z.clone(), self.map_noise(z)?],
        };
        for (i, block) in self.blocks.iter().enumerate() {
            x = match extra.get(i) {
                // [token ; x] through the block, then drop the token again.
                Some(t) => Tensor::cat(&[&t.reshape((b, 1, d))?, &x], 1)?
                    .apply(block)?
                    .narrow(1, 1, n)?,
                None => x.apply(block)?,
            };
        }
        x.apply(&self.norm)?.apply(&self.head)
    }
}
