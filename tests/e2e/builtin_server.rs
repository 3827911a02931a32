//! A small HTTP/1.1 server on 127.0.0.1 for the built-in task type tests.
//!
//! Routes:
//! - `GET /json`, `/text`, `/binary`, `/large` (100 KB of text): fixed bodies.
//! - `GET /status/<code>`: that status; 503 and 429 carry `Retry-After: 1`.
//! - `GET /slow`: headers after 3 s.
//! - `GET /redirect?to=<url>`: `302 Location: <url>`; `/loop`: redirects to itself.
//! - `GET /headers`: the request's headers as JSON.
//! - `GET /gen/<bytes>[?rate=<bytes per second>]`: generated content (see
//!   [`content`]), streamed in 64 KiB chunks and never held whole, with a
//!   strong `ETag`; honours `Range: bytes=N-` with a matching `If-Range`.
//!   `rate` throttles full (non-range) responses only.
//! - `PUT|POST /upload`: SHA-256 and size of the body, or of the file part
//!   of a `multipart/form-data` body, as JSON, also kept in
//!   [`TestServer::uploads`].
//!
//! Every request is recorded in [`TestServer::seen`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Length of the block generated content repeats: a prime, so chunk
/// boundaries and resume offsets never line up with it.
pub const BLOCK_LEN: usize = 65_521;

/// The generated content's repeating block.
fn block() -> &'static [u8] {
    static BLOCK: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BLOCK.get_or_init(|| {
        let mut x: u32 = 0x9e37_79b9;
        (0..BLOCK_LEN)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect()
    })
}

/// Byte `i` of generated content is `block()[i % BLOCK_LEN]`; this is its
/// part from `start` to `end`, as chunks of at most 64 KiB.
pub fn content(start: u64, end: u64) -> impl Iterator<Item = Bytes> {
    let b = block();
    let mut at = start;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let off = (at % BLOCK_LEN as u64) as usize;
        let n = (BLOCK_LEN - off).min((end - at) as usize).min(64 * 1024);
        at += n as u64;
        Some(Bytes::from_static(&b[off..off + n]))
    })
}

/// SHA-256 (hex) of the first `len` bytes of generated content.
pub fn content_sha256(len: u64) -> String {
    let mut h = Sha256::new();
    for c in content(0, len) {
        h.update(&c);
    }
    hex::encode(h.finalize())
}

/// One request the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
}

/// What the server records.
#[derive(Default)]
pub struct State {
    /// Every request, in order.
    pub seen: Mutex<Vec<Seen>>,
    /// Bytes of generated content sent so far, all responses together.
    pub sent: std::sync::atomic::AtomicU64,
    /// What `/upload` computed for each upload.
    pub uploads: Mutex<Vec<serde_json::Value>>,
}

/// The running server; stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

impl TestServer {
    /// Starts a server on a free port of 127.0.0.1.
    pub async fn start() -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(route(req, addr, &state).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestServer { addr, state, task }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Bytes of generated content sent so far.
    pub fn sent(&self) -> u64 {
        self.state.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What `/upload` computed, in order.
    pub fn uploads(&self) -> Vec<serde_json::Value> {
        self.state.uploads.lock().unwrap().clone()
    }

    /// The requests seen so far whose path starts with `prefix`.
    pub fn seen(&self, prefix: &str) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path.starts_with(prefix))
            .cloned()
            .collect()
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn route(req: Request<Incoming>, addr: SocketAddr, state: &Arc<State>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    state.seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        path: path.clone(),
        headers: headers.clone(),
    });
    let q = query(&req);
    match path.as_str() {
        "/json" => full(
            StatusCode::OK,
            "application/json",
            r#"{"hello":"world","n":[1,2]}"#,
        ),
        "/text" => full(StatusCode::OK, "text/plain; charset=utf-8", "héllo wörld"),
        "/binary" => full(
            StatusCode::OK,
            "application/octet-stream",
            vec![0u8, 159, 146, 150, 255],
        ),
        "/large" => full(StatusCode::OK, "text/plain", "0123456789".repeat(10_000)),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            full(StatusCode::OK, "text/plain", "late")
        }
        "/headers" => full(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec(&headers).unwrap(),
        ),
        "/redirect" => Response::builder()
            .status(StatusCode::FOUND)
            .header("location", q.get("to").cloned().unwrap_or_default())
            .body(Full::new(Bytes::new()).boxed())
            .unwrap(),
        "/loop" => Response::builder()
            .status(StatusCode::FOUND)
            .header("location", format!("http://{addr}/loop"))
            .body(Full::new(Bytes::new()).boxed())
            .unwrap(),
        "/upload" => upload(req, &headers, state).await,
        p if p.starts_with("/status/") => {
            // Read the request body first, as servers such as nginx do, so
            // the client sees the status rather than a reset connection.
            let _ = req.into_body().collect().await;
            let code: u16 = p["/status/".len()..].parse().unwrap_or(500);
            let status = StatusCode::from_u16(code).unwrap();
            let mut r = full(status, "text/plain", format!("status {code} body"));
            if code == 503 || code == 429 {
                r.headers_mut().insert("retry-after", "1".parse().unwrap());
            }
            r
        }
        p if p.starts_with("/gen/") => {
            let len: u64 = p["/gen/".len()..].parse().unwrap_or(0);
            let rate: Option<u64> = q.get("rate").and_then(|r| r.parse().ok());
            generated(&headers, len, rate, state.clone())
        }
        _ => full(StatusCode::NOT_FOUND, "text/plain", "no such route"),
    }
}

/// Generated content of `len` bytes, whole or from a `Range: bytes=N-`.
fn generated(
    headers: &BTreeMap<String, String>,
    len: u64,
    rate: Option<u64>,
    state: Arc<State>,
) -> Response<Body> {
    let etag = format!("\"gen-{len}\"");
    let range_start = headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|_| headers.get("if-range") == Some(&etag));
    let (status, start) = match range_start {
        Some(n) if n < len => (StatusCode::PARTIAL_CONTENT, n),
        Some(_) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header("content-range", format!("bytes */{len}"))
                .body(Full::new(Bytes::new()).boxed())
                .unwrap()
        }
        None => (StatusCode::OK, 0),
    };
    let throttle = if start == 0 { rate } else { None };
    let chunks = futures::stream::iter(content(start, len)).then(move |c| {
        let state = state.clone();
        async move {
            if let Some(r) = throttle {
                let ms = (c.len() as u64 * 1000 / r.max(1)).max(1);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            state
                .sent
                .fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Ok::<_, Infallible>(Frame::data(c))
        }
    });
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/octet-stream")
        .header("content-length", (len - start).to_string())
        .header("accept-ranges", "bytes")
        .header("etag", etag);
    if status == StatusCode::PARTIAL_CONTENT {
        b = b.header("content-range", format!("bytes {start}-{}/{len}", len - 1));
    }
    b.body(BodyExt::boxed(StreamBody::new(chunks))).unwrap()
}

/// Hashes an uploaded body (or its multipart file part) as it arrives.
async fn upload(
    req: Request<Incoming>,
    headers: &BTreeMap<String, String>,
    state: &State,
) -> Response<Body> {
    let ct = headers.get("content-type").cloned().unwrap_or_default();
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"));
    let mut body = req.into_body();
    let mut whole = Vec::new();
    let mut h = Sha256::new();
    let mut n = 0u64;
    let multipart = ct.starts_with("multipart/form-data");
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return full(StatusCode::BAD_REQUEST, "text/plain", "broken body");
        };
        if let Ok(data) = frame.into_data() {
            if multipart {
                whole.extend_from_slice(&data);
            } else {
                h.update(&data);
                n += data.len() as u64;
            }
        }
    }
    let mut field = None;
    let mut filename = None;
    if multipart {
        let boundary = ct.split("boundary=").nth(1).unwrap_or("").trim_matches('"');
        let open = format!("--{boundary}\r\n");
        let close = format!("\r\n--{boundary}--\r\n");
        let Some(rest) = whole.strip_prefix(open.as_bytes()) else {
            return full(StatusCode::BAD_REQUEST, "text/plain", "no opening boundary");
        };
        let Some(head_end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            return full(StatusCode::BAD_REQUEST, "text/plain", "no part headers");
        };
        let part_head = String::from_utf8_lossy(&rest[..head_end]).into_owned();
        let Some(data) = rest[head_end + 4..].strip_suffix(close.as_bytes()) else {
            return full(StatusCode::BAD_REQUEST, "text/plain", "no closing boundary");
        };
        h.update(data);
        n = data.len() as u64;
        let attr = |name: &str| {
            part_head
                .split(&format!("{name}=\""))
                .nth(1)
                .and_then(|s| s.split('"').next())
                .map(str::to_owned)
        };
        field = attr("name");
        filename = attr("filename");
    }
    let computed = json!({
        "sha256": hex::encode(h.finalize()),
        "bytes": n,
        "multipart": multipart,
        "field": field,
        "filename": filename,
        "chunked": chunked,
        "content_length": headers.get("content-length"),
    });
    state.uploads.lock().unwrap().push(computed.clone());
    full(
        StatusCode::CREATED,
        "application/json",
        serde_json::to_vec(&computed).unwrap(),
    )
}
