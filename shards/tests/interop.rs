//! Interop with Python's WebDataset: shards it wrote read here, and shards we
//! write read there.
//!
//! ../shared/data/photos-*.tar were written by Python (`webdataset` /
//! `tarfile`). The other direction runs `python3`: the standard `tarfile`
//! module always, and the `webdataset` package when it is installed (CI
//! installs it; see .ci/run).

mod common;

use std::process::Command;

use shards::{OnError, Sample, ShardReader, ShardWriter, Skips, WriterOptions};

#[test]
fn python_written_photo_shards_read_here() {
    let pattern = common::shared_dir().join("data/photos-{000000..000003}.tar");
    let paths = shards::expand(&[pattern.to_string_lossy().into_owned()]).unwrap();
    let report = shards::inspect::inspect(&paths).unwrap();
    assert_eq!(
        (report.shards, report.samples, report.bad_samples, report.bad_shards),
        (4, 1024, 0, 0)
    );
    assert_eq!(
        report.extensions.get("jpg").copied().unwrap_or(0) + report.extensions.get("jpeg").copied().unwrap_or(0),
        1024
    );
}

fn python_reads(script: &str, shard: &std::path::Path) -> Result<String, String> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(shard)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn shards_we_write_read_in_python() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = dir.path().join("py-%06d.tar");
    let mut writer = ShardWriter::new(pattern.to_str().unwrap(), WriterOptions::default()).unwrap();
    let input: Vec<Sample> = (0..5)
        .map(|i| {
            Sample::new(format!("k{i}"))
                .with("png", vec![i as u8; 10 + i])
                .with("cls", i.to_string())
        })
        .collect();
    for s in &input {
        writer.write(s).unwrap();
    }
    let shard = writer.close().unwrap().remove(0);
    // Independent reader: the standard library's tarfile, grouping by key itself.
    let tarfile = r#"
import sys, tarfile
groups = {}
for m in tarfile.open(sys.argv[1]):
    key, ext = m.name.split('.', 1)
    groups.setdefault(key, {})[ext] = tarfile.open(sys.argv[1]).extractfile(m.name).read()
for key in sorted(groups):
    print(key, groups[key]['cls'].decode(), len(groups[key]['png']))
"#;
    let got = python_reads(tarfile, &shard).expect("python3 tarfile must read our shard");
    let want: String = input
        .iter()
        .map(|s| format!("{} {} {}\n", s.key, s.class_index().unwrap(), s.files["png"].len()))
        .collect();
    assert_eq!(got, want);

    let has_webdataset = Command::new("python3")
        .args(["-c", "import webdataset"])
        .status()
        .is_ok_and(|s| s.success());
    if has_webdataset {
        let wds = r#"
import sys, webdataset as wds
for s in wds.WebDataset(sys.argv[1], shardshuffle=False):
    print(s['__key__'], s['cls'].decode(), len(s['png']))
"#;
        let got = python_reads(wds, &shard).expect("python webdataset must read our shard");
        assert_eq!(got, want);
    } else {
        eprintln!("python webdataset not installed: checked with tarfile only (pip install webdataset)");
    }
}

#[test]
fn python_tarfile_shard_with_extra_entries_reads_here() {
    // Python's tarfile writes directories and PAX headers that a sample reader must pass over.
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("made-by-python.tar");
    let script = r#"
import io, sys, tarfile
with tarfile.open(sys.argv[1], 'w', format=tarfile.PAX_FORMAT) as t:
    d = tarfile.TarInfo('sub'); d.type = tarfile.DIRTYPE; t.addfile(d)
    for i in range(3):
        for ext, data in (('jpg', bytes([i]) * (100 + i)), ('cls', str(i).encode())):
            info = tarfile.TarInfo(f'sub/sample_{i}.{ext}'); info.size = len(data)
            info.pax_headers = {'comment': 'x' * 200}
            t.addfile(info, io.BytesIO(data))
"#;
    python_reads(script, &shard).expect("python3 must write the shard");
    let skips = Skips::default();
    let samples: Vec<Sample> = ShardReader::open(&shard, OnError::Fail, &skips)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        samples.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(),
        ["sub/sample_0", "sub/sample_1", "sub/sample_2"]
    );
    assert_eq!(samples[2].files["jpg"], vec![2u8; 102]);
    assert_eq!(samples[1].class_index(), Some(1));
}
