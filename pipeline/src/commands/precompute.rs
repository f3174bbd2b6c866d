//! `pipeline precompute CONFIG`: fill the target cache for a config's shards
//! ([`crate::cache::fill`]) and print what it stored.

use std::path::PathBuf;

use clap::Args;

use crate::cache::fill::{fill, FillOptions};
use crate::cluster::ClusterArgs;
use crate::config;

/// Arguments of `pipeline precompute`.
#[derive(Debug, Args)]
pub struct PrecomputeArgs {
    /// The config (YAML) whose `data.train` and `stages` (targets, cache, views) say what to compute.
    pub config: PathBuf,
    /// Override config values: `--set stages.targets.views=4`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Views per store shard.
    #[arg(long, default_value_t = 1000)]
    pub shard_views: usize,
    /// Views per CLIP forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `pipeline precompute CONFIG`.
pub fn run(args: &PrecomputeArgs) -> anyhow::Result<()> {
    let cfg = config::load(&args.config, &args.set)?;
    let options = FillOptions {
        cluster: args.cluster.clone(),
        shard_views: args.shard_views,
        batch: args.batch,
        progress: !args.json,
    };
    let report = fill(&cfg, &options)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for dir in &report.stores {
        println!("store {}", dir.display());
    }
    println!(
        "{} views wanted, {} were stored, {} computed in {:.1} s: {:.0} views/s; {} corrupt shard(s) set aside, {} samples skipped",
        report.wanted,
        report.present,
        report.computed,
        report.seconds,
        report.views_per_s,
        report.corrupt_shards.len(),
        report.skipped
    );
    println!(
        "store: {} views, {:.1} MB, {:.0} bytes per view",
        report.stored_views,
        report.store_bytes as f64 / 1e6,
        report.bytes_per_view
    );
    Ok(())
}
