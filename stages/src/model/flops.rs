//! Matrix-product FLOPs of a training step, for model FLOP utilization (MFU).
//!
//! What is counted: every matrix product (2 FLOPs per multiply-add) of the
//! forward pass of the backbone, the predictor and the drawing head (patch
//! stems, qkv, q k^T, attention x v, proj, MLP, mapping net, pixel head), times 3
//! for forward + backward (the backward of a product is two products of the same
//! size), plus one forward of the EMA backbone when the targets come from it.
//! What is not: LayerNorm, softmax, GELU, the losses, AdamW (elementwise, <5% of
//! a ViT step), and the first layer's unused input gradient (counted anyway, as
//! is usual). The closed form below is checked against the products the model
//! actually runs ([`super::autocast::count_flops`]) in this file's test.

use super::{DrawMode, ModelConfig, NoiseMode, PredictorMode, TargetSource, VitConfig};
use serde::Serialize;

/// FLOPs per image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepFlops {
    /// Forward of what trains: backbone, predictor, drawing head.
    pub forward: u64,
    /// Forward of the EMA backbone (no backward), 0 without an EMA target.
    pub ema_forward: u64,
    /// `3 * forward + ema_forward`: one training step.
    pub train_step: u64,
}

/// One transformer block on `t` tokens of width `d`, MLP hidden `h`.
fn block(t: u64, d: u64, h: u64) -> u64 {
    let qkv = 2 * t * d * 3 * d;
    let scores = 2 * t * t * d; // all heads together: (t x d/H) (d/H x t), H times
    let mix = 2 * t * t * d;
    let proj = 2 * t * d * d;
    let mlp = 2 * t * d * h * 2;
    qkv + scores + mix + proj + mlp
}

/// A ViT forward: patch stem on `n` patches, then blocks on `tokens[i]` tokens.
fn vit(v: &VitConfig, tokens: impl Iterator<Item = u64>) -> u64 {
    let (n, k, d, h) = (
        v.num_patches() as u64,
        v.patch_dim() as u64,
        v.embed_dim as u64,
        v.mlp_hidden() as u64,
    );
    2 * n * k * d + tokens.map(|t| block(t, d, h)).sum::<u64>()
}

/// The FLOPs of one training step per image for `cfg`.
pub fn step_flops(cfg: &ModelConfig) -> StepFlops {
    let b = &cfg.backbone;
    let n = b.num_patches() as u64;
    // The backbone always runs on cls + all N patches.
    let backbone = vit(b, (0..b.depth).map(|_| n + 1));
    let predictor = match cfg.predictor {
        PredictorMode::Linear => 2 * n * b.embed_dim as u64 * cfg.effective_target_dim() as u64,
        PredictorMode::None => 0,
    };
    let draw = if cfg.draw.mode == DrawMode::None {
        0
    } else {
        let v = cfg.draw.vit(b);
        let dh = v.embed_dim as u64;
        // Blocks 1 and 2 carry one extra token (z, then w) unless there is no noise.
        let extra = if cfg.noise == NoiseMode::None { 0 } else { 2 };
        let mapping = if cfg.noise == NoiseMode::Mapping {
            3 * 2 * dh * dh
        } else {
            0
        };
        let head = 2 * n * dh * v.patch_dim() as u64;
        vit(&v, (0..v.depth).map(|i| n + (i < extra) as u64)) + mapping + head
    };
    let forward = backbone + predictor + draw;
    let ema_forward = if cfg.target == TargetSource::Ema { backbone } else { 0 };
    StepFlops {
        forward,
        ema_forward,
        train_step: 3 * forward + ema_forward,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::autocast::count_flops;
    use crate::model::DrawConfig;
    use crate::train::bench::synthetic_batch;
    use crate::train::{TrainConfig, Trainer};
    use candle_core::Device;

    fn tiny(draw: DrawMode, noise: NoiseMode, target: TargetSource, predictor: PredictorMode) -> ModelConfig {
        let backbone = VitConfig {
            img_size: 16,
            patch_size: 4,
            in_chans: 3,
            embed_dim: 24,
            depth: 2,
            num_heads: 2,
            mlp_ratio: 3.0,
        };
        ModelConfig {
            draw: DrawConfig {
                mode: draw,
                embed_dim: 12,
                depth: 3,
                num_heads: 3,
                mlp_ratio: 2.0,
                detach: false,
            },
            backbone,
            noise,
            target,
            predictor,
            target_dim: if predictor == PredictorMode::None { 24 } else { 10 },
            ..ModelConfig::default()
        }
    }

    /// The closed form equals the products a real training step runs forward
    /// (counted at the matmul calls), for the method and the ablations.
    #[test]
    fn closed_form_matches_the_products_the_model_runs() {
        use PredictorMode::Linear;
        let cases = [
            tiny(DrawMode::Coarse, NoiseMode::Mapping, TargetSource::Batch, Linear),
            tiny(DrawMode::Original, NoiseMode::Concat, TargetSource::Batch, Linear),
            tiny(DrawMode::Coarse, NoiseMode::None, TargetSource::Ema, Linear),
            tiny(
                DrawMode::None,
                NoiseMode::Mapping,
                TargetSource::Ema,
                PredictorMode::None,
            ),
        ];
        let b = 3;
        for cfg in cases {
            let train = TrainConfig {
                batch_size: b,
                epochs: 1,
                warmup_epochs: 0.0,
                ..TrainConfig::default()
            };
            let mut trainer = Trainer::new(&cfg, &train, &Device::Cpu, 1, 10).expect("model");
            let batch = synthetic_batch(&cfg, b, 2);
            let (stats, counted) = count_flops(|| trainer.step(&batch));
            assert!(stats.expect("step").updated);
            let f = step_flops(&cfg);
            // Only forward products pass the counter (backward runs inside candle).
            assert_eq!(counted, b as u64 * (f.forward + f.ema_forward), "{cfg:?}");
        }
    }

    /// ViT-B/16 at 224 by hand: 12 blocks of 197 tokens, D 768, MLP 3072.
    #[test]
    fn vit_b16_backbone_by_hand() {
        let cfg = ModelConfig {
            backbone: VitConfig::vit_base_patch16_224(),
            draw: DrawConfig {
                mode: DrawMode::None,
                ..DrawConfig::default()
            },
            predictor: PredictorMode::Linear,
            target_dim: 108,
            ..ModelConfig::default()
        };
        let (t, d) = (197u64, 768u64);
        let per_block = 2 * t * d * (3 * d + d + 2 * 4 * d) + 2 * 2 * t * t * d;
        let stem = 2 * 196 * 768 * 768;
        let pred = 2 * 196 * 768 * 108;
        let f = step_flops(&cfg);
        assert_eq!(f.forward, 12 * per_block + stem + pred);
        // timm's ViT-B/16 is ~17.6 GFLOPs (multiply-adds x 2) forward at 224 px.
        assert!(
            (f.forward as f64 / 1e9 - 35.2).abs() < 0.5,
            "{}",
            f.forward as f64 / 1e9
        );
    }
}
