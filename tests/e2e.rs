//! End-to-end tests: the real `pipeline` binary in a temp dir.
//!
//! The binary is built by `cargo test --workspace` (the `pipeline` package has
//! integration tests of its own, which makes cargo build its binary first).

use std::path::{Path, PathBuf};
use std::process::Output;

mod util;
use util::{pipeline, repo, shared_dir, TINY_MODEL};

fn ok(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "failed:\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn json(output: Output) -> serde_json::Value {
    serde_json::from_str(&ok(output)).expect("valid JSON")
}

#[test]
fn inspect_photo_shards_reports_1024_samples_none_bad() {
    let pattern = shared_dir().join("data/photos-{000000..000003}.tar");
    let report = json(
        pipeline()
            .args(["shards", "inspect"])
            .arg(pattern)
            .arg("--json")
            .output()
            .unwrap(),
    );
    assert_eq!(report["shards"], 4);
    assert_eq!(report["samples"], 1024);
    assert_eq!(report["bad_samples"], 0);
    assert_eq!(report["extensions"]["jpg"], 1024);
    assert_eq!(report["extensions"]["cls"], 1024);
}

#[test]
fn embedded_fashion_mnist_is_balanced_and_complete() {
    let train = json(
        pipeline()
            .args([
                "shards",
                "inspect",
                "shards/data/fashion-mnist/train-{000000..000007}.tar.zst",
                "--json",
            ])
            .output()
            .unwrap(),
    );
    assert_eq!(
        (train["samples"].as_u64(), train["bad_samples"].as_u64()),
        (Some(10_000), Some(0))
    );
    assert_eq!(train["extensions"]["png"], 10_000);
    let test = json(
        pipeline()
            .args([
                "shards",
                "inspect",
                "shards/data/fashion-mnist/test-{000000..000007}.tar.zst",
                "--json",
            ])
            .output()
            .unwrap(),
    );
    assert_eq!(
        (test["samples"].as_u64(), test["bad_samples"].as_u64()),
        (Some(10_000), Some(0))
    );
}

/// Settings that make the default config quick enough for a test: one epoch
/// over two of the embedded shards (plus [`TINY_MODEL`]).
const QUICK: &[&str] = &[
    "--set",
    "data.train=['../shards/data/fashion-mnist/train-{000000..000001}.tar.zst']",
    "--set",
    "data.lanes=2",
    "--set",
    "train.epochs=1",
    "--set",
    "train.batch_size=100",
];

#[test]
fn main_job_trains_on_the_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let out = ok(pipeline()
        .args(["run", "configs/pretrain.yaml"])
        .args(QUICK)
        .args(TINY_MODEL)
        .arg("--set")
        .arg(format!("run.dir={}", run_dir.display()))
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap());
    // 2 shards of 1250 in 2 lanes, 50 per lane per batch: 25 batches.
    assert!(out.contains("trained 25 batches (2500 samples)"), "{out}");
    assert!(out.contains("skipped: 0 samples, 0 shards"), "{out}");
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "step")
        .collect();
    assert_eq!(steps.len(), 25);
    assert!(steps
        .iter()
        .all(|s| s["loss"].as_f64().unwrap().is_finite() && s["samples"] == 100));
    // The loss comes down over the epoch (mean of the last five below the first five).
    let mean = |s: &[serde_json::Value]| s.iter().map(|v| v["loss"].as_f64().unwrap()).sum::<f64>() / s.len() as f64;
    assert!(mean(&steps[20..]) < mean(&steps[..5]), "loss did not fall: {metrics}");
    // Flow control: never more than `run.window` (4) batches of 100 between the lanes and the trainer.
    let stage_lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "stages")
        .collect();
    assert!(!stage_lines.is_empty(), "no per-stage metrics");
    for line in &stage_lines {
        let queued: u64 = line["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["queue"].as_u64().unwrap())
            .sum();
        assert!(queued <= 4 * 100, "{queued} records in flight: {line}");
    }
    assert!(
        run_dir.join("ckpt/state.json").exists(),
        "no checkpoint at the epoch end"
    );
    let png = std::fs::read(run_dir.join("loss.png")).expect("loss.png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // A second run into the same directory is refused, not mixed into the first.
    let again = pipeline()
        .args(["run", "configs/pretrain.yaml"])
        .args(QUICK)
        .args(TINY_MODEL)
        .arg("--set")
        .arg(format!("run.dir={}", run_dir.display()))
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a run"));
}

/// Write a tiny IDX pair: `n` 3x2 images whose pixels encode (index, position), labels `i % classes`.
fn write_idx(dir: &Path, n: usize, classes: u8, gzip: bool) -> (PathBuf, PathBuf, Vec<Vec<u8>>) {
    let images: Vec<Vec<u8>> = (0..n)
        .map(|i| (0..6).map(|p| (i * 7 + p * 31) as u8).collect())
        .collect();
    let mut img = vec![0, 0, 8, 3];
    for d in [n as u32, 3, 2] {
        img.extend(d.to_be_bytes());
    }
    img.extend(images.iter().flatten());
    let mut lab = vec![0, 0, 8, 1];
    lab.extend((n as u32).to_be_bytes());
    lab.extend((0..n).map(|i| i as u8 % classes));
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        if gzip {
            use std::io::Write;
            let mut enc =
                flate2::write::GzEncoder::new(std::fs::File::create(&path).unwrap(), flate2::Compression::fast());
            enc.write_all(bytes).unwrap();
            enc.finish().unwrap();
        } else {
            std::fs::write(&path, bytes).unwrap();
        }
        path
    };
    (write("images.idx", &img), write("labels.idx", &lab), images)
}

fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Grayscale);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

#[test]
fn import_idx_writes_pngs_that_decode_to_the_source_pixels() {
    for gzip in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (images, labels, pixels) = write_idx(dir.path(), 25, 3, gzip);
        let out = dir.path().join("out/idx-%06d.tar.zst");
        ok(pipeline()
            .args(["shards", "import", "idx", "--images"])
            .arg(&images)
            .arg("--labels")
            .arg(&labels)
            .arg("--out")
            .arg(&out)
            .args(["--per-class", "4", "--max-samples", "5", "--key-prefix", "t-"])
            .output()
            .unwrap());
        let paths = shards::expand(&[dir
            .path()
            .join("out/idx-{000000..000002}.tar.zst")
            .to_string_lossy()
            .into_owned()])
        .unwrap();
        let skips = shards::Skips::default();
        let samples: Vec<shards::Sample> = paths
            .iter()
            .flat_map(|p| shards::ShardReader::open(p, shards::OnError::Fail, &skips).unwrap())
            .collect::<Result<_, _>>()
            .unwrap();
        // 4 per class, first in file order: indices 0..12 (labels cycle 0,1,2).
        assert_eq!(samples.len(), 12);
        for (sample, index) in samples.iter().zip(0..12usize) {
            assert_eq!(sample.key, format!("t-{index:06}"));
            assert_eq!(sample.class_index(), Some((index % 3) as i64));
            assert_eq!(decode_png(&sample.files["png"]), (2, 3, pixels[index].clone()));
        }
    }
}

#[test]
fn import_folder_writes_classes_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ds");
    for (class, files) in [("cat", vec!["a.jpg", "b.v2.PNG"]), ("dog", vec!["c.jpeg"])] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for f in files {
            std::fs::write(root.join(class).join(f), format!("bytes of {f}")).unwrap();
        }
    }
    std::fs::write(root.join("dog/notes.txt"), "not an image").unwrap();
    let out = dir.path().join("shards/f-%06d.tar");
    ok(pipeline()
        .args(["shards", "import", "folder"])
        .arg(&root)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("shards/classes.txt")).unwrap(),
        "cat\ndog\n"
    );
    let skips = shards::Skips::default();
    let samples: Vec<shards::Sample> =
        shards::ShardReader::open(&dir.path().join("shards/f-000000.tar"), shards::OnError::Fail, &skips)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let got: Vec<(String, String, i64)> = samples
        .iter()
        .map(|s| {
            let (ext, _) = s.first(&["jpg", "png"]).unwrap();
            (s.key.clone(), ext.to_string(), s.class_index().unwrap())
        })
        .collect();
    let want = [("cat_a", "jpg", 0), ("cat_b_v2", "png", 0), ("dog_c", "jpg", 1)];
    assert_eq!(got, want.map(|(k, e, c)| (k.to_string(), e.to_string(), c)));
    assert_eq!(samples[1].files["png"], b"bytes of b.v2.PNG");
}

/// A config over one good and one truncated shard (plus a missing one), of
/// real images taken from the embedded dataset.
fn damaged_dataset(dir: &Path) -> PathBuf {
    let skips = shards::Skips::default();
    let source = repo().join("shards/data/fashion-mnist/train-000000.tar.zst");
    let mut writer = shards::ShardWriter::new(
        dir.join("d-%06d.tar").to_str().unwrap(),
        shards::WriterOptions {
            max_samples: 10,
            ..Default::default()
        },
    )
    .unwrap();
    for sample in shards::ShardReader::open(&source, shards::OnError::Fail, &skips)
        .unwrap()
        .take(20)
    {
        writer.write(&sample.unwrap()).unwrap();
    }
    let paths = writer.close().unwrap();
    // Cut the second shard in half.
    let bytes = std::fs::read(&paths[1]).unwrap();
    std::fs::write(&paths[1], &bytes[..bytes.len() / 2]).unwrap();
    let config = dir.join("c.yaml");
    let base = std::fs::read_to_string(repo().join("configs/pretrain.yaml")).unwrap();
    let config_text = base
        .replace(
            "'../shards/data/fashion-mnist/train-{000000..000007}.tar.zst'",
            "'d-{000000..000002}.tar'",
        )
        .replace("lanes: 4", "lanes: 1");
    std::fs::write(&config, config_text).unwrap();
    config
}

#[test]
fn run_skips_bad_input_with_counts_or_fails_naming_shard_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = damaged_dataset(dir.path());
    let run_dir = dir.path().join("run");
    // The damaged data and its single lane stay; one epoch of the tiny model.
    let quick = ["--set", "train.epochs=1"].iter().chain(TINY_MODEL);
    // One bad sample in about 16 is past the default data.max_skip_fraction (1%):
    // the run stops, saying how many were skipped and why.
    let out = pipeline()
        .arg("run")
        .arg(&config)
        .args(quick.clone())
        .args(["--set", "train.batch_size=2", "--set"])
        .arg(format!("run.dir={}", dir.path().join("run-strict").display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("were skipped as bad input") && err.contains("data.max_skip_fraction 0.01"),
        "{err}"
    );
    let out = pipeline()
        .arg("run")
        .arg(&config)
        .args(quick.clone())
        .args([
            "--set",
            "train.batch_size=2",
            "--set",
            "data.max_skip_fraction=0.5",
            "--set",
        ])
        .arg(format!("run.dir={}", run_dir.display()))
        .output()
        .unwrap();
    let stdout = ok(out);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["skipped_samples"], 1, "{summary}");
    // Shard 0: 10 good. Shard 1, cut in half: its complete samples read, the
    // one in progress counted. Shard 2: missing, counted.
    assert!(stdout.contains("skipped: 1 samples, 1 shards"), "{stdout}");
    let readable = shards::ShardReader::open(
        &dir.path().join("d-000001.tar"),
        shards::OnError::Skip,
        &shards::Skips::default(),
    )
    .unwrap()
    .count() as u64;
    assert!((1..10).contains(&readable));
    let trained: u64 = stdout
        .split("trained ")
        .nth(1)
        .and_then(|s| s.split(" batches").next())
        .and_then(|n| n.parse().ok())
        .expect("trained N batches");
    assert_eq!(trained, (10 + readable) / 2, "{stdout}");

    let out = pipeline()
        .arg("run")
        .arg(&config)
        .args(quick)
        .args(["--set", "train.batch_size=2", "--set", "data.on_error=fail", "--set"])
        .arg(format!("run.dir={}", dir.path().join("run-fail").display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("d-000001.tar:train-") || err.contains("d-000002.tar"),
        "{err}"
    );
}

/// Once a run has read its shards' keys, the next takes them from the key
/// cache (`data.key_cache`): the same batches and the same bad samples
/// counted, and a shard that changed is read again.
#[test]
fn a_second_run_takes_the_shard_keys_from_the_key_cache() {
    let dir = tempfile::tempdir().unwrap();
    // d-000000: 10 good samples; d-000001: cut in half (one bad); d-000002: missing.
    let config = damaged_dataset(dir.path());
    let keys = dir.path().join("keys");
    let run = |name: &str, key_cache: &str| -> (String, Vec<String>, serde_json::Value) {
        let run_dir = dir.path().join(name);
        let out = pipeline()
            .arg("run")
            .arg(&config)
            .args(["--set", "train.epochs=1", "--set", "train.batch_size=2"])
            .args(["--set", "data.max_skip_fraction=0.5"])
            .args(TINY_MODEL)
            .arg("--set")
            .arg(format!("data.key_cache={key_cache}"))
            .arg("--set")
            .arg(format!("run.dir={}", run_dir.display()))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        ok(out);
        let digests = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "step")
            .map(|v| v["batch_digest"].as_str().unwrap().to_string())
            .collect();
        let summary = serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
        (stderr, digests, summary)
    };
    let cache = keys.display().to_string();
    let (first, digests, summary) = run("first", &cache);
    assert!(first.contains("keys of 3 shards: 0 from the key cache"), "{first}");
    // The two shards that exist have entries; the missing one is read (and skipped) each time.
    assert_eq!(std::fs::read_dir(&keys).unwrap().count(), 2);
    let (second, digests2, summary2) = run("second", &cache);
    assert!(second.contains("keys of 3 shards: 2 from the key cache"), "{second}");
    assert_eq!(digests2, digests);
    assert!(!digests.is_empty());
    assert_eq!(summary2["skipped_samples"], summary["skipped_samples"]);
    assert!(second.contains("(1 bad, skipped each epoch)"), "{second}");

    // A new d-000000 of 6 samples: read again, and the batches follow it.
    let source = repo().join("shards/data/fashion-mnist/train-000000.tar.zst");
    let mut writer = shards::ShardWriter::new(
        dir.path().join("new-%06d.tar").to_str().unwrap(),
        shards::WriterOptions::default(),
    )
    .unwrap();
    for sample in shards::ShardReader::open(&source, shards::OnError::Fail, &shards::Skips::default())
        .unwrap()
        .skip(50)
        .take(6)
    {
        writer.write(&sample.unwrap()).unwrap();
    }
    let written = writer.close().unwrap();
    std::fs::rename(&written[0], dir.path().join("d-000000.tar")).unwrap();
    let (third, digests3, _) = run("third", &cache);
    assert!(third.contains("keys of 3 shards: 1 from the key cache"), "{third}");
    let (_, uncached, _) = run("uncached", "off");
    assert_eq!(digests3, uncached, "the cached keys of a changed shard were used");
    assert_ne!(digests3, digests);
}

/// A run whose shards are all missing names them; a finished run resumed has
/// nothing to train and says so: neither exits 0.
#[test]
fn runs_that_would_train_nothing_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = pipeline()
        .args(["run", "configs/pretrain.yaml", "--set"])
        .arg(format!("data.train=['{}/gone-{{0..2}}.tar']", dir.path().display()))
        .arg("--set")
        .arg(format!("run.dir={}", dir.path().join("run").display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("none of the 3 shards exists") && err.contains("gone-0.tar"),
        "{err}"
    );
    // A pipe gets no terminal colour codes.
    assert!(!err.contains('\x1b'), "colour codes in piped output: {err:?}");

    let run_dir = dir.path().join("done");
    let quick = ["--set", "train.epochs=1"];
    let out = pipeline()
        .args(["run", "configs/pretrain.yaml"])
        .args(quick)
        .args(TINY_MODEL)
        .args(["--set", "eval.after_run=false", "--set"])
        .arg(format!("run.dir={}", run_dir.display()))
        .output()
        .unwrap();
    ok(out);
    let out = pipeline()
        .args(["run", "configs/pretrain.yaml"])
        .args(quick)
        .args(TINY_MODEL)
        .args(["--set", "eval.after_run=false", "--resume"])
        .arg(&run_dir)
        .arg("--set")
        .arg(format!("run.dir={}", run_dir.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing to train"), "{err}");
}
