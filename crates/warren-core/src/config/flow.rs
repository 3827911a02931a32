//! `[flow]`: limits that hold across the whole fleet, kept in the broker
//! (global concurrency per task type; contract section 9).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Config, Issues};
use crate::routes;

/// Most permits one type may have: each is a queue name tried in turn.
pub const MAX_GLOBAL_CONCURRENCY: u32 = 1000;

/// Fleet-wide flow control.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowConfig {
    /// At most this many tasks of each listed type run at once across every
    /// worker sharing the broker and prefix. Every worker must list the same
    /// values (each one enforces the limit it reads).
    pub concurrency: BTreeMap<String, u32>,
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
            permit_backoff_ms: 20,
            permit_backoff_max_ms: 500,
            permit_handback_ms: 60_000,
        }
    }

    /// The global concurrency limit of `task_type`, if it has one.
    pub fn limit_of(&self, task_type: &str) -> Option<u32> {
        self.concurrency.get(task_type).copied()
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
        for (task_type, &n) in &f.concurrency {
            let key = format!("flow.concurrency.{task_type:?}");
            if !routes::is_valid_task_type(task_type) {
                issues.add(
                    &key,
                    "is not a task type: limits are keyed by an exact task type, words of \
                     letters, digits, '_' or '-' joined by '.', without '*' or '#'",
                );
            }
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
}
