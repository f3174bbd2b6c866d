//! The sink's work on one complete batch: records (ordered by lane and
//! position) into the trainer's [`Batch`], and the batch digest.
//!
//! Images and x̂ stay u8 (H x W x 3 per sample) into the batch; the trainer
//! normalizes them on its device (DESIGN.md "Keep image data as u8 until the sink").

use anyhow::bail;
use stages::train::{Batch, U8Pixels};

use crate::record::Record;

/// What the model takes, so the sink can shape the batch for it.
#[derive(Debug, Clone)]
pub struct SinkShape {
    /// Image side in pixels.
    pub size: usize,
    /// Patches per image.
    pub num_patches: usize,
    /// `stages.augment.mean` / `std`: the normalization the trainer applies.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// A batch on its way to the trainer.
#[derive(Debug, Clone)]
pub struct ReadyBatch {
    /// Global batch index.
    pub index: u64,
    pub epoch: u64,
    pub batch: Batch,
    /// BLAKE3 of keys, views, u8 pixels, x̂, masks and targets in batch order (hex).
    pub digest: String,
}

/// Assemble batch `index` from its records, already in (lane, position) order.
pub fn assemble_batch(index: u64, epoch: u64, records: Vec<Record>, shape: &SinkShape) -> anyhow::Result<ReadyBatch> {
    if records.is_empty() {
        bail!("no sample reached the sink (every sample of the batch was skipped)");
    }
    let b = records.len();
    let plane = shape.size * shape.size;
    // The data stages decode every image to RGB (grey images to three equal channels).
    let c = 3;
    let mut batch = Batch {
        keys: Vec::with_capacity(b),
        epoch,
        images: vec![],
        shape: [b, c, shape.size, shape.size],
        mask: Vec::with_capacity(b * shape.num_patches),
        smoothed: None,
        targets: None,
        pixels: None,
    };
    let mut images = Vec::with_capacity(b * c * plane);
    let mut smoothed = Vec::with_capacity(b * c * plane);
    let mut targets: Vec<f32> = Vec::new();
    let mut hasher = blake3::Hasher::new();
    hasher.update(&index.to_le_bytes());
    // Floats are hashed as their little-endian bytes: on a little-endian
    // machine that is their memory, hashed in place without a copy.
    let hash_floats = |hasher: &mut blake3::Hasher, values: &[f32]| {
        if cfg!(target_endian = "little") {
            hasher.update(bytemuck::cast_slice(values));
        } else {
            for v in values {
                hasher.update(&v.to_le_bytes());
            }
        }
    };
    for r in records {
        let view_size = (r.pixels.width, r.pixels.height);
        if view_size != (shape.size, shape.size)
            || r.pixels.data.len() != c * plane
            || r.smooth.len() != c * plane
            || r.mask.len() != shape.num_patches
        {
            bail!(
                "{}: record shapes do not match the model ({} px, {} patches)",
                r.key,
                shape.size,
                shape.num_patches
            );
        }
        hasher.update(&(r.key.len() as u64).to_le_bytes());
        hasher.update(r.key.as_bytes());
        hasher.update(serde_json::to_string(&r.view)?.as_bytes());
        hasher.update(&r.pixels.data);
        hasher.update(&r.smooth);
        hasher.update(&r.mask);
        for (_, values) in &r.targets {
            hash_floats(&mut hasher, values);
        }
        images.extend_from_slice(&r.pixels.data);
        smoothed.extend_from_slice(&r.smooth);
        batch.mask.extend_from_slice(&r.mask);
        // Targets of several kinds are concatenated per patch.
        if !r.targets.is_empty() {
            for p in 0..shape.num_patches {
                for (dims, values) in &r.targets {
                    targets.extend_from_slice(&values[p * dims..(p + 1) * dims]);
                }
            }
        }
        batch.keys.push(r.key);
    }
    if !targets.is_empty() {
        batch.targets = Some(targets);
    }
    batch.pixels = Some(U8Pixels {
        images,
        smoothed: Some(smoothed),
        mean: shape.mean.to_vec(),
        std: shape.std.to_vec(),
    });
    Ok(ReadyBatch {
        index,
        epoch,
        batch,
        digest: hasher.finalize().to_hex().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Image;
    use stages::sample::Rgb8;

    /// The u8 batch, normalized by the trainer's device code, is bitwise the f32
    /// view the augment stage computes per record; x̂, masks and keys keep batch order.
    #[test]
    fn u8_batch_normalizes_to_the_augment_stages_view() {
        let (size, n) = (4, 4);
        let (mean, std) = ([0.3f32, 0.4, 0.5], [0.2f32, 0.25, 0.3]);
        let records: Vec<Record> = (0..2u8)
            .map(|i| Record {
                key: format!("k{i}"),
                pixels: Image::from(Rgb8 {
                    width: size,
                    height: size,
                    data: (0..size * size * 3)
                        .map(|v| (v as u8).wrapping_mul(37).wrapping_add(i))
                        .collect(),
                }),
                smooth: vec![100 + i; size * size * 3],
                mask: vec![i, 1, 0, 1],
                ..Record::default()
            })
            .collect();
        let want_images: Vec<f32> = records
            .iter()
            .flat_map(|r| stages::augment::normalize(&r.pixels.clone().into(), mean, std))
            .collect();
        let shape = SinkShape {
            size,
            num_patches: n,
            mean,
            std,
        };
        let ready = assemble_batch(7, 0, records.clone(), &shape).unwrap();
        let px = ready.batch.pixels.as_ref().expect("u8 pixels");
        let up = stages::train::feed::normalize_on_device(
            &px.images,
            ready.batch.shape,
            &px.mean,
            &px.std,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let got: Vec<f32> = up.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, want_images);
        assert_eq!(
            px.smoothed.as_ref().unwrap(),
            &[records[0].smooth.clone(), records[1].smooth.clone()].concat()
        );
        assert_eq!(ready.batch.mask, vec![0, 1, 0, 1, 1, 1, 0, 1]);
        assert_eq!(ready.batch.keys, vec!["k0", "k1"]);
        // Another x̂ is another batch.
        let mut other = records;
        other[1].smooth[0] = 0;
        assert_ne!(assemble_batch(7, 0, other, &shape).unwrap().digest, ready.digest);
    }
}
