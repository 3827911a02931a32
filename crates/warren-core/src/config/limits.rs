//! `[limits]`: size limits on task bodies and results.

use serde::Deserialize;

use super::{Config, Issues};

/// RabbitMQ refuses messages larger than 512 MiB.
const MAX_BODY_LIMIT: usize = 512 * 1024 * 1024;

/// Size limits on task bodies and results.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest task body accepted (larger: dead `invalid`); at most 512 MiB.
    pub max_body_bytes: usize,
    /// Largest result carried in an event (larger: truncated with a preview).
    pub max_result_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 10 * 1024 * 1024,
            max_result_bytes: 64 * 1024,
        }
    }
}

impl Config {
    pub(super) fn check_limits(&self, issues: &mut Issues) {
        let l = &self.limits;
        if issues.above_zero(
            "limits.max_body_bytes",
            l.max_body_bytes,
            "0 would reject every task: set it above 0, for example 10485760 (10 MiB)",
        ) && l.max_body_bytes > MAX_BODY_LIMIT
        {
            issues.add(
                "limits.max_body_bytes",
                format!(
                    "{} exceeds {MAX_BODY_LIMIT} (512 MiB), the largest message RabbitMQ \
                     accepts: lower it",
                    l.max_body_bytes
                ),
            );
        }
        issues.above_zero(
            "limits.max_result_bytes",
            l.max_result_bytes,
            "0 would truncate every result: set it above 0, for example 65536 (64 KiB)",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;

    #[test]
    fn limit_rules() {
        one_issue(
            "[limits]\nmax_body_bytes = 0",
            "config key limits.max_body_bytes: 0 would reject every task: set it above 0, for \
             example 10485760 (10 MiB)",
        );
        one_issue(
            "[limits]\nmax_body_bytes = 536870913",
            "config key limits.max_body_bytes: 536870913 exceeds 536870912 (512 MiB), the \
             largest message RabbitMQ accepts: lower it",
        );
        assert!(Config::from_toml("[limits]\nmax_body_bytes = 536870912").is_ok());
        one_issue(
            "[limits]\nmax_result_bytes = 0",
            "config key limits.max_result_bytes: 0 would truncate every result: set it above \
             0, for example 65536 (64 KiB)",
        );
    }
}
