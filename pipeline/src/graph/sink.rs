//! The sink's work on one complete batch: records (ordered by lane and
//! position) into the trainer's [`Batch`], and the batch digest.
//!
//! Images and x̂ stay u8 (H x W x 3 per sample) into the batch; the trainer
//! normalizes them on its device (DESIGN.md "Keep image data as u8 until the sink").

use anyhow::bail;
use stages::train::{Batch, U8Pixels};

use xxhash_rust::xxh3::Xxh3;

use stages::record::{self, Record};

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
    /// Channels the model sees (`stages.channels`): 3, or 1 (the views' luma).
    pub channels: usize,
}

impl SinkShape {
    /// The batch shape the `stages:` config gives.
    pub fn of(stages: &stages::StagesConfig) -> SinkShape {
        let a = &stages.augment;
        SinkShape {
            size: a.size,
            num_patches: (a.size / stages.patch).pow(2),
            mean: a.mean,
            std: a.std,
            channels: stages.channels,
        }
    }
}

/// A batch on its way to the trainer.
#[derive(Debug, Clone)]
pub struct ReadyBatch {
    /// Global batch index.
    pub index: u64,
    pub epoch: u64,
    pub batch: Batch,
    /// xxh3-128 (hex) of the index and the records' digests in batch order: keys,
    /// views, u8 pixels, x̂, masks and targets (see `stages::record::digest`).
    pub digest: String,
}

/// Spent batches, handed back once their data is on the training device, so
/// the sink fills their buffers again. A batch of 512 views at 224 px is about
/// 200 MB: allocated afresh, glibc maps it (it is over the mmap threshold),
/// every page faults in zeroed and is unmapped again on drop, which made the
/// sink, on its one worker, cost a fifth of the graph's time in
/// `bench data --only graph` (a tenth at batch 32, whose buffers glibc reuses).
#[derive(Clone)]
pub struct Recycler {
    spent: crossbeam::channel::Sender<Batch>,
    spare: crossbeam::channel::Receiver<Batch>,
}

impl Default for Recycler {
    fn default() -> Self {
        // One spare: the sink fills one batch while the others are in flight,
        // and the process holds at most one batch more than it would anyway.
        let (spent, spare) = crossbeam::channel::bounded(1);
        Recycler { spent, spare }
    }
}

impl Recycler {
    /// Hand back a batch whose data is no longer needed (dropped when a spare is already waiting).
    pub fn give(&self, batch: Batch) {
        let _ = self.spent.try_send(batch);
    }

    /// A spent batch to refill, if one is waiting.
    pub fn take(&self) -> Option<Batch> {
        self.spare.try_recv().ok()
    }
}

/// The vectors of a spent batch, emptied, with their capacity.
struct Buffers {
    keys: Vec<String>,
    mask: Vec<u8>,
    images: Vec<u8>,
    smoothed: Vec<u8>,
    targets: Vec<f32>,
}

impl Buffers {
    fn from_spent(spent: Option<Batch>) -> Buffers {
        let Some(b) = spent else {
            return Buffers {
                keys: Vec::new(),
                mask: Vec::new(),
                images: Vec::new(),
                smoothed: Vec::new(),
                targets: Vec::new(),
            };
        };
        let (images, smoothed) = match b.pixels {
            Some(p) => (p.images, p.smoothed.unwrap_or_default()),
            None => (Vec::new(), Vec::new()),
        };
        let mut buffers = Buffers {
            keys: b.keys,
            mask: b.mask,
            images,
            smoothed,
            targets: b.targets.unwrap_or_default(),
        };
        buffers.keys.clear();
        buffers.mask.clear();
        buffers.images.clear();
        buffers.smoothed.clear();
        buffers.targets.clear();
        buffers
    }
}

/// Assemble batch `index` from its records, already in (lane, position) order,
/// into the buffers of `spent` (a batch handed back through [`Recycler`]) when given.
pub fn assemble_batch(
    index: u64,
    epoch: u64,
    records: Vec<Record>,
    shape: &SinkShape,
    spent: Option<Batch>,
) -> anyhow::Result<ReadyBatch> {
    if records.is_empty() {
        bail!("no sample reached the sink (every sample of the batch was skipped)");
    }
    let b = records.len();
    let plane = shape.size * shape.size;
    // A one-channel run's records carry the views' luma (the augment stage keeps
    // only that), an RGB run's the three channels: either way `c` planes.
    let c = shape.channels;
    let Buffers {
        mut keys,
        mut mask,
        mut images,
        mut smoothed,
        mut targets,
    } = Buffers::from_spent(spent);
    keys.reserve(b);
    mask.reserve(b * shape.num_patches);
    images.reserve(b * c * plane);
    smoothed.reserve(b * c * plane);
    // The batch digest: xxh3-128 of the index and each record's digest in
    // batch order. The records come with theirs (hashed in parallel on the
    // workers that ran the stages, `Stages::apply` seals it after targets); one without is hashed here.
    let mut hasher = Xxh3::new();
    hasher.update(&index.to_le_bytes());
    for r in records {
        let view_size = (r.pixels.width, r.pixels.height);
        if view_size != (shape.size, shape.size)
            || r.pixels.data.len() != c * plane
            || r.smooth.len() != c * plane
            || r.mask.mask.len() != shape.num_patches
        {
            bail!(
                "{}: record shapes do not match the model ({} px, {} channels, {} patches)",
                r.key,
                shape.size,
                c,
                shape.num_patches
            );
        }
        hasher.update(&r.digest.unwrap_or_else(|| record::digest(&r)));
        images.extend_from_slice(&r.pixels.data);
        smoothed.extend_from_slice(&r.smooth);
        mask.extend_from_slice(&r.mask.mask);
        if let Some((dims, values)) = r
            .targets
            .iter()
            .find(|(dims, values)| values.len() != dims * shape.num_patches)
        {
            bail!(
                "{}: a target of {} values is not {} patches of {dims}",
                r.key,
                values.len(),
                shape.num_patches
            );
        }
        // Targets of several kinds are concatenated per patch; one kind is
        // its values as they are (one copy, not one per patch).
        if let [(_, values)] = r.targets.as_slice() {
            targets.extend_from_slice(values);
        } else if !r.targets.is_empty() {
            for p in 0..shape.num_patches {
                for (dims, values) in &r.targets {
                    targets.extend_from_slice(&values[p * dims..(p + 1) * dims]);
                }
            }
        }
        keys.push(r.key);
    }
    let batch = Batch {
        keys,
        epoch,
        images: vec![],
        shape: [b, c, shape.size, shape.size],
        mask,
        smoothed: None,
        targets: (!targets.is_empty()).then_some(targets),
        pixels: Some(U8Pixels {
            images,
            smoothed: Some(smoothed),
            mean: shape.mean[..c].to_vec(),
            std: shape.std[..c].to_vec(),
        }),
    };
    Ok(ReadyBatch {
        index,
        epoch,
        batch,
        digest: format!("{:032x}", hasher.digest128()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stages::record::Image;
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
                mask: stages::sample::Mask {
                    mask: vec![i, 1, 0, 1],
                    ..Default::default()
                },
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
            channels: 3,
        };
        let ready = assemble_batch(7, 0, records.clone(), &shape, None).unwrap();
        // A one-channel model: its records carry one plane (the augment stage's
        // luma), packed as they are, normalized with the first mean and std.
        let grey_records: Vec<Record> = records
            .iter()
            .map(|r| Record {
                pixels: Image {
                    data: r.pixels.data.chunks_exact(3).map(stages::sample::luma).collect(),
                    ..r.pixels.clone()
                },
                smooth: r.smooth[..size * size].to_vec(),
                ..r.clone()
            })
            .collect();
        let grey_shape = SinkShape {
            channels: 1,
            ..shape.clone()
        };
        let grey = assemble_batch(7, 0, grey_records.clone(), &grey_shape, None).unwrap();
        assert_eq!(grey.batch.shape, [2, 1, size, size]);
        let gpx = grey.batch.pixels.as_ref().expect("u8 pixels");
        let planes: Vec<u8> = grey_records.iter().flat_map(|r| r.pixels.data.clone()).collect();
        assert_eq!(gpx.images, planes);
        assert_eq!(
            gpx.smoothed.as_ref().unwrap()[..size * size],
            records[0].smooth[..size * size]
        );
        assert_eq!((gpx.mean.as_slice(), gpx.std.as_slice()), (&mean[..1], &std[..1]));
        // A record whose channels do not match the model is refused, naming it.
        let err = assemble_batch(7, 0, records.clone(), &grey_shape, None)
            .err()
            .expect("refused");
        assert!(
            err.to_string().contains("k0") && err.to_string().contains("1 channels"),
            "{err}"
        );
        // Targets: one kind as it is, two concatenated per patch; values that
        // are not whole patches are refused, naming the record.
        let n = shape.num_patches;
        let with = |kinds: Vec<(usize, Vec<f32>)>| -> Vec<Record> {
            records
                .iter()
                .map(|r| Record {
                    targets: kinds.clone(),
                    ..r.clone()
                })
                .collect()
        };
        let one: Vec<f32> = (0..n * 2).map(|i| i as f32).collect();
        let two: Vec<f32> = (0..n * 3).map(|i| -(i as f32)).collect();
        let single = assemble_batch(7, 0, with(vec![(2, one.clone())]), &shape, None).unwrap();
        assert_eq!(
            single.batch.targets.as_deref(),
            Some(&[one.clone(), one.clone()].concat()[..])
        );
        let both = assemble_batch(7, 0, with(vec![(2, one.clone()), (3, two.clone())]), &shape, None).unwrap();
        let per_patch: Vec<f32> = (0..n)
            .flat_map(|p| [&one[p * 2..p * 2 + 2], &two[p * 3..p * 3 + 3]].concat())
            .collect();
        assert_eq!(
            both.batch.targets.as_deref(),
            Some(&[per_patch.clone(), per_patch].concat()[..])
        );
        let mut short = with(vec![(2, one.clone())]);
        short[1].targets[0].1.pop();
        let err = assemble_batch(7, 0, short, &shape, None).err().expect("refused");
        assert!(
            err.to_string().contains(&records[1].key) && err.to_string().contains("patches"),
            "{err}"
        );
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
        // Another x̂ is another batch; so is another target value.
        let mut other = records.clone();
        other[1].smooth[0] = 0;
        assert_ne!(assemble_batch(7, 0, other, &shape, None).unwrap().digest, ready.digest);
        let with_targets = |v: f32| {
            let mut r = records.clone();
            r[0].targets = vec![(2, vec![v; 2 * n])];
            r
        };
        let a = assemble_batch(7, 0, with_targets(0.5), &shape, None).unwrap();
        assert_ne!(
            assemble_batch(7, 0, with_targets(0.25), &shape, None).unwrap().digest,
            a.digest
        );
        // A record sealed on its worker gives the batch the same digest.
        let sealed: Vec<Record> = records
            .iter()
            .cloned()
            .map(|r| Record {
                digest: Some(record::digest(&r)),
                ..r
            })
            .collect();
        assert_eq!(assemble_batch(7, 0, sealed, &shape, None).unwrap().digest, ready.digest);

        // Refilling a spent batch (with targets, another size) gives the same
        // batch as fresh buffers, in the spent batch's memory.
        let recycler = Recycler::default();
        recycler.give(a.batch);
        let spent = recycler.take().expect("the batch given back");
        let spent_images = spent.pixels.as_ref().unwrap().images.as_ptr();
        let refilled = assemble_batch(8, 1, records[..1].to_vec(), &shape, Some(spent)).unwrap();
        let fresh = assemble_batch(8, 1, records[..1].to_vec(), &shape, None).unwrap();
        assert_eq!(format!("{:?}", refilled.batch), format!("{:?}", fresh.batch));
        assert_eq!(refilled.digest, fresh.digest);
        assert_eq!(refilled.batch.pixels.as_ref().unwrap().images.as_ptr(), spent_images);
        assert!(refilled.batch.targets.is_none());
        // One spare at most: a second one is dropped, not queued.
        recycler.give(fresh.batch);
        recycler.give(refilled.batch);
        assert!(recycler.take().is_some() && recycler.take().is_none());
    }
}
