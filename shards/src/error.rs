//! Errors that say which shard, which key, and what went wrong.

use std::path::PathBuf;

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading or writing shards.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a file we name.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A bad sample or a bad shard, under `on_error: fail`.
    #[error("{}:{key}: {reason}", shard.display())]
    BadSample {
        /// The shard it was read from.
        shard: PathBuf,
        /// The sample key (`?` when the damage came before any key).
        key: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A shard pattern that does not expand.
    #[error("shard pattern {pattern:?}: {reason}")]
    Pattern {
        /// The pattern as written.
        pattern: String,
        /// Why it could not be expanded.
        reason: String,
    },
    /// Input to an importer that is not what it claims to be.
    #[error("{}: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// Wrap an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error on `path`.
    pub fn format(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Error {
        Error::Format {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
