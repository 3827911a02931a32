//! One connection's worth of channels and consumers.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::stream::{select_all, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;
use warren_client::runtime::{connect, ConfirmChannel, Outbox};
use warren_client::ClientError;
use warren_core::topology::{field_table, paused_type_queue_arguments, tenant_directory_arguments};

use super::acks::Acks;
use super::{Shared, Source, SourceKind};

/// One connection's worth of channels. When it dies, in-flight tasks can no
/// longer ack on it: the broker redelivers them, so nothing is lost and no
/// ack is sent twice or on the wrong channel.
pub(super) struct Session {
    pub(super) conn: Connection,
    consume_channel: lapin::Channel,
    /// The acks of the deliveries of `consume_channel`.
    pub(super) acks: Acks,
    /// The consumers now open: tag, and their queue (one of
    /// [`Shared::sources`] or a tenant queue); none while paused.
    consumer_tags: Mutex<Vec<(String, Arc<Source>)>>,
    /// How many times consuming was resumed (a suffix of the new tags).
    resumed: std::sync::atomic::AtomicU64,
    /// Where every event, reply and copy of this session's tasks is sent.
    pub(super) outbox: Outbox,
    /// The queues declared on this connection as needed: `P.paused.<type>`
    /// and tenant queues.
    holds: Mutex<HashSet<String>>,
    /// The channels reading tenant directories (never stopped while the
    /// session lives).
    directories: Mutex<Vec<lapin::Channel>>,
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
            directories: Mutex::default(),
        };
        let mut consumers = session.consume(sh, sh.config.worker.prefetch, "").await?;
        consumers.extend(session.read_directories(sh).await?);
        Ok((session, select_all(consumers)))
    }

    /// Reads the tenant directory of every work queue consumed with
    /// `tenants = true`, from its first record, each on a channel of its
    /// own (a stream needs a prefetch and acks). Declares it first, as the
    /// topology does, so a worker started before `warren topology apply`
    /// works too.
    async fn read_directories(&self, sh: &Shared) -> Result<Vec<Consuming>, ClientError> {
        let mut consumers = Vec::new();
        for t in sh.tenants.all() {
            let ch = self
                .conn
                .create_channel()
                .await
                .map_err(ClientError::amqp("open a directory channel"))?;
            let dir = &t.directory;
            ch.queue_declare(
                dir.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                field_table(&tenant_directory_arguments()),
            )
            .await
            .map_err(ClientError::amqp(format!("declare {dir}")))?;
            ch.basic_qos(1000, BasicQosOptions::default())
                .await
                .map_err(ClientError::amqp("set the directory prefetch"))?;
            let mut args = FieldTable::default();
            args.insert(
                "x-stream-offset".into(),
                AMQPValue::LongString("first".into()),
            );
            let consumer = ch
                .basic_consume(
                    dir.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    args,
                )
                .await
                .map_err(ClientError::amqp(format!("read {dir}")))?;
            let source = Arc::new(Source {
                short: t.short().to_owned(),
                full: dir.clone(),
                max_priority: 0,
                kind: SourceKind::Directory,
            });
            let tag: TagFn = Box::new(move |d| (source.clone(), d));
            consumers.push(consumer.map(tag));
            self.directories.lock().expect("directories lock").push(ch);
        }
        Ok(consumers)
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
        let open: HashSet<String> = self
            .consumer_tags
            .lock()
            .expect("tags lock")
            .iter()
            .map(|(_, s)| s.full.clone())
            .collect();
        let mut all = sh.sources.clone();
        all.extend(sh.tenants.sources());
        let mut consumers = Vec::new();
        // Work queues and lane entries, then lanes, then tenant queues: each
        // group with its own prefetch.
        for group in 0..3u8 {
            let todo: Vec<&Arc<Source>> = all
                .iter()
                .filter(|s| {
                    s.group() == group
                        && !open.contains(&s.full)
                        && !sh.cancels.queue_paused(&s.short)
                })
                .collect();
            if todo.is_empty() {
                continue;
            }
            let qos = if group == 0 {
                prefetch
            } else {
                sh.lane_prefetch(prefetch)
            };
            self.consume_channel
                .basic_qos(qos, BasicQosOptions::default())
                .await
                .map_err(ClientError::amqp("set prefetch"))?;
            for source in todo {
                let source = source.clone();
                if let (SourceKind::Tenant, Some(t)) = (&source.kind, sh.tenants.of(&source.short))
                {
                    // Refused (arguments changed since, permissions): not
                    // consumed by this session, rather than no queue at
                    // all; consuming a queue that does not exist would
                    // close the channel of every consumer.
                    if let Err(e) = self.declare_once(&source.full, &t.arguments).await {
                        tracing::warn!(queue = %source.full, error = %e, "cannot declare a tenant queue: not consumed");
                        continue;
                    }
                }
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
                    .push((consumer.tag().to_string(), source.clone()));
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
    pub(super) async fn stop_running(&self) {
        self.stop_where(|s| !s.sorts()).await;
    }

    /// Stops the consumers of the work queues paused now, and of their
    /// lanes.
    pub(super) async fn stop_paused(&self, sh: &Shared) {
        self.stop_where(|s| sh.cancels.queue_paused(&s.short)).await;
    }

    /// Declares `P.paused.<type>` (`queue`) once per connection, on a
    /// channel of its own (a refused declaration closes its channel).
    pub(super) async fn declare_hold(&self, sh: &Shared, queue: &str) -> Result<(), ClientError> {
        self.declare_once(
            queue,
            &field_table(&paused_type_queue_arguments(&sh.config)),
        )
        .await
    }

    /// Declares the durable queue `queue` with `arguments` once per
    /// connection, on a channel of its own (a refused declaration closes
    /// its channel).
    pub(super) async fn declare_once(
        &self,
        queue: &str,
        arguments: &FieldTable,
    ) -> Result<(), ClientError> {
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
                arguments.clone(),
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

    async fn stop_where(&self, stop: impl Fn(&Source) -> bool) {
        let tags: Vec<String> = {
            let mut open = self.consumer_tags.lock().expect("tags lock");
            let (gone, kept) = std::mem::take(&mut *open)
                .into_iter()
                .partition(|(_, s)| stop(s));
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
