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
//! | moved from a work queue with tenants to its tenant queue | the copy in the tenant queue (its directory record first, when new) |
//! | its queue is paused | the copy put back on its queue |
//! | its type is paused | the copy parked in `P.paused.<type>` |
//! | cancelled before it started | `cancelled` event, reply |
//! | its unique key held by another task | `duplicate` event, reply |
//! | cancelled while running | `started`, `cancelled` event, reply |
//! | succeeded | `started`, `succeeded` event, reply |
//! | failed, will retry | `started`, `failed` event, retry copy in `P.delay` |
//! | failed, no retry left | `started`, `failed` event; then copy in `P.dead`, `dead` event, reply |
//! | aborted at shutdown | `started`; then returned to the queue unacknowledged |
//! | escrow copy back, task done or lease running | nothing |
//! | escrow copy back, lease ended | as a redelivery |
//!
//! A task still running at `worker.escrow_after_ms` is put in escrow
//! (`warren_core::escrow`): the ack comes once its escrow copy and lease
//! record are confirmed, and its outcome is then settled by a confirmed
//! `escrow_done` record instead (a task aborted at shutdown by a copy put
//! back on its queue as a redelivery first).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::FutureExt;
use lapin::message::Delivery;
use lapin::types::FieldTable;
use lapin::PublisherConfirm;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};
use warren_client::runtime::{confirm_all, now_ms, Outbox};
use warren_client::ClientError;
use warren_core::backoff::full_jitter_ms;
use warren_core::chord::{Final, Member, Outcome as ChordOutcome};
use warren_core::control::ControlMessage;
use warren_core::delay::DUE_AT;
use warren_core::escrow::{EscrowTimes, Returned, ESCROW};
use warren_core::event::{cap_result, format_time, new_id, ErrorKind, EventErrorInfo};
use warren_core::flow::UniqueKey;
use warren_core::task::{check_headers, task_type_of, InvalidTask, MessageMeta};
use warren_core::topology::{chord_queue_arguments, field_table};
use warren_core::workflow::{AfterStop, Flow};
use warren_core::{headers, DeadReason, Event, TaskEnvelope, TaskState};

use super::flow;
use super::progress::TaskProgress;
use super::session::Session;
use super::slots::{Running, Slot};
use super::{sleep_until_some, Shared, Source};
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
    /// When the delivery arrived: the broker's consumer timeout counts from
    /// there, and so does the escrow start.
    received: Instant,
    /// The escrow id, when the delivery is an escrow copy back from
    /// `P.escrow` (its mark is removed from the delivery, so no copy made of
    /// it carries it).
    returned_copy: Option<String>,
    /// The escrow id of this run, once it is first put in escrow.
    escrow_id: OnceLock<String>,
    /// The delivery was acknowledged when the task went into escrow: its
    /// outcome is settled by an `escrow_done` record, never by an ack.
    escrowed: AtomicBool,
    /// Its place in a workflow (contract section 8), read from its headers
    /// when it has an id: `None` outside any workflow, an error when the
    /// description is malformed (the task is then invalid).
    flow: Option<Result<Flow, InvalidTask>>,
    /// Its place in a chord (contract section 8): `None` outside any, an
    /// error when its chord headers are malformed (the task is then invalid).
    chord: Option<Result<Member, InvalidTask>>,
}

impl<'a> Attempt<'a> {
    /// Takes `delivery` to its outcome and settles it. Errors publishing or
    /// acking mean the connection is gone: the delivery is left for the
    /// broker to redeliver.
    pub(super) async fn run(
        sh: &'a Shared,
        session: &'a Session,
        source: &'a Source,
        (delivery, received): (Delivery, Instant),
        abort: &CancellationToken,
        slot: Slot,
    ) {
        let attempt = Attempt::new(sh, session, source, delivery, received);
        let queue = attempt.queue;
        match attempt.triage().await {
            Triage::Settled(id, outcome) => attempt.settle(&id, outcome).await,
            Triage::Run(id) => {
                if let Some(outcome) = attempt.held_by_pause(&id).await {
                    return attempt.settle(&id, outcome).await;
                }
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
        let attempt = Attempt::new(sh, session, source, delivery, Instant::now());
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

    /// Holds back a delivery a pause applies to, unstarted: put back on its
    /// queue when the queue is paused, parked in `P.paused.<type>` when its
    /// type is (see [`Attempt::held_by_pause`]); handed back to its queue if
    /// the pause ended meanwhile. What triage settles without a slot is
    /// settled here as it would be there.
    pub(super) async fn hold_back(
        sh: &'a Shared,
        session: &'a Session,
        source: &'a Source,
        delivery: Delivery,
    ) {
        let attempt = Attempt::new(sh, session, source, delivery, Instant::now());
        match attempt.triage().await {
            Triage::Settled(id, outcome) => attempt.settle(&id, outcome).await,
            Triage::Run(id) => {
                let outcome = match attempt.held_by_pause(&id).await {
                    Some(outcome) => outcome,
                    None => attempt.requeue(&id, attempt.headers()).await,
                };
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
        let attempt = Attempt::new(sh, session, source, delivery, Instant::now());
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

    /// Moves a delivery with `x-warren-tenant` from a work queue with
    /// tenants to its tenant's queue (or the overflow), as a lane move: a
    /// confirmed copy, then the ack. A tenant that is not a string of
    /// 1..=256 bytes makes the task dead `invalid` (code `tenant`). What
    /// triage settles is settled here as it would be there.
    pub(super) async fn move_to_tenant(
        sh: &'a Shared,
        session: &'a Session,
        source: &'a Source,
        delivery: Delivery,
    ) {
        let attempt = Attempt::new(sh, session, source, delivery, Instant::now());
        let id = match attempt.triage().await {
            Triage::Settled(id, outcome) => return attempt.settle(&id, outcome).await,
            Triage::Run(id) => id,
        };
        let outcome =
            match super::tenants::move_to(sh, session, attempt.queue, &attempt.delivery).await {
                Err(invalid) => attempt.park_invalid(&id, &invalid).await,
                Ok(Ok(Some(queue))) => {
                    let d = &attempt.delivery;
                    let moved = attempt
                        .out()
                        .to_lane(
                            &queue,
                            &d.data,
                            &d.properties,
                            attempt.headers(),
                            &attempt.task_type,
                            &id,
                        )
                        .await;
                    if moved.is_ok() {
                        debug!(task_id = %id, queue, "moved to its tenant queue");
                        sh.metrics.moved_to_tenant();
                    }
                    moved.map(|()| Disposition::Ack)
                }
                // Its record not read back in time: back to its queue.
                Ok(Ok(None)) => attempt.requeue(&id, attempt.headers()).await,
                Ok(Err(e)) => Err(e),
            };
        attempt.settle(&id, outcome).await;
    }

    fn new(
        sh: &'a Shared,
        session: &'a Session,
        source: &'a Source,
        mut delivery: Delivery,
        received: Instant,
    ) -> Self {
        let returned_copy = take_escrow_mark(&mut delivery);
        let meta = meta_of(&delivery);
        let routing = [
            sh.routing_exchanges[0].as_str(),
            sh.routing_exchanges[1].as_str(),
        ];
        let task_type = task_type_of(&meta, &routing);
        let flow = meta
            .message_id
            .as_deref()
            .and_then(|id| Flow::from_headers(meta.headers.as_ref(), id).transpose());
        let chord = Member::from_headers(meta.headers.as_ref()).transpose();
        Attempt {
            sh,
            session,
            queue: &source.short,
            requeue_to: &source.full,
            delivery,
            meta,
            task_type,
            received,
            returned_copy,
            escrow_id: OnceLock::new(),
            escrowed: AtomicBool::new(false),
            flow,
            chord,
        }
    }

    /// Deals with what needs no handler: headers too large to carry, a
    /// missing id, a redelivery, a task already cancelled.
    async fn triage(&self) -> Triage {
        if let Err(invalid) = check_headers(self.meta.headers.as_ref()) {
            // Before anything re-publishes the message: with the system's
            // headers added, a copy would no longer fit in a frame.
            let id = self.meta.message_id.clone().unwrap_or_else(new_id);
            let r = Box::pin(self.park_invalid(&id, &invalid)).await;
            return Triage::Settled(id, r);
        }
        let Some(id) = self.meta.message_id.clone() else {
            // No id: re-publish a copy carrying one, so every event and
            // every redelivery of this task reports the same id.
            let id = new_id();
            let h = self.headers();
            let r = Box::pin(self.requeue(&id, h)).await;
            return Triage::Settled(id, r);
        };
        if let Some(escrow_id) = &self.returned_copy {
            match self.sh.cancels.escrow_returned(escrow_id) {
                Returned::Expired => {
                    warn!(task_id = %id, "escrow lease ended without an outcome: its worker is gone; the task runs again");
                    let r = Box::pin(self.redelivered(&id)).await;
                    return Triage::Settled(id, r);
                }
                held_or_done => {
                    debug!(task_id = %id, state = ?held_or_done, "escrow copy back while its task is held or done: dropped");
                    return Triage::Settled(id, Ok(Disposition::Ack));
                }
            }
        }
        if self.delivery.redelivered {
            let r = Box::pin(self.redelivered(&id)).await;
            return Triage::Settled(id, r);
        }
        if self.sh.cancels.contains(&id) || self.workflow_cancelled() {
            let attempt = (envelope_attempt(&self.meta) - 1).max(0);
            let r = Box::pin(self.cancelled(&id, attempt)).await;
            return Triage::Settled(id, r);
        }
        if let Some(r) = self.apply_change(&id).await {
            return Triage::Settled(id, r);
        }
        if let Some(r) = self.bad_flow_key(&id).await {
            return Triage::Settled(id, r);
        }
        if let Some(r) = self.duplicate(&id).await {
            return Triage::Settled(id, r);
        }
        Triage::Run(id)
    }

    /// A task of a type limited per key (contract section 9) whose key
    /// cannot be used (not a string, empty, longer than 256 bytes) is
    /// invalid, with error code `concurrency_key` or `rate_key`.
    async fn bad_flow_key(&self, id: &str) -> Option<Result<Disposition, ClientError>> {
        let flow = &self.sh.config.flow;
        if flow.concurrency.is_empty() && flow.rate.is_empty() {
            return None;
        }
        let sources = [
            (
                "concurrency_key",
                flow.concurrency
                    .get(&self.task_type)
                    .and_then(|c| c.key_source()),
            ),
            (
                "rate_key",
                flow.rate_of(&self.task_type).and_then(|r| r.key_source()),
            ),
        ];
        for (code, source) in sources {
            let Some(source) = source else { continue };
            if let Err(e) = source.key_of(self.meta.headers.as_ref(), &self.delivery.data) {
                let invalid = InvalidTask::new(code, e.to_string());
                return Some(Box::pin(self.park_invalid(id, &invalid)).await);
            }
        }
        None
    }

    /// A task with `x-warren-unique-key` (contract section 9) takes its key
    /// before it runs: `None` when it holds it (it runs). A task whose key
    /// another task holds is dropped with a `duplicate` event naming that
    /// task, and a key that cannot be used makes the task invalid.
    async fn duplicate(&self, id: &str) -> Option<Result<Disposition, ClientError>> {
        let key = match UniqueKey::from_headers(self.meta.headers.as_ref()) {
            Ok(None) => return None,
            Ok(Some(key)) => key,
            Err(e) => {
                let invalid = InvalidTask::new("unique_key", e.to_string());
                return Some(Box::pin(self.park_invalid(id, &invalid)).await);
            }
        };
        let claim = flow::claim(&self.session.conn, &self.sh.names, &key, id);
        let holder = match Box::pin(claim).await {
            Ok(flow::Claim::Won) => return None,
            Ok(flow::Claim::Lost(holder)) => holder,
            Err(e) if self.session.connected() => {
                // Refused while connected (permissions, say): returned to
                // its queue as a redelivery, so a lasting refusal ends it
                // dead `poison`, never in a loop.
                warn!(task_id = id, error = %e, "could not take the task's unique key; returned to its queue");
                return Some(Ok(Disposition::Requeue));
            }
            Err(e) => return Some(Err(e)),
        };
        let r = Box::pin(async {
            let attempt = (envelope_attempt(&self.meta) - 1).max(0);
            let mut ev = self.event(id, TaskState::Duplicate, attempt);
            ev.reason = Some(match &holder {
                Some(first) => format!("duplicate of {first}"),
                None => "duplicate".into(),
            });
            ev.duplicate_of = holder.clone();
            // A chord member dropped as a duplicate reaches its chord as
            // cancelled, with the reason naming the first.
            self.end_unstarted(id, &ev).await?;
            info!(task_id = id, first = ?holder, "duplicate: dropped");
            self.sh.metrics.duplicate();
            Ok(Disposition::Ack)
        })
        .await;
        Some(r)
    }

    /// A change of this task not applied to this copy yet (contract section
    /// 5): a due time ahead sends a copy back through `P.delay`, due then; a
    /// new priority puts a copy with it at the back of its queue, where it
    /// takes its new place; either copy carries the change's time in
    /// `x-warren-changed` and is confirmed before this delivery is
    /// acknowledged (dropped). `None`: nothing to do but run it.
    async fn apply_change(&self, id: &str) -> Option<Result<Disposition, ClientError>> {
        let applied = headers::get_int(self.meta.headers.as_ref(), headers::CHANGED)
            .ok()
            .flatten()
            .unwrap_or(0);
        let change = self.sh.cancels.change_pending(id, applied)?;
        let d = &self.delivery;
        let current = d.properties.priority().unwrap_or(0);
        let priority = change.priority().unwrap_or(current);
        let props = d.properties.clone().with_priority(priority);
        if let Some(due) = change.due_ms().filter(|due| *due > now_ms()) {
            let attempt = envelope_attempt(&self.meta);
            let r = Box::pin(async {
                let c = self
                    .out()
                    .reschedule(
                        &d.data,
                        &props,
                        id,
                        &self.task_type,
                        attempt,
                        due,
                        change.at_ms,
                    )
                    .await?;
                confirm_all(vec![c]).await?;
                info!(
                    task_id = id,
                    due_ms = due,
                    "changed: waits until its new due time"
                );
                Ok(Disposition::Ack)
            })
            .await;
            return Some(r);
        }
        if priority == current {
            debug!(task_id = id, "changed: due now at its priority, runs");
            return None;
        }
        let mut h = self.headers();
        headers::set_int(&mut h, headers::CHANGED, change.at_ms);
        let r = Box::pin(async {
            let c = self
                .out()
                .requeue(self.requeue_to, &d.data, &props, h, &self.task_type, id)
                .await?;
            confirm_all(vec![c]).await?;
            info!(
                task_id = id,
                priority, "changed: put back with its new priority"
            );
            Ok(Disposition::Ack)
        })
        .await;
        Some(r)
    }

    /// If a pause applies to the task, holds it back unstarted and returns
    /// the outcome: a copy put back at the end of its queue when that queue
    /// is paused (it waits there, as no worker consumes it), or parked in
    /// `P.paused.<type>` when its type is paused, with the queue it came
    /// from in `x-warren-paused-from` (moved back there on resume). `None`
    /// when no pause applies.
    async fn held_by_pause(&self, id: &str) -> Option<Result<Disposition, ClientError>> {
        if self.sh.cancels.queue_paused(self.queue) {
            let r = Box::pin(self.requeue(id, self.headers())).await;
            if r.is_ok() {
                debug!(task_id = %id, queue = self.queue, "put back: its queue is paused");
                self.sh.metrics.put_back_paused();
            }
            return Some(r);
        }
        if !self.sh.cancels.type_paused(&self.task_type) {
            return None;
        }
        let hold = self.sh.names.paused_type(&self.task_type);
        let parked = Box::pin(async {
            self.session.declare_hold(self.sh, &hold).await?;
            let mut h = self.headers();
            headers::set_str(&mut h, headers::PAUSED_FROM, self.requeue_to);
            let d = &self.delivery;
            self.out()
                .to_lane(&hold, &d.data, &d.properties, h, &self.task_type, id)
                .await?;
            Ok(Disposition::Ack)
        })
        .await;
        if parked.is_ok() {
            debug!(task_id = %id, r#type = %self.task_type, "parked: its type is paused");
            self.sh.metrics.parked_paused();
            if !self.sh.cancels.type_paused(&self.task_type) {
                // Resumed while this copy was on its way: the workers that
                // moved the parked tasks back may have missed it.
                let moving =
                    super::pausing::move_back(self.sh, self.session, &self.task_type, None);
                Box::pin(moving).await;
            }
        }
        Some(parked)
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
        let (mut task, handler) = match self.prepare(id) {
            Ok(ready) => ready,
            Err(invalid) => return Box::pin(self.park_invalid(id, &invalid)).await,
        };
        tracing::Span::current().record("attempt", task.attempt);
        if let Some(cap) = self.sh.type_caps.get(&self.task_type) {
            if !slot.take_typed(cap, abort).await {
                return Ok(Disposition::Requeue);
            }
        }
        // The outcome's event is this one made over: the same task, type,
        // queue and worker, without copying them again.
        let ev = self.event(id, TaskState::Started, task.attempt);
        let started = self.out().event(&ev).await?;
        debug!("started");
        self.note_lateness();
        match self.execute(id, &mut task, handler, abort, slot).await {
            Execution::Finished(Ok(value), ran) => self.succeeded(started, ev, value, ran).await,
            Execution::Finished(Err(err), ran) => {
                Box::pin(self.failed(id, &task, started, ev, err, ran)).await
            }
            Execution::Cancelled => {
                confirm_all(vec![started]).await?;
                Box::pin(self.cancelled(id, task.attempt)).await
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
        if let Some(Err(invalid)) = &self.flow {
            return Err(invalid.clone());
        }
        if let Some(Err(invalid)) = &self.chord {
            return Err(invalid.clone());
        }
        if matches!(&self.chord, Some(Ok(_))) && self.flow().is_some_and(|f| !f.rest.is_empty()) {
            // Dead invalid, and its chord gets that outcome.
            return Err(InvalidTask::new(
                "bad_workflow",
                "a chord member cannot carry a chain",
            ));
        }
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
    /// The task's id, type and arguments move to the handler's context.
    async fn execute(
        &self,
        id: &str,
        task: &mut TaskEnvelope,
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
            id: std::mem::take(&mut task.id),
            task_type: std::mem::take(&mut task.task_type),
            args: std::mem::take(&mut task.args),
            attempt: task.attempt,
            cancel: cancel.clone(),
            data_dir: sh.config.worker.data_dir.clone(),
            config: sh.config.clone(),
            progress,
        };
        let mut progress_events = TaskProgress::Quiet(progress_rx);
        let began = Instant::now();
        let running = Running::start(&sh.metrics);
        // Run in this task, not spawned: a panic is caught here, and on a
        // timeout, cancel or shutdown the handler's future is dropped.
        let mut join = std::pin::pin!(AssertUnwindSafe(handler.handle(ctx)).catch_unwind());
        let deadline = began + timeout;
        // Counted from the delivery's arrival, as the broker counts. The
        // handler runs on while the escrow is put in place or renewed.
        let mut escrow_at = sh
            .escrow
            .map(|t| self.received + Duration::from_millis(t.after_ms));
        let finished = |r: std::thread::Result<Result<Value, TaskError>>| match r {
            Ok(r) => r,
            Err(panic) => Err(TaskError::permanent("panic", panic_text(panic))),
        };
        // A handler done at its first poll (most short tasks) needs no
        // timer, no cancel registration and no wait on the tokens below:
        // nothing else ran meanwhile, so a cancel command could only have
        // come before, and triage took that one.
        if let std::task::Poll::Ready(r) = futures::poll!(&mut join) {
            return self
                .finished(finished(r), progress_events, began, running, slot)
                .await;
        }
        // From here a cancel command aborts it (at once if one came since
        // triage).
        let command = CancellationToken::new();
        let _registered = sh.cancels.running(id, command.clone());
        let result = loop {
            tokio::select! {
                // The handler first: its result wins over a timer or token
                // that fired in the same turn.
                biased;
                r = &mut join => break finished(r),
                _ = tokio::time::sleep_until(deadline.into()) => {
                    cancel.cancel();
                    break Err(TaskError::retryable("timeout", format!("no result within {} ms", timeout.as_millis())));
                }
                _ = command.cancelled() => {
                    cancel.cancel();
                    progress_events.finish().await;
                    return Execution::Cancelled;
                }
                _ = abort.cancelled() => {
                    cancel.cancel();
                    progress_events.finish().await;
                    return Execution::Aborted;
                }
                _ = sleep_until_some(escrow_at) => {
                    escrow_at = Box::pin(self.hold_in_escrow(id)).await;
                }
                _ = progress_events.first_report() => {
                    progress_events.publish(self.out(), || self.event(id, TaskState::Progress, task.attempt));
                }
            }
        };
        self.finished(result, progress_events, began, running, slot)
            .await
    }

    /// Ends a handler's run with its result: progress stopped, run time
    /// counted, the slot freed.
    async fn finished(
        &self,
        result: Result<Value, TaskError>,
        progress_events: TaskProgress,
        began: Instant,
        running: Running<'_>,
        slot: Slot,
    ) -> Execution {
        progress_events.finish().await;
        let took = began.elapsed();
        self.sh.note_task_time(took);
        drop(running);
        let ran = Ran {
            took,
            finished_at: format_time(chrono::Utc::now()),
        };
        drop(slot);
        Execution::Finished(result, ran)
    }

    /// Puts the task in escrow, or renews it: returns when to renew next, or
    /// `None` when putting it in escrow failed (the delivery stays
    /// unacknowledged, for the broker to redeliver if it times out).
    async fn hold_in_escrow(&self, id: &str) -> Option<Instant> {
        let times = self.sh.escrow?;
        let renew_at = || Some(Instant::now() + Duration::from_millis(times.renew_every_ms()));
        match self.escrow_once(id, &times).await {
            Ok(()) => renew_at(),
            Err(e) if self.is_escrowed() => {
                warn!(error = %e, "could not renew the escrow lease; the task may run again elsewhere once the lease ends");
                renew_at()
            }
            Err(e) => {
                warn!(error = %e, "could not put the task in escrow; it stays unacknowledged");
                None
            }
        }
    }

    /// Confirms an escrow copy in `P.escrow`, then a lease record that ends
    /// before the copy expires, then (the first time) acks the delivery.
    async fn escrow_once(&self, id: &str, times: &EscrowTimes) -> Result<(), ClientError> {
        let (out, d) = (self.out(), &self.delivery);
        let sent = now_ms();
        let escrow_id = self.escrow_id.get_or_init(new_id);
        let mut h = self.headers();
        headers::set_str(&mut h, ESCROW, escrow_id);
        let copy = out
            .escrow_copy(
                self.requeue_to,
                &d.data,
                &d.properties,
                h,
                &self.task_type,
                id,
                times.lease_ms,
            )
            .await?;
        confirm_all(vec![copy]).await?;
        let lease = ControlMessage::Lease {
            task_id: id.to_owned(),
            escrow_id: escrow_id.clone(),
            until_ms: times.lease_until(sent),
        };
        confirm_all(vec![out.control(&lease).await?]).await?;
        if self.is_escrowed() {
            debug!("escrow lease renewed");
            return Ok(());
        }
        // Acked alone, not coalesced: its result decides the escrow.
        self.session
            .acks
            .ack_alone(d.delivery_tag)
            .await
            .map_err(ClientError::amqp("ack the task put in escrow"))?;
        self.escrowed.store(true, Ordering::Relaxed);
        self.sh.metrics.escrowed();
        info!(
            lease_ms = times.lease_ms,
            "in escrow: acknowledged, a copy held in the escrow queue under a lease renewed while it runs"
        );
        Ok(())
    }

    fn is_escrowed(&self) -> bool {
        self.escrowed.load(Ordering::Relaxed)
    }

    /// Settles a task in escrow: its outcome recorded, a confirmed
    /// `escrow_done` record, so its copies are dropped when they return.
    /// Aborted at shutdown, it is first put back on its queue as a
    /// redelivery. When anything fails, its last copy runs it again once
    /// the lease ends.
    async fn settle_escrowed(&self, id: &str, outcome: Result<Disposition, ClientError>) {
        let outcome = match outcome {
            Ok(Disposition::Requeue) => self.redelivered(id).await,
            other => other,
        };
        let done = match outcome {
            Ok(_) => {
                let done = ControlMessage::EscrowDone {
                    task_id: id.to_owned(),
                    escrow_id: self.escrow_id.get().cloned().unwrap_or_default(),
                };
                match self.out().control(&done).await {
                    Ok(c) => confirm_all(vec![c]).await,
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match done {
            Ok(()) => debug!(task_id = id, "escrow done"),
            Err(e) => warn!(
                task_id = id,
                error = %e,
                "could not record the outcome of the task in escrow; it runs again once its lease ends"
            ),
        }
    }

    /// Confirms `started`, `succeeded` and the reply.
    async fn succeeded(
        &self,
        started: PublisherConfirm,
        started_ev: Event,
        value: Value,
        ran: Ran,
    ) -> Result<Disposition, ClientError> {
        let out = self.out();
        let duration_ms = ran.took.as_millis() as u64;
        let mut ev = made_over(started_ev, TaskState::Succeeded, ran.finished_at);
        let id = ev.task_id.as_str();
        ev.duration_ms = Some(duration_ms);
        let result = cap_result(value, self.sh.config.limits.max_result_bytes);
        let mut confirms = vec![started];
        if let Some(next) = self.flow().and_then(|f| f.after_success(id, &result)) {
            debug!(next = %next.id, r#type = %next.task_type, "chain: next step published");
            confirms.push(Box::pin(out.next_task(&next)).await?);
        }
        if self.chord.is_some() {
            let told = self.chord_outcome(id, Final::Succeeded, Some(result.clone()), None, None);
            confirms.extend(Box::pin(told).await?);
        }
        ev.result = Some(result);
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
        started_ev: Event,
        err: TaskError,
        ran: Ran,
    ) -> Result<Disposition, ClientError> {
        let (sh, out) = (self.sh, self.out());
        let policy = sh.config.retry_policy(&self.task_type);
        let max_retries = task.max_retries.unwrap_or(u64::from(policy.max_retries));
        let will_retry = err.is_retryable() && (task.attempt as u64) <= max_retries;
        let mut failed = made_over(started_ev, TaskState::Failed, ran.finished_at);
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

    /// Confirms the final event `ev` of a task that ends without running
    /// (cancelled, duplicate) and its reply, with what follows from it: the
    /// rest of its chain stopped, and its chord told it was cancelled (with
    /// the event's reason).
    async fn end_unstarted(&self, id: &str, ev: &Event) -> Result<(), ClientError> {
        let mut confirms = self
            .out()
            .event_and_reply(ev, &self.delivery.properties)
            .await?;
        if let Some(stop) = self.flow().map(|f| f.after_cancel(id, &self.task_type)) {
            confirms.extend(self.stop_chain(id, stop).await?);
        }
        confirms.extend(
            self.chord_outcome(id, Final::Cancelled, None, ev.reason.clone(), None)
                .await?,
        );
        confirm_all(confirms).await
    }

    /// Confirms `cancelled` (for a task dropped by a cancel command) and the reply.
    async fn cancelled(&self, id: &str, attempt: i64) -> Result<Disposition, ClientError> {
        let mut ev = self.event(id, TaskState::Cancelled, attempt);
        ev.reason = Some("cancel command".into());
        self.end_unstarted(id, &ev).await?;
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
        if let Some(f) = self.flow() {
            let error = serde_json::to_value(&ev.error).unwrap_or(Value::Null);
            let stop = f.after_failure(&ev.task_id, &self.task_type, reason.as_str(), error);
            confirms.extend(self.stop_chain(&ev.task_id, stop).await?);
        }
        let error = ev.error.as_ref().and_then(|e| serde_json::to_value(e).ok());
        confirms.extend(
            self.chord_outcome(&ev.task_id, Final::Dead, None, ev.reason.clone(), error)
                .await?,
        );
        confirm_all(confirms).await?;
        Ok(Disposition::Ack)
    }

    /// Publishes the outcome of a chord member to its chord's queue (none
    /// for a task outside any chord).
    async fn chord_outcome(
        &self,
        id: &str,
        state: Final,
        result: Option<Value>,
        reason: Option<String>,
        error: Option<Value>,
    ) -> Result<Option<PublisherConfirm>, ClientError> {
        let Some(Ok(m)) = &self.chord else {
            return Ok(None);
        };
        let outcome = ChordOutcome::new(m, id, state, result, reason, error);
        let queue = self.sh.names.chord_queue(&m.chord_id);
        let args = field_table(&chord_queue_arguments(&self.sh.config));
        debug!(chord = %m.chord_id, index = m.index, "chord: member outcome published");
        Ok(Some(
            self.out().chord_outcome(&queue, args, &outcome).await?,
        ))
    }

    /// Publishes what follows a chain step `id` that ended dead or was
    /// cancelled: a `cancelled` event for each step skipped (attempt 0,
    /// with the reason naming the step that stopped the chain), and the
    /// `"after": "always"` step that runs anyway. Returns the confirms.
    async fn stop_chain(
        &self,
        id: &str,
        stop: AfterStop,
    ) -> Result<Vec<PublisherConfirm>, ClientError> {
        let out = self.out();
        let mut confirms = Vec::with_capacity(stop.skipped.len() + 1);
        let workflow_id = self.flow().map(|f| f.workflow_id.clone());
        for s in stop.skipped {
            let mut ev = Event::new(&s.id, &s.task_type, TaskState::Cancelled, 0);
            ev.worker = Some(self.sh.identity.clone());
            ev.reason = Some(s.reason);
            ev.workflow_id = workflow_id.clone();
            ev.parent_id = Some(id.to_owned());
            confirms.push(out.event(&ev).await?);
        }
        if let Some(next) = stop.next {
            debug!(next = %next.id, r#type = %next.task_type, "chain: step run after a failure published");
            confirms.push(out.next_task(&next).await?);
        }
        Ok(confirms)
    }

    /// The task's place in a workflow, when it has a valid one.
    fn flow(&self) -> Option<&Flow> {
        self.flow.as_ref().and_then(|f| f.as_ref().ok())
    }

    /// Whether a cancel command named the task's workflow: every task of
    /// it not started yet is then cancelled when a worker next sees it.
    fn workflow_cancelled(&self) -> bool {
        self.flow()
            .is_some_and(|f| self.sh.cancels.contains(&f.workflow_id))
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
        if self.is_escrowed() {
            return Box::pin(self.settle_escrowed(id, outcome)).await;
        }
        match outcome {
            Ok(Disposition::Ack) => {
                self.session.acks.ack(self.delivery.delivery_tag).await;
            }
            Ok(Disposition::Requeue) => {
                self.session.acks.requeue(self.delivery.delivery_tag).await;
            }
            Err(e) => {
                warn!(
                    task_id = id,
                    error = %e,
                    "could not record the outcome; the broker will redeliver the task"
                );
                if e.needs_fresh_channels() {
                    // The connection is open, but the broker refused or never
                    // confirmed: close it, so that it redelivers this
                    // session's tasks and the worker connects again on fresh
                    // channels.
                    let closing = self
                        .session
                        .conn
                        .close(200, "a publication was refused or never confirmed".into());
                    let _ = Box::pin(closing).await;
                }
            }
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
        if let Some(f) = self.flow() {
            e.workflow_id = Some(f.workflow_id.clone());
            e.parent_id = f.parent_id.clone();
        }
        e
    }
}

/// `ev` made over as a later event of the same attempt: a fresh id, `state`,
/// stamped `at`.
fn made_over(mut ev: Event, state: TaskState, at: String) -> Event {
    ev.event_id = new_id();
    ev.state = state;
    ev.at = at;
    ev
}

/// Removes the escrow mark from a delivery's headers; the escrow id it
/// named, if it had one (a mark that is not a string names none that any
/// record can match, so its copy runs again as a redelivery).
fn take_escrow_mark(d: &mut Delivery) -> Option<String> {
    let h = d.properties.headers().as_ref()?;
    let mark = h.inner().get(ESCROW)?;
    let escrow_id = match mark {
        lapin::types::AMQPValue::LongString(s) => {
            String::from_utf8_lossy(s.as_bytes()).into_owned()
        }
        lapin::types::AMQPValue::ShortString(s) => s.as_str().to_owned(),
        _ => String::new(),
    };
    let mut h = h.clone();
    headers::remove(&mut h, &[ESCROW]);
    d.properties = d.properties.clone().with_headers(h);
    Some(escrow_id)
}

pub(super) fn meta_of(d: &Delivery) -> MessageMeta {
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
