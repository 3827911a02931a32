//! `file.download {url, path, sha256?, max_bytes?, headers?}` →
//! `{path, bytes, sha256, status, resumed_from}`.
//!
//! The body is streamed (never held in memory) into a hidden partial file
//! next to the target, `.<name>.warren-<id>.part`, whose name depends only on
//! the task id and path, so a retry of the same task finds it. When the
//! transfer is complete, its size and `sha256` are checked, the file is
//! fsynced and only then renamed over the target (and the directory
//! fsynced): the target path never shows a partial file.
//!
//! A retry resumes: when the partial file exists and the server gave a
//! validator (`ETag` or `Last-Modified`) for it, the next attempt asks for
//! the rest with `Range` and `If-Range`; a server that ignores the range or
//! whose resource changed answers with the whole body, which replaces the
//! partial file. A permanent failure (size or checksum wrong, HTTP 4xx)
//! deletes the partial file.

use std::collections::BTreeMap;
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{
    HeaderMap, HeaderValue, CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE,
};
use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::redirects::Request;
use super::{
    error_snippet, paths, redact, request_headers, send, status_error, transport_error, Clients,
    Outbound,
};
use crate::{Handler, TaskContext, TaskError};

/// Bytes handed to the writer thread at once (and started to disk).
const WRITE_BUFFER: usize = 1 << 20;

/// Blocks of about [`WRITE_BUFFER`] bytes waiting for the writer thread, at most.
const WRITE_AHEAD: usize = 4;

/// The `file.download` handler.
pub struct FileDownload {
    pub(crate) clients: Arc<Clients>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    url: String,
    path: String,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    max_bytes: Option<u64>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
}

/// What a resumable partial file was downloaded from, kept beside it.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct PartialMeta {
    /// SHA-256 of the URL (the URL itself may hold credentials).
    url_sha256: String,
    /// The validator sent back as `If-Range`: the `ETag`, else `Last-Modified`.
    validator: String,
}

/// One download in progress.
struct Download<'a> {
    out: &'a Outbound,
    ctx: &'a TaskContext,
    url: Url,
    headers: HeaderMap,
    limit: u64,
    part: PathBuf,
    meta: PathBuf,
    url_sha256: String,
}

/// What one request round ended with.
enum Round {
    Done {
        bytes: u64,
        sha256: String,
        status: u16,
        resumed_from: u64,
    },
    /// The server refused the range (416): start again from zero.
    RangeRefused,
}

#[async_trait::async_trait]
impl Handler for FileDownload {
    async fn handle(&self, ctx: TaskContext) -> Result<Value, TaskError> {
        let args: Args = ctx.args_as()?;
        let out = self.clients.get(&ctx.config)?;
        let url = out.url(&args.url)?;
        let headers = request_headers(&args.headers)?;
        let expected = args.sha256.as_deref().map(parse_sha256).transpose()?;
        let limit = args
            .max_bytes
            .map_or(out.http.max_file_bytes, |m| m.min(out.http.max_file_bytes));
        let target = paths::writable_file(&ctx.data_dir, &args.path).await?;
        let part = partial_path(&target, &ctx.id, &args.path);
        let meta = PathBuf::from(format!("{}.meta", part.display()));
        let dl = Download {
            out: &out,
            ctx: &ctx,
            url_sha256: hex::encode(Sha256::digest(url.as_str().as_bytes())),
            url,
            headers,
            limit,
            part,
            meta,
        };
        let mut round = dl.round().await;
        if matches!(round, Ok(Round::RangeRefused)) {
            dl.discard().await;
            round = dl.round().await;
        }
        let (bytes, sha256, status, resumed_from) = match round {
            Ok(Round::Done {
                bytes,
                sha256,
                status,
                resumed_from,
            }) => (bytes, sha256, status, resumed_from),
            Ok(Round::RangeRefused) => {
                dl.discard().await;
                return Err(TaskError::retryable(
                    "range",
                    format!("{} refused a request from byte 0", redact(&dl.url)),
                ));
            }
            Err(e) => {
                if !e.is_retryable() {
                    dl.discard().await;
                }
                return Err(e);
            }
        };
        if let Some(want) = expected {
            if want != sha256 {
                dl.discard().await;
                return Err(TaskError::permanent(
                    "sha256_mismatch",
                    format!(
                        "{} gave {bytes} bytes with sha256 {sha256}, expected {want}; \
                         nothing was written to {:?}",
                        redact(&dl.url),
                        args.path
                    ),
                ));
            }
        }
        tokio::fs::rename(&dl.part, &target).await.map_err(|e| {
            TaskError::retryable(
                "io",
                format!("cannot move the download to {:?}: {e}", args.path),
            )
        })?;
        let _ = tokio::fs::remove_file(&dl.meta).await;
        sync_dir(target.parent().unwrap_or(Path::new("."))).await;
        Ok(json!({
            "path": args.path,
            "bytes": bytes,
            "sha256": sha256,
            "status": status,
            "resumed_from": resumed_from,
        }))
    }
}

impl Download<'_> {
    /// Deletes the partial file and its metadata.
    async fn discard(&self) {
        let _ = tokio::fs::remove_file(&self.part).await;
        let _ = tokio::fs::remove_file(&self.meta).await;
    }

    /// Bytes of the partial file that a range request may continue, with
    /// the validator to send; a partial file that cannot be continued is
    /// deleted.
    async fn resumable(&self) -> Option<(u64, String)> {
        let meta: Option<PartialMeta> = tokio::fs::read(&self.meta)
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let len = tokio::fs::metadata(&self.part).await.ok().map(|m| m.len());
        match (meta, len) {
            (Some(m), Some(len))
                if m.url_sha256 == self.url_sha256 && len > 0 && len <= self.limit =>
            {
                Some((len, m.validator))
            }
            (None, None) => None,
            _ => {
                self.discard().await;
                None
            }
        }
    }

    /// One request: resumes from the partial file when it can, streams the
    /// body into it, and syncs it.
    async fn round(&self) -> Result<Round, TaskError> {
        let http = &self.out.http;
        let resume = self.resumable().await;
        let mut extra = HeaderMap::new();
        if let Some((offset, validator)) = &resume {
            extra.insert(RANGE, header(&format!("bytes={offset}-"))?);
            extra.insert(IF_RANGE, header(validator)?);
        }
        let request = Request {
            method: Method::GET,
            url: self.url.clone(),
            headers: self.headers.clone(),
            extra,
            body: None,
            stream: None,
        };
        let idle = Duration::from_millis(http.timeout_ms);
        let (resp, last_url) = tokio::select! {
            r = tokio::time::timeout(idle, send(self.out, request)) => r.map_err(|_| {
                TaskError::retryable(
                    "timeout",
                    format!("{} sent no response within {} ms", redact(&self.url), http.timeout_ms),
                )
            })??,
            _ = self.ctx.cancel.cancelled() => return Err(aborted()),
        };
        let status = resp.status();
        let offset = resume.as_ref().map_or(0, |r| r.0);
        let start = match status {
            StatusCode::PARTIAL_CONTENT
                if offset > 0 && range_start(resp.headers()) == Some(offset) =>
            {
                offset
            }
            StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => return Ok(Round::RangeRefused),
            StatusCode::PARTIAL_CONTENT => return Ok(Round::RangeRefused),
            s if s.is_success() => 0,
            _ => {
                let headers = resp.headers().clone();
                let detail = error_snippet(resp).await;
                return Err(status_error(status, &headers, &last_url, &detail));
            }
        };
        let total = resp.content_length().map(|n| n + start);
        if let Some(t) = total.filter(|&t| t > self.limit) {
            return Err(too_large(&self.url, t, self.limit));
        }
        let (file, hasher) = if start > 0 {
            self.reopen(start).await?
        } else {
            self.write_meta(resp.headers()).await;
            let f = tokio::fs::File::create(&self.part)
                .await
                .map_err(io("create"))?;
            (f, Sha256::new())
        };
        let mut sink = Sink::start(file.into_std().await, hasher);
        let mut written = start;
        let mut resp = resp;
        self.ctx.progress.report(written, total);
        let ended = loop {
            let chunk = tokio::select! {
                c = tokio::time::timeout(idle, resp.chunk()) => c,
                _ = self.ctx.cancel.cancelled() => return Err(aborted()),
            };
            let chunk = match chunk {
                Ok(Ok(Some(c))) => c,
                Ok(Ok(None)) => break Ended::Complete,
                Ok(Err(e)) => break Ended::Failed(transport_error(e, &last_url)),
                Err(_) => {
                    break Ended::Failed(TaskError::retryable(
                        "timeout",
                        format!(
                            "{} sent no data for {} ms after {written} bytes",
                            redact(&self.url),
                            http.timeout_ms
                        ),
                    ))
                }
            };
            if written + chunk.len() as u64 > self.limit {
                return Err(too_large(
                    &self.url,
                    written + chunk.len() as u64,
                    self.limit,
                ));
            }
            let len = chunk.len() as u64;
            if sink.push(chunk).await.is_err() {
                break Ended::WriterStopped;
            }
            written += len;
            self.ctx.progress.report(written, total);
        };
        // Whatever arrived is written out, so a retry can resume after it.
        let finished = sink.finish().await;
        let (file, hasher) = match (ended, finished) {
            (Ended::Failed(e), _) => return Err(e),
            (_, Err(e)) => return Err(io("write")(e)),
            (Ended::WriterStopped, Ok(_)) => {
                return Err(TaskError::retryable("io", "the download writer stopped"))
            }
            (Ended::Complete, Ok(x)) => x,
        };
        tokio::fs::File::from_std(file)
            .sync_all()
            .await
            .map_err(io("sync"))?;
        if let Some(t) = total.filter(|&t| t != written) {
            return Err(TaskError::retryable(
                "incomplete",
                format!("{} ended after {written} of {t} bytes", redact(&self.url)),
            ));
        }
        Ok(Round::Done {
            bytes: written,
            sha256: hex::encode(hasher.finalize()),
            status: status.as_u16(),
            resumed_from: start,
        })
    }

    /// Opens the partial file to append after `start` bytes, hashing them.
    async fn reopen(&self, start: u64) -> Result<(tokio::fs::File, Sha256), TaskError> {
        let mut f = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.part)
            .await
            .map_err(io("open"))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = start;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = f.read(&mut buf[..want]).await.map_err(io("read"))?;
            if n == 0 {
                return Err(TaskError::retryable("io", "the partial file shrank"));
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        f.set_len(start).await.map_err(io("truncate"))?;
        Ok((f, hasher))
    }

    /// Records what a later attempt needs to resume; without a validator
    /// there is nothing to record and no resume.
    async fn write_meta(&self, headers: &HeaderMap) {
        let validator = headers
            .get(ETAG)
            .filter(|v| !v.as_bytes().starts_with(b"W/"))
            .or_else(|| headers.get(LAST_MODIFIED))
            .and_then(|v| v.to_str().ok());
        match validator {
            Some(v) => {
                let meta = PartialMeta {
                    url_sha256: self.url_sha256.clone(),
                    validator: v.to_owned(),
                };
                let body = serde_json::to_vec(&meta).expect("metadata serializes");
                let _ = tokio::fs::write(&self.meta, body).await;
            }
            None => {
                let _ = tokio::fs::remove_file(&self.meta).await;
            }
        }
    }
}

/// How the receiving loop of a download ended.
enum Ended {
    /// The body ended.
    Complete,
    /// The transfer failed.
    Failed(TaskError),
    /// The writer thread stopped (its error comes from [`Sink::finish`]).
    WriterStopped,
}

/// Writes and hashes a download on a blocking thread, so receiving,
/// hashing and writing overlap; at most [`WRITE_AHEAD`] blocks wait for it,
/// which bounds the memory a transfer takes.
struct Sink {
    /// Chunks as they arrived (not copied), until they make a block.
    pending: Vec<Bytes>,
    pending_len: usize,
    tx: tokio::sync::mpsc::Sender<Vec<Bytes>>,
    writer: tokio::task::JoinHandle<std::io::Result<(std::fs::File, Sha256)>>,
}

impl Sink {
    fn start(file: std::fs::File, hasher: Sha256) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(WRITE_AHEAD);
        let writer = tokio::task::spawn_blocking(move || {
            let (mut file, mut hasher) = (file, hasher);
            let mut offset = file.stream_position()?;
            while let Some(block) = rx.blocking_recv() {
                let len: usize = block.iter().map(Bytes::len).sum();
                for chunk in &block {
                    file.write_all(chunk)?;
                    hasher.update(chunk);
                }
                start_writeback(&file, offset, len);
                offset += len as u64;
            }
            Ok((file, hasher))
        });
        Sink {
            pending: Vec::new(),
            pending_len: 0,
            tx,
            writer,
        }
    }

    /// Queues bytes; a full block goes to the writer. `Err` when the writer
    /// has stopped (see [`Sink::finish`] for why).
    async fn push(&mut self, chunk: Bytes) -> Result<(), ()> {
        self.pending_len += chunk.len();
        self.pending.push(chunk);
        if self.pending_len >= WRITE_BUFFER {
            self.pending_len = 0;
            let block = std::mem::take(&mut self.pending);
            self.tx.send(block).await.map_err(|_| ())?;
        }
        Ok(())
    }

    /// Writes what is pending and stops the writer: the file and the hash
    /// of everything in it, or the write error.
    async fn finish(mut self) -> std::io::Result<(std::fs::File, Sha256)> {
        if !self.pending.is_empty() {
            let _ = self.tx.send(std::mem::take(&mut self.pending)).await;
        }
        drop(self.tx);
        self.writer.await.map_err(std::io::Error::other)?
    }
}

/// Asks the kernel to start writing a block to disk now, without waiting,
/// so the fsync before the rename finds little left to write (Linux; a
/// no-op elsewhere).
#[allow(unsafe_code)] // the workspace's one exception: see the SAFETY note
fn start_writeback(file: &std::fs::File, offset: u64, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: the descriptor is open for the duration of the call and
        // sync_file_range reads no memory of ours; a failure only means the
        // final fsync does all the work.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// `.<name>.warren-<hash of task id and path>.part`, next to the target.
fn partial_path(target: &Path, task_id: &str, rel: &str) -> PathBuf {
    let digest = hex::encode(Sha256::digest(format!("{task_id}\n{rel}").as_bytes()));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut short: String = String::new();
    for c in name.chars() {
        if short.len() + c.len_utf8() > 180 {
            break;
        }
        short.push(c);
    }
    target.with_file_name(format!(".{short}.warren-{}.part", &digest[..16]))
}

/// The first byte of a `Content-Range: bytes a-b/n` answer.
fn range_start(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    let range = v.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

fn parse_sha256(s: &str) -> Result<String, TaskError> {
    let lower = s.trim().to_ascii_lowercase();
    if lower.len() == 64 && lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(lower)
    } else {
        Err(TaskError::invalid_args(format!(
            "sha256 {s:?} is not 64 hexadecimal digits"
        )))
    }
}

fn header(v: &str) -> Result<HeaderValue, TaskError> {
    HeaderValue::from_str(v)
        .map_err(|_| TaskError::retryable("range", "unusable validator for a range request"))
}

fn too_large(url: &Url, bytes: u64, limit: u64) -> TaskError {
    TaskError::permanent(
        "too_large",
        format!(
            "{} is larger than the limit of {limit} bytes ({bytes} or more; max_bytes or \
             http.max_file_bytes)",
            redact(url)
        ),
    )
}

fn aborted() -> TaskError {
    TaskError::retryable("aborted", "download was aborted")
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> TaskError {
    move |e| TaskError::retryable("io", format!("cannot {what} the partial file: {e}"))
}

/// Makes a rename in `dir` durable; a failure only loses durability.
async fn sync_dir(dir: &Path) {
    let dir = dir.to_owned();
    let _ = tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_names_are_hidden_deterministic_and_short() {
        let t = Path::new("/d/sub/file.bin");
        let a = partial_path(t, "task-1", "sub/file.bin");
        assert_eq!(a, partial_path(t, "task-1", "sub/file.bin"));
        assert_ne!(a, partial_path(t, "task-2", "sub/file.bin"));
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(".file.bin.warren-") && name.ends_with(".part"),
            "{name}"
        );
        let long = Path::new("/d").join("é".repeat(120));
        let n = partial_path(&long, "t", "x");
        assert!(n.file_name().unwrap().len() < 255);
    }

    #[test]
    fn content_range_and_sha_args() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_RANGE, HeaderValue::from_static("bytes 100-199/200"));
        assert_eq!(range_start(&h), Some(100));
        assert_eq!(parse_sha256(&"AB".repeat(32)).unwrap(), "ab".repeat(32));
        assert_eq!(parse_sha256("abc").unwrap_err().code, "invalid_args");
    }
}
