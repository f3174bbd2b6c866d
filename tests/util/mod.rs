//! Shared by the end-to-end tests: the repository, the shared data, the binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root (the root package's directory).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The shared data folder (photos, testvectors): $CROSSMAE_SHARED or ../shared.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("CROSSMAE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared"))
}

/// The `pipeline` binary next to this test's own build directory, run from the
/// repository root. `cargo test --workspace` builds it (the `pipeline` package
/// has integration tests of its own, which makes cargo build its binary first).
pub fn pipeline() -> Command {
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("pipeline"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} not built: run `cargo test --workspace` (it builds the binary)",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.current_dir(repo());
    // The default key cache (`data.key_cache: auto`) in the build directory, not the home directory.
    cmd.env(
        "XDG_CACHE_HOME",
        exe.parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("test-cache"),
    );
    cmd
}

/// `--set` overrides that shrink the default model to a one-block toy, so a
/// test trains in seconds.
pub const TINY_MODEL: &[&str] = &[
    "--set",
    "model.backbone.embed_dim=32",
    "--set",
    "model.backbone.depth=1",
    "--set",
    "model.backbone.num_heads=2",
    "--set",
    "model.draw.embed_dim=32",
    "--set",
    "model.draw.num_heads=2",
];
