//! views: the K pre-sampled views of a sample that the target cache stores
//! targets for (DESIGN.md, "Target cache"; the FKD recipe).
//!
//! View v of sample `key` is augment's crop + flip drawn from the stream
//! `stage_rng(view seed, v, key, "view")` instead of `(run seed, epoch, key,
//! "augment")`: the same sampler (`augment::apply`: torchvision's
//! `RandomResizedCrop` + flip), a different seed. So a view is recomputed from
//! (view seed, key, v), never stored, and it does not depend on K: raising K
//! adds views and keeps the old ones. A run reading the cache feeds the
//! backbone view `v = pick(run seed, epoch, key, K)`: the crop repeats across
//! epochs (one of K), while masks and noise keep their own per-epoch streams.

use rand::Rng;
use shards::rng::stage_rng;

use crate::chain::{StagesConfig, AUGMENT_STREAM};
use crate::sample::{Rgb8, StageError, View};
use crate::{augment, targets};

/// rng stream of the view parameters.
pub const VIEW: &str = "view";
/// rng stream of the per-epoch choice among the K views.
pub const VIEW_PICK: &str = "view-pick";

/// The parameters (crop box, flip) of view `v` of a `width x height` image of sample `key`.
pub fn sample_view(
    cfg: &augment::Config,
    width: usize,
    height: usize,
    view_seed: u64,
    key: &str,
    v: u32,
) -> Result<View, StageError> {
    augment::sample_view(cfg, width, height, &mut stage_rng(view_seed, u64::from(v), key, VIEW))
}

/// View `v` of the decoded image of sample `key`: the u8 view and its record.
pub fn apply(cfg: &augment::Config, img: &Rgb8, view_seed: u64, key: &str, v: u32) -> Result<(Rgb8, View), StageError> {
    let view = sample_view(cfg, img.width, img.height, view_seed, key, v)?;
    let out = augment::resize_bicubic(img, view.crop, cfg.size, cfg.size, view.flip);
    Ok((out, view))
}

/// Which of the `k` views a run feeds in `epoch`: `rng(run seed, epoch, key) mod K`.
pub fn pick(run_seed: u64, epoch: u64, key: &str, k: u32) -> u32 {
    (stage_rng(run_seed, epoch, key, VIEW_PICK).random::<u64>() % u64::from(k.max(1))) as u32
}

/// Whether a run with this config reads its targets from the cache.
pub fn cached(cfg: &StagesConfig) -> bool {
    cfg.targets.cache.is_some()
}

/// The view a run feeds the backbone in `epoch`: with a target cache, cached
/// view `pick(...)` (returned with its index); otherwise a fresh crop from
/// augment's stream.
pub fn run_view(
    cfg: &StagesConfig,
    run_seed: u64,
    epoch: u64,
    key: &str,
    width: usize,
    height: usize,
) -> Result<(View, Option<u32>), StageError> {
    if cached(cfg) {
        let v = pick(run_seed, epoch, key, cfg.targets.views);
        let view = sample_view(&cfg.augment, width, height, cfg.targets.view_seed, key, v)?;
        return Ok((view, Some(v)));
    }
    let view = augment::sample_view(
        &cfg.augment,
        width,
        height,
        &mut stage_rng(run_seed, epoch, key, AUGMENT_STREAM),
    )?;
    Ok((view, None))
}

/// The cache's config checks: K at least 1, CLIP only through the cache and
/// on views of its own size and patch.
pub fn validate(cfg: &StagesConfig) -> Result<(), StageError> {
    let t = &cfg.targets;
    if t.views == 0 {
        return Err(StageError::Config("stages.targets.views (K) must be at least 1".into()));
    }
    if t.kinds.contains(&targets::Kind::Clip) {
        let Some(clip) = &t.clip else {
            return Err(StageError::Config(
                "stages.targets.kinds has clip but stages.targets.clip (weights: FILE) is not set".into(),
            ));
        };
        if t.cache.is_none() {
            return Err(StageError::Config(
                "clip targets come from the target cache: set stages.targets.cache: DIR".into(),
            ));
        }
        if (clip.image_size, clip.patch_size) != (cfg.augment.size, cfg.patch) {
            return Err(StageError::Config(format!(
                "stages.targets.clip takes {} px views in {} px patches, but stages.augment.size is {} and stages.patch {}",
                clip.image_size, clip.patch_size, cfg.augment.size, cfg.patch
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::{random_resized_crop_params, resize_bicubic};

    fn image() -> Rgb8 {
        let (w, h) = (40usize, 30usize);
        Rgb8 {
            width: w,
            height: h,
            data: (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect(),
        }
    }

    #[test]
    fn a_view_is_a_pure_function_of_seed_key_and_index() {
        let cfg = augment::Config {
            size: 16,
            ..Default::default()
        };
        let img = image();
        let (a, va) = apply(&cfg, &img, 3, "k", 2).unwrap();
        assert_eq!(apply(&cfg, &img, 3, "k", 2).unwrap(), (a.clone(), va));
        // Recomputed independently: torchvision's sampler on the documented stream, then the resampler.
        let mut rng = stage_rng(3, 2, "k", VIEW);
        let crop = random_resized_crop_params(40, 30, cfg.scale, cfg.ratio, &mut rng);
        let flip = rng.random::<f64>() < cfg.flip_p;
        assert_eq!((va.crop, va.flip), (crop, flip));
        assert_eq!(resize_bicubic(&img, crop, 16, 16, flip), a);
        // Other index, seed or key: another view (crop boxes of a 40 x 30 image rarely coincide).
        let crops: std::collections::HashSet<_> = [(3, "k", 0), (3, "k", 1), (4, "k", 2), (3, "j", 2), (3, "k", 2)]
            .iter()
            .map(|&(s, k, v)| {
                let c = apply(&cfg, &img, s, k, v).unwrap().1.crop;
                (c.top, c.left, c.height, c.width)
            })
            .collect();
        assert!(crops.len() >= 4, "{crops:?}");
    }

    #[test]
    fn a_cached_run_feeds_view_pick_and_an_uncached_run_augments_crop() {
        let mut cfg = StagesConfig::default();
        cfg.augment.size = 16;
        let fresh = augment::sample_view(&cfg.augment, 40, 30, &mut stage_rng(5, 1, "k", AUGMENT_STREAM)).unwrap();
        assert_eq!(run_view(&cfg, 5, 1, "k", 40, 30).unwrap(), (fresh, None));
        cfg.targets.cache = Some("cache".into());
        cfg.targets.views = 3;
        cfg.targets.view_seed = 11;
        let v = pick(5, 1, "k", 3);
        let cached = sample_view(&cfg.augment, 40, 30, 11, "k", v).unwrap();
        assert_eq!(run_view(&cfg, 5, 1, "k", 40, 30).unwrap(), (cached, Some(v)));
    }

    #[test]
    fn clip_needs_weights_a_cache_and_its_own_view_size() {
        let mut cfg = StagesConfig::default();
        cfg.targets.kinds = vec![targets::Kind::Clip];
        assert!(validate(&cfg).unwrap_err().to_string().contains("stages.targets.clip"));
        cfg.targets.clip = Some(targets::clip::ClipConfig::vit_base_patch16("w.safetensors"));
        assert!(validate(&cfg).unwrap_err().to_string().contains("stages.targets.cache"));
        cfg.targets.cache = Some("c".into());
        assert!(validate(&cfg).is_ok());
        cfg.augment.size = 112;
        assert!(validate(&cfg).unwrap_err().to_string().contains("224 px views"));
        cfg.targets.views = 0;
        assert!(validate(&cfg).is_err());
    }

    #[test]
    fn pick_covers_every_view_and_stays_below_k() {
        let mut seen = [0usize; 4];
        for epoch in 0..200 {
            let v = pick(9, epoch, "key", 4);
            seen[v as usize] += 1;
            assert_eq!(v, pick(9, epoch, "key", 4));
        }
        // 200 uniform draws over 4 views: each well above 20 (p < 1e-9 otherwise).
        assert!(seen.iter().all(|&n| n > 20), "{seen:?}");
        assert_eq!(pick(9, 0, "key", 1), 0);
    }
}
