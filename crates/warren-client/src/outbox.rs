//! What workers and the scheduler publish: events, reply_to copies, dead and
//! retry copies, each keeping the task's body, properties and headers.

use crate::connect::ConfirmChannel;
use crate::ClientError;
use lapin::types::FieldTable;
use lapin::{BasicProperties, PublisherConfirm};
use warren_core::headers;
use warren_core::{DeadReason, Event, Names};

/// Publishes on one confirm channel; every method returns the confirm future
/// so a caller can keep several in flight and await them before acking.
#[derive(Debug, Clone)]
pub struct Outbox {
    /// The confirm channel everything is sent on.
    pub channel: ConfirmChannel,
    /// The topology names.
    pub names: Names,
}

pub use warren_core::headers::ORIGINAL_EXPIRATION;

impl Outbox {
    /// Publishes an event to `P.events` with routing key `<state>.<type>`.
    pub async fn event(&self, ev: &Event) -> Result<PublisherConfirm, ClientError> {
        self.channel
            .send(
                self.names.events_exchange(),
                ev.routing_key(),
                &ev.to_json(),
                event_properties(ev, None),
            )
            .await
    }

    /// Publishes `ev` to `P.events` and, when the task's properties name a
    /// `reply_to` queue, the same event there with the task's
    /// `correlation_id`: the confirms, the event's first.
    pub async fn event_and_reply(
        &self,
        ev: &Event,
        task: &BasicProperties,
    ) -> Result<Vec<PublisherConfirm>, ClientError> {
        let mut confirms = vec![self.event(ev).await?];
        if let Some(r) = task.reply_to().as_ref().filter(|r| !r.as_str().is_empty()) {
            let cid = task.correlation_id().as_ref().map(|c| c.as_str());
            confirms.push(self.reply(ev, r.as_str(), cid).await?);
        }
        Ok(confirms)
    }

    /// Sends the same event to a producer's `reply_to` queue via the default exchange.
    pub async fn reply(
        &self,
        ev: &Event,
        reply_to: &str,
        correlation_id: Option<&str>,
    ) -> Result<PublisherConfirm, ClientError> {
        let props = event_properties(ev, Some(correlation_id.unwrap_or(&ev.task_id)));
        self.channel.send("", reply_to, &ev.to_json(), props).await
    }

    /// Parks a task in `P.dead`: body, properties and headers intact, plus
    /// the dead reason, its detail, the queue it came from and the last
    /// attempt started, all taken with the id and type from its `dead` event.
    /// Headers too large or too deep to carry ([`headers::unfit`]) are
    /// replaced by their size.
    pub async fn dead(
        &self,
        body: &[u8],
        original: &BasicProperties,
        ev: &Event,
        reason: DeadReason,
        detail: &str,
        queue: Option<&str>,
    ) -> Result<PublisherConfirm, ClientError> {
        let (task_id, task_type) = (ev.task_id.as_str(), ev.task_type.as_str());
        // Headers too large to carry with the system's own are left behind,
        // or the copy would not fit in a frame and could never be parked.
        let mut h = match headers::unfit(original.headers().as_ref()) {
            Some(shape) => {
                let mut h = FieldTable::default();
                headers::set_int(&mut h, headers::HEADERS_DROPPED, shape.bytes as i64);
                h
            }
            None => original.headers().clone().unwrap_or_default(),
        };
        headers::set_int(&mut h, headers::ATTEMPT, ev.attempt);
        headers::set_str(&mut h, headers::DEAD_REASON, reason.as_str());
        headers::set_str(&mut h, headers::DEAD_DETAIL, &truncate(detail, 4096));
        if let Some(q) = queue {
            headers::set_str(&mut h, headers::DEAD_QUEUE, q);
        }
        if let Some(exp) = original.expiration() {
            headers::set_str(&mut h, ORIGINAL_EXPIRATION, exp.as_str());
        }
        let props = copy_properties(original, h, task_type, Some(task_id));
        self.channel.send("", &self.names.dead(), body, props).await
    }

    /// Re-publishes a task to the back of its queue with the id the system
    /// assigned it and the given headers.
    pub async fn requeue(
        &self,
        queue: &str,
        body: &[u8],
        original: &BasicProperties,
        h: FieldTable,
        task_type: &str,
        task_id: &str,
    ) -> Result<PublisherConfirm, ClientError> {
        let props = requeue_properties(original, h, task_type, task_id);
        self.channel.send("", queue, body, props).await
    }

    /// Moves a task to a priority lane of its work queue (`queue`, a lane
    /// queue's full name): a copy like [`Outbox::requeue`]'s, published
    /// `mandatory`, so a missing lane returns it instead of dropping it.
    /// Resolves once the broker confirmed the copy in the lane.
    pub async fn to_lane(
        &self,
        queue: &str,
        body: &[u8],
        original: &BasicProperties,
        h: FieldTable,
        task_type: &str,
        task_id: &str,
    ) -> Result<(), ClientError> {
        self.copy_to("", queue, body, original, h, task_type, task_id)
            .await
    }

    /// A copy like [`Outbox::to_lane`]'s, published `mandatory` to
    /// `exchange` with `routing_key` (`""` and a queue name: that queue).
    /// Resolves once the broker confirmed it routed to a queue.
    #[allow(clippy::too_many_arguments)]
    pub async fn copy_to(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        original: &BasicProperties,
        h: FieldTable,
        task_type: &str,
        task_id: &str,
    ) -> Result<(), ClientError> {
        let queue = routing_key;
        let props = requeue_properties(original, h, task_type, task_id);
        let confirm = self
            .channel
            .send_mandatory(exchange, routing_key, body, props)
            .await?;
        let c = confirm.await.map_err(|source| ClientError::Amqp {
            what: format!("confirm of task {task_id} in {queue}"),
            source,
        })?;
        if c.is_nack() {
            return Err(ClientError::Nacked {
                task_id: task_id.to_owned(),
            });
        }
        if c.take_message().is_some() {
            return Err(ClientError::InvalidRequest(format!(
                "the broker has no queue {queue} to move task {task_id} to: run `warren \
                 topology apply`"
            )));
        }
        Ok(())
    }

    /// Puts an escrow copy of a running task in `P.escrow`: the task's body,
    /// properties and the headers `h` (which carry the escrow mark), its id
    /// and type, expiring after `lease_ms`, with the routing key `queue`
    /// (its full work queue name), where it is dead-lettered back to when it
    /// expires.
    #[allow(clippy::too_many_arguments)]
    pub async fn escrow_copy(
        &self,
        queue: &str,
        body: &[u8],
        original: &BasicProperties,
        h: FieldTable,
        task_type: &str,
        task_id: &str,
        lease_ms: u64,
    ) -> Result<PublisherConfirm, ClientError> {
        let props = copy_properties(original, h, task_type, Some(task_id))
            .with_expiration(lease_ms.to_string().into());
        self.channel
            .send(&self.names.escrow(), queue, body, props)
            .await
    }

    /// Publishes a control message (such as an escrow lease or done record)
    /// to `P.control`, persistent, as JSON.
    pub async fn control(
        &self,
        m: &warren_core::control::ControlMessage,
    ) -> Result<PublisherConfirm, ClientError> {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        self.channel
            .send(&self.names.control(), "", &m.to_json(), props)
            .await
    }

    /// Sends a retry through `P.delay` with `x-delay`, the next attempt
    /// number and the last error; the scheduler releases it when due.
    #[allow(clippy::too_many_arguments)]
    pub async fn retry(
        &self,
        body: &[u8],
        original: &BasicProperties,
        task_id: &str,
        task_type: &str,
        next_attempt: i64,
        delay_ms: u64,
        last_error: &str,
    ) -> Result<PublisherConfirm, ClientError> {
        let mut h = original.headers().clone().unwrap_or_default();
        headers::set_int(&mut h, headers::ATTEMPT, next_attempt);
        headers::set_flag(&mut h, headers::REPUBLISHED);
        headers::set_str(&mut h, headers::LAST_ERROR, &truncate(last_error, 4096));
        headers::remove(&mut h, &[headers::ETA]);
        headers::remove_where(&mut h, headers::is_death_record);
        headers::set_int(&mut h, headers::DELAY, delay_ms.min(i64::MAX as u64) as i64);
        // The expiration counts from release, not while the retry waits.
        if let Some(exp) = original.expiration() {
            headers::set_str(&mut h, ORIGINAL_EXPIRATION, exp.as_str());
        }
        let props = copy_properties(original, h, task_type, Some(task_id));
        self.channel
            .send(&self.names.delay(), task_type, body, props)
            .await
    }
}

impl Outbox {
    /// Publishes a chord member's outcome to its chord's queue `queue`
    /// (contract section 8), declaring the queue first with `arguments`
    /// (every declarer uses the same ones); persistent, JSON.
    pub async fn chord_outcome(
        &self,
        queue: &str,
        arguments: FieldTable,
        outcome: &warren_core::chord::Outcome,
    ) -> Result<PublisherConfirm, ClientError> {
        use lapin::options::QueueDeclareOptions;
        let declare = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.channel
            .channel()
            .queue_declare(queue.into(), declare, arguments)
            .await
            .map_err(ClientError::amqp("declare a chord queue"))?;
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(short(&outcome.task_id).into());
        self.channel.send("", queue, &outcome.encode(), props).await
    }

    /// Publishes the next task of a workflow (a chain's next step) to
    /// `P.tasks` under its type: persistent, JSON, with its id, priority
    /// and headers.
    pub async fn next_task(
        &self,
        t: &warren_core::workflow::NextTask,
    ) -> Result<PublisherConfirm, ClientError> {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(short(&t.id).into())
            .with_type(short(&t.task_type).into())
            .with_headers(t.headers.clone());
        if let Some(p) = t.priority {
            props = props.with_priority(p);
        }
        self.channel
            .send(&self.names.tasks(), &t.task_type, &t.body, props)
            .await
    }

    /// Sends a changed task back through `P.delay`, due at `due_ms` (Unix
    /// ms, `x-warren-eta`), as attempt `attempt`, marked with the change it
    /// carries (`x-warren-changed` = `changed_at`); `original` carries the
    /// priority to keep. The scheduler holds it until then.
    #[allow(clippy::too_many_arguments)]
    pub async fn reschedule(
        &self,
        body: &[u8],
        original: &BasicProperties,
        task_id: &str,
        task_type: &str,
        attempt: i64,
        due_ms: i64,
        changed_at: i64,
    ) -> Result<PublisherConfirm, ClientError> {
        let mut h = original.headers().clone().unwrap_or_default();
        headers::set_int(&mut h, headers::ATTEMPT, attempt);
        headers::set_flag(&mut h, headers::REPUBLISHED);
        headers::set_int(&mut h, headers::CHANGED, changed_at);
        headers::remove(&mut h, &[headers::DELAY]);
        headers::remove_where(&mut h, headers::is_death_record);
        headers::set_int(&mut h, headers::ETA, due_ms);
        if let Some(exp) = original.expiration() {
            headers::set_str(&mut h, ORIGINAL_EXPIRATION, exp.as_str());
        }
        let props = copy_properties(original, h, task_type, Some(task_id));
        self.channel
            .send(&self.names.delay(), task_type, body, props)
            .await
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The properties of an event message.
fn event_properties(ev: &Event, correlation_id: Option<&str>) -> BasicProperties {
    let cid = correlation_id.unwrap_or(&ev.task_id);
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(ev.event_id.as_str().into())
        .with_correlation_id(short(cid).into())
        .with_type(short(&ev.task_type).into())
}

/// `s` cut to at most 255 bytes on a character boundary (an AMQP short string).
pub fn short(s: &str) -> &str {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The properties of a copy put back on a queue (a requeue or a move to a
/// lane): [`copy_properties`] plus the task's own `expiration`, if any.
fn requeue_properties(
    original: &BasicProperties,
    h: FieldTable,
    task_type: &str,
    task_id: &str,
) -> BasicProperties {
    let props = copy_properties(original, h, task_type, Some(task_id));
    match original.expiration() {
        Some(exp) => props.with_expiration(exp.clone()),
        None => props,
    }
}

/// Copies every property except `expiration` and `user_id` (the broker
/// refuses a `user_id` that is not the publishing connection's user), with new headers, the AMQP
/// `type` set to the task type, the task id, and persistence.
pub fn copy_properties(
    p: &BasicProperties,
    headers: FieldTable,
    task_type: &str,
    task_id: Option<&str>,
) -> BasicProperties {
    let mut out = copy_producer_properties(
        p,
        BasicProperties::default()
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_type(short(task_type).into()),
    );
    match (task_id, p.message_id()) {
        (Some(id), _) => out = out.with_message_id(short(id).into()),
        (None, Some(v)) => out = out.with_message_id(v.clone()),
        (None, None) => {}
    }
    out
}

/// Sets on `out` the properties of `p` that belong to the producer and
/// travel unchanged with every copy: content type and encoding, priority,
/// correlation id, reply-to, timestamp, app id and cluster id.
pub(crate) fn copy_producer_properties(
    p: &BasicProperties,
    mut out: BasicProperties,
) -> BasicProperties {
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

/// Awaits every confirm in order; any failure or negative confirm is an error,
/// so the caller must not ack.
pub async fn confirm_all(confirms: Vec<PublisherConfirm>) -> Result<(), ClientError> {
    // One timer for them all: they were sent together, so the bound on
    // each is the bound on the last.
    crate::connect::within_publish_timeout("outcome", async {
        for c in confirms {
            crate::connect::check_confirm(c.await, "outcome")?;
        }
        Ok(())
    })
    .await
}
