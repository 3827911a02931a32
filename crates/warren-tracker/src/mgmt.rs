//! Queue depths, consumers and rates from the RabbitMQ management HTTP API
//! (`broker.management_url`).
//!
//! Credentials come from the management URL's user info, else from the
//! broker URL's, else `guest`/`guest`; they are sent as basic auth and never
//! appear in a URL that could reach a log or an error.

use reqwest::Url;
use serde::Serialize;
use serde_json::Value;
use warren_core::Config;

/// One queue of this prefix.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueInfo {
    /// Full name (`warren.q.io`).
    pub name: String,
    /// `work`, `dead`, `unroutable`, `delay` (intake and wait tiers),
    /// `tracker`, or `internal`.
    pub kind: &'static str,
    /// The short name of a work queue (`io`).
    pub short: Option<String>,
    /// Messages ready and unacknowledged.
    pub messages: u64,
    /// Messages ready for delivery.
    pub ready: u64,
    /// Messages delivered and not yet acknowledged.
    pub unacked: u64,
    /// Consumers attached.
    pub consumers: u64,
    /// Messages published to it per second.
    pub publish_rate: f64,
    /// Messages delivered from it per second.
    pub deliver_rate: f64,
    /// Messages acknowledged per second.
    pub ack_rate: f64,
}

/// Where and as whom to ask.
#[derive(Debug, Clone)]
pub struct MgmtTarget {
    /// `http://host:15672/api/queues/<vhost>`, without credentials.
    pub queues_url: Url,
    /// Basic auth user.
    pub user: String,
    /// Basic auth password.
    pub password: String,
}

/// Percent-decodes URL user info.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl MgmtTarget {
    /// The target for a configuration; errors name the key.
    pub fn from_config(config: &Config) -> Result<MgmtTarget, String> {
        let mut base = Url::parse(config.broker.management_url.trim_end_matches('/'))
            .map_err(|e| format!("broker.management_url is not a URL: {e}"))?;
        let broker = Url::parse(config.broker.url.expose())
            .map_err(|e| format!("broker.url is not a URL: {e}"))?;
        let (user, password) = if !base.username().is_empty() {
            (
                decode(base.username()),
                decode(base.password().unwrap_or_default()),
            )
        } else if !broker.username().is_empty() {
            (
                decode(broker.username()),
                decode(broker.password().unwrap_or_default()),
            )
        } else {
            ("guest".to_owned(), "guest".to_owned())
        };
        let _ = base.set_username("");
        let _ = base.set_password(None);
        let vhost = match broker.path().trim_start_matches('/') {
            "" => "%2F".to_owned(),
            v => v.to_owned(),
        };
        let path = format!("{}/api/queues/{vhost}", base.path().trim_end_matches('/'));
        base.set_path(&path);
        Ok(MgmtTarget {
            queues_url: base,
            user,
            password,
        })
    }
}

/// The kind of a queue of prefix `prefix`.
fn kind_of(prefix: &str, name: &str) -> &'static str {
    let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('.')) else {
        return "internal";
    };
    match rest {
        "dead" => "dead",
        "unroutable" => "unroutable",
        "delay.intake" | "wait.due" => "delay",
        "tracker.events" => "tracker",
        r if r.starts_with("q.") => "work",
        r if r.starts_with("wait.") => "delay",
        _ => "internal",
    }
}

fn rate(q: &Value, what: &str) -> f64 {
    q["message_stats"][what]["rate"].as_f64().unwrap_or(0.0)
}

/// The queues whose names start with the configured prefix and a dot.
pub async fn queues(http: &reqwest::Client, config: &Config) -> Result<Vec<QueueInfo>, String> {
    let target = MgmtTarget::from_config(config)?;
    let prefix = config.prefix.as_str();
    let pattern = format!("^{}\\.", prefix.replace('.', "\\."));
    let response = http
        .get(target.queues_url.clone())
        .query(&[
            ("page", "1"),
            ("page_size", "500"),
            ("name", pattern.as_str()),
            ("use_regex", "true"),
        ])
        .basic_auth(&target.user, Some(&target.password))
        .send()
        .await
        .map_err(|e| format!("management API {}: {}", target.queues_url, e.without_url()))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!(
            "management API {} answered {status}: check broker.management_url and its credentials",
            target.queues_url
        ));
    }
    let body: Value = response
        .json()
        .await
        .map_err(|e| format!("management API {}: {}", target.queues_url, e.without_url()))?;
    let items = body["items"].as_array().cloned().unwrap_or_default();
    let names = config.names();
    let mut out: Vec<QueueInfo> = items
        .iter()
        .filter_map(|q| {
            let name = q["name"].as_str()?.to_owned();
            let u = |k: &str| q[k].as_u64().unwrap_or(0);
            Some(QueueInfo {
                kind: kind_of(prefix, &name),
                short: names.short_queue_name(&name).map(str::to_owned),
                messages: u("messages"),
                ready: u("messages_ready"),
                unacked: u("messages_unacknowledged"),
                consumers: u("consumers"),
                publish_rate: rate(q, "publish_details"),
                deliver_rate: rate(q, "deliver_get_details"),
                ack_rate: rate(q, "ack_details"),
                name,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_the_management_url_then_the_broker_url() {
        let mut c = Config::from_toml("").unwrap();
        let t = MgmtTarget::from_config(&c).unwrap();
        assert_eq!(
            t.queues_url.as_str(),
            "http://127.0.0.1:15672/api/queues/%2f"
        );
        assert_eq!((t.user.as_str(), t.password.as_str()), ("guest", "guest"));

        c.broker.url = warren_core::config::BrokerUrls::new("amqp://ops:p%40ss@rabbit:5672/prod");
        c.broker.management_url = "http://rabbit:15672/".into();
        let t = MgmtTarget::from_config(&c).unwrap();
        assert_eq!(t.queues_url.as_str(), "http://rabbit:15672/api/queues/prod");
        assert_eq!((t.user.as_str(), t.password.as_str()), ("ops", "p@ss"));

        c.broker.management_url = "https://admin:s3cret@rabbit:15671/mgmt".into();
        let t = MgmtTarget::from_config(&c).unwrap();
        assert_eq!(
            t.queues_url.as_str(),
            "https://rabbit:15671/mgmt/api/queues/prod"
        );
        assert_eq!((t.user.as_str(), t.password.as_str()), ("admin", "s3cret"));
        assert!(!t.queues_url.as_str().contains("s3cret"));
    }

    #[test]
    fn queue_kinds() {
        assert_eq!(kind_of("warren", "warren.q.io"), "work");
        assert_eq!(kind_of("warren", "warren.dead"), "dead");
        assert_eq!(kind_of("warren", "warren.wait.16s"), "delay");
        assert_eq!(kind_of("warren", "warren.tracker.events"), "tracker");
        assert_eq!(kind_of("warren", "warren.cancels"), "internal");
        assert_eq!(decode("a%2Fb%zz"), "a/b%zz");
    }
}
