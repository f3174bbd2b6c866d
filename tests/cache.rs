//! End-to-end tests of the target cache (issue 6): `pipeline precompute`,
//! a run reading the store, a precompute killed midway, corrupt and
//! concurrent stores, `pipeline bench cache`.
//!
//! Data: the first one or two embedded Fashion-MNIST shards (1250 samples
//! each), HOG targets, a one-block model, no probe at the end of a run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod util;
use util::{pipeline, TINY_MODEL};

use shards::store::{codec, Store};

const CONFIG: &str = "configs/targets-hog.yaml";

fn ok(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "failed:\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `--set` overrides: `shards` embedded train shards (one lane each), the cache under `cache`, K views.
fn data_sets(shards: usize, cache: &Path, k: u32) -> Vec<String> {
    let list = (0..shards)
        .map(|i| format!("'../shards/data/fashion-mnist/train-{i:06}.tar.zst'"))
        .collect::<Vec<_>>()
        .join(", ");
    [
        format!("data.train=[{list}]"),
        format!("data.lanes={shards}"),
        format!("stages.targets.cache={}", cache.display()),
        format!("stages.targets.views={k}"),
        "eval.after_run=false".to_string(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

fn precompute(sets: &[String], extra: &[&str]) -> Command {
    let mut cmd = pipeline();
    cmd.args(["precompute", CONFIG, "--json"]).args(sets).args(extra);
    cmd
}

fn report(output: Output) -> serde_json::Value {
    let stdout = ok(output);
    // In a cluster, timely prints its connection progress on stdout before the report.
    let start = stdout.find("\n{").map_or(0, |i| i + 1);
    serde_json::from_str(&stdout[start..]).unwrap_or_else(|e| panic!("precompute --json: {e}:\n{stdout}"))
}

/// The only store directory under a cache root.
fn store_dir(cache: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.into_iter().next().unwrap()
}

/// Every stored view of a store, checksums verified: (key, view) -> encoded bytes.
fn contents(dir: &Path) -> BTreeMap<(String, u32), Vec<u8>> {
    let store = Store::open_dir(dir).unwrap();
    let index = store.load_index(true).unwrap();
    assert!(index.corrupt.is_empty(), "{:?}", index.corrupt);
    let mut out = BTreeMap::new();
    for shard in &index.shards {
        for (view, bytes) in store.read_shard(shard).unwrap() {
            if let Some(old) = out.insert(view.clone(), bytes.clone()) {
                assert_eq!(old, bytes, "{view:?} stored twice with different values");
            }
        }
    }
    out
}

fn metrics_targets_line(run_dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|v| v["kind"] == "targets")
        .expect("a targets line in metrics.jsonl")
}

#[test]
fn second_run_calls_no_extractor_and_cached_targets_are_those_of_their_view() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let sets = data_sets(1, &cache, 2);
    let first = report(precompute(&sets, &[]).output().unwrap());
    assert_eq!(
        (first["wanted"].as_u64(), first["computed"].as_u64()),
        (Some(2500), Some(2500))
    );

    // The stored target of view v is HOG computed afresh on view v, cut from (view seed, key, v).
    let stored = contents(&store_dir(&cache));
    assert_eq!(stored.len(), 2500);
    let cfg = stages::augment::Config {
        size: 28,
        mean: [0.286; 3],
        std: [0.353; 3],
        ..Default::default()
    };
    let shard = util::repo().join("shards/data/fashion-mnist/train-000000.tar.zst");
    let skips = shards::Skips::default();
    for sample in shards::ShardReader::open(&shard, shards::OnError::Fail, &skips)
        .unwrap()
        .take(20)
    {
        let sample = sample.unwrap();
        let decoded = stages::decode::apply(&Default::default(), &sample).unwrap();
        for v in 0..2 {
            let (view, _) = stages::views::apply(&cfg, &decoded, 0, &sample.key, v).unwrap();
            let fresh = stages::targets::hog::hog(&view, 4).unwrap();
            let mut cached = vec![0f32; fresh.len()];
            let bytes = &stored[&(sample.key.clone(), v)];
            codec::decode_into(bytes, 108, codec::Dtype::F16, &mut cached).unwrap();
            for (a, b) in fresh.iter().zip(&cached) {
                // f16: relative error at most 2^-11.
                assert!(
                    (a - b).abs() <= a.abs() * 4.9e-4 + 1e-6,
                    "{} view {v}: {a} vs {b}",
                    sample.key
                );
            }
        }
    }

    // A run with the same targets config reads the store: zero extractor calls.
    let run_dir = tmp.path().join("run");
    ok(pipeline()
        .args(["run", CONFIG])
        .args(&sets)
        .args(TINY_MODEL)
        .args(["--set", "train.epochs=1", "--set"])
        .arg(format!("run.dir={}", run_dir.display()))
        .output()
        .unwrap());
    let line = metrics_targets_line(&run_dir);
    assert_eq!(line["extractor_calls"], 0, "{line}");
    assert_eq!(line["cache_reads"], 1216, "{line}");

    // Another precompute finds everything and computes nothing; raising K computes only the new views.
    let again = report(precompute(&sets, &[]).output().unwrap());
    assert_eq!(
        (again["present"].as_u64(), again["computed"].as_u64()),
        (Some(2500), Some(0))
    );
    let raised = report(precompute(&data_sets(1, &cache, 3), &[]).output().unwrap());
    assert_eq!(
        (raised["present"].as_u64(), raised["computed"].as_u64()),
        (Some(2500), Some(1250))
    );
    let after = contents(&store_dir(&cache));
    assert_eq!(after.len(), 3750);
    assert!(stored.iter().all(|(view, bytes)| after.get(view) == Some(bytes)));
}

#[test]
fn a_config_that_matches_no_store_is_an_error_or_computed_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let sets = data_sets(1, &cache, 1);
    let run = |extra: &[&str], dir: &str| {
        pipeline()
            .args(["run", CONFIG])
            .args(&sets)
            .args(TINY_MODEL)
            .args(["--set", "train.epochs=1", "--set"])
            .arg(format!("run.dir={}", tmp.path().join(dir).display()))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[], "r1");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no store matches this targets config") && stderr.contains("hog-"),
        "{stderr}"
    );
    // on_miss: compute fills the store, counting the extractor calls; the next run reads it.
    ok(run(&["--set", "stages.targets.on_miss=compute"], "r2"));
    assert_eq!(metrics_targets_line(&tmp.path().join("r2"))["extractor_calls"], 1250);
    ok(run(&[], "r3"));
    assert_eq!(metrics_targets_line(&tmp.path().join("r3"))["extractor_calls"], 0);
    // Another view seed is another store: not silently the old one.
    let out = run(&["--set", "stages.targets.view_seed=1"], "r4");
    assert!(!out.status.success());
}

#[test]
fn precompute_killed_midway_then_rerun_equals_an_uninterrupted_run_and_computes_only_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    let cut = tmp.path().join("cut");
    let k = 6;
    let total = 2 * 1250 * k as u64;
    let shard_views = ["--shard-views", "200"];
    let uninterrupted = report(precompute(&data_sets(2, &whole, k), &shard_views).output().unwrap());
    assert_eq!(uninterrupted["computed"].as_u64(), Some(total));

    // Kill (SIGKILL) as soon as the first store shard is complete.
    let sets = data_sets(2, &cut, k);
    let mut child = precompute(&sets, &shard_views)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let indexed = std::fs::read_dir(&cut)
            .ok()
            .and_then(|mut d| d.find_map(|e| e.ok().filter(|e| e.path().is_dir())))
            .map(|d| {
                std::fs::read_dir(d.path())
                    .unwrap()
                    .filter(|e| {
                        e.as_ref()
                            .unwrap()
                            .file_name()
                            .to_string_lossy()
                            .ends_with(".index.json")
                    })
                    .count()
            })
            .unwrap_or(0);
        if indexed > 0 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "precompute finished before it could be killed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no store shard after 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let after_kill = contents(&store_dir(&cut)).len() as u64;
    assert!(
        after_kill > 0 && after_kill < total,
        "{after_kill} of {total} stored at the kill"
    );

    let rerun = report(precompute(&sets, &shard_views).output().unwrap());
    assert_eq!(rerun["present"].as_u64(), Some(after_kill));
    assert_eq!(rerun["computed"].as_u64(), Some(total - after_kill));
    assert_eq!(contents(&store_dir(&cut)), contents(&store_dir(&whole)));
}

#[test]
fn corrupt_store_shard_is_reported_and_recomputed_or_an_error_under_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let sets = data_sets(1, &cache, 2);
    report(precompute(&sets, &["--shard-views", "500"]).output().unwrap());
    let dir = store_dir(&cache);
    let before = contents(&dir);
    let victim = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".tar.zst"))
        .min()
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();

    let out = precompute(&sets, &["--set", "data.on_error=fail"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&name) && stderr.contains("corrupt"), "{stderr}");

    let fixed = report(precompute(&sets, &[]).output().unwrap());
    assert_eq!(fixed["corrupt_shards"], serde_json::json!([name]));
    assert_eq!(fixed["computed"].as_u64(), Some(500));
    assert_eq!(contents(&dir), before);
}

#[test]
fn two_precomputes_at_once_leave_a_whole_store_and_bench_reads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let sets = data_sets(1, &cache, 2);
    let children: Vec<_> = (0..2)
        .map(|_| {
            precompute(&sets, &["--shard-views", "300"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        ok(child.wait_with_output().unwrap());
    }
    let stored = contents(&store_dir(&cache));
    assert_eq!(stored.len(), 2500);
    let again = report(precompute(&sets, &[]).output().unwrap());
    assert_eq!(again["computed"].as_u64(), Some(0));

    let bench: serde_json::Value = serde_json::from_str(&ok(pipeline()
        .args(["bench", "cache", CONFIG, "--json"])
        .args(&sets)
        .output()
        .unwrap()))
    .unwrap();
    // Views stored twice (both runs computed them) are read twice.
    assert!(bench["views"].as_u64().unwrap() >= 2500, "{bench}");
    assert_eq!(bench["clip_bytes_per_view"][0][1], 196 * 512 * 2);
    assert_eq!(bench["clip_bytes_per_view"][1][1], 196 * 512 + 196 * 4);
}

fn digests(run_dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "step")
        .map(|v| v["batch_digest"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn cached_runs_give_the_same_batches_on_one_or_two_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let sets = data_sets(2, &cache, 3);
    report(precompute(&sets, &[]).output().unwrap());
    let run = |workers: &str, dir: &str| {
        let run_dir = tmp.path().join(dir);
        ok(pipeline()
            .args(["run", CONFIG, "--workers", workers])
            .args(&sets)
            .args(TINY_MODEL)
            .args(["--set", "train.epochs=1", "--set"])
            .arg(format!("run.dir={}", run_dir.display()))
            .output()
            .unwrap());
        assert_eq!(metrics_targets_line(&run_dir)["extractor_calls"], 0);
        digests(&run_dir)
    };
    let one = run("1", "w1");
    assert_eq!(one.len(), 39);
    assert_eq!(one, run("2", "w2"));
}

#[test]
fn precompute_with_the_extractor_on_the_train_process_fills_the_same_store() {
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("local");
    report(precompute(&data_sets(1, &local, 2), &[]).output().unwrap());
    // Process 0 (train) runs the extractor and the store writers; process 1 (data) reads and decodes.
    let cache = tmp.path().join("cluster");
    let hostfile = tmp.path().join("hosts.txt");
    let ports: Vec<String> = (0..2)
        .map(|_| {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            format!("127.0.0.1:{port}")
        })
        .collect();
    std::fs::write(&hostfile, ports.join("\n")).unwrap();
    let children: Vec<_> = (0..2)
        .map(|p| {
            precompute(&data_sets(1, &cache, 2), &[])
                .args([
                    "--set",
                    "cluster.roles=[train, data]",
                    "--set",
                    "placement.targets=train",
                ])
                .args(["--processes", "2", "--process", &p.to_string(), "--hostfile"])
                .arg(&hostfile)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let reports: Vec<serde_json::Value> = children
        .into_iter()
        .map(|c| report(c.wait_with_output().unwrap()))
        .collect();
    // Only the train process computed (and counted) views.
    assert_eq!(reports[0]["computed"].as_u64(), Some(2500));
    assert_eq!(reports[1]["computed"].as_u64(), Some(0));
    let dir = store_dir(&cache);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tar.zst"))
        .collect();
    assert!(names.iter().all(|n| n.contains("-p0-")), "{names:?}");
    assert_eq!(contents(&dir), contents(&store_dir(&local)));
}
