//! Ingestion: `P.tracker.events` (and, with `tracker.track_published`, the
//! copies in `P.tracker.published`) into the database, in batches, each
//! acknowledged only after its transaction committed; and retention pruning.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use warren_client::runtime::Reconnect;

use crate::record::IncomingEvent;
use crate::tracker::{amqp, tracker_queue, Shared, TrackerError};

/// How often the queue's backlog is read for the metrics.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

/// Tasks deleted per pruning transaction.
const PRUNE_CHUNK: i64 = 500;

/// Longest wait between two tries of a failed batch write.
const WRITE_RETRY_MAX: Duration = Duration::from_secs(5);

/// What a consumer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Status events, from `P.tracker.events`.
    Events,
    /// Copies of published tasks, from `P.tracker.published`.
    Published,
}

/// Consumes until `shutdown`, reconnecting with backoff when the broker goes away.
pub(crate) async fn consume(shared: Arc<Shared>, source: Source, shutdown: CancellationToken) {
    let max_backoff = Duration::from_millis(shared.config.broker.reconnect_max_ms);
    let what = match source {
        Source::Events => "tracker",
        Source::Published => "tracker (published tasks)",
    };
    let mut retry = Reconnect::new(what, max_backoff);
    while retry.ready(&shutdown).await {
        let outcome = session(&shared, source, &shutdown, &mut retry).await;
        if source == Source::Events {
            shared.consuming.store(false, Ordering::Relaxed);
        }
        match outcome {
            Ok(()) => break,
            Err(e) => {
                if retry.was_up() {
                    shared.metrics.reconnect();
                }
                retry.lost(&e);
            }
        }
    }
}

/// Declares the queue (durable; bound to `P.events` with `#`). `P.events`
/// is the operator's: it is only checked (a passive declare, which needs no
/// permission), so a least-privilege tracker user needs no configure
/// permission on it. A tracker started before the topology was applied
/// retries with backoff until it exists.
async fn declare(ch: &Channel, shared: &Shared) -> Result<(String, u32), TrackerError> {
    let names = shared.config.names();
    let queue = tracker_queue(&names);
    ch.exchange_declare(
        names.events().as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(amqp(format!(
        "exchange {} (apply the topology: `warren topology apply`)",
        names.events()
    )))?;
    let q = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            warren_core::topology::field_table(&warren_core::topology::durable_queue_arguments(
                &shared.config,
                Default::default(),
            )),
        )
        .await
        .map_err(|e| {
            let what = if e.to_string().contains("inequivalent arg") {
                format!(
                    "declare queue {queue} (it exists with other arguments, declared with \
                     another topology.replicated: stop Warren and run `warren topology \
                     migrate`)"
                )
            } else {
                format!("declare queue {queue}")
            };
            amqp(what)(e)
        })?;
    ch.queue_bind(
        queue.as_str().into(),
        names.events().as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(amqp(format!("bind {queue} to {}", names.events())))?;
    Ok((queue, q.message_count()))
}

/// Declares `P.tracker.published` as the topology does (the scheduler binds
/// it), so a tracker started first can consume it.
async fn declare_published(ch: &Channel, shared: &Shared) -> Result<(String, u32), TrackerError> {
    let queue = shared.config.names().tracker_published();
    let q = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            warren_core::topology::field_table(&warren_core::topology::published_queue_arguments(
                &shared.config,
            )),
        )
        .await
        .map_err(amqp(format!(
            "declare queue {queue} (if it exists with other arguments, apply the topology: \
             `warren topology apply`)"
        )))?;
    Ok((queue, q.message_count()))
}

async fn session(
    shared: &Shared,
    source: Source,
    shutdown: &CancellationToken,
    retry: &mut Reconnect,
) -> Result<(), TrackerError> {
    let cfg = &shared.config.tracker;
    let conn = warren_client::runtime::connect(&shared.config.broker, "tracker").await?;
    let ch = conn
        .create_channel()
        .await
        .map_err(amqp("open tracker channel"))?;
    let prefetch = u16::try_from(cfg.batch_max_events.saturating_mul(2)).unwrap_or(u16::MAX);
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(amqp("set tracker prefetch"))?;
    let (queue, backlog) = match source {
        Source::Events => declare(&ch, shared).await?,
        Source::Published => declare_published(&ch, shared).await?,
    };
    let tag = format!(
        "{queue}.{}",
        warren_client::runtime::process_identity().replace('/', "-")
    );
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp(format!("consume {queue}")))?;
    if source == Source::Events {
        shared.metrics.backlog(u64::from(backlog));
        shared.consuming.store(true, Ordering::Relaxed);
    }
    retry.up();
    info!(queue = %queue, backlog, "tracker consuming");

    let batch_wait = Duration::from_millis(cfg.batch_max_ms);
    let mut backlog_read = Instant::now();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            d = consumer.next() => d,
        };
        let mut batch = vec![next_delivery(first, &queue)?];
        let deadline = tokio::time::Instant::now() + batch_wait;
        while batch.len() < cfg.batch_max_events {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Err(_) => break,
                Ok(d) => batch.push(next_delivery(d, &queue)?),
            }
        }
        if !write_and_ack(shared, source, &batch, shutdown).await? {
            break;
        }
        if source == Source::Events && backlog_read.elapsed() >= BACKLOG_EVERY {
            backlog_read = Instant::now();
            read_backlog(shared, &ch, &queue).await;
        }
    }
    drop(consumer);
    let _ = ch.close(200, "tracker stopping".into()).await;
    let _ = conn.close(200, "tracker stopping".into()).await;
    Ok(())
}

fn next_delivery(
    d: Option<Result<Delivery, lapin::Error>>,
    queue: &str,
) -> Result<Delivery, TrackerError> {
    match d {
        None => Err(TrackerError::ConsumerClosed(queue.to_owned())),
        Some(d) => d.map_err(amqp(format!("receive from {queue}"))),
    }
}

async fn read_backlog(shared: &Shared, ch: &Channel, queue: &str) {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    if let Ok(q) = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        shared.metrics.backlog(u64::from(q.message_count()));
    }
}

/// Writes one batch, retrying until it commits, then acknowledges every
/// delivery of it at once. Returns false if shutdown came while the write
/// kept failing: nothing was acknowledged, so the broker delivers it again.
async fn write_and_ack(
    shared: &Shared,
    source: Source,
    batch: &[Delivery],
    shutdown: &CancellationToken,
) -> Result<bool, TrackerError> {
    let received = chrono::Utc::now().timestamp_millis();
    let max_result = shared.config.tracker.max_result_bytes;
    let mut events = Vec::with_capacity(batch.len());
    let mut invalid = 0;
    if source == Source::Published {
        events.extend(
            batch
                .iter()
                .filter_map(|d| crate::published::decode(d, &shared.config, received)),
        );
    }
    for d in batch.iter().filter(|_| source == Source::Events) {
        match IncomingEvent::decode(&d.data, max_result, received) {
            Ok(e) => events.push(e),
            Err(e) => {
                invalid += 1;
                warn!(
                    routing_key = %d.routing_key,
                    message_id = ?d.properties.message_id().as_ref().map(|s| s.as_str()),
                    error = %e,
                    "not a status event: acknowledged without storing it"
                );
            }
        }
    }
    shared.metrics.invalid(invalid);
    let mut retry = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        match shared.store.write_batch(&events).await {
            Ok(report) => {
                let now = chrono::Utc::now().timestamp_millis();
                let oldest = events.iter().map(|e| e.at_ms).min().unwrap_or(now);
                shared.metrics.batch_committed(
                    &report,
                    started.elapsed().as_secs_f64(),
                    (now - oldest) as f64 / 1000.0,
                );
                shared.timeline.record(&report, now);
                debug!(
                    events = events.len(),
                    tasks = report.tasks,
                    duplicates = report.duplicates,
                    "batch committed"
                );
                break;
            }
            Err(e) => {
                shared.metrics.write_error();
                warn!(error = %e, events = events.len(), retry_in = ?retry, "cannot store events; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(WRITE_RETRY_MAX);
            }
        }
    }
    if let Some(last) = batch.last() {
        last.acker
            .ack(BasicAckOptions { multiple: true })
            .await
            .map_err(amqp("acknowledge events"))?;
    }
    Ok(true)
}

/// Deletes tasks past `tracker.retention_ms` now and then, a chunk per
/// transaction, until `shutdown`.
pub(crate) async fn prune(shared: Arc<Shared>, shutdown: CancellationToken) {
    let retention = shared.config.tracker.retention_ms;
    let every = Duration::from_millis((retention / 10).clamp(1_000, 60_000));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let cutoff = chrono::Utc::now()
            .timestamp_millis()
            .saturating_sub(i64::try_from(retention).unwrap_or(i64::MAX));
        let mut total = 0;
        while !shutdown.is_cancelled() {
            match shared.store.prune_chunk(cutoff, PRUNE_CHUNK).await {
                Ok(0) => break,
                Ok(n) => {
                    total += n;
                    shared.metrics.pruned(n as u64);
                    // Let a waiting batch write go first.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => {
                    warn!(error = %e, "cannot prune old tasks; trying again later");
                    break;
                }
            }
        }
        if total > 0 {
            info!(
                tasks = total,
                retention_ms = retention,
                "pruned tasks past retention"
            );
        }
    }
}
