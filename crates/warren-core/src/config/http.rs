//! `[http]`: outbound HTTP of the built-in task types, with the host rules
//! of `http.allow` and `http.deny`; and the URL types whose passwords are
//! never printed.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{Config, Issues};

/// Most redirects `http.max_redirects` may allow.
const MAX_HTTP_REDIRECTS: usize = 20;

/// Outbound HTTP of the built-in task types (`http.request`, `file.download`,
/// `file.upload`): where requests may go and how much they may move.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Hosts and networks requests may reach ([`HostRule`] syntax); empty
    /// means any not denied.
    pub allow: Vec<String>,
    /// Hosts and networks requests never reach; wins over `allow`.
    pub deny: Vec<String>,
    /// Whether loopback addresses (127.0.0.0/8, ::1) may be reached.
    pub allow_loopback: bool,
    /// Redirects followed per request (0 follows none), at most 20.
    pub max_redirects: usize,
    /// Default time limit of an `http.request` (its `timeout_ms` overrides
    /// it), and the longest a transfer may stall without receiving data.
    pub timeout_ms: u64,
    /// Longest wait for a TCP (and TLS) connection.
    pub connect_timeout_ms: u64,
    /// Largest response body an `http.request` result carries; longer bodies
    /// are cut and marked truncated. At most `limits.max_result_bytes`.
    pub max_response_bytes: usize,
    /// Largest file `file.download` writes or `file.upload` sends; a task's
    /// `max_bytes` may only lower it.
    pub max_file_bytes: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            deny: Vec::new(),
            allow_loopback: false,
            max_redirects: 5,
            timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
            max_response_bytes: 32 * 1024,
            max_file_bytes: 10 * 1024 * 1024 * 1024,
        }
    }
}

/// One entry of `http.allow` or `http.deny`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRule {
    /// An address or a network in CIDR notation (`192.0.2.7`, `10.0.0.0/8`,
    /// `fd00::/8`): matches the addresses a host name resolves to.
    Network(IpAddr, u8),
    /// Exactly this host name (`api.example.com`), compared without case.
    Host(String),
    /// Every host name below a domain, written `*.example.com` (not
    /// `example.com` itself).
    Subdomains(String),
}

impl HostRule {
    /// Reads one entry; the error continues a sentence that starts with the
    /// quoted entry.
    pub fn parse(entry: &str) -> Result<HostRule, String> {
        let usage = "use a host name (api.example.com), *.domain for its subdomains, an \
                     address (192.0.2.7) or a network (10.0.0.0/8, fd00::/8)";
        if let Ok(ip) = entry.parse::<IpAddr>() {
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            return Ok(HostRule::Network(ip, bits));
        }
        if let Some((addr, bits)) = entry.split_once('/') {
            let (Ok(ip), Ok(bits)) = (addr.parse::<IpAddr>(), bits.parse::<u8>()) else {
                return Err(format!("is not a host name, address or network: {usage}"));
            };
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if bits > max {
                return Err(format!("has a prefix longer than {max} bits: {usage}"));
            }
            let base = network_base(ip, bits);
            if base != ip {
                return Err(format!(
                    "has bits set past its /{bits} prefix: write {base}/{bits}"
                ));
            }
            return Ok(HostRule::Network(ip, bits));
        }
        let (name, rule): (&str, fn(String) -> HostRule) = match entry.strip_prefix("*.") {
            Some(domain) => (domain, HostRule::Subdomains),
            None => (entry, HostRule::Host),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if valid {
            Ok(rule(name))
        } else {
            Err(format!("is not a host name, address or network: {usage}"))
        }
    }
}

/// `ip` with every bit past the first `bits` cleared.
fn network_base(ip: IpAddr, bits: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

impl Config {
    pub(super) fn check_http(&self, issues: &mut Issues) {
        let h = &self.http;
        for (list, entries) in [("allow", &h.allow), ("deny", &h.deny)] {
            for (i, entry) in entries.iter().enumerate() {
                if let Err(why) = HostRule::parse(entry) {
                    issues.add(format!("http.{list}[{i}]"), format!("{entry:?} {why}"));
                }
            }
        }
        if h.max_redirects > MAX_HTTP_REDIRECTS {
            issues.add(
                "http.max_redirects",
                format!(
                    "{} is above {MAX_HTTP_REDIRECTS}: a longer chain is a loop or an abuse; \
                     lower it (0 follows none)",
                    h.max_redirects
                ),
            );
        }
        issues.above_zero(
            "http.timeout_ms",
            h.timeout_ms,
            "0 would time out every request: set it above 0, for example 30000",
        );
        issues.above_zero(
            "http.connect_timeout_ms",
            h.connect_timeout_ms,
            "0 would time out every connection: set it above 0, for example 10000",
        );
        if issues.above_zero(
            "http.max_response_bytes",
            h.max_response_bytes,
            "0 would cut every response body: set it above 0, for example 32768",
        ) && self.limits.max_result_bytes > 0
            && h.max_response_bytes > self.limits.max_result_bytes
        {
            issues.add(
                "http.max_response_bytes",
                format!(
                    "{} is above limits.max_result_bytes = {}: such a body would not fit in \
                     the result, which would be cut to a preview; lower it or raise \
                     limits.max_result_bytes",
                    h.max_response_bytes, self.limits.max_result_bytes
                ),
            );
        }
        issues.above_zero(
            "http.max_file_bytes",
            h.max_file_bytes,
            "0 would refuse every transfer: set it above 0, for example 10737418240 (10 GiB)",
        );
    }
}

/// Defines a URL type that holds a secret: `new` wraps it unchecked
/// ([`Config::validate`] checks it), `expose` gives the real text to the
/// connection code only, and `Debug`, `Display` and `redacted` show it with
/// the password replaced by `***`, so it can be logged.
macro_rules! secret_url {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps the URL as given; [`Config::validate`] checks it.
            pub fn new(s: impl Into<String>) -> Self {
                Self(s.into())
            }

            /// The real URL, password included: only for opening connections.
            pub fn expose(&self) -> &str {
                &self.0
            }

            /// The URL with the password, if any, replaced by `***`.
            pub fn redacted(&self) -> String {
                redact_userinfo(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_tuple(stringify!($name))
                    .field(&self.redacted())
                    .finish()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.redacted())
            }
        }
    };
}

secret_url!(
    /// An AMQP URI (`amqp://user:pass@host:port/vhost`), its password hidden
    /// when shown.
    BrokerUrl
);

secret_url!(
    /// A database URL (`sqlite://PATH` or `postgres://...`), its password
    /// hidden when shown.
    DatabaseUrl
);

impl BrokerUrl {
    /// The virtual host the URL names, percent-decoded: `/` for an empty
    /// path or `%2f` (the AMQP URI rules).
    pub fn vhost(&self) -> String {
        let rest = self.0.find("://").map_or(&self.0[..], |i| &self.0[i + 3..]);
        // After the credentials, which may hold an unencoded `/`.
        let rest = rest.rfind('@').map_or(rest, |i| &rest[i + 1..]);
        let path = rest
            .find('/')
            .map_or("", |i| &rest[i + 1..])
            .split(['?', '#'])
            .next()
            .unwrap_or_default();
        if path.is_empty() {
            return "/".to_owned();
        }
        percent_decode(path)
    }
}

/// `%XX` sequences decoded; anything malformed kept as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl DatabaseUrl {
    /// Whether this is a PostgreSQL URL (`postgres://` or `postgresql://`).
    pub fn is_postgres(&self) -> bool {
        let lower = self.0.to_ascii_lowercase();
        lower.starts_with("postgres://") || lower.starts_with("postgresql://")
    }

    /// The file of a `sqlite://PATH` or `sqlite:PATH` URL (query removed);
    /// `None` for other URLs.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        let rest = self
            .0
            .strip_prefix("sqlite://")
            .or_else(|| self.0.strip_prefix("sqlite:"))?;
        let path = rest.split('?').next().unwrap_or_default();
        Some(PathBuf::from(path))
    }
}

/// Replaces the password of `scheme://user:pass@host...` with `***`. The
/// credentials are taken to end at the last `@`, so a password holding an
/// unencoded `/` or `@` is still hidden; when in doubt, more is hidden.
pub(super) fn redact_userinfo(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    let Some(colon) = rest[..at].find(':') else {
        return url.to_string();
    };
    format!("{}***{}", &url[..start + colon + 1], &rest[at..])
}

/// Replaces the password in any `scheme://user:pass@host...` URL with `***`
/// (for URLs that are not the broker's, such as the management API's).
pub fn redact_url(url: &str) -> String {
    redact_userinfo(url)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;

    #[test]
    fn broker_url_names_its_vhost() {
        for (url, vhost) in [
            ("amqp://guest:guest@127.0.0.1:5672/%2f", "/"),
            ("amqp://guest:guest@127.0.0.1:5672/%2F", "/"),
            ("amqp://h:5672", "/"),
            ("amqp://h:5672/", "/"),
            ("amqps://u:p@h/prod", "prod"),
            ("amqp://u:p@h/eu%2Fprod?heartbeat=10", "eu/prod"),
            ("amqp://u:p@h/a%zz", "a%zz"),
            ("amqp://u:p/w@h/v", "v"),
        ] {
            assert_eq!(BrokerUrl::new(url).vhost(), vhost, "{url}");
        }
    }

    #[test]
    fn broker_url_is_redacted() {
        let url = BrokerUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(url.to_string(), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(
            format!("{url:?}"),
            "BrokerUrl(\"amqp://guest:***@127.0.0.1:5672/%2f\")"
        );
        assert_eq!(url.expose(), "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(
            BrokerUrl::new("amqps://u:p/a@ss@h/v").redacted(),
            "amqps://u:***@h/v"
        );
        assert_eq!(
            BrokerUrl::new("amqp://h:5672/v").redacted(),
            "amqp://h:5672/v"
        );
        assert_eq!(
            BrokerUrl::new("amqp://user@h/v").redacted(),
            "amqp://user@h/v"
        );
        let c = Config::from_toml("").unwrap();
        assert!(!format!("{c:?}").contains("guest:guest"));
    }

    #[test]
    fn http_defaults_and_environment() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.http, HttpConfig::default());
        assert!(!c.http.allow_loopback);
        assert!(c.worker.type_concurrency.is_empty());
        let c = Config::load_from(
            None,
            &env(&[
                ("WARREN__HTTP__ALLOW_LOOPBACK", "true"),
                ("WARREN__HTTP__DENY", "10.0.0.0/8, *.internal"),
                ("WARREN__HTTP__MAX_REDIRECTS", "0"),
            ]),
        )
        .unwrap();
        assert!(c.http.allow_loopback);
        assert_eq!(c.http.deny, ["10.0.0.0/8", "*.internal"]);
        assert_eq!(c.http.max_redirects, 0);
        let c = Config::from_toml("[worker.type_concurrency]\n\"file.download\" = 2").unwrap();
        assert_eq!(c.worker.type_concurrency["file.download"], 2);
    }

    #[test]
    fn host_rules_parse() {
        use std::net::{Ipv4Addr, Ipv6Addr};
        assert_eq!(
            HostRule::parse("10.0.0.0/8"),
            Ok(HostRule::Network(Ipv4Addr::new(10, 0, 0, 0).into(), 8))
        );
        assert_eq!(
            HostRule::parse("192.0.2.7"),
            Ok(HostRule::Network(Ipv4Addr::new(192, 0, 2, 7).into(), 32))
        );
        assert_eq!(
            HostRule::parse("fd00::/8"),
            Ok(HostRule::Network(
                "fd00::".parse::<Ipv6Addr>().unwrap().into(),
                8
            ))
        );
        assert_eq!(
            HostRule::parse("API.Example.com."),
            Ok(HostRule::Host("api.example.com".into()))
        );
        assert_eq!(
            HostRule::parse("*.example.com"),
            Ok(HostRule::Subdomains("example.com".into()))
        );
        assert!(HostRule::parse("10.0.0.0/33").is_err());
        assert!(HostRule::parse("exa mple.com").is_err());
        assert!(HostRule::parse("").is_err());
        assert!(HostRule::parse("*.").is_err());
        assert_eq!(
            HostRule::parse("10.1.0.0/8").unwrap_err(),
            "has bits set past its /8 prefix: write 10.0.0.0/8"
        );
    }

    #[test]
    fn http_rules() {
        one_issue(
            "[http]\ndeny = [\"10.0.0.0/8\", \"http://x\"]",
            "config key http.deny[1]: \"http://x\" is not a host name, address or network: \
             use a host name (api.example.com), *.domain for its subdomains, an address \
             (192.0.2.7) or a network (10.0.0.0/8, fd00::/8)",
        );
        one_issue(
            "[http]\nmax_redirects = 50",
            "config key http.max_redirects: 50 is above 20: a longer chain is a loop or an \
             abuse; lower it (0 follows none)",
        );
        one_issue(
            "[http]\nmax_response_bytes = 100000",
            "config key http.max_response_bytes: 100000 is above limits.max_result_bytes = \
             65536: such a body would not fit in the result, which would be cut to a preview; \
             lower it or raise limits.max_result_bytes",
        );
        assert_eq!(
            issues("[http]\ntimeout_ms = 0\nconnect_timeout_ms = 0\nmax_file_bytes = 0").len(),
            3
        );
    }
}
