//! One folder per class (`DIR/<class>/<image>`) to shards with `KEY.cls`.
//!
//! Classes are the sub-folders of `DIR` in sorted order; the class index is
//! the position in that order, and `classes.txt` (one name per line, line i
//! = class i) is written beside the shards. Image bytes are stored as they
//! are, under their lower-cased extension (`jpeg` becomes `jpg`).

use std::path::{Path, PathBuf};

use super::ImportSummary;
use crate::{Error, Result, Sample, ShardWriter, WriterOptions};

/// Extensions taken as images.
const IMAGE_EXTS: &[&str] = &["jpg", "jpeg", "png"];

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|entry| entry.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<_>>()?;
    entries.sort();
    Ok(entries)
}

/// A key from class and file stem: dots become `_` (a dot would end the key).
fn sample_key(class: &str, stem: &str) -> String {
    format!("{class}_{stem}").replace(['.', '/', '\\', ' '], "_")
}

/// Import `dir` into shards at `out_pattern`; returns what was written.
pub fn import_folder(dir: &Path, out_pattern: &str, writer_options: &WriterOptions) -> Result<ImportSummary> {
    let classes: Vec<PathBuf> = sorted_entries(dir)?.into_iter().filter(|p| p.is_dir()).collect();
    if classes.is_empty() {
        return Err(Error::format(
            dir,
            "no class folders inside (expected DIR/<class>/<image>)",
        ));
    }
    let mut summary = ImportSummary {
        per_class: vec![0; classes.len()],
        ..Default::default()
    };
    let mut writer = ShardWriter::new(out_pattern, writer_options.clone())?;
    let mut names = Vec::new();
    for (class_index, class_dir) in classes.iter().enumerate() {
        let class_name = class_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for path in sorted_entries(class_dir)? {
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            if !path.is_file() || !IMAGE_EXTS.contains(&ext.as_str()) {
                summary
                    .skipped
                    .push(format!("{}: not a jpg/jpeg/png file", path.display()));
                continue;
            }
            let data = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            if data.is_empty() {
                summary.skipped.push(format!("{}: empty file", path.display()));
                continue;
            }
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let ext = if ext == "jpeg" { "jpg".to_string() } else { ext };
            writer.write(
                &Sample::new(sample_key(&class_name, &stem))
                    .with(ext, data)
                    .with("cls", class_index.to_string()),
            )?;
            summary.per_class[class_index] += 1;
            summary.samples += 1;
        }
        names.push(class_name);
    }
    for skipped in &summary.skipped {
        tracing::warn!("{skipped} (skipped)");
    }
    summary.shards = writer.close()?;
    let out_dir = Path::new(out_pattern)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let classes_file = out_dir.join("classes.txt");
    std::fs::write(&classes_file, names.join("\n") + "\n").map_err(|e| Error::io(&classes_file, e))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_contain_a_dot() {
        assert_eq!(sample_key("cat", "img.001"), "cat_img_001");
        assert_eq!(sample_key("a b", "x"), "a_b_x");
    }
}
