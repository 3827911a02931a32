//! The built-in network task types (contract section 6):
//!
//! - `http.request` ([`http_request`]): one HTTP request, its response as
//!   the result.
//! - `file.download` ([`download`]): a URL streamed into the data directory,
//!   atomically, verified, resumable.
//! - `file.upload` ([`upload`]): a file of the data directory streamed to a
//!   URL, raw or as multipart.
//!
//! Every request goes through [`Outbound`]: one HTTP client per worker
//! configuration whose resolver and redirect handling enforce the `[http]`
//! rules ([`policy`]). Paths go through [`paths`].

pub mod download;
pub mod http_request;
pub mod paths;
pub mod policy;
pub(crate) mod redirects;
pub mod upload;

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde_json::{Map, Value};
use warren_core::config::HttpConfig;
use warren_core::Config;

use crate::{Registry, TaskError};
use policy::{Denied, GuardedResolver, Policy};

pub(crate) use redirects::send;

/// Longest `Retry-After` honoured: a server asking for more is retried
/// after a day all the same.
const MAX_RETRY_AFTER_MS: u64 = 24 * 3600 * 1000;

/// Registers `http.request`, `file.download` and `file.upload`; they share
/// one HTTP client (and its connection pool) per configuration.
pub fn register(r: &mut Registry) {
    let clients = Arc::new(Clients::default());
    r.register(
        "http.request",
        http_request::HttpRequest {
            clients: clients.clone(),
        },
    );
    r.register(
        "file.download",
        download::FileDownload {
            clients: clients.clone(),
        },
    );
    r.register("file.upload", upload::FileUpload { clients });
}

/// The outbound side of one worker configuration: the rules and a client
/// that cannot break them.
pub struct Outbound {
    /// The `[http]` section the client was built from.
    pub http: HttpConfig,
    /// The allow/deny rules.
    pub policy: Arc<Policy>,
    /// A client that follows no redirects itself ([`send`] does, checking
    /// each hop), uses no proxy, and resolves names through the policy.
    pub client: reqwest::Client,
}

impl Outbound {
    /// Builds the client for `config`.
    pub fn new(config: &Config) -> Result<Self, TaskError> {
        Self::with_policy(config, Policy::new(&config.http))
    }

    /// Builds a client for `config` that enforces `policy` (the `[http]`
    /// rules with a webhook's endpoint allowed).
    pub fn with_policy(config: &Config, policy: Policy) -> Result<Self, TaskError> {
        let policy = Arc::new(policy);
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver {
                policy: policy.clone(),
            }))
            .connect_timeout(Duration::from_millis(config.http.connect_timeout_ms))
            .user_agent(concat!("warren/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                TaskError::retryable("client", format!("cannot build HTTP client: {e}"))
            })?;
        Ok(Outbound {
            http: config.http.clone(),
            policy,
            client,
        })
    }

    /// Parses and checks a task's URL.
    pub fn url(&self, raw: &str) -> Result<Url, TaskError> {
        let url = Url::parse(raw).map_err(|e| {
            TaskError::invalid_args(format!("url {:?} is not a URL: {e}", redact_str(raw)))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(TaskError::invalid_args(format!(
                "url {} has scheme {:?}: use http or https",
                redact(&url),
                url.scheme()
            )));
        }
        self.policy.check_url(&url).map_err(denied)?;
        Ok(url)
    }
}

/// The [`Outbound`] of the configuration a task runs under, built once and
/// shared by the built-in handlers.
#[derive(Default)]
pub struct Clients {
    current: Mutex<Option<(Arc<Config>, Arc<Outbound>)>>,
}

impl Clients {
    /// The outbound side for `config`, reusing the last one built for the
    /// same configuration.
    pub fn get(&self, config: &Arc<Config>) -> Result<Arc<Outbound>, TaskError> {
        let mut current = self.current.lock().expect("lock poisoned");
        if let Some((c, o)) = current.as_ref() {
            if Arc::ptr_eq(c, config) || **c == **config {
                return Ok(o.clone());
            }
        }
        let o = Arc::new(Outbound::new(config)?);
        *current = Some((config.clone(), o.clone()));
        Ok(o)
    }
}

/// A refused destination: a permanent failure with code `denied`.
pub fn denied(d: Denied) -> TaskError {
    TaskError::permanent("denied", d.0)
}

/// A URL fit for logs and events: no user name or password, no query
/// (which often carries tokens), no fragment.
pub fn redact(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let had_query = u.query().is_some();
    u.set_query(None);
    u.set_fragment(None);
    let mut s = u.to_string();
    if had_query {
        s.push_str("?…");
    }
    s
}

/// [`redact`] for text that may not parse as a URL: text holding an `@`
/// (which may be credentials) is not shown at all, other text up to any
/// query or fragment.
pub fn redact_str(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(u) => redact(&u),
        Err(_) if raw.contains('@') => format!("<{} characters, not shown>", raw.chars().count()),
        Err(_) => {
            let cut = raw.find(['?', '#']).unwrap_or(raw.len());
            let mut s: String = raw[..cut].chars().take(200).collect();
            if cut < raw.len() {
                s.push('…');
            }
            s
        }
    }
}

/// Turns a transport error into a task failure: refused destinations are
/// permanent (`denied`), timeouts and connection or transfer errors are
/// retryable. The message never holds the URL's credentials or query.
pub fn transport_error(e: reqwest::Error, url: &Url) -> TaskError {
    let mut source: Option<&(dyn StdError + 'static)> = e.source();
    let mut chain = Vec::new();
    while let Some(s) = source {
        if let Some(d) = s.downcast_ref::<Denied>() {
            return denied(d.clone());
        }
        let text = s.to_string();
        if !chain.iter().any(|c: &String| c.contains(&text)) {
            chain.push(text);
        }
        source = s.source();
    }
    let code = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_builder() {
        return TaskError::invalid_args(format!("request to {}: {e}", redact(url)));
    } else {
        "transfer"
    };
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "failed reading the response"
    } else if e.is_request() {
        "failed sending the request"
    } else {
        "failed"
    };
    let detail = if chain.is_empty() {
        String::new()
    } else {
        format!(": {}", chain.join(": "))
    };
    TaskError::retryable(code, format!("request to {} {what}{detail}", redact(url)))
}

/// A failure for an HTTP status: 5xx and 429 are retryable (honouring
/// `Retry-After`), any other status permanent. Code `http_<status>`.
pub fn status_error(status: StatusCode, headers: &HeaderMap, url: &Url, detail: &str) -> TaskError {
    let code = format!("http_{}", status.as_u16());
    let message = format!("{} answered {status}{detail}", redact(url));
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        let e = TaskError::retryable(code, message);
        match retry_after_ms(headers, chrono::Utc::now()) {
            Some(ms) => e.with_retry_after(ms),
            None => e,
        }
    } else {
        TaskError::permanent(code, message)
    }
}

/// `Retry-After` as milliseconds from `now`: delta-seconds or an HTTP date.
pub fn retry_after_ms(headers: &HeaderMap, now: chrono::DateTime<chrono::Utc>) -> Option<u64> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let ms = if let Ok(secs) = v.parse::<u64>() {
        secs.saturating_mul(1000)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
        u64::try_from((at.with_timezone(&chrono::Utc) - now).num_milliseconds()).unwrap_or(0)
    };
    Some(ms.min(MAX_RETRY_AFTER_MS))
}

/// Reads a task's `headers` argument (an object of strings); the message of
/// a bad value names the header, never its value.
pub fn request_headers(raw: &Option<BTreeMap<String, String>>) -> Result<HeaderMap, TaskError> {
    let mut map = HeaderMap::new();
    for (name, value) in raw.iter().flatten() {
        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            TaskError::invalid_args(format!("headers: {name:?} is not a valid header name"))
        })?;
        let v = HeaderValue::from_str(value).map_err(|_| {
            TaskError::invalid_args(format!(
                "headers: the value of {name:?} is not a valid header value (control \
                 characters or non-ASCII?)"
            ))
        })?;
        map.append(n, v);
    }
    Ok(map)
}

/// Response headers as a JSON object: one string per header, or an array
/// of strings for a header sent more than once.
pub fn headers_json(headers: &HeaderMap) -> Value {
    let mut out = Map::new();
    for name in headers.keys() {
        let values: Vec<Value> = headers
            .get_all(name)
            .iter()
            .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let v = if values.len() == 1 {
            values.into_iter().next().expect("one value")
        } else {
            Value::Array(values)
        };
        out.insert(name.as_str().to_owned(), v);
    }
    Value::Object(out)
}

/// The first bytes of an error response, as text for a failure message.
pub async fn error_snippet(resp: reqwest::Response) -> String {
    let mut resp = resp;
    let mut buf = Vec::new();
    let read = async {
        while buf.len() < 256 {
            match resp.chunk().await {
                Ok(Some(c)) => buf.extend_from_slice(&c),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
    buf.truncate(256);
    let text = String::from_utf8_lossy(&buf);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {}", text.chars().take(200).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_drops_credentials_and_queries() {
        let u = Url::parse("https://user:s3cret@example.com:8443/a/b?token=t0k#frag").unwrap();
        assert_eq!(redact(&u), "https://example.com:8443/a/b?…");
        assert_eq!(redact_str("other://u:p@h/x?q"), "other://h/x?…");
        assert_eq!(
            redact_str("::bad url secret@x"),
            "<18 characters, not shown>"
        );
        assert_eq!(redact_str("::bad?token=1"), "::bad…");
    }

    #[test]
    fn retry_after_forms() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let mut h = HeaderMap::new();
        assert_eq!(retry_after_ms(&h, now), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after_ms(&h, now), Some(7000));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:30 GMT"),
        );
        assert_eq!(retry_after_ms(&h, now), Some(30_000));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:00:00 GMT"),
        );
        assert_eq!(retry_after_ms(&h, now), Some(0));
        h.insert(RETRY_AFTER, HeaderValue::from_static("99999999"));
        assert_eq!(retry_after_ms(&h, now), Some(MAX_RETRY_AFTER_MS));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after_ms(&h, now), None);
    }

    #[test]
    fn status_classes() {
        let u = Url::parse("http://h/").unwrap();
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        let e = status_error(StatusCode::SERVICE_UNAVAILABLE, &h, &u, "");
        assert!(e.is_retryable());
        assert_eq!(e.code, "http_503");
        assert_eq!(e.retry_after_ms, Some(3000));
        let e = status_error(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), &u, "");
        assert!(e.is_retryable());
        assert_eq!(e.retry_after_ms, None);
        let e = status_error(StatusCode::NOT_FOUND, &h, &u, ": nope");
        assert!(!e.is_retryable());
        assert_eq!(e.code, "http_404");
        assert_eq!(e.message, "http://h/ answered 404 Not Found: nope");
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_denied_before_connecting() {
        let config = Arc::new(Config::from_toml("").unwrap());
        let out = Clients::default().get(&config).unwrap();
        assert_eq!(out.url("http://127.0.0.1:9/").unwrap_err().code, "denied");
        assert_eq!(
            out.url("file:///etc/passwd").unwrap_err().code,
            "invalid_args"
        );
        let url = out.url("http://user:pw@localhost:9/x?token=1").unwrap();
        let req = redirects::Request {
            method: reqwest::Method::GET,
            url,
            headers: HeaderMap::new(),
            extra: HeaderMap::new(),
            body: None,
            stream: None,
        };
        let e = send(&out, req).await.unwrap_err();
        assert_eq!(
            (e.code.as_str(), e.is_retryable()),
            ("denied", false),
            "{e}"
        );
        assert!(e.message.contains("http.allow_loopback"), "{e}");
        assert!(
            !e.message.contains("pw") && !e.message.contains("token"),
            "{e}"
        );
    }

    #[test]
    fn bad_headers_never_echo_their_value() {
        let raw = Some(BTreeMap::from([(
            "Authorization".to_owned(),
            "Bearer s3cret\n".to_owned(),
        )]));
        let e = request_headers(&raw).unwrap_err();
        assert_eq!(e.code, "invalid_args");
        assert!(!e.message.contains("s3cret"), "{}", e.message);
        let raw = Some(BTreeMap::from([("bad name".to_owned(), "v".to_owned())]));
        assert_eq!(request_headers(&raw).unwrap_err().code, "invalid_args");
    }
}
