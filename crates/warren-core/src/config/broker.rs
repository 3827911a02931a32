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
    /// Upper bound, in milliseconds, of the backoff between attempts to
    /// reconnect to the broker. Replaces `worker.reconnect_max_ms`, which
    /// loading still reads, with a warning, when this key is not set: this
    /// field always holds the value in effect.
    pub reconnect_max_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: BrokerUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            management_url: "http://127.0.0.1:15672".into(),
            pool_size: 4,
            connect_timeout_ms: 5000,
            reconnect_max_ms: 10_000,
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
        // Taken from worker.reconnect_max_ms, it is checked under that key.
        if !self.notes.reconnect_from_worker {
            issues.above_zero(
                "broker.reconnect_max_ms",
                b.reconnect_max_ms,
                RECONNECT_ZERO,
            );
        }
    }

    /// Settles `broker.reconnect_max_ms` after loading: when a file or the
    /// environment set the deprecated `worker.reconnect_max_ms` but not the
    /// new key, its value is used, and either way setting it earns a warning.
    /// Both fields then hold the value in effect, for code that still reads
    /// the old one. `set_by(key)` says whether a file or the environment set
    /// `key` and, if so, where: `" (set by WARREN__...)"` or `" (in ...)"`.
    pub(super) fn settle_reconnect_max_ms(&mut self, set_by: impl Fn(&str) -> Option<String>) {
        if let Some(source) = set_by("worker.reconnect_max_ms") {
            let warning = if set_by("broker.reconnect_max_ms").is_some() {
                format!(
                    "config key worker.reconnect_max_ms: deprecated and ignored, as \
                     broker.reconnect_max_ms is set too; remove it{source}"
                )
            } else {
                self.broker.reconnect_max_ms = self.worker.reconnect_max_ms;
                self.notes.reconnect_from_worker = true;
                format!(
                    "config key worker.reconnect_max_ms: deprecated; rename it \
                     broker.reconnect_max_ms, which takes its value ({}) meanwhile{source}",
                    self.worker.reconnect_max_ms
                )
            };
            self.notes.warnings.push(warning);
        }
        self.worker.reconnect_max_ms = self.broker.reconnect_max_ms;
    }
}

/// The problem of a reconnect backoff cap of 0, under either key.
pub(super) const RECONNECT_ZERO: &str =
    "0 would reconnect in a tight loop: set it above 0, for example 10000";

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::Config;

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
        one_issue(
            "[broker]\nreconnect_max_ms = 0",
            "config key broker.reconnect_max_ms: 0 would reconnect in a tight loop: set it \
             above 0, for example 10000",
        );
    }

    #[test]
    fn reconnect_max_ms_is_a_broker_key_and_the_worker_key_still_works() {
        // Built in, and set as the new key: no warning, both fields agree.
        for (toml, expected) in [("", 10_000), ("[broker]\nreconnect_max_ms = 2000", 2000)] {
            let c = Config::from_toml(toml).unwrap();
            assert_eq!(c.broker.reconnect_max_ms, expected, "{toml}");
            assert_eq!(c.worker.reconnect_max_ms, expected, "{toml}");
            assert!(c.warnings().is_empty(), "{toml}: {:?}", c.warnings());
        }
        let c =
            Config::load_from(None, &env(&[("WARREN__BROKER__RECONNECT_MAX_MS", "2500")])).unwrap();
        assert_eq!(c.broker.reconnect_max_ms, 2500);
        assert_eq!(c.worker.reconnect_max_ms, 2500);
        assert!(c.warnings().is_empty());

        // The old key alone, in a file or the environment: its value is used.
        let c = Config::from_toml("[worker]\nreconnect_max_ms = 3000").unwrap();
        assert_eq!(c.broker.reconnect_max_ms, 3000);
        assert_eq!(c.worker.reconnect_max_ms, 3000);
        assert_eq!(
            c.warnings(),
            ["config key worker.reconnect_max_ms: deprecated; rename it \
                 broker.reconnect_max_ms, which takes its value (3000) meanwhile (in config TOML)"]
        );
        c.validate().unwrap();
        let c =
            Config::load_from(None, &env(&[("WARREN__WORKER__RECONNECT_MAX_MS", "4000")])).unwrap();
        assert_eq!(c.broker.reconnect_max_ms, 4000);
        assert_eq!(
            c.warnings(),
            ["config key worker.reconnect_max_ms: deprecated; rename it \
                 broker.reconnect_max_ms, which takes its value (4000) meanwhile (set by \
                 WARREN__WORKER__RECONNECT_MAX_MS)"]
        );

        // Both keys: the new one wins and the old one is reported as ignored.
        let c = Config::load_from(
            None,
            &env(&[
                ("WARREN__WORKER__RECONNECT_MAX_MS", "4000"),
                ("WARREN__BROKER__RECONNECT_MAX_MS", "6000"),
            ]),
        )
        .unwrap();
        assert_eq!(c.broker.reconnect_max_ms, 6000);
        assert_eq!(c.worker.reconnect_max_ms, 6000);
        assert_eq!(
            c.warnings(),
            [
                "config key worker.reconnect_max_ms: deprecated and ignored, as \
                 broker.reconnect_max_ms is set too; remove it (set by \
                 WARREN__WORKER__RECONNECT_MAX_MS)"
            ]
        );
        let c =
            Config::from_toml("[broker]\nreconnect_max_ms = 6000\n[worker]\nreconnect_max_ms = 0")
                .unwrap();
        assert_eq!(c.broker.reconnect_max_ms, 6000);
        assert_eq!(c.warnings().len(), 1);

        // A 0 is reported under the key that was written.
        one_issue(
            "[worker]\nreconnect_max_ms = 0",
            "config key worker.reconnect_max_ms: 0 would reconnect in a tight loop: set it \
             above 0, for example 10000",
        );
    }
}
