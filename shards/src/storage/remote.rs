//! Objects in a store: the `object_store` clients (one per bucket, kept for
//! the process), the runtime their async requests run on, and one retry
//! policy for every request.
//!
//! object_store can retry by itself, but only whole requests and body reads
//! that carry an ETag, with its own counts and no word to us. Its retries are
//! turned off and ours used instead, so that a connect error, a 5xx, a
//! timeout and a stream cut in the middle all follow `storage.retries` and
//! `storage.backoff_ms`, each retry is logged with the URL and byte offset,
//! and an interrupted read resumes by a ranged GET (see [`super::stream`]).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::http::HttpBuilder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutPayload, RetryConfig};

use super::StorageOptions;

/// The runtime the stores' requests run on: two threads, mostly waiting on
/// sockets (the decoding happens on the stages' own threads).
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("storage-io")
            .enable_all()
            .build()
            .expect("the storage runtime starts (two threads and a timer)")
    })
}

type Clients = Mutex<HashMap<String, Arc<dyn ObjectStore>>>;

fn clients() -> &'static Clients {
    static CLIENTS: OnceLock<Clients> = OnceLock::new();
    CLIENTS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Drop the kept clients (the options changed).
pub(crate) fn forget_clients() {
    clients().lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// One object (or prefix) in a store, with the URL that names it.
#[derive(Clone)]
pub struct Remote {
    /// The URL as given, for messages.
    pub url: String,
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) key: ObjectPath,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// Parse `key` as one of the store's option keys, or say which store did not know it.
fn option<K: std::str::FromStr>(store: &str, key: &str) -> Result<K, String> {
    key.to_ascii_lowercase()
        .parse()
        .map_err(|_| format!("storage.options.{key}: not an option of the {store} store"))
}

fn build_client(
    kind: &ObjectStoreScheme,
    url: &url::Url,
    opts: &StorageOptions,
) -> Result<Arc<dyn ObjectStore>, String> {
    let retry = RetryConfig {
        max_retries: 0,
        ..RetryConfig::default()
    };
    let timeout = format!("{}s", opts.timeout_s);
    let built: object_store::Result<Arc<dyn ObjectStore>> = match kind {
        ObjectStoreScheme::AmazonS3 => {
            let mut b = AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .with_retry(retry)
                .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), timeout);
            let env = |var: &str| std::env::var(var).ok();
            let read = |path: &std::path::Path| match std::fs::read_to_string(path) {
                Ok(text) => Ok(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("{}: {e}", path.display())),
            };
            let given: Vec<(AmazonS3ConfigKey, &String)> = opts
                .options
                .iter()
                .map(|(k, v)| Ok((option("S3", k)?, v)))
                .collect::<Result<_, String>>()?;
            // Credentials from `storage.options` come whole: none of the profile's
            // (its session token beside the options' keys would spoil the signature).
            use AmazonS3ConfigKey::{AccessKeyId, RoleArn, SecretAccessKey, Token, WebIdentityTokenFile};
            let credential = |k: &AmazonS3ConfigKey| {
                matches!(
                    k,
                    AccessKeyId | SecretAccessKey | Token | RoleArn | WebIdentityTokenFile
                )
            };
            let options_have_credentials = given.iter().any(|(k, _)| credential(k));
            for (k, v) in super::aws_profile::settings(&env, &read)? {
                if !(options_have_credentials && credential(&k)) {
                    b = b.with_config(k, v);
                }
            }
            for (k, v) in given {
                b = b.with_config(k, v);
            }
            b.build().map(|s| Arc::new(s) as _)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let mut b = GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry)
                .with_config(GoogleConfigKey::Client(ClientConfigKey::Timeout), timeout);
            for (k, v) in &opts.options {
                b = b.with_config(option("GCS", k)?, v);
            }
            b.build().map(|s| Arc::new(s) as _)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry)
                .with_config(AzureConfigKey::Client(ClientConfigKey::Timeout), timeout);
            for (k, v) in &opts.options {
                b = b.with_config(option("Azure", k)?, v);
            }
            b.build().map(|s| Arc::new(s) as _)
        }
        ObjectStoreScheme::Http => {
            let mut b = HttpBuilder::new()
                .with_url(&url[..url::Position::BeforePath])
                .with_retry(retry)
                .with_config(ClientConfigKey::Timeout, timeout)
                // An `http://` URL asks for plain HTTP (object_store refuses it by default).
                .with_config(ClientConfigKey::AllowHttp, (url.scheme() == "http").to_string());
            for (k, v) in &opts.options {
                // Options meant for a cloud store do not apply to plain HTTP servers.
                if let Ok(key) = k.to_ascii_lowercase().parse::<ClientConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            b.build().map(|s| Arc::new(s) as _)
        }
        other => return Err(format!("{other:?} URLs are not object stores")),
    };
    built.map_err(|e| format!("cannot make a client for it: {e}"))
}

/// Size and ETag (else modification time) of an object.
fn version_text(meta: &object_store::ObjectMeta) -> String {
    match &meta.e_tag {
        Some(tag) => format!("size {} etag {tag}", meta.size),
        None => format!("size {} modified {}", meta.size, meta.last_modified.to_rfc3339()),
    }
}

/// What tells one client from another: the URL without its object key. The
/// bucket or container is in the host (`s3://bucket/...`), in the user info
/// (`abfss://container@account...`) or in the path's first segments (path-style
/// `https://s3.region.amazonaws.com/bucket/...`), so all of those stay.
fn client_key(url: &url::Url, key: &object_store::path::Path) -> String {
    let segments: Vec<&str> = url.path().split('/').filter(|s| !s.is_empty()).collect();
    let keep = segments.len().saturating_sub(key.parts().count());
    format!(
        "{}://{}/{}",
        url.scheme(),
        &url[url::Position::BeforeUsername..url::Position::BeforePath],
        segments[..keep].join("/")
    )
}

impl Remote {
    /// The object (or prefix) `url` names, with the process's client for its
    /// bucket (made on first use with [`super::options`]).
    pub fn parse(url: &url::Url) -> Result<Remote, String> {
        let (kind, key) = scheme_of(url)?;
        let opts = super::options();
        let authority = client_key(url, &key);
        let mut clients = clients().lock().unwrap_or_else(|e| e.into_inner());
        let store = match clients.get(&authority) {
            Some(store) => store.clone(),
            None => {
                let store = build_client(&kind, url, &opts)?;
                clients.insert(authority, store.clone());
                store
            }
        };
        Ok(Remote {
            url: url.to_string(),
            store,
            key,
        })
    }

    /// The object `url` names, with a client of its own made with `opts`
    /// (not kept: for tools and tests that need options of their own).
    pub fn with_options(url: &str, opts: &StorageOptions) -> Result<Remote, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("{url}: not a valid URL: {e}"))?;
        let (kind, key) = scheme_of(&parsed)?;
        Ok(Remote {
            url: url.to_string(),
            store: build_client(&kind, &parsed, opts)?,
            key,
        })
    }

    /// Run one request with the retry policy, on the storage runtime.
    fn retried<T, F, Fut>(&self, what: &str, opts: &StorageOptions, request: F) -> io::Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        runtime().block_on(async {
            let mut failures = 0;
            loop {
                match request().await {
                    Ok(value) => return Ok(value),
                    Err(e) if !is_transient(&e) => return Err(to_io(e)),
                    Err(e) => {
                        failures += 1;
                        if failures > opts.retries {
                            return Err(io::Error::other(format!(
                                "{what} failed after {} retries: {e}",
                                opts.retries
                            )));
                        }
                        let wait = backoff(opts, failures);
                        tracing::warn!(
                            "{}: {what} failed ({e}); retry {failures}/{} in {} ms",
                            self.url,
                            opts.retries,
                            wait.as_millis()
                        );
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        })
    }

    /// All bytes of the object.
    pub fn get_all(&self, opts: &StorageOptions) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut super::stream::RemoteStream::open(self.clone(), opts), &mut out)?;
        Ok(out)
    }

    /// Put the object in one request (atomic: readers see all of it or nothing).
    pub fn put(&self, bytes: Vec<u8>, opts: &StorageOptions) -> io::Result<()> {
        let payload = bytes::Bytes::from(bytes);
        self.retried("PUT", opts, || {
            self.store.put(&self.key, PutPayload::from_bytes(payload.clone()))
        })
        .map(drop)
    }

    /// Whether the object exists.
    pub fn exists(&self, opts: &StorageOptions) -> io::Result<bool> {
        match self.retried("HEAD", opts, || self.store.head(&self.key)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The objects directly under this prefix (object_store lists recursively).
    fn list_children(&self, opts: &StorageOptions) -> io::Result<Vec<object_store::ObjectMeta>> {
        // A delimited listing: the direct children only, not every object below
        // (shards at a bucket's top level beside a deep tree of other data).
        let prefix = self.key.clone();
        let listed = self.retried("LIST", opts, || {
            let prefix = prefix.clone();
            async move { self.store.list_with_delimiter(Some(&prefix)).await }
        })?;
        let depth = prefix.parts().count();
        Ok(listed
            .objects
            .into_iter()
            .filter(|meta| meta.location.parts().count() == depth + 1)
            .collect())
    }

    /// The names of the objects directly under this prefix.
    pub fn list(&self, opts: &StorageOptions) -> io::Result<Vec<String>> {
        Ok(self
            .list_children(opts)?
            .into_iter()
            .filter_map(|meta| meta.location.filename().map(str::to_string))
            .collect())
    }

    /// What identifies a version of each object directly under this prefix,
    /// by file name: its size and its ETag (else its modification time), from
    /// one listing (a thousand objects a request on S3) rather than a HEAD each.
    pub fn list_versions(&self, opts: &StorageOptions) -> io::Result<HashMap<String, String>> {
        Ok(self
            .list_children(opts)?
            .into_iter()
            .filter_map(|meta| Some((meta.location.filename()?.to_string(), version_text(&meta))))
            .collect())
    }

    /// [`Self::list_versions`] of this one object, by a HEAD request (`None` when it is absent).
    pub fn version(&self, opts: &StorageOptions) -> io::Result<Option<String>> {
        match self.retried("HEAD", opts, || self.store.head(&self.key)) {
            Ok(meta) => Ok(Some(version_text(&meta))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Copy to `to`, then delete this one; `Ok(false)` when this one is gone.
    pub fn rename_to(&self, to: &Remote, opts: &StorageOptions) -> io::Result<bool> {
        match self.retried("COPY", opts, || self.store.copy(&self.key, &to.key)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        match self.retried("DELETE", opts, || self.store.delete(&self.key)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e),
        }
    }
}

fn scheme_of(url: &url::Url) -> Result<(ObjectStoreScheme, ObjectPath), String> {
    ObjectStoreScheme::parse(url).map_err(|_| {
        format!(
            "unsupported scheme `{}://` (object stores: s3://, gs://, az:// or azure://, http(s)://; local: file:// or a path)",
            url.scheme()
        )
    })
}

/// The wait before retry `failures` (1, 2, ...): `backoff_ms` doubled each time, capped.
pub(crate) fn backoff(opts: &StorageOptions, failures: u32) -> Duration {
    let ms = opts
        .backoff_ms
        .saturating_mul(1u64 << (failures.saturating_sub(1)).min(30))
        .min(opts.max_backoff_ms);
    Duration::from_millis(ms)
}

/// Whether another try may succeed: connection errors, timeouts and 5xx
/// (object_store's `Generic`), not a missing object, a refused credential, a
/// changed object or a bad request.
pub(crate) fn is_transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    match e {
        E::NotFound { .. }
        | E::Precondition { .. }
        | E::NotModified { .. }
        | E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::InvalidPath { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. }
        | E::UnknownConfigurationKey { .. }
        | E::AlreadyExists { .. } => false,
        E::Generic { source, .. } => {
            // 4xx answers other than 408 (timeout) and 429 (slow down) will not change,
            // nor will a server's 501 (it does not implement the request at all).
            let text = source.to_string();
            !["400 ", "401 ", "403 ", "404 ", "405 ", "411 ", "413 ", "416 ", "501 "]
                .iter()
                .any(|code| {
                    ["status ", "status code: ", "Client error "]
                        .iter()
                        .any(|before| text.contains(&format!("{before}{code}")))
                })
        }
        _ => true,
    }
}

/// An object_store error as an I/O error (`NotFound` kept).
pub(crate) fn to_io(e: object_store::Error) -> io::Error {
    let kind = match e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            io::ErrorKind::PermissionDenied
        }
        _ => io::ErrorKind::Other,
    };
    let message = match kind {
        io::ErrorKind::NotFound => "no such object".to_string(),
        _ => e.to_string(),
    };
    io::Error::new(kind, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two buckets on one endpoint get two clients; two objects of one bucket, one.
    #[test]
    fn a_client_serves_one_bucket() {
        let key = |u: &str| {
            let url = url::Url::parse(u).unwrap();
            let (_, path) = scheme_of(&url).unwrap();
            client_key(&url, &path)
        };
        let pairs = [
            ("s3://a/x/1.tar", "s3://a/y/2.tar", true),
            ("s3://a/x/1.tar", "s3://b/x/1.tar", false),
            (
                "https://s3.us-east-2.amazonaws.com/a/x/1.tar",
                "https://s3.us-east-2.amazonaws.com/a/2.tar",
                true,
            ),
            (
                "https://s3.us-east-2.amazonaws.com/a/x/1.tar",
                "https://s3.us-east-2.amazonaws.com/b/x/1.tar",
                false,
            ),
            (
                "abfss://c1@acct.dfs.core.windows.net/x/1.tar",
                "abfss://c2@acct.dfs.core.windows.net/x/1.tar",
                false,
            ),
            ("az://c/x/1.tar", "az://c/cache", true),
        ];
        for (a, b, same) in pairs {
            assert_eq!(key(a) == key(b), same, "{a} | {b}: {} | {}", key(a), key(b));
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let opts = StorageOptions {
            backoff_ms: 100,
            max_backoff_ms: 1000,
            ..Default::default()
        };
        let ms: Vec<u128> = (1..=6).map(|f| backoff(&opts, f).as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(&opts, 200).as_millis(), 1000);
    }

    #[test]
    fn missing_objects_are_final_and_generic_errors_transient() {
        let missing = object_store::Error::NotFound {
            path: "k".into(),
            source: "404".into(),
        };
        assert!(!is_transient(&missing));
        assert_eq!(to_io(missing).kind(), io::ErrorKind::NotFound);
        let reset = object_store::Error::Generic {
            store: "S3",
            source: "connection reset by peer".into(),
        };
        assert!(is_transient(&reset));
        // As object_store words an answer it does not map to a variant (seen from a GCS emulator).
        let refused = |code: &str| object_store::Error::Generic {
            store: "GCS",
            source: format!(
                "Error performing HEAD http://127.0.0.1:9023/b/k - Server returned non-2xx status code: {code}: "
            )
            .into(),
        };
        assert!(!is_transient(&refused("501 Not Implemented")));
        assert!(!is_transient(&refused("400 Bad Request")));
        assert!(is_transient(&refused("503 Service Unavailable")));
    }

    #[test]
    fn an_unknown_option_names_its_key() {
        let url = url::Url::parse("s3://bucket/x.tar").unwrap();
        let opts = StorageOptions {
            options: [("aws_no_such_thing".to_string(), "1".to_string())].into(),
            ..Default::default()
        };
        let err = build_client(&ObjectStoreScheme::AmazonS3, &url, &opts).err().unwrap();
        assert!(err.contains("storage.options.aws_no_such_thing"), "{err}");
    }
}
