//! Where shards and cache files live: a local path or an object-store URL.
//!
//! A shard or a cache directory is named by a `PathBuf` whose text is either a
//! local path or a URL: `s3://bucket/key`, `gs://bucket/key`,
//! `az://container/key` (or `azure://`), `http(s)://host/path`, `file:///path`.
//! The functions of this module are the one place that tells the two apart;
//! everything above them (the reader, the lanes, the cache's store) is written
//! once. A URL keeps working as a path where only its text matters: its file
//! name (`Path::file_name`) is the last segment, so a sample read from
//! `s3://b/train-000001.tar` has the same id as one read from
//! `data/train-000001.tar`, and the batches do not depend on where the shards are.
//!
//! Object stores are reached through the `object_store` crate (its S3, GCS,
//! Azure and HTTP clients); credentials and endpoints come from the
//! environment as its builders read them (`AWS_*`, `GOOGLE_*`, `AZURE_*`),
//! for `s3://` also from the AWS profile files ([`aws_profile`]), and from
//! [`StorageOptions::options`]. Reads stream (see [`stream`]).

pub mod aws_profile;
pub mod remote;
pub mod stream;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{OnceLock, RwLock};

use serde::{Deserialize, Serialize};

pub use remote::Remote;

/// How shards and cache files on object storage are read and written
/// (the `storage` section of a run config). Local files ignore all of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageOptions {
    /// Bytes each open remote shard may hold in memory ahead of its reader, in MiB.
    #[serde(default = "default_read_ahead_mib")]
    pub read_ahead_mib: f64,
    /// Shards of a lane opened (and streaming into their read-ahead) before
    /// the lane reaches them, so decode does not wait at a shard boundary.
    #[serde(default = "default_prefetch_shards")]
    pub prefetch_shards: usize,
    /// Retries of a failed request or an interrupted read (resumed at the
    /// byte it reached); the count starts again after every byte of progress.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Wait before the first retry, doubled for each further one.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// The longest wait between two retries.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Seconds one request may take, a whole streamed GET included (a longer
    /// one is cut and resumed, as a retry).
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Options for the object-store clients, by `object_store`'s key names
    /// (`aws_endpoint_url`, `aws_region`, `aws_allow_http`,
    /// `google_service_account`, `azure_storage_account_name`, ...); these win
    /// over the environment. A key the URL's store does not know is an error.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

fn default_read_ahead_mib() -> f64 {
    8.0
}
fn default_prefetch_shards() -> usize {
    1
}
fn default_retries() -> u32 {
    6
}
fn default_backoff_ms() -> u64 {
    200
}
fn default_max_backoff_ms() -> u64 {
    10_000
}
fn default_timeout_s() -> u64 {
    300
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            read_ahead_mib: default_read_ahead_mib(),
            prefetch_shards: default_prefetch_shards(),
            retries: default_retries(),
            backoff_ms: default_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
            timeout_s: default_timeout_s(),
            options: BTreeMap::new(),
        }
    }
}

impl StorageOptions {
    /// Checks serde cannot make.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.read_ahead_mib.is_finite() && self.read_ahead_mib > 0.0) {
            return Err(format!(
                "storage.read_ahead_mib is {}: it must be a positive number of MiB",
                self.read_ahead_mib
            ));
        }
        if self.timeout_s == 0 {
            return Err("storage.timeout_s is 0: a request needs at least 1 s".into());
        }
        if self.backoff_ms > self.max_backoff_ms {
            return Err(format!(
                "storage.backoff_ms {} is above storage.max_backoff_ms {}",
                self.backoff_ms, self.max_backoff_ms
            ));
        }
        Ok(())
    }

    /// The read-ahead in bytes (at least one 64 KiB chunk).
    pub fn read_ahead_bytes(&self) -> usize {
        ((self.read_ahead_mib * (1 << 20) as f64) as usize).max(stream::CHUNK_BYTES)
    }
}

/// The options every remote access of this process uses: set once from the
/// run config, process-wide like the connection pools they configure.
fn options_slot() -> &'static RwLock<StorageOptions> {
    static SLOT: OnceLock<RwLock<StorageOptions>> = OnceLock::new();
    SLOT.get_or_init(|| RwLock::new(StorageOptions::default()))
}

/// Use `options` for every later remote access (clients already made for a
/// bucket are rebuilt when the options change).
pub fn configure(options: &StorageOptions) {
    let mut slot = options_slot().write().unwrap_or_else(|e| e.into_inner());
    if *slot != *options {
        *slot = options.clone();
        remote::forget_clients();
    }
}

/// The options in force.
pub fn options() -> StorageOptions {
    options_slot().read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A location, told apart.
pub enum Location {
    /// A file or directory on this machine.
    Local(PathBuf),
    /// An object (or a prefix of objects) in a store.
    Remote(Remote),
}

/// The scheme of `text` if it is a URL (`scheme://...`), else `None`.
fn url_scheme(text: &str) -> Option<&str> {
    let (scheme, _) = text.split_once("://")?;
    let valid = scheme.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    valid.then_some(scheme)
}

/// Whether `path` names a URL rather than a local path (a URL is never
/// joined onto a config's directory).
pub fn is_url(path: impl AsRef<Path>) -> bool {
    path.as_ref().to_str().and_then(url_scheme).is_some()
}

/// Whether `path` lives in an object store (`file://` URLs do not).
pub fn is_remote(path: impl AsRef<Path>) -> bool {
    path.as_ref()
        .to_str()
        .and_then(url_scheme)
        .is_some_and(|s| !s.eq_ignore_ascii_case("file"))
}

/// Tell `path` apart: a local path (a `file://` URL included) or an object
/// in a store. An unknown scheme or a malformed URL is an error naming it.
pub fn locate(path: &Path) -> io::Result<Location> {
    let Some(text) = path.to_str() else {
        return Ok(Location::Local(path.to_path_buf()));
    };
    let Some(scheme) = url_scheme(text) else {
        return Ok(Location::Local(path.to_path_buf()));
    };
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, format!("{text}: {why}"));
    let url = url::Url::parse(text).map_err(|e| bad(format!("not a valid URL: {e}")))?;
    if scheme.eq_ignore_ascii_case("file") {
        let local = url
            .to_file_path()
            .map_err(|()| bad("a file:// URL needs an absolute path and no host".into()))?;
        return Ok(Location::Local(local));
    }
    Remote::parse(&url).map(Location::Remote).map_err(bad)
}

// Errors from these functions do not repeat the location: every caller names it.

/// Open `path` for reading from its start. Local files are buffered; a
/// remote object streams through a bounded read-ahead, retried and resumed
/// per [`StorageOptions`]. A missing object is reported by the first read,
/// as `NotFound`.
pub fn open_read(path: &Path) -> io::Result<Box<dyn Read + Send>> {
    match locate(path)? {
        Location::Local(local) => {
            let file = std::fs::File::open(&local)?;
            Ok(Box::new(BufReader::with_capacity(1 << 16, file)))
        }
        Location::Remote(remote) => Ok(Box::new(stream::RemoteStream::open(remote, &options()))),
    }
}

/// All bytes of `path`.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    match locate(path)? {
        Location::Local(local) => std::fs::read(&local),
        Location::Remote(remote) => remote.get_all(&options()),
    }
}

/// Write `bytes` to `path` so that no reader ever sees part of them: a
/// temporary file renamed over the target on disk, one PUT (atomic by the
/// store's contract) remotely.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    match locate(path)? {
        Location::Local(local) => {
            // A name of its own (not only the PID: processes of a cluster writing one
            // shared NFS directory often have the same PID in their containers);
            // `fs::write` keeps the usual file mode, where a tempfile's is 0600.
            let temp = PathBuf::from(format!(
                "{}.tmp-{}-{:016x}",
                local.display(),
                std::process::id(),
                rand::random::<u64>()
            ));
            if let Err(e) = std::fs::write(&temp, bytes) {
                let _ = std::fs::remove_file(&temp);
                return Err(e);
            }
            std::fs::rename(&temp, &local)
        }
        Location::Remote(remote) => remote.put(bytes.to_vec(), &options()),
    }
}

/// Whether `path` exists (a HEAD request for an object).
pub fn exists(path: &Path) -> io::Result<bool> {
    match locate(path)? {
        Location::Local(local) => Ok(local.exists()),
        Location::Remote(remote) => remote.exists(&options()),
    }
}

/// The names of the entries directly under the directory (or prefix) `dir`, sorted.
pub fn list(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = match locate(dir)? {
        Location::Local(local) => std::fs::read_dir(&local)?
            .filter_map(|entry| entry.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect(),
        Location::Remote(remote) => remote.list(&options())?,
    };
    names.sort();
    Ok(names)
}

/// For each of `paths`, a text that changes whenever the file or object does
/// (`Ok(None)` when it does not exist): size, modification time and inode of
/// a local file; size and ETag (or modification time) of an object. Objects
/// are looked up by listing each distinct prefix once, so a bucket of
/// 100,000 shards costs about 100 requests, not 100,000; where listing is not
/// allowed (or over plain HTTP), by a HEAD request each. An error stays with
/// its path: the caller reads that shard as if it had no version.
pub fn versions(paths: &[PathBuf]) -> Vec<io::Result<Option<String>>> {
    let mut listed: HashMap<String, Result<HashMap<String, String>, String>> = HashMap::new();
    paths
        .iter()
        .map(|path| {
            let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
            match locate(path).map_err(named)? {
                Location::Local(local) => match std::fs::metadata(&local) {
                    Ok(meta) => Ok(Some(local_version(&meta))),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(named(e)),
                },
                Location::Remote(remote) => {
                    let head = || remote.version(&options()).map_err(named);
                    // Plain HTTP servers cannot list (object_store lists over WebDAV).
                    let Some((parent, name)) = remote.url.rsplit_once('/').filter(|_| !remote.url.starts_with("http"))
                    else {
                        return head();
                    };
                    let versions = listed.entry(parent.to_string()).or_insert_with(|| {
                        let dir = match locate(Path::new(&format!("{parent}/"))).map_err(|e| e.to_string())? {
                            Location::Remote(dir) => dir,
                            Location::Local(_) => return Err(format!("{parent}/ is not in an object store")),
                        };
                        match dir.list_versions(&options()) {
                            Ok(versions) => Ok(versions),
                            // A bucket policy may allow GET and not LIST: ask object by object.
                            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                                tracing::warn!("listing {parent}/: {e}; asking for each shard's version instead");
                                Ok(HashMap::new())
                            }
                            Err(e) => Err(format!("listing {parent}/: {e}")),
                        }
                    });
                    match versions {
                        Ok(versions) => match versions.get(name) {
                            Some(version) => Ok(Some(version.clone())),
                            None => head(),
                        },
                        Err(e) => Err(io::Error::other(e.clone())),
                    }
                }
            }
        })
        .collect()
}

#[cfg(unix)]
fn local_version(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "size {} modified {}.{:09} changed {}.{:09} inode {}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
        meta.ino()
    )
}

#[cfg(not(unix))]
fn local_version(meta: &std::fs::Metadata) -> String {
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("size {} modified {modified}", meta.len())
}

/// Make the directory `dir` (a no-op on object stores, which have prefixes).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    match locate(dir)? {
        Location::Local(local) => std::fs::create_dir_all(&local),
        Location::Remote(_) => Ok(()),
    }
}

/// Rename `from` to `to`; `Ok(false)` when `from` is gone. Remotely a copy
/// then a delete: a reader may see both for a moment, never neither.
pub fn rename(from: &Path, to: &Path) -> io::Result<bool> {
    match (locate(from)?, locate(to)?) {
        (Location::Local(a), Location::Local(b)) => match std::fs::rename(&a, &b) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        },
        (Location::Remote(a), Location::Remote(b)) => a.rename_to(&b, &options()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "cannot rename {} to {}: not in the same store",
                from.display(),
                to.display()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths_are_told_apart() {
        for url in [
            "s3://b/k.tar",
            "gs://b/k",
            "az://c/k",
            "azure://c/k",
            "http://h:8/p",
            "https://h/p",
        ] {
            assert!(is_url(url) && is_remote(url), "{url}");
        }
        assert!(is_url("file:///tmp/x.tar") && !is_remote("file:///tmp/x.tar"));
        for path in ["data/x.tar", "/abs/x.tar", "./a:b/x.tar", "", "3s://x"] {
            assert!(!is_url(path), "{path}");
        }
        match locate(Path::new("file:///tmp/a%20b.tar")).unwrap() {
            Location::Local(p) => assert_eq!(p, Path::new("/tmp/a b.tar")),
            Location::Remote(_) => panic!("file:// is local"),
        }
        let err = locate(Path::new("ftp://h/x.tar")).err().expect("ftp is not supported");
        assert!(err.to_string().contains("ftp://h/x.tar"), "{err}");
        let err = locate(Path::new("file://host/x.tar")).err().expect("a host in file://");
        assert!(err.to_string().contains("file://host/x.tar"), "{err}");
    }

    #[test]
    fn a_url_keeps_its_file_name_as_a_path() {
        let p = Path::new("s3://bucket/laion/000123.tar");
        assert_eq!(p.file_name().unwrap(), "000123.tar");
        assert_eq!(
            Path::new("s3://bucket/cache").join("hog-0123"),
            Path::new("s3://bucket/cache/hog-0123")
        );
    }

    #[test]
    fn local_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.bin");
        write_atomic(&file, b"hello").unwrap();
        assert_eq!(read(&file).unwrap(), b"hello");
        let mut text = String::new();
        open_read(&file).unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello");
        assert!(exists(&file).unwrap());
        assert!(rename(&file, &dir.path().join("b.bin")).unwrap());
        assert!(!rename(&file, &dir.path().join("c.bin")).unwrap());
        assert_eq!(list(dir.path()).unwrap(), vec!["b.bin".to_string()]);
        assert_eq!(read(&file).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn options_are_checked() {
        assert!(StorageOptions::default().validate().is_ok());
        let bad = StorageOptions {
            read_ahead_mib: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("read_ahead_mib"));
    }
}
