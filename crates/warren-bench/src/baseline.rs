//! The raw-lapin baseline: the same guarantees as Warren with nothing else.
//!
//! The baseline worker takes one message at a time: it parses the JSON body,
//! publishes one persistent event to `P.events` on a confirm channel, waits
//! for the confirm, then acks. The baseline publisher sends persistent
//! messages with publisher confirms, keeping a window of confirms in flight.
//! Warren's figures are printed as ratios to these.

use std::time::Instant;

use futures::stream::{FuturesOrdered, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{json, Value};

use crate::procstat::{Spent, Stopwatch};

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
    while let Some(d) = deliveries.next().await {
        let d = d?;
        let began = Instant::now();
        // The event's `at` is when the task started, like Warren's `started` event.
        let received = chrono::Utc::now();
        let args: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
        let id = d
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .unwrap_or_default();
        let event = json!({
            "event_id": uuid::Uuid::now_v7().to_string(),
            "task_id": id,
            "type": "diag.echo",
            "state": "succeeded",
            "attempt": 1,
            "queue": "diag",
            "worker": "baseline",
            "at": warren_core::event::format_time(received),
            "duration_ms": began.elapsed().as_millis() as u64,
            "result": args,
            "error": null,
            "reason": null,
            "due_at": null,
        });
        let body = serde_json::to_vec(&event)?;
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_correlation_id(id.as_str().into());
        publish
            .basic_publish(
                events_exchange.into(),
                "succeeded.diag.echo".into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await?
            .await?;
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
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
