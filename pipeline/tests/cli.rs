//! The binary's command line: help, bad invocations, config errors.
//! (Having an integration test here also makes `cargo test --workspace` build
//! the `pipeline` binary that the root package's end-to-end tests run.)

use std::process::Command;

fn pipeline() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
}

#[test]
fn help_lists_the_subcommands() {
    let out = pipeline().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["run", "shards", "stages", "bench"] {
        assert!(text.contains(sub), "{sub} missing from help:\n{text}");
    }
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = pipeline().args(["run", "no/such/config.yaml"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no/such/config.yaml"), "{err}");
}

#[test]
fn config_errors_name_file_and_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "data:\n  train: [x.tar]\n  shuffle_buffer: lots\n").unwrap();
    let out = pipeline().arg("run").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml") && err.contains("data.shuffle_buffer"), "{err}");
}

#[test]
fn bench_train_prints_one_json_line() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/pretrain.yaml");
    let out = pipeline()
        .args([
            "bench", "train", config, "--batch", "4", "--steps", "2", "--warmup", "0",
        ])
        .args([
            "--set",
            "model.backbone.depth=1",
            "--set",
            "model.backbone.embed_dim=24",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(line["figure"], "train_step");
    assert_eq!(line["result"]["batch"], 4);
    assert_eq!(line["result"]["steps"], 2);
    assert!(line["result"]["median_ms"].as_f64().unwrap() > 0.0);
    // The phase breakdown names every phase of a step, in order, with its time.
    let phases: Vec<(String, f64)> = serde_json::from_value(line["result"]["phases_ms"].clone()).unwrap();
    let names: Vec<&str> = phases.iter().map(|(p, _)| p.as_str()).collect();
    let expected = [
        "upload",
        "inputs",
        "forward",
        "backward",
        "accumulate",
        "grad_norm",
        "adamw",
    ];
    assert_eq!(&names[..expected.len()], expected, "{phases:?}");
    assert!(phases.iter().all(|(_, ms)| *ms >= 0.0), "{phases:?}");
    assert!(phases.iter().map(|(_, ms)| ms).sum::<f64>() > 0.0, "{phases:?}");
}
