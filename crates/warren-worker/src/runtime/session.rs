//! One connection's worth of channels and consumers.

use std::sync::Arc;

use futures::stream::{select_all, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use warren_client::runtime::{connect, ConfirmChannel, Outbox};
use warren_client::ClientError;

use super::Shared;

/// One connection's worth of channels. When it dies, in-flight tasks can no
/// longer ack on it: the broker redelivers them, so nothing is lost and no
/// ack is sent twice or on the wrong channel.
pub(super) struct Session {
    conn: Connection,
    consume_channel: lapin::Channel,
    consumer_tags: Vec<String>,
    /// Where every event, reply and copy of this session's tasks is sent.
    pub(super) outbox: Outbox,
}

/// A delivery tagged with the short name of the queue it came from.
pub(super) type Tagged = (Arc<str>, lapin::Result<Delivery>);

/// Tags one consumer's deliveries with its queue.
type TagFn = Box<dyn FnMut(lapin::Result<Delivery>) -> Tagged + Send>;

/// Every consumer of a session merged into one stream.
pub(super) type Deliveries =
    futures::stream::SelectAll<futures::stream::Map<lapin::Consumer, TagFn>>;

impl Session {
    /// Connects, sets the prefetch, opens the confirm channel and consumes
    /// every configured queue.
    pub(super) async fn open(sh: &Shared) -> Result<(Session, Deliveries), ClientError> {
        let conn = connect(&sh.config.broker, "worker").await?;
        let consume_ch = conn
            .create_channel()
            .await
            .map_err(ClientError::amqp("open consume channel"))?;
        consume_ch
            .basic_qos(sh.config.worker.prefetch, BasicQosOptions::default())
            .await
            .map_err(ClientError::amqp("set prefetch"))?;
        let outbox = Outbox {
            channel: ConfirmChannel::open(&conn).await?,
            names: sh.names.clone(),
        };
        let mut consumers = Vec::new();
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
                .map_err(ClientError::amqp(format!(
                    "consume {full} (run `warren topology apply` first?)"
                )))?;
            consumers.push((short.clone(), consumer));
        }
        let consumer_tags = consumers.iter().map(|(_, c)| c.tag().to_string()).collect();
        let session = Session {
            conn,
            consume_channel: consume_ch,
            consumer_tags,
            outbox,
        };
        Ok((session, merge(consumers)))
    }

    /// Stops every consumer: no new deliveries. Prefetched ones not yet
    /// started stay unacknowledged and return to the queue on close.
    pub(super) async fn stop_consuming(&self) {
        for tag in &self.consumer_tags {
            let _ = self
                .consume_channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
    }

    /// Closes the channel and the connection.
    pub(super) async fn close(&self) {
        let _ = self
            .consume_channel
            .close(200, "worker shutting down".into())
            .await;
        let _ = self.conn.close(200, "worker shutting down".into()).await;
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
