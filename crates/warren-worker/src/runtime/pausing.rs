//! Paused work queues and task types, on the worker's side.
//!
//! A paused work queue is simply not consumed (nor its lanes); what the
//! worker had prefetched from it goes back to it unstarted. A paused task
//! type may share its queue with types that keep running, so its tasks are
//! parked in `P.paused.<type>`, where they wait in the broker, each marked
//! with the queue it came from (`x-warren-paused-from`); when the type is
//! resumed every worker that reads the resume moves them back there
//! ([`move_back`]). Nothing is requeued in a loop: a parked task is not
//! seen again until its type is resumed.

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warren_client::ClientError;
use warren_core::event::new_id;
use warren_core::headers;
use warren_core::task::task_type_of;

use super::attempt::meta_of;
use super::session::Session;
use super::Shared;

/// The task type of a delivery, as an attempt of it would read it.
pub(super) fn type_of(sh: &Shared, d: &Delivery) -> String {
    let routing = [
        sh.routing_exchanges[0].as_str(),
        sh.routing_exchanges[1].as_str(),
    ];
    task_type_of(&meta_of(d), &routing)
}

/// Moves the tasks parked in `P.paused.<task_type>` back to the queues they
/// came from, until that queue is empty, the type is paused again, or
/// `stop`. Several workers may do it at once: each parked task goes to one
/// of them. A task whose queue is gone goes to `P.tasks` under its type.
pub(super) async fn move_back(
    sh: &Shared,
    session: &Session,
    task_type: &str,
    stop: Option<&CancellationToken>,
) {
    let hold = sh.names.paused_type(task_type);
    match move_all(sh, session, task_type, &hold, stop).await {
        Ok(0) => {}
        Ok(n) => info!(
            r#type = task_type,
            moved = n,
            "resumed: parked tasks moved back to their queues"
        ),
        Err(e) => {
            warn!(r#type = task_type, error = %e, "moving parked tasks back stopped; the next resume or worker start moves the rest")
        }
    }
}

async fn move_all(
    sh: &Shared,
    session: &Session,
    task_type: &str,
    hold: &str,
    stop: Option<&CancellationToken>,
) -> Result<u64, ClientError> {
    let ch = session
        .conn
        .create_channel()
        .await
        .map_err(ClientError::amqp("open a channel"))?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    if ch
        .queue_declare(hold.into(), passive, FieldTable::default())
        .await
        .is_err()
    {
        // Never declared: nothing of this type was parked.
        return Ok(0);
    }
    let mut moved = 0;
    while !stop.is_some_and(CancellationToken::is_cancelled) && !sh.cancels.type_paused(task_type) {
        let Some(m) = ch
            .basic_get(hold.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(ClientError::amqp(format!("get from {hold}")))?
        else {
            break;
        };
        let d = m.delivery;
        let mut h = d.properties.headers().clone().unwrap_or_default();
        let from = headers::get_str(Some(&h), headers::PAUSED_FROM);
        headers::remove(&mut h, &[headers::PAUSED_FROM]);
        let id = d
            .properties
            .message_id()
            .as_ref()
            .map_or_else(new_id, |s| s.as_str().to_owned());
        let tasks = sh.names.tasks();
        let (exchange, key) = match &from {
            Some(q) if !q.is_empty() => ("", q.as_str()),
            _ => (tasks.as_str(), task_type),
        };
        let sent = session
            .outbox
            .copy_to(exchange, key, &d.data, &d.properties, h, task_type, &id)
            .await;
        if let Err(e) = sent {
            // Left parked; the next resume or worker start tries again.
            let _ = d
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
            let _ = ch.close(200, "bye".into()).await;
            return Err(e);
        }
        d.acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(ClientError::amqp(format!("ack in {hold}")))?;
        sh.metrics.moved_back();
        moved += 1;
    }
    let _ = ch.close(200, "bye".into()).await;
    Ok(moved)
}
