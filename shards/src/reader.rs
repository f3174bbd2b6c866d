//! Reading one shard: members grouped into samples by key, bad input handled.
//!
//! The tar parsing and the compression sniffing are the `webdataset` crate's
//! (`TarEntries`, a forward-only parser with bounded allocation, and
//! `decompress`, which detects zstd/gzip from magic bytes, not the name). The
//! grouping into samples is ours rather than the crate's `Grouper`: DESIGN.md
//! asks for every bad member to be attributed to a shard and key and counted
//! (zero-length members, members without a key, keys that come back later in
//! the shard, duplicate members, truncation in the middle of a sample), and
//! the crate's grouper reports these as bare errors or not at all.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use webdataset::shard::{compress::decompress, TarEntries};

use crate::skips::handle_bad;
use crate::{storage, Error, OnError, Result, Sample, Skips};

/// Split a member name into (key, extension) the way Python's `webdataset`
/// does: the key is the path up to the first dot of the base name; the
/// extension, lower-cased, is the rest. `None` when there is no key or no
/// extension (`.png`, `README`).
pub fn split_member_name(name: &str) -> Option<(&str, String)> {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = base_start + name[base_start..].find('.')?;
    let (key, ext) = (&name[..dot], &name[dot + 1..]);
    if dot == base_start || ext.is_empty() {
        return None;
    }
    Some((key, ext.to_ascii_lowercase()))
}

/// The samples of one shard, in file order.
///
/// Under [`OnError::Skip`] bad samples are counted in the [`Skips`] and left
/// out; under [`OnError::Fail`] the first one ends the iteration with an
/// [`Error::BadSample`] naming shard and key. A read error (truncated tar,
/// corrupt zstd frame, bad header checksum) ends the shard: the sample being
/// assembled then is counted as bad, since it may be incomplete.
pub struct ShardReader {
    shard: PathBuf,
    entries: Option<TarEntries<Box<dyn Read + Send>>>,
    policy: OnError,
    skips: Skips,
    /// The sample being assembled, and why it is bad if it is.
    pending: Option<(Sample, Option<String>)>,
    /// Keys already finished in this shard, to catch keys that come back.
    seen: HashSet<String>,
}

impl ShardReader {
    /// Open `shard`. A missing or unreadable file is a skipped shard under
    /// `Skip` (the reader is then empty) and an error under `Fail`.
    pub fn open(shard: &Path, policy: OnError, skips: &Skips) -> Result<ShardReader> {
        ShardReader::from_stream(shard, storage::open_read(shard), policy, skips)
    }

    /// A reader over `opened`, the shard's byte stream as [`storage::open_read`]
    /// gave it (opened ahead of time by a lane that prefetches).
    pub fn from_stream(
        shard: &Path,
        opened: std::io::Result<Box<dyn Read + Send>>,
        policy: OnError,
        skips: &Skips,
    ) -> Result<ShardReader> {
        let mut reader = ShardReader {
            shard: shard.to_path_buf(),
            entries: None,
            policy,
            skips: skips.clone(),
            pending: None,
            seen: HashSet::new(),
        };
        let opened = opened
            .map_err(|e| e.to_string())
            .and_then(|stream| decompress(stream).map_err(|e| e.to_string()));
        match opened {
            Ok((_, stream)) => reader.entries = Some(TarEntries::new(stream)),
            Err(why) => {
                let reason = format!("cannot open shard: {why}");
                match policy {
                    OnError::Skip => skips.record_shard(&shard.display().to_string(), &reason),
                    OnError::Fail => {
                        return Err(Error::BadSample {
                            shard: shard.into(),
                            key: "*".into(),
                            reason,
                        })
                    }
                }
            }
        }
        Ok(reader)
    }

    /// The shard this reader reads.
    pub fn shard(&self) -> &Path {
        &self.shard
    }

    fn bad(&self, key: &str, reason: &str) -> Result<()> {
        handle_bad(self.policy, &self.skips, &self.shard, key, reason)
    }

    /// Finish the pending sample: `Some(sample)` if it is good.
    fn finish_pending(&mut self) -> Result<Option<Sample>> {
        let Some((sample, bad)) = self.pending.take() else {
            return Ok(None);
        };
        self.seen.insert(sample.key.clone());
        match bad {
            None => Ok(Some(sample)),
            Some(reason) => self.bad(&sample.key, &reason).map(|()| None),
        }
    }

    fn advance(&mut self) -> Result<Option<Sample>> {
        loop {
            let Some(entries) = self.entries.as_mut() else {
                return Ok(None);
            };
            let entry = match entries.next() {
                None => {
                    self.entries = None;
                    return self.finish_pending();
                }
                Some(Err(e)) => {
                    // The stream is damaged, or the storage gave up: nothing after this
                    // point can be trusted.
                    self.entries = None;
                    let key = self.pending.take().map_or_else(|| "?".to_string(), |(s, _)| s.key);
                    let transport = matches!(&e, webdataset::Error::Io(io) if crate::skips::is_unavailable(io));
                    let kind = if transport {
                        crate::skips::UNAVAILABLE
                    } else {
                        "damaged shard"
                    };
                    self.bad(&key, &format!("{kind}: {e}"))?;
                    return Ok(None);
                }
                Some(Ok(entry)) => entry,
            };
            let Some((key, ext)) = split_member_name(&entry.name) else {
                self.bad(&entry.name, "member without key: name has no `key.extension` form")?;
                continue;
            };
            let same_key = self.pending.as_ref().is_some_and(|(s, _)| s.key == key);
            let mut ready = None;
            if !same_key {
                ready = self.finish_pending()?;
                let bad = self
                    .seen
                    .contains(key)
                    .then(|| "duplicate key: the key appears again later in the shard".to_string());
                self.pending = Some((Sample::new(key), bad));
            }
            let (sample, bad) = self.pending.as_mut().expect("pending was just set");
            if entry.data.is_empty() {
                bad.get_or_insert_with(|| format!("zero-length member: {key}.{ext}"));
            } else if sample.files.contains_key(&ext) {
                bad.get_or_insert_with(|| format!("duplicate member: {key}.{ext} appears twice"));
            }
            sample.files.insert(ext, entry.data);
            if ready.is_some() {
                return Ok(ready);
            }
        }
    }
}

impl Iterator for ShardReader {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Result<Sample>> {
        match self.advance() {
            Ok(sample) => sample.map(Ok),
            Err(e) => {
                // After an error under `fail` the shard is over.
                self.entries = None;
                self.pending = None;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_split_like_python_webdataset() {
        assert_eq!(split_member_name("a/b.seg.PNG"), Some(("a/b", "seg.png".to_string())));
        assert_eq!(split_member_name("x.y/k.jpg"), Some(("x.y/k", "jpg".to_string())));
        assert_eq!(split_member_name("k.cls"), Some(("k", "cls".to_string())));
        assert_eq!(split_member_name(".png"), None);
        assert_eq!(split_member_name("dir/.png"), None);
        assert_eq!(split_member_name("README"), None);
        assert_eq!(split_member_name("k."), None);
    }
}
