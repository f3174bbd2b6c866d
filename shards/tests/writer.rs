//! The shard writer: limits, compression, atomic completion, round trips.

mod common;

use shards::{OnError, Sample, ShardReader, ShardWriter, Skips, WriterOptions};

fn samples(n: usize) -> Vec<Sample> {
    (0..n)
        .map(|i| {
            Sample::new(format!("key{i:04}"))
                .with("png", vec![(i % 251) as u8; 100 + i])
                .with("cls", format!("{}", i % 7))
        })
        .collect()
}

fn read_all(paths: &[std::path::PathBuf]) -> Vec<Sample> {
    let skips = Skips::default();
    let out = paths
        .iter()
        .flat_map(|p| ShardReader::open(p, OnError::Fail, &skips).unwrap())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(skips.total(), 0);
    out
}

#[test]
fn round_trip_plain_and_zstd_with_sample_limit() {
    for ext in ["tar", "tar.zst"] {
        let dir = tempfile::tempdir().unwrap();
        let pattern = dir.path().join(format!("s-%06d.{ext}"));
        let options = WriterOptions {
            max_samples: 4,
            ..Default::default()
        };
        let mut writer = ShardWriter::new(pattern.to_str().unwrap(), options).unwrap();
        let input = samples(10);
        for s in &input {
            writer.write(s).unwrap();
        }
        let paths = writer.close().unwrap();
        let names: Vec<String> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [0, 1, 2].map(|i| format!("s-{i:06}.{ext}")));
        assert_eq!(read_all(&paths), input);
        // Nothing temporary is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        if ext == "tar.zst" {
            assert_eq!(
                std::fs::read(&paths[0]).unwrap()[..4],
                [0x28, 0xb5, 0x2f, 0xfd],
                "not a zstd frame"
            );
        }
    }
}

#[test]
fn byte_limit_starts_new_shards() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("b-%d.tar");
    // Each sample has ~1.1 kB of payload; 2.5 kB per shard means a new shard after 3 samples.
    let options = WriterOptions {
        max_bytes: 2500,
        ..Default::default()
    };
    let mut writer = ShardWriter::new(pattern.to_str().unwrap(), options).unwrap();
    let input: Vec<Sample> = (0..7)
        .map(|i| Sample::new(format!("k{i}")).with("bin", vec![1u8; 1100]))
        .collect();
    for s in &input {
        writer.write(s).unwrap();
    }
    let paths = writer.close().unwrap();
    assert_eq!(paths.len(), 3);
    assert_eq!(read_all(&paths), input);
}

#[test]
fn same_samples_give_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for run in 0..2 {
        let pattern = dir.path().join(format!("r{run}-%06d.tar.zst"));
        let mut writer = ShardWriter::new(pattern.to_str().unwrap(), WriterOptions::default()).unwrap();
        for s in samples(5) {
            writer.write(&s).unwrap();
        }
        outputs.push(std::fs::read(&writer.close().unwrap()[0]).unwrap());
    }
    assert_eq!(outputs[0], outputs[1]);
}

#[test]
fn a_crash_mid_shard_leaves_no_shard_that_looks_whole() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("crash-%06d.tar");
    let mut writer = ShardWriter::new(pattern.to_str().unwrap(), WriterOptions::default()).unwrap();
    for s in samples(3) {
        writer.write(&s).unwrap();
    }
    // Simulate a crash: the process never reaches close() or Drop.
    std::mem::forget(writer);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.contains(&"crash-000000.tar".to_string()), "{names:?}");
    assert!(
        names.iter().all(|n| n.starts_with("crash-000000.tar.tmp-")),
        "{names:?}"
    );
    // The brace pattern a user would give does not match the temporary file.
    let expanded = shards::expand(&[dir
        .path()
        .join("crash-{000000..000000}.tar")
        .to_string_lossy()
        .into_owned()])
    .unwrap();
    assert!(!expanded[0].exists());
}

#[test]
fn a_dropped_writer_removes_its_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("drop-%06d.tar");
    let mut writer = ShardWriter::new(pattern.to_str().unwrap(), WriterOptions::default()).unwrap();
    writer.write(&samples(1)[0]).unwrap();
    drop(writer);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
