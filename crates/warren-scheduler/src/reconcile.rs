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
}

/// Why the topology could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// An existing object disagrees with the plan; the text says how to fix it.
    #[error("{0}")]
    Conflict(String),
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
        .map_err(fail(format!("declare queue {}", q.name)))?;
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
