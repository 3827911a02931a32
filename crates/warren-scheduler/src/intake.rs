//! Dead-letter intake: tasks that work queues dead-lettered (expired, rejected)
//! are classified and parked in `P.dead` with a `dead` event.

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use warren_client::runtime::{confirm_all, Outbox};
use warren_client::ClientError;
use warren_core::chord::{Final, Member, Outcome};
use warren_core::event::{ErrorKind, EventErrorInfo};
use warren_core::{headers, DeadReason, Event, Names, TaskState};

/// The first `x-death` entry's reason and queue, as the broker recorded them.
pub fn death_of(d: &Delivery) -> (Option<String>, Option<String>) {
    let Some(AMQPValue::FieldArray(deaths)) = d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death"))
    else {
        return (None, None);
    };
    let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first() else {
        return (None, None);
    };
    let text = |k: &str| match first.inner().get(k) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
        _ => None,
    };
    (text("reason"), text("queue"))
}

/// Parks one dead-lettered task and reports it; the caller acks on `Ok`,
/// which carries the reason it was parked with. A chord member's outcome
/// goes to its chord's queue, declared with `chord_args`.
pub async fn park_dead_lettered(
    out: &Outbox,
    names: &Names,
    identity: &str,
    d: &Delivery,
    chord_args: &FieldTable,
) -> Result<DeadReason, ClientError> {
    let (why, queue) = death_of(d);
    let (reason, detail) = match why.as_deref() {
        Some("expired") => (
            DeadReason::Expired,
            "expired (per-message TTL) before a worker started it".to_owned(),
        ),
        Some(other) => (
            DeadReason::Invalid,
            format!("dead-lettered by the broker: {other}"),
        ),
        None => (
            DeadReason::Invalid,
            "reached the dead-letter exchange without x-death".to_owned(),
        ),
    };
    let p = &d.properties;
    let task_type = p
        .kind()
        .as_ref()
        .map(|k| k.as_str().to_owned())
        .unwrap_or_else(|| d.routing_key.as_str().to_owned());
    let task_id = p
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(warren_core::event::new_id);
    let hdrs = p.headers().as_ref();
    let attempt = if headers::get_flag(hdrs, headers::REPUBLISHED) {
        headers::get_int(hdrs, headers::ATTEMPT)
            .ok()
            .flatten()
            .map_or(0, |a| (a - 1).max(0))
    } else {
        0
    };
    let short = queue.as_deref().and_then(|q| names.short_queue_name(q));
    let mut ev = Event::new(&task_id, &task_type, TaskState::Dead, attempt);
    ev.queue = short.map(str::to_owned);
    ev.worker = Some(identity.to_owned());
    ev.reason = Some(reason.as_str().to_owned());
    ev.error = Some(EventErrorInfo {
        kind: ErrorKind::Permanent,
        code: reason.as_str().to_owned(),
        message: detail.clone(),
    });
    let flow = warren_core::workflow::Flow::from_headers(hdrs, &task_id)
        .ok()
        .flatten();
    if let Some(flow) = &flow {
        ev.workflow_id = Some(flow.workflow_id.clone());
        ev.parent_id = flow.parent_id.clone();
    }
    let mut confirms = vec![out.dead(&d.data, p, &ev, reason, &detail, short).await?];
    confirms.extend(out.event_and_reply(&ev, p).await?);
    // A chord member that ends dead here reaches its chord as on a worker.
    if let Ok(Some(m)) = Member::from_headers(hdrs) {
        let error = serde_json::to_value(&ev.error).ok();
        let outcome = Outcome::new(
            &m,
            &task_id,
            Final::Dead,
            None,
            Some(reason.as_str().to_owned()),
            error,
        );
        let queue = names.chord_queue(&m.chord_id);
        confirms.push(
            out.chord_outcome(&queue, chord_args.clone(), &outcome)
                .await?,
        );
    }
    // A chain step that ends dead here stops its chain as on a worker
    // (contract section 8), confirmed with the dead copy.
    if let Some(flow) = flow {
        let error = serde_json::to_value(&ev.error).unwrap_or_default();
        let stop = flow.after_failure(&task_id, &task_type, reason.as_str(), error);
        for skipped in stop.skipped {
            let mut c = Event::new(&skipped.id, &skipped.task_type, TaskState::Cancelled, 0);
            c.worker = Some(identity.to_owned());
            c.reason = Some(skipped.reason);
            c.workflow_id = Some(flow.workflow_id.clone());
            c.parent_id = Some(task_id.clone());
            confirms.push(out.event(&c).await?);
        }
        if let Some(next) = stop.next {
            confirms.push(out.next_task(&next).await?);
        }
    }
    confirm_all(confirms).await?;
    Ok(reason)
}
