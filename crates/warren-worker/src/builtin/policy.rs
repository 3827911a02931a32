//! Where outbound HTTP may go: `http.allow` / `http.deny`, loopback, and the
//! addresses that are always refused (link-local and cloud metadata).
//!
//! A URL is checked before each request and each redirect hop; a host name
//! is checked again by [`GuardedResolver`] on the addresses it resolves to,
//! which are the only ones the connection may use. There is therefore no
//! window between "checked" and "connected" for a DNS answer to change
//! (DNS rebinding).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;
use warren_core::config::{HostRule, HttpConfig};

/// Networks no task may reach, whatever the configuration says: IPv4
/// link-local (which holds the cloud metadata service 169.254.169.254),
/// IPv6 link-local, and AWS's IPv6 metadata address.
const ALWAYS_DENIED: [(IpAddr, u8, &str); 3] = [
    (
        IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)),
        16,
        "link-local (cloud metadata)",
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)),
        10,
        "link-local",
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
        128,
        "cloud metadata",
    ),
];

/// A destination the policy refuses; the text names the rule and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Denied {}

/// The outbound rules, parsed from `[http]`.
#[derive(Debug, Clone)]
pub struct Policy {
    allow: Vec<(usize, HostRule)>,
    deny: Vec<(usize, HostRule)>,
    allow_loopback: bool,
    /// A webhook's configured host, allowed beside `http.allow` (and
    /// loopback, when it is a loopback host).
    endpoint: Option<Endpoint>,
}

/// The host of a configured endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    Name(String),
    Addr(IpAddr),
}

impl Policy {
    /// The rules of a validated `[http]` section (entries that do not parse
    /// cannot occur after validation and are skipped).
    pub fn new(http: &HttpConfig) -> Self {
        let parse = |list: &[String]| {
            list.iter()
                .enumerate()
                .filter_map(|(i, s)| HostRule::parse(s).ok().map(|r| (i, r)))
                .collect()
        };
        Policy {
            allow: parse(&http.allow),
            deny: parse(&http.deny),
            allow_loopback: http.allow_loopback,
            endpoint: None,
        }
    }

    /// These rules, with the host of `url` (a configured webhook endpoint)
    /// allowed: it needs no `http.allow` entry, and it may be a loopback
    /// host without `http.allow_loopback`. `http.deny` and the addresses
    /// always refused still apply to it; other hosts (redirect targets)
    /// follow the rules as they are.
    pub fn with_endpoint(&self, url: &Url) -> Policy {
        let endpoint = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(Endpoint::Addr(IpAddr::V4(ip))),
            Some(url::Host::Ipv6(ip)) => Some(Endpoint::Addr(canonical(IpAddr::V6(ip)))),
            Some(url::Host::Domain(name)) => Some(Endpoint::Name(normalize(name))),
            None => None,
        };
        Policy {
            endpoint,
            ..self.clone()
        }
    }

    /// Whether a name, or an address used without a name, is the endpoint's.
    fn is_endpoint(&self, name: Option<&str>, ip: IpAddr) -> bool {
        match (&self.endpoint, name) {
            (Some(Endpoint::Name(e)), Some(n)) => *e == normalize(n),
            (Some(Endpoint::Addr(e)), None) => *e == ip,
            _ => false,
        }
    }

    /// Checks a URL before it is requested: its scheme, and its host, fully
    /// when it is an address, by name otherwise (the addresses a name
    /// resolves to are checked by [`GuardedResolver`]).
    pub fn check_url(&self, url: &Url) -> Result<(), Denied> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Denied(format!(
                "scheme {:?} is not allowed: use http or https",
                url.scheme()
            )));
        }
        match url.host() {
            None => Err(Denied("the URL has no host".into())),
            Some(url::Host::Ipv4(ip)) => self.check_addr(None, IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_addr(None, IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) => self.check_name(name),
        }
    }

    /// Checks a host name against the name rules. When `http.allow` lists
    /// only names, a name it does not list is refused here, before any DNS.
    fn check_name(&self, name: &str) -> Result<(), Denied> {
        let name = normalize(name);
        if let Some((i, _)) = self.deny.iter().find(|(_, r)| name_matches(r, &name)) {
            return Err(Denied(format!("host {name} is denied by http.deny[{i}]")));
        }
        let allow_has_networks = self
            .allow
            .iter()
            .any(|(_, r)| matches!(r, HostRule::Network(..)));
        let is_endpoint = self.endpoint == Some(Endpoint::Name(name.clone()));
        if !self.allow.is_empty()
            && !allow_has_networks
            && !is_endpoint
            && !self.allow.iter().any(|(_, r)| name_matches(r, &name))
        {
            return Err(Denied(format!(
                "host {name} is not in http.allow: add it there to allow it"
            )));
        }
        Ok(())
    }

    /// Checks one address a connection would use; `name` is the host name it
    /// was resolved from, if any.
    pub fn check_addr(&self, name: Option<&str>, ip: IpAddr) -> Result<(), Denied> {
        let ip = canonical(ip);
        let endpoint = self.is_endpoint(name, ip);
        let what = match name {
            Some(n) => format!("address {ip} of host {}", normalize(n)),
            None => format!("address {ip}"),
        };
        for candidate in embedded(ip) {
            if let Some((_, _, why)) = ALWAYS_DENIED
                .iter()
                .find(|(net, bits, _)| in_network(candidate, *net, *bits))
            {
                return Err(Denied(format!(
                    "{what} is {why}: such addresses are always refused"
                )));
            }
            if is_loopback(candidate) && !self.allow_loopback && !endpoint {
                return Err(Denied(format!(
                    "{what} is loopback: set http.allow_loopback = true to allow it"
                )));
            }
        }
        let name = name.map(normalize);
        let matches = |r: &HostRule| match r {
            HostRule::Network(net, bits) => in_network(ip, *net, *bits),
            _ => name.as_deref().is_some_and(|n| name_matches(r, n)),
        };
        if let Some((i, _)) = self.deny.iter().find(|(_, r)| matches(r)) {
            return Err(Denied(format!("{what} is denied by http.deny[{i}]")));
        }
        if !self.allow.is_empty() && !endpoint && !self.allow.iter().any(|(_, r)| matches(r)) {
            return Err(Denied(format!(
                "{what} is not in http.allow: add the host or its network there to allow it"
            )));
        }
        Ok(())
    }

    /// Keeps the addresses of `name` this policy allows; refuses the name
    /// when none is left.
    pub fn filter(&self, name: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Denied> {
        if addrs.is_empty() {
            return Ok(addrs);
        }
        let mut first_refusal = None;
        let kept: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.check_addr(Some(name), a.ip()) {
                Ok(()) => true,
                Err(d) => {
                    first_refusal.get_or_insert(d);
                    false
                }
            })
            .collect();
        match (kept.is_empty(), first_refusal) {
            (true, Some(d)) => Err(d),
            _ => Ok(kept),
        }
    }
}

/// A resolver that hands the connector only the addresses the policy
/// allows, so the address checked is the address connected to.
pub struct GuardedResolver {
    /// The rules applied to every answer.
    pub policy: Arc<Policy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            policy.check_name(&host)?;
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = policy.filter(&host, addrs)?;
            let addrs: Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

/// Lowercase, without a trailing dot.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn name_matches(rule: &HostRule, name: &str) -> bool {
    match rule {
        HostRule::Host(h) => h == name,
        HostRule::Subdomains(d) => name
            .strip_suffix(d.as_str())
            .is_some_and(|head| head.ends_with('.')),
        HostRule::Network(..) => false,
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// The address itself, plus the IPv4 address embedded in a NAT64
/// (`64:ff9b::/96`) or 6to4 (`2002::/16`) address, which reach that IPv4
/// address on networks that translate them.
fn embedded(ip: IpAddr) -> Vec<IpAddr> {
    let mut out = vec![ip];
    if let IpAddr::V6(v6) = ip {
        let bits = u128::from(v6);
        let nat64 = IpAddr::V6(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0));
        if in_network(ip, nat64, 96) {
            out.push(IpAddr::V4(Ipv4Addr::from(bits as u32)));
        }
        let six_to_four = IpAddr::V6(Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0));
        if in_network(ip, six_to_four, 16) {
            out.push(IpAddr::V4(Ipv4Addr::from((bits >> 80) as u32)));
        }
    }
    out
}

/// Loopback, and the unspecified address, which a connect turns into the
/// local host.
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified(),
    }
}

fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml: &str) -> Policy {
        Policy::new(&warren_core::Config::from_toml(toml).unwrap().http)
    }

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn metadata_and_link_local_are_always_refused() {
        let open = policy("[http]\nallow_loopback = true\nallow = [\"0.0.0.0/0\", \"::/0\"]");
        for ip in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
        ] {
            let e = open.check_addr(None, addr(ip)).unwrap_err();
            assert!(e.0.contains("always refused"), "{ip}: {e}");
        }
        assert!(open.check_addr(None, addr("93.184.216.34")).is_ok());
        assert!(open
            .check_url(&url("http://169.254.169.254/latest/meta-data/"))
            .is_err());
        assert!(open.check_url(&url("http://[fd00:ec2::254]/")).is_err());
    }

    #[test]
    fn loopback_only_when_configured() {
        let closed = policy("");
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.1",
        ] {
            let e = closed.check_addr(Some("localhost"), addr(ip)).unwrap_err();
            assert!(e.0.contains("http.allow_loopback"), "{ip}: {e}");
        }
        let open = policy("[http]\nallow_loopback = true");
        assert!(open.check_addr(None, addr("127.0.0.1")).is_ok());
        assert!(open.check_addr(None, addr("::1")).is_ok());
    }

    #[test]
    fn deny_wins_and_allow_restricts() {
        let p = policy(
            "[http]\nallow = [\"*.example.com\", \"192.0.2.0/24\"]\n\
             deny = [\"secret.example.com\", \"192.0.2.66\"]",
        );
        assert!(p
            .check_addr(Some("api.example.com"), addr("198.51.100.1"))
            .is_ok());
        assert!(p.check_addr(Some("other.org"), addr("192.0.2.5")).is_ok());
        let e = p
            .check_addr(Some("other.org"), addr("198.51.100.1"))
            .unwrap_err();
        assert!(e.0.contains("not in http.allow"), "{e}");
        let e = p.check_addr(Some("x.org"), addr("192.0.2.66")).unwrap_err();
        assert_eq!(
            e.0,
            "address 192.0.2.66 of host x.org is denied by http.deny[1]"
        );
        let e = p
            .check_url(&url("https://Secret.Example.com./x"))
            .unwrap_err();
        assert_eq!(e.0, "host secret.example.com is denied by http.deny[0]");
        // example.com itself is not a subdomain of example.com.
        assert!(p
            .check_addr(Some("example.com"), addr("198.51.100.1"))
            .is_err());
        assert!(p.check_url(&url("ftp://api.example.com/")).is_err());
    }

    #[test]
    fn names_alone_in_allow_refuse_other_names_before_dns() {
        let p = policy("[http]\nallow = [\"api.example.com\"]");
        assert!(p.check_url(&url("https://api.example.com/")).is_ok());
        let e = p.check_url(&url("https://evil.test/")).unwrap_err();
        assert!(e.0.contains("not in http.allow"), "{e}");
    }

    #[test]
    fn resolver_answers_keep_only_allowed_addresses() {
        let p = policy("");
        let sa = |s: &str| SocketAddr::new(addr(s), 0);
        // A rebinding-style answer mixing a public and a metadata address.
        let kept = p
            .filter(
                "mixed.test",
                vec![sa("169.254.169.254"), sa("198.51.100.7")],
            )
            .unwrap();
        assert_eq!(kept, [sa("198.51.100.7")]);
        let e = p
            .filter("meta.test", vec![sa("169.254.169.254")])
            .unwrap_err();
        assert_eq!(
            e.0,
            "address 169.254.169.254 of host meta.test is link-local (cloud metadata): such \
             addresses are always refused"
        );
    }

    #[test]
    fn a_webhook_endpoint_is_allowed_and_nothing_else() {
        let p = policy("[http]\nallow = [\"api.example.com\"]\ndeny = [\"10.0.0.0/8\"]");
        let hook = p.with_endpoint(&url("http://Hooks.Example.org:8080/x"));
        assert!(hook.check_url(&url("http://hooks.example.org/y")).is_ok());
        assert!(hook
            .check_addr(Some("hooks.example.org"), addr("127.0.0.1"))
            .is_ok());
        assert!(hook.check_url(&url("http://other.example.org/")).is_err());
        // Deny and metadata still apply to the endpoint.
        let e = hook
            .check_addr(Some("hooks.example.org"), addr("10.1.2.3"))
            .unwrap_err();
        assert!(e.0.contains("http.deny[0]"), "{e}");
        assert!(hook
            .check_addr(Some("hooks.example.org"), addr("169.254.169.254"))
            .is_err());
        let local = policy("").with_endpoint(&url("http://127.0.0.1:9000/hook"));
        assert!(local.check_url(&url("http://127.0.0.1:9001/")).is_ok());
        // Another loopback address, or a name resolving to loopback: refused.
        assert!(local.check_url(&url("http://127.0.0.2/")).is_err());
        assert!(local
            .check_addr(Some("localhost"), addr("127.0.0.1"))
            .is_err());
        let meta = policy("").with_endpoint(&url("http://169.254.169.254/"));
        assert!(meta.check_url(&url("http://169.254.169.254/")).is_err());
    }

    #[tokio::test]
    async fn the_resolver_refuses_localhost_by_default() {
        let r = GuardedResolver {
            policy: Arc::new(policy("")),
        };
        let err = match r.resolve("localhost".parse().unwrap()).await {
            Ok(_) => panic!("localhost resolved although loopback is not allowed"),
            Err(e) => e,
        };
        assert!(err.downcast_ref::<Denied>().is_some(), "{err}");
    }
}
