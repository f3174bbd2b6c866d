//! `pipeline ablation DIR --out TABLE.md [--seeds N]`: pre-train every config
//! of DIR (sorted by file name, e.g. `configs/ablation/1-baseline.yaml` ...
//! `5-predictor.yaml`, the rows of the paper's Table 8), evaluate each
//! backbone by linear probe, kNN and end-to-end fine-tunes (all labels and
//! 1% of them by default), N times with seeds 0..N, and write a markdown
//! table of mean ± std with which differences exceed the seed spread.
//!
//! Every row gets the same `--set` overrides (the data and the budget), so
//! the rows differ only in what their configs switch. The table is rewritten
//! after every row, so a cut-short ablation still leaves the rows it finished.
//! A first row, "random init", evaluates the first config's backbone at its
//! initialization: the floor pre-training has to beat.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use shards::Skips;
use stages::eval;

use crate::config::{self, RunConfig};
use crate::evaluate::{checkpoint_backbone_tensors, eval_device, features_of, random_backbone_tensors};
use crate::job::{self, RunArgs};
use crate::trainer::checkpoint_dir;
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// Arguments of `pipeline ablation`.
#[derive(Debug, clap::Args)]
pub struct AblationArgs {
    /// The directory of row configs (`*.yaml`, run in file-name order).
    pub dir: PathBuf,
    /// The markdown table to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Where the runs go: one directory per row, named after its config.
    #[arg(long, default_value = "runs/ablation")]
    pub runs: PathBuf,
    /// Overrides applied to every row: `--set data.train=[...] --set train.epochs=2`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Rows whose run directory already holds a finished run (summary.json
    /// and a checkpoint) are evaluated again, not trained again: finish a
    /// cut-short ablation, or re-probe with other `eval` settings.
    #[arg(long)]
    pub skip_trained: bool,
    /// Timely workers of each run.
    #[arg(long, short = 'w', default_value_t = 1)]
    pub workers: usize,
    /// Pre-train and evaluate every row this many times, with seeds 0..N;
    /// the table shows mean ± std.
    #[arg(long, default_value_t = 1)]
    pub seeds: usize,
    /// The fine-tune columns, `FRACTION[:EPOCHS]` each: one end-to-end
    /// fine-tune per label fraction, with `eval.finetune`'s recipe and its
    /// epochs unless given (all labels take fewer epochs than 1% of them);
    /// an empty list (`--finetune=`) for none.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["1:5".to_string(), "0.01".to_string()])]
    pub finetune: Vec<String>,
}

/// One row of the table: its runs, one per seed.
struct Row {
    name: String,
    switches: String,
    images: u64,
    loss: String,
    pretrain_s: f64,
    /// Pre-training seconds of each finished seed (`pretrain_s` is their mean).
    pretrain_seconds: Vec<f64>,
    /// Per column ([`columns`]), one value per finished seed.
    values: Vec<Vec<f64>>,
}

/// A fine-tune column: the label fraction, and its epochs when not `eval.finetune.epochs`.
#[derive(Debug, Clone, Copy)]
struct FinetuneColumn {
    fraction: f64,
    epochs: Option<usize>,
}

impl FinetuneColumn {
    /// `FRACTION[:EPOCHS]`, e.g. `1:5` or `0.01`.
    fn parse(s: &str) -> anyhow::Result<Self> {
        let (f, e) = match s.split_once(':') {
            Some((f, e)) => (f, Some(e)),
            None => (s, None),
        };
        let fraction: f64 = f
            .trim()
            .parse()
            .with_context(|| format!("--finetune {s:?}: bad label fraction"))?;
        if !(fraction > 0.0 && fraction <= 1.0) {
            bail!("--finetune {s:?}: the label fraction must lie in (0, 1]");
        }
        let epochs = match e {
            Some(e) => {
                let n: usize = e
                    .trim()
                    .parse()
                    .with_context(|| format!("--finetune {s:?}: bad epoch count"))?;
                if n == 0 {
                    bail!("--finetune {s:?}: epochs must be positive");
                }
                Some(n)
            }
            None => None,
        };
        Ok(Self { fraction, epochs })
    }
}

/// The table's metric columns: linear probe, kNN, then one fine-tune per fraction.
fn columns(finetunes: &[FinetuneColumn]) -> Vec<String> {
    let mut out = vec!["linear probe".to_string(), "kNN".to_string()];
    for f in finetunes {
        let mut name = if f.fraction >= 1.0 {
            "fine-tune".to_string()
        } else {
            // Rounded so that 0.07 prints 7, not 7.000000000000001.
            format!("fine-tune {}% labels", (1e6 * f.fraction).round() / 1e4)
        };
        if let Some(e) = f.epochs {
            name.push_str(&format!(" ({e} ep)"));
        }
        out.push(name);
    }
    out
}

/// The overrides that make seed `seed` of a row: the run's seed and every
/// evaluation seed (probe head, label subset, fine-tune).
fn seed_overrides(seed: u64) -> Vec<String> {
    ["seed", "eval.linprobe.seed", "eval.label_seed", "eval.finetune.seed"]
        .iter()
        .map(|k| format!("{k}={seed}"))
        .collect()
}

/// Run `pipeline ablation`.
pub fn run(args: &AblationArgs) -> anyhow::Result<()> {
    let mut configs: Vec<PathBuf> = std::fs::read_dir(&args.dir)
        .with_context(|| format!("reading {}", args.dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    configs.sort();
    if configs.is_empty() {
        bail!("{}: no *.yaml row configs", args.dir.display());
    }
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let finetunes = args
        .finetune
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| FinetuneColumn::parse(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let seeds: Vec<u64> = (0..args.seeds as u64).collect();
    // Check every row and seed loads before spending hours on the first.
    let loaded: Vec<Vec<RunConfig>> = configs
        .iter()
        .map(|c| {
            seeds
                .iter()
                .map(|&s| config::load(c, &[args.set.clone(), seed_overrides(s)].concat()))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .collect::<anyhow::Result<_>>()?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let started = Instant::now();
    let names = columns(&finetunes);
    let mut rows = vec![Row {
        name: "random init (no pre-training)".into(),
        switches: "-".into(),
        images: 0,
        loss: "-".into(),
        pretrain_s: 0.0,
        pretrain_seconds: Vec::new(),
        values: vec![Vec::new(); names.len()],
    }];
    for cfg in &loaded[0] {
        let t = Instant::now();
        let device = eval_device(cfg)?;
        let backbone = random_backbone_tensors(&cfg.model, cfg.seed)?;
        let v = evaluate(&backbone, cfg, &finetunes, &device)?;
        tracing::info!(
            "random init, seed {}: {v:?} ({:.0} s)",
            cfg.seed,
            t.elapsed().as_secs_f64()
        );
        push(&mut rows[0], &v);
        write_table(args, &command, &loaded[0][0], &names, &rows, started)?;
    }

    for (path, per_seed) in configs.iter().zip(&loaded) {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let m = &per_seed[0].model;
        rows.push(Row {
            name: name.clone(),
            switches: format!(
                "draw {}, noise {}, predictor {}",
                serde_json::to_value(m.draw.mode)?.as_str().unwrap_or("?"),
                serde_json::to_value(m.noise)?.as_str().unwrap_or("?"),
                serde_json::to_value(m.predictor)?.as_str().unwrap_or("?"),
            ),
            images: 0,
            loss: String::new(),
            pretrain_s: 0.0,
            pretrain_seconds: Vec::new(),
            values: vec![Vec::new(); names.len()],
        });
        let mut losses = Vec::new();
        for (&seed, cfg) in seeds.iter().zip(per_seed) {
            let run_dir = args.runs.join(&name).join(format!("seed{seed}"));
            let mut set = [args.set.clone(), seed_overrides(seed)].concat();
            set.push(format!("run.dir={}", run_dir.display()));
            set.push("eval.after_run=false".into());
            let trained = run_dir.join("summary.json").is_file() && checkpoint_dir(&run_dir).is_dir();
            if args.skip_trained && trained {
                tracing::info!(
                    "ablation row {name}, seed {seed}: already trained in {}",
                    run_dir.display()
                );
            } else {
                tracing::info!(
                    "ablation row {name}, seed {seed}: pre-training into {}",
                    run_dir.display()
                );
                job::run(&RunArgs {
                    config: path.clone(),
                    set,
                    resume: None,
                    cluster: crate::cluster::ClusterArgs::local(args.workers),
                    stop_after_epochs: None,
                })
                .with_context(|| format!("ablation row {}, seed {seed}", path.display()))?;
            }
            let summary_path = run_dir.join("summary.json");
            let summary: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&summary_path)
                    .with_context(|| format!("reading {}", summary_path.display()))?,
            )?;
            let backbone = checkpoint_backbone_tensors(&checkpoint_dir(&run_dir))?;
            let v = evaluate(&backbone, cfg, &finetunes, &eval_device(cfg)?)?;
            tracing::info!("{}, seed {seed}: {v:?}", path.display());
            let row = rows.last_mut().expect("pushed above");
            push(row, &v);
            row.images = summary["samples"].as_u64().unwrap_or(0);
            row.pretrain_seconds
                .push(summary["seconds"].as_f64().unwrap_or(f64::NAN));
            row.pretrain_s = stats(&row.pretrain_seconds).0;
            losses.push(summary["last_loss"].as_f64().unwrap_or(f64::NAN));
            row.loss = format!(
                "{:.4} -> {}",
                summary["first_loss"].as_f64().unwrap_or(f64::NAN),
                mean_std(&losses, 1.0, 4)
            );
            write_table(args, &command, &per_seed[0], &names, &rows, started)?;
        }
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

fn push(row: &mut Row, values: &[f64]) {
    for (column, v) in row.values.iter_mut().zip(values) {
        column.push(*v);
    }
}

/// Linear-probe and kNN top-1 of a backbone (one feature extraction), then
/// its fine-tunes at `fractions` of the labels.
fn evaluate(
    backbone: &HashMap<String, Tensor>,
    cfg: &RunConfig,
    finetunes: &[FinetuneColumn],
    device: &Device,
) -> anyhow::Result<Vec<f64>> {
    let skips = Skips::default();
    let vit = stages::model::Vit::new(
        &cfg.model.backbone,
        candle_nn::VarBuilder::from_tensors(backbone.clone(), candle_core::DType::F32, device),
    )?;
    let (train, test) = features_of(&vit, cfg, [cfg.eval.train_limit, cfg.eval.test_limit], &skips)?;
    let mut out = vec![
        eval::linprobe::evaluate(&cfg.eval.linprobe, &train, &test, device)?.test_top1,
        eval::knn::evaluate(&cfg.eval.knn, &train, &test, device)?,
    ];
    for f in finetunes {
        let mut cfg = cfg.clone();
        if let Some(e) = f.epochs {
            cfg.eval.finetune.epochs = e;
        }
        out.push(crate::finetune::finetune(&cfg, &cfg.model, backbone, f.fraction, device, None, &skips)?.top1);
    }
    Ok(out)
}

/// Sample mean and standard deviation.
fn stats(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// `mean ± std` (the std only with two or more values), values times `scale`.
fn mean_std(v: &[f64], scale: f64, digits: usize) -> String {
    let (m, s) = stats(v);
    if v.len() > 1 {
        format!("{:.digits$} ± {:.digits$}", m * scale, s * scale)
    } else {
        format!("{:.digits$}", m * scale)
    }
}

/// Whether two columns' means differ by more than their seeds spread: more
/// than twice the standard error of the difference (Welch).
fn exceeds_spread(a: &[f64], b: &[f64]) -> Option<bool> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let ((ma, sa), (mb, sb)) = (stats(a), stats(b));
    let se = (sa * sa / a.len() as f64 + sb * sb / b.len() as f64).sqrt();
    Some((ma - mb).abs() > 2.0 * se)
}

fn write_table(
    args: &AblationArgs,
    command: &str,
    cfg: &RunConfig,
    names: &[String],
    rows: &[Row],
    started: Instant,
) -> anyhow::Result<()> {
    let mut md = String::new();
    let seeds = rows.iter().map(|r| r.values[0].len()).max().unwrap_or(0);
    write!(
        md,
        "| row | switches | images seen | loss first -> last | pre-train s |"
    )?;
    for n in names {
        write!(md, " {n} top-1 |")?;
    }
    writeln!(md)?;
    writeln!(md, "|---|---|---|---|---|{}", "---|".repeat(names.len()))?;
    for r in rows {
        write!(
            md,
            "| {} | {} | {} | {} | {:.0} |",
            r.name, r.switches, r.images, r.loss, r.pretrain_s
        )?;
        for column in &r.values {
            write!(md, " {}% |", mean_std(column, 100.0, 2))?;
        }
        writeln!(md)?;
    }
    writeln!(md)?;
    if seeds > 1 {
        writeln!(
            md,
            "Mean ± standard deviation over seeds 0..{seeds} (the run's seed and every evaluation seed). \
             A difference exceeds the seed spread when the means differ by more than twice the \
             standard error of their difference:"
        )?;
        writeln!(md)?;
        let against = |md: &mut String, base: &Row| -> std::fmt::Result {
            // Pretrained rows only (random init is the first base).
            for r in rows.iter().skip(1).filter(|r| r.name != base.name) {
                let mut parts = Vec::new();
                for (i, n) in names.iter().enumerate() {
                    let d = 100.0 * (stats(&r.values[i]).0 - stats(&base.values[i]).0);
                    let verdict = match exceeds_spread(&r.values[i], &base.values[i]) {
                        Some(true) => "exceeds the spread",
                        Some(false) => "within the spread",
                        None => "too few seeds",
                    };
                    parts.push(format!("{n} {d:+.2} ({verdict})"));
                }
                writeln!(md, "- {} vs {}: {}", r.name, base.name, parts.join(", "))?;
            }
            Ok(())
        };
        against(&mut md, &rows[0])?;
        if rows.len() > 2 {
            against(&mut md, &rows[1])?;
        }
        writeln!(md)?;
    }
    writeln!(md, "Command: `{command}`")?;
    writeln!(
        md,
        "Probe data: train {:?} ({}, label fraction {}), test {:?} ({}); features: {:?}; kNN k = {}, T = {}.",
        cfg.data.train,
        cfg.eval
            .train_limit
            .map_or("all samples".into(), |n| format!("first {n} samples")),
        cfg.eval.label_fraction,
        cfg.data.test,
        cfg.eval
            .test_limit
            .map_or("all samples".into(), |n| format!("first {n} samples")),
        cfg.eval.features,
        cfg.eval.knn.k,
        cfg.eval.knn.temperature
    )?;
    let ft = &cfg.eval.finetune;
    writeln!(
        md,
        "Fine-tune: {} epochs unless the column says, batch {}, blr {}, layer decay {}, drop path {}, label smoothing {}, mixup {}, cutmix {}, crop scale {:?}.",
        ft.epochs, ft.batch_size, ft.blr, ft.layer_decay, ft.drop_path, ft.label_smoothing, ft.mixup, ft.cutmix, ft.scale
    )?;
    writeln!(
        md,
        "Elapsed: {:.0} s for {} rows.",
        started.elapsed().as_secs_f64(),
        rows.len()
    )?;
    write_atomic(&args.out, &md)
}

fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("md.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped rows load, and differ only in the switches of Table 8:
    /// same data, stages, backbone, schedule and seed (equal compute per row).
    #[test]
    fn shipped_rows_load_and_differ_only_in_their_switches() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/ablation");
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        paths.sort();
        let rows: Vec<RunConfig> = paths
            .iter()
            .map(|p| config::load(p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display())))
            .collect();
        assert_eq!(rows.len(), 5);
        let switches = |c: &RunConfig| {
            let m = &c.model;
            serde_json::to_string(&(m.draw.mode, m.noise, m.predictor)).unwrap()
        };
        let got: Vec<String> = rows.iter().map(switches).collect();
        assert_eq!(
            got,
            [
                r#"["none","none","none"]"#,
                r#"["coarse","none","none"]"#,
                r#"["coarse","concat","none"]"#,
                r#"["coarse","mapping","none"]"#,
                r#"["coarse","mapping","linear"]"#,
            ]
        );
        for (path, row) in paths.iter().zip(&rows) {
            let what = path.display();
            assert_eq!(row.data, rows[0].data, "{what}: data");
            assert_eq!(row.stages, rows[0].stages, "{what}: stages");
            assert_eq!(row.train, rows[0].train, "{what}: train");
            assert_eq!(row.eval, rows[0].eval, "{what}: eval");
            assert_eq!(row.seed, rows[0].seed, "{what}: seed");
            assert_eq!(row.model.backbone, rows[0].model.backbone, "{what}: backbone");
            assert_eq!(row.model.target_dim, rows[0].model.target_dim, "{what}: target");
        }
        assert_eq!(rows[0].stages.targets.kinds, vec![stages::targets::Kind::Pixel]);
    }
}
