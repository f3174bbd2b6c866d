//! WebDataset shards for crossmae-pipeline.
//!
//! Reading plain `.tar` and zstd `.tar.zst` shards (on the `webdataset` crate's
//! streaming tar parser and brace expansion), grouping members into samples by
//! key, the epoch plan that deals shards into lanes, a crash-safe shard
//! writer, importers (MNIST IDX, one folder per class) and inspection.
//! This crate knows nothing of models or of timely.
//!
//! ```no_run
//! use shards::{expand, OnError, ShardReader, Skips};
//! let skips = Skips::default();
//! for path in expand(&["data/train-{000000..000003}.tar.zst".to_string()])? {
//!     for sample in ShardReader::open(&path, OnError::Skip, &skips)? {
//!         let sample = sample?;
//!         println!("{} {:?}", sample.key, sample.files.keys().collect::<Vec<_>>());
//!     }
//! }
//! println!("skipped {}", skips.total());
//! # Ok::<(), shards::Error>(())
//! ```

pub mod error;
pub mod import;
pub mod inspect;
pub mod key_cache;
pub mod lanes;
pub mod pattern;
pub mod reader;
pub mod rng;
pub mod sample;
pub mod skips;
pub mod storage;
pub mod store;
pub mod writer;

pub use error::{Error, Result};
pub use lanes::{plan_epoch, EpochPlan, LaneReader, LaneRecord};
pub use pattern::expand;
pub use reader::ShardReader;
pub use sample::Sample;
pub use skips::{OnError, SkipRecord, Skips};
pub use writer::{ShardWriter, WriterOptions};
