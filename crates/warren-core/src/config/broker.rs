//! `[broker]`: how to reach RabbitMQ: one node or the nodes of a cluster.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

use super::http::redact_userinfo;
use super::{BrokerUrl, Config, Issues};

/// The AMQP URIs of `broker.url`: one node, or every node of a cluster
/// that Warren may connect to (written as one string or an array of them).
/// Passwords are redacted whenever it is shown.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrls(Vec<BrokerUrl>);

impl BrokerUrls {
    /// One node, as given; [`Config::validate`] checks it.
    pub fn new(url: impl Into<String>) -> Self {
        Self(vec![BrokerUrl::new(url)])
    }

    /// Several nodes, in the order given; [`Config::validate`] checks them.
    pub fn list<S: Into<String>>(urls: impl IntoIterator<Item = S>) -> Self {
        Self(urls.into_iter().map(BrokerUrl::new).collect())
    }

    /// Every node, in the order configured.
    pub fn nodes(&self) -> &[BrokerUrl] {
        &self.0
    }

    /// The first node: what a tool that needs a single URL uses (its
    /// credentials and vhost are those of every node, as validation checks
    /// that the vhosts agree). `None` only for an empty list, which
    /// [`Config::validate`] refuses.
    pub fn first(&self) -> Option<&BrokerUrl> {
        self.0.first()
    }

    /// The first node's real URL, password included (see
    /// [`BrokerUrls::first`]); empty for an empty list.
    pub fn expose(&self) -> &str {
        self.first().map_or("", BrokerUrl::expose)
    }

    /// Every node's real URL joined by commas: the form
    /// `WARREN__BROKER__URL` reads, for handing the list to a child process.
    pub fn expose_all(&self) -> String {
        self.0
            .iter()
            .map(BrokerUrl::expose)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node's URL, password replaced by `***`, joined by `, `.
    pub fn redacted(&self) -> String {
        self.0
            .iter()
            .map(BrokerUrl::redacted)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The virtual host of the first node (every node names the same one).
    pub fn vhost(&self) -> String {
        self.first()
            .map_or_else(|| "/".to_owned(), BrokerUrl::vhost)
    }

    /// The config key of node `index`: `broker.url` for a single node,
    /// `broker.url[index]` in a list of several.
    pub fn key(&self, index: usize) -> String {
        if self.0.len() > 1 {
            format!("broker.url[{index}]")
        } else {
            "broker.url".to_owned()
        }
    }
}

impl fmt::Debug for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.0).finish()
    }
}

impl fmt::Display for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for BrokerUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Urls;
        impl<'de> serde::de::Visitor<'de> for Urls {
            type Value = BrokerUrls;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an AMQP URI or an array of them")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<BrokerUrls, E> {
                Ok(BrokerUrls::new(v))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<BrokerUrls, A::Error> {
                let mut urls = Vec::new();
                while let Some(url) = seq.next_element::<String>()? {
                    urls.push(BrokerUrl::new(url));
                }
                Ok(BrokerUrls(urls))
            }
        }
        d.deserialize_any(Urls)
    }
}

impl BrokerUrl {
    /// Whether this URL asks for TLS (`amqps://`).
    pub fn is_tls(&self) -> bool {
        self.expose()
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("amqps://"))
    }
}

/// Splits the value of `WARREN__BROKER__URL` into its nodes: at each comma
/// that begins a new URI (`scheme://` follows it), so a comma inside a
/// password or query stays part of its URI.
pub(super) fn split_env_urls(value: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for piece in value.split(',') {
        let starts_uri = piece
            .trim_start()
            .split_once("://")
            .is_some_and(|(scheme, _)| {
                !scheme.is_empty()
                    && scheme
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
            });
        match out.last_mut() {
            Some(last) if !starts_uri => {
                last.push(',');
                last.push_str(piece);
            }
            _ => out.push(piece.to_owned()),
        }
    }
    out.iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect()
}

/// How to reach RabbitMQ.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// AMQP URI of the broker, or of each node of a cluster in the order
    /// to try them; passwords are redacted when printed.
    pub url: BrokerUrls,
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
    /// How long, in milliseconds, the Rust client keeps trying one
    /// publication before it reports an error: an attempt whose confirm
    /// never came (the connection or its node was lost) is sent again on a
    /// new connection, with the same task id, until the broker confirms it.
    pub publish_timeout_ms: u64,
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
            url: BrokerUrls::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            management_url: "http://127.0.0.1:15672".into(),
            pool_size: 4,
            connect_timeout_ms: 5000,
            reconnect_max_ms: 10_000,
            publish_timeout_ms: 30_000,
            tls_ca_file: String::new(),
            tls_client_cert: String::new(),
            tls_client_key: String::new(),
            consumer_timeout_ms: 1_800_000,
        }
    }
}

impl BrokerConfig {
    /// Whether any node of `url` asks for TLS (`amqps://`).
    pub fn uses_tls(&self) -> bool {
        self.url.nodes().iter().any(BrokerUrl::is_tls)
    }
}

impl Config {
    pub(super) fn check_broker(&self, issues: &mut Issues) {
        let b = &self.broker;
        self.check_broker_urls(issues);
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
        issues.above_zero(
            "broker.publish_timeout_ms",
            b.publish_timeout_ms,
            "0 would fail every publication at once: set it above 0, for example 30000",
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

    /// Every node of `broker.url`: an AMQP URI each, at least one, all on
    /// the same vhost (one cluster serves one set of queues).
    fn check_broker_urls(&self, issues: &mut Issues) {
        let urls = &self.broker.url;
        if urls.nodes().is_empty() {
            issues.add(
                "broker.url",
                "is an empty list: give at least one AMQP URI, such as \
                 \"amqp://user:pass@host:5672/%2f\"",
            );
            return;
        }
        let vhost = urls.vhost();
        for (i, url) in urls.nodes().iter().enumerate() {
            let lower = url.expose().to_ascii_lowercase();
            if !(lower.starts_with("amqp://") || lower.starts_with("amqps://")) {
                issues.add(
                    urls.key(i),
                    format!(
                        "\"{}\" is not an AMQP URI: use amqp://user:pass@host:5672/vhost \
                         (%2f for the \"/\" vhost, amqps:// for TLS)",
                        url.redacted()
                    ),
                );
            } else if url.vhost() != vhost {
                issues.add(
                    urls.key(i),
                    format!(
                        "\"{}\" names vhost {:?} but broker.url[0] names {vhost:?}: the \
                         nodes of one broker serve one vhost; use the same in every entry",
                        url.redacted(),
                        url.vhost()
                    ),
                );
            }
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

    #[test]
    fn url_is_one_uri_or_a_list_of_nodes() {
        // One string, as always.
        let c = Config::from_toml("[broker]\nurl = \"amqp://u:p@h1:5672/%2f\"").unwrap();
        assert_eq!(c.broker.url.nodes().len(), 1);
        assert_eq!(c.broker.url.expose(), "amqp://u:p@h1:5672/%2f");

        // A list: every node in order; shown redacted.
        let c = Config::from_toml(
            "[broker]\nurl = [\"amqp://u:p@h1:5672/v\", \"amqps://u:p@h2:5671/v\"]",
        )
        .unwrap();
        let nodes: Vec<&str> = c.broker.url.nodes().iter().map(|u| u.expose()).collect();
        assert_eq!(nodes, ["amqp://u:p@h1:5672/v", "amqps://u:p@h2:5671/v"]);
        assert_eq!(
            c.broker.url.to_string(),
            "amqp://u:***@h1:5672/v, amqps://u:***@h2:5671/v"
        );
        assert_eq!(
            format!("{:?}", c.broker.url),
            "[BrokerUrl(\"amqp://u:***@h1:5672/v\"), BrokerUrl(\"amqps://u:***@h2:5671/v\")]"
        );
        assert_eq!(c.broker.url.vhost(), "v");
        assert!(c.broker.uses_tls(), "an amqps:// entry uses TLS");
        assert_eq!(
            c.broker.url.expose_all(),
            "amqp://u:p@h1:5672/v,amqps://u:p@h2:5671/v"
        );

        // A bad entry is named by its index, password hidden.
        one_issue(
            "[broker]\nurl = [\"amqp://u:p@h1/%2f\", \"http://u:secret@h2\"]",
            "config key broker.url[1]: \"http://u:***@h2\" is not an AMQP URI: use \
             amqp://user:pass@host:5672/vhost (%2f for the \"/\" vhost, amqps:// for TLS)",
        );
        one_issue(
            "[broker]\nurl = [\"amqp://h1/%2f\", \"amqp://u:secret@h2/prod\"]",
            "config key broker.url[1]: \"amqp://u:***@h2/prod\" names vhost \"prod\" but \
             broker.url[0] names \"/\": the nodes of one broker serve one vhost; use the same \
             in every entry",
        );
        one_issue(
            "[broker]\nurl = []",
            "config key broker.url: is an empty list: give at least one AMQP URI, such as \
             \"amqp://user:pass@host:5672/%2f\"",
        );
        let err = parse_error("[broker]\nurl = 5");
        assert!(err.starts_with("config key broker.url: "), "{err}");

        // From the environment: URIs separated by commas; a comma inside a
        // URI (a password) stays in it.
        let c = Config::load_from(
            None,
            &env(&[(
                "WARREN__BROKER__URL",
                "amqp://u:a,b@h1:5672/%2f, amqp://u:a,b@h2:5672/%2f",
            )]),
        )
        .unwrap();
        let nodes: Vec<&str> = c.broker.url.nodes().iter().map(|u| u.expose()).collect();
        assert_eq!(
            nodes,
            ["amqp://u:a,b@h1:5672/%2f", "amqp://u:a,b@h2:5672/%2f"]
        );
        let err = Config::load_from(
            None,
            &env(&[("WARREN__BROKER__URL", "amqp://h1/%2f,ftp://u:pw@h2")]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "config key broker.url[1]: \"ftp://u:***@h2\" is not an AMQP URI: use \
             amqp://user:pass@host:5672/vhost (%2f for the \"/\" vhost, amqps:// for TLS)"
        );
        let c =
            Config::load_from(None, &env(&[("WARREN__BROKER__URL", "amqp://u:p@h/%2f")])).unwrap();
        assert_eq!(c.broker.url.nodes().len(), 1);
    }

    #[test]
    fn publish_timeout_is_above_zero() {
        assert_eq!(
            Config::from_toml("").unwrap().broker.publish_timeout_ms,
            30_000
        );
        one_issue(
            "[broker]\npublish_timeout_ms = 0",
            "config key broker.publish_timeout_ms: 0 would fail every publication at once: \
             set it above 0, for example 30000",
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
