//! The EMA target: a momentum copy of the backbone (BYOL / data2vec style).
//!
//! After every optimizer step, `ema = m * ema + (1 - m) * online` with m from
//! [`super::schedule::ema_momentum`] (cosine 0.996 -> 1). Its patch outputs on
//! the original (unmasked) view are the `ema` target F(x); they are never
//! differentiated.

use crate::model::vit::{patch_tokens, Vit, VitConfig};
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;

/// The momentum backbone and the online parameters it follows.
pub struct Ema {
    vit: Vit,
    /// (ema var, online var), sorted by timm name.
    pairs: Vec<(String, Var, Var)>,
}

impl Ema {
    /// Copies the online backbone, whose parameters are `online[prefix + timm name]`.
    pub fn new(cfg: &VitConfig, online: &VarMap, prefix: &str, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vit = Vit::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        let mut pairs = Vec::new();
        {
            let ema_vars = varmap
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("lock".into()))?;
            let online = online
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("lock".into()))?;
            for (name, var) in ema_vars.iter() {
                let key = format!("{prefix}{name}");
                let Some(src) = online.get(&key) else {
                    candle_core::bail!("EMA: online model lacks {key}")
                };
                var.set(src.as_tensor())?;
                pairs.push((name.clone(), var.clone(), src.clone()));
            }
        }
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self { vit, pairs })
    }

    /// `ema = m * ema + (1 - m) * online`.
    pub fn update(&self, momentum: f64) -> Result<()> {
        for (_, ema, online) in &self.pairs {
            let next = ((ema.as_tensor() * momentum)? + (online.as_tensor().detach() * (1.0 - momentum))?)?;
            ema.set(&next)?;
        }
        Ok(())
    }

    /// Targets on the original view: images (B, C, H, W) -> (B, N, D), detached.
    pub fn targets(&self, images: &Tensor) -> Result<Tensor> {
        Ok(patch_tokens(&self.vit.forward(&images.detach())?)?.detach())
    }

    /// The EMA parameters by timm name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.pairs
            .iter()
            .map(|(n, v, _)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Restores the EMA parameters from `tensors[prefix + timm name]`.
    pub fn load(&self, tensors: &HashMap<String, Tensor>, prefix: &str) -> Result<()> {
        for (name, var, _) in &self.pairs {
            let key = format!("{prefix}{name}");
            let Some(t) = tensors.get(&key) else {
                candle_core::bail!("checkpoint lacks {key}")
            };
            if t.dims() != var.dims() {
                candle_core::bail!(
                    "{key}: shape {:?} in the checkpoint, {:?} in the model",
                    t.dims(),
                    var.dims()
                )
            }
            var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_follows_online_with_momentum() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = VitConfig {
            img_size: 8,
            patch_size: 4,
            in_chans: 1,
            embed_dim: 8,
            depth: 1,
            num_heads: 2,
            mlp_ratio: 2.0,
        };
        let online = VarMap::new();
        let _vit = Vit::new(&cfg, VarBuilder::from_varmap(&online, DType::F32, &dev).pp("backbone"))?;
        let qkv = online.data().lock().expect("lock")["backbone.blocks.0.attn.qkv.weight"].clone();
        qkv.set(&qkv.ones_like()?)?;
        let ema = Ema::new(&cfg, &online, "backbone.", &dev)?;
        assert_eq!(
            ema.tensors()["blocks.0.attn.qkv.weight"]
                .flatten_all()?
                .to_vec1::<f32>()?[0],
            1.0
        );
        qkv.set(&(qkv.ones_like()? * 3.0)?)?;
        ema.update(0.75)?;
        // 0.75 * 1 + 0.25 * 3 = 1.5
        assert_eq!(
            ema.tensors()["blocks.0.attn.qkv.weight"]
                .flatten_all()?
                .to_vec1::<f32>()?[0],
            1.5
        );
        Ok(())
    }
}
