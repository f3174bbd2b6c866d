//! `az://` shards and target cache against Azurite, Microsoft's Azure Storage
//! emulator, on loopback (no network): the same checks as `storage.rs` makes
//! against S3, on the Azure client.
//!
//! - a run over `az://` sees the batch digests of the same shards read from
//!   local files, and a second run takes their keys from the key cache (the
//!   Azure listing's ETags);
//! - a missing blob is a missing shard (an error under `fail`);
//! - precompute into a container, then a run that reads it with no extractor call.
//!
//! Azurite is an npm package: `.ci/run` installs it under `target/azurite`
//! (or set `AZURITE_BLOB` to an `azurite-blob` binary). Where it is absent the
//! tests say so and pass, unless `CROSSMAE_REQUIRE_AZURITE` is set, as CI sets it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use base64::Engine;
use hmac::{KeyInit, Mac};

mod util;
use util::{pipeline, TINY_MODEL};

use shards::storage::{Remote, StorageOptions};

/// Azurite's fixed development account and key (public, the same in every install).
const ACCOUNT: &str = "devstoreaccount1";
const ACCOUNT_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

struct Azurite {
    child: Child,
    port: u16,
}

fn azurite_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("AZURITE_BLOB") {
        return Some(PathBuf::from(bin));
    }
    let local = util::repo().join("target/azurite/node_modules/.bin/azurite-blob");
    if local.exists() {
        return Some(local);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join("azurite-blob"))
        .find(|p| p.exists())
}

impl Azurite {
    /// Start Azurite over `root`, or None (with the reason printed) where it is not installed.
    fn start(root: &Path) -> Option<Azurite> {
        let Some(bin) = azurite_binary() else {
            let why = "azurite-blob not found (npm install --prefix target/azurite azurite; .ci/run does)";
            assert!(std::env::var_os("CROSSMAE_REQUIRE_AZURITE").is_none(), "{why}");
            eprintln!("SKIPPED: {why}");
            return None;
        };
        std::fs::create_dir_all(root).unwrap();
        let mut child = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", "0", "--location"])
            .arg(root)
            .args(["--skipApiVersionCheck", "--disableTelemetry", "--silent"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let port = loop {
            let line = lines.next().expect("Azurite exited before listening").unwrap();
            if let Some(rest) = line.split("listens on http://127.0.0.1:").nth(1) {
                break rest.trim().parse().unwrap();
            }
        };
        // Keep draining its output so that it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Some(Azurite { child, port })
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The emulator settings a `pipeline` process reads from the environment.
    fn env(&self, cmd: &mut Command) {
        cmd.env("AZURE_STORAGE_USE_EMULATOR", "true")
            .env("AZURITE_BLOB_STORAGE_URL", self.endpoint());
    }

    /// The same account as client options for this test process (no environment).
    fn options(&self) -> StorageOptions {
        let options = [
            ("azure_storage_account_name", ACCOUNT.to_string()),
            ("azure_storage_account_key", ACCOUNT_KEY.to_string()),
            ("azure_storage_endpoint", format!("{}/{ACCOUNT}", self.endpoint())),
            ("azure_allow_http", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        StorageOptions {
            options,
            ..StorageOptions::default()
        }
    }

    /// Create a container: a Shared Key signed `PUT ?restype=container`
    /// (object_store has no call for it).
    fn create_container(&self, name: &str) {
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let version = "2021-08-06";
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
        );
        let key = base64::engine::general_purpose::STANDARD.decode(ACCOUNT_KEY).unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(to_sign.as_bytes());
        let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "PUT /{ACCOUNT}/{name}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nx-ms-date: {date}\r\n\
             x-ms-version: {version}\r\nAuthorization: SharedKey {ACCOUNT}:{signature}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 201"),
            "creating container {name}: {response}"
        );
    }

    /// Upload a local file as blob `url` (through our client, as precompute uploads).
    fn upload(&self, file: &Path, url: &str) {
        let opts = self.options();
        let remote = Remote::with_options(url, &opts).unwrap();
        remote.put(std::fs::read(file).unwrap(), &opts).unwrap();
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// A one-epoch run of the tiny model over `shards`: its output and batch digests.
fn run(shards: &str, run_dir: &Path, azurite: Option<&Azurite>, sets: &[&str]) -> (Output, Vec<String>) {
    let mut cmd = pipeline();
    cmd.env("RAYON_NUM_THREADS", "1")
        .args(["run", "configs/pretrain.yaml", "--set", &format!("data.train={shards}")])
        .args([
            "--set",
            "data.lanes=2",
            "--set",
            "train.batch_size=100",
            "--set",
            "train.epochs=1",
        ])
        .args([
            "--set",
            "eval.after_run=false",
            "--set",
            &format!("run.dir={}", run_dir.display()),
        ])
        .args(TINY_MODEL);
    for s in sets {
        cmd.args(["--set", s]);
    }
    if let Some(azurite) = azurite {
        azurite.env(&mut cmd);
    }
    let output = cmd.output().unwrap();
    let digests = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "step")
        .map(|v| v["batch_digest"].as_str().unwrap().to_string())
        .collect();
    (output, digests)
}

#[test]
fn runs_from_an_azure_container_see_the_batches_of_local_files() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(azurite) = Azurite::start(&tmp.path().join("azurite")) else {
        return;
    };
    azurite.create_container("data");
    for i in 0..2 {
        azurite.upload(&embedded_shard(i), &format!("az://data/train-{i:06}.tar.zst"));
    }
    let local = format!("['{}', '{}']", embedded_shard(0).display(), embedded_shard(1).display());
    let (output, want) = run(&local, &tmp.path().join("local"), None, &["data.key_cache=off"]);
    ok(output);
    assert!(!want.is_empty());

    let keys = format!("data.key_cache={}", tmp.path().join("keys").display());
    let remote = "['az://data/train-{000000..000001}.tar.zst']";
    let (output, got) = run(remote, &tmp.path().join("az"), Some(&azurite), &[&keys]);
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    ok(output);
    assert_eq!(got, want, "az:// and local files disagree");
    assert!(log.contains("keys of 2 shards: 0 from the key cache"), "{log}");
    // The second run knows the blobs by their listed versions.
    let (output, again) = run(remote, &tmp.path().join("az-again"), Some(&azurite), &[&keys]);
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    ok(output);
    assert_eq!(again, want);
    assert!(log.contains("keys of 2 shards: 2 from the key cache"), "{log}");

    // A blob that is not there is a missing shard: under `fail`, an error naming it.
    let missing = "['az://data/train-{000000..000002}.tar.zst']";
    let (output, _) = run(
        missing,
        &tmp.path().join("missing"),
        Some(&azurite),
        &["data.on_error=fail"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("az://data/train-000002.tar.zst"),
        "{stderr}"
    );
}

#[test]
fn precompute_into_an_azure_container_then_a_run_reads_it_with_no_extractor_call() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(azurite) = Azurite::start(&tmp.path().join("azurite")) else {
        return;
    };
    azurite.create_container("cache");
    let sets: Vec<String> = [
        "data.train=['../shards/data/fashion-mnist/train-000000.tar.zst']",
        "data.lanes=1",
        "stages.targets.cache=az://cache/targets",
        "stages.targets.views=2",
        "eval.after_run=false",
    ]
    .iter()
    .flat_map(|s| ["--set".to_string(), s.to_string()])
    .collect();
    let precompute = || {
        let mut cmd = pipeline();
        azurite.env(&mut cmd);
        let stdout = ok(cmd
            .args(["precompute", "configs/targets-hog.yaml", "--json"])
            .args(&sets)
            .output()
            .unwrap());
        serde_json::from_str::<serde_json::Value>(stdout.trim()).unwrap()
    };
    let first = precompute();
    assert_eq!(first["computed"].as_u64(), Some(2500), "{first}");
    let again = precompute();
    assert_eq!(
        (again["present"].as_u64(), again["computed"].as_u64()),
        (Some(2500), Some(0)),
        "{again}"
    );

    let run_dir = tmp.path().join("run");
    let mut cmd = pipeline();
    azurite.env(&mut cmd);
    ok(cmd
        .env("RAYON_NUM_THREADS", "1")
        .args(["run", "configs/targets-hog.yaml"])
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
