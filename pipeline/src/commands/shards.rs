//! `pipeline shards import|inspect`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use shards::import::{folder::import_folder, idx::import_idx, idx::IdxImport, ImportSummary};
use shards::WriterOptions;

#[derive(Debug, Subcommand)]
pub enum ShardsCommand {
    /// Write shards from another dataset layout.
    Import {
        #[command(subcommand)]
        command: ImportCommand,
    },
    /// Count shards, samples, extensions and bytes; list bad samples and why.
    Inspect(InspectArgs),
}

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// MNIST-format IDX files (gzipped or not) to `KEY.png` + `KEY.cls`.
    Idx(IdxArgs),
    /// One folder per class (DIR/<class>/<image>) to `KEY.<ext>` + `KEY.cls`, plus classes.txt.
    Folder(FolderArgs),
}

/// Shard size and compression, shared by the importers.
#[derive(Debug, Args)]
pub struct ShardOptions {
    /// Output shard pattern with a `%06d` for the shard number; `.tar.zst` compresses.
    #[arg(long)]
    pub out: String,
    /// Samples per shard.
    #[arg(long, default_value_t = 10_000)]
    pub max_samples: usize,
    /// Payload bytes per shard.
    #[arg(long, default_value_t = 1 << 30)]
    pub max_bytes: u64,
    /// zstd level for `.tar.zst` output (1 fast ... 19 small).
    #[arg(long, default_value_t = 3)]
    pub zstd_level: i32,
}

impl ShardOptions {
    fn writer(&self) -> WriterOptions {
        WriterOptions {
            max_samples: self.max_samples,
            max_bytes: self.max_bytes,
            zstd_level: self.zstd_level,
        }
    }
}

#[derive(Debug, Args)]
pub struct IdxArgs {
    /// The images file (`*-images-idx3-ubyte[.gz]`).
    #[arg(long)]
    pub images: PathBuf,
    /// The labels file (`*-labels-idx1-ubyte[.gz]`).
    #[arg(long)]
    pub labels: PathBuf,
    /// Keep the first N images of each class: a class-balanced subset.
    #[arg(long)]
    pub per_class: Option<usize>,
    /// Stop after N images.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Prefix of each key (`train-` gives `train-000123`, 123 being the index in the IDX file).
    #[arg(long, default_value = "")]
    pub key_prefix: String,
    #[command(flatten)]
    pub shards: ShardOptions,
}

#[derive(Debug, Args)]
pub struct FolderArgs {
    /// The dataset folder: one sub-folder per class.
    pub dir: PathBuf,
    #[command(flatten)]
    pub shards: ShardOptions,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Shard patterns (brace lists allowed): 'train-{000000..000009}.tar.zst'.
    #[arg(required = true)]
    pub patterns: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: ShardsCommand) -> anyhow::Result<()> {
    match command {
        ShardsCommand::Import {
            command: ImportCommand::Idx(args),
        } => {
            let options = IdxImport {
                per_class: args.per_class,
                limit: args.limit,
                key_prefix: args.key_prefix.clone(),
                writer: args.shards.writer(),
            };
            let summary =
                import_idx(&args.images, &args.labels, &args.shards.out, &options).context("importing IDX files")?;
            print_summary(&summary)
        }
        ShardsCommand::Import {
            command: ImportCommand::Folder(args),
        } => {
            let summary = import_folder(&args.dir, &args.shards.out, &args.shards.writer())
                .with_context(|| format!("importing {}", args.dir.display()))?;
            print_summary(&summary)
        }
        ShardsCommand::Inspect(args) => inspect(&args),
    }
}

fn print_summary(summary: &ImportSummary) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "wrote {} samples in {} shards",
        summary.samples,
        summary.shards.len()
    )?;
    writeln!(out, "per class: {:?}", summary.per_class)?;
    if !summary.skipped.is_empty() {
        writeln!(out, "skipped {} input files (see log)", summary.skipped.len())?;
    }
    Ok(())
}

fn inspect(args: &InspectArgs) -> anyhow::Result<()> {
    let paths = shards::expand(&args.patterns)?;
    let report = shards::inspect::inspect(&paths)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "shards:      {} ({} unreadable)", report.shards, report.bad_shards)?;
    writeln!(out, "samples:     {}", report.samples)?;
    writeln!(out, "bad samples: {}", report.bad_samples)?;
    writeln!(out, "bytes:       {}", report.bytes)?;
    for (ext, count) in &report.extensions {
        writeln!(out, "  .{ext}: {count}")?;
    }
    for (reason, count) in &report.bad_by_reason {
        writeln!(out, "  bad, {reason}: {count}")?;
    }
    for bad in &report.bad {
        writeln!(out, "  {}:{}: {}", bad.shard, bad.key, bad.reason)?;
    }
    Ok(())
}
