//! The target cache's store (DESIGN.md, "Target cache"): per-view target
//! tensors of one extractor spec, computed once by `pipeline precompute` and
//! read by later runs.
//!
//! Layout, one directory per extractor spec under the cache root:
//!
//! ```text
//! ROOT/hog-1f0c2a9b8e7d6c5b/                   <extractor>-<first 16 hex of BLAKE3(spec.json)>
//!     spec.json                                what the name hashes ([`StoreSpec`])
//!     manifest.json                            summary (views, shards, bytes), rewritten by each precompute
//!     part-<run>-000000.tar.zst                a store shard: one sample per view, `KEY@V.f16` or `KEY@V.q8`
//!     part-<run>-000000.tar.zst.index.json     its index: the (key, view) pairs it holds and its BLAKE3
//! ```
//!
//! Crash and concurrency safety without locks: a shard is written under a
//! temporary name and renamed when complete ([`crate::ShardWriter`]); its index
//! file is written the same way *after* the rename, and only shards with an
//! index count. Each precompute run names its shards with its own run id, so
//! two runs on one store never write the same file; at worst they both
//! compute some view, and since a view's target depends only on its key the
//! two copies are equal (the reader takes the first shard by name). The index
//! on disk is the set of index files: loading it is listing them.
//!
//! The root may be an object-store URL (`s3://bucket/cache`): every file
//! access goes through [`crate::storage`], a shard is staged locally and put
//! whole, and a PUT is atomic as the rename is, so the same order (shard,
//! then its index) keeps the same guarantees. Quarantine there is a copy and
//! a delete.
//!
//! The sample count K is not part of the name: view v of a sample is drawn
//! from (view seed, key, v) whatever K is, so raising K only adds views to the
//! same store.

pub mod codec;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use webdataset::shard::TarEntries;

pub use codec::Dtype;

use crate::{storage, Error, Result, Sample, ShardWriter, WriterOptions};

/// Bumped when the store's files change meaning; part of every spec hash.
pub const FORMAT: u32 = 1;

/// One stored view: (sample key, view index).
pub type ViewKey = (String, u32);

/// The spec file's name in a store directory.
pub const SPEC_FILE: &str = "spec.json";
/// The summary file's name in a store directory.
pub const MANIFEST_FILE: &str = "manifest.json";
const INDEX_SUFFIX: &str = ".index.json";
const CORRUPT_SUFFIX: &str = ".corrupt";

/// Everything a stored target depends on besides the sample: the directory
/// name is a hash of this, so a config that differs in any of it finds no
/// store rather than a wrong one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSpec {
    /// [`FORMAT`].
    pub format: u32,
    /// `hog`, `pixel`, `canny`, `clip`.
    pub extractor: String,
    /// The extractor's parameters (weights path left out: the file's hash is below).
    pub params: serde_json::Value,
    /// BLAKE3 of the weights file, for extractors that have one.
    pub weights_blake3: Option<String>,
    /// The seed views are drawn from: view v of key s from (view seed, s, v).
    pub view_seed: u64,
    /// How views are drawn (crop scale and ratio ranges, flip probability).
    pub view: serde_json::Value,
    /// View side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch: usize,
    /// Tokens (patches) per view.
    pub tokens: usize,
    /// Values per token.
    pub dims: usize,
    /// The extractor's input normalization (per-channel mean and std of [0, 1] pixels).
    pub mean: [f32; 3],
    /// See `mean`.
    pub std: [f32; 3],
    /// How values are stored.
    pub dtype: Dtype,
}

impl StoreSpec {
    /// BLAKE3 of the spec's JSON, hex.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).expect("a spec serializes");
        blake3::hash(&json).to_hex().to_string()
    }

    /// The store directory's name: `<extractor>-<16 hex digits>`.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.extractor, &self.hash()[..16])
    }
}

/// The index file of one store shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardIndex {
    /// The shard's file name inside the store directory.
    pub shard: String,
    /// BLAKE3 of the whole shard file, hex.
    pub blake3: String,
    /// The shard file's size.
    pub bytes: u64,
    /// The views it holds, sorted.
    pub views: Vec<ViewKey>,
}

/// A store shard found bad when its index was loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct CorruptShard {
    /// The shard's file name.
    pub shard: String,
    /// What is wrong.
    pub reason: String,
}

/// The store's index as found on disk.
#[derive(Debug, Clone, Default)]
pub struct StoreIndex {
    /// Good shards, by file name.
    pub shards: Vec<ShardIndex>,
    /// Shards whose index or checksum is bad.
    pub corrupt: Vec<CorruptShard>,
    /// Shard files without an index (a run killed between the two renames, or
    /// one still writing): ignored.
    pub orphans: Vec<String>,
}

impl StoreIndex {
    /// Every stored view (a view stored twice appears twice).
    pub fn views(&self) -> impl Iterator<Item = &ViewKey> {
        self.shards.iter().flat_map(|s| s.views.iter())
    }

    /// Bytes of the good shards.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }
}

/// What `manifest.json` says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The directory name.
    pub name: String,
    /// The spec.
    pub spec: StoreSpec,
    /// Distinct views stored.
    pub views: u64,
    /// Distinct samples with at least one view.
    pub samples: u64,
    /// Views per sample: the highest stored view index + 1.
    pub max_views: u32,
    /// Good shards.
    pub shards: u64,
    /// Bytes of the good shards.
    pub bytes: u64,
}

/// A store shard read back against its index.
enum Verified {
    Good(Vec<u8>),
    /// Its size or BLAKE3 differs from the index: why.
    Mismatch(String),
    /// No longer there (quarantined by another run since the listing).
    Gone,
}

/// One extractor spec's store directory.
#[derive(Debug, Clone)]
pub struct Store {
    /// The directory.
    pub dir: PathBuf,
    /// Its spec.
    pub spec: StoreSpec,
}

/// On disk a temporary file renamed over the target; on object storage one PUT.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    storage::write_atomic(path, bytes).map_err(|e| Error::io(path, e))
}

impl Store {
    /// The store for `spec` under `root`, if one exists.
    pub fn find(root: &Path, spec: &StoreSpec) -> Result<Option<Store>> {
        let dir = root.join(spec.dir_name());
        let spec_file = dir.join(SPEC_FILE);
        if !storage::exists(&spec_file).map_err(|e| Error::io(&spec_file, e))? {
            return Ok(None);
        }
        let store = Store::open_dir(&dir)?;
        if &store.spec != spec {
            return Err(Error::format(
                dir.join(SPEC_FILE),
                "the spec differs from the one its directory name hashes: the store was edited by hand",
            ));
        }
        Ok(Some(store))
    }

    /// The store for `spec` under `root`, created if missing.
    pub fn create(root: &Path, spec: &StoreSpec) -> Result<Store> {
        if let Some(store) = Store::find(root, spec)? {
            return Ok(store);
        }
        let dir = root.join(spec.dir_name());
        storage::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let json = serde_json::to_vec_pretty(spec).expect("a spec serializes");
        // Two runs creating it at once write the same bytes; the rename is atomic.
        write_atomic(&dir.join(SPEC_FILE), &json)?;
        Ok(Store {
            dir,
            spec: spec.clone(),
        })
    }

    /// A store directory by path (its `spec.json` says what it holds).
    pub fn open_dir(dir: &Path) -> Result<Store> {
        let path = dir.join(SPEC_FILE);
        let text = storage::read(&path).map_err(|e| Error::io(&path, e))?;
        let spec: StoreSpec = serde_json::from_slice(&text).map_err(|e| Error::format(&path, e))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            spec,
        })
    }

    /// List the index files. With `verify`, every shard is read and its
    /// BLAKE3 compared with its index (what precompute does before trusting
    /// the store); without, only the index files are read.
    pub fn load_index(&self, verify: bool) -> Result<StoreIndex> {
        let names = storage::list(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let mut index = StoreIndex::default();
        let indexed: std::collections::HashSet<&str> =
            names.iter().filter_map(|n| n.strip_suffix(INDEX_SUFFIX)).collect();
        for name in &names {
            if name.starts_with("part-") && name.ends_with(".tar.zst") && !indexed.contains(name.as_str()) {
                index.orphans.push(name.clone());
            }
            let Some(shard) = name.strip_suffix(INDEX_SUFFIX) else {
                continue;
            };
            let path = self.dir.join(name);
            let corrupt = |reason: String| CorruptShard {
                shard: shard.to_string(),
                reason,
            };
            let text = match storage::read(&path) {
                Ok(t) => t,
                // Quarantined by a concurrent run between the listing and now.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&path, e)),
            };
            let entry: ShardIndex = match serde_json::from_slice(&text) {
                Ok(e) => e,
                Err(e) => {
                    index.corrupt.push(corrupt(format!("unreadable index {name}: {e}")));
                    continue;
                }
            };
            if entry.shard != shard {
                index
                    .corrupt
                    .push(corrupt(format!("index {name} names shard {}", entry.shard)));
                continue;
            }
            if verify {
                match self.read_verified(&entry)? {
                    Verified::Good(_) => {}
                    Verified::Mismatch(reason) => {
                        index.corrupt.push(corrupt(reason));
                        continue;
                    }
                    // Quarantined by a concurrent run between the listing and now.
                    Verified::Gone => continue,
                }
            }
            index.shards.push(entry);
        }
        Ok(index)
    }

    /// Read a shard's file and check it against its index. A failed read is an
    /// error, not a bad shard: a storage that refuses or times out must not get
    /// a good shard quarantined.
    fn read_verified(&self, entry: &ShardIndex) -> Result<Verified> {
        let path = self.dir.join(&entry.shard);
        let bytes = match storage::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Verified::Gone),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let hash = blake3::hash(&bytes).to_hex().to_string();
        if bytes.len() as u64 != entry.bytes || hash != entry.blake3 {
            return Ok(Verified::Mismatch(format!(
                "{}: checksum mismatch ({} bytes, BLAKE3 {}; its index says {} bytes, {})",
                path.display(),
                bytes.len(),
                &hash[..16],
                entry.bytes,
                entry.blake3.chars().take(16).collect::<String>()
            )));
        }
        Ok(Verified::Good(bytes))
    }

    /// Read every view of one shard, checksum first. Errors name the shard.
    pub fn read_shard(&self, entry: &ShardIndex) -> Result<Vec<(ViewKey, Vec<u8>)>> {
        let path = self.dir.join(&entry.shard);
        let bytes = match self.read_verified(entry)? {
            Verified::Good(bytes) => bytes,
            Verified::Mismatch(reason) => return Err(Error::format(&path, reason)),
            Verified::Gone => {
                let gone = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or object");
                return Err(Error::io(&path, gone));
            }
        };
        let stream: Box<dyn Read + Send> =
            Box::new(zstd::Decoder::new(Cursor::new(bytes)).map_err(|e| Error::io(&path, e))?);
        let ext = self.spec.dtype.extension();
        let want = self.spec.dtype.encoded_len(self.spec.tokens, self.spec.dims);
        let mut views = Vec::with_capacity(entry.views.len());
        for member in TarEntries::new(stream) {
            let member = member.map_err(|e| Error::format(&path, e))?;
            let (name, v) = member
                .name
                .strip_suffix(&format!(".{ext}"))
                .and_then(|stem| stem.rsplit_once('@'))
                .and_then(|(key, v)| Some((key, v.parse::<u32>().ok()?)))
                .ok_or_else(|| Error::format(&path, format!("member {} is not KEY@VIEW.{ext}", member.name)))?;
            if member.data.len() != want {
                return Err(Error::format(
                    &path,
                    format!("{}: {} bytes, a view takes {want}", member.name, member.data.len()),
                ));
            }
            views.push(((name.to_string(), v), member.data));
        }
        Ok(views)
    }

    /// Move a bad shard and its index aside (`*.corrupt`) so no reader uses it
    /// and its views count as missing. A file already gone (another run moved
    /// it) is fine. The index goes first: it is what makes a shard count, so no
    /// moment (nor a crash between the two) leaves an index naming a moved shard.
    pub fn quarantine(&self, shard: &str) -> Result<()> {
        for name in [format!("{shard}{INDEX_SUFFIX}"), shard.to_string()] {
            let from = self.dir.join(&name);
            let to = self.dir.join(format!("{name}{CORRUPT_SUFFIX}"));
            storage::rename(&from, &to).map_err(|e| Error::io(&from, e))?;
        }
        Ok(())
    }

    /// Rewrite `manifest.json` from an index (informational: the index files are the truth).
    pub fn write_manifest(&self, index: &StoreIndex) -> Result<Manifest> {
        let mut views: Vec<&ViewKey> = index.views().collect();
        views.sort();
        views.dedup();
        let mut samples: Vec<&str> = views.iter().map(|(k, _)| k.as_str()).collect();
        samples.dedup();
        let manifest = Manifest {
            name: self.spec.dir_name(),
            spec: self.spec.clone(),
            views: views.len() as u64,
            samples: samples.len() as u64,
            max_views: views.iter().map(|(_, v)| v + 1).max().unwrap_or(0),
            shards: index.shards.len() as u64,
            bytes: index.bytes(),
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        write_atomic(&self.dir.join(MANIFEST_FILE), &json)?;
        Ok(manifest)
    }

    /// A writer for views computed by one run (one writer per worker: `run_id`
    /// must be unique among everything writing to this store at once).
    pub fn writer(&self, run_id: &str, shard_views: usize) -> Result<StoreWriter> {
        // A store on object storage: each shard is written to a local staging
        // directory, then uploaded whole (see `StoreWriter::flush`).
        let staging = if storage::is_remote(&self.dir) {
            let dir = tempfile::Builder::new()
                .prefix(&format!("crossmae-store-{run_id}-"))
                .tempdir()
                .map_err(|e| Error::io(std::env::temp_dir(), e))?;
            Some(dir)
        } else {
            None
        };
        let shard_dir = staging.as_ref().map_or(self.dir.as_path(), |d| d.path());
        let pattern = shard_dir.join(format!("part-{run_id}-%06d.tar.zst"));
        let writer = ShardWriter::new(
            &pattern.to_string_lossy(),
            WriterOptions {
                max_samples: usize::MAX,
                max_bytes: u64::MAX,
                zstd_level: 3,
            },
        )?;
        Ok(StoreWriter {
            store: self.clone(),
            writer,
            buffer: BTreeMap::new(),
            shard_views: shard_views.max(1),
            written: Vec::new(),
            staging,
        })
    }

    /// A reader over `index` keeping up to `cached_shards` decoded shards in memory.
    pub fn reader(&self, index: &StoreIndex, cached_shards: usize) -> StoreReader {
        let mut lookup = HashMap::new();
        for (i, shard) in index.shards.iter().enumerate() {
            for view in &shard.views {
                // Shards are sorted by name: the first copy of a view wins.
                lookup.entry(view.clone()).or_insert(i as u32);
            }
        }
        StoreReader {
            store: self.clone(),
            shards: index.shards.clone(),
            lookup,
            cache: Mutex::new(ShardCache {
                capacity: cached_shards.max(1),
                order: VecDeque::new(),
                loaded: HashMap::new(),
            }),
        }
    }
}

/// Buffers encoded views and writes them as store shards, each with its index.
pub struct StoreWriter {
    store: Store,
    writer: ShardWriter,
    buffer: BTreeMap<ViewKey, Vec<u8>>,
    shard_views: usize,
    written: Vec<ShardIndex>,
    /// Where shards are written before upload, for a store on object storage.
    staging: Option<tempfile::TempDir>,
}

impl StoreWriter {
    /// Add one encoded view (see [`codec::encode`]); writes a shard when the buffer is full.
    pub fn push(&mut self, key: String, view: u32, encoded: Vec<u8>) -> Result<Option<&ShardIndex>> {
        self.buffer.insert((key, view), encoded);
        if self.buffer.len() >= self.shard_views {
            return self.flush();
        }
        Ok(None)
    }

    /// Write the buffered views as one shard (sorted by key and view), then its index.
    pub fn flush(&mut self) -> Result<Option<&ShardIndex>> {
        if self.buffer.is_empty() {
            return Ok(None);
        }
        let ext = self.store.spec.dtype.extension();
        let buffer = std::mem::take(&mut self.buffer);
        let mut views = Vec::with_capacity(buffer.len());
        for ((key, v), bytes) in buffer {
            self.writer.write(&Sample::new(format!("{key}@{v}")).with(ext, bytes))?;
            views.push((key, v));
        }
        let path = self
            .writer
            .finish_shard()?
            .ok_or_else(|| Error::format(&self.store.dir, "the store writer had no open shard"))?;
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let shard = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if self.staging.is_some() {
            // The shard object is put whole before its index (below), so a
            // killed run leaves at most an orphan shard, never an index
            // pointing at a partial object (a PUT is atomic).
            let target = self.store.dir.join(&shard);
            write_atomic(&target, &bytes)?;
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
        let entry = ShardIndex {
            blake3: blake3::hash(&bytes).to_hex().to_string(),
            bytes: bytes.len() as u64,
            shard: shard.clone(),
            views,
        };
        let json = serde_json::to_vec(&entry).expect("an index serializes");
        write_atomic(&self.store.dir.join(format!("{shard}{INDEX_SUFFIX}")), &json)?;
        self.written.push(entry);
        Ok(self.written.last())
    }

    /// Flush and return every shard this writer wrote.
    pub fn finish(mut self) -> Result<Vec<ShardIndex>> {
        self.flush()?;
        Ok(std::mem::take(&mut self.written))
    }
}

struct ShardCache {
    capacity: usize,
    order: VecDeque<u32>,
    loaded: HashMap<u32, Arc<HashMap<ViewKey, Vec<u8>>>>,
}

/// Random access to stored views: which shard holds a view comes from the
/// index; shards are read whole (checksum checked) and the last few kept.
/// A run's lanes read data shards in order, and precompute writes the views
/// of neighbouring samples together, so a handful of shards serve a lane.
pub struct StoreReader {
    store: Store,
    shards: Vec<ShardIndex>,
    lookup: HashMap<ViewKey, u32>,
    cache: Mutex<ShardCache>,
}

impl StoreReader {
    /// The store read.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether the view is stored.
    pub fn contains(&self, key: &str, view: u32) -> bool {
        self.lookup.contains_key(&(key.to_string(), view))
    }

    fn shard(&self, i: u32) -> Result<Arc<HashMap<ViewKey, Vec<u8>>>> {
        if let Some(s) = self.cache.lock().unwrap_or_else(PoisonError::into_inner).loaded.get(&i) {
            return Ok(s.clone());
        }
        // Read outside the lock so workers needing other shards do not wait.
        let views: HashMap<ViewKey, Vec<u8>> = self.store.read_shard(&self.shards[i as usize])?.into_iter().collect();
        let views = Arc::new(views);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.loaded.insert(i, views.clone()).is_none() {
            cache.order.push_back(i);
        }
        while cache.order.len() > cache.capacity {
            if let Some(old) = cache.order.pop_front() {
                cache.loaded.remove(&old);
            }
        }
        Ok(views)
    }

    /// The target of view `view` of `key`, decoded into f32 (`tokens x dims`).
    pub fn get(&self, key: &str, view: u32) -> Result<Vec<f32>> {
        let spec = &self.store.spec;
        let view_key = (key.to_string(), view);
        let &i = self.lookup.get(&view_key).ok_or_else(|| {
            Error::format(
                &self.store.dir,
                format!("{key}: view {view} is not in the store (run `pipeline precompute` on this config)"),
            )
        })?;
        let shard = self.shard(i)?;
        let path = || self.store.dir.join(&self.shards[i as usize].shard);
        let bytes = shard
            .get(&view_key)
            .ok_or_else(|| Error::format(path(), format!("{key}@{view}: listed in the index, not in the shard")))?;
        let mut out = vec![0f32; spec.tokens * spec.dims];
        codec::decode_into(bytes, spec.dims, spec.dtype, &mut out)
            .map_err(|reason| Error::format(path(), format!("{key}@{view}: {reason}")))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dtype: Dtype) -> StoreSpec {
        StoreSpec {
            format: FORMAT,
            extractor: "hog".into(),
            params: serde_json::json!({}),
            weights_blake3: None,
            view_seed: 0,
            view: serde_json::json!({"scale": [0.2, 1.0]}),
            image_size: 8,
            patch: 4,
            tokens: 4,
            dims: 3,
            mean: [0.5; 3],
            std: [0.25; 3],
            dtype,
        }
    }

    /// A view's values from its key alone, so any two writes of it agree.
    fn values(key: &str, v: u32) -> Vec<f32> {
        let h = blake3::hash(format!("{key}@{v}").as_bytes());
        h.as_bytes()[..12].iter().map(|&b| b as f32 / 16.0 - 8.0).collect()
    }

    fn write(store: &Store, run: &str, views: &[(&str, u32)], per_shard: usize) -> Vec<ShardIndex> {
        let mut w = store.writer(run, per_shard).unwrap();
        for &(k, v) in views {
            w.push(k.into(), v, codec::encode(&values(k, v), 3, store.spec.dtype))
                .unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn spec_name_changes_with_every_field_that_matters() {
        let a = spec(Dtype::F16);
        let mut b = a.clone();
        b.view_seed = 1;
        let mut c = a.clone();
        c.dtype = Dtype::Int8;
        let mut d = a.clone();
        d.weights_blake3 = Some("ab".into());
        let names: std::collections::HashSet<String> = [&a, &b, &c, &d].iter().map(|s| s.dir_name()).collect();
        assert_eq!(names.len(), 4);
        assert!(a.dir_name().starts_with("hog-"));
        assert_eq!(a.dir_name(), spec(Dtype::F16).dir_name());
    }

    #[test]
    fn written_views_read_back_from_any_shard_and_index_lists_them() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::create(root.path(), &spec(Dtype::F16)).unwrap();
        let views = [("a", 0), ("a", 1), ("b", 0), ("c", 2), ("b", 1)];
        let written = write(&store, "r1", &views, 2);
        assert_eq!(written.len(), 3);
        assert_eq!(written[0].views, vec![("a".to_string(), 0), ("a".to_string(), 1)]);
        let index = store.load_index(true).unwrap();
        assert!(index.corrupt.is_empty() && index.orphans.is_empty());
        assert_eq!(index.views().count(), 5);
        let reader = store.reader(&index, 1);
        for (k, v) in views {
            let got = reader.get(k, v).unwrap();
            for (x, y) in values(k, v).iter().zip(&got) {
                assert!((x - y).abs() <= x.abs() * 1e-3, "{k}@{v}: {x} vs {y}");
            }
        }
        assert!(!reader.contains("a", 2));
        let msg = reader.get("a", 2).unwrap_err().to_string();
        assert!(msg.contains("a: view 2 is not in the store"), "{msg}");
        let manifest = store.write_manifest(&index).unwrap();
        assert_eq!((manifest.views, manifest.samples, manifest.max_views), (5, 3, 3));
        // Found again by its spec.
        assert!(Store::find(root.path(), &spec(Dtype::F16)).unwrap().is_some());
        assert!(Store::find(root.path(), &spec(Dtype::Int8)).unwrap().is_none());
    }

    #[test]
    fn corrupt_shard_is_found_by_checksum_and_quarantined() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::create(root.path(), &spec(Dtype::Int8)).unwrap();
        let written = write(&store, "r1", &[("a", 0), ("b", 0), ("c", 0), ("d", 0)], 2);
        let victim = store.dir.join(&written[1].shard);
        let mut bytes = std::fs::read(&victim).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        std::fs::write(&victim, bytes).unwrap();
        // Without verification the index still lists it; the reader catches it on load.
        let index = store.load_index(false).unwrap();
        let reader = store.reader(&index, 4);
        assert!(reader.get("a", 0).is_ok());
        let msg = reader.get("c", 0).unwrap_err().to_string();
        assert!(
            msg.contains(&written[1].shard) && msg.contains("checksum mismatch"),
            "{msg}"
        );
        let index = store.load_index(true).unwrap();
        assert_eq!(index.corrupt.len(), 1);
        assert_eq!(index.corrupt[0].shard, written[1].shard);
        assert_eq!(index.views().count(), 2);
        store.quarantine(&written[1].shard).unwrap();
        let index = store.load_index(true).unwrap();
        assert!(index.corrupt.is_empty());
        assert_eq!(index.shards.len(), 1);
    }

    #[test]
    fn two_writers_at_once_leave_a_consistent_store() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::create(root.path(), &spec(Dtype::F16)).unwrap();
        let all: Vec<(String, u32)> = (0..40).map(|i| (format!("k{i:03}"), (i % 3) as u32)).collect();
        std::thread::scope(|s| {
            for run in ["x", "y"] {
                let (store, all) = (&store, &all);
                s.spawn(move || {
                    let views: Vec<(&str, u32)> = all.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                    write(store, run, &views, 7)
                });
            }
        });
        let index = store.load_index(true).unwrap();
        assert!(index.corrupt.is_empty() && index.orphans.is_empty());
        assert_eq!(index.views().count(), 80);
        let reader = store.reader(&index, 2);
        for (k, v) in &all {
            assert_eq!(reader.get(k, *v).unwrap().len(), 12);
        }
    }

    #[test]
    fn shard_without_index_is_an_orphan_and_ignored() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::create(root.path(), &spec(Dtype::F16)).unwrap();
        let written = write(&store, "r1", &[("a", 0)], 8);
        std::fs::remove_file(store.dir.join(format!("{}{INDEX_SUFFIX}", written[0].shard))).unwrap();
        let index = store.load_index(true).unwrap();
        assert_eq!(index.orphans, vec![written[0].shard.clone()]);
        assert_eq!(index.views().count(), 0);
    }
}
