//! Loss curves of a run as a PNG (`RUN/loss.png`), drawn from its metrics.jsonl.
//!
//! plotters draws text with a TrueType font it is given; none ships with the
//! crate, so a system font is looked up (DejaVu Sans on Debian). Without one,
//! the curves are drawn without labels rather than not at all.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::Context;
use plotters::prelude::*;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Register a system font for plotters once; whether text can be drawn.
fn font_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        FONT_PATHS.iter().any(|path| {
            std::fs::read(path).is_ok_and(|bytes| {
                // plotters keeps the font for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            })
        })
    })
}

/// (step, loss, loss_draw, loss_pred) of every step line.
fn read_losses(metrics: &Path) -> anyhow::Result<Vec<(f64, [f64; 3])>> {
    let text = std::fs::read_to_string(metrics).with_context(|| format!("reading {}", metrics.display()))?;
    let mut points = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: bad line", metrics.display()))?;
        if v["kind"] != "step" {
            continue;
        }
        let get = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        points.push((get("batch"), [get("loss"), get("loss_draw"), get("loss_pred")]));
    }
    Ok(points)
}

/// Draw `loss.png` in `run_dir` from its `metrics.jsonl`.
pub fn loss_png(run_dir: &Path) -> anyhow::Result<()> {
    let points = read_losses(&run_dir.join("metrics.jsonl"))?;
    if points.is_empty() {
        return Ok(());
    }
    let out = run_dir.join("loss.png");
    let text = font_available();
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points
        .iter()
        .flat_map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(1e-6, f64::max)
        * 1.05;
    let root = BitMapBackend::new(&out, (900, 500)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(15);
        if text {
            builder
                .caption("CrossMAE losses", ("sans-serif", 22))
                .x_label_area_size(35)
                .y_label_area_size(55);
        }
        let mut chart = builder.build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        if text {
            chart.configure_mesh().x_desc("batch").y_desc("loss").draw()?;
        }
        let series = [("L = L_draw + lambda L_pred", BLUE), ("L_draw", GREEN), ("L_pred", RED)];
        for (i, (name, color)) in series.into_iter().enumerate() {
            let line = LineSeries::new(points.iter().map(|p| (p.0, p.1[i])).filter(|p| p.1.is_finite()), color);
            let drawn = chart.draw_series(line)?;
            if text {
                drawn
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", out.display()))
}

/// `finetune.png` in `dir`: the training loss per epoch (left) and the test
/// top-1 at the epochs it was measured (right).
pub fn finetune_png(dir: &Path, lines: &[crate::finetune::EpochLine]) -> anyhow::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let out = dir.join("finetune.png");
    let text = font_available();
    let epochs = lines.len() as f64;
    let loss_max = lines
        .iter()
        .map(|l| l.train_loss)
        .filter(|v| v.is_finite())
        .fold(1e-6, f64::max)
        * 1.05;
    let accuracy: Vec<(f64, f64)> = lines
        .iter()
        .filter_map(|l| l.test_top1.map(|t| (l.epoch as f64, 100.0 * t)))
        .collect();
    let root = BitMapBackend::new(&out, (1000, 420)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(500);
        let panels = [
            (left, "fine-tune: training loss", "loss", loss_max),
            (right, "fine-tune: test top-1", "top-1 (%)", 100.0),
        ];
        for (i, (area, caption, y_desc, y_max)) in panels.into_iter().enumerate() {
            let mut builder = ChartBuilder::on(&area);
            builder.margin(15);
            if text {
                builder
                    .caption(caption, ("sans-serif", 20))
                    .x_label_area_size(35)
                    .y_label_area_size(55);
            }
            let mut chart = builder.build_cartesian_2d(0.0..epochs.max(1.0), 0.0..y_max)?;
            if text {
                chart.configure_mesh().x_desc("epoch").y_desc(y_desc).draw()?;
            }
            if i == 0 {
                let points = lines
                    .iter()
                    .map(|l| (l.epoch as f64, l.train_loss))
                    .filter(|p| p.1.is_finite());
                chart.draw_series(LineSeries::new(points, BLUE))?;
            } else {
                chart.draw_series(LineSeries::new(accuracy.iter().copied(), RED))?;
                chart.draw_series(accuracy.iter().map(|&p| Circle::new(p, 4, RED.filled())))?;
            }
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", out.display()))
}
