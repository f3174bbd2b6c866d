//! The sample keys of each shard, kept on local disk between runs.
//!
//! A run plans its batches from every shard's sample count, and a run with a
//! target cache checks its views against every sample key, so it starts by
//! reading the keys of all its shards. For a bucket of shards that read is a
//! download of the whole dataset before the first batch. The keys of a shard
//! depend only on its bytes, so this cache keeps them per shard, with the
//! shard's version (size and modification time or ETag, from
//! [`crate::storage::versions`]): an entry is used only while the shard still
//! has that version, and a changed shard is read again.
//!
//! One JSON file per shard, named by the BLAKE3 hash of the shard's path or
//! URL, written to a temporary name and renamed, so runs sharing the cache
//! never read half an entry. An entry that cannot be read is a miss (logged),
//! never an error: the shard is read instead.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::SkipRecord;

/// What the cache keeps of one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardKeysEntry {
    /// The shard's path or URL, as the run names it.
    pub shard: String,
    /// Its version when it was read.
    pub version: String,
    /// The keys of its good samples, in shard order.
    pub keys: Vec<String>,
    /// Its bad samples (read under `on_error: skip`), to count them again.
    pub skipped: Vec<SkipRecord>,
}

/// A directory of [`ShardKeysEntry`] files.
#[derive(Debug, Clone)]
pub struct KeyCache {
    dir: PathBuf,
}

impl KeyCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory of the entries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_path(&self, shard: &Path) -> PathBuf {
        let hash = blake3::hash(shard.as_os_str().as_encoded_bytes());
        self.dir.join(format!("{}.json", &hash.to_hex()[..32]))
    }

    /// The entry of `shard` if the cache has one for this `version`.
    pub fn get(&self, shard: &Path, version: &str) -> Option<ShardKeysEntry> {
        let path = self.entry_path(shard);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!("key cache {}: {e} (reading the shard instead)", path.display());
                return None;
            }
        };
        match serde_json::from_slice::<ShardKeysEntry>(&bytes) {
            Ok(entry) if entry.shard == shard.to_string_lossy() && entry.version == version => Some(entry),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(
                    "key cache {}: not an entry ({e}); reading the shard instead",
                    path.display()
                );
                None
            }
        }
    }

    /// Keep `entry` (replacing any older one of its shard).
    pub fn put(&self, entry: &ShardKeysEntry) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.entry_path(Path::new(&entry.shard));
        let temp = path.with_extension(format!("tmp-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::write(&temp, serde_json::to_vec(entry).map_err(std::io::Error::other)?)?;
        std::fs::rename(&temp, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(shard: &str, version: &str) -> ShardKeysEntry {
        ShardKeysEntry {
            shard: shard.into(),
            version: version.into(),
            keys: vec!["a".into(), "b".into()],
            skipped: vec![SkipRecord {
                shard: shard.into(),
                key: "c".into(),
                reason: "bad image: truncated".into(),
            }],
        }
    }

    #[test]
    fn an_entry_is_found_only_for_its_shard_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KeyCache::new(dir.path().join("keys"));
        let shard = Path::new("s3://bucket/train-000001.tar");
        assert_eq!(cache.get(shard, "size 10 etag x"), None);
        cache
            .put(&entry("s3://bucket/train-000001.tar", "size 10 etag x"))
            .unwrap();
        assert_eq!(
            cache.get(shard, "size 10 etag x"),
            Some(entry("s3://bucket/train-000001.tar", "size 10 etag x"))
        );
        assert_eq!(cache.get(shard, "size 10 etag y"), None, "another version of the shard");
        assert_eq!(
            cache.get(Path::new("s3://bucket/train-000002.tar"), "size 10 etag x"),
            None
        );
        // A newer version replaces the entry.
        cache
            .put(&entry("s3://bucket/train-000001.tar", "size 11 etag y"))
            .unwrap();
        assert_eq!(cache.get(shard, "size 10 etag x"), None);
        assert!(cache.get(shard, "size 11 etag y").is_some());
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(cache.dir()).unwrap().count(), 1);
    }

    #[test]
    fn a_damaged_entry_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KeyCache::new(dir.path());
        let shard = Path::new("data/train-000001.tar");
        cache.put(&entry("data/train-000001.tar", "v")).unwrap();
        let file = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        let text = std::fs::read(&file).unwrap();
        std::fs::write(&file, &text[..text.len() / 2]).unwrap();
        assert_eq!(cache.get(shard, "v"), None);
    }
}
