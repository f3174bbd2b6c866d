//! The sink's work on one complete batch: records (ordered by lane and
//! position) into the trainer's [`Batch`], and the batch digest.

use anyhow::bail;
use stages::train::Batch;

use crate::record::Record;

/// What the model takes, so the sink can shape the batch for it.
#[derive(Debug, Clone)]
pub struct SinkShape {
    /// Image side in pixels.
    pub size: usize,
    /// Patches per image.
    pub num_patches: usize,
}

/// A batch on its way to the trainer.
#[derive(Debug, Clone)]
pub struct ReadyBatch {
    /// Global batch index.
    pub index: u64,
    pub epoch: u64,
    pub batch: Batch,
    /// BLAKE3 of keys, views and tensor bytes in batch order (hex).
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
        images: Vec::with_capacity(b * c * plane),
        shape: [b, c, shape.size, shape.size],
        mask: Vec::with_capacity(b * shape.num_patches),
        smoothed: Some(Vec::with_capacity(b * c * plane)),
        targets: None,
    };
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
        if r.image.len() != c * plane || r.smooth.len() != c * plane || r.mask.len() != shape.num_patches {
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
        hash_floats(&mut hasher, &r.image);
        hash_floats(&mut hasher, &r.smooth);
        hasher.update(&r.mask);
        for (_, values) in &r.targets {
            hash_floats(&mut hasher, values);
        }
        batch.images.extend_from_slice(&r.image);
        if let Some(s) = batch.smoothed.as_mut() {
            s.extend_from_slice(&r.smooth);
        }
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
    Ok(ReadyBatch {
        index,
        epoch,
        batch,
        digest: hasher.finalize().to_hex().to_string(),
    })
}
