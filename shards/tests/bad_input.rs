//! Every kind of bad input from issue 2: a clear error or a counted, logged
//! skip, never a panic or a hang. Each case runs under both policies.

mod common;

use std::path::Path;

use common::{as_refs, good_members, write_tar};
use shards::{OnError, Sample, ShardReader, ShardWriter, Skips, WriterOptions};

/// Read a shard under `policy`: (good keys, first error message).
fn read(path: &Path, policy: OnError, skips: &Skips) -> (Vec<String>, Option<String>) {
    let mut keys = Vec::new();
    let reader = match ShardReader::open(path, policy, skips) {
        Ok(r) => r,
        Err(e) => return (keys, Some(e.to_string())),
    };
    for item in reader {
        match item {
            Ok(sample) => keys.push(sample.key),
            Err(e) => return (keys, Some(e.to_string())),
        }
    }
    (keys, None)
}

fn keys(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn good_shard_reads_every_sample_with_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("good.tar");
    write_tar(&path, &as_refs(&good_members(3)));
    let skips = Skips::default();
    let samples: Vec<Sample> = ShardReader::open(&path, OnError::Fail, &skips)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        samples.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(),
        ["k0", "k1", "k2"]
    );
    assert_eq!(samples[2].files["png"], vec![3u8; 702]);
    assert_eq!(samples[2].class_index(), Some(2));
    assert_eq!(skips.total(), 0);
}

#[test]
fn truncated_tar_skips_the_sample_in_progress_or_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trunc.tar");
    write_tar(&path, &as_refs(&good_members(5)));
    let bytes = std::fs::read(&path).unwrap();
    // Each sample: KEY.png header + 700-odd bytes padded to 1024, KEY.cls header + 512.
    let per_sample = 512 + 1024 + 512 + 512;

    // Cut inside k2.cls's payload: k0 and k1 are whole, k2 is the sample in progress.
    std::fs::write(&path, &bytes[..2 * per_sample + 512 + 1024 + 512 + 1]).unwrap();
    let skips = Skips::default();
    assert_eq!(read(&path, OnError::Skip, &skips), (keys(&["k0", "k1"]), None));
    assert_eq!(skips.total(), 1);
    let record = &skips.records()[0];
    assert_eq!(record.key, "k2");
    assert!(record.reason.starts_with("damaged shard"), "{}", record.reason);
    assert!(record.shard.ends_with("trunc.tar"));
    let (got, err) = read(&path, OnError::Fail, &Skips::default());
    assert_eq!(got, keys(&["k0", "k1"]));
    let err = err.expect("fail policy must error");
    assert!(err.contains("trunc.tar:k2:"), "{err}");

    // Cut inside k2.png's payload: the damaged entry's name is unreadable, so
    // k1 (still being assembled: more of its members could have followed) is
    // counted as bad rather than passed on possibly incomplete.
    std::fs::write(&path, &bytes[..2 * per_sample + 512 + 300]).unwrap();
    let skips = Skips::default();
    assert_eq!(read(&path, OnError::Skip, &skips), (keys(&["k0"]), None));
    assert_eq!(skips.total(), 1);
    assert_eq!(skips.records()[0].key, "k1");
}

#[test]
fn zero_length_member_skips_its_sample() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zero.tar");
    write_tar(
        &path,
        &[
            ("a.png", b"x"),
            ("a.cls", b"1"),
            ("b.png", b""),
            ("b.cls", b"2"),
            ("c.png", b"y"),
        ],
    );
    let skips = Skips::default();
    assert_eq!(read(&path, OnError::Skip, &skips), (keys(&["a", "c"]), None));
    assert_eq!(skips.total(), 1);
    assert_eq!(skips.records()[0].key, "b");
    assert_eq!(skips.by_reason().get("zero-length member"), Some(&1));

    let (got, err) = read(&path, OnError::Fail, &Skips::default());
    assert_eq!(got, keys(&["a"]));
    assert!(err.unwrap().contains("zero.tar:b: zero-length member: b.png"));
}

#[test]
fn corrupt_zstd_frame_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c-%06d.tar.zst");
    let mut writer = ShardWriter::new(path.to_str().unwrap(), WriterOptions::default()).unwrap();
    for i in 0..50 {
        // Incompressible-ish payloads so the damage lands inside sample data.
        let data: Vec<u8> = (0..2000u32)
            .map(|j| (j.wrapping_mul(2654435761).wrapping_add(i) >> 13) as u8)
            .collect();
        writer
            .write(&Sample::new(format!("s{i:03}")).with("bin", data))
            .unwrap();
    }
    let shard = writer.close().unwrap().remove(0);
    let mut bytes = std::fs::read(&shard).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&shard, &bytes).unwrap();

    let skips = Skips::default();
    let (got, err) = read(&shard, OnError::Skip, &skips);
    assert!(err.is_none());
    assert!(got.len() < 50, "corruption went unnoticed");
    assert!(skips.total() >= 1);
    assert!(skips.records().iter().any(|r| r.reason.starts_with("damaged shard")));

    let (_, err) = read(&shard, OnError::Fail, &Skips::default());
    assert!(err.expect("fail policy must error").contains("c-000000.tar.zst:"));
}

#[test]
fn member_without_key_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nokey.tar");
    write_tar(
        &path,
        &[("a.png", b"x"), (".png", b"y"), ("README", b"z"), ("b.png", b"w")],
    );
    let skips = Skips::default();
    assert_eq!(read(&path, OnError::Skip, &skips), (keys(&["a", "b"]), None));
    assert_eq!(skips.total(), 2);
    assert_eq!(skips.by_reason().get("member without key"), Some(&2));

    // Under `fail` the keyless member stops the shard at once (before `a` is
    // known to be complete).
    let (got, err) = read(&path, OnError::Fail, &Skips::default());
    assert!(got.is_empty());
    assert!(err.unwrap().contains("nokey.tar:.png: member without key"));
}

#[test]
fn duplicate_keys_keep_the_first_and_count_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dup.tar");
    write_tar(
        &path,
        &[
            ("a.png", b"1"),
            ("a.cls", b"1"),
            ("b.png", b"2"),
            ("a.png", b"3"),
            ("c.png", b"4"),
            ("c.png", b"5"),
        ],
    );
    let skips = Skips::default();
    let samples: Vec<Sample> = ShardReader::open(&path, OnError::Skip, &skips)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(samples.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(samples[0].files["png"], b"1");
    assert_eq!(skips.total(), 2);
    let reasons = skips.by_reason();
    assert_eq!(reasons.get("duplicate key"), Some(&1));
    assert_eq!(reasons.get("duplicate member"), Some(&1));

    let (got, err) = read(&path, OnError::Fail, &Skips::default());
    assert_eq!(got, keys(&["a", "b"]));
    assert!(err.unwrap().contains("dup.tar:a: duplicate key"));
}

#[test]
fn missing_shard_is_a_counted_skip_or_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope-000001.tar");
    let skips = Skips::default();
    assert_eq!(read(&path, OnError::Skip, &skips), (vec![], None));
    assert_eq!((skips.total(), skips.shards()), (0, 1));
    assert!(skips.records()[0].shard.ends_with("nope-000001.tar"));

    let (_, err) = read(&path, OnError::Fail, &Skips::default());
    let err = err.unwrap();
    assert!(
        err.contains("nope-000001.tar") && err.contains("cannot open shard"),
        "{err}"
    );
}

#[test]
fn garbage_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.tar");
    let noise: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2246822519) >> 7) as u8).collect();
    std::fs::write(&path, noise).unwrap();
    let skips = Skips::default();
    let (got, err) = read(&path, OnError::Skip, &skips);
    assert!(got.is_empty() && err.is_none());
    assert_eq!(skips.total(), 1);
    // A huge size field in an otherwise valid header must not allocate it.
    let path = dir.path().join("huge.tar");
    let mut header = tar::Header::new_ustar();
    header.set_path("a.bin").unwrap();
    header.set_size(1 << 40);
    header.set_cksum();
    std::fs::write(&path, header.as_bytes()).unwrap();
    let (got, err) = read(&path, OnError::Skip, &Skips::default());
    assert!(got.is_empty() && err.is_none());
}
