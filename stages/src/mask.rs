//! mask: MAE random masking (`models_mae.py` `random_masking`).
//!
//! Reference: `../shared/testvectors/masking_{noise,mask,ids_keep,ids_restore}.npy`,
//! reproduced exactly (integers and 0/1 bits, so no tolerance): given the
//! noise, `ids_shuffle` is the stable ascending argsort, the first
//! `len_keep = floor(N * (1 - ratio))` are kept, `ids_restore` is the argsort
//! of `ids_shuffle`, and mask 1 = removed. Here the noise is drawn from the
//! rng the caller derives from (seed, epoch, key, "mask"), so every epoch
//! masks differently and every thread masks the same.

use crate::sample::{Mask, StageError};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// `stages.mask` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Fraction of patches removed (MAE / CrossMAE: 0.75).
    pub ratio: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config { ratio: 0.75 }
    }
}

/// `floor(N * (1 - ratio))`, computed in f64 as Python does.
pub fn len_keep(num_patches: usize, ratio: f64) -> usize {
    (num_patches as f64 * (1.0 - ratio)).floor().max(0.0) as usize
}

/// Draw uniform noise for `num_patches` patches and mask by it.
pub fn apply(cfg: &Config, num_patches: usize, rng: &mut impl Rng) -> Result<Mask, StageError> {
    if !(0.0..1.0).contains(&cfg.ratio) {
        return Err(StageError::Config(format!("mask.ratio {} is not in [0, 1)", cfg.ratio)));
    }
    let noise: Vec<f32> = (0..num_patches).map(|_| rng.random::<f32>()).collect();
    Ok(random_masking(&noise, cfg.ratio))
}

/// MAE's masking given the noise (one value per patch).
pub fn random_masking(noise: &[f32], ratio: f64) -> Mask {
    let n = noise.len();
    let keep = len_keep(n, ratio);
    let mut ids_shuffle: Vec<u32> = (0..n as u32).collect();
    // `sort_by` is stable: equal noise keeps index order, as numpy's stable sort.
    ids_shuffle.sort_by(|&a, &b| noise[a as usize].total_cmp(&noise[b as usize]));
    let mut ids_restore = vec![0u32; n];
    for (pos, &id) in ids_shuffle.iter().enumerate() {
        ids_restore[id as usize] = pos as u32;
    }
    let mask = ids_restore.iter().map(|&pos| u8::from(pos as usize >= keep)).collect();
    Mask {
        mask,
        ids_keep: ids_shuffle[..keep].to_vec(),
        ids_restore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npy::testvector;

    #[test]
    fn reproduces_the_mae_testvectors() {
        let noise = testvector("masking_noise.npy");
        let mask = testvector("masking_mask.npy");
        let keep = testvector("masking_ids_keep.npy");
        let restore = testvector("masking_ids_restore.npy");
        let (b, n) = (noise.shape[0], noise.shape[1]);
        let k = keep.shape[1];
        assert_eq!(len_keep(n, 0.75), k);
        for i in 0..b {
            let m = random_masking(&noise.to_f32()[i * n..(i + 1) * n], 0.75);
            let as_f64 = |v: &[u32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            assert_eq!(
                m.mask.iter().map(|&x| x as f64).collect::<Vec<_>>(),
                mask.data[i * n..(i + 1) * n]
            );
            assert_eq!(as_f64(&m.ids_keep), keep.data[i * k..(i + 1) * k]);
            assert_eq!(as_f64(&m.ids_restore), restore.data[i * n..(i + 1) * n]);
        }
    }

    /// Ties keep index order (a stable sort), and the kept patches are exactly
    /// the unmasked ones, checked by brute force against counting.
    #[test]
    fn ties_are_stable_and_mask_matches_ids() {
        let noise = [0.5f32, 0.1, 0.5, 0.1, 0.9, 0.5, 0.0, 0.5];
        let m = random_masking(&noise, 0.5);
        assert_eq!(m.ids_keep, vec![6, 1, 3, 0]);
        for i in 0..noise.len() {
            // A patch's rank = how many patches sort before it.
            let rank = (0..noise.len())
                .filter(|&j| noise[j] < noise[i] || (noise[j] == noise[i] && j < i))
                .count();
            assert_eq!(m.ids_restore[i] as usize, rank);
            assert_eq!(m.mask[i], u8::from(rank >= 4));
        }
    }

    #[test]
    fn deterministic_per_key_and_different_per_epoch() {
        let cfg = Config::default();
        let draw = |epoch| apply(&cfg, 196, &mut shards::rng::stage_rng(3, epoch, "img1", "mask")).unwrap();
        let a = draw(0);
        let b = std::thread::spawn(move || {
            apply(
                &Config::default(),
                196,
                &mut shards::rng::stage_rng(3, 0, "img1", "mask"),
            )
            .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(a, b);
        assert_ne!(a.mask, draw(1).mask);
        assert_eq!(a.mask.iter().filter(|&&m| m == 0).count(), 49);
        assert_eq!(a.ids_keep.len(), 49);
    }

    #[test]
    fn bad_ratio_is_a_config_error() {
        let mut rng = shards::rng::stage_rng(0, 0, "k", "mask");
        assert!(apply(&Config { ratio: 1.0 }, 4, &mut rng).is_err());
        assert!(apply(&Config { ratio: -0.1 }, 4, &mut rng).is_err());
    }
}
