//! The backbone under timm's names, for `pipeline export --format timm`.
//!
//! The model already uses timm's names under `backbone.` (see [`super::vit`]),
//! so the export strips the prefix and checks every name and shape against
//! [`timm_vit_shapes`]: what `timm.create_model(name, num_classes=0)` holds
//! for a ViT with a class token, absolute position embedding (cls row
//! included), qkv bias, no layer scale, no fc_norm, no head.
//!
//! Patch layout: our `patch_embed.proj.weight` is stored as the conv weight
//! (D, C, P, P) and applied to patches in conv order (channel, row, column),
//! so it is timm's `Conv2d(C, D, P, stride=P)` weight as it stands; MAE's
//! (row, column, channel) order is used only for pixel targets and drawings
//! (`patch.rs`), never for the stem's weight. A test applies the exported
//! weight as a real convolution.

use super::vit::VitConfig;
use candle_core::{DType, Tensor};
use std::collections::{BTreeMap, HashMap};

/// Every tensor of timm's `VisionTransformer(num_classes=0)` for `cfg`, with its shape.
pub fn timm_vit_shapes(cfg: &VitConfig) -> BTreeMap<String, Vec<usize>> {
    let (d, c, p, h) = (cfg.embed_dim, cfg.in_chans, cfg.patch_size, cfg.mlp_hidden());
    let mut out = BTreeMap::new();
    out.insert("cls_token".into(), vec![1, 1, d]);
    out.insert("pos_embed".into(), vec![1, cfg.num_patches() + 1, d]);
    out.insert("patch_embed.proj.weight".into(), vec![d, c, p, p]);
    out.insert("patch_embed.proj.bias".into(), vec![d]);
    for i in 0..cfg.depth {
        for (name, shape) in [
            ("norm1.weight", vec![d]),
            ("norm1.bias", vec![d]),
            ("attn.qkv.weight", vec![3 * d, d]),
            ("attn.qkv.bias", vec![3 * d]),
            ("attn.proj.weight", vec![d, d]),
            ("attn.proj.bias", vec![d]),
            ("norm2.weight", vec![d]),
            ("norm2.bias", vec![d]),
            ("mlp.fc1.weight", vec![h, d]),
            ("mlp.fc1.bias", vec![h]),
            ("mlp.fc2.weight", vec![d, h]),
            ("mlp.fc2.bias", vec![d]),
        ] {
            out.insert(format!("blocks.{i}.{name}"), shape);
        }
    }
    out.insert("norm.weight".into(), vec![d]);
    out.insert("norm.bias".into(), vec![d]);
    out
}

/// The timm state dict of a checkpoint's model tensors (`backbone.*`, as
/// `Trainer::save` writes them, `backbone.pos_embed` included), as f32.
/// A missing, extra or misshapen tensor is an error naming it.
pub fn timm_state_dict(model: &HashMap<String, Tensor>, cfg: &VitConfig) -> Result<BTreeMap<String, Tensor>, String> {
    let want = timm_vit_shapes(cfg);
    let mut out = BTreeMap::new();
    for (name, t) in model {
        let Some(short) = name.strip_prefix("backbone.") else {
            continue; // drawing head, predictor, EMA copy: not part of the backbone
        };
        let Some(shape) = want.get(short) else {
            return Err(format!("{name}: not a tensor of timm's ViT for this config"));
        };
        if t.dims() != shape.as_slice() {
            return Err(format!("{name}: shape {:?}, timm's ViT has {shape:?}", t.dims()));
        }
        let t = t.to_dtype(DType::F32).map_err(|e| format!("{name}: {e}"))?;
        out.insert(short.to_string(), t);
    }
    if let Some(missing) = want.keys().find(|k| !out.contains_key(*k)) {
        return Err(format!("backbone.{missing}: missing from the checkpoint"));
    }
    Ok(out)
}

/// timm's preset name for `cfg`, if it is one (`vit_small_patch16_224` ...).
pub fn timm_preset_name(cfg: &VitConfig) -> Option<&'static str> {
    ["vit_small_patch16_224", "vit_base_patch16_224"]
        .into_iter()
        .find(|name| VitConfig::preset(name).is_some_and(|p| p == *cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::vit::Vit;
    use candle_core::Device;
    use candle_nn::{VarBuilder, VarMap};

    /// timm's `vit_small_patch16_224` with `num_classes=0`, as timm's
    /// VisionTransformer defines it (embed_dim 384, depth 12, num_heads 6,
    /// mlp_ratio 4, qkv_bias, class token, pos_embed over 14 x 14 + 1 tokens;
    /// `state_dict()` of `timm.create_model("vit_small_patch16_224",
    /// num_classes=0)`): written out here, not derived from our config code.
    fn vit_small_reference() -> Vec<(String, Vec<usize>)> {
        let mut out = vec![
            ("cls_token".to_string(), vec![1, 1, 384]),
            ("pos_embed".to_string(), vec![1, 197, 384]),
            ("patch_embed.proj.weight".to_string(), vec![384, 3, 16, 16]),
            ("patch_embed.proj.bias".to_string(), vec![384]),
        ];
        for i in 0..12 {
            out.extend([
                (format!("blocks.{i}.norm1.weight"), vec![384]),
                (format!("blocks.{i}.norm1.bias"), vec![384]),
                (format!("blocks.{i}.attn.qkv.weight"), vec![1152, 384]),
                (format!("blocks.{i}.attn.qkv.bias"), vec![1152]),
                (format!("blocks.{i}.attn.proj.weight"), vec![384, 384]),
                (format!("blocks.{i}.attn.proj.bias"), vec![384]),
                (format!("blocks.{i}.norm2.weight"), vec![384]),
                (format!("blocks.{i}.norm2.bias"), vec![384]),
                (format!("blocks.{i}.mlp.fc1.weight"), vec![1536, 384]),
                (format!("blocks.{i}.mlp.fc1.bias"), vec![1536]),
                (format!("blocks.{i}.mlp.fc2.weight"), vec![384, 1536]),
                (format!("blocks.{i}.mlp.fc2.bias"), vec![384]),
            ]);
        }
        out.push(("norm.weight".to_string(), vec![384]));
        out.push(("norm.bias".to_string(), vec![384]));
        out
    }

    /// A backbone's checkpoint tensors as `Trainer::save` names them.
    fn checkpoint_tensors(cfg: &VitConfig, random: bool) -> (Vit, HashMap<String, Tensor>) {
        let varmap = VarMap::new();
        let vit = Vit::new(
            cfg,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu).pp("backbone"),
        )
        .unwrap();
        if random {
            let mut rng = shards::rng::stage_rng(3, 0, "export", "test");
            crate::model::init_weights(&varmap, &mut rng).unwrap();
        }
        let mut model: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        model.insert("backbone.pos_embed".into(), vit.pos_embed().clone());
        model.insert(
            "draw.head.weight".into(),
            Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
        );
        (vit, model)
    }

    #[test]
    fn vit_small_export_has_exactly_timms_names_and_shapes() {
        let cfg = VitConfig::vit_small_patch16_224();
        let (_, model) = checkpoint_tensors(&cfg, false);
        let got: Vec<(String, Vec<usize>)> = timm_state_dict(&model, &cfg)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.dims().to_vec()))
            .collect();
        let mut want = vit_small_reference();
        want.sort();
        assert_eq!(got.len(), 4 + 12 * 12 + 2);
        assert_eq!(got, want);
        assert_eq!(timm_preset_name(&cfg), Some("vit_small_patch16_224"));
    }

    #[test]
    fn exported_patch_embed_as_a_convolution_equals_our_patch_embedding() {
        let cfg = VitConfig {
            img_size: 12,
            patch_size: 4,
            in_chans: 3,
            embed_dim: 8,
            depth: 1,
            num_heads: 2,
            mlp_ratio: 2.0,
        };
        let (vit, model) = checkpoint_tensors(&cfg, true);
        let timm = timm_state_dict(&model, &cfg).unwrap();
        // Channels and positions differ, so a transposed layout would show.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 12, 12), &Device::Cpu).unwrap();
        // timm: Conv2d(3, 8, 4, stride=4), then flatten(2).transpose(1, 2).
        let conv = x
            .conv2d(&timm["patch_embed.proj.weight"], 0, 4, 1, 1)
            .unwrap()
            .broadcast_add(&timm["patch_embed.proj.bias"].reshape((1, 8, 1, 1)).unwrap())
            .unwrap()
            .flatten_from(2)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let ours = vit.patch_embed.forward(&x).unwrap();
        let err: f32 = (conv - ours)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(err < 1e-5, "max abs diff {err}");
    }

    #[test]
    fn a_misshapen_or_missing_tensor_is_named() {
        let cfg = VitConfig::vit_tiny_patch4_28();
        let (_, mut model) = checkpoint_tensors(&cfg, false);
        model.remove("backbone.norm.bias");
        let err = timm_state_dict(&model, &cfg).unwrap_err();
        assert!(err.contains("backbone.norm.bias") && err.contains("missing"), "{err}");
        let (_, mut model) = checkpoint_tensors(&cfg, false);
        model.insert(
            "backbone.cls_token".into(),
            Tensor::zeros((1, 2, 192), DType::F32, &Device::Cpu).unwrap(),
        );
        let err = timm_state_dict(&model, &cfg).unwrap_err();
        assert!(
            err.contains("backbone.cls_token") && err.contains("[1, 2, 192]"),
            "{err}"
        );
    }
}
