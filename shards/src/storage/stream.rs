//! A remote object as a `Read`: streamed, bounded, retried, resumed.
//!
//! A task on the storage runtime GETs the object and passes its bytes to the
//! reader in chunks over a bounded channel, so an open shard holds at most
//! `storage.read_ahead_mib` (plus a chunk) in memory, whatever its size, and
//! the network runs ahead of the reader by that much. When the request fails
//! or the body stops early (connection reset, 5xx, timeout, a server
//! restarted), the task waits and GETs again from the byte it had reached
//! (`Range: bytes=N-`, with `If-Match` on the first answer's ETag, so a
//! changed object is an error rather than a spliced stream): no byte is
//! passed twice or skipped. After `storage.retries` failures in a row without
//! progress the reader gets an error naming the URL and the offset.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use object_store::{GetOptions, GetRange, ObjectStore};
use tokio::sync::mpsc;

use super::remote::{backoff, is_transient, runtime, to_io, Remote};
use super::StorageOptions;

/// Bytes per message from the download task to the reader.
pub const CHUNK_BYTES: usize = 64 << 10;

/// A remote object being read from its start.
pub struct RemoteStream {
    chunks: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    /// An error ends the stream: later reads repeat it.
    failed: Option<(io::ErrorKind, String)>,
    /// The task sent its end-of-object marker (an empty chunk): a channel that
    /// closes without it (the task panicked or was cancelled) is an error, not
    /// an end of file a tar could take for the end of the shard.
    ended: bool,
    task: tokio::task::JoinHandle<()>,
    retries: Arc<AtomicU32>,
}

impl RemoteStream {
    /// Start streaming `remote` (the request goes out now; its errors,
    /// a missing object included, come with the first reads).
    pub fn open(remote: Remote, opts: &StorageOptions) -> RemoteStream {
        let capacity = (opts.read_ahead_bytes() / CHUNK_BYTES).max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let retries = Arc::new(AtomicU32::new(0));
        let task = runtime().spawn(download(remote, opts.clone(), tx, retries.clone()));
        RemoteStream {
            chunks: rx,
            current: Bytes::new(),
            failed: None,
            ended: false,
            task,
            retries,
        }
    }

    /// The retries this stream has taken so far (shared: it keeps counting).
    pub fn retries(&self) -> Arc<AtomicU32> {
        self.retries.clone()
    }
}

impl Drop for RemoteStream {
    fn drop(&mut self) {
        // A shard closed early (an error under `fail`, the end of a run) stops its download.
        self.task.abort();
    }
}

impl Read for RemoteStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some((kind, message)) = &self.failed {
            return Err(io::Error::new(*kind, message.clone()));
        }
        while self.current.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) if chunk.is_empty() => self.ended = true,
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => {
                    self.failed = Some((e.kind(), e.to_string()));
                    return Err(e);
                }
                None => {
                    let e = io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the download stopped before the end of the object",
                    );
                    self.failed = Some((e.kind(), e.to_string()));
                    return Err(e);
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// What one GET ended with.
enum Outcome {
    /// Every byte of the object was received.
    Done,
    /// The reader went away.
    Closed,
    /// It may work again: the error, to log and report.
    Transient(String),
    /// It will not: the error for the reader.
    Final(io::Error),
}

/// GET `remote` into `tx`, resuming after transient failures.
async fn download(remote: Remote, opts: StorageOptions, tx: mpsc::Sender<io::Result<Bytes>>, retries: Arc<AtomicU32>) {
    let mut offset = 0u64;
    let mut size: Option<u64> = None;
    let mut etag: Option<String> = None;
    let mut pending = BytesMut::with_capacity(CHUNK_BYTES);
    let mut failures = 0u32;
    loop {
        let before = offset;
        let outcome = get_from(&remote, &tx, &mut offset, &mut size, &mut etag, &mut pending).await;
        let error = match outcome {
            Outcome::Done => {
                if !pending.is_empty() && tx.send(Ok(pending.split().freeze())).await.is_err() {
                    return;
                }
                // The end-of-object marker: the only empty chunk ever sent.
                let _ = tx.send(Ok(Bytes::new())).await;
                return;
            }
            Outcome::Closed => return,
            Outcome::Final(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Outcome::Transient(e) => e,
        };
        if offset > before {
            failures = 0;
        }
        failures += 1;
        if failures > opts.retries {
            let of = size.map_or(String::new(), |s| format!(" of {s}"));
            let message = format!("gave up at byte {offset}{of} after {} retries: {error}", opts.retries);
            let _ = tx.send(Err(io::Error::new(io::ErrorKind::TimedOut, message))).await;
            return;
        }
        retries.fetch_add(1, Ordering::Relaxed);
        let wait = backoff(&opts, failures);
        tracing::warn!(
            "{}: read interrupted at byte {offset} ({error}); retry {failures}/{} in {} ms, resuming there",
            remote.url,
            opts.retries,
            wait.as_millis()
        );
        tokio::time::sleep(wait).await;
    }
}

/// One GET from `offset` on: bytes go to `pending` and, a chunk at a time, to `tx`.
async fn get_from(
    remote: &Remote,
    tx: &mpsc::Sender<io::Result<Bytes>>,
    offset: &mut u64,
    size: &mut Option<u64>,
    etag: &mut Option<String>,
    pending: &mut BytesMut,
) -> Outcome {
    let mut options = GetOptions::default();
    if *offset > 0 {
        if size.is_some_and(|s| *offset >= s) {
            return Outcome::Done;
        }
        options.range = Some(GetRange::Offset(*offset));
        // A weak ETag (`W/"..."`, nginx with gzip) fails If-Match's strong
        // comparison on every server: such a resume is checked below instead.
        options.if_match = etag.clone().filter(|t| !t.starts_with("W/"));
    } else {
        // Nothing was passed on yet: a new version of the object may start over.
        *size = None;
        *etag = None;
    }
    let result = match remote.store.get_opts(&remote.key, options).await {
        Ok(result) => result,
        Err(e) if is_transient(&e) => return Outcome::Transient(e.to_string()),
        Err(e @ object_store::Error::Precondition { .. }) => {
            return Outcome::Final(io::Error::other(format!(
                "the object changed while it was read (at byte {offset}): {e}"
            )))
        }
        Err(e) => return Outcome::Final(to_io(e)),
    };
    if result.range.start != *offset {
        return Outcome::Final(io::Error::other(format!(
            "asked for bytes from {offset}, the server sent from {}",
            result.range.start
        )));
    }
    // A server may ignore If-Match (or have no strong ETag to match): the object
    // must still be the one the first answer described.
    let changed = size.is_some_and(|s| s != result.meta.size)
        || (etag.is_some() && result.meta.e_tag.is_some() && *etag != result.meta.e_tag);
    if *offset > 0 && changed {
        return Outcome::Final(io::Error::other(format!(
            "the object changed while it was read (at byte {offset}): size {} / ETag {:?}, first {} / {:?}",
            result.meta.size,
            result.meta.e_tag,
            size.unwrap_or_default(),
            etag
        )));
    }
    size.get_or_insert(result.meta.size);
    if etag.is_none() {
        *etag = result.meta.e_tag.clone();
    }
    let mut body = result.into_stream();
    while let Some(piece) = body.next().await {
        let piece = match piece {
            Ok(piece) => piece,
            Err(e) => return Outcome::Transient(e.to_string()),
        };
        *offset += piece.len() as u64;
        pending.extend_from_slice(&piece);
        while pending.len() >= CHUNK_BYTES {
            let chunk = pending.split_to(CHUNK_BYTES).freeze();
            if tx.send(Ok(chunk)).await.is_err() {
                return Outcome::Closed;
            }
        }
    }
    match *size {
        Some(s) if *offset < s => Outcome::Transient(format!("the body ended at byte {offset} of {s}")),
        _ => Outcome::Done,
    }
}

// Streaming against a real server (resume after a restart, a server that
// stays down, a missing object) is tested end to end in tests/storage.rs,
// with the S3 server of examples/s3_server.rs.
