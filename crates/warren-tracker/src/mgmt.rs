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
    /// `work`, `dead`, `unroutable`, `delay` (intake, wait and release tiers),
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
        // A work queue's tenant directory holds records, not tasks; its
        // lanes and tenant queues count with it.
        r if r.starts_with("q.") && r.ends_with(".tenants") => "internal",
        r if r.starts_with("q.") => "work",
        r if r.starts_with("paused.") => "paused",
        r if r.starts_with("wait.") || r.starts_with("release.") => "delay",
        _ => "internal",
    }
}

/// The one-line error for a management API that did not answer.
fn unreachable(target: &MgmtTarget, e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut why = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        why = s.to_string();
        source = s.source();
    }
    format!(
        "management API not reachable at {}: {} (enable it with `rabbitmq-plugins enable \
         rabbitmq_management` and point broker.management_url at it)",
        target.api_base(),
        why
    )
}

impl MgmtTarget {
    /// The API's root, `http://host:15672/api`, without credentials.
    pub fn api_base(&self) -> Url {
        let mut url = self.queues_url.clone();
        let path = url.path().to_owned();
        let root = path
            .rfind("/api/queues/")
            .map_or(path.as_str(), |i| &path[..i + 4]);
        let root = root.to_owned();
        url.set_path(&root);
        url
    }

    /// `api_base()` followed by `path`, where `{vhost}` stands for the
    /// vhost as `queues_url` spells it.
    pub(crate) fn api_url(&self, path: &str) -> Url {
        let vhost = self.queues_url.path().rsplit('/').next().unwrap_or("%2F");
        let mut url = self.api_base();
        let full = format!("{}{}", url.path(), path.replace("{vhost}", vhost));
        url.set_path(&full);
        url
    }

    /// GETs one JSON document of the API.
    pub(crate) async fn get(&self, http: &reqwest::Client, url: Url) -> Result<Value, String> {
        let response = http
            .get(url.clone())
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| unreachable(self, e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!(
                "management API {url} answered {status}: check broker.management_url and its \
                 credentials"
            ));
        }
        response
            .json()
            .await
            .map_err(|e| format!("management API {url}: {}", e.without_url()))
    }
}

/// One consumer on a work queue (or one of its lanes) of this prefix.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConsumerInfo {
    /// The queue it consumes (`warren.q.io` or `warren.q.io.lane.2`).
    pub queue: String,
    /// The short name of the work queue (`io`).
    pub short: String,
    /// The name its connection gave itself (`warren worker host/pid`), else
    /// the broker's name for the connection, else `unknown`.
    pub connection: String,
}

/// The names the vhost's connections gave themselves, by the broker's name
/// for each, where the API lists them (empty when it does not answer).
pub(crate) async fn connection_names(
    http: &reqwest::Client,
    target: &MgmtTarget,
) -> std::collections::HashMap<String, String> {
    let mut given = std::collections::HashMap::new();
    let url = target.api_url("/vhosts/{vhost}/connections");
    if let Ok(list) = target.get(http, url).await {
        for conn in list.as_array().map(Vec::as_slice).unwrap_or_default() {
            let name = conn["name"].as_str().unwrap_or_default();
            let own = conn["user_provided_name"]
                .as_str()
                .or_else(|| conn["client_properties"]["connection_name"].as_str());
            if let Some(own) = own {
                given.insert(name.to_owned(), own.to_owned());
            }
        }
    }
    given
}

/// The consumers of this prefix's work queues and lanes, by connection name.
pub async fn work_consumers(
    http: &reqwest::Client,
    config: &Config,
) -> Result<Vec<ConsumerInfo>, String> {
    let target = MgmtTarget::from_config(config)?;
    let consumers = target
        .get(http, target.api_url("/consumers/{vhost}"))
        .await?;
    let names = config.names();
    let mut found: Vec<(String, String, String)> = Vec::new();
    for c in consumers.as_array().map(Vec::as_slice).unwrap_or_default() {
        let Some(queue) = c["queue"]["name"].as_str() else {
            continue;
        };
        let Some(short) = names.short_queue_name(queue) else {
            continue;
        };
        let conn = c["channel_details"]["connection_name"]
            .as_str()
            .unwrap_or_default();
        found.push((queue.to_owned(), short.to_owned(), conn.to_owned()));
    }
    let given = if found.is_empty() {
        std::collections::HashMap::new()
    } else {
        connection_names(http, &target).await
    };
    let mut out: Vec<ConsumerInfo> = found
        .into_iter()
        .map(|(queue, short, conn)| ConsumerInfo {
            connection: match given.get(&conn) {
                Some(own) => own.clone(),
                None if conn.is_empty() => "unknown".to_owned(),
                None => conn,
            },
            queue,
            short,
        })
        .collect();
    out.sort_by(|a, b| (&a.connection, &a.queue).cmp(&(&b.connection, &b.queue)));
    Ok(out)
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
        .map_err(|e| unreachable(&target, e))?;
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
        assert_eq!(t.api_base().as_str(), "https://rabbit:15671/mgmt/api");
        assert_eq!(
            t.api_url("/vhosts/{vhost}/connections").as_str(),
            "https://rabbit:15671/mgmt/api/vhosts/prod/connections"
        );
    }

    #[test]
    fn queue_kinds() {
        assert_eq!(kind_of("warren", "warren.q.io"), "work");
        assert_eq!(kind_of("warren", "warren.q.io.tenant.overflow"), "work");
        assert_eq!(kind_of("warren", "warren.q.io.tenants"), "internal");
        assert_eq!(kind_of("warren", "warren.dead"), "dead");
        assert_eq!(kind_of("warren", "warren.wait.16s"), "delay");
        assert_eq!(kind_of("warren", "warren.release.4s"), "delay");
        assert_eq!(kind_of("warren", "warren.tracker.events"), "tracker");
        assert_eq!(kind_of("warren", "warren.cancels"), "internal");
        assert_eq!(decode("a%2Fb%zz"), "a/b%zz");
    }
}
