//! Test helper: reads `shared/testvectors/NAME.npy`.
//!
//! The shared folder is `$CROSSMAE_SHARED` if set, else `../../shared` from this crate.

use candle_core::{Result, Tensor};
use std::path::PathBuf;

/// The shared reference folder.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("CROSSMAE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
}

/// `shared/testvectors/{name}.npy` as a tensor, with the path in the error.
pub fn read(name: &str) -> Result<Tensor> {
    let path = shared_dir().join("testvectors").join(format!("{name}.npy"));
    Tensor::read_npy(&path).map_err(|e| e.context(format!("reading {}", path.display())))
}
