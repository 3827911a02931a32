//! The RabbitMQ management HTTP API, as tests use it.

use std::time::Duration;

use serde_json::{json, Value};

/// A management API client (guest/guest on 127.0.0.1:15672 unless
/// `WARREN__BROKER__MANAGEMENT_URL` says otherwise).
pub struct Mgmt {
    base: String,
    http: reqwest::Client,
}

impl Default for Mgmt {
    fn default() -> Self {
        Self::new()
    }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Mgmt {
    /// A client for the local management API.
    pub fn new() -> Self {
        let base = std::env::var("WARREN__BROKER__MANAGEMENT_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:15672".to_owned());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("http client");
        Mgmt { base, http }
    }

    async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}/api/{path}", self.base))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .expect("management API reachable (scripts/test.sh enables it)")
            .error_for_status()
            .expect("management API answer")
            .json()
            .await
            .expect("JSON")
    }

    async fn delete(&self, path: &str) {
        let _ = self
            .http
            .delete(format!("{}/api/{path}", self.base))
            .basic_auth("guest", Some("guest"))
            .send()
            .await;
    }

    /// Publishes like the console's "Publish message" form; returns whether it was routed.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &str,
        properties: Value,
    ) -> bool {
        let body = json!({
            "properties": properties,
            "routing_key": routing_key,
            "payload": payload,
            "payload_encoding": "string",
        });
        let v: Value = self
            .http
            .post(format!(
                "{}/api/exchanges/%2F/{}/publish",
                self.base,
                enc(exchange)
            ))
            .basic_auth("guest", Some("guest"))
            .json(&body)
            .send()
            .await
            .expect("management API reachable")
            .error_for_status()
            .expect("publish accepted")
            .json()
            .await
            .expect("JSON");
        v["routed"].as_bool().unwrap_or(false)
    }

    /// Waits (bounded) for a connection of `role` (client-given name
    /// `warren <role> <host>/<pid>`) whose name ends with `suffix` and whose
    /// broker name is not in `except`; returns its broker name.
    pub async fn wait_connection(
        &self,
        role: &str,
        suffix: &str,
        except: &[String],
        timeout: Duration,
    ) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.get("connections").await;
            let found = v.as_array().into_iter().flatten().find_map(|c| {
                let client_name = c["client_properties"]["connection_name"].as_str()?;
                let name = c["name"].as_str()?;
                (client_name.starts_with(&format!("warren {role} "))
                    && client_name.ends_with(suffix)
                    && !except.iter().any(|e| e == name))
                .then(|| name.to_owned())
            });
            if let Some(name) = found {
                return name;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no connection named warren {role} *{suffix} appeared within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The prefetch count of each consumer of `queue`.
    pub async fn consumer_prefetches(&self, queue: &str) -> Vec<u64> {
        let v = self.get("consumers").await;
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["queue"]["name"].as_str() == Some(queue))
            .filter_map(|c| c["prefetch_count"].as_u64())
            .collect()
    }

    /// Force-closes a connection, as an operator would from the console.
    pub async fn close_connection(&self, name: &str) {
        let _ = self
            .http
            .delete(format!("{}/api/connections/{}", self.base, enc(name)))
            .basic_auth("guest", Some("guest"))
            .header("X-Reason", "closed by a Warren fault test")
            .send()
            .await;
    }

    /// Creates (or replaces) broker user `name` with `password`, no tags,
    /// and the three permission regexes on the `/` vhost.
    pub async fn add_user(&self, name: &str, password: &str, perms: [&str; 3]) {
        let put = |path: String, body: Value| {
            let http = self.http.clone();
            let url = format!("{}/api/{path}", self.base);
            async move {
                http.put(&url)
                    .basic_auth("guest", Some("guest"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("PUT {url}: {e}"))
                    .error_for_status()
                    .unwrap_or_else(|e| panic!("PUT {url}: {e}"));
            }
        };
        put(
            format!("users/{}", enc(name)),
            json!({"password": password, "tags": ""}),
        )
        .await;
        let [configure, write, read] = perms;
        put(
            format!("permissions/%2F/{}", enc(name)),
            json!({"configure": configure, "write": write, "read": read}),
        )
        .await;
    }

    /// Deletes broker user `name` (and its permissions); a missing user is fine.
    pub async fn delete_user(&self, name: &str) {
        self.delete(&format!("users/{}", enc(name))).await;
    }

    /// One queue as the management API shows it (its counts are the
    /// broker's statistics, refreshed every few seconds).
    pub async fn queue(&self, name: &str) -> Value {
        self.get(&format!("queues/%2F/{}", enc(name))).await
    }

    /// Every queue whose name starts with `prefix.`: name, type (`classic`,
    /// `quorum`, `stream`) and declaration arguments.
    pub async fn queues_of(&self, prefix: &str) -> Vec<(String, String, Value)> {
        let dot = format!("{prefix}.");
        let v = self.get("queues/%2F").await;
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|q| {
                let name = q["name"].as_str()?;
                name.starts_with(&dot).then(|| {
                    (
                        name.to_owned(),
                        q["type"].as_str().unwrap_or("").to_owned(),
                        q["arguments"].clone(),
                    )
                })
            })
            .collect()
    }

    /// Deletes every queue and exchange whose name starts with `prefix.`.
    pub async fn delete_prefix(&self, prefix: &str) {
        let dot = format!("{prefix}.");
        for kind in ["queues", "exchanges"] {
            let v = self.get(&format!("{kind}/%2F")).await;
            for name in v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|o| o["name"].as_str())
                .filter(|n| n.starts_with(&dot))
            {
                self.delete(&format!("{kind}/%2F/{}", enc(name))).await;
            }
        }
    }
}
