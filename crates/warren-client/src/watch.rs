use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use warren_core::event::new_id;
use warren_core::{Event, Names};

use crate::ClientError;

/// One event as it arrived, with its AMQP envelope.
#[derive(Debug, Clone)]
pub struct ReceivedEvent {
    /// The decoded body.
    pub event: Event,
    /// The routing key on `P.events`.
    pub routing_key: String,
    /// The message properties.
    pub properties: BasicProperties,
}

/// A private queue bound to `P.events`, deleted when the watch is dropped
/// or its connection closes.
pub struct EventWatch {
    channel: Channel,
    consumer: Consumer,
    queue: String,
}

impl std::fmt::Debug for EventWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventWatch")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl EventWatch {
    pub(crate) async fn open(
        conn: &Connection,
        names: &Names,
        patterns: &[&str],
    ) -> Result<Self, ClientError> {
        let channel = conn
            .create_channel()
            .await
            .map_err(ClientError::amqp("open watch channel"))?;
        let queue = names.watch_queue(&new_id());
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(ClientError::amqp(format!("declare {queue}")))?;
        for p in patterns {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    names.events().into(),
                    (*p).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(ClientError::amqp(format!(
                    "bind {queue} to {}",
                    names.events()
                )))?;
        }
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                queue.as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(ClientError::amqp(format!("consume {queue}")))?;
        Ok(EventWatch {
            channel,
            consumer,
            queue,
        })
    }

    /// The next event, or `None` if none arrives within `timeout`.
    /// Bodies that are not events are skipped.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<ReceivedEvent>, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let item = match tokio::time::timeout_at(deadline, self.consumer.next()).await {
                Err(_) => return Ok(None),
                Ok(None) => return Err(ClientError::Closed(format!("watch {}", self.queue))),
                Ok(Some(item)) => item.map_err(ClientError::amqp("receive event"))?,
            };
            if let Ok(event) = Event::from_json(&item.data) {
                return Ok(Some(ReceivedEvent {
                    event,
                    routing_key: item.routing_key.to_string(),
                    properties: item.properties,
                }));
            }
        }
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let channel = self.channel.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = channel.close(200, "watch done".into()).await;
            });
        }
    }
}
