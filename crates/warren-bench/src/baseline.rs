//! The raw-lapin baseline: the same broker work as Warren, written as a
//! skilled engineer would with plain lapin and nothing else.
//!
//! The baseline worker does per task what Warren's worker does: it publishes
//! a persistent `started` event, parses the JSON body, publishes a persistent
//! `succeeded` event carrying it, and acks the delivery once both events are
//! confirmed. Its events are the contract's, as Warren's are: every key of
//! section 4 present (null when empty), `message_id`, `correlation_id` and
//! `type` set. Confirms are pipelined: the worker never waits for one before
//! taking the next delivery, and acks each task as soon as its own two
//! confirms are in, so its throughput is bounded by the prefetch it is given
//! (`--prefetch`, tuned for it), not by round trips. The baseline publisher
//! sends persistent messages with publisher confirms, keeping a window of
//! confirms in flight. Warren's figures are printed as ratios to these.

use std::time::Instant;

use futures::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use serde::Serialize;
use serde_json::Value;

use crate::procstat::{Spent, Stopwatch};

/// The prefetch the baseline worker runs with unless `--baseline-prefetch`
/// says otherwise: deep enough that confirms in flight do not leave it
/// waiting for deliveries (BENCHMARKS.md has the figures at other depths).
pub const BASELINE_PREFETCH: u16 = 1000;

/// Runs the baseline worker on `queue` until the process is killed.
pub async fn worker(
    url: &str,
    queue: &str,
    events_exchange: &str,
    prefetch: u16,
) -> anyhow::Result<()> {
    let conn = Connection::connect(
        url,
        ConnectionProperties::default().with_connection_name("warren bench baseline-worker".into()),
    )
    .await?;
    let consume = conn.create_channel().await?;
    consume
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut deliveries = consume
        .basic_consume(
            queue.into(),
            "baseline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Tasks whose events are published, each waiting for its two confirms
    // before its ack.
    let mut settling = FuturesUnordered::new();
    loop {
        tokio::select! {
            d = deliveries.next() => {
                let Some(d) = d else { break };
                let (started, succeeded, d) = run_one(&publish, events_exchange, d?).await?;
                settling.push(async move {
                    anyhow::ensure!(started.await?.is_ack(), "started event refused");
                    anyhow::ensure!(succeeded.await?.is_ack(), "succeeded event refused");
                    d.acker.ack(BasicAckOptions::default()).await?;
                    anyhow::Ok(())
                });
            }
            Some(done) = settling.next(), if !settling.is_empty() => done?,
        }
    }
    while let Some(done) = settling.next().await {
        done?;
    }
    Ok(())
}

/// One event as the contract writes it (section 4): every key present, null
/// when empty, as Warren's worker writes them. Borrowed from the task where
/// it can be, so building one allocates only its id and time.
#[derive(Serialize)]
struct ContractEvent<'a> {
    event_id: String,
    task_id: &'a str,
    #[serde(rename = "type")]
    task_type: &'a str,
    state: &'static str,
    attempt: i64,
    queue: &'a str,
    worker: &'a str,
    at: String,
    duration_ms: Option<u64>,
    result: Option<Value>,
    error: Option<()>,
    reason: Option<()>,
    due_at: Option<()>,
}

/// Publishes one task's `started` and `succeeded` events without waiting
/// for their confirms.
async fn run_one(
    ch: &Channel,
    exchange: &str,
    d: Delivery,
) -> anyhow::Result<(PublisherConfirm, PublisherConfirm, Delivery)> {
    let id = d
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default();
    let began = Instant::now();
    let mut event = ContractEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        task_id: &id,
        task_type: "diag.echo",
        state: "started",
        attempt: 1,
        queue: "diag",
        worker: "baseline",
        at: warren_core::event::format_time(chrono::Utc::now()),
        duration_ms: None,
        result: None,
        error: None,
        reason: None,
        due_at: None,
    };
    let started = publish_event(ch, exchange, "started.diag.echo", &event).await?;
    let args: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
    event.event_id = uuid::Uuid::now_v7().to_string();
    event.state = "succeeded";
    event.at = warren_core::event::format_time(chrono::Utc::now());
    event.duration_ms = Some(began.elapsed().as_millis() as u64);
    event.result = Some(args);
    let succeeded = publish_event(ch, exchange, "succeeded.diag.echo", &event).await?;
    Ok((started, succeeded, d))
}

/// Publishes an event with the properties the contract gives events:
/// persistent JSON, `message_id` = its id, `correlation_id` = the task's,
/// `type` = the task type.
async fn publish_event(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    event: &ContractEvent<'_>,
) -> anyhow::Result<PublisherConfirm> {
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(event.event_id.as_str().into())
        .with_correlation_id(event.task_id.into())
        .with_type(event.task_type.into());
    let mut body = Vec::with_capacity(512);
    serde_json::to_writer(&mut body, event)?;
    Ok(ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await?)
}

/// Publishes `n` persistent messages with confirms, `window` in flight;
/// returns the wall and CPU time spent once connected.
pub async fn publish(
    url: &str,
    exchange: &str,
    routing_key: &str,
    n: usize,
    window: usize,
    mut body: impl FnMut(usize) -> (String, Vec<u8>),
) -> anyhow::Result<Spent> {
    let conn = Connection::connect(
        url,
        ConnectionProperties::default()
            .with_connection_name("warren bench baseline-publisher".into()),
    )
    .await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let clock = Stopwatch::start();
    let mut in_flight = FuturesOrdered::new();
    for i in 0..n {
        let (id, data) = body(i);
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(id.as_str().into());
        let confirm = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &data,
                props,
            )
            .await?;
        in_flight.push_back(confirm);
        if in_flight.len() >= window {
            if let Some(c) = in_flight.next().await {
                anyhow::ensure!(c?.is_ack(), "baseline publish refused");
            }
        }
    }
    while let Some(c) = in_flight.next().await {
        anyhow::ensure!(c?.is_ack(), "baseline publish refused");
    }
    let spent = clock.stop();
    let _ = conn.close(200, "done".into()).await;
    Ok(spent)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The baseline writes the same event as Warren: the same keys.
    #[test]
    fn baseline_events_carry_every_key_warren_writes() {
        let ev = ContractEvent {
            event_id: "e".into(),
            task_id: "t",
            task_type: "diag.echo",
            state: "succeeded",
            attempt: 1,
            queue: "diag",
            worker: "w",
            at: "2026-12-03T00:00:00.000Z".into(),
            duration_ms: Some(1),
            result: Some(serde_json::json!({"n": 1})),
            error: None,
            reason: None,
            due_at: None,
        };
        let keys = |body: &[u8]| -> Vec<String> {
            let v: serde_json::Map<String, Value> = serde_json::from_slice(body).unwrap();
            v.keys().cloned().collect()
        };
        let warren =
            warren_core::Event::new("t", "diag.echo", warren_core::TaskState::Succeeded, 1);
        let mut theirs = keys(&warren.to_json());
        let mut ours = keys(&serde_json::to_vec(&ev).unwrap());
        theirs.sort();
        ours.sort();
        assert_eq!(ours, theirs);
    }
}
