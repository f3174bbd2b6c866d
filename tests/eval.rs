//! End-to-end: what comes after pre-training. One tiny run, then `eval
//! linprobe|knn`, `viz` and `export` on its checkpoint, and the probe that
//! ends `pipeline run`.

mod util;

use std::path::Path;
use std::process::Output;

use util::{pipeline, TINY_MODEL};

fn ok(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "failed: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// One epoch over two embedded shards (2500 images) of the tiny model; the
/// end-of-run probe on 1000 / 500 samples.
fn pretrain(run_dir: &Path) -> String {
    ok(pipeline()
        .args(["run", "configs/pretrain.yaml"])
        .args([
            "--set",
            "data.train=['../shards/data/fashion-mnist/train-{000000..000001}.tar.zst']",
            "--set",
            "data.lanes=2",
            "--set",
            "train.epochs=1",
            "--set",
            "train.batch_size=100",
            "--set",
            "eval.after_run_samples=[1000, 500]",
            // The closing fine-tune, small: 2% of 2500 labels, 2 epochs, 500 test images.
            "--set",
            "eval.after_run_finetune_fraction=0.02",
            "--set",
            "eval.finetune.epochs=2",
            "--set",
            "eval.test_limit=500",
        ])
        .args(TINY_MODEL)
        .arg("--set")
        .arg(format!("run.dir={}", run_dir.display()))
        .output()
        .unwrap())
}

fn decode_png(path: &Path) -> (usize, usize, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

/// The safetensors header: tensor name -> shape, and the metadata.
fn safetensors_header(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

#[test]
fn eval_viz_and_export_work_on_a_fresh_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let out = pretrain(&run_dir);
    let ckpt = run_dir.join("ckpt");

    // The run ends with the probe, printed and in summary.json.
    assert!(
        out.contains("linear probe top-1 (1000 train / 500 test samples"),
        "{out}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    for key in ["pretrained_top1", "random_init_top1"] {
        let top1 = summary["probe"][key].as_f64().unwrap_or(-1.0);
        // 10 balanced classes: far above chance, at most 1.
        assert!((0.3..=1.0).contains(&top1), "{key} {top1}: {summary}");
    }
    // And with the fine-tune at 2% of the labels (50 images: 5 per class).
    assert!(
        out.contains("fine-tune top-1 at 2% of the labels (50 train / 500 test samples, 2 epochs)"),
        "{out}"
    );
    for key in ["pretrained_top1", "random_init_top1"] {
        let top1 = summary["finetune"][key].as_f64().unwrap_or(-1.0);
        // Above the 10% of chance (and of a head that never learned: one class for all).
        assert!((0.13..=1.0).contains(&top1), "{key} {top1}: {summary}");
    }
    for dir in ["finetune-pretrained", "finetune-random-init"] {
        assert!(run_dir.join(dir).join("metrics.jsonl").is_file(), "{dir}");
        let (w, h, _) = decode_png(&run_dir.join(dir).join("finetune.png"));
        assert_eq!((w, h), (1000, 420));
    }

    // eval finetune: one JSON line; the same inputs give the same bits.
    // One run on 1 thread, one on 2: the bits do not depend on the thread count either.
    let finetune = |out: &Path, threads: &str| -> serde_json::Value {
        let line = ok(pipeline()
            .env("RAYON_NUM_THREADS", threads)
            .args(["eval", "finetune", "configs/pretrain.yaml", "--checkpoint"])
            .arg(&ckpt)
            .args([
                "--set",
                "eval.train_limit=1000",
                "--set",
                "eval.test_limit=300",
                "--set",
                "eval.label_fraction=0.1",
                "--set",
                "eval.finetune.epochs=3",
                "--set",
                "eval.finetune.batch_size=32",
                "--set",
                "eval.finetune.eval_every=1",
                "--out",
            ])
            .arg(out)
            .output()
            .unwrap());
        serde_json::from_str(line.trim()).unwrap()
    };
    let (a, b) = (
        finetune(&dir.path().join("ft-a"), "1"),
        finetune(&dir.path().join("ft-b"), "2"),
    );
    assert_eq!(
        (a["eval"].as_str(), a["test_samples"].as_u64()),
        (Some("finetune"), Some(300)),
        "{a}"
    );
    // 10% of each class of the first 1000 (not exactly 100 per class there).
    let n = a["train_samples"].as_u64().unwrap();
    assert!((95..=105).contains(&n), "{a}");
    // 10 classes: a top-5 (null with 5 classes or fewer), above top-1 here.
    assert!(a["top5"].as_f64().unwrap() > a["top1"].as_f64().unwrap(), "{a}");
    for key in ["top1", "top5", "final_loss"] {
        assert_eq!(a[key], b[key], "{key}: {a} vs {b}");
    }
    // The metrics, but for the clock, are the same too.
    let timeless = |name: &str| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(dir.path().join(name).join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("seconds");
                if let Some(r) = v.get_mut("result").and_then(|r| r.as_object_mut()) {
                    r.remove("seconds");
                }
                v
            })
            .collect()
    };
    let epochs = timeless("ft-a");
    assert_eq!(epochs, timeless("ft-b"));
    // One line per epoch (each evaluated) and the result.
    assert_eq!(epochs.len(), 4, "{epochs:?}");
    assert!(epochs[..3].iter().all(|e| e["test_top1"].is_number()), "{epochs:?}");

    // eval linprobe / knn: one JSON line each.
    for method in ["linprobe", "knn"] {
        let line = ok(pipeline()
            .args(["eval", method, "configs/pretrain.yaml", "--checkpoint"])
            .arg(&ckpt)
            .args(["--set", "eval.train_limit=1000", "--set", "eval.test_limit=500"])
            .output()
            .unwrap());
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(
            (
                v["eval"].as_str(),
                v["train_samples"].as_u64(),
                v["test_samples"].as_u64()
            ),
            (Some(method), Some(1000), Some(500))
        );
        let top1 = v["top1"].as_f64().unwrap();
        assert!((0.3..=1.0).contains(&top1), "{method}: {v}");
    }
    // The same probe settings as the run's own: the same top-1 (deterministic).
    let line = ok(pipeline()
        .args(["eval", "linprobe", "configs/pretrain.yaml", "--checkpoint"])
        .arg(&ckpt)
        .args(["--set", "eval.train_limit=1000", "--set", "eval.test_limit=500"])
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["top1"], summary["probe"]["pretrained_top1"]);

    // viz: x, x̂, x_M, drawing 1, drawing 2 per row.
    let png_path = dir.path().join("viz.png");
    ok(pipeline()
        .arg("viz")
        .arg(&ckpt)
        .args([
            "--shards",
            "shards/data/fashion-mnist/test-000000.tar.zst",
            "--n",
            "3",
            "--out",
        ])
        .arg(&png_path)
        .output()
        .unwrap());
    let (width, height, rgb) = decode_png(&png_path);
    let (panel, gap) = (28 * 4, 2);
    assert_eq!((width, height), (5 * panel + 6 * gap, 3 * panel + 4 * gap));
    let px = |row: usize, col: usize, x: usize, y: usize| {
        let at = ((gap + row * (panel + gap) + y) * width + gap + col * (panel + gap) + x) * 3;
        [rgb[at], rgb[at + 1], rgb[at + 2]]
    };
    let (mut differing, mut masked) = (0, 0);
    for row in 0..3 {
        for y in 0..panel {
            for x in 0..panel {
                let is_masked = px(row, 2, x, y) == [255, 0, 255];
                masked += is_masked as usize;
                if !is_masked {
                    // Visible patches: x_M and both drawings are the image itself.
                    let image = px(row, 0, x, y);
                    assert_eq!(px(row, 2, x, y), image, "x_M at row {row} ({x}, {y})");
                    assert_eq!(px(row, 3, x, y), image, "drawing 1 at row {row} ({x}, {y})");
                    assert_eq!(px(row, 4, x, y), image, "drawing 2 at row {row} ({x}, {y})");
                } else if px(row, 3, x, y) != px(row, 4, x, y) {
                    differing += 1;
                }
            }
        }
    }
    // MAE masking keeps floor(49 * 0.25) = 12 of 49 patches: 37 masked patches of
    // (4 px * scale 4)^2 pixels per row. The two noise draws differ there.
    assert_eq!(masked, 3 * 37 * 16 * 16, "masked pixels");
    assert!(
        differing > masked / 10,
        "only {differing} of {masked} masked pixels differ between the drawings"
    );

    // export: timm names and shapes for the run's backbone (D 32, depth 1, 49 + 1 tokens).
    let st = dir.path().join("vit.safetensors");
    ok(pipeline()
        .arg("export")
        .arg(&ckpt)
        .args(["--format", "timm", "--out"])
        .arg(&st)
        .output()
        .unwrap());
    let header = safetensors_header(&st);
    let names: Vec<&String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .collect();
    assert_eq!(names.len(), 4 + 12 + 2, "{names:?}");
    assert_eq!(header["pos_embed"]["shape"], serde_json::json!([1, 50, 32]));
    assert_eq!(
        header["patch_embed.proj.weight"]["shape"],
        serde_json::json!([32, 1, 4, 4])
    );
    assert_eq!(header["blocks.0.mlp.fc1.weight"]["shape"], serde_json::json!([128, 32]));
    assert!(header["__metadata__"]["timm_kwargs"]
        .as_str()
        .unwrap()
        .contains("\"embed_dim\":32"));
}

#[test]
fn eval_errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let out = pipeline()
        .args(["eval", "knn", "configs/pretrain.yaml", "--checkpoint"])
        .arg(dir.path().join("nothing"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing") && err.contains("not a checkpoint"), "{err}");
    let out = pipeline()
        .args(["viz"])
        .arg(dir.path())
        .args(["--shards", "x.tar", "--out", "v.png"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.yaml"));
}

#[test]
fn ablation_runs_every_row_and_writes_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("rows");
    std::fs::create_dir(&rows).unwrap();
    // Two of the shipped rows, on a toy budget: one shard, 5 steps, a one-block backbone.
    for name in ["1-baseline.yaml", "5-predictor.yaml"] {
        let text = std::fs::read_to_string(util::repo().join("configs/ablation").join(name)).unwrap();
        let text = text.replace("../../shards/", &format!("{}/shards/", util::repo().display()));
        std::fs::write(rows.join(name), text).unwrap();
    }
    let table = dir.path().join("table.md");
    ok(pipeline()
        .arg("ablation")
        .arg(&rows)
        .arg("--out")
        .arg(&table)
        .arg("--runs")
        .arg(dir.path().join("runs"))
        .args(["--seeds", "2", "--finetune", "0.1:2"])
        .args([
            "--set",
            &format!(
                "data.train=['{}/shards/data/fashion-mnist/train-000000.tar.zst']",
                util::repo().display()
            ),
            "--set",
            "data.lanes=1",
            "--set",
            "train.batch_size=250",
            "--set",
            "model.backbone.depth=1",
            "--set",
            "eval.train_limit=300",
            "--set",
            "eval.test_limit=200",
        ])
        .output()
        .unwrap());
    let md = std::fs::read_to_string(&table).unwrap();
    let lines: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
    assert_eq!(lines.len(), 4, "{md}"); // header, random init, two rows
    assert!(lines[1].starts_with("| random init"), "{md}");
    assert!(
        lines[2].starts_with("| 1-baseline | draw none, noise none, predictor none | 1250 |"),
        "{md}"
    );
    assert!(
        lines[3].starts_with("| 5-predictor | draw coarse, noise mapping, predictor linear | 1250 |"),
        "{md}"
    );
    assert!(
        lines[0].contains("| linear probe top-1 | kNN top-1 | fine-tune 10% labels (2 ep) top-1 |"),
        "{md}"
    );
    for line in &lines[1..] {
        // Three "mean ± std%" cells per row (two seeds), each within 0..100.
        let cells: Vec<&str> = line.split('|').map(str::trim).filter(|c| c.ends_with('%')).collect();
        assert_eq!(cells.len(), 3, "{line}");
        for c in cells {
            let (mean, std) = c
                .trim_end_matches('%')
                .split_once(" ± ")
                .unwrap_or_else(|| panic!("{line}"));
            let (mean, std): (f64, f64) = (mean.parse().unwrap(), std.parse().unwrap());
            assert!((0.0..=100.0).contains(&mean) && (0.0..=100.0).contains(&std), "{line}");
        }
    }
    // Each pretrained row against random init and against the baseline, said plainly.
    assert!(
        md.contains("- 1-baseline vs random init (no pre-training): linear probe "),
        "{md}"
    );
    assert!(md.contains("- 5-predictor vs 1-baseline: "), "{md}");
    assert!(md.contains("the spread"), "{md}");
    assert!(md.contains("Command: `"), "{md}");
}
