//! Writing shards: size limits, optional zstd, and no half shard that looks whole.
//!
//! Each shard is written under `NAME.tmp-PID` and renamed to `NAME` only once
//! the tar trailer and the zstd frame are complete and the file is synced, so
//! a crash leaves at worst a `.tmp-*` file that no shard pattern matches.
//! Tar framing is the `webdataset` crate's `TarWriter` (fields sorted, mtime
//! pinned: the same samples give byte-identical shards). Compression is ours:
//! the crate's zstd writer uses a fixed level and finishes the frame in `Drop`,
//! where an error would be lost; here the frame is finished explicitly.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use webdataset::shard::{Compression, TarWriter};

use crate::{Error, Result, Sample};

/// Limits and compression for a [`ShardWriter`].
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Start a new shard after this many samples.
    pub max_samples: usize,
    /// Start a new shard once this many payload bytes are in the current one.
    pub max_bytes: u64,
    /// zstd level for `.zst` names (1 fast ... 19 small).
    pub zstd_level: i32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            max_samples: 10_000,
            max_bytes: 1 << 30,
            zstd_level: 3,
        }
    }
}

/// The output stream of one shard: a file, maybe behind a zstd encoder.
/// Shared so that it can be finished after `TarWriter` has written the trailer.
enum Stream {
    Plain(BufWriter<File>),
    Zstd(zstd::Encoder<'static, BufWriter<File>>),
}

#[derive(Clone)]
struct SharedStream(Arc<Mutex<Option<Stream>>>);

impl Write for SharedStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.as_mut() {
            Some(Stream::Plain(w)) => w.write(buf),
            Some(Stream::Zstd(w)) => w.write(buf),
            None => Err(std::io::Error::other("shard stream already finished")),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.as_mut() {
            Some(Stream::Plain(w)) => w.flush(),
            Some(Stream::Zstd(w)) => w.flush(),
            None => Ok(()),
        }
    }
}

struct OpenShard {
    tar: TarWriter,
    stream: SharedStream,
    temp: PathBuf,
    path: PathBuf,
    samples: usize,
    bytes: u64,
}

/// Writes samples into numbered shards: `out/train-%06d.tar.zst`.
pub struct ShardWriter {
    pattern: String,
    options: WriterOptions,
    next_index: usize,
    current: Option<OpenShard>,
    written: Vec<PathBuf>,
}

/// Fill the first `%d` / `%0Nd` of `pattern` with `index` (Python's `ShardWriter` convention).
pub fn shard_name(pattern: &str, index: usize) -> Result<String> {
    let bad = || Error::Pattern {
        pattern: pattern.into(),
        reason: "needs one `%d` or `%06d` for the shard number".into(),
    };
    let start = pattern.find('%').ok_or_else(bad)?;
    let rest = &pattern[start + 1..];
    let end = rest.find('d').ok_or_else(bad)?;
    let spec = &rest[..end];
    if !spec.chars().all(|c| c.is_ascii_digit()) || pattern[start + 1 + end + 1..].contains('%') {
        return Err(bad());
    }
    let width: usize = if spec.is_empty() {
        0
    } else {
        spec.parse().map_err(|_| bad())?
    };
    Ok(format!(
        "{}{:0width$}{}",
        &pattern[..start],
        index,
        &rest[end + 1..],
        width = width
    ))
}

impl ShardWriter {
    /// A writer for shards named by `pattern` (checked now, files made lazily).
    pub fn new(pattern: &str, options: WriterOptions) -> Result<ShardWriter> {
        shard_name(pattern, 0)?;
        if options.max_samples == 0 {
            return Err(Error::Pattern {
                pattern: pattern.into(),
                reason: "max_samples must be at least 1".into(),
            });
        }
        Ok(ShardWriter {
            pattern: pattern.into(),
            options,
            next_index: 0,
            current: None,
            written: Vec::new(),
        })
    }

    fn open_next(&mut self) -> Result<&mut OpenShard> {
        let path = PathBuf::from(shard_name(&self.pattern, self.next_index)?);
        self.next_index += 1;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let temp = PathBuf::from(format!("{}.tmp-{}", path.display(), std::process::id()));
        let file = BufWriter::new(File::create(&temp).map_err(|e| Error::io(&temp, e))?);
        let compressed = path.extension().is_some_and(|e| e == "zst" || e == "zstd");
        let stream = if compressed {
            let mut encoder = zstd::Encoder::new(file, self.options.zstd_level).map_err(|e| Error::io(&temp, e))?;
            // A content checksum turns a corrupt frame into a read error
            // instead of silently damaged sample bytes.
            encoder.include_checksum(true).map_err(|e| Error::io(&temp, e))?;
            Stream::Zstd(encoder)
        } else {
            Stream::Plain(file)
        };
        let stream = SharedStream(Arc::new(Mutex::new(Some(stream))));
        let tar = TarWriter::new(Box::new(stream.clone()), Compression::None)
            .map_err(|e| Error::format(&temp, e))?
            .with_mtime(Some(0));
        Ok(self.current.insert(OpenShard {
            tar,
            stream,
            temp,
            path,
            samples: 0,
            bytes: 0,
        }))
    }

    /// Append a sample, starting a new shard when the current one is full.
    pub fn write(&mut self, sample: &Sample) -> Result<()> {
        let full = self
            .current
            .as_ref()
            .is_some_and(|s| s.samples >= self.options.max_samples || s.bytes >= self.options.max_bytes);
        if full {
            self.finish_current()?;
        }
        let shard = match self.current.as_mut() {
            Some(s) => s,
            None => self.open_next()?,
        };
        let mut record = webdataset::Sample::with_key(sample.key.clone());
        for (ext, data) in &sample.files {
            record.insert(ext.clone(), webdataset::Value::Bytes(data.clone().into()));
        }
        let bytes = shard
            .tar
            .write(&record)
            .map_err(|e| Error::format(&shard.temp, format!("{}: {e}", sample.key)))?;
        shard.samples += 1;
        shard.bytes += bytes;
        Ok(())
    }

    fn finish_current(&mut self) -> Result<()> {
        let Some(shard) = self.current.take() else {
            return Ok(());
        };
        let temp = shard.temp.clone();
        shard.tar.close().map_err(|e| Error::format(&temp, e))?;
        let stream = shard.stream.0.lock().ok().and_then(|mut s| s.take());
        let mut file = match stream {
            Some(Stream::Plain(w)) => w,
            Some(Stream::Zstd(z)) => z.finish().map_err(|e| Error::io(&temp, e))?,
            None => return Err(Error::format(&temp, "shard stream vanished before it was finished")),
        };
        file.flush().map_err(|e| Error::io(&temp, e))?;
        let file = file.into_inner().map_err(|e| Error::io(&temp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&temp, e))?;
        std::fs::rename(&temp, &shard.path).map_err(|e| Error::io(&shard.path, e))?;
        self.written.push(shard.path);
        Ok(())
    }

    /// Finish the shard being written now, so the next sample starts a new
    /// one; returns its path (`None` when no shard was open). The target
    /// cache's store closes a shard per flush of its buffer.
    pub fn finish_shard(&mut self) -> Result<Option<PathBuf>> {
        let before = self.written.len();
        self.finish_current()?;
        Ok(self.written.get(before).cloned())
    }

    /// Finish the last shard and return every shard written, in order.
    pub fn close(mut self) -> Result<Vec<PathBuf>> {
        self.finish_current()?;
        Ok(std::mem::take(&mut self.written))
    }

    /// Shards completed so far.
    pub fn written(&self) -> &[PathBuf] {
        &self.written
    }
}

impl Drop for ShardWriter {
    /// A writer dropped without `close` (an error upstream) removes its
    /// unfinished temporary file rather than leaving it behind.
    fn drop(&mut self) {
        if let Some(shard) = self.current.take() {
            let temp = shard.temp.clone();
            drop(shard);
            let _ = std::fs::remove_file(Path::new(&temp));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_follow_printf_patterns() {
        assert_eq!(shard_name("out/s-%06d.tar", 7).unwrap(), "out/s-000007.tar");
        assert_eq!(shard_name("s-%d.tar.zst", 12).unwrap(), "s-12.tar.zst");
        assert!(shard_name("s.tar", 0).is_err());
        assert!(shard_name("s-%06d-%d.tar", 0).is_err());
        assert!(shard_name("s-%x.tar", 0).is_err());
    }
}
