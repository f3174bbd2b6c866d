//! CrossMAE: draw the masked patches, then predict targets from the drawing.
//!
//! Reads like MAE's `models_mae.py` (facebookresearch/mae): a constructor, one
//! init function, short `forward_draw` / `forward_backbone` / `forward_pred`
//! methods, and `forward` chaining them with the two losses (`ops::draw_loss`,
//! `ops::pred_loss`). The steps follow DESIGN.md "The CrossMAE model":
//!
//! 1. `x_p = patchify(x)`: (B, N, P*P*C); mask (B, N), **1 = removed**.
//! 2. `drawn = E_draw(x_p, mask, z)`: (B, N, P*P*C).
//! 3. `x_draw = mask * drawn + (1 - mask) * x_p`: drawn masked patches, original visible ones.
//! 4. `L_draw` = mean over masked patches of the per-pixel squared error to x̂
//!    (`draw.mode: coarse`) or to x (`original`).
//! 5. `pred = predictor(f_net(x_draw))`: (B, N, D_t); `L_pred` = mean over
//!    patches (all, or masked) of `2 - 2 cos(pred, F(x))`, leaving out patches whose
//!    target has zero norm.
//! 6. `L = L_draw + lambda * L_pred`; L_pred's gradient reaches E_draw through
//!    x_draw unless `draw.detach`.
//!
//! `draw.mode: none` is the MAE-style baseline: f_net sees the masked image with
//! its own `mask_token` in the removed positions, and `L = L_pred`.

use super::draw_head::DrawHead;
use super::ops;
use super::patch::{patchify, unpatchify};
use super::vit::{linear, patch_tokens, Linear, Vit, ZERO};
use super::{DrawMode, ModelConfig, PredOn, PredictorMode};
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder, VarMap};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// What one forward pass needs, all on the model's device.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// x: normalized images (B, C, H, W).
    pub images: Tensor,
    /// x̂: the smoothed images (B, C, H, W); required by `draw.mode: coarse`.
    pub smoothed: Option<Tensor>,
    /// (B, N) f32, 1 = removed.
    pub mask: Tensor,
    /// F(x): (B, N, D_t), never differentiated.
    pub targets: Tensor,
    /// z: (B, D_h); required unless `noise: none` or no drawing.
    pub noise: Option<Tensor>,
}

/// Scalar losses of one forward pass (0-d tensors).
#[derive(Debug, Clone)]
pub struct Losses {
    /// L, the one to differentiate.
    pub loss: Tensor,
    /// L_draw (zero without a drawing head).
    pub loss_draw: Tensor,
    /// L_pred.
    pub loss_pred: Tensor,
}

/// The whole trainable model. Parameters live in the VarMap it was built from.
#[derive(Debug, Clone)]
pub struct CrossMae {
    cfg: ModelConfig,
    /// f_net, under `backbone.`.
    pub backbone: Vit,
    /// E_draw, under `draw.` (absent for the MAE-style baseline).
    pub draw: Option<DrawHead>,
    /// The baseline's mask token (1, 1, D), `mask_token` (only when not drawing).
    mask_token: Option<Tensor>,
    /// `predictor`: Linear(D, D_t) (absent for `predictor: none`).
    predictor: Option<Linear>,
}

impl CrossMae {
    /// Builds the model; shapes are checked first (see [`ModelConfig::validate`]).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("{e}")
        }
        let backbone = Vit::new(&cfg.backbone, vb.pp("backbone"))?;
        let d = cfg.backbone.embed_dim;
        let (draw, mask_token) = match cfg.draw.mode {
            DrawMode::None => (None, Some(vb.get_with_hints((1, 1, d), "mask_token", ZERO)?)),
            _ => (
                Some(DrawHead::new(&cfg.draw, &cfg.backbone, cfg.noise, vb.pp("draw"))?),
                None,
            ),
        };
        let predictor = match cfg.predictor {
            PredictorMode::Linear => Some(linear(d, cfg.effective_target_dim(), vb.pp("predictor"))?),
            PredictorMode::None => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            backbone,
            draw,
            mask_token,
            predictor,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Width of z (0 when the model takes no noise).
    pub fn noise_dim(&self) -> usize {
        match (&self.draw, self.cfg.noise) {
            (Some(h), n) if n != super::NoiseMode::None => h.noise_dim(),
            _ => 0,
        }
    }

    /// E_draw on images (B, C, H, W), mask (B, N) f32 1 = removed, z (B, D_h)
    /// -> drawn patches (B, N, P*P*C), MAE order.
    pub fn forward_draw(&self, images: &Tensor, mask: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
        let Some(head) = &self.draw else {
            candle_core::bail!("forward_draw: draw.mode is none")
        };
        let p = self.cfg.backbone.patch_size;
        let (b, n) = mask.dims2()?;
        head.forward(
            &ops::pixels::patchify_conv_order(images, p)?,
            &mask.reshape((b, n, 1))?,
            z,
        )
    }

    /// The drawing as an image, for viewing (the paper's Figure 3): images
    /// (B, C, H, W), mask (B, N) f32 1 = removed, z (B, D_h) -> x_draw (B, C, H, W).
    pub fn draw_image(&self, images: &Tensor, mask: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
        let (p, c) = (self.cfg.backbone.patch_size, self.cfg.backbone.in_chans);
        let drawn = self.forward_draw(images, mask, z)?;
        let x_p = patchify(images, p)?;
        let mask = mask.unsqueeze(2)?;
        unpatchify(
            &(drawn.broadcast_mul(&mask)? + x_p.broadcast_mul(&(1.0 - &mask)?)?)?,
            p,
            c,
        )
    }

    /// f_net on conv-ordered patches (B, N, C*P*P) -> patch tokens (B, N, D).
    /// With `mask` (B, N), removed positions get the baseline's mask token.
    pub fn forward_backbone(&self, x_conv: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut tokens = self.backbone.patch_embed.forward_patches(x_conv)?;
        if let (Some(m), Some(t)) = (mask, &self.mask_token) {
            let (b, n) = m.dims2()?;
            let m = m.reshape((b, n, 1))?;
            tokens = (tokens.broadcast_mul(&(1.0 - &m)?)? + t.broadcast_mul(&m)?)?;
        }
        patch_tokens(&self.backbone.forward_tokens(&tokens)?)
    }

    /// Patch tokens (B, N, D) -> predictions (B, N, D_t).
    pub fn forward_pred(&self, tokens: &Tensor) -> Result<Tensor> {
        match &self.predictor {
            Some(lin) => lin.forward(tokens),
            None => Ok(tokens.clone()),
        }
    }

    /// The whole forward pass and its losses:
    ///
    /// - `L_draw` = mean over masked patches of the per-pixel squared error of the
    ///   drawing to x̂ (`draw.mode: coarse`) or to x (`original`), [`ops::draw_loss`];
    /// - `x_draw = mask * drawn + (1 - mask) * x`, composed in the stem's (conv) patch order;
    /// - `L_pred` = mean over patches (all, or masked) of `2 - 2 cos(pred, F(x))`,
    ///   leaving out patches whose target has zero norm, [`ops::pred_loss`].
    pub fn forward(&self, inp: &Inputs) -> Result<Losses> {
        let p = self.cfg.backbone.patch_size;
        let mask = &inp.mask; // (B, N), 1 = removed
        let pred_weight = match self.cfg.pred_on {
            PredOn::All => mask.ones_like()?,
            PredOn::Masked => mask.clone(),
        };
        let x_conv = ops::pixels::patchify_conv_order(&inp.images, p)?;
        let Some(head) = &self.draw else {
            let pred = self.forward_pred(&self.forward_backbone(&x_conv, Some(mask))?)?;
            let loss_pred = ops::pred_loss(&pred, &inp.targets, &pred_weight)?;
            return Ok(Losses {
                loss: loss_pred.clone(),
                loss_draw: loss_pred.zeros_like()?,
                loss_pred,
            });
        };
        let (b, n) = mask.dims2()?;
        let drawn = head.forward(&x_conv, &mask.reshape((b, n, 1))?, inp.noise.as_ref())?;
        let draw_target = match (self.cfg.draw.mode, &inp.smoothed) {
            (DrawMode::Coarse, Some(s)) => s,
            (DrawMode::Coarse, None) => {
                candle_core::bail!("draw.mode coarse needs the smoothed image")
            }
            _ => &inp.images,
        };
        let loss_draw = ops::draw_loss(&drawn, draw_target, mask, p)?;
        let drawn = if self.cfg.draw.detach { drawn.detach() } else { drawn };
        let x_draw = ops::pixels::compose_conv_order(&drawn, &inp.images, mask, p)?;
        let pred = self.forward_pred(&self.forward_backbone(&x_draw, None)?)?;
        let loss_pred = ops::pred_loss(&pred, &inp.targets, &pred_weight)?;
        let loss = (&loss_draw + (&loss_pred * self.cfg.lambda)?)?;
        Ok(Losses {
            loss,
            loss_draw,
            loss_pred,
        })
    }
}

/// Initializes every parameter in `varmap` as MAE does (`initialize_weights`),
/// drawing from `rng` in sorted-name order so a seed gives one model everywhere.
///
/// - `cls_token`, `mask_token`: normal(0, 0.02) (MAE: "timm's trunc_normal_(std=.02)
///   is effectively normal_(std=0.02) as cutoff is too big (2.)").
/// - Linear weights: xavier-uniform, as in the JAX ViT (MAE's `_init_weights`).
/// - The patch stem (D, C, P, P): xavier-uniform on its (D, C*P*P) flattening, so
///   it starts like a Linear layer rather than a conv (MAE: "initialize
///   patch_embed like nn.Linear (instead of nn.Conv2d)").
/// - Biases zero (MAE leaves the stem's conv bias at PyTorch's default; DESIGN.md
///   says zero for all).
/// - LayerNorm weight 1, bias 0.
///
/// Draws in name order (a HashMap's order would change the draws).
pub fn init_weights(varmap: &VarMap, rng: &mut impl Rng) -> Result<()> {
    for (name, var) in &named_vars(varmap)? {
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let values: Vec<f32> = if name.ends_with("cls_token") || name.ends_with("mask_token") {
            (0..n)
                .map(|_| 0.02 * Distribution::<f32>::sample(&StandardNormal, rng))
                .collect()
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else if dims.len() == 1 {
            vec![1.0; n] // LayerNorm weight
        } else if dims.len() == 2 || dims.len() == 4 {
            let (fan_out, fan_in) = (dims[0], n / dims[0]);
            let a = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
            (0..n).map(|_| rng.random_range(-a..a)).collect()
        } else {
            candle_core::bail!("init_weights: no rule for parameter {name} with shape {dims:?}")
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?)?;
    }
    Ok(())
}

/// The parameters of a VarMap with their names, sorted by name: the one order
/// initialization, optimizers and exports walk them in.
pub fn named_vars(varmap: &VarMap) -> Result<Vec<(String, candle_core::Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?;
    let mut vars: Vec<(String, candle_core::Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}
