//! The dataflow end to end: the batches depend on the config only, never on
//! the number of workers or processes (DESIGN.md, determinism). Each run
//! writes a `batch_digest` per step to metrics.jsonl (a hash of the batch's
//! keys, views and tensor bytes in batch order); the digests must agree.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod util;

/// The binary, with the trainer held to one thread (tests run side by side).
fn pipeline() -> Command {
    let mut cmd = util::pipeline();
    cmd.env("RAYON_NUM_THREADS", "1");
    cmd
}

/// A small, fast run over 2 of the embedded shards: 2 epochs, tiny model.
fn small_run_args(run_dir: &Path) -> Vec<String> {
    [
        "run",
        "configs/pretrain.yaml",
        "--set",
        "data.train=['../shards/data/fashion-mnist/train-{000000..000001}.tar.zst']",
        "--set",
        "data.lanes=2",
        "--set",
        "train.batch_size=100",
        "--set",
        "train.epochs=2",
        "--set",
        "run.log_every=5",
    ]
    .iter()
    .chain(util::TINY_MODEL)
    .map(|s| s.to_string())
    .chain(["--set".to_string(), format!("run.dir={}", run_dir.display())])
    .collect()
}

fn steps(run_dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .filter(|v| v["kind"] == "step")
        .collect()
}

/// (batch index, digest) per step line of a run's metrics.jsonl.
fn digests(run_dir: &Path) -> Vec<(u64, String)> {
    steps(run_dir)
        .iter()
        .map(|v| {
            (
                v["batch"].as_u64().unwrap(),
                v["batch_digest"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// (batch index, loss bits) per step: f64 printed by serde_json round-trips exactly.
fn losses(run_dir: &Path) -> Vec<(u64, u64)> {
    steps(run_dir)
        .iter()
        .map(|v| (v["batch"].as_u64().unwrap(), v["loss"].as_f64().unwrap().to_bits()))
        .collect()
}

fn wait_with_timeout(mut child: Child, limit: Duration) -> std::process::Output {
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "timed out after {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_single(run_dir: &Path, workers: usize, extra: &[&str]) -> Vec<(u64, String)> {
    let child = pipeline()
        .args(small_run_args(run_dir))
        .args(["--workers", &workers.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pipeline");
    let out = wait_with_timeout(child, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "run failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    digests(run_dir)
}

/// Start the three processes of a loopback cluster (process 0 trains, 1 and 2
/// run the data stages) on the small run, with `extra` arguments.
fn spawn_cluster(dir: &Path, run_dir: &Path, extra: &[&str]) -> Vec<Child> {
    let hostfile = dir.join("hosts.txt");
    let hosts: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    std::fs::write(&hostfile, hosts.join("\n")).expect("write hostfile");
    (0..3)
        .map(|p| {
            pipeline()
                .args(small_run_args(run_dir))
                .args(["--set", "cluster.roles=[train, data, data]"])
                .args(extra)
                .args(["--processes", "3", "--process", &p.to_string(), "--hostfile"])
                .arg(&hostfile)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn pipeline")
        })
        .collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn same_batches_for_one_worker_two_workers_and_three_processes() {
    let dir = tempfile::tempdir().unwrap();
    let one = run_single(&dir.path().join("one"), 1, &[]);
    // 2 shards of 1250 in 2 lanes, 50 per lane per batch: 25 batches an epoch.
    assert_eq!(one.len(), 50);
    assert_eq!(
        one.iter().map(|(b, _)| *b).collect::<Vec<_>>(),
        (0..50).collect::<Vec<_>>()
    );
    let distinct: std::collections::HashSet<_> = one.iter().map(|(_, d)| d).collect();
    assert_eq!(distinct.len(), 50, "every batch differs");

    let two = run_single(&dir.path().join("two"), 2, &[]);
    assert_eq!(one, two, "1 worker and 2 workers disagree");

    // Cut after epoch 1, then --resume: the same batches and bitwise the same losses.
    let cut = dir.path().join("cut");
    let first = run_single(&cut, 1, &["--stop-after-epochs", "1"]);
    assert_eq!(first[..], one[..25]);
    let resumed = run_single(&cut, 2, &["--resume", cut.to_str().unwrap()]);
    assert_eq!(resumed, one, "resumed run saw other batches");
    assert_eq!(
        losses(&cut),
        losses(&dir.path().join("one")),
        "losses after --resume differ"
    );

    // Three processes on loopback: process 0 trains, 1 and 2 run the data stages.
    let three_dir: PathBuf = dir.path().join("three");
    let children = spawn_cluster(dir.path(), &three_dir, &[]);
    for (p, child) in children.into_iter().enumerate() {
        let out = wait_with_timeout(child, Duration::from_secs(300));
        assert!(
            out.status.success(),
            "process {p} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(one, digests(&three_dir), "1 process and 3 processes disagree");
}

#[test]
fn a_dead_process_stops_the_others_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut children = spawn_cluster(dir.path(), &run_dir, &["--set", "train.epochs=20"]);
    // Wait until training is under way, then kill a data process.
    let start = Instant::now();
    while !run_dir.join("metrics.jsonl").exists() || steps(&run_dir).len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the cluster never started training"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    children[2].kill().unwrap();
    let _ = children.pop().unwrap().wait();
    let killed_at = Instant::now();
    for (p, child) in children.into_iter().enumerate() {
        let out = wait_with_timeout(child, Duration::from_secs(30));
        assert!(killed_at.elapsed() < Duration::from_secs(30));
        assert!(!out.status.success(), "process {p} exited 0 after a peer died");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("error:") && err.contains("--resume"),
            "process {p}: unclear message:\n{err}"
        );
    }
}

/// `train.checkpoint_every`: kill -9 a run between two mid-epoch checkpoints of
/// its first epoch, resume it, and the losses are bitwise those of a run that
/// was never interrupted (metrics.jsonl keeps one line per batch).
#[test]
fn kill_between_mid_epoch_checkpoints_then_resume_is_bitwise_exact() {
    let dir = tempfile::tempdir().unwrap();
    let every = ["--set", "train.checkpoint_every=7"];
    let whole = dir.path().join("whole");
    run_single(&whole, 1, &every);

    let cut = dir.path().join("cut");
    let mut child = pipeline()
        .args(small_run_args(&cut))
        .args(every)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pipeline");
    // Kill as soon as the first mid-epoch checkpoint (step 7 of the 25 in epoch 0) is down.
    let state = cut.join("ckpt").join("state.json");
    let start = Instant::now();
    let saved_step = loop {
        let step = std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["step"].as_u64());
        if let Some(step) = step {
            child.kill().expect("kill -9");
            child.wait().expect("wait");
            break step;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "no checkpoint written");
        std::thread::sleep(Duration::from_millis(5));
    };
    let saved_step = std::fs::read_to_string(&state)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["step"].as_u64())
        .unwrap_or(saved_step);
    assert!(
        saved_step % 7 == 0 && saved_step < 25,
        "checkpoint at step {saved_step}"
    );

    let resumed = run_single(
        &cut,
        1,
        &["--set", "train.checkpoint_every=7", "--resume", cut.to_str().unwrap()],
    );
    assert_eq!(resumed, digests(&whole), "resumed run saw other batches");
    assert_eq!(losses(&cut), losses(&whole), "losses after kill -9 and --resume differ");
}

/// Samples the stages of a cluster's data processes skip count against
/// `data.max_skip_fraction` in the train process, which never sees them fail:
/// the batches it gets are short by them. One image in 10 is garbage here.
#[test]
fn skips_in_data_processes_count_in_the_train_process() {
    let dir = tempfile::tempdir().unwrap();
    let source = util::repo().join("shards/data/fashion-mnist/train-000000.tar.zst");
    let mut writer = shards::ShardWriter::new(
        dir.path().join("bad-%06d.tar").to_str().unwrap(),
        shards::WriterOptions {
            max_samples: 100,
            ..Default::default()
        },
    )
    .unwrap();
    let skips = shards::Skips::default();
    for (i, sample) in shards::ShardReader::open(&source, shards::OnError::Fail, &skips)
        .unwrap()
        .take(200)
        .enumerate()
    {
        let mut sample = sample.unwrap();
        if i % 10 == 3 {
            for bytes in sample.files.values_mut().filter(|b| b.len() > 100) {
                *bytes = b"\x89PNG\r\n\x1a\ngarbage".to_vec();
            }
        }
        writer.write(&sample).unwrap();
    }
    assert_eq!(writer.close().unwrap().len(), 2);
    let data = format!("data.train=['{}/bad-{{000000..000001}}.tar']", dir.path().display());
    let extra = [
        "--set",
        data.as_str(),
        "--set",
        "train.batch_size=20",
        "--set",
        "train.epochs=1",
    ];
    // One process, the loss allowed: each of the 20 garbage images counts once
    // (its stage logs it and the batch arrives short of it: one skip, not two).
    let single = dir.path().join("single");
    let out = pipeline()
        .args(small_run_args(&single))
        .args(extra)
        .args(["--set", "data.max_skip_fraction=0.5"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(single.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["skipped_samples"], 20, "{summary}");
    assert_eq!(summary["skipped_fraction"], 0.1, "{summary}");
    let children = spawn_cluster(dir.path(), &dir.path().join("run"), &extra);
    let mut outputs: Vec<_> = children
        .into_iter()
        .map(|c| wait_with_timeout(c, Duration::from_secs(300)))
        .collect();
    let train = outputs.remove(0);
    assert!(!train.status.success(), "the train process accepted a 10% skip rate");
    let err = String::from_utf8_lossy(&train.stderr);
    assert!(
        err.contains("were skipped as bad input") && err.contains("20 missing from the batches trained"),
        "{err}"
    );
}

/// `bench data` on a loopback cluster: a data process feeds the train process
/// over timely's TCP, and the train process reports the graph figure (every
/// sample delivered) with the bytes per record that crossed.
#[test]
fn bench_data_measures_the_graph_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hosts.txt");
    let hosts: Vec<String> = (0..2).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    std::fs::write(&hostfile, hosts.join("\n")).unwrap();
    let children: Vec<Child> = (0..2)
        .map(|p| {
            pipeline()
                .args(["bench", "data", "configs/pretrain.yaml", "--graph-epochs", "1"])
                .args([
                    "--set",
                    "data.train=['../shards/data/fashion-mnist/train-{000000..000001}.tar.zst']",
                ])
                .args(["--set", "data.lanes=2", "--set", "cluster.roles=[train, data]"])
                .args(["--processes", "2", "--process", &p.to_string(), "--hostfile"])
                .arg(&hostfile)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| wait_with_timeout(c, Duration::from_secs(300)))
        .collect();
    for (p, out) in outputs.iter().enumerate() {
        assert!(
            out.status.success(),
            "process {p}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&outputs[0].stdout);
    let graph: serde_json::Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["figure"] == "graph")
        .unwrap_or_else(|| panic!("no graph figure from the train process:\n{stdout}"));
    // 2,500 samples in 2 lanes of 32 per batch: 39 batches of 64.
    assert_eq!(graph["images"], 39 * 64, "{graph}");
    assert_eq!(graph["processes"], 2);
    // A 28 px record of the one-channel default: its u8 luma view and x̂ (2 x 784
    // bytes; three channels would be 2 x 2,352), one channel's HOG (49 x 36 f32)
    // and the rest.
    let bytes = graph["wire_bytes_per_record"].as_f64().unwrap();
    assert!(
        (2.0 * 784.0 + 49.0 * 36.0 * 4.0..2.0 * 2352.0 + 49.0 * 36.0 * 4.0).contains(&bytes),
        "{graph}"
    );
    assert!(String::from_utf8_lossy(&outputs[1].stderr).contains("the data stages ran"));
}

/// `RUN/shards.json` records the shards a run's patterns resolved to. A resumed
/// run whose pattern now reads other samples (a shard rewritten under its name)
/// is refused, naming that shard; over the same shards it continues.
#[test]
fn resume_refuses_shards_that_changed_since_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (data, run) = (dir.path().join("data"), dir.path().join("run"));
    std::fs::create_dir(&data).unwrap();
    let embedded = util::repo().join("shards/data/fashion-mnist");
    let copy = |from: &str, to: &str| std::fs::copy(embedded.join(from), data.join(to)).unwrap();
    copy("train-000000.tar.zst", "s-0.tar.zst");
    copy("train-000001.tar.zst", "s-1.tar.zst");
    let pattern = format!("data.train=['{}/s-{{0..1}}.tar.zst']", data.display());
    let args = ["--set", &pattern, "--set", "eval.after_run=false"];
    let first = run_single(&run, 1, &[&args[..], &["--stop-after-epochs", "1"]].concat());
    assert_eq!(first.len(), 25);
    let text = std::fs::read_to_string(run.join("shards.json")).expect("RUN/shards.json");
    let list: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(list["shards"].as_array().unwrap().len(), 2);
    assert_eq!(list["shards"][1]["samples"], 1250);
    assert!(list["shards"][1]["path"].as_str().unwrap().ends_with("s-1.tar.zst"));

    copy("train-000002.tar.zst", "s-1.tar.zst");
    let out = pipeline()
        .args(small_run_args(&run))
        .args(args)
        .args(["--resume", run.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "resumed over a rewritten shard:\n{err}");
    assert!(
        err.contains("shards.json") && err.contains("shard 1 was") && err.contains("s-1.tar.zst"),
        "unclear message:\n{err}"
    );

    copy("train-000001.tar.zst", "s-1.tar.zst");
    let resumed = run_single(&run, 1, &[&args[..], &["--resume", run.to_str().unwrap()]].concat());
    assert_eq!(resumed.len(), 50);
    assert_eq!(resumed[..25], first[..]);
}
