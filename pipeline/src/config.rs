//! The run config: YAML + `--set` overrides into serde structs, validated once.
//!
//! Every struct rejects unknown keys, and every error names the file and the
//! key path (`configs/pretrain.yaml: data.lanes: invalid type: ...`).
//! Relative paths in a config (shard patterns) are resolved against the
//! directory of the config file, so a config works from any working directory;
//! the same holds for paths given with `--set`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_norway::Value;

/// The whole run config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The run seed: every random draw derives from it (DESIGN.md, determinism).
    #[serde(default)]
    pub seed: u64,
    /// Where the data comes from and how it is read.
    pub data: DataConfig,
    /// The CPU stages (decode, augment, mask, smooth, targets).
    #[serde(default)]
    pub stages: stages::StagesConfig,
    /// The model.
    #[serde(default)]
    pub model: stages::model::ModelConfig,
    /// The trainer.
    #[serde(default)]
    pub train: stages::train::TrainConfig,
    /// Linear probe and kNN settings (`pipeline eval`, and the probe that ends `pipeline run`).
    #[serde(default)]
    pub eval: stages::eval::EvalConfig,
    /// Where the run writes, and the flow control.
    #[serde(default)]
    pub run: RunSection,
    /// The role of each process (`data`, `train`, `all`).
    #[serde(default)]
    pub cluster: crate::placement::ClusterConfig,
    /// The role whose workers run each stage.
    #[serde(default)]
    pub placement: crate::placement::PlacementConfig,
    /// Object storage (shards and the target cache at `s3://`, `gs://`,
    /// `az://`, `http(s)://` URLs): read-ahead, prefetch, retries, client options.
    #[serde(default)]
    pub storage: shards::storage::StorageOptions,
}

/// The `run:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// The run directory (checkpoints, metrics.jsonl); relative to the working
    /// directory, as outputs usually are. Default: `runs/<config file stem>`.
    pub dir: Option<PathBuf>,
    /// Batches allowed between the lanes and the trainer (flow control).
    pub window: u64,
    /// Per-stage rates go to metrics.jsonl every this many batches.
    pub log_every: u64,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            dir: None,
            window: 4,
            log_every: 20,
        }
    }
}

/// The `data:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training shard patterns (brace lists allowed), relative to the config file.
    pub train: Vec<String>,
    /// Test shard patterns (labelled, for evaluation).
    #[serde(default)]
    pub test: Vec<String>,
    /// Lanes the shards are dealt into each epoch: fixed by the config, not by
    /// the cluster, so the batches do not depend on the number of workers.
    #[serde(default = "default_lanes")]
    pub lanes: usize,
    /// Samples in each lane's shuffle buffer.
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// What bad input does: `skip` (count, log, go on) or `fail`.
    #[serde(default)]
    pub on_error: shards::OnError,
    /// Under `skip`, the run stops with an error once more than this fraction
    /// of the samples seen were skipped: a few bad files are noise, most of the
    /// data failing is a broken dataset or config.
    #[serde(default = "default_max_skip_fraction")]
    pub max_skip_fraction: f64,
    /// Where the shards' sample keys are kept between runs, so that a run does
    /// not read every shard before its first batch once an earlier run has
    /// (`shards::key_cache`): `auto` ($XDG_CACHE_HOME/crossmae-pipeline/shard-keys,
    /// else ~/.cache/crossmae-pipeline/shard-keys), `off`, or a directory.
    #[serde(default = "default_key_cache")]
    pub key_cache: String,
}

fn default_key_cache() -> String {
    "auto".into()
}

impl DataConfig {
    /// The key cache this config names, `None` when it is `off` (or `auto` without a home directory).
    pub fn key_cache(&self) -> Option<shards::key_cache::KeyCache> {
        let env_dir = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        match self.key_cache.as_str() {
            "off" => None,
            "auto" => env_dir("XDG_CACHE_HOME")
                .or_else(|| env_dir("HOME").map(|home| home.join(".cache")))
                .map(|dir| shards::key_cache::KeyCache::new(dir.join("crossmae-pipeline").join("shard-keys"))),
            dir => Some(shards::key_cache::KeyCache::new(dir)),
        }
    }
}

fn default_max_skip_fraction() -> f64 {
    0.01
}

fn default_lanes() -> usize {
    4
}

fn default_shuffle_buffer() -> usize {
    1000
}

/// Read `path`, apply `--set KEY=VALUE` overrides, deserialize and validate.
pub fn load(path: &Path, sets: &[String]) -> anyhow::Result<RunConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new(""));
    let cfg = parse(&text, sets, base).with_context(|| format!("config {}", path.display()))?;
    // Every shard and cache access of this process reads with these from now on.
    shards::storage::configure(&cfg.storage);
    Ok(cfg)
}

/// Parse config text (see [`load`]); `base` is the directory relative paths
/// are resolved against. Takes text so tests can feed it directly.
pub fn parse(text: &str, sets: &[String], base: &Path) -> anyhow::Result<RunConfig> {
    let mut value: Value = serde_norway::from_str(text).context("not valid YAML")?;
    for set in sets {
        apply_set(&mut value, set)?;
    }
    let mut config: RunConfig = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        anyhow::anyhow!(
            "{}: {}",
            if path == "." { "(top level)".to_string() } else { path },
            e.into_inner()
        )
    })?;
    config.resolve_paths(base);
    config.validate()?;
    Ok(config)
}

/// Apply one `a.b.c=value` override; the value is parsed as YAML (`3`, `true`, `[a, b]`).
fn apply_set(root: &mut Value, set: &str) -> anyhow::Result<()> {
    let (key, raw) = set
        .split_once('=')
        .with_context(|| format!("--set {set:?}: expected KEY=VALUE"))?;
    let new: Value = serde_norway::from_str(raw).with_context(|| format!("--set {key}: value {raw:?} is not YAML"))?;
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set {set:?}: empty part in key path");
    }
    let mut node = root;
    for (i, part) in parts.iter().enumerate() {
        if node.is_null() {
            *node = Value::Mapping(Default::default());
        }
        let Value::Mapping(map) = node else {
            bail!("--set {key}: {} is not a section", parts[..i].join("."));
        };
        let slot = map.entry(Value::String(part.to_string())).or_insert(Value::Null);
        if i + 1 == parts.len() {
            *slot = new;
            return Ok(());
        }
        node = slot;
    }
    Ok(())
}

fn resolve(base: &Path, pattern: &str) -> String {
    if Path::new(pattern).is_absolute() || base.as_os_str().is_empty() || shards::storage::is_url(pattern) {
        pattern.to_string()
    } else {
        base.join(pattern).to_string_lossy().into_owned()
    }
}

impl RunConfig {
    fn resolve_paths(&mut self, base: &Path) {
        for pattern in self.data.train.iter_mut().chain(self.data.test.iter_mut()) {
            *pattern = resolve(base, pattern);
        }
        // An input, like the shards; the target cache's root is an output, relative to the working directory.
        if let Some(clip) = self.stages.targets.clip.as_mut() {
            clip.weights = PathBuf::from(resolve(base, &clip.weights.to_string_lossy()));
        }
    }

    /// Checks no single field can make: combinations, ranges.
    fn validate(&self) -> anyhow::Result<()> {
        if self.data.train.is_empty() {
            bail!("data.train: no shard patterns given");
        }
        if self.data.lanes == 0 {
            bail!("data.lanes: must be at least 1");
        }
        if self.data.shuffle_buffer == 0 {
            bail!("data.shuffle_buffer is 0: it must hold at least 1 sample (1 reads each lane in order)");
        }
        if self.data.key_cache.is_empty() || shards::storage::is_url(&self.data.key_cache) {
            bail!(
                "data.key_cache {:?}: must be auto, off or a local directory",
                self.data.key_cache
            );
        }
        if !(0.0..=1.0).contains(&self.data.max_skip_fraction) {
            bail!(
                "data.max_skip_fraction {} must be in [0, 1]",
                self.data.max_skip_fraction
            );
        }
        if self.run.window == 0 || self.run.log_every == 0 {
            bail!("run.window and run.log_every must be at least 1");
        }
        self.stages.validate().map_err(|e| anyhow::anyhow!("stages: {e}"))?;
        self.model.validate().map_err(|e| anyhow::anyhow!("model: {e}"))?;
        self.train.validate().map_err(|e| anyhow::anyhow!("train: {e}"))?;
        self.eval.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        self.storage.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        let backbone = &self.model.backbone;
        if backbone.in_chans != self.stages.channels {
            bail!(
                "model.backbone.in_chans is {}, but stages.channels gives the model {} (3: RGB, 1: luma): set both alike",
                backbone.in_chans,
                self.stages.channels
            );
        }
        if self.model.target == stages::model::TargetSource::Batch {
            let kinds = &self.stages.targets.kinds;
            let dims: usize = kinds.iter().map(|&k| self.stages.target_dims(k)).sum();
            if kinds.is_empty() {
                bail!("stages.targets.kinds is empty, but the model predicts per-patch targets from the batch");
            }
            if dims != self.model.target_dim {
                let each: Vec<String> = kinds
                    .iter()
                    .map(|&k| format!("{} {}", k.name(), self.stages.target_dims(k)))
                    .collect();
                bail!(
                    "model.target_dim is {}, but stages.targets.kinds give {dims} values per patch ({}): set model.target_dim={dims}",
                    self.model.target_dim,
                    each.join(" + ")
                );
            }
        }
        if backbone.img_size != self.stages.augment.size || backbone.patch_size != self.stages.patch {
            bail!(
                "model.backbone takes {} px images in {} px patches, but stages.augment.size is {} and stages.patch {}",
                backbone.img_size,
                backbone.patch_size,
                self.stages.augment.size,
                self.stages.patch
            );
        }
        Ok(())
    }

    /// Training shards, expanded.
    pub fn train_shards(&self) -> anyhow::Result<Vec<PathBuf>> {
        shards::expand(&self.data.train).context("data.train")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "seed: 3\ndata:\n  train: ['s-{0..1}.tar']\nstages: {patch: 4, augment: {size: 28}}\nmodel: {backbone: {in_chans: 3}, target_dim: 108}\n";

    /// Every config the repository ships loads and passes every check (a new
    /// check once broke `stages/benches/photos224.yaml` unnoticed).
    #[test]
    fn every_shipped_config_loads() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        for dir in ["configs", "configs/ablation", "stages/benches"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "yaml") {
                    files.push(path);
                }
            }
        }
        assert!(files.len() >= 8, "{files:?}");
        for path in files {
            if let Err(e) = load(&path, &[]) {
                panic!("{}: {e:#}", path.display());
            }
        }
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        let c = parse(MINIMAL, &[], Path::new("cfgdir")).unwrap();
        assert_eq!(c.seed, 3);
        assert_eq!(c.data.lanes, 4);
        assert_eq!(c.data.on_error, shards::OnError::Skip);
        assert_eq!(c.data.train, vec!["cfgdir/s-{0..1}.tar".to_string()]);
    }

    #[test]
    fn unknown_key_is_rejected_with_its_path() {
        let err = parse("data:\n  train: [a]\n  lanez: 3\n", &[], Path::new("")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("data") && msg.contains("lanez"), "{msg}");
    }

    #[test]
    fn wrong_type_names_the_key_path() {
        let err = parse("data:\n  train: [a]\n  lanes: many\n", &[], Path::new("")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("data.lanes"), "{msg}");
    }

    #[test]
    fn set_overrides_nested_values_as_yaml() {
        let sets = [
            "data.lanes=7".to_string(),
            "data.on_error=fail".to_string(),
            "seed=11".to_string(),
        ];
        let c = parse(MINIMAL, &sets, Path::new("")).unwrap();
        assert_eq!((c.data.lanes, c.data.on_error, c.seed), (7, shards::OnError::Fail, 11));
        let c = parse(MINIMAL, &["data.test=[t.tar]".to_string()], Path::new("")).unwrap();
        assert_eq!(c.data.test, vec!["t.tar".to_string()]);
    }

    /// Values that used to panic, hang or train nothing are refused before any
    /// work, each naming its key and the allowed range.
    #[test]
    fn out_of_range_values_name_the_key_and_the_range() {
        for (set, want) in [
            ("train.epochs=0", "train.epochs is 0"),
            ("data.shuffle_buffer=0", "data.shuffle_buffer is 0"),
            ("stages.mask.ratio=1.5", "stages.mask.ratio 1.5 must be in [0, 1)"),
            ("stages.mask.ratio=-0.1", "stages.mask.ratio -0.1 must be in [0, 1)"),
            ("data.max_skip_fraction=2", "data.max_skip_fraction 2 must be in [0, 1]"),
            ("train.warmup_epochs=-1", "train.warmup_epochs -1"),
            (
                "model.target_dim=100",
                "model.target_dim is 100, but stages.targets.kinds give 108",
            ),
        ] {
            let err = parse(MINIMAL, &[set.to_string()], Path::new("")).expect_err(set);
            let msg = format!("{err:#}");
            assert!(msg.contains(want), "{set}: {msg}");
        }
        // The shipped default's values pass, and two target kinds add up.
        let two = [
            "stages.targets.kinds=[hog, pixel]".to_string(),
            "model.target_dim=156".to_string(),
        ];
        parse(MINIMAL, &two, Path::new("")).expect("hog 108 + pixel 48");
    }

    #[test]
    fn bad_sets_are_errors() {
        assert!(parse(MINIMAL, &["seed".to_string()], Path::new("")).is_err());
        assert!(parse(MINIMAL, &["seed.x=1".to_string()], Path::new("")).is_err());
        assert!(parse(MINIMAL, &["data.bogus=1".to_string()], Path::new("")).is_err());
        assert!(parse(MINIMAL, &["data.lanes=0".to_string()], Path::new("")).is_err());
    }
}
