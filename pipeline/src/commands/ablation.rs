//! `pipeline ablation DIR --out TABLE.md`: pre-train every config of DIR
//! (sorted by file name, e.g. `configs/ablation/1-baseline.yaml` ...
//! `5-predictor.yaml`, the rows of the paper's Table 8), evaluate each
//! backbone by linear probe and kNN, and write a markdown table.
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
use crate::evaluate::{eval_device, features_of, load_backbone, random_backbone};
use crate::job::{self, RunArgs};
use crate::trainer::checkpoint_dir;

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
}

/// One finished row of the table.
struct Row {
    name: String,
    switches: String,
    images: u64,
    loss: String,
    pretrain_s: f64,
    linprobe: f64,
    knn: f64,
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
    // Check every row loads before spending hours on the first.
    let loaded: Vec<RunConfig> = configs
        .iter()
        .map(|c| config::load(c, &args.set))
        .collect::<anyhow::Result<_>>()?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let started = Instant::now();
    let mut rows = Vec::new();

    let first = &loaded[0];
    let t = Instant::now();
    let (linprobe, knn) = evaluate(&random_backbone(&first.model, first.seed, &eval_device(first)?)?, first)?;
    rows.push(Row {
        name: "random init (no pre-training)".into(),
        switches: "-".into(),
        images: 0,
        loss: "-".into(),
        pretrain_s: 0.0,
        linprobe,
        knn,
    });
    tracing::info!(
        "random init: linprobe {linprobe:.4}, knn {knn:.4} ({:.0} s)",
        t.elapsed().as_secs_f64()
    );
    write_table(args, &command, first, &rows, started)?;

    for (path, cfg) in configs.iter().zip(&loaded) {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let run_dir = args.runs.join(&name);
        let mut set = args.set.clone();
        set.push(format!("run.dir={}", run_dir.display()));
        set.push("eval.after_run=false".into());
        let trained = run_dir.join("summary.json").is_file() && checkpoint_dir(&run_dir).is_dir();
        if args.skip_trained && trained {
            tracing::info!("ablation row {name}: already trained in {}", run_dir.display());
        } else {
            tracing::info!("ablation row {name}: pre-training into {}", run_dir.display());
            job::run(&RunArgs {
                config: path.clone(),
                set,
                resume: None,
                cluster: crate::cluster::ClusterArgs::local(args.workers),
                stop_after_epochs: None,
            })
            .with_context(|| format!("ablation row {}", path.display()))?;
        }
        let summary_path = run_dir.join("summary.json");
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&summary_path).with_context(|| format!("reading {}", summary_path.display()))?,
        )?;
        let pretrain_s = summary["seconds"].as_f64().unwrap_or(f64::NAN);
        let backbone = load_backbone(&checkpoint_dir(&run_dir), &cfg.model, &eval_device(cfg)?)?;
        let (linprobe, knn) = evaluate(&backbone, cfg)?;
        let m = &cfg.model;
        rows.push(Row {
            name,
            switches: format!(
                "draw {}, noise {}, predictor {}",
                serde_json::to_value(m.draw.mode)?.as_str().unwrap_or("?"),
                serde_json::to_value(m.noise)?.as_str().unwrap_or("?"),
                serde_json::to_value(m.predictor)?.as_str().unwrap_or("?"),
            ),
            images: summary["samples"].as_u64().unwrap_or(0),
            loss: format!(
                "{:.4} -> {:.4}",
                summary["first_loss"].as_f64().unwrap_or(f64::NAN),
                summary["last_loss"].as_f64().unwrap_or(f64::NAN)
            ),
            pretrain_s,
            linprobe,
            knn,
        });
        tracing::info!("{}: linprobe {linprobe:.4}, knn {knn:.4}", path.display());
        write_table(args, &command, first, &rows, started)?;
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// Linear-probe and kNN top-1 of a backbone, on one feature extraction.
fn evaluate(vit: &stages::model::Vit, cfg: &RunConfig) -> anyhow::Result<(f64, f64)> {
    let skips = Skips::default();
    let (train, test) = features_of(vit, cfg, [cfg.eval.train_limit, cfg.eval.test_limit], &skips)?;
    let device = eval_device(cfg)?;
    let linprobe = eval::linprobe::evaluate(&cfg.eval.linprobe, &train, &test, &device)?.test_top1;
    let knn = eval::knn::evaluate(&cfg.eval.knn, &train, &test, &device)?;
    Ok((linprobe, knn))
}

fn write_table(
    args: &AblationArgs,
    command: &str,
    cfg: &RunConfig,
    rows: &[Row],
    started: Instant,
) -> anyhow::Result<()> {
    let mut md = String::new();
    writeln!(
        md,
        "| row | switches | images seen | loss first -> last | pre-train s | linear probe top-1 | kNN top-1 |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    for r in rows {
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.2}% | {:.2}% |",
            r.name,
            r.switches,
            r.images,
            r.loss,
            r.pretrain_s,
            100.0 * r.linprobe,
            100.0 * r.knn
        )?;
    }
    writeln!(md)?;
    writeln!(md, "Command: `{command}`")?;
    writeln!(
        md,
        "Probe data: train {:?} ({}), test {:?} ({}); features: {:?}; kNN k = {}, T = {}.",
        cfg.data.train,
        cfg.eval
            .train_limit
            .map_or("all samples".into(), |n| format!("first {n} samples")),
        cfg.data.test,
        cfg.eval
            .test_limit
            .map_or("all samples".into(), |n| format!("first {n} samples")),
        cfg.eval.features,
        cfg.eval.knn.k,
        cfg.eval.knn.temperature
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
