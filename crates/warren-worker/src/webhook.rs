//! `[[webhook]]` task types: each attempt is a signed JSON POST to an HTTP
//! endpoint of the user's, in any language (docs/task-types.md, "Webhook
//! handlers").
//!
//! The request:
//!
//! - **body**: one JSON object `{"id", "type", "attempt", "args"}`, as an
//!   `[[exec]]` program reads on its stdin; `Content-Type: application/json`.
//! - **`X-Warren-Timestamp`**: Unix time in whole seconds, as decimal digits.
//! - **`X-Warren-Signature`**: `v1=` and the lowercase hex HMAC-SHA256,
//!   keyed with the webhook's secret, of the timestamp's digits, a `.`, and
//!   the body's exact bytes ([`signature`]).
//! - **`X-Warren-Task-Id`**: the task id (also in the body), for receivers
//!   that deduplicate.
//!
//! The response: 2xx is success, its body the result (JSON when it parses,
//! else text; `null` when empty; past `max_response_bytes` the rest is not
//! read and the result is `{"output": <text kept>, "truncated": true}`).
//! 429 and 5xx are retryable failures whose `Retry-After` (seconds or an
//! HTTP date) is the earliest retry; any other status is a permanent
//! failure; connection errors and timeouts are retryable.
//!
//! The request goes through the `[http]` rules of `http.request` with the
//! configured endpoint's host allowed ([`Policy::with_endpoint`]); redirects
//! are followed up to `http.max_redirects`, each hop checked, and the
//! signature headers reach only the endpoint's origin. The webhook's
//! `timeout_ms`, the task's time limit and a cancel abort the request.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::{Method, Url};
use serde_json::{json, Value};
use sha2::Sha256;
use warren_core::config::{SecretSource, WebhookConfig, WebhookSecret};
use warren_core::Config;

use crate::builtin::http_request::read_capped;
use crate::builtin::policy::Policy;
use crate::builtin::{error_snippet, redact, send, status_error, transport_error, Outbound};
use crate::{Handler, Registry, TaskContext, TaskError};

/// The header of the signing time.
pub const TIMESTAMP_HEADER: &str = "x-warren-timestamp";
/// The header of the signature.
pub const SIGNATURE_HEADER: &str = "x-warren-signature";
/// The header of the task id.
pub const TASK_ID_HEADER: &str = "x-warren-task-id";

/// Why a `[[webhook]]` entry cannot run: found at worker start-up.
#[derive(Debug, thiserror::Error)]
#[error("config key {key} (webhook type {task_type:?}): {problem}")]
pub struct WebhookSetupError {
    /// The key at fault, such as `webhook[0].secret_env`.
    pub key: String,
    /// The task type of the entry.
    pub task_type: String,
    /// What is wrong and the fix; never the secret.
    pub problem: String,
}

/// Registers one handler per `[[webhook]]` entry of `config`, after reading
/// each secret and checking each URL against the `[http]` rules.
pub fn register(r: &mut Registry, config: &Config) -> Result<(), WebhookSetupError> {
    let base = Policy::new(&config.http);
    for (i, entry) in config.webhook.iter().enumerate() {
        let hook =
            Webhook::new(config, &base, entry).map_err(|(key, problem)| WebhookSetupError {
                key: format!("webhook[{i}].{key}"),
                task_type: entry.task_type.clone(),
                problem,
            })?;
        r.register(&entry.task_type, hook);
    }
    Ok(())
}

/// The handler of one `[[webhook]]` task type.
pub struct Webhook {
    url: Url,
    secret: Vec<u8>,
    out: Arc<Outbound>,
    timeout: Duration,
    max_response: usize,
}

impl Webhook {
    /// Reads the secret and builds the client; the error names the key.
    fn new(
        config: &Config,
        base: &Policy,
        e: &WebhookConfig,
    ) -> Result<Self, (&'static str, String)> {
        let url = Url::parse(&e.url).map_err(|err| ("url", format!("is not a URL: {err}")))?;
        let policy = base.with_endpoint(&url);
        policy
            .check_url(&url)
            .map_err(|d| ("url", format!("{} is refused: {d}", redact(&url))))?;
        let secret = read_secret(e)?;
        let out = Outbound::with_policy(config, policy).map_err(|err| ("url", err.message))?;
        Ok(Webhook {
            url,
            secret,
            out: Arc::new(out),
            timeout: Duration::from_millis(e.timeout_ms.unwrap_or(config.http.timeout_ms)),
            max_response: e.max_response_bytes,
        })
    }
}

/// The signing key of an entry, from where its configuration says.
fn read_secret(e: &WebhookConfig) -> Result<Vec<u8>, (&'static str, String)> {
    let Some((key, source)) = e.secret_source() else {
        return Err((
            "secret_env",
            "set exactly one of secret, secret_env and secret_file".into(),
        ));
    };
    let secret = match source {
        WebhookSecret::Inline(s) => s.expose().to_owned(),
        WebhookSecret::Source(SecretSource::Env(var)) => std::env::var(&var).map_err(|_| {
            (
                key,
                format!(
                    "variable {var} is not set in the worker's environment (or not UTF-8): \
                     set it, or use secret_file"
                ),
            )
        })?,
        WebhookSecret::Source(SecretSource::File(path)) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|err| (key, format!("cannot read {}: {err}", path.display())))?;
            let text = text.strip_suffix('\n').unwrap_or(&text);
            text.strip_suffix('\r').unwrap_or(text).to_owned()
        }
    };
    if secret.is_empty() {
        return Err((
            key,
            "the secret is empty: a webhook needs a signing secret".into(),
        ));
    }
    Ok(secret.into_bytes())
}

/// `v1=` and the hex HMAC-SHA256 of `<timestamp>.<body>` under `secret`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[async_trait::async_trait]
impl Handler for Webhook {
    async fn handle(&self, ctx: TaskContext) -> Result<Value, TaskError> {
        let body = json!({
            "id": ctx.id,
            "type": ctx.task_type,
            "attempt": ctx.attempt,
            "args": ctx.args,
        })
        .to_string();
        let timestamp = chrono::Utc::now().timestamp();
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let value = |s: String| {
            HeaderValue::from_str(&s)
                .map_err(|_| TaskError::permanent("invalid", "the task id is not a header value"))
        };
        headers.insert(
            HeaderName::from_static(TIMESTAMP_HEADER),
            value(timestamp.to_string())?,
        );
        headers.insert(
            HeaderName::from_static(SIGNATURE_HEADER),
            value(signature(&self.secret, timestamp, body.as_bytes()))?,
        );
        headers.insert(
            HeaderName::from_static(TASK_ID_HEADER),
            value(ctx.id.clone())?,
        );
        let request = crate::builtin::redirects::Request {
            method: Method::POST,
            url: self.url.clone(),
            headers,
            extra: HeaderMap::new(),
            body: Some(Bytes::from(body)),
            stream: None,
        };
        let exchange = async {
            let (resp, last_url) = send(&self.out, request).await?;
            let status = resp.status();
            if !status.is_success() {
                let resp_headers = resp.headers().clone();
                let snippet = error_snippet(resp).await;
                return Err(status_error(status, &resp_headers, &last_url, &snippet));
            }
            let (bytes, truncated) = read_capped(resp, self.max_response)
                .await
                .map_err(|e| transport_error(e, &last_url))?;
            Ok(result_of(&bytes, truncated))
        };
        tokio::select! {
            r = tokio::time::timeout(self.timeout, exchange) => r.unwrap_or_else(|_| {
                Err(TaskError::retryable(
                    "timeout",
                    format!(
                        "request to {} took over {} ms",
                        redact(&self.url),
                        self.timeout.as_millis()
                    ),
                ))
            }),
            _ = ctx.cancel.cancelled() => Err(TaskError::retryable("aborted", "stopped by the worker")),
        }
    }
}

/// The result of a 2xx response body: JSON when it parses, else text
/// (invalid UTF-8 replaced), `null` when empty; a cut body is text.
fn result_of(bytes: &[u8], truncated: bool) -> Value {
    if truncated {
        // A character cut at the end is dropped, not replaced.
        let text = match std::str::from_utf8(bytes) {
            Ok(s) => s.to_owned(),
            Err(e) if e.error_len().is_none() => {
                String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned()
            }
            Err(_) => String::from_utf8_lossy(bytes).into_owned(),
        };
        return json!({"output": text, "truncated": true});
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Value::Null;
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => v,
        Err(_) => Value::String(String::from_utf8_lossy(bytes).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed with Python's hmac module:
        // hmac.new(b"k3y", b'1700000000.{"a":1}', "sha256").hexdigest()
        assert_eq!(
            signature(b"k3y", 1_700_000_000, br#"{"a":1}"#),
            "v1=fd5a70e965043f7df6309c2c3b5ff5a8ffa99b1f5175e9a311459e73c4634d4a"
        );
    }

    #[test]
    fn results_are_json_text_null_or_cut() {
        assert_eq!(result_of(br#"{"ok":true}"#, false), json!({"ok": true}));
        assert_eq!(result_of(b"done", false), json!("done"));
        assert_eq!(result_of(b"caf\xe9", false), json!("caf\u{fffd}"));
        assert_eq!(result_of(b"", false), Value::Null);
        assert_eq!(result_of(b" \n", false), Value::Null);
        assert_eq!(
            result_of("hé".as_bytes()[..2].as_ref(), true),
            json!({"output": "h", "truncated": true})
        );
    }

    #[test]
    fn secrets_come_from_the_environment_or_a_file() {
        let dir = std::env::temp_dir().join(format!("warren-webhook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "s3cret\n").unwrap();
        let c = Config::from_toml(&format!(
            "[[webhook]]\ntype = \"a\"\nurl = \"http://h/\"\nsecret_file = {:?}\n\
             [[webhook]]\ntype = \"b\"\nurl = \"http://h/\"\nsecret_env = \"WARREN_TEST_UNSET_7F3A\"\n\
             [[webhook]]\ntype = \"c\"\nurl = \"http://h/\"\nsecret = \"inline\"\n",
            file.to_str().unwrap()
        ))
        .unwrap();
        assert_eq!(read_secret(&c.webhook[0]).unwrap(), b"s3cret");
        let (key, problem) = read_secret(&c.webhook[1]).unwrap_err();
        assert_eq!(key, "secret_env");
        assert!(
            problem.starts_with("variable WARREN_TEST_UNSET_7F3A is not set"),
            "{problem}"
        );
        assert_eq!(read_secret(&c.webhook[2]).unwrap(), b"inline");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_metadata_endpoint_is_refused_at_start_up() {
        let c = Config::from_toml(
            "[[webhook]]\ntype = \"a\"\nurl = \"http://169.254.169.254/hook?token=t\"\nsecret = \"s\"\n",
        )
        .unwrap();
        let err = match Registry::new().with_webhooks(&c) {
            Ok(_) => panic!("a metadata endpoint was accepted"),
            Err(e) => e.to_string(),
        };
        assert_eq!(
            err,
            "config key webhook[0].url (webhook type \"a\"): http://169.254.169.254/hook?… is \
             refused: address 169.254.169.254 is link-local (cloud metadata): such addresses \
             are always refused"
        );
    }
}
