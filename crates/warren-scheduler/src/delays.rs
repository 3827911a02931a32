//! Delays and retries: intake from `P.delay`, hops through the wait tiers,
//! and the release: into a release tier that the broker empties into
//! `P.tasks` at the due time, or straight into `P.tasks`.
//!
//! A delivery is acknowledged only after its next copy (in a tier, or in
//! `P.tasks`) is confirmed by the broker, so a scheduler killed at any moment
//! loses nothing: the broker redelivers what was not acknowledged. Under a
//! second is ever waited in process (to enter a release tier on the exact
//! millisecond, or before the release itself), holding the delivery
//! unacknowledged.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use warren_client::runtime::{confirm_all, copy_properties, CancelSet, Outbox};
use warren_client::{ClientError, ORIGINAL_EXPIRATION};
use warren_core::chord::{Final, Member, Outcome};
use warren_core::delay::{due_at_ms, next_hop, release_tiers, tiers, Hop, DUE_AT, TIER_EXIT};
use warren_core::event::{format_time, new_id, ErrorKind, EventErrorInfo};
use warren_core::task::check_headers;
use warren_core::{headers, DeadReason, Event, Names, TaskState};

use crate::metrics::SchedulerMetrics;

/// The delay machinery of one scheduler.
#[derive(Clone)]
pub(crate) struct Delays {
    pub(crate) names: Names,
    pub(crate) tiers: Vec<u64>,
    pub(crate) release_tiers: Vec<u64>,
    pub(crate) max_delay_ms: u64,
    pub(crate) identity: String,
    pub(crate) cancels: CancelSet,
    pub(crate) metrics: Arc<SchedulerMetrics>,
    /// The arguments of a chord's queue, where a member that ends here
    /// sends its outcome (contract section 8).
    pub(crate) chord_args: FieldTable,
}

/// A task on its way through the delay path.
struct Waiting {
    id: String,
    task_type: String,
    attempt: i64,
    due_ms: i64,
    headers: FieldTable,
    /// A new priority from a change record, for every copy from here on.
    priority: Option<u8>,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn ms_to_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(format_time)
        .unwrap_or_else(|| ms.to_string())
}

impl Delays {
    pub(crate) fn new(
        config: &warren_core::Config,
        identity: String,
        cancels: CancelSet,
        metrics: Arc<SchedulerMetrics>,
    ) -> Self {
        Delays {
            names: config.names(),
            tiers: tiers(config.scheduler.max_delay_ms),
            // The replicated topology has no release tiers (see topology.rs).
            release_tiers: if config.topology.replicated {
                Vec::new()
            } else {
                release_tiers(config.scheduler.max_delay_ms)
            },
            max_delay_ms: config.scheduler.max_delay_ms,
            identity,
            cancels,
            metrics,
            chord_args: warren_core::topology::field_table(
                &warren_core::topology::chord_queue_arguments(config),
            ),
        }
    }

    /// The outcome of a chord member that ends here, published to its
    /// chord's queue (none for a task outside any chord).
    async fn chord_outcome(
        &self,
        out: &Outbox,
        d: &Delivery,
        ev: &Event,
        state: Final,
    ) -> Result<Option<lapin::PublisherConfirm>, ClientError> {
        let Ok(Some(m)) = Member::from_headers(d.properties.headers().as_ref()) else {
            return Ok(None);
        };
        let error = ev.error.as_ref().and_then(|e| serde_json::to_value(e).ok());
        let outcome = Outcome::new(&m, &ev.task_id, state, None, ev.reason.clone(), error);
        let queue = self.names.chord_queue(&m.chord_id);
        Ok(Some(
            out.chord_outcome(&queue, self.chord_args.clone(), &outcome)
                .await?,
        ))
    }

    fn event(&self, w: &Waiting, state: TaskState) -> Event {
        let mut e = Event::new(&w.id, &w.task_type, state, w.attempt);
        e.worker = Some(self.identity.clone());
        // A task of a workflow names it in every event (contract section 8).
        if let Ok(Some(f)) = warren_core::workflow::Flow::from_headers(Some(&w.headers), &w.id) {
            e.workflow_id = Some(f.workflow_id);
            e.parent_id = f.parent_id;
        }
        e
    }

    /// A task just published to `P.delay` (by a producer, or a worker's retry).
    pub(crate) async fn intake(
        &self,
        out: &Outbox,
        d: Delivery,
        holds: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<(), ClientError> {
        let p = &d.properties;
        let hdrs = p.headers().as_ref();
        let republished = headers::get_flag(hdrs, headers::REPUBLISHED);
        // The type is the routing key of the first publication; copies the
        // system re-published carry it in the `type` property.
        let task_type = match (republished, p.kind()) {
            (true, Some(t)) if !t.as_str().is_empty() => t.as_str().to_owned(),
            _ => d.routing_key.as_str().to_owned(),
        };
        let id = p
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(new_id);
        let attempt = if republished {
            headers::get_int(hdrs, headers::ATTEMPT)
                .ok()
                .flatten()
                .unwrap_or(1)
                .max(1)
        } else {
            1
        };
        let mut h = p.headers().clone().unwrap_or_default();
        let mut w = Waiting {
            id,
            task_type,
            attempt,
            due_ms: 0,
            headers: FieldTable::default(),
            priority: None,
        };
        let checked =
            check_headers(hdrs).and_then(|()| due_at_ms(hdrs, now_ms(), self.max_delay_ms));
        let due = match checked {
            Ok(due) => due,
            Err(invalid) => {
                let mut ev = self.event(&w, TaskState::Dead);
                ev.attempt = w.attempt - 1;
                ev.reason = Some(DeadReason::Invalid.as_str().into());
                ev.error = Some(EventErrorInfo {
                    kind: ErrorKind::Permanent,
                    code: invalid.code.into(),
                    message: invalid.message.clone(),
                });
                let mut confirms = vec![
                    out.dead(&d.data, p, &ev, DeadReason::Invalid, &invalid.message, None)
                        .await?,
                    out.event(&ev).await?,
                ];
                confirms.extend(self.chord_outcome(out, &d, &ev, Final::Dead).await?);
                confirm_all(confirms).await?;
                ack(&d).await?;
                self.metrics.dead(DeadReason::Invalid.as_str());
                return Ok(());
            }
        };
        w.due_ms = due;
        if self.cancelled(out, &w, &d).await? {
            return Ok(());
        }
        headers::remove(&mut h, &[headers::DELAY, headers::ETA]);
        headers::remove_where(&mut h, headers::is_death_record);
        headers::set_int(&mut h, headers::ATTEMPT, w.attempt);
        headers::set_flag(&mut h, headers::REPUBLISHED);
        headers::set_int(&mut h, DUE_AT, due);
        if let Some(exp) = p.expiration() {
            headers::set_str(&mut h, ORIGINAL_EXPIRATION, exp.as_str());
        }
        w.headers = h;
        self.apply_change(&mut w);
        let mut ev = self.event(&w, TaskState::Scheduled);
        ev.due_at = Some(ms_to_time(w.due_ms));
        let scheduled = out.event(&ev).await?;
        self.metrics.scheduled();
        self.route(out, d, w, vec![scheduled], holds, stop).await
    }

    /// A task leaving a wait tier.
    pub(crate) async fn hop(
        &self,
        out: &Outbox,
        d: Delivery,
        holds: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<(), ClientError> {
        let p = &d.properties;
        let hdrs = p.headers().as_ref();
        let mut h = p.headers().clone().unwrap_or_default();
        headers::remove_where(&mut h, headers::is_death_record);
        headers::remove(&mut h, &[TIER_EXIT]);
        let w = Waiting {
            id: p
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .unwrap_or_else(new_id),
            task_type: p
                .kind()
                .as_ref()
                .map(|k| k.as_str().to_owned())
                .unwrap_or_else(|| d.routing_key.as_str().to_owned()),
            attempt: headers::get_int(hdrs, headers::ATTEMPT)
                .ok()
                .flatten()
                .unwrap_or(1),
            // A copy without a due time (should not happen) is released now.
            due_ms: headers::get_int(hdrs, DUE_AT).ok().flatten().unwrap_or(0),
            headers: h,
            priority: None,
        };
        let mut w = w;
        self.metrics.hop();
        if self.cancelled(out, &w, &d).await? {
            return Ok(());
        }
        let mut confirms = Vec::new();
        if self.apply_change(&mut w) {
            let mut ev = self.event(&w, TaskState::Scheduled);
            ev.due_at = Some(ms_to_time(w.due_ms));
            confirms.push(out.event(&ev).await?);
        }
        self.route(out, d, w, confirms, holds, stop).await
    }

    /// Applies a change of the task its copy has not had yet (contract
    /// section 5): its new due time (a past one is now) and priority, and
    /// the change's time in `x-warren-changed`; true if there was one.
    fn apply_change(&self, w: &mut Waiting) -> bool {
        let applied = headers::get_int(Some(&w.headers), headers::CHANGED)
            .ok()
            .flatten()
            .unwrap_or(0);
        let Some(c) = self.cancels.change_pending(&w.id, applied) else {
            return false;
        };
        if let Some(due) = c.due_ms() {
            w.due_ms = due.max(now_ms());
            headers::set_int(&mut w.headers, DUE_AT, w.due_ms);
        }
        if let Some(p) = c.priority() {
            w.priority = Some(p);
        }
        headers::set_int(&mut w.headers, headers::CHANGED, c.at_ms);
        info!(task_id = %w.id, due_ms = w.due_ms, priority = ?w.priority, "changed while waiting");
        true
    }

    /// Drops a cancelled task with a `cancelled` event; true if it was.
    async fn cancelled(
        &self,
        out: &Outbox,
        w: &Waiting,
        d: &Delivery,
    ) -> Result<bool, ClientError> {
        if !self.cancels.contains(&w.id) {
            return Ok(false);
        }
        let mut ev = self.event(w, TaskState::Cancelled);
        ev.attempt = w.attempt - 1;
        ev.reason = Some("cancel command".into());
        let mut confirms = out.event_and_reply(&ev, &d.properties).await?;
        confirms.extend(self.chord_outcome(out, d, &ev, Final::Cancelled).await?);
        confirm_all(confirms).await?;
        ack(d).await?;
        self.metrics.cancelled();
        Ok(true)
    }

    /// Next hop: a wait tier while more than 16 s remain; then, after under
    /// a second in process, a release tier (or `P.tasks` itself).
    async fn route(
        &self,
        out: &Outbox,
        d: Delivery,
        w: Waiting,
        mut confirms: Vec<lapin::PublisherConfirm>,
        holds: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<(), ClientError> {
        let remaining = w.due_ms - now_ms();
        // Dead-lettering drops `expiration`, so a task that must get its
        // own back is released by the scheduler, not by a release tier.
        let release = if headers::original_expiration(Some(&w.headers)).is_some() {
            &[][..]
        } else {
            &self.release_tiers[..]
        };
        let (enter_ms, tier) = match next_hop(remaining, &self.tiers, release) {
            Hop::Wait(tier) => {
                let mut h = w.headers.clone();
                headers::set_int(&mut h, TIER_EXIT, now_ms() + tier as i64 * 1000);
                let mut props = copy_properties(&d.properties, h, &w.task_type, Some(&w.id));
                if let Some(p) = w.priority {
                    props = props.with_priority(p);
                }
                let queue = self.names.wait_tier(tier);
                confirms.push(out.channel.send("", &queue, &d.data, props).await?);
                confirm_all(confirms).await?;
                debug!(task_id = %w.id, tier, remaining, "waiting in {queue}");
                return ack(&d).await;
            }
            Hop::ReleaseTier(n) => (w.due_ms - n as i64 * 1000, Some(n)),
            Hop::Release => (w.due_ms, None),
        };
        confirm_all(confirms).await?;
        let this = self.clone();
        let out = out.clone();
        let stop = stop.clone();
        self.metrics.held(1);
        holds.spawn(async move {
            let wait = Duration::from_millis(enter_ms.saturating_sub(now_ms()).max(0) as u64);
            let due = tokio::select! {
                _ = tokio::time::sleep(wait) => true,
                // Unacknowledged: the broker hands it to the next scheduler.
                _ = stop.cancelled() => false,
            };
            // Boxed, so a waiting task's future stays small: thousands may
            // wait at once, and the release's state is allocated only when it runs.
            let released = if due {
                Box::pin(this.release(&out, &d, &w, tier)).await
            } else {
                Ok(())
            };
            this.metrics.held(-1);
            if let Err(e) = released {
                warn!(task_id = %w.id, error = %e, "release failed; the broker will redeliver");
                if e.needs_fresh_channels() {
                    // Open, but refused or never confirmed: close the channel,
                    // so that the session ends and the broker redelivers what
                    // it holds.
                    out.channel.close().await;
                }
            }
        });
        Ok(())
    }

    /// Publishes a task to release tier `tier` (entered exactly `tier` s
    /// before its due time, so the broker hands it to `P.tasks` when due) or,
    /// without one, straight to `P.tasks`; then acknowledges its delivery.
    async fn release(
        &self,
        out: &Outbox,
        d: &Delivery,
        w: &Waiting,
        tier: Option<u64>,
    ) -> Result<(), ClientError> {
        if self.cancelled(out, w, d).await? {
            return Ok(());
        }
        let props = release_properties(&d.properties, w);
        // The routing key is the type either way: dead-lettering keeps it.
        let exchange = match tier {
            Some(n) => self.names.release_tier(n),
            None => self.names.tasks(),
        };
        let c = out
            .channel
            .send(&exchange, &w.task_type, &d.data, props)
            .await?;
        confirm_all(vec![c]).await?;
        ack(d).await?;
        match tier {
            Some(n) => {
                debug!(task_id = %w.id, tier = n, "released through {exchange}");
                self.metrics.release_tier();
            }
            None => {
                let late_ms = now_ms() - w.due_ms;
                debug!(task_id = %w.id, late_ms, "released");
                self.metrics.released(late_ms);
            }
        }
        Ok(())
    }
}

/// The properties of a released task: its own, with the `expiration` it
/// came with back (only a valid one: a producer may forge the header).
fn release_properties(original: &BasicProperties, w: &Waiting) -> BasicProperties {
    // `x-warren-due-at` stays: workers measure their start against it.
    let mut h = w.headers.clone();
    let expiration = headers::original_expiration(Some(&h));
    headers::remove(&mut h, &[ORIGINAL_EXPIRATION]);
    let mut props = copy_properties(original, h, &w.task_type, Some(&w.id));
    if let Some(p) = w.priority {
        props = props.with_priority(p);
    }
    match expiration {
        Some(exp) => props.with_expiration(exp),
        None => props,
    }
}

async fn ack(d: &Delivery) -> Result<(), ClientError> {
    d.acker
        .ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(|source| ClientError::Amqp {
            what: "ack".into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(expiration: &str) -> Waiting {
        let mut h = FieldTable::default();
        headers::set_str(&mut h, ORIGINAL_EXPIRATION, expiration);
        Waiting {
            id: "t-1".into(),
            task_type: "diag.echo".into(),
            attempt: 1,
            due_ms: 0,
            headers: h,
            priority: None,
        }
    }

    #[test]
    fn a_changed_priority_goes_on_every_copy() {
        let mut w = waiting("5000");
        w.priority = Some(8);
        let original = BasicProperties::default().with_priority(2);
        assert_eq!(*release_properties(&original, &w).priority(), Some(8));
        w.priority = None;
        assert_eq!(*release_properties(&original, &w).priority(), Some(2));
    }

    #[test]
    fn a_released_task_gets_its_saved_expiration_back() {
        let p = release_properties(&BasicProperties::default(), &waiting("60000"));
        assert_eq!(p.expiration().as_ref().map(|e| e.as_str()), Some("60000"));
        let h = p.headers().as_ref().expect("headers kept");
        assert!(!h.contains_key(ORIGINAL_EXPIRATION), "the header is spent");
    }

    /// A producer can publish to `P.delay` with the header already set: a
    /// value over 255 bytes made building the property panic in the held
    /// task, leaving the delivery unacknowledged for good; any other invalid
    /// one made the broker close the channel on every redelivery.
    #[test]
    fn a_forged_expiration_header_is_dropped_not_restored() {
        let zero_padded = format!("{}1000", "0".repeat(300));
        for forged in [&zero_padded, &"9".repeat(300), "soon", "-5"] {
            let p = release_properties(&BasicProperties::default(), &waiting(forged));
            assert_eq!(p.expiration(), &None, "{forged:?}");
        }
    }
}
