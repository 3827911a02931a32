//! `warren topology migrate`: redeclares every durable queue whose type or
//! arguments differ from the plan (such as after setting
//! `topology.replicated`), moving its messages out and back so none is lost.
//!
//! For each such queue `Q`: a holding queue `Q.migrating` is declared and
//! bound like `Q`, so what is routed meanwhile is kept; every message of `Q`
//! is copied to it (each acknowledged in `Q` only once the broker confirmed
//! the copy); `Q` is deleted (what reached it meanwhile through a binding
//! reached the holding queue too), declared again as planned and bound; the
//! holding queue is unbound, and its messages are moved back the
//! same way, then it is deleted. Messages of a wait or release tier go back
//! through `P.wait.due` instead, where the scheduler plans their remaining
//! wait from their due time: a tier's TTL would start again and make them
//! late. A run cut short leaves its holding queues, which the next run
//! empties first.
//!
//! Moved messages keep their body and properties; a per-message
//! `expiration` starts again. A message routed to `Q` in the instant between
//! two of the steps may be kept twice (never lost through a binding): run it
//! with Warren's processes (which also publish to queues by name) and
//! producers stopped, and it moves each message once.

use std::collections::BTreeMap;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use warren_core::topology::{self, ArgValue, BindingPlan, TopologyPlan};
use warren_core::Config;

use crate::reconcile::{self, ApplyReport, TopologyError};

/// How many messages are copied before their confirms are awaited.
const MOVE_WINDOW: usize = 256;

/// What a migration did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrateReport {
    /// Each queue redeclared, with the messages moved out of it.
    pub migrated: Vec<(String, u64)>,
    /// Messages moved out of holding queues a run before left behind.
    pub resumed: u64,
    /// The topology applied afterwards.
    pub applied: ApplyReport,
}

/// A durable queue the migration may redeclare.
struct Target {
    name: String,
    arguments: BTreeMap<String, ArgValue>,
    bindings: Vec<BindingPlan>,
    /// Where its messages go back to: itself, or `P.wait.due` for a tier.
    back_to: String,
    /// Whether it is declared when missing (the plan's queues) or only
    /// migrated when it exists (cron state, tracker events).
    in_plan: bool,
}

fn holding(queue: &str) -> String {
    format!("{queue}.migrating")
}

fn broker(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> TopologyError {
    let what = what.into();
    move |source| TopologyError::Broker { what, source }
}

/// Every durable queue Warren owns, in the order they are migrated:
/// `P.wait.due` before the tiers that move their messages back through it.
fn targets(config: &Config, plan: &TopologyPlan) -> Vec<Target> {
    let n = config.names();
    let due = n.wait_due();
    let mut out: Vec<Target> = plan
        .queues
        .iter()
        .filter(|q| q.arguments.get("x-queue-type") != Some(&ArgValue::Str("stream".into())))
        .map(|q| Target {
            name: q.name.clone(),
            arguments: q.arguments.clone(),
            bindings: plan
                .bindings
                .iter()
                .filter(|b| b.queue == q.name)
                .cloned()
                .collect(),
            back_to: if q.arguments.contains_key("x-message-ttl") {
                due.clone()
            } else {
                q.name.clone()
            },
            in_plan: true,
        })
        .collect();
    out.sort_by_key(|t| t.name != due);
    for c in &config.cron {
        let name = crate::cron::state_queue(n.prefix(), &c.name);
        out.push(Target {
            arguments: topology::durable_queue_arguments(
                config,
                [("x-max-length".to_string(), ArgValue::Int(1))].into(),
            ),
            bindings: Vec::new(),
            back_to: name.clone(),
            name,
            in_plan: false,
        });
    }
    let tracker = format!("{}.tracker.events", n.prefix());
    out.push(Target {
        arguments: topology::durable_queue_arguments(config, BTreeMap::new()),
        bindings: vec![BindingPlan {
            exchange: n.events(),
            queue: tracker.clone(),
            routing_key: "#".into(),
        }],
        back_to: tracker.clone(),
        name: tracker,
        in_plan: false,
    });
    out
}

/// Migrates every durable queue that differs from the configuration's plan,
/// then applies the whole topology ([`reconcile::reconcile`]).
pub async fn migrate(conn: &Connection, config: &Config) -> Result<MigrateReport, TopologyError> {
    let plan = TopologyPlan::from_config(config);
    let names = config.names();
    let routing = [names.tasks(), names.unroutable()];
    let mut report = MigrateReport::default();
    // Exchanges first: the holding queues are bound to them.
    let exchanges_only = TopologyPlan {
        queues: Vec::new(),
        bindings: Vec::new(),
        ..plan.clone()
    };
    reconcile::apply(conn, &exchanges_only).await?;
    for t in targets(config, &plan) {
        let hold = holding(&t.name);
        if !t.in_plan && !exists(conn, &t.name).await? && !exists(conn, &hold).await? {
            continue;
        }
        let ch = channel(conn).await?;
        match declare(&ch, &t.name, &t.arguments).await {
            Ok(()) => {
                let _ = ch.close(200, "checked".into()).await;
            }
            Err(e) if is_conflict(&e) => {
                let moved = migrate_queue(conn, &t, &routing).await?;
                tracing::info!(queue = %t.name, moved, "queue redeclared as planned");
                report.migrated.push((t.name.clone(), moved));
            }
            Err(source) => {
                return Err(TopologyError::Broker {
                    what: format!("declare queue {}", t.name),
                    source,
                })
            }
        }
        // A holding queue left by an interrupted run: the queue is bound
        // again, then the holding queue unbound and emptied into it.
        if exists(conn, &hold).await? {
            let ch = channel(conn).await?;
            for b in &t.bindings {
                bind(&ch, &t.name, b).await?;
            }
            unbind_all(&ch, &hold, &t.bindings).await?;
            let _ = ch.close(200, "resumed".into()).await;
            report.resumed += move_all(conn, &hold, &t.back_to, &routing).await?;
            delete(conn, &hold).await?;
        }
    }
    retire_lanes(conn, config, &plan, &routing, &mut report).await?;
    retire_release_tiers(conn, config, &plan, &routing, &mut report).await?;
    report.applied = reconcile::reconcile(conn, config).await?;
    Ok(report)
}

/// Empties and deletes the priority lanes the plan no longer has (a queue
/// that is classic again, or has fewer lanes): their tasks go back to the
/// entry of their work queue, where a worker sorts them again if it has
/// lanes. Lanes are never bound, so nothing reaches them while they are
/// emptied but a copy from a Warren process still running.
async fn retire_lanes(
    conn: &Connection,
    config: &Config,
    plan: &TopologyPlan,
    routing: &[String],
    report: &mut MigrateReport,
) -> Result<(), TopologyError> {
    let names = config.names();
    for q in &config.queues {
        for k in 0..warren_core::lanes::MAX_LANES {
            let lane = names.lane_queue(&q.name, k);
            let entry = names.work_queue(&q.name);
            retire(conn, plan, &lane, &entry, routing, report).await?;
        }
    }
    Ok(())
}

/// Empties and deletes the release tiers (queue and exchange) the plan no
/// longer has (the replicated topology releases from the scheduler): their
/// tasks go through `P.wait.due`, where the scheduler plans the rest of
/// their wait from their due time.
async fn retire_release_tiers(
    conn: &Connection,
    config: &Config,
    plan: &TopologyPlan,
    routing: &[String],
    report: &mut MigrateReport,
) -> Result<(), TopologyError> {
    let names = config.names();
    for t in warren_core::delay::release_tiers(config.scheduler.max_delay_ms) {
        let tier = names.release_tier(t);
        if retire(conn, plan, &tier, &names.wait_due(), routing, report).await?
            && !plan.exchanges.iter().any(|e| e.name == tier)
        {
            let ch = channel(conn).await?;
            ch.exchange_delete(tier.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .map_err(broker(format!("delete exchange {tier}")))?;
            let _ = ch.close(200, "deleted".into()).await;
        }
    }
    Ok(())
}

/// Moves every message of `queue`, when it exists and the plan no longer
/// has it, into `to` (each removed only once its copy is confirmed), then
/// deletes it. Whether it did.
async fn retire(
    conn: &Connection,
    plan: &TopologyPlan,
    queue: &str,
    to: &str,
    routing: &[String],
    report: &mut MigrateReport,
) -> Result<bool, TopologyError> {
    if plan.queues.iter().any(|p| p.name == queue) || !exists(conn, queue).await? {
        return Ok(false);
    }
    let moved = move_all(conn, queue, to, routing).await?;
    let ch = channel(conn).await?;
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .map_err(broker(format!("delete queue {queue}")))?;
    let _ = ch.close(200, "deleted".into()).await;
    tracing::info!(
        queue,
        moved,
        to,
        "queue no longer planned: emptied and deleted"
    );
    report.migrated.push((queue.to_owned(), moved));
    Ok(true)
}

async fn channel(conn: &Connection) -> Result<Channel, TopologyError> {
    conn.create_channel().await.map_err(broker("open channel"))
}

/// Whether queue `name` exists (a passive declare, on a channel of its own).
async fn exists(conn: &Connection, name: &str) -> Result<bool, TopologyError> {
    let ch = channel(conn).await?;
    match ch
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(_) => {
            let _ = ch.close(200, "checked".into()).await;
            Ok(true)
        }
        Err(e) if is_missing(&e) => Ok(false),
        Err(source) => Err(TopologyError::Broker {
            what: format!("check queue {name}"),
            source,
        }),
    }
}

/// Declares `name` durable with `arguments`. A refusal closes the channel.
async fn declare(
    ch: &Channel,
    name: &str,
    arguments: &BTreeMap<String, ArgValue>,
) -> Result<(), lapin::Error> {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        topology::field_table(arguments),
    )
    .await
    .map(|_| ())
}

async fn unbind_all(
    ch: &Channel,
    queue: &str,
    bindings: &[BindingPlan],
) -> Result<(), TopologyError> {
    for b in bindings {
        ch.queue_unbind(
            queue.into(),
            b.exchange.as_str().into(),
            b.routing_key.as_str().into(),
            FieldTable::default(),
        )
        .await
        .map_err(broker(format!("unbind {queue} from {}", b.exchange)))?;
    }
    Ok(())
}

fn is_missing(e: &lapin::Error) -> bool {
    e.to_string().contains("NOT_FOUND")
}

fn is_conflict(e: &lapin::Error) -> bool {
    e.to_string().contains("inequivalent arg")
}

/// Moves `t`'s messages out, redeclares it, and moves them back; returns
/// how many were moved out.
async fn migrate_queue(
    conn: &Connection,
    t: &Target,
    routing: &[String],
) -> Result<u64, TopologyError> {
    let hold = holding(&t.name);
    let ch = channel(conn).await?;
    declare(&ch, &hold, &BTreeMap::new())
        .await
        .map_err(broker(format!("declare queue {hold}")))?;
    for b in &t.bindings {
        bind(&ch, &hold, b).await?;
    }
    let _ = ch.close(200, "held".into()).await;
    let moved = move_all(conn, &t.name, &hold, routing).await?;
    // Quorum queues cannot be deleted "if empty". Whatever reaches the queue
    // from here on through its bindings reaches the holding queue as well,
    // so deleting it loses nothing routed; only a copy published straight to
    // it by name (by a Warren process still running) would go with it.
    let ch = channel(conn).await?;
    let late = ch
        .queue_delete(t.name.as_str().into(), QueueDeleteOptions::default())
        .await
        .map_err(broker(format!("delete queue {}", t.name)))?;
    if late > 0 {
        tracing::warn!(
            queue = %t.name,
            late,
            holding = %hold,
            "messages reached the queue while it was being emptied; a copy of each routed \
             through a binding is in the holding queue (is a Warren process still running?)"
        );
    }
    let _ = ch.close(200, "deleted".into()).await;
    let ch = channel(conn).await?;
    declare(&ch, &t.name, &t.arguments)
        .await
        .map_err(|source| {
            let text = source.to_string();
            let plan_like = TopologyPlan {
                exchanges: Vec::new(),
                queues: vec![topology::QueuePlan {
                    name: t.name.clone(),
                    arguments: t.arguments.clone(),
                    purpose: String::new(),
                }],
                bindings: Vec::new(),
                replicated: true,
            };
            match plan_like.explain_quorum_refusal(&t.name, &text) {
                Some(why) => TopologyError::QuorumRefused(why),
                None => TopologyError::Broker {
                    what: format!("declare queue {}", t.name),
                    source,
                },
            }
        })?;
    for b in &t.bindings {
        bind(&ch, &t.name, b).await?;
    }
    unbind_all(&ch, &hold, &t.bindings).await?;
    let _ = ch.close(200, "redeclared".into()).await;
    move_all(conn, &hold, &t.back_to, routing).await?;
    delete(conn, &hold).await?;
    Ok(moved)
}

async fn bind(ch: &Channel, queue: &str, b: &BindingPlan) -> Result<(), TopologyError> {
    ch.queue_bind(
        queue.into(),
        b.exchange.as_str().into(),
        b.routing_key.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(broker(format!(
        "bind {queue} to {} with {:?}",
        b.exchange, b.routing_key
    )))
}

/// Deletes an emptied holding queue (a classic queue: only if empty).
async fn delete(conn: &Connection, queue: &str) -> Result<(), TopologyError> {
    let ch = channel(conn).await?;
    ch.queue_delete(
        queue.into(),
        QueueDeleteOptions {
            if_empty: true,
            ..Default::default()
        },
    )
    .await
    .map_err(broker(format!("delete queue {queue}")))?;
    let _ = ch.close(200, "deleted".into()).await;
    Ok(())
}

/// Copies every message of `from` into `to` (through the default
/// exchange), acknowledging each in `from` only after the broker confirmed
/// its copy; returns how many were moved.
///
/// The routing key a message arrived with (its task type, as a producer
/// published it to `P.tasks` or `P.delay`) would be lost on the way: it is
/// kept as the `type` property, as readers take it when the routing key is
/// not the type (the routing key itself wins on the `routing` exchanges,
/// which route by type).
async fn move_all(
    conn: &Connection,
    from: &str,
    to: &str,
    routing: &[String],
) -> Result<u64, TopologyError> {
    let ch = channel(conn).await?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(broker("select confirms"))?;
    let what = format!("move messages from {from} to {to}");
    let mut moved = 0;
    loop {
        let mut confirms = Vec::new();
        let mut last_tag = None;
        while confirms.len() < MOVE_WINDOW {
            let Some(msg) = ch
                .basic_get(from.into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(broker(what.clone()))?
            else {
                break;
            };
            let d = msg.delivery;
            let mut properties = d.properties.clone();
            let exchange = d.exchange.as_str();
            let untyped = properties
                .kind()
                .as_ref()
                .is_none_or(|k| k.as_str().is_empty());
            if !exchange.is_empty() && (untyped || routing.iter().any(|r| r == exchange)) {
                properties = properties.with_type(d.routing_key.as_str().into());
            }
            let confirm = ch
                .basic_publish(
                    "".into(),
                    to.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &d.data,
                    properties,
                )
                .await
                .map_err(broker(what.clone()))?;
            confirms.push(confirm);
            last_tag = Some(d.delivery_tag);
        }
        let Some(tag) = last_tag else {
            break;
        };
        for c in confirms {
            let confirmation = c.await.map_err(broker(what.clone()))?;
            if !confirmation.is_ack() || confirmation.take_message().is_some() {
                return Err(TopologyError::Conflict(format!(
                    "{what}: the broker did not take a copy; nothing was removed from {from}"
                )));
            }
            moved += 1;
        }
        ch.basic_ack(tag, BasicAckOptions { multiple: true })
            .await
            .map_err(broker(what.clone()))?;
    }
    let _ = ch.close(200, "moved".into()).await;
    Ok(moved)
}
