//! `pipeline bench cache CONFIG`: views/s read from the target cache into
//! batches, on one core, and bytes per view.
//!
//! Reading is what a cached run's targets stage does per view: read the store
//! shard, check its BLAKE3, inflate the zstd tar, and decode each view's
//! f16 / int8 values into f32 rows of a batch buffer. Here every shard of the
//! config's stores is read once, in order, on this thread. It also prints the
//! bytes per view of CLIP ViT-B/16 targets (196 x 512) in f16 and int8, raw
//! and in a store shard, on synthetic values (Gaussian tokens: real CLIP
//! features compress a little differently; the raw sizes are exact).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use rand_distr::{Distribution, Normal};
use serde::Serialize;
use shards::store::{codec, Dtype, Store, StoreSpec, FORMAT};

use crate::cache;
use crate::config;

/// Arguments of `pipeline bench cache`.
#[derive(Debug, Args)]
pub struct BenchCacheArgs {
    /// A config with `stages.targets.cache` whose stores were filled by `pipeline precompute`.
    pub config: PathBuf,
    /// Override config values.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Views per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Print the figures as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
struct CacheFigures {
    store: PathBuf,
    views: u64,
    batches: u64,
    seconds: f64,
    views_per_s_per_core: f64,
    store_bytes: u64,
    bytes_per_view: f64,
    /// CLIP 196 x 512: (dtype, raw bytes per view, bytes per view in a store shard).
    clip_bytes_per_view: Vec<(Dtype, usize, f64)>,
}

/// Bytes per view of `views` synthetic CLIP targets in a store shard of `dtype`.
fn clip_store_bytes(dtype: Dtype, views: u32) -> anyhow::Result<f64> {
    let (tokens, dims) = (196usize, 512usize);
    let spec = StoreSpec {
        format: FORMAT,
        extractor: "clip-synthetic".into(),
        params: serde_json::json!({}),
        weights_blake3: None,
        view_seed: 0,
        view: serde_json::json!({}),
        image_size: 224,
        patch: 16,
        tokens,
        dims,
        mean: stages::targets::clip::CLIP_MEAN,
        std: stages::targets::clip::CLIP_STD,
        dtype,
    };
    let root = std::env::temp_dir().join(format!("crossmae-bench-cache-{}", std::process::id()));
    let store = Store::create(&root, &spec)?;
    let mut writer = store.writer("bench", views as usize)?;
    let normal = Normal::new(0f32, 1.0).expect("unit normal");
    for v in 0..views {
        let mut rng = shards::rng::stage_rng(0, u64::from(v), "bench", "clip-synthetic");
        let values: Vec<f32> = (0..tokens * dims).map(|_| normal.sample(&mut rng)).collect();
        writer.push("sample".into(), v, codec::encode(&values, dims, dtype))?;
    }
    let written = writer.finish()?;
    let bytes: u64 = written.iter().map(|s| s.bytes).sum();
    std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    Ok(bytes as f64 / f64::from(views))
}

pub fn run(args: &BenchCacheArgs) -> anyhow::Result<()> {
    let cfg = config::load(&args.config, &args.set)?;
    let root = cache::cache_root(&cfg)?;
    let specs = cache::store_specs(&cfg.stages)?;
    let spec = specs.first().context("stages.targets.kinds: no target kind")?;
    let store = Store::find(root, spec)?.with_context(|| {
        format!(
            "no store for this config under {} (looked for {}): run `pipeline precompute` first",
            root.display(),
            spec.dir_name()
        )
    })?;
    let index = store.load_index(false)?;
    let per_view = spec.tokens * spec.dims;
    let batch = args.batch.max(1);
    let mut buffer = vec![0f32; batch * per_view];
    let (mut views, mut batches, mut filled) = (0u64, 0u64, 0usize);
    let started = Instant::now();
    for shard in &index.shards {
        for (_, bytes) in store.read_shard(shard)? {
            let row = &mut buffer[filled * per_view..(filled + 1) * per_view];
            codec::decode_into(&bytes, spec.dims, spec.dtype, row).map_err(anyhow::Error::msg)?;
            filled += 1;
            views += 1;
            if filled == batch {
                // A batch is complete: what the sink would hand over.
                std::hint::black_box(&buffer);
                batches += 1;
                filled = 0;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let clip_bytes_per_view = [Dtype::F16, Dtype::Int8]
        .into_iter()
        .map(|d| Ok((d, d.encoded_len(196, 512), clip_store_bytes(d, 32)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let figures = CacheFigures {
        store: store.dir.clone(),
        views,
        batches,
        seconds,
        views_per_s_per_core: views as f64 / seconds.max(1e-9),
        store_bytes: index.bytes(),
        bytes_per_view: index.bytes() as f64 / views.max(1) as f64,
        clip_bytes_per_view,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
        return Ok(());
    }
    println!(
        "{}: {} views ({} x {} {:?}) read into {} batches of {batch} in {:.2} s: {:.0} views/s on one core",
        figures.store.display(),
        figures.views,
        spec.tokens,
        spec.dims,
        spec.dtype,
        figures.batches,
        figures.seconds,
        figures.views_per_s_per_core
    );
    println!(
        "store: {:.1} MB, {:.0} bytes per view",
        figures.store_bytes as f64 / 1e6,
        figures.bytes_per_view
    );
    for (dtype, raw, stored) in &figures.clip_bytes_per_view {
        println!("CLIP 196 x 512 {dtype:?}: {raw} bytes per view raw, {stored:.0} in a store shard (synthetic Gaussian values)");
    }
    Ok(())
}
