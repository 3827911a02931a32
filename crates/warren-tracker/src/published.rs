//! Tasks seen from their publication on: the copies in `P.tracker.published`
//! (bound by the topology to `P.tasks` with the routes' patterns and to
//! `P.delay`), read as `queued` or `scheduled` events of the task.

use lapin::message::Delivery;
use warren_core::event::Event;
use warren_core::{headers, Config, TaskState};

use crate::record::{format_ms, IncomingEvent};

/// What a copy read from `P.tracker.published` says of its task, or `None`
/// for a copy without a `message_id` (its id is assigned by the worker that
/// takes it, and the task is known from its first event).
pub fn decode(d: &Delivery, config: &Config, received_ms: i64) -> Option<IncomingEvent> {
    let names = config.names();
    let props = &d.properties;
    let task_id = props.message_id().as_ref()?.as_str().to_owned();
    if task_id.is_empty() {
        return None;
    }
    let h = props.headers().as_ref();
    let republished = headers::get_flag(h, headers::REPUBLISHED);
    // The type is the routing key of the first publication; the system's
    // copies carry it in `type` (contract section 7).
    let task_type = match props.kind().as_ref() {
        Some(t) if republished => t.as_str().to_owned(),
        _ => d.routing_key.as_str().to_owned(),
    };
    let attempt = if republished {
        headers::get_int(h, headers::ATTEMPT)
            .ok()
            .flatten()
            .unwrap_or(1)
            .max(1)
    } else {
        1
    };
    let priority = props.priority().map(i64::from);
    let delayed = d.exchange.as_str() == names.delay();
    let mut event;
    let mut released = None;
    if delayed {
        event = Event::new(&task_id, &task_type, TaskState::Scheduled, attempt);
        // A due time that does not parse makes the task invalid: the
        // scheduler says so with a `dead` event; the copy shows no due time.
        event.due_at = warren_core::delay::due_at_ms(h, received_ms, u64::MAX / 2)
            .ok()
            .map(format_ms);
    } else {
        event = Event::new(&task_id, &task_type, TaskState::Queued, attempt);
        released = headers::get_int(h, warren_core::delay::DUE_AT)
            .ok()
            .flatten();
    }
    event.queue = queue_of(config, &task_type);
    // A task of a workflow counts in it from its publication on.
    if let Ok(Some(flow)) = warren_core::workflow::Flow::from_headers(h, &task_id) {
        event.workflow_id = Some(flow.workflow_id);
        event.parent_id = flow.parent_id;
    }
    // A stable id: the same copy read twice is one event.
    event.event_id = format!(
        "published:{task_id}:{attempt}:{}:{}",
        if delayed { "delay" } else { "tasks" },
        released.unwrap_or(0)
    );
    Some(IncomingEvent::published(
        event,
        received_ms,
        released,
        priority,
    ))
}

/// The short name of the work queue a task type is routed to, if any.
pub fn queue_of(config: &Config, task_type: &str) -> Option<String> {
    config
        .routes
        .iter()
        .find(|r| warren_core::routes::matches(&r.pattern, task_type))
        .map(|r| r.queue.clone())
        .or_else(|| config.default_queue().map(|q| q.name.clone()))
}
