//! One delivery of a task, from triage to its ack or return.
//!
//! The worker's core rule lives here: a delivery is acknowledged only once
//! every event and copy its outcome needs has been confirmed by the broker.
//! When any of them fails to publish, the delivery is left unacknowledged
//! and the broker redelivers it, so nothing is lost.
//!
//! What each outcome waits for before the ack:
//!
//! | outcome | confirmed before the ack |
//! |---|---|
//! | invalid message, poison | copy in `P.dead`, `dead` event, reply |
//! | no id, or redelivered below the poison limit | the copy put back on its queue |
//! | handed back: waited `worker.handback_ms` for a slot | the copy put back on its queue |
//! | moved from a lane entry to its priority's lane | the copy in the lane |
//! | cancelled before it started | `cancelled` event, reply |
//! | cancelled while running | `started`, `cancelled` event, reply |
//! | succeeded | `started`, `succeeded` event, reply |
//! | failed, will retry | `started`, `failed` event, retry copy in `P.delay` |
//! | failed, no retry left | `started`, `failed` event; then copy in `P.dead`, `dead` event, reply |
//! | aborted at shutdown | `started`; then returned to the queue unacknowledged |

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::FieldTable;
use lapin::PublisherConfirm;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};
use warren_client::runtime::{confirm_all, Outbox};
use warren_client::ClientError;
use warren_core::backoff::full_jitter_ms;
use warren_core::delay::DUE_AT;
use warren_core::event::{cap_result, format_time, new_id, ErrorKind, EventErrorInfo};
use warren_core::task::{check_headers, task_type_of, InvalidTask, MessageMeta};
use warren_core::{headers, DeadReason, Event, TaskEnvelope, TaskState};

use super::progress::ProgressEvents;
use super::session::Session;
use super::slots::{Running, Slot};
use super::{Shared, Source};
use crate::handler::Handler;
use crate::metrics::Outcome;
use crate::{Progress, TaskContext, TaskError};

/// What becomes of a delivery once its outcome is recorded.
enum Disposition {
    /// Acknowledge: the outcome's events and copies are confirmed.
    Ack,
    /// Return it to its queue unacknowledged (shutdown, or aborted while
    /// waiting for its type's slot).
    Requeue,
}

/// Where triage leaves a delivery.
enum Triage {
    /// Dealt with before any handler: settle with this result.
    Settled(String, Result<Disposition, ClientError>),
    /// A task to attempt, with its id.
    Run(String),
}

/// How a handler's run ended.
enum Execution {
    /// The handler returned, failed or ran out of time.
    Finished(Result<Value, TaskError>, Ran),
    /// A cancel command arrived while it ran.
    Cancelled,
    /// The worker is shutting down past its grace period.
    Aborted,
}

/// How long the handler ran, and when it finished (outcome events carry it).
struct Ran {
    took: Duration,
    finished_at: String,
}

/// One delivery taken from a work queue.
pub(super) struct Attempt<'a> {
    sh: &'a Shared,
    session: &'a Session,
    /// The short name of the work queue it came from.
    queue: &'a str,
    /// The full name of the queue it came from (a lane's, for a lane), where
    /// copies put back go.
    requeue_to: &'a str,
    delivery: Delivery,
    meta: MessageMeta,
    task_type: String,
}

impl<'a> Attempt<'a> {
    /// Takes `delivery` to its outcome and settles it. Errors publishing or
    /// acking mean the connection is gone: the delivery is left for the
    /// broker to redeliver.
    pub(super) async fn run(
        sh: &'a Shared,
        session: &'a Session,
        source: &'a Source,
        delivery: Delivery,
        abort: &CancellationToken,
        slot: Slot,
    ) {
        let attempt = Attempt::new(sh, session, source, delivery);
        let queue = attempt.queue;
        match attempt.triage().await {
            Triage::Settled(id, outcome) => attempt.settle(&id, outcome).await,
            Triage::Run(id) => {
                let span = info_span!("task", task_id = %id, r#type = %attempt.task_type, queue = %queue, attempt = tracing::field::Empty);
                async {
                    let outcome = attempt.attempt(&id, abort, slot).await;
                    attempt.settle(&id, outcome).await;
                }
                .instrument(span)
                .await
            }
        }
    }

    /// Hands back a delivery that waited `worker.handback_ms` for a slot
    /// while every slot was busy, so a worker with a free slot takes it: a
    /// copy at the back of its queue (same id, headers and priority), then
    /// the ack. What triage settles without a slot (invalid headers, no id,
    /// a redelivery, a cancelled task) is settled here as it would be there.
    pub(super) async fn hand_back(
        sh: &'a Shared,
        session: &'a Session,
        source: &'a Source,
        delivery: Delivery,
    ) {
        let attempt = Attempt::new(sh, session, source, delivery);
        match attempt.triage().await {
            Triage::Settled(id, outcome) => attempt.settle(&id, outcome).await,
            Triage::Run(id) => {
                let h = attempt.headers();
                let outcome = attempt.requeue(&id, h).await;
                if outcome.is_ok() {
                    debug!(task_id = %id, "handed back: waited too long for a slot");
                    sh.metrics.handed_back();
                }
                attempt.settle(&id, outcome).await;
            }
        }
    }

    /// Moves a delivery from the entry of a work queue with lanes to the
    /// lane of its priority, when it cannot start at once: a copy like a
    /// hand-back's (same id, headers, priority and expiration, counted
    /// again), published `mandatory` to the lane and confirmed, then the
    /// ack. Lane deliveries are never moved again. What triage settles
    /// without a slot is settled here as it would be there.
    pub(super) async fn move_to_lane(
        sh: &'a Shared,
        session: &'a Session,
        source: &'a Source,
        delivery: Delivery,
    ) {
        let attempt = Attempt::new(sh, session, source, delivery);
        let Some(lane) = source.lane_for(&attempt.delivery) else {
            // Not an entry: nothing to sort, keep it on its queue.
            return Self::hand_back(sh, session, source, attempt.delivery).await;
        };
        match attempt.triage().await {
            Triage::Settled(id, outcome) => attempt.settle(&id, outcome).await,
            Triage::Run(id) => {
                let d = &attempt.delivery;
                let outcome = attempt
                    .out()
                    .to_lane(
                        lane,
                        &d.data,
                        &d.properties,
                        attempt.headers(),
                        &attempt.task_type,
                        &id,
                    )
                    .await
                    .map(|()| Disposition::Ack);
                if outcome.is_ok() {
                    debug!(task_id = %id, lane, "moved to its lane");
                    sh.metrics.moved_to_lane();
                }
                attempt.settle(&id, outcome).await;
            }
        }
    }

    fn new(sh: &'a Shared, session: &'a Session, source: &'a Source, delivery: Delivery) -> Self {
        let meta = meta_of(&delivery);
        let routing = [
            sh.routing_exchanges[0].as_str(),
            sh.routing_exchanges[1].as_str(),
        ];
        let task_type = task_type_of(&meta, &routing);
        Attempt {
            sh,
            session,
            queue: &source.short,
            requeue_to: &source.full,
            delivery,
            meta,
            task_type,
        }
    }

    /// Deals with what needs no handler: headers too large to carry, a
    /// missing id, a redelivery, a task already cancelled.
    async fn triage(&self) -> Triage {
        if let Err(invalid) = check_headers(self.meta.headers.as_ref()) {
            // Before anything re-publishes the message: with the system's
            // headers added, a copy would no longer fit in a frame.
            let id = self.meta.message_id.clone().unwrap_or_else(new_id);
            let r = self.park_invalid(&id, &invalid).await;
            return Triage::Settled(id, r);
        }
        let Some(id) = self.meta.message_id.clone() else {
            // No id: re-publish a copy carrying one, so every event and
            // every redelivery of this task reports the same id.
            let id = new_id();
            let h = self.headers();
            let r = self.requeue(&id, h).await;
            return Triage::Settled(id, r);
        };
        if self.delivery.redelivered {
            let r = self.redelivered(&id).await;
            return Triage::Settled(id, r);
        }
        if self.sh.cancels.contains(&id) {
            let attempt = (envelope_attempt(&self.meta) - 1).max(0);
            let r = self.cancelled(&id, attempt).await;
            return Triage::Settled(id, r);
        }
        Triage::Run(id)
    }

    /// Redelivered without an outcome (its worker died or lost the broker):
    /// counted in a header of a fresh copy, since classic queues keep no
    /// delivery count, and parked as poison past the limit.
    async fn redelivered(&self, id: &str) -> Result<Disposition, ClientError> {
        let mut h = self.headers();
        let seen = headers::get_int(Some(&h), headers::REDELIVERIES)
            .ok()
            .flatten()
            .unwrap_or(0)
            .saturating_add(1);
        let limit = i64::from(self.sh.config.scheduler.poison_redeliveries);
        if seen <= limit {
            self.sh.metrics.redelivered();
            headers::set_int(&mut h, headers::REDELIVERIES, seen);
            return self.requeue(id, h).await;
        }
        warn!(task_id = id, redeliveries = seen, "poison: parked dead");
        let message = format!("redelivered {seen} times without an outcome (limit {limit})");
        let mut ev = self.event(id, TaskState::Dead, envelope_attempt(&self.meta));
        ev.reason = Some(DeadReason::Poison.as_str().into());
        ev.error = Some(EventErrorInfo {
            kind: ErrorKind::Permanent,
            code: "poison".into(),
            message: message.clone(),
        });
        let r = self.park(DeadReason::Poison, &message, &ev).await?;
        self.sh
            .metrics
            .dead(self.sh.label(&self.task_type), "poison", None);
        Ok(r)
    }

    /// Prepares, runs and records one attempt of the task.
    async fn attempt(
        &self,
        id: &str,
        abort: &CancellationToken,
        mut slot: Slot,
    ) -> Result<Disposition, ClientError> {
        let (task, handler) = match self.prepare(id) {
            Ok(ready) => ready,
            Err(invalid) => return self.park_invalid(id, &invalid).await,
        };
        tracing::Span::current().record("attempt", task.attempt);
        if let Some(cap) = self.sh.type_caps.get(&self.task_type) {
            if !slot.take_typed(cap, abort).await {
                return Ok(Disposition::Requeue);
            }
        }
        let started = self
            .out()
            .event(&self.event(id, TaskState::Started, task.attempt))
            .await?;
        debug!("started");
        self.note_lateness();
        match self.execute(id, &task, handler, abort, slot).await {
            Execution::Finished(Ok(value), ran) => {
                self.succeeded(id, &task, started, value, ran).await
            }
            Execution::Finished(Err(err), ran) => self.failed(id, &task, started, err, ran).await,
            Execution::Cancelled => {
                confirm_all(vec![started]).await?;
                self.cancelled(id, task.attempt).await
            }
            Execution::Aborted => {
                confirm_all(vec![started]).await?;
                warn!("aborted at shutdown; returned to the queue");
                self.sh.metrics.returned();
                Ok(Disposition::Requeue)
            }
        }
    }

    /// Reads the envelope and finds the handler of its type.
    fn prepare(&self, id: &str) -> Result<(TaskEnvelope, Arc<dyn Handler>), InvalidTask> {
        let task = TaskEnvelope::parse(
            &self.meta,
            &self.task_type,
            id,
            &self.delivery.data,
            self.sh.config.limits.max_body_bytes,
        )?;
        let handler = self.sh.registry.get(&self.task_type).ok_or_else(|| {
            InvalidTask::new(
                "no_handler",
                format!(
                    "no handler for task type {:?} on queue {}",
                    self.task_type, self.queue
                ),
            )
        })?;
        Ok((task, handler))
    }

    /// Runs the handler under its time limit, a cancel command and the
    /// shutdown abort, publishing its progress. The slot is freed as soon as
    /// the handler is done, so waiting for confirms never holds back the
    /// next handler (in-flight deliveries stay bounded by the prefetch).
    async fn execute(
        &self,
        id: &str,
        task: &TaskEnvelope,
        handler: Arc<dyn Handler>,
        abort: &CancellationToken,
        slot: Slot,
    ) -> Execution {
        let sh = self.sh;
        let timeout =
            Duration::from_millis(task.timeout_ms.unwrap_or(sh.config.worker.task_timeout_ms));
        // Not a child of `abort`: on shutdown the abort branch below must
        // win, returning the task unacknowledged, not a handler failing on
        // its token.
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
            self.out().clone(),
            self.event(id, TaskState::Progress, task.attempt),
            progress_rx,
        );
        let command = CancellationToken::new();
        let _registered = sh.cancels.running(id, command.clone());
        let began = Instant::now();
        let running = Running::start(&sh.metrics);
        let mut join = tokio::spawn(async move { handler.handle(ctx).await });
        let result = tokio::select! {
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
                return Execution::Cancelled;
            }
            _ = abort.cancelled() => {
                cancel.cancel();
                join.abort();
                progress_events.finish().await;
                return Execution::Aborted;
            }
        };
        progress_events.finish().await;
        let took = began.elapsed();
        sh.note_task_time(took);
        drop(running);
        let ran = Ran {
            took,
            finished_at: format_time(chrono::Utc::now()),
        };
        drop(slot);
        Execution::Finished(result, ran)
    }

    /// Confirms `started`, `succeeded` and the reply.
    async fn succeeded(
        &self,
        id: &str,
        task: &TaskEnvelope,
        started: PublisherConfirm,
        value: Value,
        ran: Ran,
    ) -> Result<Disposition, ClientError> {
        let out = self.out();
        let duration_ms = ran.took.as_millis() as u64;
        let mut ev = self.event(id, TaskState::Succeeded, task.attempt);
        ev.at = ran.finished_at;
        ev.duration_ms = Some(duration_ms);
        ev.result = Some(cap_result(value, self.sh.config.limits.max_result_bytes));
        let mut confirms = vec![started];
        confirms.extend(out.event_and_reply(&ev, &self.delivery.properties).await?);
        confirm_all(confirms).await?;
        info!(duration_ms, "succeeded");
        self.sh
            .metrics
            .outcome(&self.task_type, Outcome::Succeeded, Some(ran.took));
        Ok(Disposition::Ack)
    }

    /// Confirms `started` and `failed`, then either the retry copy in
    /// `P.delay` or, with no retry left, the task parked dead.
    async fn failed(
        &self,
        id: &str,
        task: &TaskEnvelope,
        started: PublisherConfirm,
        err: TaskError,
        ran: Ran,
    ) -> Result<Disposition, ClientError> {
        let (sh, out) = (self.sh, self.out());
        let policy = sh.config.retry_policy(&self.task_type);
        let max_retries = task.max_retries.unwrap_or(u64::from(policy.max_retries));
        let will_retry = err.is_retryable() && (task.attempt as u64) <= max_retries;
        let mut failed = self.event(id, TaskState::Failed, task.attempt);
        failed.at = ran.finished_at;
        failed.duration_ms = Some(ran.took.as_millis() as u64);
        failed.error = Some(err.to_info());
        failed.retry = Some(will_retry);
        let failed_c = out.event(&failed).await?;
        info!(code = %err.code, retry = will_retry, "failed: {}", err.message);
        if will_retry {
            let retry_no = u32::try_from(task.attempt).unwrap_or(u32::MAX);
            let delay = full_jitter_ms(policy, retry_no, &mut rand::thread_rng())
                .max(err.retry_after_ms.unwrap_or(0));
            let retry_c = out
                .retry(
                    &self.delivery.data,
                    &self.delivery.properties,
                    id,
                    &self.task_type,
                    task.attempt.saturating_add(1),
                    delay,
                    &err.to_string(),
                )
                .await?;
            confirm_all(vec![started, failed_c, retry_c]).await?;
            sh.metrics
                .outcome(&self.task_type, Outcome::Retried, Some(ran.took));
            return Ok(Disposition::Ack);
        }
        let reason = if err.is_retryable() {
            DeadReason::RetriesExhausted
        } else {
            DeadReason::PermanentFailure
        };
        let mut ev = self.event(id, TaskState::Dead, task.attempt);
        ev.reason = Some(reason.as_str().into());
        ev.error = Some(err.to_info());
        confirm_all(vec![started, failed_c]).await?;
        let r = self.park(reason, &err.to_string(), &ev).await?;
        sh.metrics
            .dead(&self.task_type, reason.as_str(), Some(ran.took));
        Ok(r)
    }

    /// Confirms `cancelled` (for a task dropped by a cancel command) and the reply.
    async fn cancelled(&self, id: &str, attempt: i64) -> Result<Disposition, ClientError> {
        let mut ev = self.event(id, TaskState::Cancelled, attempt);
        ev.reason = Some("cancel command".into());
        let confirms = self
            .out()
            .event_and_reply(&ev, &self.delivery.properties)
            .await?;
        confirm_all(confirms).await?;
        info!(task_id = id, "cancelled");
        self.sh
            .metrics
            .outcome(self.sh.label(&self.task_type), Outcome::Cancelled, None);
        Ok(Disposition::Ack)
    }

    /// Parks a message that is not a valid task: `dead` with reason
    /// `invalid` and the problem's code, no attempt started.
    async fn park_invalid(
        &self,
        id: &str,
        invalid: &InvalidTask,
    ) -> Result<Disposition, ClientError> {
        info!(code = invalid.code, "invalid task: {}", invalid.message);
        let mut ev = self.event(id, TaskState::Dead, 0);
        ev.reason = Some(DeadReason::Invalid.as_str().into());
        ev.error = Some(EventErrorInfo {
            kind: ErrorKind::Permanent,
            code: invalid.code.into(),
            message: invalid.message.clone(),
        });
        let r = self
            .park(DeadReason::Invalid, &invalid.message, &ev)
            .await?;
        self.sh.metrics.dead(
            self.sh.label(&self.task_type),
            DeadReason::Invalid.as_str(),
            None,
        );
        Ok(r)
    }

    /// Confirms the copy in `P.dead`, the `dead` event `ev` and the reply.
    async fn park(
        &self,
        reason: DeadReason,
        detail: &str,
        ev: &Event,
    ) -> Result<Disposition, ClientError> {
        let out = self.out();
        let d = &self.delivery;
        let mut confirms = vec![
            out.dead(&d.data, &d.properties, ev, reason, detail, Some(self.queue))
                .await?,
        ];
        confirms.extend(out.event_and_reply(ev, &d.properties).await?);
        confirm_all(confirms).await?;
        Ok(Disposition::Ack)
    }

    /// Confirms a copy put at the back of the queue it came from (its lane,
    /// for a lane) with `h` and the id `id`.
    async fn requeue(&self, id: &str, h: FieldTable) -> Result<Disposition, ClientError> {
        let d = &self.delivery;
        let c = self
            .out()
            .requeue(
                self.requeue_to,
                &d.data,
                &d.properties,
                h,
                &self.task_type,
                id,
            )
            .await?;
        confirm_all(vec![c]).await?;
        Ok(Disposition::Ack)
    }

    /// Acks, returns or leaves the delivery as its outcome says.
    async fn settle(&self, id: &str, outcome: Result<Disposition, ClientError>) {
        match outcome {
            Ok(Disposition::Ack) => {
                if let Err(e) = self.delivery.acker.ack(BasicAckOptions::default()).await {
                    warn!(task_id = id, error = %e, "ack failed; the broker will redeliver the task");
                }
            }
            Ok(Disposition::Requeue) => {
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                let _ = self.delivery.acker.nack(requeue).await;
            }
            Err(e) => warn!(
                task_id = id,
                error = %e,
                "could not record the outcome; the broker will redeliver the task"
            ),
        }
    }

    /// A delayed task's first start after its release (not a redelivery):
    /// how late it started.
    fn note_lateness(&self) {
        let hdrs = self.delivery.properties.headers().as_ref();
        if let (Ok(Some(due)), false, Ok(None)) = (
            headers::get_int(hdrs, DUE_AT),
            self.delivery.redelivered,
            headers::get_int(hdrs, headers::REDELIVERIES),
        ) {
            self.sh
                .metrics
                .delay_lateness(chrono::Utc::now().timestamp_millis() - due);
        }
    }

    /// A copy of the delivery's headers, for a copy of the message.
    fn headers(&self) -> FieldTable {
        self.delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default()
    }

    fn out(&self) -> &Outbox {
        &self.session.outbox
    }

    fn event(&self, id: &str, state: TaskState, attempt: i64) -> Event {
        let mut e = Event::new(id, &self.task_type, state, attempt);
        e.queue = Some(self.queue.to_owned());
        e.worker = Some(self.sh.identity.clone());
        e
    }
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

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic payload".to_owned());
    format!("handler panicked: {msg}")
}
