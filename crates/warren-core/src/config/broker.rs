//! `[broker]`: how to reach RabbitMQ.

use serde::Deserialize;

use super::http::redact_userinfo;
use super::{BrokerUrl, Config, Issues};

/// How to reach RabbitMQ.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// AMQP URI of the broker; its password is redacted when printed.
    pub url: BrokerUrl,
    /// Base URL of the RabbitMQ management HTTP API.
    pub management_url: String,
    /// AMQP connections each process keeps open (1..=64).
    pub pool_size: usize,
    /// Give up connecting after this many milliseconds.
    pub connect_timeout_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: BrokerUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            management_url: "http://127.0.0.1:15672".into(),
            pool_size: 4,
            connect_timeout_ms: 5000,
        }
    }
}

impl Config {
    pub(super) fn check_broker(&self, issues: &mut Issues) {
        let b = &self.broker;
        let url = b.url.expose().to_ascii_lowercase();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            issues.add(
                "broker.url",
                format!(
                    "\"{}\" is not an AMQP URI: use amqp://user:pass@host:5672/vhost \
                     (%2f for the \"/\" vhost, amqps:// for TLS)",
                    b.url.redacted()
                ),
            );
        }
        let mgmt = b.management_url.to_ascii_lowercase();
        if !(mgmt.starts_with("http://") || mgmt.starts_with("https://")) {
            issues.add(
                "broker.management_url",
                format!(
                    "\"{}\" is not an HTTP URL: use http://host:15672 (or https://)",
                    redact_userinfo(&b.management_url)
                ),
            );
        }
        if !(1..=64).contains(&b.pool_size) {
            issues.add(
                "broker.pool_size",
                format!("{} is out of range: must be 1..=64", b.pool_size),
            );
        }
        issues.above_zero(
            "broker.connect_timeout_ms",
            b.connect_timeout_ms,
            "0 would give up at once: set it above 0, for example 5000",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;

    #[test]
    fn broker_rules() {
        one_issue(
            "[broker]\nurl = \"http://u:pw@h\"",
            "config key broker.url: \"http://u:***@h\" is not an AMQP URI: use \
             amqp://user:pass@host:5672/vhost (%2f for the \"/\" vhost, amqps:// for TLS)",
        );
        one_issue(
            "[broker]\nmanagement_url = \"h:15672\"",
            "config key broker.management_url: \"h:15672\" is not an HTTP URL: use \
             http://host:15672 (or https://)",
        );
        one_issue(
            "[broker]\npool_size = 0",
            "config key broker.pool_size: 0 is out of range: must be 1..=64",
        );
        one_issue(
            "[broker]\npool_size = 65",
            "config key broker.pool_size: 65 is out of range: must be 1..=64",
        );
        one_issue(
            "[broker]\nconnect_timeout_ms = 0",
            "config key broker.connect_timeout_ms: 0 would give up at once: set it above 0, \
             for example 5000",
        );
    }
}
