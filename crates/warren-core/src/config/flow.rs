//! `[flow]`: limits that hold across the whole fleet, kept in the broker
//! (global concurrency and rate limits, per task type or per key; contract
//! section 9).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Config, Issues};
use crate::flow::{token_hold_ms, KeySource};
use crate::routes;

/// Most permits one type (or key) may have: each is a queue name tried in
/// turn.
pub const MAX_GLOBAL_CONCURRENCY: u32 = 1000;
/// Highest `limit` and `burst` of a rate limit: `burst` is the size of its
/// window queue in bytes, one byte of a marker per token.
pub const MAX_RATE: u32 = 100_000;
/// Longest `per_ms` of a rate limit, and longest time a token stays taken
/// (`per_ms * burst / limit`): 24 h.
pub const MAX_RATE_PERIOD_MS: u64 = 86_400_000;

/// `flow.concurrency.<type>`: a number (one limit for the type), or a table
/// with the limit and where a task's key comes from (one limit per key).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ConcurrencyLimit {
    /// At most this many of the type at once.
    Type(u32),
    /// At most `limit` at once per key (`key = "header"`: the header
    /// `x-warren-concurrency-key`; `"arg:<name>"`: a top-level string
    /// argument); without `key`, per type.
    Keyed {
        /// The limit.
        limit: u32,
        /// Where a task's key comes from.
        #[serde(default)]
        key: Option<String>,
    },
}

impl ConcurrencyLimit {
    /// The number of permits.
    pub fn limit(&self) -> u32 {
        match self {
            ConcurrencyLimit::Type(n) => *n,
            ConcurrencyLimit::Keyed { limit, .. } => *limit,
        }
    }

    /// Where a task's key comes from, if the limit is per key (`None` also
    /// for a key spec validation refuses).
    pub fn key_source(&self) -> Option<KeySource> {
        match self {
            ConcurrencyLimit::Keyed { key: Some(k), .. } => {
                KeySource::parse(k, crate::flow::CONCURRENCY_KEY)
            }
            _ => None,
        }
    }
}

/// `flow.rate.<type>`: at most `limit` tasks started per `per_ms` across
/// the fleet, with bursts of up to `burst`, per type or per key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Tokens per period.
    pub limit: u32,
    /// The period, in ms.
    pub per_ms: u64,
    /// Most tokens taken at once from an idle window; `limit` when absent.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Where a task's key comes from: `"header"` (`x-warren-rate-key`) or
    /// `"arg:<name>"`; absent: one limit for the whole type.
    #[serde(default)]
    pub key: Option<String>,
}

impl RateLimit {
    /// The burst: `burst`, or `limit` when absent.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.limit)
    }

    /// How long a token stays taken, in ms (see [`token_hold_ms`]).
    pub fn hold_ms(&self) -> u64 {
        token_hold_ms(self.limit, self.per_ms, self.burst())
    }

    /// Where a task's key comes from, if the limit is per key.
    pub fn key_source(&self) -> Option<KeySource> {
        self.key
            .as_deref()
            .and_then(|k| KeySource::parse(k, crate::flow::RATE_KEY))
    }
}

/// Fleet-wide flow control.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowConfig {
    /// At most this many tasks of each listed type run at once across every
    /// worker sharing the broker and prefix. Every worker must list the same
    /// values (each one enforces the limit it reads).
    /// A number per type, or `{ limit = N, key = "header" }` for a limit
    /// per key.
    pub concurrency: BTreeMap<String, ConcurrencyLimit>,
    /// At most `limit` tasks of each listed type (or key) start per
    /// `per_ms` across the fleet.
    pub rate: BTreeMap<String, RateLimit>,
    /// The first wait between two tries for a permit, in ms; it doubles up
    /// to `permit_backoff_max_ms`.
    pub permit_backoff_ms: u64,
    /// The longest wait between two tries for a permit, in ms.
    pub permit_backoff_max_ms: u64,
    /// A task that waited this long for a permit is put back at the end of
    /// its queue (so it never nears the broker's consumer timeout, and
    /// another worker may take it); 0: never.
    pub permit_handback_ms: u64,
}

impl FlowConfig {
    /// Defaults with no limit set.
    pub fn new() -> Self {
        FlowConfig {
            concurrency: BTreeMap::new(),
            rate: BTreeMap::new(),
            permit_backoff_ms: 20,
            permit_backoff_max_ms: 500,
            permit_handback_ms: 60_000,
        }
    }

    /// The global concurrency limit of `task_type`, if it has one.
    pub fn limit_of(&self, task_type: &str) -> Option<u32> {
        self.concurrency.get(task_type).map(ConcurrencyLimit::limit)
    }

    /// The rate limit of `task_type`, if it has one.
    pub fn rate_of(&self, task_type: &str) -> Option<&RateLimit> {
        self.rate.get(task_type)
    }
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig::new()
    }
}

pub(super) fn default_flow() -> FlowConfig {
    FlowConfig::new()
}

impl Config {
    pub(super) fn check_flow(&self, issues: &mut Issues) {
        let f = &self.flow;
        for (task_type, c) in &f.concurrency {
            let key = format!("flow.concurrency.{task_type:?}");
            check_type(issues, &key, task_type);
            if let ConcurrencyLimit::Keyed {
                key: Some(spec), ..
            } = c
            {
                check_key_spec(
                    issues,
                    &format!("{key}.key"),
                    spec,
                    "x-warren-concurrency-key",
                );
            }
            let n = c.limit();
            if issues.above_zero(
                &key,
                n,
                "0 would never run this type: set it to at least 1, or remove the entry",
            ) && n > MAX_GLOBAL_CONCURRENCY
            {
                issues.add(
                    &key,
                    format!("{n} is above {MAX_GLOBAL_CONCURRENCY}: lower it, or remove the entry"),
                );
            }
        }
        for (task_type, r) in &f.rate {
            let key = format!("flow.rate.{task_type:?}");
            check_type(issues, &key, task_type);
            if let Some(spec) = &r.key {
                check_key_spec(issues, &format!("{key}.key"), spec, "x-warren-rate-key");
            }
            let limit_ok = issues.above_zero(
                format!("{key}.limit"),
                r.limit,
                "0 would never start this type: set it to at least 1, or remove the entry",
            ) && at_most(
                issues,
                &format!("{key}.limit"),
                r.limit.into(),
                MAX_RATE.into(),
            );
            let per_ok = issues.above_zero(
                format!("{key}.per_ms"),
                r.per_ms,
                "0 is no period: set the period in ms, for example 1000 for a limit per second",
            ) && at_most(
                issues,
                &format!("{key}.per_ms"),
                r.per_ms,
                MAX_RATE_PERIOD_MS,
            );
            let burst_ok = r.burst.is_none_or(|b| {
                issues.above_zero(
                    format!("{key}.burst"),
                    b,
                    "0 would never start this type: set it to at least 1, or leave it out (it \
                     is then the limit)",
                ) && at_most(issues, &format!("{key}.burst"), b.into(), MAX_RATE.into())
            });
            if limit_ok && per_ok && burst_ok && r.hold_ms() > MAX_RATE_PERIOD_MS {
                issues.add(
                    &key,
                    format!(
                        "per_ms * burst / limit = {} ms is how long a token stays taken, above \
                         {MAX_RATE_PERIOD_MS} (24 h): lower per_ms or burst, or raise limit",
                        r.hold_ms()
                    ),
                );
            }
        }
        issues.above_zero(
            "flow.permit_backoff_ms",
            f.permit_backoff_ms,
            "0 would try for a permit without pause: set it to at least 1, for example 20",
        );
        if f.permit_backoff_max_ms < f.permit_backoff_ms {
            issues.add(
                "flow.permit_backoff_max_ms",
                format!(
                    "{} is below flow.permit_backoff_ms = {}: raise it",
                    f.permit_backoff_max_ms, f.permit_backoff_ms
                ),
            );
        }
    }
}

fn check_type(issues: &mut Issues, key: &str, task_type: &str) {
    if !routes::is_valid_task_type(task_type) {
        issues.add(
            key,
            "is not a task type: limits are keyed by an exact task type, words of \
             letters, digits, '_' or '-' joined by '.', without '*' or '#'",
        );
    }
}

fn check_key_spec(issues: &mut Issues, key: &str, spec: &str, header: &'static str) {
    if KeySource::parse(spec, header).is_none() {
        issues.add(
            key,
            format!(
                "{spec:?} is not a key source: use \"header\" (the header {header}) or \
                 \"arg:<name>\" (a top-level string argument), or leave it out for one limit \
                 per type"
            ),
        );
    }
}

/// Adds an issue when `value` is above `max`; whether it is not.
fn at_most(issues: &mut Issues, key: &str, value: u64, max: u64) -> bool {
    if value > max {
        issues.add(key, format!("{value} is above {max}: lower it"));
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;

    #[test]
    fn flow_rules() {
        let c = Config::from_toml("[flow.concurrency]\n\"http.request\" = 3").unwrap();
        assert_eq!(c.flow.limit_of("http.request"), Some(3));
        assert_eq!(c.flow.limit_of("email.send"), None);
        one_issue(
            "[flow.concurrency]\n\"http.request\" = 0",
            "config key flow.concurrency.\"http.request\": 0 would never run this type: set it \
             to at least 1, or remove the entry",
        );
        one_issue(
            "[flow.concurrency]\n\"http.*\" = 2",
            "config key flow.concurrency.\"http.*\": is not a task type: limits are keyed by an \
             exact task type, words of letters, digits, '_' or '-' joined by '.', without '*' \
             or '#'",
        );
    }

    #[test]
    fn keyed_concurrency() {
        let c = Config::from_toml(
            "[flow.concurrency]\n\"http.request\" = { limit = 3, key = \"header\" }\n\
             \"mail.send\" = { limit = 2 }\n\"file.get\" = { limit = 1, key = \"arg:host\" }",
        )
        .unwrap();
        assert_eq!(c.flow.limit_of("http.request"), Some(3));
        assert_eq!(
            c.flow.concurrency["http.request"].key_source(),
            Some(crate::flow::KeySource::Header(crate::flow::CONCURRENCY_KEY))
        );
        assert_eq!(c.flow.concurrency["mail.send"].key_source(), None);
        assert_eq!(
            c.flow.concurrency["file.get"].key_source(),
            Some(crate::flow::KeySource::Arg("host".into()))
        );
        one_issue(
            "[flow.concurrency]\n\"http.request\" = { limit = 3, key = \"host\" }",
            "config key flow.concurrency.\"http.request\".key: \"host\" is not a key source: \
             use \"header\" (the header x-warren-concurrency-key) or \"arg:<name>\" (a \
             top-level string argument), or leave it out for one limit per type",
        );
    }

    #[test]
    fn rate_limits() {
        let c = Config::from_toml(
            "[flow.rate]\n\"http.request\" = { limit = 10, per_ms = 1000, key = \"header\" }\n\
             \"mail.send\" = { limit = 5, per_ms = 60000, burst = 1 }",
        )
        .unwrap();
        let r = c.flow.rate_of("http.request").unwrap();
        assert_eq!((r.burst(), r.hold_ms()), (10, 1000));
        assert_eq!(
            r.key_source(),
            Some(crate::flow::KeySource::Header(crate::flow::RATE_KEY))
        );
        let m = c.flow.rate_of("mail.send").unwrap();
        assert_eq!((m.burst(), m.hold_ms(), m.key_source()), (1, 12_000, None));
        assert!(c.flow.rate_of("other").is_none());
        let rate = |v: &str| format!("[flow.rate]\n\"http.request\" = {{ {v} }}");
        one_issue(
            &rate("limit = 0, per_ms = 1000"),
            "config key flow.rate.\"http.request\".limit: 0 would never start this type: set \
             it to at least 1, or remove the entry",
        );
        one_issue(
            &rate("limit = 10, per_ms = 0"),
            "config key flow.rate.\"http.request\".per_ms: 0 is no period: set the period in \
             ms, for example 1000 for a limit per second",
        );
        one_issue(
            &rate("limit = 10, per_ms = 1000, burst = 0"),
            "config key flow.rate.\"http.request\".burst: 0 would never start this type: set \
             it to at least 1, or leave it out (it is then the limit)",
        );
        one_issue(
            &rate("limit = 100001, per_ms = 1000"),
            "config key flow.rate.\"http.request\".limit: 100001 is above 100000: lower it",
        );
        one_issue(
            &rate("limit = 1, per_ms = 86400001"),
            "config key flow.rate.\"http.request\".per_ms: 86400001 is above 86400000: lower it",
        );
        one_issue(
            &rate("limit = 1, per_ms = 86400000, burst = 2"),
            "config key flow.rate.\"http.request\": per_ms * burst / limit = 172800000 ms is \
             how long a token stays taken, above 86400000 (24 h): lower per_ms or burst, or \
             raise limit",
        );
        one_issue(
            &rate("limit = 1, per_ms = 1000, key = \"arg:\""),
            "config key flow.rate.\"http.request\".key: \"arg:\" is not a key source: use \
             \"header\" (the header x-warren-rate-key) or \"arg:<name>\" (a top-level string \
             argument), or leave it out for one limit per type",
        );
        one_issue(
            "[flow.rate]\n\"http.*\" = { limit = 1, per_ms = 1000 }",
            "config key flow.rate.\"http.*\": is not a task type: limits are keyed by an exact \
             task type, words of letters, digits, '_' or '-' joined by '.', without '*' or '#'",
        );
        assert!(
            parse_error("[flow.rate]\n\"a.b\" = { limit = 1, per_ms = 1, every = 2 }")
                .contains("every")
        );
    }
}
