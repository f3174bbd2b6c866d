//! The CrossMAE model in candle: ViT backbone, drawing head, predictor, losses.
//!
//! DESIGN.md "The CrossMAE model" is the specification; [`crossmae`] reads like
//! MAE's `models_mae.py`. The layers run on [`ops`], fused ops with their own
//! backward (candle-nn's LayerNorm, softmax and sdpa have none), each beside the
//! basic-op composition it is tested against (`model.reference_ops: true` runs
//! those); a test checks that every parameter moves after one optimizer step.
//!
//! Parameter names: the backbone under `backbone.` with timm's names (strip the
//! prefix to export), the drawing head under `draw.`, the predictor `predictor.`,
//! and the MAE-style baseline's `mask_token`.

pub mod autocast;
pub mod crossmae;
pub mod draw_head;
pub mod export;
pub mod flops;
pub mod matmul;
pub mod ops;
pub mod patch;
#[cfg(test)]
pub(crate) mod testvectors;
pub mod vit;

pub use crossmae::{init_weights, named_vars, CrossMae, Inputs, Losses};
pub use draw_head::{DrawConfig, DrawHead, DrawMode};
pub use vit::{Vit, VitConfig};

use serde::{Deserialize, Serialize};

/// How noise reaches the drawing head (paper Table 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoiseMode {
    /// No noise token.
    None,
    /// z itself is the extra token of blocks 1 and 2.
    Concat,
    /// z into block 1, w = mapping(z) into block 2 (the paper's method).
    Mapping,
}

/// What maps backbone tokens to the target (paper Table 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PredictorMode {
    /// Backbone tokens are compared with the target directly (needs D = D_t).
    None,
    /// `predictor`: Linear(D, D_t) per patch token.
    Linear,
}

/// Which patches L_pred averages over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PredOn {
    /// Every patch (the default).
    All,
    /// Only the masked (drawn) patches.
    Masked,
}

/// Where the per-patch targets F(x) come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetSource {
    /// The batch carries them (pixel, HOG, Canny, CLIP stages or the cache).
    Batch,
    /// The EMA copy of the backbone on the original view (D_t = D).
    Ema,
}

/// The `model:` section of a run config. Defaults: the tiny Fashion-MNIST
/// preset with the paper's method (coarse drawing, mapped noise, linear
/// predictor, lambda 0.1) and a HOG target (36 values per 4 px grey patch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Backbone sizes (presets: [`VitConfig::preset`]).
    pub backbone: VitConfig,
    /// Drawing head sizes, mode and `detach`.
    pub draw: DrawConfig,
    /// `none | concat | mapping`.
    pub noise: NoiseMode,
    /// `none | linear`.
    pub predictor: PredictorMode,
    /// `batch | ema`.
    pub target: TargetSource,
    /// Per-patch target width D_t when `target: batch` (HOG: 36 per channel for
    /// any patch size, CLIP 512, pixel P*P*C).
    pub target_dim: usize,
    /// `all | masked`: the patches L_pred averages over.
    pub pred_on: PredOn,
    /// Weight of L_pred in L = L_draw + lambda * L_pred.
    pub lambda: f64,
    /// Run every op as its basic-op reference composition instead of the fused op
    /// (`ops`): for comparisons. How to compute, not what: a checkpoint resumes
    /// either way (not in the config hash), and it is left out of the config when false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reference_ops: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            backbone: VitConfig::default(),
            draw: DrawConfig::default(),
            noise: NoiseMode::Mapping,
            predictor: PredictorMode::Linear,
            target: TargetSource::Batch,
            target_dim: 36,
            pred_on: PredOn::All,
            lambda: 0.1,
            reference_ops: false,
        }
    }
}

impl ModelConfig {
    /// The width of F(x) per patch.
    pub fn effective_target_dim(&self) -> usize {
        match self.target {
            TargetSource::Batch => self.target_dim,
            TargetSource::Ema => self.backbone.embed_dim,
        }
    }

    /// Whether the model draws (anything but the MAE-style baseline).
    pub fn draws(&self) -> bool {
        self.draw.mode != DrawMode::None
    }

    /// Rejects shapes that do not fit, naming the config key.
    pub fn validate(&self) -> Result<(), String> {
        self.backbone.validate("model.backbone")?;
        if self.draws() {
            self.draw.vit(&self.backbone).validate("model.draw")?;
        }
        let dt = self.effective_target_dim();
        if dt == 0 {
            return Err("model.target_dim must be positive".into());
        }
        if self.predictor == PredictorMode::None && dt != self.backbone.embed_dim {
            return Err(format!(
                "model.predictor: none compares backbone tokens (model.backbone.embed_dim {}) with the target \
                 directly, but model.target_dim is {dt}; use predictor: linear",
                self.backbone.embed_dim
            ));
        }
        if !self.lambda.is_finite() || self.lambda < 0.0 {
            return Err(format!("model.lambda {} must be finite and >= 0", self.lambda));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_sections_parse_partially_and_reject_unknown_keys() {
        let cfg: ModelConfig = serde_json::from_str(
            r#"{"backbone": {"img_size": 224, "patch_size": 16, "in_chans": 3}, "draw": {"mode": "none"}, "noise": "concat"}"#,
        )
        .expect("valid section");
        assert_eq!(cfg.backbone.embed_dim, 192, "unset keys keep the tiny preset");
        assert_eq!(
            (cfg.draw.mode, cfg.noise, cfg.lambda),
            (DrawMode::None, NoiseMode::Concat, 0.1)
        );
        assert_eq!(cfg.validate(), Ok(()));
        let err = serde_json::from_str::<ModelConfig>(r#"{"draw": {"modes": "none"}}"#)
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("unknown field `modes`")));
        assert!(VitConfig::preset("vit_small_patch16_224").is_some_and(|v| v.embed_dim == 384));
    }
}
