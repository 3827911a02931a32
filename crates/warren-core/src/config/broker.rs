//! `[broker]`: how to reach RabbitMQ.

use std::path::Path;

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
    /// PEM file of the CA certificates that verify the broker's certificate
    /// over `amqps://`, and only they; empty: the system's trusted roots.
    pub tls_ca_file: String,
    /// PEM file of the client certificate (chain) Warren presents to a
    /// broker that asks for one; set with `tls_client_key` or not at all.
    pub tls_client_cert: String,
    /// PEM file of the private key of `tls_client_cert`.
    pub tls_client_key: String,
    /// The broker's `consumer_timeout` in milliseconds (RabbitMQ's default:
    /// 1800000, 30 minutes): a task still running at
    /// `worker.escrow_after_ms` is put in escrow so that the broker never
    /// times its delivery out. 0: the broker has no consumer timeout, and
    /// no task is put in escrow.
    pub consumer_timeout_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: BrokerUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            management_url: "http://127.0.0.1:15672".into(),
            pool_size: 4,
            connect_timeout_ms: 5000,
            reconnect_max_ms: 10_000,
            tls_ca_file: String::new(),
            tls_client_cert: String::new(),
            tls_client_key: String::new(),
            consumer_timeout_ms: 1_800_000,
        }
    }
}

impl BrokerConfig {
    /// Whether `url` asks for TLS (`amqps://`).
    pub fn uses_tls(&self) -> bool {
        self.url
            .expose()
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("amqps://"))
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
        self.check_broker_tls(b.uses_tls(), issues);
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

    /// The TLS files: each set one must be a readable PEM file of its kind,
    /// the client certificate and key come together, and none is set for a
    /// plain `amqp://` URL, where it would be silently unused.
    fn check_broker_tls(&self, amqps: bool, issues: &mut Issues) {
        let b = &self.broker;
        let files = [
            ("broker.tls_ca_file", &b.tls_ca_file, PemKind::Certificates),
            (
                "broker.tls_client_cert",
                &b.tls_client_cert,
                PemKind::Certificates,
            ),
            (
                "broker.tls_client_key",
                &b.tls_client_key,
                PemKind::PrivateKey,
            ),
        ];
        for (key, path, kind) in files {
            if path.is_empty() {
                continue;
            }
            if !amqps {
                issues.add(
                    key,
                    format!(
                        "\"{path}\" is set but broker.url is not amqps://, so it would not \
                         be used: use amqps:// in broker.url or remove this key"
                    ),
                );
            } else if let Some(problem) = kind.problem(Path::new(path)) {
                issues.add(key, format!("\"{path}\" {problem}"));
            }
        }
        if b.tls_client_cert.is_empty() != b.tls_client_key.is_empty() {
            let (set, unset) = if b.tls_client_cert.is_empty() {
                ("broker.tls_client_key", "broker.tls_client_cert")
            } else {
                ("broker.tls_client_cert", "broker.tls_client_key")
            };
            issues.add(
                unset,
                format!(
                    "is empty while {set} is set: a client certificate goes with its \
                     private key; set both or neither"
                ),
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

/// What a TLS file of `[broker]` must hold.
#[derive(Clone, Copy)]
enum PemKind {
    /// One or more `CERTIFICATE` blocks.
    Certificates,
    /// One private key block (PKCS#8, PKCS#1 or SEC1).
    PrivateKey,
}

impl PemKind {
    /// Why the file at `path` cannot serve, or `None`. Only the PEM block
    /// markers are checked here; the TLS library parses the blocks when it
    /// connects.
    fn problem(self, path: &Path) -> Option<String> {
        let text = match std::fs::read(path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => return Some(format!("cannot be read: {e}: give the path of a PEM file")),
        };
        let (found, wanted) = match self {
            PemKind::Certificates => (
                text.contains("-----BEGIN CERTIFICATE-----"),
                "a PEM file with a -----BEGIN CERTIFICATE----- block",
            ),
            PemKind::PrivateKey => (
                text.lines()
                    .any(|l| l.starts_with("-----BEGIN ") && l.ends_with("PRIVATE KEY-----")),
                "a PEM file with a -----BEGIN PRIVATE KEY----- block (or RSA/EC PRIVATE KEY)",
            ),
        };
        (!found).then(|| format!("holds no PEM block of its kind: give {wanted}"))
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

    /// A temp dir with a CA-like PEM file, a key-like one and a text file.
    fn tls_files(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("warren-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("ca.pem"),
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("key.pem"),
            "-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n",
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "not PEM\n").unwrap();
        dir
    }

    #[test]
    fn tls_files_are_checked_and_named() {
        let dir = tls_files("tls");
        let d = dir.display();
        let tls = "[broker]\nurl = \"amqps://u:p@broker.example:5671/%2f\"\n";
        let ok = format!(
            "{tls}tls_ca_file = \"{d}/ca.pem\"\ntls_client_cert = \"{d}/ca.pem\"\n\
             tls_client_key = \"{d}/key.pem\""
        );
        let c = Config::from_toml(&ok).unwrap();
        assert_eq!(c.broker.tls_ca_file, format!("{d}/ca.pem"));

        one_issue(
            &format!("{tls}tls_ca_file = \"{d}/missing.pem\""),
            &format!(
                "config key broker.tls_ca_file: \"{d}/missing.pem\" cannot be read: No such \
                 file or directory (os error 2): give the path of a PEM file"
            ),
        );
        one_issue(
            &format!("{tls}tls_ca_file = \"{d}/notes.txt\""),
            &format!(
                "config key broker.tls_ca_file: \"{d}/notes.txt\" holds no PEM block of its \
                 kind: give a PEM file with a -----BEGIN CERTIFICATE----- block"
            ),
        );
        one_issue(
            &format!("{tls}tls_client_cert = \"{d}/ca.pem\"\ntls_client_key = \"{d}/ca.pem\""),
            &format!(
                "config key broker.tls_client_key: \"{d}/ca.pem\" holds no PEM block of its \
                 kind: give a PEM file with a -----BEGIN PRIVATE KEY----- block (or RSA/EC \
                 PRIVATE KEY)"
            ),
        );
        one_issue(
            &format!("{tls}tls_client_cert = \"{d}/ca.pem\""),
            "config key broker.tls_client_key: is empty while broker.tls_client_cert is set: a \
             client certificate goes with its private key; set both or neither",
        );
        one_issue(
            &format!("{tls}tls_client_key = \"{d}/key.pem\""),
            "config key broker.tls_client_cert: is empty while broker.tls_client_key is set: a \
             client certificate goes with its private key; set both or neither",
        );
        one_issue(
            &format!("[broker]\ntls_ca_file = \"{d}/ca.pem\""),
            &format!(
                "config key broker.tls_ca_file: \"{d}/ca.pem\" is set but broker.url is not \
                 amqps://, so it would not be used: use amqps:// in broker.url or remove this key"
            ),
        );

        // From the environment, as every key.
        let c = Config::load_from(
            None,
            &env(&[
                ("WARREN__BROKER__URL", "amqps://u:p@h:5671/%2f"),
                ("WARREN__BROKER__TLS_CA_FILE", &format!("{d}/ca.pem")),
            ]),
        )
        .unwrap();
        assert_eq!(c.broker.tls_ca_file, format!("{d}/ca.pem"));
        std::fs::remove_dir_all(&dir).unwrap();
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
