//! `[[webhook]]`: task types handled by an HTTP endpoint of the user's, in
//! any language (docs/task-types.md, "Webhook handlers").

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::exec::check_handler_type;
use super::{Config, Issues, SecretSource};

/// Default cap on the response body kept as the result: 64 KiB, the
/// default `limits.max_result_bytes`.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// A secret written in the configuration itself: never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct InlineSecret(String);

impl InlineSecret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself: only for signing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for InlineSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InlineSecret(***)")
    }
}

/// One task type handled by an HTTP endpoint: each attempt is a signed
/// JSON POST to `url`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The exact task type this endpoint handles.
    #[serde(rename = "type")]
    pub task_type: String,
    /// The endpoint, `http://` or `https://`, without user or password. Its
    /// host is allowed beside `http.allow` (and loopback, when it is a
    /// loopback host); `http.deny` and the always-refused addresses still
    /// apply.
    pub url: String,
    /// The signing key, written here (prefer `secret_env` or `secret_file`).
    #[serde(default)]
    pub secret: Option<InlineSecret>,
    /// The worker's environment variable holding the signing key.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// A file holding the signing key (without a trailing newline).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Time limit of one request, response included, in milliseconds;
    /// default `http.timeout_ms`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Bytes of the response body kept as the result; the rest is not read.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
}

fn default_max_response() -> usize {
    DEFAULT_MAX_RESPONSE_BYTES
}

/// Where a webhook's signing key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookSecret<'a> {
    /// Written in the configuration (`secret`).
    Inline(&'a InlineSecret),
    /// An environment variable (`secret_env`) or a file (`secret_file`).
    Source(SecretSource),
}

impl WebhookConfig {
    /// The key the signing secret is read from (`secret`, `secret_env` or
    /// `secret_file`) and where; `None` unless exactly one is set, which
    /// validation ensures.
    pub fn secret_source(&self) -> Option<(&'static str, WebhookSecret<'_>)> {
        match (&self.secret, &self.secret_env, &self.secret_file) {
            (Some(s), None, None) => Some(("secret", WebhookSecret::Inline(s))),
            (None, Some(v), None) => Some((
                "secret_env",
                WebhookSecret::Source(SecretSource::Env(v.clone())),
            )),
            (None, None, Some(p)) => Some((
                "secret_file",
                WebhookSecret::Source(SecretSource::File(p.clone())),
            )),
            _ => None,
        }
    }
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_env_name(var: &str) -> bool {
    var.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Config {
    /// The `[[webhook]]` entry of a task type.
    pub fn webhook_of(&self, task_type: &str) -> Option<&WebhookConfig> {
        self.webhook.iter().find(|w| w.task_type == task_type)
    }

    pub(super) fn check_webhook(&self, issues: &mut Issues) {
        let mut seen = BTreeSet::new();
        for (i, w) in self.webhook.iter().enumerate() {
            let key = |k: &str| format!("webhook[{i}].{k}");
            check_handler_type("webhook", i, &w.task_type, &mut seen, issues);
            if self.exec_of(&w.task_type).is_some() {
                issues.add(
                    key("type"),
                    format!(
                        "{:?} also has an [[exec]] entry: a type has one handler, remove one \
                         of them",
                        w.task_type
                    ),
                );
            }
            if let Err(problem) = check_url(&w.url) {
                issues.add(key("url"), problem);
            }
            let set = [
                w.secret.is_some(),
                w.secret_env.is_some(),
                w.secret_file.is_some(),
            ]
            .iter()
            .filter(|s| **s)
            .count();
            match set {
                0 => issues.add(
                    key("secret_env"),
                    "no signing secret: set secret_env (a variable of the worker's \
                     environment) or secret_file (a file), for example secret_env = \
                     \"WARREN_WEBHOOK_SECRET\"",
                ),
                1 => {}
                _ => issues.add(
                    key("secret"),
                    "more than one of secret, secret_env and secret_file is set: keep one",
                ),
            }
            if w.secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
                issues.add(key("secret"), "is empty: a webhook needs a signing secret");
            }
            if let Some(v) = &w.secret_env {
                if !is_env_name(v) {
                    issues.add(
                        key("secret_env"),
                        format!("{v:?} is not a variable name: use letters, digits and '_'"),
                    );
                }
            }
            if w.secret_file
                .as_ref()
                .is_some_and(|p| p.as_os_str().is_empty())
            {
                issues.add(key("secret_file"), "is empty: name the file of the secret");
            }
            if w.timeout_ms == Some(0) {
                issues.add(
                    key("timeout_ms"),
                    "0 would time out every request: set it above 0, for example 30000",
                );
            }
            issues.above_zero(
                key("max_response_bytes"),
                w.max_response_bytes,
                "0 would keep no result: set it above 0, for example 65536 (64 KiB)",
            );
        }
    }
}

/// A webhook URL: http or https, a host, no credentials. The error never
/// repeats the URL, which may hold a token.
fn check_url(raw: &str) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|e| {
        format!("is not a URL ({e}): write one such as \"https://hooks.example.com/warren\"")
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("has scheme {:?}: use http or https", url.scheme()));
    }
    if url.host().is_none() {
        return Err("has no host: write one such as \"https://hooks.example.com/warren\"".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "holds a user or password: remove them; the endpoint checks the request's \
             signature instead"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    const OK: &str = "[[webhook]]\ntype = \"hook.a\"\nurl = \"https://h.example/x\"\n";

    #[test]
    fn webhook_entries_parse_with_defaults() {
        let c = Config::from_toml(&format!("{OK}secret_env = \"HOOK_SECRET\"\n")).unwrap();
        let w = c.webhook_of("hook.a").unwrap();
        assert_eq!(w.max_response_bytes, DEFAULT_MAX_RESPONSE_BYTES);
        assert_eq!(w.timeout_ms, None);
        assert_eq!(
            w.secret_source(),
            Some((
                "secret_env",
                WebhookSecret::Source(SecretSource::Env("HOOK_SECRET".into()))
            ))
        );
        assert!(c.webhook_of("other").is_none());
    }

    #[test]
    fn an_inline_secret_is_never_shown() {
        let c = Config::from_toml(&format!("{OK}secret = \"hunter2-xyz\"\n")).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let (key, _) = c.webhook[0].secret_source().unwrap();
        assert_eq!(key, "secret");
    }

    #[test]
    fn webhook_rules() {
        one_issue(
            OK,
            "config key webhook[0].secret_env: no signing secret: set secret_env (a variable \
             of the worker's environment) or secret_file (a file), for example secret_env = \
             \"WARREN_WEBHOOK_SECRET\"",
        );
        one_issue(
            "[[webhook]]\ntype = \"hook.a\"\nurl = \"ftp://h/x\"\nsecret_env = \"S\"",
            "config key webhook[0].url: has scheme \"ftp\": use http or https",
        );
        one_issue(
            "[[webhook]]\ntype = \"hook.a\"\nurl = \"not a url\"\nsecret_env = \"S\"",
            "config key webhook[0].url: is not a URL (relative URL without a base): write one \
             such as \"https://hooks.example.com/warren\"",
        );
        one_issue(
            "[[webhook]]\ntype = \"hook.a\"\nurl = \"https://u:pw@h/x\"\nsecret_env = \"S\"",
            "config key webhook[0].url: holds a user or password: remove them; the endpoint \
             checks the request's signature instead",
        );
        one_issue(
            &format!("{OK}secret_env = \"S\"\nsecret_file = \"/run/s\""),
            "config key webhook[0].secret: more than one of secret, secret_env and \
             secret_file is set: keep one",
        );
        one_issue(
            &format!("{OK}secret_env = \"A-B\""),
            "config key webhook[0].secret_env: \"A-B\" is not a variable name: use letters, \
             digits and '_'",
        );
        one_issue(
            &format!("{OK}secret = \"\""),
            "config key webhook[0].secret: is empty: a webhook needs a signing secret",
        );
        one_issue(
            &format!("{OK}secret_env = \"S\"\ntimeout_ms = 0"),
            "config key webhook[0].timeout_ms: 0 would time out every request: set it above \
             0, for example 30000",
        );
        one_issue(
            &format!("{OK}secret_env = \"S\"\nmax_response_bytes = 0"),
            "config key webhook[0].max_response_bytes: 0 would keep no result: set it above \
             0, for example 65536 (64 KiB)",
        );
        one_issue(
            "[[webhook]]\ntype = \"diag.x\"\nurl = \"https://h/\"\nsecret_env = \"S\"",
            "config key webhook[0].type: \"diag.x\" is a built-in task type: choose a type of \
             your own",
        );
        one_issue(
            &format!("{OK}secret_env = \"S\"\n{OK}secret_env = \"S\""),
            "config key webhook[1].type: \"hook.a\" has another [[webhook]] entry: give each \
             type one",
        );
        one_issue(
            &format!("{OK}secret_env = \"S\"\n[[exec]]\ntype = \"hook.a\"\ncommand = [\"x\"]"),
            "config key webhook[0].type: \"hook.a\" also has an [[exec]] entry: a type has one \
             handler, remove one of them",
        );
        assert!(
            parse_error(&format!("{OK}secret_env = \"S\"\nheaders = {{}}")).contains("headers")
        );
    }
}
