//! Applying a [`TopologyPlan`] to the broker, idempotently.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ExchangeKind};
use std::collections::BTreeMap;
use warren_core::topology::{self, ArgValue, TopologyPlan};

/// What applying a plan did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Exchanges declared (created or confirmed equal).
    pub exchanges: usize,
    /// Queues declared.
    pub queues: usize,
    /// Bindings declared.
    pub bindings: usize,
    /// Bindings removed because the configuration no longer has them.
    pub stale_bindings_removed: usize,
}

/// Why the topology could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// An existing object disagrees with the plan; the text says how to fix it.
    #[error("{0}")]
    Conflict(String),
    /// The broker cannot declare a quorum queue the plan asks for; the text
    /// names the setting and the fix.
    #[error("{0}")]
    QuorumRefused(String),
    /// An object of the plan does not exist, and this user may not declare it.
    #[error("{0}")]
    Missing(String),
    /// Another broker error.
    #[error("{what}: {source}")]
    Broker {
        /// What was being declared.
        what: String,
        /// The broker's error.
        #[source]
        source: lapin::Error,
    },
}

impl TopologyError {
    /// Whether the broker refused the operation for lack of permission
    /// (ACCESS_REFUSED): the user is not allowed to configure the object.
    pub fn is_access_refused(&self) -> bool {
        matches!(self, TopologyError::Broker { source, .. }
            if source.to_string().contains("ACCESS_REFUSED"))
    }
}

/// What [`apply_or_verify`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopologyCheck {
    /// The plan was applied ([`reconcile`]).
    Applied(ApplyReport),
    /// The user may not declare the topology; every exchange and queue of
    /// the plan was found to exist (passive declares, which need no
    /// permission).
    Verified {
        /// Exchanges found.
        exchanges: usize,
        /// Queues found.
        queues: usize,
    },
}

fn table(args: &BTreeMap<String, ArgValue>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in args {
        let v = match v {
            ArgValue::Str(s) => AMQPValue::LongString(s.as_str().into()),
            ArgValue::Int(i) => AMQPValue::LongLongInt(*i),
        };
        t.insert(k.as_str().into(), v);
    }
    t
}

fn kind(k: &topology::ExchangeKind) -> ExchangeKind {
    match k {
        topology::ExchangeKind::Topic => ExchangeKind::Topic,
        topology::ExchangeKind::Fanout => ExchangeKind::Fanout,
        topology::ExchangeKind::Direct => ExchangeKind::Direct,
    }
}

/// Declares every exchange, queue and binding of `plan`. Re-applying an
/// unchanged plan changes nothing. A conflicting existing object closes the
/// channel with PRECONDITION_FAILED; that is reported as
/// [`TopologyError::Conflict`] with the fix.
pub async fn apply(conn: &Connection, plan: &TopologyPlan) -> Result<ApplyReport, TopologyError> {
    let ch = conn
        .create_channel()
        .await
        .map_err(|source| TopologyError::Broker {
            what: "open channel".into(),
            source,
        })?;
    let fail = |what: String| {
        move |source: lapin::Error| {
            let text = source.to_string();
            if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent") {
                TopologyError::Conflict(plan.explain_conflict(&text))
            } else {
                TopologyError::Broker { what, source }
            }
        }
    };
    let mut report = ApplyReport::default();
    for x in &plan.exchanges {
        ch.exchange_declare(
            x.name.as_str().into(),
            kind(&x.kind),
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            table(&x.arguments),
        )
        .await
        .map_err(fail(format!("declare exchange {}", x.name)))?;
        report.exchanges += 1;
    }
    for q in &plan.queues {
        ch.queue_declare(
            q.name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            table(&q.arguments),
        )
        .await
        .map_err(|source| {
            match plan.explain_quorum_refusal(&q.name, &source.to_string()) {
                Some(why) => TopologyError::QuorumRefused(why),
                None => fail(format!("declare queue {}", q.name))(source),
            }
        })?;
        report.queues += 1;
    }
    for b in &plan.bindings {
        ch.queue_bind(
            b.queue.as_str().into(),
            b.exchange.as_str().into(),
            b.routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(fail(format!(
            "bind {} to {} with {:?}",
            b.queue, b.exchange, b.routing_key
        )))?;
        report.bindings += 1;
    }
    let _ = ch.close(200, "topology applied".into()).await;
    Ok(report)
}

/// [`apply`], then [`prune_stale_bindings`] with the configuration's
/// management API.
pub async fn reconcile(
    conn: &Connection,
    config: &warren_core::Config,
) -> Result<ApplyReport, TopologyError> {
    let plan = TopologyPlan::from_config(config);
    let mut report = apply(conn, &plan).await?;
    report.stale_bindings_removed = match config.broker.url.first() {
        Some(url) => prune_stale_bindings(conn, &plan, url, &config.broker.management_url).await?,
        None => 0,
    };
    if !config.tracker.track_published {
        drop_published_copies(conn, config).await?;
    }
    Ok(report)
}

/// With `tracker.track_published = false`, deletes `P.tracker.published`
/// (with its bindings), so that turning the copies off ends their cost.
async fn drop_published_copies(
    conn: &Connection,
    config: &warren_core::Config,
) -> Result<(), TopologyError> {
    let queue = config.names().tracker_published();
    let ch = conn
        .create_channel()
        .await
        .map_err(|source| TopologyError::Broker {
            what: "open channel".into(),
            source,
        })?;
    ch.queue_delete(queue.as_str().into(), Default::default())
        .await
        .map_err(|source| TopologyError::Broker {
            what: format!("delete {queue} (tracker.track_published = false)"),
            source,
        })?;
    let _ = ch.close(200, "published copies off".into()).await;
    Ok(())
}

/// [`reconcile`] when the broker lets this user declare the topology;
/// when it refuses (ACCESS_REFUSED: a least-privilege user, the topology
/// being the operator's, see `warren topology permissions`), checks instead
/// that every exchange and queue of the plan exists, so that a process
/// started before `warren topology apply` fails with that fix rather than
/// run against a missing object. Bindings cannot be checked without the
/// management API and are left to the operator.
///
/// With `scheduler.declare_topology = false` it only checks, and the broker
/// logs no refusal.
pub async fn apply_or_verify(
    conn: &Connection,
    config: &warren_core::Config,
) -> Result<TopologyCheck, TopologyError> {
    let plan = TopologyPlan::from_config(config);
    if !config.scheduler.declare_topology {
        return verify(conn, &plan).await;
    }
    match reconcile(conn, config).await {
        Ok(report) => Ok(TopologyCheck::Applied(report)),
        Err(e) if e.is_access_refused() => {
            tracing::warn!(
                error = %e,
                "this broker user may not declare the topology; checking that it exists \
                 instead (set scheduler.declare_topology = false for a least-privilege user)"
            );
            verify(conn, &plan).await
        }
        Err(e) => Err(e),
    }
}

/// Passive declares of every exchange and queue of `plan`.
pub async fn verify(
    conn: &Connection,
    plan: &TopologyPlan,
) -> Result<TopologyCheck, TopologyError> {
    let open = || async {
        conn.create_channel()
            .await
            .map_err(|source| TopologyError::Broker {
                what: "open channel".into(),
                source,
            })
    };
    let ch = open().await?;
    for x in &plan.exchanges {
        ch.exchange_declare(
            x.name.as_str().into(),
            kind(&x.kind),
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| missing("exchange", &x.name, e))?;
    }
    for q in &plan.queues {
        ch.queue_declare(
            q.name.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| missing("queue", &q.name, e))?;
    }
    let _ = ch.close(200, "topology checked".into()).await;
    Ok(TopologyCheck::Verified {
        exchanges: plan.exchanges.len(),
        queues: plan.queues.len(),
    })
}

/// The error of a failed passive declare of `object` `name`.
fn missing(object: &str, name: &str, source: lapin::Error) -> TopologyError {
    if source.to_string().contains("NOT_FOUND") {
        TopologyError::Missing(format!(
            "{object} {name} does not exist and this broker user may not declare it: \
             apply the topology as the operator first (`warren topology apply`)"
        ))
    } else {
        TopologyError::Broker {
            what: format!("check {object} {name}"),
            source,
        }
    }
}

/// Bindings the broker has from Warren's exchanges into Warren's queues that
/// the plan no longer has (a route removed, a default queue added) are
/// removed, so a task is never routed by a stale binding. Listing bindings needs the management
/// API; when it does not answer, the check is skipped with a warning.
pub async fn prune_stale_bindings(
    conn: &Connection,
    plan: &TopologyPlan,
    url: &warren_core::config::BrokerUrl,
    management_url: &str,
) -> Result<usize, TopologyError> {
    let uri: lapin::uri::AMQPUri = match url.expose().parse() {
        Ok(u) => u,
        Err(_) => return Ok(0),
    };
    let user = &uri.authority.userinfo;
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .expect("an HTTP client with default settings");
    let vhost = percent_encode(&uri.vhost);
    let mut removed = 0;
    let ch = conn
        .create_channel()
        .await
        .map_err(|source| TopologyError::Broker {
            what: "open channel".into(),
            source,
        })?;
    for x in &plan.exchanges {
        let api = format!(
            "{}/api/exchanges/{vhost}/{}/bindings/source",
            management_url.trim_end_matches('/'),
            percent_encode(&x.name)
        );
        let answer = http
            .get(&api)
            .basic_auth(&user.username, Some(&user.password))
            .send()
            .await
            .and_then(|r| r.error_for_status());
        let bindings: Vec<serde_json::Value> = match answer {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(
                    error = %e.without_url(),
                    "management API unreachable: stale bindings were not checked"
                );
                return Ok(removed);
            }
        };
        for b in bindings {
            let (Some(queue), Some(key), Some("queue")) = (
                b["destination"].as_str(),
                b["routing_key"].as_str(),
                b["destination_type"].as_str(),
            ) else {
                continue;
            };
            // Only bindings into Warren's own queues are managed: queues that
            // others bind to these exchanges (event taps, watchers, the
            // tracker) are theirs.
            let ours = plan.queues.iter().any(|q| q.name == queue);
            let planned = plan
                .bindings
                .iter()
                .any(|p| p.exchange == x.name && p.queue == queue && p.routing_key == key);
            if planned || !ours {
                continue;
            }
            tracing::info!(exchange = %x.name, queue, key, "removing a binding the configuration no longer has");
            ch.queue_unbind(
                queue.into(),
                x.name.as_str().into(),
                key.into(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| TopologyError::Broker {
                what: format!("unbind {queue} from {} ({key:?})", x.name),
                source,
            })?;
            removed += 1;
        }
    }
    let _ = ch.close(200, "pruned".into()).await;
    Ok(removed)
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
