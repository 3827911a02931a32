//! `[retry]`: retry policies, default and per task type.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Config, Issues};
use crate::routes;

/// Retry policies: one default and overrides per exact task type.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(from = "RawRetryConfig")]
pub struct RetryConfig {
    /// Policy of task types without an entry in `types`.
    pub default: RetryPolicy,
    /// Policies keyed by exact task type (`[retry.types."http.request"]`).
    /// Keys an entry leaves out were filled in from `default` at load time.
    pub types: BTreeMap<String, RetryPolicy>,
}

/// The retry section as written: type entries may leave keys out.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawRetryConfig {
    default: RetryPolicy,
    types: BTreeMap<String, PartialRetryPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialRetryPolicy {
    max_retries: Option<u32>,
    base_ms: Option<u64>,
    cap_ms: Option<u64>,
}

impl From<RawRetryConfig> for RetryConfig {
    fn from(raw: RawRetryConfig) -> Self {
        let default = raw.default;
        let types = raw
            .types
            .into_iter()
            .map(|(task_type, p)| {
                let policy = RetryPolicy {
                    max_retries: p.max_retries.unwrap_or(default.max_retries),
                    base_ms: p.base_ms.unwrap_or(default.base_ms),
                    cap_ms: p.cap_ms.unwrap_or(default.cap_ms),
                };
                (task_type, policy)
            })
            .collect();
        Self { default, types }
    }
}

/// How often and how patiently one task type is retried.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first attempt (N allows N + 1 attempts).
    pub max_retries: u32,
    /// Backoff ceiling of the first retry, in milliseconds.
    pub base_ms: u64,
    /// Largest backoff ceiling, in milliseconds; at least `base_ms`.
    pub cap_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            base_ms: 1000,
            cap_ms: 300_000,
        }
    }
}

impl Config {
    pub(super) fn check_retry(&self, issues: &mut Issues) {
        check_policy(&self.retry.default, "retry.default", issues);
        for (task_type, policy) in &self.retry.types {
            let key = format!("retry.types.{task_type:?}");
            if !routes::is_valid_task_type(task_type) {
                issues.add(
                    &key,
                    "is not a task type: retry policies are keyed by an exact task type, \
                     words of letters, digits, '_' or '-' joined by '.', without '*' or '#'",
                );
            }
            check_policy(policy, &key, issues);
        }
    }
}

fn check_policy(policy: &RetryPolicy, key: &str, issues: &mut Issues) {
    if policy.cap_ms < policy.base_ms {
        issues.add(
            format!("{key}.cap_ms"),
            format!(
                "{} is below {key}.base_ms = {}: raise cap_ms to at least {} or lower base_ms",
                policy.cap_ms, policy.base_ms, policy.base_ms
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;

    #[test]
    fn retry_types_inherit_missing_keys_from_default() {
        let c = Config::from_toml("").unwrap();
        let http = c.retry_policy("http.request");
        assert_eq!(http.max_retries, 5);
        assert_eq!(http.base_ms, 1000);
        assert_eq!(c.retry_policy("diag.echo"), &c.retry.default);

        let c = Config::from_toml(
            "[retry.default]\nbase_ms = 50\ncap_ms = 500\n\
             [retry.types.\"diag.fail\"]\nmax_retries = 0\n",
        )
        .unwrap();
        assert_eq!(
            c.retry_policy("diag.fail"),
            &RetryPolicy {
                max_retries: 0,
                base_ms: 50,
                cap_ms: 500
            }
        );
        // Built-in entries stay, and inherit the file's default.
        assert_eq!(c.retry_policy("http.request").base_ms, 50);
        assert_eq!(c.retry_policy("http.request").max_retries, 5);
    }

    #[test]
    fn retry_rules() {
        // The built-in http.request entry inherits both values, so it is reported too.
        assert_eq!(
            issues("[retry.default]\nbase_ms = 5000\ncap_ms = 1000"),
            [
                "config key retry.default.cap_ms: 1000 is below retry.default.base_ms = 5000: \
                 raise cap_ms to at least 5000 or lower base_ms",
                "config key retry.types.\"http.request\".cap_ms: 1000 is below \
                 retry.types.\"http.request\".base_ms = 5000: raise cap_ms to at least 5000 or \
                 lower base_ms",
            ]
        );
        one_issue(
            "[retry.types.\"http.request\"]\ncap_ms = 10",
            "config key retry.types.\"http.request\".cap_ms: 10 is below \
             retry.types.\"http.request\".base_ms = 1000: raise cap_ms to at least 1000 or \
             lower base_ms",
        );
        one_issue(
            "[retry.types.\"http.*\"]\nmax_retries = 1",
            "config key retry.types.\"http.*\": is not a task type: retry policies are keyed \
             by an exact task type, words of letters, digits, '_' or '-' joined by '.', \
             without '*' or '#'",
        );
    }
}
