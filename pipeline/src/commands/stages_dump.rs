//! `pipeline stages dump`: what the model is fed, as .npy.
//!
//! For each of the first `--limit` samples of the shards (the config's
//! `data.train` unless `--shards` is given), run the record stages the training
//! graph runs (`stages::record::Stages`, through `stages::chain::process`, with the
//! config's seed, its target cache if it has one, and the `--epoch`) and write
//! into `--out`:
//! `KEY.image.npy` (the u8 view normalized as the trainer does, f32, C x H x W),
//! `KEY.mask.npy` (u8 per patch, 1 = masked), `KEY.smooth.npy` (x̂, the blur of
//! the u8 view, normalized the same way, f32, C x H x W),
//! `KEY.target.<kind>.npy` (f32, patches x dims) and `KEY.view.json`
//! (crop box, flip, source size, ids_keep, class).

use std::path::{Path, PathBuf};

use anyhow::Context;
use stages::npy;

/// Arguments of `pipeline stages dump`.
#[derive(Debug, clap::Args)]
pub struct DumpArgs {
    /// The run config (YAML).
    pub config: PathBuf,
    /// Override config values: `--set stages.mask.ratio=0.5`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Shards to read (brace patterns); default: the config's `data.train`.
    #[arg(long, value_name = "PATTERN")]
    pub shards: Vec<String>,
    /// How many samples to dump.
    #[arg(long, default_value_t = 8)]
    pub limit: usize,
    /// Epoch whose random draws to use.
    #[arg(long, default_value_t = 0)]
    pub epoch: u64,
    /// Output directory (created).
    #[arg(long)]
    pub out: PathBuf,
}

/// Run `pipeline stages dump`.
pub fn run(args: &DumpArgs) -> anyhow::Result<()> {
    let cfg = crate::config::load(&args.config, &args.set)?;
    let patterns = if args.shards.is_empty() {
        cfg.data.train.clone()
    } else {
        args.shards.clone()
    };
    let paths = shards::expand(&patterns).context("expanding --shards")?;
    anyhow::ensure!(!paths.is_empty(), "no shards match {patterns:?}");
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    // The run's own record stages, reading its target cache when it has one.
    let data_stages = crate::job::standalone_stages(&cfg)?;
    let skips = shards::Skips::default();
    let mut written = 0usize;
    'shards: for path in &paths {
        let shard = path.display().to_string();
        for raw in shards::ShardReader::open(path, cfg.data.on_error, &skips)? {
            if written >= args.limit {
                break 'shards;
            }
            let raw = raw?;
            let ex = stages::chain::process_or_skip(&data_stages, &raw, args.epoch, cfg.data.on_error, &skips, &shard)?;
            if let Some(ex) = ex {
                write_example(&args.out, &ex)?;
                written += 1;
            }
        }
    }
    println!(
        "wrote {written} examples to {} ({} skipped)",
        args.out.display(),
        skips.total()
    );
    Ok(())
}

/// A key made safe as a file name (`a/b` becomes `a_b`).
fn file_stem(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn write_example(dir: &Path, ex: &stages::sample::Example) -> anyhow::Result<()> {
    let stem = file_stem(&ex.key);
    let size = ex.view.size;
    let put = |name: String, bytes: Vec<u8>| -> anyhow::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    put(
        format!("{stem}.image.npy"),
        npy::encode(&[ex.image.len() / (size * size), size, size], &ex.image),
    )?;
    put(
        format!("{stem}.mask.npy"),
        npy::encode(&[ex.mask.mask.len()], &ex.mask.mask),
    )?;
    put(
        format!("{stem}.smooth.npy"),
        npy::encode(&[ex.smooth.len() / (size * size), size, size], &ex.smooth),
    )?;
    let n = ex.num_patches();
    for t in &ex.targets {
        put(
            format!("{stem}.target.{}.npy", t.kind),
            npy::encode(&[n, t.dims], &t.values),
        )?;
    }
    let view = serde_json::json!({
        "key": ex.key,
        "class": ex.class,
        "source_width": ex.view.source_width,
        "source_height": ex.view.source_height,
        "crop": ex.view.crop,
        "flip": ex.view.flip,
        "size": size,
        "patch": ex.patch,
        "ids_keep": ex.mask.ids_keep,
    });
    put(format!("{stem}.view.json"), serde_json::to_vec_pretty(&view)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dump two photos and check each file against the chain run directly
    /// (shapes, values, view record), reading the .npy back with our reader.
    #[test]
    fn dump_writes_what_the_chain_computes() {
        let dir = tempfile::tempdir().unwrap();
        let shard = stages::npy::shared_dir().join("data/photos-000000.tar");
        let config = dir.path().join("run.yaml");
        std::fs::write(
            &config,
            format!(
                "seed: 3\ndata:\n  train: ['{}']\nstages:\n  augment: {{size: 64}}\n  smooth: {{sigma: 2.0}}\n  targets: {{kinds: [pixel, hog]}}\nmodel:\n  backbone: {{img_size: 64, patch_size: 16, in_chans: 3}}\n  target_dim: 876\n",
                shard.display()
            ),
        )
        .unwrap();
        let out = dir.path().join("out");
        let args = DumpArgs {
            config: config.clone(),
            set: vec!["stages.mask.ratio=0.5".into()],
            shards: vec![],
            limit: 2,
            epoch: 1,
            out: out.clone(),
        };
        run(&args).unwrap();
        let cfg = crate::config::load(&config, &args.set).unwrap();
        let skips = shards::Skips::default();
        let raws: Vec<_> = shards::ShardReader::open(&shard, shards::OnError::Fail, &skips)
            .unwrap()
            .take(3)
            .map(|r| r.unwrap())
            .collect();
        for raw in &raws[..2] {
            let list = stages::record::Stages::new(cfg.stages.clone(), cfg.seed).unwrap();
            let ex = stages::chain::process(&list, raw, 1).unwrap();
            let stem = out.join(file_stem(&raw.key));
            let read = |ext: &str| npy::read(&stem.with_extension(ext)).unwrap();
            let image = read("image.npy");
            assert_eq!(image.shape, vec![3, 64, 64]);
            assert_eq!(image.to_f32(), ex.image);
            let mask = read("mask.npy");
            assert_eq!(mask.shape, vec![16]);
            assert_eq!(mask.data.iter().filter(|&&m| m == 0.0).count(), 8);
            assert_eq!(read("smooth.npy").to_f32(), ex.smooth);
            assert_eq!(read("target.pixel.npy").shape, vec![16, 768]);
            assert_eq!(read("target.hog.npy").shape, vec![16, 108]);
            let view: serde_json::Value =
                serde_json::from_slice(&std::fs::read(stem.with_extension("view.json")).unwrap()).unwrap();
            assert_eq!(view["flip"], ex.view.flip);
            assert_eq!(view["crop"]["width"], ex.view.crop.width);
            assert_eq!(view["source_width"], ex.view.source_width);
        }
        // --limit 2: the third sample is not there.
        assert!(!out.join(format!("{}.image.npy", file_stem(&raws[2].key))).exists());
    }

    #[test]
    fn keys_become_safe_file_names() {
        assert_eq!(file_stem("n01/img 3"), "n01_img_3");
        assert_eq!(file_stem("photo0000001"), "photo0000001");
    }
}
