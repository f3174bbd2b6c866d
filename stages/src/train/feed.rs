//! Feeding the device: a [`Batch`] of plain vectors -> tensors on the training device.
//!
//! DESIGN.md: "Keep image data as u8 until the sink ... normalize at the sink".
//! The views and x̂ travel as u8 (B, H, W, C), a quarter of the f32 bytes over
//! the host-to-device copy, and are normalized by the device. [`Uploader`] needs
//! no model, so the trainer can run it on the next batch (a prefetch thread)
//! while the current step computes.

use super::{Batch, TrainError};
use crate::model::ModelConfig;
use candle_core::{DType, Device, Tensor};
use rand_distr::{Distribution, StandardNormal};

/// Images as the data stages make them: u8, normalized on the device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct U8Pixels {
    /// The views, (B, H, W, C).
    pub images: Vec<u8>,
    /// x̂ blurred from the u8 pixels and rounded to u8, (B, H, W, C); for `draw.mode: coarse`.
    pub smoothed: Option<Vec<u8>>,
    /// Per channel: normalized = (v / 255 - mean) / std, as `augment::normalize`.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// u8 (B, H, W, C) -> normalized f32 (B, C, H, W) on `device`, with the f32
/// operations of `augment::normalize` in its order (so bitwise equal on the CPU).
pub fn normalize_on_device(
    data: &[u8],
    shape: [usize; 4],
    mean: &[f32],
    std: &[f32],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let [b, c, h, w] = shape;
    let x = Tensor::from_slice(data, (b, h, w, c), device)?
        .to_dtype(DType::F32)?
        .permute((0, 3, 1, 2))?;
    let full = Tensor::new(255f32, device)?;
    let mean = Tensor::from_slice(mean, (1, c, 1, 1), device)?;
    let std = Tensor::from_slice(std, (1, c, 1, 1), device)?;
    x.broadcast_div(&full)?.broadcast_sub(&mean)?.broadcast_div(&std)
}

/// A batch's tensors on the device (EMA targets not yet computed).
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub epoch: u64,
    pub images: Tensor,
    pub smoothed: Option<Tensor>,
    /// (B, N) f32, 1 = removed.
    pub mask: Tensor,
    /// F(x) from the batch, (B, N, D_t); `None` with an EMA target.
    pub targets: Option<Tensor>,
    /// z, (B, D_h).
    pub noise: Option<Tensor>,
}

/// Copies batches to the device; cheap to clone, needs no model.
#[derive(Debug, Clone)]
pub struct Uploader {
    pub(super) model_cfg: ModelConfig,
    pub(super) device: Device,
    pub(super) run_seed: u64,
    /// Width of z (0: no noise).
    pub(super) noise_dim: usize,
    /// Whether the batch's targets are used (false with an EMA target).
    pub(super) batch_targets: bool,
}

impl Uploader {
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// z for each sample: D_h draws of N(0, 1) from `stage_rng(run_seed, epoch, key, "noise")`.
    pub fn noise(&self, keys: &[String], epoch: u64) -> Result<Option<Tensor>, TrainError> {
        let dim = self.noise_dim;
        if dim == 0 {
            return Ok(None);
        }
        let mut z = Vec::with_capacity(keys.len() * dim);
        for key in keys {
            let mut rng = shards::rng::stage_rng(self.run_seed, epoch, key, "noise");
            z.extend((0..dim).map(|_| Distribution::<f32>::sample(&StandardNormal, &mut rng)));
        }
        Ok(Some(Tensor::from_vec(z, (keys.len(), dim), &self.device)?))
    }

    /// Validates `batch` (global index `position`, for errors) and copies it to the device.
    pub fn upload(&self, batch: &Batch, position: u64) -> Result<Uploaded, TrainError> {
        let err = |msg: String| TrainError::Batch { position, msg };
        batch.validate(&self.model_cfg).map_err(err)?;
        let [b, c, h, w] = batch.shape;
        let n = self.model_cfg.backbone.num_patches();
        let coarse = self.model_cfg.draw.mode == crate::model::DrawMode::Coarse;
        let (images, smoothed) = match &batch.pixels {
            Some(px) => {
                let norm = |data: &[u8]| normalize_on_device(data, batch.shape, &px.mean, &px.std, &self.device);
                let smoothed = match (&px.smoothed, &batch.smoothed) {
                    (Some(s), _) if coarse => Some(norm(s)?),
                    (None, Some(s)) if coarse => Some(Tensor::from_slice(s, (b, c, h, w), &self.device)?),
                    _ => None,
                };
                (norm(&px.images)?, smoothed)
            }
            None => {
                let smoothed = match &batch.smoothed {
                    Some(s) if coarse => Some(Tensor::from_slice(s, (b, c, h, w), &self.device)?),
                    _ => None,
                };
                (Tensor::from_slice(&batch.images, (b, c, h, w), &self.device)?, smoothed)
            }
        };
        let mask: Vec<f32> = batch.mask.iter().map(|&m| (m != 0) as u8 as f32).collect();
        let mask = Tensor::from_vec(mask, (b, n), &self.device)?;
        let targets = match (&batch.targets, self.batch_targets) {
            (Some(t), true) => Some(Tensor::from_slice(t, (b, n, self.model_cfg.target_dim), &self.device)?),
            (None, true) => return Err(err("no per-patch targets".into())),
            (_, false) => None,
        };
        Ok(Uploaded {
            epoch: batch.epoch,
            images,
            smoothed,
            mask,
            targets,
            noise: self.noise(&batch.keys, batch.epoch)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::normalize;
    use crate::sample::Rgb8;
    use rand::{Rng, SeedableRng};

    /// The device normalization is bitwise the data stages' normalization.
    #[test]
    fn device_normalization_is_bitwise_augment_normalize() -> candle_core::Result<()> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let (b, h, w) = (3, 5, 7);
        let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
        let images: Vec<Vec<u8>> = (0..b).map(|_| (0..h * w * 3).map(|_| rng.random()).collect()).collect();
        let want: Vec<f32> = images
            .iter()
            .flat_map(|data| {
                let img = Rgb8 {
                    width: w,
                    height: h,
                    data: data.clone(),
                };
                normalize(&img, mean, std)
            })
            .collect();
        let all: Vec<u8> = images.concat();
        let got = normalize_on_device(&all, [b, 3, h, w], &mean, &std, &Device::Cpu)?;
        assert_eq!(got.dims(), &[b, 3, h, w]);
        let got: Vec<f32> = got.flatten_all()?.to_vec1()?;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want));
        Ok(())
    }
}
