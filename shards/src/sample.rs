//! A WebDataset sample: the files of one key, by extension.

use std::collections::BTreeMap;

/// The files that share one key in a shard (`KEY.png`, `KEY.cls`, ...).
///
/// Extensions are everything after the first dot of the member's base name,
/// as Python's `webdataset` splits them (`a/b.seg.png` is key `a/b`, extension
/// `seg.png`), lower-cased.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sample {
    /// The sample key, unique within its shard.
    pub key: String,
    /// Member contents by extension, sorted so iteration order is stable.
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Sample {
    /// An empty sample with this key.
    pub fn new(key: impl Into<String>) -> Sample {
        Sample {
            key: key.into(),
            files: BTreeMap::new(),
        }
    }

    /// Add a file, builder style: `Sample::new("k").with("cls", b"3")`.
    pub fn with(mut self, ext: impl Into<String>, data: impl Into<Vec<u8>>) -> Sample {
        self.files.insert(ext.into(), data.into());
        self
    }

    /// The first of these extensions present (`sample.first(&["jpg", "jpeg", "png"])`).
    pub fn first(&self, exts: &[&str]) -> Option<(&str, &[u8])> {
        exts.iter()
            .find_map(|e| self.files.get_key_value(*e))
            .map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// The class index stored in `KEY.cls` (decimal text), if any.
    pub fn class_index(&self) -> Option<i64> {
        let bytes = self.files.get("cls")?;
        std::str::from_utf8(bytes).ok()?.trim().parse().ok()
    }

    /// Total payload bytes.
    pub fn bytes(&self) -> usize {
        self.files.values().map(Vec::len).sum()
    }
}
