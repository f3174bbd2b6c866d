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
