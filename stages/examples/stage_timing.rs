//! Per-stage time per image on the shared photos at 224 px, as the minimum
//! over repeated passes, image by image: on a shared machine whose speed
//! drifts by a third within seconds, the best pass of each image is a steadier figure for comparing
//! two versions of a stage than a rate over seconds (`pipeline bench data`
//! gives the throughput figures).
//!
//!   cargo run --release -p stages --example stage_timing [PASSES [STAGE]]

use stages::{augment, chain, decode, mask, smooth, targets, StagesConfig};
use std::time::Instant;

fn main() {
    let passes: usize = std::env::args().nth(1).map_or(20, |s| s.parse().expect("PASSES"));
    let only = std::env::args().nth(2);
    let shard = stages::npy::shared_dir().join("data/photos-000000.tar");
    let skips = shards::Skips::default();
    let raw: Vec<shards::Sample> = shards::ShardReader::open(&shard, shards::OnError::Fail, &skips)
        .expect("photos shard")
        .take(64)
        .map(|s| s.expect("sample"))
        .collect();
    let mut cfg = StagesConfig::default();
    cfg.augment.size = 224;
    cfg.smooth.sigma = 10.0;
    cfg.targets.kinds = vec![targets::Kind::Hog];
    let list = stages::record::Stages::new(cfg.clone(), 0).expect("config");
    let examples: Vec<_> = raw.iter().map(|s| chain::process(&list, s, 0).unwrap()).collect();
    // Each image's time is its minimum over `passes` passes; the figure is their mean.
    let best = |name: &str, f: &mut dyn FnMut(usize)| {
        if only.as_deref().is_some_and(|o| o != name) {
            return;
        }
        let mut each = vec![f64::INFINITY; raw.len()];
        for _ in 0..passes {
            for (i, t) in each.iter_mut().enumerate() {
                let start = Instant::now();
                f(i);
                *t = t.min(start.elapsed().as_secs_f64());
            }
        }
        println!(
            "{name:>10}: {:7.1} us/image",
            each.iter().sum::<f64>() / raw.len() as f64 * 1e6
        );
    };
    best("chain", &mut |i| {
        std::hint::black_box(list.run(stages::record::Record::of_sample(&raw[i], 0)).unwrap());
    });
    best("decode", &mut |i| {
        let bytes = decode::image_bytes(&raw[i]).unwrap();
        std::hint::black_box(decode::decode_region(&cfg.decode, bytes, examples[i].view.crop).unwrap());
    });
    best("decode all", &mut |i| {
        std::hint::black_box(decode::apply(&cfg.decode, &raw[i]).unwrap());
    });
    let regions: Vec<_> = raw
        .iter()
        .zip(&examples)
        .map(|(s, e)| decode::decode_region(&cfg.decode, decode::image_bytes(s).unwrap(), e.view.crop).unwrap())
        .collect();
    best("resize", &mut |i| {
        std::hint::black_box(augment::apply_region(&regions[i], &examples[i].view).unwrap());
    });
    let a = &cfg.augment;
    best("normalize", &mut |i| {
        std::hint::black_box(augment::normalize(&examples[i].pixels, a.mean, a.std));
    });
    best("mask", &mut |i| {
        let mut rng = shards::rng::stage_rng(0, 0, &examples[i].key, chain::MASK_STREAM);
        std::hint::black_box(mask::apply(&cfg.mask, 196, &mut rng).unwrap());
    });
    best("smooth", &mut |i| {
        std::hint::black_box(smooth::apply(&cfg.smooth, &examples[i].image, 3, 224, 224).unwrap());
    });
    best("hog", &mut |i| {
        std::hint::black_box(targets::hog::hog(&examples[i].pixels, 16).unwrap());
    });
}
