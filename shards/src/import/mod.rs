//! Importers: datasets in other layouts written as WebDataset shards.

pub mod folder;
pub mod idx;

use std::path::PathBuf;

use serde::Serialize;

/// What an importer wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportSummary {
    /// Samples written.
    pub samples: usize,
    /// Shards written, in order.
    pub shards: Vec<PathBuf>,
    /// Samples per class index.
    pub per_class: Vec<usize>,
    /// Inputs left out (unreadable or unsupported files), with why.
    pub skipped: Vec<String>,
}
