//! `file.upload {path, url, method?, field?, headers?, checksum?}` →
//! `{status, bytes, sha256, elapsed_ms}` (`sha256` null with `checksum: false`).
//!
//! The file is streamed from the data directory (never held in memory) with
//! its `Content-Length`: as the raw body (`PUT` by default), or, when
//! `field` is given, as that field of a `multipart/form-data` body (`POST`
//! by default). The checksum is of the bytes sent. A streamed body cannot be
//! sent twice, so redirects are not followed: a 3xx answer is a failure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{stream, Stream, StreamExt};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::Read;

use super::redirects::Request;
use super::{error_snippet, paths, redact, request_headers, send, status_error, Clients};
use crate::{Handler, Progress, TaskContext, TaskError};

/// Size of each read from the file.
const READ_CHUNK: usize = 1 << 20;

/// Chunks read ahead of the network, at most.
const READ_AHEAD: usize = 4;

/// The `file.upload` handler.
pub struct FileUpload {
    pub(crate) clients: Arc<Clients>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    path: String,
    url: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    /// Whether to compute the sha256 of the bytes sent (default true). On a
    /// fast network the hash, one core's work, is what limits an upload.
    #[serde(default = "yes")]
    checksum: bool,
}

fn yes() -> bool {
    true
}

/// What the body stream saw, read once the response is in.
struct Sent {
    /// `None` when no checksum was asked for.
    hasher: Option<Sha256>,
    bytes: u64,
}

#[async_trait::async_trait]
impl Handler for FileUpload {
    async fn handle(&self, ctx: TaskContext) -> Result<Value, TaskError> {
        let args: Args = ctx.args_as()?;
        let out = self.clients.get(&ctx.config)?;
        let method = match args
            .method
            .as_deref()
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            None if args.field.is_some() => Method::POST,
            None | Some("PUT") => Method::PUT,
            Some("POST") => Method::POST,
            Some(other) => {
                return Err(TaskError::invalid_args(format!(
                    "method {other:?} must be PUT or POST"
                )))
            }
        };
        if let Some(f) = &args.field {
            if f.is_empty() || f.chars().any(|c| c.is_control() || c == '"') {
                return Err(TaskError::invalid_args(format!(
                    "field {f:?} must be a non-empty name without quotes or control characters"
                )));
            }
        }
        let url = out.url(&args.url)?;
        let mut headers = request_headers(&args.headers)?;
        let file_path = paths::existing_file(&ctx.data_dir, &args.path).await?;
        let file = tokio::fs::File::open(&file_path)
            .await
            .map_err(|e| TaskError::retryable("io", format!("cannot open {:?}: {e}", args.path)))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| TaskError::retryable("io", format!("cannot stat {:?}: {e}", args.path)))?
            .len();
        if size > out.http.max_file_bytes {
            return Err(TaskError::permanent(
                "too_large",
                format!(
                    "{:?} has {size} bytes, above http.max_file_bytes = {}",
                    args.path, out.http.max_file_bytes
                ),
            ));
        }
        let (content, hashed) = file_stream(
            file.into_std().await,
            size,
            args.checksum,
            ctx.progress.clone(),
        );
        let mut extra = HeaderMap::new();
        let (body, length) = match &args.field {
            None => (reqwest::Body::wrap_stream(content), size),
            Some(field) => {
                let boundary = format!("warren-{}", uuid::Uuid::new_v4().simple());
                let name = file_path
                    .file_name()
                    .map(|n| n.to_string_lossy().replace(['"', '\r', '\n'], "_"))
                    .unwrap_or_else(|| "file".into());
                let head = Bytes::from(format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; \
                     filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                ));
                let tail = Bytes::from(format!("\r\n--{boundary}--\r\n"));
                let length = head.len() as u64 + size + tail.len() as u64;
                let whole = stream::once(async move { Ok(head) })
                    .chain(content)
                    .chain(stream::once(async move { Ok(tail) }));
                headers.remove(CONTENT_TYPE);
                extra.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_str(&format!("multipart/form-data; boundary={boundary}"))
                        .expect("boundary is ASCII"),
                );
                (reqwest::Body::wrap_stream(whole), length)
            }
        };
        headers.remove(CONTENT_LENGTH);
        extra.insert(CONTENT_LENGTH, HeaderValue::from(length));
        let started = Instant::now();
        let request = Request {
            method,
            url: url.clone(),
            headers,
            extra,
            body: None,
            stream: Some(body),
        };
        let (resp, last_url) = tokio::select! {
            r = send(&out, request) => r?,
            _ = ctx.cancel.cancelled() => {
                return Err(TaskError::retryable("aborted", "upload was aborted"));
            }
        };
        let status = resp.status();
        if !status.is_success() {
            let headers = resp.headers().clone();
            let detail = error_snippet(resp).await;
            return Err(status_error(status, &headers, &last_url, &detail));
        }
        // Let the server finish its answer, briefly: the outcome is known.
        let _ = tokio::time::timeout(Duration::from_secs(5), resp.bytes()).await;
        // The request is over, so its body stream is gone and the reading
        // has stopped: the hash covers exactly what was read.
        let sent = tokio::time::timeout(Duration::from_secs(30), hashed)
            .await
            .map_err(|_| TaskError::retryable("io", "hashing the upload did not finish"))?
            .map_err(|e| TaskError::retryable("io", format!("hashing the upload failed: {e}")))?;
        let (bytes, sha256) = (sent.bytes, sent.hasher.map(|h| hex::encode(h.finalize())));
        if bytes != size {
            return Err(TaskError::retryable(
                "incomplete",
                format!(
                    "sent {bytes} of {size} bytes of {:?} to {} (did the file change?)",
                    args.path,
                    redact(&url)
                ),
            ));
        }
        Ok(json!({
            "status": status.as_u16(),
            "bytes": bytes,
            "sha256": sha256,
            "elapsed_ms": started.elapsed().as_millis() as u64,
        }))
    }
}

/// The file's bytes in chunks, exactly `size` of them (the length
/// announced) or an error, and the hash of what was read, ready when the
/// reading stopped.
///
/// A blocking thread reads at most [`READ_AHEAD`] chunks ahead of the
/// network and hands each chunk (shared, not copied) to a second thread that
/// hashes it, so reading, hashing and sending overlap while memory stays
/// bounded. Dropping the stream (the request ended) stops both threads.
fn file_stream(
    file: std::fs::File,
    size: u64,
    checksum: bool,
    progress: Progress,
) -> (
    impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    tokio::task::JoinHandle<Sent>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(READ_AHEAD);
    let (hash_tx, mut hash_rx) = tokio::sync::mpsc::channel::<Bytes>(READ_AHEAD);
    let hashed = tokio::task::spawn_blocking(move || {
        let mut sent = Sent {
            hasher: checksum.then(Sha256::new),
            bytes: 0,
        };
        while let Some(chunk) = hash_rx.blocking_recv() {
            if let Some(h) = &mut sent.hasher {
                h.update(&chunk);
            }
            sent.bytes += chunk.len() as u64;
        }
        sent
    });
    tokio::task::spawn_blocking(move || {
        let mut file = file;
        let mut done = 0u64;
        while done < size {
            let want = READ_CHUNK.min(usize::try_from(size - done).unwrap_or(READ_CHUNK));
            let mut buf = Vec::with_capacity(want);
            let item = match (&mut file).take(want as u64).read_to_end(&mut buf) {
                Ok(0) => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the file shrank to {done} bytes while being sent"),
                )),
                Ok(n) => {
                    done += n as u64;
                    progress.report(done, Some(size));
                    let chunk = Bytes::from(buf);
                    if hash_tx.blocking_send(chunk.clone()).is_err() {
                        return;
                    }
                    Ok(chunk)
                }
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    let chunks = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (chunks, hashed)
}
