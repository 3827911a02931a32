//! One connection's worth of channels and consumers.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::stream::{select_all, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::Connection;
use warren_client::runtime::{connect, ConfirmChannel, Outbox};
use warren_client::ClientError;
use warren_core::topology::{field_table, paused_type_queue_arguments};

use super::acks::Acks;
use super::{Shared, Source};

/// One connection's worth of channels. When it dies, in-flight tasks can no
/// longer ack on it: the broker redelivers them, so nothing is lost and no
/// ack is sent twice or on the wrong channel.
pub(super) struct Session {
    pub(super) conn: Connection,
    consume_channel: lapin::Channel,
    /// The acks of the deliveries of `consume_channel`.
    pub(super) acks: Acks,
    /// The consumers now open: tag, and the index of their queue in
    /// [`Shared::sources`]; none while paused.
    consumer_tags: Mutex<Vec<(String, usize)>>,
    /// How many times consuming was resumed (a suffix of the new tags).
    resumed: std::sync::atomic::AtomicU64,
    /// Where every event, reply and copy of this session's tasks is sent.
    pub(super) outbox: Outbox,
    /// The `P.paused.<type>` queues declared on this connection.
    holds: Mutex<HashSet<String>>,
}

/// A delivery tagged with the queue it came from.
pub(super) type Tagged = (Arc<Source>, lapin::Result<Delivery>);

/// Tags one consumer's deliveries with its queue.
type TagFn = Box<dyn FnMut(lapin::Result<Delivery>) -> Tagged + Send>;

/// One consumer's deliveries, tagged with its queue.
pub(super) type Consuming = futures::stream::Map<lapin::Consumer, TagFn>;

/// Every consumer of a session merged into one stream.
pub(super) type Deliveries = futures::stream::SelectAll<Consuming>;

impl Session {
    /// Connects, sets the prefetch, opens the confirm channel and consumes
    /// every configured queue.
    pub(super) async fn open(sh: &Shared) -> Result<(Session, Deliveries), ClientError> {
        let conn = connect(&sh.config.broker, "worker").await?;
        let consume_ch = conn
            .create_channel()
            .await
            .map_err(ClientError::amqp("open consume channel"))?;
        let outbox = Outbox {
            channel: ConfirmChannel::open(&conn).await?,
            names: sh.names.clone(),
        };
        let session = Session {
            conn,
            acks: Acks::new(consume_ch.clone()),
            consume_channel: consume_ch,
            consumer_tags: Mutex::new(Vec::new()),
            resumed: Default::default(),
            outbox,
            holds: Mutex::default(),
        };
        let consumers = session.consume(sh, sh.config.worker.prefetch, "").await?;
        Ok((session, select_all(consumers)))
    }

    /// Opens one consumer on every configured queue not consumed now and
    /// not paused (with its work queue, fleet-wide), tagged with `suffix`, each a stream of deliveries tagged with its
    /// queue. The consumers of work queues and lane entries take `prefetch`
    /// (RabbitMQ applies a `basic.qos` to the consumers opened after it);
    /// those of lanes take [`Shared::lane_prefetch`], about what the slots
    /// can start, so the backlog stays in the broker, sorted by lane.
    async fn consume(
        &self,
        sh: &Shared,
        prefetch: u16,
        suffix: &str,
    ) -> Result<Vec<Consuming>, ClientError> {
        let open: Vec<usize> = self
            .consumer_tags
            .lock()
            .expect("tags lock")
            .iter()
            .map(|(_, i)| *i)
            .collect();
        let mut consumers = Vec::new();
        for lanes in [false, true] {
            let todo: Vec<usize> = (0..sh.sources.len())
                .filter(|i| {
                    let s = &sh.sources[*i];
                    s.is_lane() == lanes && !open.contains(i) && !sh.cancels.queue_paused(&s.short)
                })
                .collect();
            if todo.is_empty() {
                continue;
            }
            let qos = if lanes {
                sh.lane_prefetch(prefetch)
            } else {
                prefetch
            };
            self.consume_channel
                .basic_qos(qos, BasicQosOptions::default())
                .await
                .map_err(ClientError::amqp("set prefetch"))?;
            for i in todo {
                let source = sh.sources[i].clone();
                let tag = format!(
                    "{}.worker.{}.{}{suffix}",
                    sh.names.prefix(),
                    source.label(),
                    sh.identity.replace('/', "-")
                );
                let full = &source.full;
                let consumer = self
                    .consume_channel
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
                self.consumer_tags
                    .lock()
                    .expect("tags lock")
                    .push((consumer.tag().to_string(), i));
                let tag: TagFn = Box::new(move |d| (source.clone(), d));
                consumers.push(consumer.map(tag));
            }
        }
        Ok(consumers)
    }

    /// Consumes again after [`Session::stop_consuming`] with `prefetch`,
    /// adding the new consumers to `stream`.
    pub(super) async fn resume(
        &self,
        sh: &Shared,
        stream: &mut Deliveries,
        prefetch: u16,
    ) -> Result<(), ClientError> {
        let n = 1 + self
            .resumed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for c in self.consume(sh, prefetch, &format!(".{n}")).await? {
            stream.push(c);
        }
        Ok(())
    }

    /// True while the connection is open.
    pub(super) fn connected(&self) -> bool {
        self.conn.status().connected()
    }

    /// Stops every consumer: no new deliveries. Prefetched ones not yet
    /// started stay unacknowledged and return to the queue on close.
    pub(super) async fn stop_consuming(&self) {
        self.stop_where(|_| true).await;
    }

    /// Stops the consumers of what runs (work queues and lanes) and keeps
    /// those of lane entries: while every slot is busy, the worker goes on
    /// sorting what arrives into lanes.
    pub(super) async fn stop_running(&self, sh: &Shared) {
        self.stop_where(|i| !sh.sources[i].sorts()).await;
    }

    /// Stops the consumers of the work queues paused now, and of their
    /// lanes.
    pub(super) async fn stop_paused(&self, sh: &Shared) {
        self.stop_where(|i| sh.cancels.queue_paused(&sh.sources[i].short))
            .await;
    }

    /// Declares `P.paused.<type>` (`queue`) once per connection, on a
    /// channel of its own (a refused declaration closes its channel).
    pub(super) async fn declare_hold(&self, sh: &Shared, queue: &str) -> Result<(), ClientError> {
        if self.holds.lock().expect("holds lock").contains(queue) {
            return Ok(());
        }
        let ch = self
            .conn
            .create_channel()
            .await
            .map_err(ClientError::amqp("open a channel"))?;
        let declared = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                field_table(&paused_type_queue_arguments(&sh.config)),
            )
            .await
            .map_err(ClientError::amqp(format!("declare {queue}")));
        let _ = ch.close(200, "declared".into()).await;
        declared?;
        self.holds
            .lock()
            .expect("holds lock")
            .insert(queue.to_owned());
        Ok(())
    }

    async fn stop_where(&self, stop: impl Fn(usize) -> bool) {
        let tags: Vec<String> = {
            let mut open = self.consumer_tags.lock().expect("tags lock");
            let (gone, kept) = std::mem::take(&mut *open)
                .into_iter()
                .partition(|(_, i)| stop(*i));
            *open = kept;
            gone.into_iter().map(|(tag, _)| tag).collect()
        };
        for tag in &tags {
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
