//! Helpers for the shard tests: hand-made tars, so each bad case is explicit.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Write a plain tar holding these (name, contents) members, in order.
pub fn write_tar(path: &Path, members: &[(&str, &[u8])]) {
    let mut builder = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in members {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, *data).unwrap();
    }
    builder.finish().unwrap();
}

/// Members for samples `k0`, `k1`, ...: each `KEY.png` (non-empty) + `KEY.cls`.
pub fn good_members(n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .flat_map(|i| {
            [
                (format!("k{i}.png"), vec![i as u8 + 1; 700 + i]),
                (format!("k{i}.cls"), (i % 10).to_string().into_bytes()),
            ]
        })
        .collect()
}

pub fn as_refs(members: &[(String, Vec<u8>)]) -> Vec<(&str, &[u8])> {
    members.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect()
}

/// The shared data folder (photos, testvectors): $CROSSMAE_SHARED or ../../shared.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("CROSSMAE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}
