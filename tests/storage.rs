//! Shards and the target cache on object storage (issue 18), against a real
//! S3-compatible server on loopback: `examples/s3_server.rs` (s3s-fs, which
//! keeps each object as a file under its root, so a restarted server still
//! has them). No network: everything is on 127.0.0.1.
//!
//! - runs over `s3://` (`.tar.zst` and `.tar`) and `http://` see the batch
//!   digests of the same shards read from local files;
//! - a missing object is a missing shard (skipped and counted, or an error);
//! - a server killed in the middle of a shard and started again: the read is
//!   retried and resumed at its byte, and gives the same samples;
//! - a server that stays down: a counted skip naming the offset, or an error;
//! - precompute into a bucket, then a run reading it with no extractor call;
//! - precompute killed while it uploads, then rerun: only the missing views.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod util;
use util::{pipeline, TINY_MODEL};

use shards::storage::{stream::RemoteStream, Remote, StorageOptions};
use shards::{OnError, Sample, ShardReader, Skips};

const ACCESS_KEY: &str = "crossmae-test";
const SECRET_KEY: &str = "crossmae-test-secret";

/// The S3 server, as a child process (killed on drop).
struct Server {
    child: Option<Child>,
    root: PathBuf,
    port: u16,
    auth: bool,
}

fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples")
        .join("s3_server");
    assert!(
        bin.exists(),
        "{} not built: `cargo test` builds the examples (cargo build --example s3_server)",
        bin.display()
    );
    bin
}

impl Server {
    /// Serve `root` on a free port; with `auth`, S3 signatures are checked.
    fn start(root: &Path, auth: bool) -> Server {
        let mut server = Server {
            child: None,
            root: root.to_path_buf(),
            port: 0,
            auth,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(server_binary());
        cmd.arg(&self.root).args(["--port", &self.port.to_string()]);
        if self.auth {
            cmd.args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY]);
        }
        let started = Instant::now();
        loop {
            let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            if let Some(addr) = line.trim().strip_prefix("listening on http://127.0.0.1:") {
                self.port = addr.parse().unwrap();
                self.child = Some(child);
                return;
            }
            // The port of a killed server may take a moment to come free.
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the S3 server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill the server (SIGKILL: connections drop as in a crash).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port, over the same objects.
    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The client settings a `pipeline` process reads from the environment.
    fn env(&self, cmd: &mut Command) {
        cmd.env("AWS_ENDPOINT_URL", self.endpoint())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ALLOW_HTTP", "true");
    }

    /// The same, as options for a client made in this test process.
    fn options(&self, retries: u32, backoff_ms: u64) -> StorageOptions {
        let options: BTreeMap<String, String> = [
            ("aws_endpoint_url", self.endpoint()),
            ("aws_access_key_id", ACCESS_KEY.to_string()),
            ("aws_secret_access_key", SECRET_KEY.to_string()),
            ("aws_region", "us-east-1".to_string()),
            ("aws_allow_http", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        StorageOptions {
            read_ahead_mib: 0.0625,
            retries,
            backoff_ms,
            max_backoff_ms: 1000,
            timeout_s: 30,
            options,
            ..StorageOptions::default()
        }
    }

    /// The directory that holds bucket `bucket`'s objects.
    fn bucket(&self, bucket: &str) -> PathBuf {
        let dir = self.root.join(bucket);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ok(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "failed:\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn embedded_shard(i: usize) -> PathBuf {
    util::repo().join(format!("shards/data/fashion-mnist/train-{i:06}.tar.zst"))
}

/// A one-epoch run of the tiny model over `shards`; its batch digests.
fn run_digests(shards: &[String], run_dir: &Path, server: Option<&Server>) -> Vec<String> {
    run_with_key_cache(shards, run_dir, server, "auto").0
}

/// [`run_digests`] with `data.key_cache` set; also its standard error.
fn run_with_key_cache(
    shards: &[String],
    run_dir: &Path,
    server: Option<&Server>,
    key_cache: &str,
) -> (Vec<String>, String) {
    let mut cmd = run_command(shards, run_dir, key_cache);
    if let Some(server) = server {
        server.env(&mut cmd);
    }
    let output = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ok(output);
    (step_digests(run_dir), stderr)
}

/// The command of a one-epoch run of the tiny model over `shards` into `run_dir`.
fn run_command(shards: &[String], run_dir: &Path, key_cache: &str) -> Command {
    let list = shards.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ");
    let mut cmd = pipeline();
    cmd.env("RAYON_NUM_THREADS", "1")
        .args(["run", "configs/pretrain.yaml"])
        .args(["--set", &format!("data.train=[{list}]")])
        .args([
            "--set",
            "data.lanes=2",
            "--set",
            "train.batch_size=100",
            "--set",
            "train.epochs=1",
        ])
        .args(["--set", "run.log_every=5", "--set", "eval.after_run=false"])
        .args(TINY_MODEL)
        .args(["--set", &format!("data.key_cache={key_cache}")])
        .args(["--set", &format!("run.dir={}", run_dir.display())]);
    cmd
}

/// The batch digests of the steps a run wrote to its `metrics.jsonl`.
fn step_digests(run_dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let digests: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "step")
        .map(|v| v["batch_digest"].as_str().unwrap().to_string())
        .collect();
    assert!(!digests.is_empty(), "no steps in {}", run_dir.display());
    digests
}

#[test]
fn a_second_run_from_a_bucket_takes_the_shard_keys_from_the_key_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("s3"), true);
    let bucket = server.bucket("data");
    for i in 0..2 {
        std::fs::copy(embedded_shard(i), bucket.join(format!("train-{i:06}.tar.zst"))).unwrap();
    }
    let shards = ["s3://data/train-{000000..000001}.tar.zst".to_string()];
    let keys = tmp.path().join("keys").display().to_string();
    let (first, log) = run_with_key_cache(&shards, &tmp.path().join("first"), Some(&server), &keys);
    assert!(log.contains("keys of 2 shards: 0 from the key cache"), "{log}");
    let (second, log) = run_with_key_cache(&shards, &tmp.path().join("second"), Some(&server), &keys);
    assert!(log.contains("keys of 2 shards: 2 from the key cache"), "{log}");
    assert_eq!(second, first);
    // Another object under the first name (the third embedded shard): its keys are read again.
    std::fs::copy(embedded_shard(2), bucket.join("train-000000.tar.zst")).unwrap();
    let (third, log) = run_with_key_cache(&shards, &tmp.path().join("third"), Some(&server), &keys);
    assert!(log.contains("keys of 2 shards: 1 from the key cache"), "{log}");
    let (local, _) = run_with_key_cache(
        &[
            embedded_shard(2).display().to_string(),
            embedded_shard(1).display().to_string(),
        ],
        &tmp.path().join("local"),
        None,
        "off",
    );
    assert_eq!(third, local);
}

#[test]
fn runs_from_a_bucket_and_over_http_see_the_batches_of_local_files() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("s3"), true);
    let bucket = server.bucket("data");
    for i in 0..2 {
        let zst = std::fs::read(embedded_shard(i)).unwrap();
        std::fs::write(bucket.join(format!("train-{i:06}.tar.zst")), &zst).unwrap();
        // The same shard as a plain tar: the same samples, so the same batches.
        let tar = zstd::decode_all(&zst[..]).unwrap();
        std::fs::write(bucket.join(format!("train-{i:06}.tar")), tar).unwrap();
    }
    let local = run_digests(
        &[
            embedded_shard(0).display().to_string(),
            embedded_shard(1).display().to_string(),
        ],
        &tmp.path().join("local"),
        None,
    );
    let from_s3_zst = run_digests(
        &["s3://data/train-{000000..000001}.tar.zst".to_string()],
        &tmp.path().join("s3-zst"),
        Some(&server),
    );
    assert_eq!(from_s3_zst, local, "s3:// .tar.zst and local files disagree");
    let from_s3_tar = run_digests(
        &["s3://data/train-{000000..000001}.tar".to_string()],
        &tmp.path().join("s3-tar"),
        Some(&server),
    );
    assert_eq!(from_s3_tar, local, "s3:// .tar and local .tar.zst disagree");

    // Plain HTTP GETs of the same objects (a server that checks no signatures).
    let open = Server::start(&tmp.path().join("s3"), false);
    let from_http = run_digests(
        &[format!("{}/data/train-{{000000..000001}}.tar", open.endpoint())],
        &tmp.path().join("http"),
        None,
    );
    assert_eq!(from_http, local, "http:// and local files disagree");
}

#[test]
fn keys_region_and_endpoint_come_from_an_aws_profile() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("s3"), true);
    for i in 0..2 {
        std::fs::copy(
            embedded_shard(i),
            server.bucket("data").join(format!("train-{i:06}.tar.zst")),
        )
        .unwrap();
    }
    let home = tmp.path().join("home");
    std::fs::create_dir_all(home.join(".aws")).unwrap();
    std::fs::write(
        home.join(".aws/config"),
        format!(
            "[default]\nregion = eu-west-1\n\n[profile lab]\nregion = us-east-1\ns3 =\n  endpoint_url = {}\n",
            server.endpoint()
        ),
    )
    .unwrap();
    let credentials = |secret: &str| {
        let text = format!("[lab]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {secret}\n");
        std::fs::write(home.join(".aws/credentials"), text).unwrap();
    };
    let run = |name: &str, profile: &str| {
        let dir = tmp.path().join(name);
        let mut cmd = run_command(&["s3://data/train-{000000..000001}.tar.zst".to_string()], &dir, "off");
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT",
            "AWS_ENDPOINT_URL_S3",
            "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_DEFAULT_PROFILE",
        ] {
            cmd.env_remove(var);
        }
        let output = cmd
            .env("HOME", &home)
            .env("AWS_PROFILE", profile)
            .env("AWS_ALLOW_HTTP", "true")
            .output()
            .unwrap();
        (output, dir)
    };
    credentials(SECRET_KEY);
    let (output, dir) = run("profile", "lab");
    ok(output);
    let local: Vec<String> = (0..2).map(|i| embedded_shard(i).display().to_string()).collect();
    let local = run_digests(&local, &tmp.path().join("local"), None);
    assert_eq!(step_digests(&dir), local);
    // The secret is the profile's: a wrong one there is refused by the server.
    credentials("not-the-secret");
    let (output, _) = run("wrong-secret", "lab");
    assert!(!output.status.success(), "a wrong secret in the profile was accepted");
    // A profile that neither file holds is an error naming it.
    let (output, _) = run("no-profile", "nope");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("AWS_PROFILE=nope"),
        "{stderr}"
    );
}

#[test]
fn a_missing_object_is_a_missing_shard_skipped_or_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("s3"), true);
    std::fs::copy(embedded_shard(0), server.bucket("data").join("train-000000.tar.zst")).unwrap();

    let mut inspect = pipeline();
    server.env(&mut inspect);
    let out = ok(inspect
        .args(["shards", "inspect", "s3://data/train-{000000..000001}.tar.zst"])
        .output()
        .unwrap());
    assert!(out.contains("samples:     1250"), "{out}");
    assert!(
        out.contains("s3://data/train-000001.tar.zst") && out.contains("no such object"),
        "the missing shard is named: {out}"
    );

    let mut run = pipeline();
    server.env(&mut run);
    let out = run
        .args(["run", "configs/pretrain.yaml"])
        .args(["--set", "data.train=['s3://data/train-{000000..000001}.tar.zst']"])
        .args(["--set", "data.on_error=fail", "--set", "eval.after_run=false"])
        .args(["--set", &format!("run.dir={}", tmp.path().join("run").display())])
        .args(TINY_MODEL)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a missing shard under fail must fail the run");
    assert!(
        stderr.contains("s3://data/train-000001.tar.zst") && stderr.contains("no such object"),
        "{stderr}"
    );
}

/// A shard big enough that a read cannot sit whole in socket buffers: 40
/// samples of 1 MiB of pseudo-random bytes.
fn write_big_shard(dir: &Path) -> PathBuf {
    let mut writer = shards::ShardWriter::new(
        &dir.join("big-%d.tar").to_string_lossy(),
        shards::WriterOptions {
            max_samples: usize::MAX,
            max_bytes: u64::MAX,
            zstd_level: 0,
        },
    )
    .unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..40 {
        let bytes: Vec<u8> = (0..1 << 20)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        writer
            .write(&Sample::new(format!("s{i:03}")).with("bin", bytes))
            .unwrap();
    }
    writer.finish_shard().unwrap().unwrap()
}

fn samples_of(reader: ShardReader) -> Vec<(String, Vec<u8>)> {
    reader
        .map(|s| s.unwrap())
        .map(|s| (s.key.clone(), s.files["bin"].clone()))
        .collect()
}

/// Open the big shard through a fresh client, read its first sample, then kill the server.
fn read_into_the_shard_then_kill(
    server: &mut Server,
    retries: u32,
    policy: OnError,
    skips: &Skips,
) -> (
    ShardReader,
    std::sync::Arc<std::sync::atomic::AtomicU32>,
    Vec<(String, Vec<u8>)>,
) {
    let url = "s3://big/shard.tar";
    let remote = Remote::with_options(url, &server.options(retries, 100)).unwrap();
    let stream = RemoteStream::open(remote, &server.options(retries, 100));
    let counter = stream.retries();
    let mut reader = ShardReader::from_stream(Path::new(url), Ok(Box::new(stream)), policy, skips).unwrap();
    let first = reader.next().unwrap().unwrap();
    server.kill();
    (reader, counter, vec![(first.key.clone(), first.files["bin"].clone())])
}

#[test]
fn a_server_restarted_in_the_middle_of_a_shard_is_resumed_with_the_same_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(&tmp.path().join("s3"), true);
    let local = write_big_shard(tmp.path());
    std::fs::copy(&local, server.bucket("big").join("shard.tar")).unwrap();
    let want = samples_of(ShardReader::open(&local, OnError::Fail, &Skips::default()).unwrap());

    let skips = Skips::default();
    let (reader, retries, mut got) = read_into_the_shard_then_kill(&mut server, 8, OnError::Fail, &skips);
    std::thread::sleep(Duration::from_millis(300));
    server.restart();
    got.extend(samples_of(reader));
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the resumed read gave other bytes");
    assert!(
        retries.load(Ordering::Relaxed) > 0,
        "the read was never interrupted: nothing was tested"
    );
    assert_eq!(skips.total(), 0);
}

/// An object replaced while its read is interrupted: the resumed read is an
/// error naming the change, never the old object's start spliced to the new
/// one's rest.
#[test]
fn an_object_replaced_while_the_server_is_down_is_an_error_not_a_spliced_read() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(&tmp.path().join("s3"), true);
    let local = write_big_shard(tmp.path());
    let object = server.bucket("big").join("shard.tar");
    std::fs::copy(&local, &object).unwrap();
    let skips = Skips::default();
    let (reader, _, _) = read_into_the_shard_then_kill(&mut server, 8, OnError::Fail, &skips);
    // The same size, one byte changed far past the read-ahead.
    let mut bytes = std::fs::read(&local).unwrap();
    let at = bytes.len() * 3 / 4;
    bytes[at] ^= 0xff;
    std::fs::write(&object, &bytes).unwrap();
    server.restart();
    let err = reader
        .filter_map(|s| s.err())
        .next()
        .expect("the changed object was read as if nothing happened");
    let message = err.to_string();
    assert!(
        message.contains("the object changed") && message.contains("s3://big/shard.tar"),
        "{message}"
    );
}

#[test]
fn a_server_that_stays_down_is_a_counted_skip_or_an_error_naming_the_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(&tmp.path().join("s3"), true);
    let local = write_big_shard(tmp.path());
    std::fs::copy(&local, server.bucket("big").join("shard.tar")).unwrap();

    let skips = Skips::default();
    let (reader, _, got) = read_into_the_shard_then_kill(&mut server, 2, OnError::Skip, &skips);
    let rest: Vec<Sample> = reader.map(|s| s.unwrap()).collect();
    assert!(
        got.len() + rest.len() < 40,
        "the whole shard was read from a dead server"
    );
    assert_eq!(skips.total(), 1, "the rest of the shard is one counted skip");
    let records = format!("{:?}", skips.records());
    assert!(
        records.contains("gave up at byte") && records.contains("after 2 retries"),
        "{records}"
    );
    // The storage's fault, not the shard's: a key cache must not keep this read.
    assert!(records.contains(shards::skips::UNAVAILABLE), "{records}");

    server.restart();
    let skips = Skips::default();
    let (reader, _, _) = read_into_the_shard_then_kill(&mut server, 2, OnError::Fail, &skips);
    let err = reader
        .filter_map(|s| s.err())
        .next()
        .expect("under fail the dead server is an error");
    let message = err.to_string();
    assert!(
        message.contains("s3://big/shard.tar") && message.contains("gave up at byte"),
        "{message}"
    );
}

const CACHE_CONFIG: &str = "configs/targets-hog.yaml";

fn cache_sets(cache: &str, shards: usize, k: u32) -> Vec<String> {
    let list = (0..shards)
        .map(|i| format!("'../shards/data/fashion-mnist/train-{i:06}.tar.zst'"))
        .collect::<Vec<_>>()
        .join(", ");
    [
        format!("data.train=[{list}]"),
        format!("data.lanes={shards}"),
        format!("stages.targets.cache={cache}"),
        format!("stages.targets.views={k}"),
        "eval.after_run=false".to_string(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

fn precompute(server: &Server, sets: &[String], extra: &[&str]) -> Command {
    let mut cmd = pipeline();
    server.env(&mut cmd);
    cmd.args(["precompute", CACHE_CONFIG, "--json"]).args(sets).args(extra);
    cmd
}

fn report(output: Output) -> serde_json::Value {
    let stdout = ok(output);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("precompute --json: {e}:\n{stdout}"))
}

/// The store directory under a cache root on the server's disk (s3s-fs keeps objects as files).
fn store_on_disk(cache: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.into_iter().next().unwrap()
}

fn stored_views(dir: &Path) -> BTreeMap<(String, u32), Vec<u8>> {
    let store = shards::store::Store::open_dir(dir).unwrap();
    let index = store.load_index(true).unwrap();
    assert!(index.corrupt.is_empty(), "{:?}", index.corrupt);
    let mut out = BTreeMap::new();
    for shard in &index.shards {
        out.extend(store.read_shard(shard).unwrap());
    }
    out
}

#[test]
fn precompute_into_a_bucket_then_a_run_reads_it_with_no_extractor_call() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("s3"), true);
    server.bucket("cache");
    let sets = cache_sets("s3://cache/targets", 1, 2);
    let first = report(precompute(&server, &sets, &[]).output().unwrap());
    assert_eq!(first["computed"].as_u64(), Some(2500), "{first}");
    let again = report(precompute(&server, &sets, &[]).output().unwrap());
    assert_eq!(
        (again["present"].as_u64(), again["computed"].as_u64()),
        (Some(2500), Some(0))
    );

    // The same store as a local precompute makes, byte for byte.
    let local_cache = tmp.path().join("local-cache");
    let local_sets = cache_sets(&local_cache.display().to_string(), 1, 2);
    let mut local = pipeline();
    ok(local
        .args(["precompute", CACHE_CONFIG, "--json"])
        .args(&local_sets)
        .output()
        .unwrap());
    let remote_views = stored_views(&store_on_disk(&server.root.join("cache/targets")));
    assert_eq!(remote_views.len(), 2500);
    assert!(remote_views == stored_views(&store_on_disk(&local_cache)));

    let run_dir = tmp.path().join("run");
    let mut run = pipeline();
    server.env(&mut run);
    ok(run
        .env("RAYON_NUM_THREADS", "1")
        .args(["run", CACHE_CONFIG])
        .args(&sets)
        .args([
            "--set",
            "train.epochs=1",
            "--set",
            &format!("run.dir={}", run_dir.display()),
        ])
        .args(TINY_MODEL)
        .output()
        .unwrap());
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let line = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|v| v["kind"] == "targets")
        .expect("a targets line");
    assert_eq!(line["extractor_calls"], 0, "{line}");
}

#[test]
fn precompute_killed_while_uploading_then_rerun_computes_only_the_missing_views() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("s3"), true);
    server.bucket("cache");
    let k = 6;
    let total = 2 * 1250 * k as u64;
    let shard_views = ["--shard-views", "200"];
    let sets = cache_sets("s3://cache/cut", 2, k);
    let mut child = precompute(&server, &sets, &shard_views)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill (SIGKILL) once the first index object is on the server.
    let cut = server.root.join("cache/cut");
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
    let after_kill = stored_views(&store_on_disk(&cut)).len() as u64;
    assert!(
        after_kill > 0 && after_kill < total,
        "{after_kill} of {total} stored at the kill"
    );

    let rerun = report(precompute(&server, &sets, &shard_views).output().unwrap());
    assert_eq!(rerun["present"].as_u64(), Some(after_kill), "{rerun}");
    assert_eq!(rerun["computed"].as_u64(), Some(total - after_kill), "{rerun}");
    assert_eq!(stored_views(&store_on_disk(&cut)).len() as u64, total);
}
