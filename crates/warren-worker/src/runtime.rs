//! Consuming, running and acknowledging: the worker's main loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{select_all, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::Connection;
use rand::Rng;
use serde_json::Value;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};
use warren_client::{
    confirm_all, connect, process_identity, CancelSet, ClientError, ConfirmChannel, Outbox,
};
use warren_core::backoff::full_jitter_ms;
use warren_core::delay::DUE_AT;
use warren_core::event::{
    cap_result, format_time, new_id, ErrorKind, EventErrorInfo, ProgressInfo,
};
use warren_core::task::{check_headers, task_type_of, InvalidTask, MessageMeta};
use warren_core::{headers, Config, DeadReason, Event, Names, TaskEnvelope, TaskState};

use crate::handler::ProgressReport;
use crate::metrics::{Outcome, WorkerMetrics};
use crate::{Progress, Registry, TaskContext, TaskError};

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration names no queue to consume.
    #[error("worker has no queues to consume: set worker.queues or add [[queues]]")]
    NoQueues,
}

/// Runs handlers for tasks from the configured work queues.
pub struct Worker {
    shared: Arc<Shared>,
}

struct Shared {
    config: Arc<Config>,
    names: Names,
    registry: Registry,
    identity: String,
    queues: Vec<(String, String)>,
    routing_exchanges: [String; 2],
    cancels: CancelSet,
    /// Semaphores of the types capped by `worker.type_concurrency`.
    type_caps: BTreeMap<String, Arc<Semaphore>>,
    metrics: Arc<WorkerMetrics>,
}

impl Shared {
    /// The type as a metrics label: types without a handler share one label,
    /// so hostile routing keys cannot grow the metrics without bound.
    fn label<'a>(&self, task_type: &'a str) -> &'a str {
        if self.registry.get(task_type).is_some() {
            task_type
        } else {
            "_unregistered"
        }
    }
}

/// One connection's worth of channels. When it dies, in-flight tasks can no
/// longer ack on it: the broker redelivers them, so nothing is lost and no
/// ack is sent twice or on the wrong channel.
struct Session {
    conn: Connection,
    consume_channel: lapin::Channel,
    consumer_tags: Vec<String>,
    outbox: Outbox,
}

/// A delivery tagged with the short name of the queue it came from.
type Tagged = (Arc<str>, lapin::Result<Delivery>);

/// Tags one consumer's deliveries with its queue.
type TagFn = Box<dyn FnMut(lapin::Result<Delivery>) -> Tagged + Send>;

/// Every consumer of a session merged into one stream.
type Deliveries = futures::stream::SelectAll<futures::stream::Map<lapin::Consumer, TagFn>>;

impl Worker {
    /// A worker for `config`, running the handlers of `registry`.
    pub fn new(config: Config, registry: Registry) -> Result<Self, WorkerError> {
        let names = config.names();
        let queues: Vec<(String, String)> = config
            .worker_queues()
            .into_iter()
            .map(|q| (q.name.clone(), names.work_queue(&q.name)))
            .collect();
        if queues.is_empty() {
            return Err(WorkerError::NoQueues);
        }
        let routing_exchanges = [names.tasks(), names.unroutable()];
        let config_concurrency = config.worker.concurrency;
        let type_caps = config
            .worker
            .type_concurrency
            .iter()
            .map(|(t, &n)| (t.clone(), Arc::new(Semaphore::new(n))))
            .collect();
        Ok(Worker {
            shared: Arc::new(Shared {
                config: Arc::new(config),
                names,
                registry,
                identity: process_identity(),
                queues,
                routing_exchanges,
                cancels: CancelSet::new(),
                type_caps,
                metrics: Arc::new(WorkerMetrics::new(config_concurrency)),
            }),
        })
    }

    /// What this worker reports on `/metrics` and `/readyz`.
    pub fn probe(&self) -> Arc<dyn warren_ops::Probe> {
        self.shared.metrics.clone()
    }

    /// Consumes until `shutdown` is cancelled, reconnecting with backoff when
    /// the broker goes away, then drains: running tasks get the grace period
    /// to finish; the rest are aborted and returned unacknowledged.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let sh = &self.shared;
        // Know every cancel published so far before taking a task.
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let follower = {
            let cancels = sh.cancels.clone();
            let (url, names, stop) = (
                sh.config.broker.url.clone(),
                sh.names.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move { cancels.follow(url, names, stop, ready_tx).await })
        };
        tokio::select! {
            r = ready_rx => if r.is_ok() { sh.metrics.link.cancels_known() },
            _ = shutdown.cancelled() => {}
        }
        let tracker = TaskTracker::new();
        let abort = CancellationToken::new();
        let permits = Arc::new(Semaphore::new(sh.config.worker.concurrency));
        let max_backoff = Duration::from_millis(sh.config.worker.reconnect_max_ms.max(100));
        let mut backoff = Duration::from_millis(100);
        // Kept alive until the drain is over: dropping the consumers or the
        // channel would return running tasks to the queue before they ack.
        let mut kept: Option<(Arc<Session>, Deliveries)> = None;
        while !shutdown.is_cancelled() {
            match self.open_session().await {
                Ok((session, consumers)) => {
                    backoff = Duration::from_millis(100);
                    sh.metrics.link.consuming(true);
                    let session = Arc::new(session);
                    let mut stream = merge(consumers);
                    info!(
                        queues = ?sh.queues.iter().map(|q| &q.0).collect::<Vec<_>>(),
                        concurrency = sh.config.worker.concurrency,
                        prefetch = sh.config.worker.prefetch,
                        "worker consuming"
                    );
                    let ended = self
                        .consume(&session, &mut stream, &shutdown, &tracker, &abort, &permits)
                        .await;
                    sh.metrics.link.consuming(false);
                    if shutdown.is_cancelled() {
                        kept = Some((session, stream));
                        break;
                    }
                    sh.metrics.link.reconnect();
                    warn!(reason = %ended, "broker connection lost; reconnecting");
                }
                Err(e) => warn!(error = %e, retry_in = ?backoff, "cannot reach broker"),
            }
            let jittered = rand::thread_rng().gen_range(backoff / 2..=backoff);
            tokio::select! {
                _ = tokio::time::sleep(jittered) => {}
                _ = shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(max_backoff);
        }
        self.drain(tracker, abort, kept).await;
        let _ = follower.await;
        Ok(())
    }

    async fn drain(
        &self,
        tracker: TaskTracker,
        abort: CancellationToken,
        kept: Option<(Arc<Session>, Deliveries)>,
    ) {
        if let Some((s, _)) = &kept {
            // No new deliveries; prefetched ones not yet started stay
            // unacknowledged and return to the queue when the channel closes.
            for tag in &s.consumer_tags {
                let _ = s
                    .consume_channel
                    .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                    .await;
            }
        }
        let grace = Duration::from_millis(self.shared.config.worker.grace_period_ms);
        tracker.close();
        if !tracker.is_empty() {
            info!(running = tracker.len(), ?grace, "draining running tasks");
        }
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                running = tracker.len(),
                "grace period over: aborting running tasks, returning them unacknowledged"
            );
            abort.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
        }
        if let Some((s, stream)) = kept {
            let _ = s
                .consume_channel
                .close(200, "worker shutting down".into())
                .await;
            drop(stream);
            let _ = s.conn.close(200, "worker shutting down".into()).await;
        }
        info!("worker stopped");
    }

    async fn open_session(&self) -> Result<(Session, Vec<(String, lapin::Consumer)>), ClientError> {
        let sh = &self.shared;
        let conn = connect(&sh.config.broker.url, "worker").await?;
        let consume_ch = conn
            .create_channel()
            .await
            .map_err(|source| ClientError::Amqp {
                what: "open consume channel".into(),
                source,
            })?;
        consume_ch
            .basic_qos(sh.config.worker.prefetch, BasicQosOptions::default())
            .await
            .map_err(|source| ClientError::Amqp {
                what: "set prefetch".into(),
                source,
            })?;
        let outbox = Outbox {
            channel: ConfirmChannel::open(&conn).await?,
            names: sh.names.clone(),
        };
        let mut consumers = Vec::new();
        let mut consumer_tags = Vec::new();
        for (short, full) in &sh.queues {
            let tag = format!(
                "{}.worker.{}.{}",
                sh.names.prefix(),
                short,
                sh.identity.replace('/', "-")
            );
            let consumer = consume_ch
                .basic_consume(
                    full.as_str().into(),
                    tag.into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|source| ClientError::Amqp {
                    what: format!("consume {full} (run `warren topology apply` first?)"),
                    source,
                })?;
            consumers.push((short.clone(), consumer));
        }
        for (_, c) in &consumers {
            consumer_tags.push(c.tag().to_string());
        }
        let session = Session {
            conn,
            consume_channel: consume_ch,
            consumer_tags,
            outbox,
        };
        Ok((session, consumers))
    }

    /// Takes deliveries until the connection dies (returns why) or shutdown.
    async fn consume(
        &self,
        session: &Arc<Session>,
        stream: &mut Deliveries,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
        abort: &CancellationToken,
        permits: &Arc<Semaphore>,
    ) -> String {
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                _ = shutdown.cancelled() => return "shutdown".into(),
            };
            let next = tokio::select! {
                n = stream.next() => n,
                _ = shutdown.cancelled() => return "shutdown".into(),
            };
            let (queue, delivery) = match next {
                None => return "consumers ended".into(),
                Some((_, Err(e))) => return e.to_string(),
                Some((q, Ok(d))) => (q, d),
            };
            let shared = self.shared.clone();
            let session = session.clone();
            let abort = abort.clone();
            let slot = Slot {
                pool: permits.clone(),
                general: Some(permit),
                typed: None,
            };
            tracker.spawn(async move {
                process(&shared, &session, &queue, delivery, &abort, slot).await;
            });
        }
    }
}

/// Merges a session's consumers into one stream tagged by queue.
fn merge(consumers: Vec<(String, lapin::Consumer)>) -> Deliveries {
    select_all(consumers.into_iter().map(|(short, c)| {
        let short: Arc<str> = short.into();
        let tag: TagFn = Box::new(move |d| (short.clone(), d));
        c.map(tag)
    }))
}

fn meta_of(d: &Delivery) -> MessageMeta {
    let p = &d.properties;
    let s = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|x| x.as_str().to_owned());
    MessageMeta {
        exchange: d.exchange.as_str().to_owned(),
        routing_key: d.routing_key.as_str().to_owned(),
        content_type: s(p.content_type()),
        content_encoding: s(p.content_encoding()),
        message_id: s(p.message_id()).filter(|m| !m.is_empty()),
        type_: s(p.kind()),
        headers: p.headers().clone(),
        reply_to: s(p.reply_to()).filter(|r| !r.is_empty()),
        correlation_id: s(p.correlation_id()),
        priority: *p.priority(),
    }
}

/// Handles one delivery to its outcome. Errors publishing or acking mean the
/// connection is gone: the delivery is left for the broker to redeliver.
async fn process(
    sh: &Shared,
    session: &Session,
    queue: &str,
    delivery: Delivery,
    abort: &CancellationToken,
    slot: Slot,
) {
    let meta = meta_of(&delivery);
    let task_type = task_type_of(
        &meta,
        &[
            sh.routing_exchanges[0].as_str(),
            sh.routing_exchanges[1].as_str(),
        ],
    );
    if let Err(invalid) = check_headers(meta.headers.as_ref()) {
        // Checked before anything re-publishes the message: with the
        // system's headers added, a copy would no longer fit in a frame.
        let id = meta.message_id.clone().unwrap_or_else(new_id);
        let r = park_invalid(
            sh, session, queue, &delivery, &meta, &task_type, &id, &invalid,
        )
        .await;
        finish(&delivery, r.map(|_| ()), &id).await;
        return;
    }
    let Some(task_id) = meta.message_id.clone() else {
        // No id: re-publish a copy carrying one, so every event and every
        // redelivery of this task reports the same id.
        let id = warren_core::event::new_id();
        let h = delivery.properties.headers().clone().unwrap_or_default();
        let r = requeue(sh, session, queue, &delivery, h, &task_type, &id).await;
        finish(&delivery, r, &id).await;
        return;
    };
    if delivery.redelivered {
        // Redelivered without an outcome (its worker died or lost the
        // broker): count it in a header of a fresh copy, since classic queues
        // keep no delivery count, and park it as poison past the limit.
        let mut h = delivery.properties.headers().clone().unwrap_or_default();
        let seen = headers::get_int(Some(&h), headers::REDELIVERIES)
            .ok()
            .flatten()
            .unwrap_or(0)
            .saturating_add(1);
        let limit = i64::from(sh.config.scheduler.poison_redeliveries);
        let r = if seen > limit {
            warn!(task_id, redeliveries = seen, "poison: parked dead");
            let attempt = envelope_attempt(&meta);
            let mut ev = new_event(sh, queue, &task_id, &task_type, TaskState::Dead, attempt);
            ev.reason = Some(DeadReason::Poison.as_str().into());
            ev.error = Some(EventErrorInfo {
                kind: ErrorKind::Permanent,
                code: "poison".into(),
                message: format!("redelivered {seen} times without an outcome (limit {limit})"),
            });
            let detail = ev
                .error
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_default();
            let r = park(
                &session.outbox,
                &delivery,
                &meta,
                queue,
                DeadReason::Poison,
                &detail,
                &ev,
            )
            .await;
            if r.is_ok() {
                sh.metrics.dead(sh.label(&task_type), "poison", None);
            }
            r.map(|_| ())
        } else {
            sh.metrics.redelivered();
            headers::set_int(&mut h, headers::REDELIVERIES, seen);
            requeue(sh, session, queue, &delivery, h, &task_type, &task_id).await
        };
        finish(&delivery, r, &task_id).await;
        return;
    }
    if sh.cancels.contains(&task_id) {
        let attempt = envelope_attempt(&meta) - 1;
        let r = cancelled(
            sh,
            session,
            queue,
            &meta,
            &task_id,
            &task_type,
            attempt.max(0),
        )
        .await;
        finish(&delivery, r, &task_id).await;
        return;
    }
    let span = info_span!("task", task_id = %task_id, r#type = %task_type, queue = %queue, attempt = tracing::field::Empty);
    async {
        let result = run_task(
            sh, session, queue, &delivery, &meta, &task_type, &task_id, abort, slot,
        )
        .await;
        match result {
            Ok(Disposition::Ack) => finish(&delivery, Ok(()), &task_id).await,
            Ok(Disposition::Requeue) => {
                let _ = delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
            }
            Err(e) => finish(&delivery, Err(e), &task_id).await,
        }
    }
    .instrument(span)
    .await
}

/// The attempt a message would run as (1 unless the system re-published it).
fn envelope_attempt(meta: &MessageMeta) -> i64 {
    let h = meta.headers.as_ref();
    if headers::get_flag(h, headers::REPUBLISHED) {
        headers::get_int(h, headers::ATTEMPT)
            .ok()
            .flatten()
            .unwrap_or(1)
            .max(1)
    } else {
        1
    }
}

fn new_event(
    sh: &Shared,
    queue: &str,
    id: &str,
    task_type: &str,
    state: TaskState,
    attempt: i64,
) -> Event {
    let mut e = Event::new(id, task_type, state, attempt);
    e.queue = Some(queue.to_owned());
    e.worker = Some(sh.identity.clone());
    e
}

/// Puts a copy of the delivery at the back of its queue, then the caller acks.
#[allow(clippy::too_many_arguments)]
async fn requeue(
    sh: &Shared,
    session: &Session,
    queue: &str,
    delivery: &Delivery,
    h: lapin::types::FieldTable,
    task_type: &str,
    task_id: &str,
) -> Result<(), ClientError> {
    let c = session
        .outbox
        .requeue(
            &sh.names.work_queue(queue),
            &delivery.data,
            &delivery.properties,
            h,
            task_type,
            task_id,
        )
        .await?;
    confirm_all(vec![c]).await
}

/// Emits `cancelled` (and the reply) for a task dropped by a cancel command.
#[allow(clippy::too_many_arguments)]
async fn cancelled(
    sh: &Shared,
    session: &Session,
    queue: &str,
    meta: &MessageMeta,
    task_id: &str,
    task_type: &str,
    attempt: i64,
) -> Result<(), ClientError> {
    let mut ev = new_event(sh, queue, task_id, task_type, TaskState::Cancelled, attempt);
    ev.reason = Some("cancel command".into());
    let mut confirms = vec![session.outbox.event(&ev).await?];
    if let Some(r) = &meta.reply_to {
        confirms.push(
            session
                .outbox
                .reply(&ev, r, meta.correlation_id.as_deref())
                .await?,
        );
    }
    confirm_all(confirms).await?;
    info!(task_id, "cancelled");
    sh.metrics
        .outcome(sh.label(task_type), Outcome::Cancelled, None);
    Ok(())
}

enum Disposition {
    Ack,
    Requeue,
}

async fn finish(delivery: &Delivery, outcome: Result<(), ClientError>, task_id: &str) {
    match outcome {
        Ok(()) => {
            if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                warn!(task_id, error = %e, "ack failed; the broker will redeliver the task");
            }
        }
        Err(e) => warn!(
            task_id,
            error = %e,
            "could not record the outcome; the broker will redeliver the task"
        ),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_task(
    sh: &Shared,
    session: &Session,
    queue: &str,
    delivery: &Delivery,
    meta: &MessageMeta,
    task_type: &str,
    task_id: &str,
    abort: &CancellationToken,
    mut slot: Slot,
) -> Result<Disposition, ClientError> {
    let out = &session.outbox;
    let base = |state, attempt| new_event(sh, queue, task_id, task_type, state, attempt);
    let parsed = TaskEnvelope::parse(
        meta,
        task_type,
        task_id,
        &delivery.data,
        sh.config.limits.max_body_bytes,
    )
    .and_then(|t| match sh.registry.get(task_type) {
        Some(h) => Ok((t, h)),
        None => Err(InvalidTask::new(
            "no_handler",
            format!("no handler for task type {task_type:?} on queue {queue}"),
        )),
    });
    let (task, handler) = match parsed {
        Ok(x) => x,
        Err(invalid) => {
            return park_invalid(
                sh, session, queue, delivery, meta, task_type, task_id, &invalid,
            )
            .await;
        }
    };
    tracing::Span::current().record("attempt", task.attempt);
    if let Some(cap) = sh.type_caps.get(task_type) {
        if !slot.take_typed(cap, abort).await {
            return Ok(Disposition::Requeue);
        }
    }
    let started = out.event(&base(TaskState::Started, task.attempt)).await?;
    debug!("started");
    // A delayed task's first start after its release (not a redelivery).
    let hdrs = delivery.properties.headers().as_ref();
    if let (Ok(Some(due)), false, Ok(None)) = (
        headers::get_int(hdrs, DUE_AT),
        delivery.redelivered,
        headers::get_int(hdrs, headers::REDELIVERIES),
    ) {
        sh.metrics
            .delay_lateness(chrono::Utc::now().timestamp_millis() - due);
    }

    let timeout =
        Duration::from_millis(task.timeout_ms.unwrap_or(sh.config.worker.task_timeout_ms));
    // Not a child of `abort`: on shutdown the abort branch below must win,
    // returning the task unacknowledged, not a handler failing on its token.
    let cancel = CancellationToken::new();
    let (progress, progress_rx) = Progress::channel();
    let ctx = TaskContext {
        id: task.id.clone(),
        task_type: task.task_type.clone(),
        args: task.args.clone(),
        attempt: task.attempt,
        cancel: cancel.clone(),
        data_dir: sh.config.worker.data_dir.clone(),
        config: sh.config.clone(),
        progress,
    };
    let progress_events = ProgressEvents::start(
        out.clone(),
        base(TaskState::Progress, task.attempt),
        progress_rx,
    );
    let command = CancellationToken::new();
    let _running = sh.cancels.running(task_id, command.clone());
    let began = Instant::now();
    sh.metrics.running(1);
    let running = Running(&sh.metrics);
    let mut join = tokio::spawn(async move { handler.handle(ctx).await });
    let result: Result<Value, TaskError> = tokio::select! {
        r = &mut join => match r {
            Ok(r) => r,
            Err(e) if e.is_panic() => Err(TaskError::permanent("panic", panic_text(e.into_panic()))),
            Err(e) => Err(TaskError::retryable("aborted", e.to_string())),
        },
        _ = tokio::time::sleep(timeout) => {
            cancel.cancel();
            join.abort();
            Err(TaskError::retryable("timeout", format!("no result within {} ms", timeout.as_millis())))
        }
        _ = command.cancelled() => {
            cancel.cancel();
            join.abort();
            progress_events.finish().await;
            confirm_all(vec![started]).await?;
            cancelled(sh, session, queue, meta, task_id, task_type, task.attempt).await?;
            return Ok(Disposition::Ack);
        }
        _ = abort.cancelled() => {
            cancel.cancel();
            join.abort();
            progress_events.finish().await;
            confirm_all(vec![started]).await?;
            warn!("aborted at shutdown; returned to the queue");
            sh.metrics.returned();
            return Ok(Disposition::Requeue);
        }
    };
    progress_events.finish().await;
    let ran = began.elapsed();
    drop(running);
    let duration_ms = ran.as_millis() as u64;
    // The handler is done: free its slot while the outcome is recorded, so
    // waiting for confirms never holds back the next handler. In-flight
    // deliveries stay bounded by the prefetch.
    // Outcome events are stamped with the moment the handler finished.
    let finished_at = warren_core::event::format_time(chrono::Utc::now());
    drop(slot);

    match result {
        Ok(value) => {
            let mut ev = base(TaskState::Succeeded, task.attempt);
            ev.at = finished_at;
            ev.duration_ms = Some(duration_ms);
            ev.result = Some(cap_result(value, sh.config.limits.max_result_bytes));
            let mut confirms = vec![started, out.event(&ev).await?];
            if let Some(r) = &meta.reply_to {
                confirms.push(out.reply(&ev, r, meta.correlation_id.as_deref()).await?);
            }
            confirm_all(confirms).await?;
            info!(duration_ms, "succeeded");
            sh.metrics.outcome(task_type, Outcome::Succeeded, Some(ran));
            Ok(Disposition::Ack)
        }
        Err(err) => {
            let max_retries = task
                .max_retries
                .unwrap_or(u64::from(sh.config.retry_policy(task_type).max_retries));
            let will_retry = err.is_retryable() && (task.attempt as u64) <= max_retries;
            let mut failed = base(TaskState::Failed, task.attempt);
            failed.at = finished_at;
            failed.duration_ms = Some(duration_ms);
            failed.error = Some(err.to_info());
            failed.retry = Some(will_retry);
            let failed_c = out.event(&failed).await?;
            info!(code = %err.code, retry = will_retry, "failed: {}", err.message);
            if will_retry {
                let policy = sh.config.retry_policy(task_type);
                let retry_no = u32::try_from(task.attempt).unwrap_or(u32::MAX);
                let delay = full_jitter_ms(policy, retry_no, &mut rand::thread_rng())
                    .max(err.retry_after_ms.unwrap_or(0));
                let retry_c = out
                    .retry(
                        &delivery.data,
                        &delivery.properties,
                        task_id,
                        task_type,
                        task.attempt + 1,
                        delay,
                        &err.to_string(),
                    )
                    .await?;
                confirm_all(vec![started, failed_c, retry_c]).await?;
                sh.metrics.outcome(task_type, Outcome::Retried, Some(ran));
                return Ok(Disposition::Ack);
            }
            let reason = if err.is_retryable() {
                DeadReason::RetriesExhausted
            } else {
                DeadReason::PermanentFailure
            };
            let mut ev = base(TaskState::Dead, task.attempt);
            ev.reason = Some(reason.as_str().into());
            ev.error = Some(err.to_info());
            confirm_all(vec![started, failed_c]).await?;
            let r = park(out, delivery, meta, queue, reason, &err.to_string(), &ev).await?;
            sh.metrics.dead(task_type, reason.as_str(), Some(ran));
            Ok(r)
        }
    }
}

/// Parks a message that is not a valid task: `dead` with reason `invalid`
/// and the problem's code, no attempt started.
#[allow(clippy::too_many_arguments)]
async fn park_invalid(
    sh: &Shared,
    session: &Session,
    queue: &str,
    delivery: &Delivery,
    meta: &MessageMeta,
    task_type: &str,
    task_id: &str,
    invalid: &InvalidTask,
) -> Result<Disposition, ClientError> {
    info!(code = invalid.code, "invalid task: {}", invalid.message);
    let mut ev = new_event(sh, queue, task_id, task_type, TaskState::Dead, 0);
    ev.reason = Some(DeadReason::Invalid.as_str().into());
    ev.error = Some(EventErrorInfo {
        kind: ErrorKind::Permanent,
        code: invalid.code.into(),
        message: invalid.message.clone(),
    });
    let r = park(
        &session.outbox,
        delivery,
        meta,
        queue,
        DeadReason::Invalid,
        &invalid.message,
        &ev,
    )
    .await?;
    sh.metrics
        .dead(sh.label(task_type), DeadReason::Invalid.as_str(), None);
    Ok(r)
}

/// Parks a task in `P.dead`, emits its `dead` event (and the reply), and
/// waits for every confirm so the caller may ack.
#[allow(clippy::too_many_arguments)]
async fn park(
    out: &Outbox,
    delivery: &Delivery,
    meta: &MessageMeta,
    queue: &str,
    reason: DeadReason,
    detail: &str,
    ev: &Event,
) -> Result<Disposition, ClientError> {
    let mut confirms = vec![
        out.dead(
            &delivery.data,
            &delivery.properties,
            ev,
            reason,
            detail,
            Some(queue),
        )
        .await?,
        out.event(ev).await?,
    ];
    if let Some(r) = &meta.reply_to {
        confirms.push(out.reply(ev, r, meta.correlation_id.as_deref()).await?);
    }
    confirm_all(confirms).await?;
    Ok(Disposition::Ack)
}

/// Counts a handler as running until dropped.
struct Running<'a>(&'a WorkerMetrics);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running(-1);
    }
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic payload".to_owned());
    format!("handler panicked: {msg}")
}

/// The concurrency a running task holds: one of `worker.concurrency`'s
/// slots and, for a type capped by `worker.type_concurrency`, one of its
/// type's. Dropped as soon as the handler returns.
struct Slot {
    pool: Arc<Semaphore>,
    general: Option<OwnedSemaphorePermit>,
    typed: Option<OwnedSemaphorePermit>,
}

impl Slot {
    /// Takes one of the type's slots. While the type is at its cap, the
    /// general slot is given back so other types keep running, and taken
    /// again once the type has room. False if aborted while waiting.
    async fn take_typed(&mut self, cap: &Arc<Semaphore>, abort: &CancellationToken) -> bool {
        if let Ok(p) = cap.clone().try_acquire_owned() {
            self.typed = Some(p);
            return true;
        }
        self.general = None;
        debug!("task type at its concurrency cap: waiting for a slot");
        tokio::select! {
            p = cap.clone().acquire_owned() => self.typed = Some(p.expect("the semaphore is never closed")),
            _ = abort.cancelled() => return false,
        }
        tokio::select! {
            p = self.pool.clone().acquire_owned() => self.general = Some(p.expect("the semaphore is never closed")),
            _ = abort.cancelled() => return false,
        }
        true
    }
}

/// Publishes a running task's latest progress report as a `progress`
/// event, at most once a second.
struct ProgressEvents {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ProgressEvents {
    fn start(out: Outbox, template: Event, mut latest: watch::Receiver<ProgressReport>) -> Self {
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = latest.changed() => if changed.is_err() { return },
                    _ = stopped.cancelled() => return,
                }
                let Some((bytes, total)) = *latest.borrow_and_update() else {
                    continue;
                };
                let mut ev = template.clone();
                ev.event_id = new_id();
                ev.at = format_time(chrono::Utc::now());
                ev.progress = Some(ProgressInfo { bytes, total });
                match out.event(&ev).await {
                    Ok(confirm) => {
                        let _ = confirm.await;
                    }
                    Err(_) => return,
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stopped.cancelled() => return,
                }
            }
        });
        ProgressEvents { stop, task }
    }

    /// Stops publishing and waits for a publication in flight, so no
    /// progress event follows the attempt's outcome.
    async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
