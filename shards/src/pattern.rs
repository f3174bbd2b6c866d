//! Shard patterns: brace lists (`train-{000000..000099}.tar`) and several patterns.

use std::path::PathBuf;

use crate::{Error, Result};

/// Expand each pattern's braces and concatenate, in the order given.
///
/// Expansion is the `webdataset` crate's port of Python's `braceexpand`, so a
/// pattern means here what it means to the Python loader. Files are not
/// checked here: a missing shard is reported (and skipped or fatal, per
/// `on_error`) when it is opened, with its name.
pub fn expand(patterns: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for pattern in patterns {
        let names = webdataset::braceexpand(pattern).map_err(|e| Error::Pattern {
            pattern: pattern.clone(),
            reason: e.to_string(),
        })?;
        out.extend(names.into_iter().map(PathBuf::from));
    }
    if out.is_empty() {
        return Err(Error::Pattern {
            pattern: patterns.join(" "),
            reason: "no shards given".into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_lists_and_several_patterns() {
        let got = expand(&["a-{000..002}.tar".into(), "b-{x,y}.tar.zst".into()]).unwrap();
        let want: Vec<PathBuf> = ["a-000.tar", "a-001.tar", "a-002.tar", "b-x.tar.zst", "b-y.tar.zst"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn no_pattern_is_an_error() {
        assert!(expand(&[]).is_err());
    }
}
