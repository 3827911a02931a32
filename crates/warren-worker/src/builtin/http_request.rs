//! `http.request {method, url, headers?, body?, timeout_ms?, expect_status?}`
//! → `{status, headers, body, body_encoding, truncated, bytes, elapsed_ms}`.
//!
//! The response body is read up to `http.max_response_bytes` (the rest is
//! not read: `truncated` is true) and returned as JSON when the response
//! says JSON and parses, as text when it is UTF-8, else as base64
//! (`body_encoding` says which). Connection errors, timeouts, 5xx and 429
//! are retryable (a `Retry-After` sets the earliest retry); other 4xx and
//! bad arguments are permanent; `expect_status` turns any other status into
//! a failure of the same classes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::redirects::Request;
use super::{headers_json, redact, request_headers, send, status_error, transport_error, Clients};
use crate::{Handler, TaskContext, TaskError};

/// The `http.request` handler.
pub struct HttpRequest {
    pub(crate) clients: Arc<Clients>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    method: String,
    url: String,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    expect_status: Option<ExpectStatus>,
}

/// One status or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum ExpectStatus {
    One(u16),
    Many(Vec<u16>),
}

impl ExpectStatus {
    fn list(&self) -> Vec<u16> {
        match self {
            ExpectStatus::One(s) => vec![*s],
            ExpectStatus::Many(v) => v.clone(),
        }
    }
}

#[async_trait::async_trait]
impl Handler for HttpRequest {
    async fn handle(&self, ctx: TaskContext) -> Result<Value, TaskError> {
        let args: Args = ctx.args_as()?;
        let out = self.clients.get(&ctx.config)?;
        let method =
            Method::from_bytes(args.method.to_ascii_uppercase().as_bytes()).map_err(|_| {
                TaskError::invalid_args(format!("method {:?} is not an HTTP method", args.method))
            })?;
        let url = out.url(&args.url)?;
        let mut headers = request_headers(&args.headers)?;
        let body = match args.body {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(Bytes::from(s)),
            Some(other) => {
                if !headers.contains_key(CONTENT_TYPE) {
                    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                }
                Some(Bytes::from(other.to_string()))
            }
        };
        let expect = args.expect_status.as_ref().map(ExpectStatus::list);
        if let Some(list) = &expect {
            if list.is_empty() || list.iter().any(|s| !(100..=599).contains(s)) {
                return Err(TaskError::invalid_args(
                    "expect_status must be a status 100..=599 or a non-empty list of them",
                ));
            }
        }
        let timeout_ms = args.timeout_ms.unwrap_or(out.http.timeout_ms);
        if timeout_ms == 0 {
            return Err(TaskError::invalid_args("timeout_ms must be above 0"));
        }
        let started = Instant::now();
        let cap = out.http.max_response_bytes;
        let request = Request {
            method,
            url: url.clone(),
            headers,
            extra: HeaderMap::new(),
            body,
            stream: None,
        };
        let exchange = async {
            let (resp, last_url) = send(&out, request).await?;
            let status = resp.status();
            let resp_headers = resp.headers().clone();
            let (bytes, truncated) = read_capped(resp, cap)
                .await
                .map_err(|e| transport_error(e, &last_url))?;
            Ok::<_, TaskError>((status, resp_headers, bytes, truncated, last_url))
        };
        let (status, resp_headers, bytes, truncated, last_url) =
            tokio::time::timeout(Duration::from_millis(timeout_ms), exchange)
                .await
                .map_err(|_| {
                    TaskError::retryable(
                        "timeout",
                        format!("request to {} took over {timeout_ms} ms", redact(&url)),
                    )
                })??;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        check_status(status, expect.as_deref(), &resp_headers, &last_url, &bytes)?;
        let (body, encoding) = decode_body(&resp_headers, &bytes, truncated);
        Ok(json!({
            "status": status.as_u16(),
            "headers": headers_json(&resp_headers),
            "body": body,
            "body_encoding": encoding,
            "truncated": truncated,
            "bytes": bytes.len(),
            "elapsed_ms": elapsed_ms,
        }))
    }
}

/// Reads at most `cap` bytes of the body; whether more was there.
pub(crate) async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = cap - buf.len();
        if chunk.len() > room {
            buf.extend_from_slice(&chunk[..room]);
            return Ok((buf, true));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf, false))
}

/// Success unless the status says otherwise: with `expect_status`, any
/// status outside the list fails; without it, 4xx and 5xx fail.
fn check_status(
    status: StatusCode,
    expect: Option<&[u16]>,
    headers: &HeaderMap,
    url: &reqwest::Url,
    body: &[u8],
) -> Result<(), TaskError> {
    let ok = match expect {
        Some(list) => list.contains(&status.as_u16()),
        None => !(status.is_client_error() || status.is_server_error()),
    };
    if ok {
        return Ok(());
    }
    let snippet = String::from_utf8_lossy(&body[..body.len().min(200)]);
    let snippet = snippet.trim();
    let mut detail = match expect {
        Some(list) => format!(" (expected {list:?})"),
        None => String::new(),
    };
    if !snippet.is_empty() {
        detail.push_str(": ");
        detail.push_str(snippet);
    }
    Err(status_error(status, headers, url, &detail))
}

/// The body as JSON (when the response says JSON and it parses), text
/// (UTF-8; a cut character at the end is dropped) or base64.
fn decode_body(headers: &HeaderMap, bytes: &[u8], truncated: bool) -> (Value, &'static str) {
    let is_json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| {
            let essence = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            essence == "application/json" || essence.ends_with("+json")
        })
        .unwrap_or(false);
    if is_json && !truncated {
        if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
            return (v, "json");
        }
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => (Value::String(s.to_owned()), "text"),
        // A cut in the middle of a character is still text.
        Err(e) if truncated && e.error_len().is_none() => (
            Value::String(String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned()),
            "text",
        ),
        Err(_) => (
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            "base64",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ct(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn bodies_decode_by_content() {
        let (v, e) = decode_body(&ct("application/json; charset=utf-8"), br#"{"a":1}"#, false);
        assert_eq!((v, e), (json!({"a": 1}), "json"));
        let (v, e) = decode_body(&ct("application/problem+json"), b"[1]", false);
        assert_eq!((v, e), (json!([1]), "json"));
        // Truncated JSON cannot parse: it is returned as text.
        let (v, e) = decode_body(&ct("application/json"), br#"{"a":"#, true);
        assert_eq!((v, e), (json!("{\"a\":"), "text"));
        let (v, e) = decode_body(&ct("text/plain"), "héllo".as_bytes(), false);
        assert_eq!((v, e), (json!("héllo"), "text"));
        let cut = &"hé".as_bytes()[..2];
        assert_eq!(decode_body(&HeaderMap::new(), cut, true).1, "text");
        let (v, e) = decode_body(&HeaderMap::new(), &[0xff, 0x00, 0xfe], false);
        assert_eq!((v, e), (json!("/wD+"), "base64"));
    }

    #[test]
    fn expect_status_decides() {
        let u = reqwest::Url::parse("http://h/").unwrap();
        let h = HeaderMap::new();
        assert!(check_status(StatusCode::OK, None, &h, &u, b"").is_ok());
        assert!(check_status(StatusCode::FOUND, None, &h, &u, b"").is_ok());
        let e = check_status(StatusCode::NOT_FOUND, None, &h, &u, b"gone").unwrap_err();
        assert_eq!((e.code.as_str(), e.is_retryable()), ("http_404", false));
        assert!(check_status(StatusCode::NOT_FOUND, Some(&[404]), &h, &u, b"").is_ok());
        let e = check_status(StatusCode::OK, Some(&[201, 204]), &h, &u, b"").unwrap_err();
        assert_eq!(e.code, "http_200");
        assert_eq!(e.message, "http://h/ answered 200 OK (expected [201, 204])");
        let e = check_status(StatusCode::BAD_GATEWAY, Some(&[200]), &h, &u, b"").unwrap_err();
        assert!(e.is_retryable());
    }
}
