use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::stream::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{FieldTable, ShortString};
use tokio::sync::Mutex;
use warren_core::config::{BrokerConfig, BrokerUrl, Config};
use warren_core::{Event, Names};

use crate::connect::{confirmed, ConfirmChannel};
use crate::{ClientError, EventWatch, TaskRequest};

/// The client's connections, made by [`Connector`].
type Pool = deadpool::managed::Pool<Connector>;
type PoolError = deadpool::managed::PoolError<ClientError>;

/// Makes the pool's connections with [`connect`](crate::runtime::connect),
/// so they honour the `[broker]` TLS settings, and drops closed ones.
struct Connector(BrokerConfig);

impl deadpool::managed::Manager for Connector {
    type Type = lapin::Connection;
    type Error = ClientError;

    async fn create(&self) -> Result<lapin::Connection, ClientError> {
        crate::connect::connect(&self.0, "client").await
    }

    async fn recycle(
        &self,
        conn: &mut lapin::Connection,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<ClientError> {
        if conn.status().connected() {
            Ok(())
        } else {
            Err(deadpool::managed::RecycleError::message(format!(
                "connection to {} closed",
                self.0.url.redacted()
            )))
        }
    }
}

/// The queue name RabbitMQ gives direct reply-to.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Publishes tasks with publisher confirms over a pool of connections.
///
/// Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Client {
    pool: Pool,
    url: BrokerUrl,
    names: Names,
    channels: Vec<Mutex<Option<ConfirmChannel>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.url)
            .field("prefix", &self.names.prefix())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the broker of `config` and checks that it answers.
    pub async fn connect(config: &Config) -> Result<Self, ClientError> {
        let size = config.broker.pool_size.max(1);
        let timeout = Some(Duration::from_millis(config.broker.connect_timeout_ms));
        let pool = Pool::builder(Connector(config.broker.clone()))
            .max_size(size)
            .timeouts(deadpool::managed::Timeouts {
                wait: timeout,
                create: timeout,
                recycle: timeout,
            })
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| ClientError::Pool(e.to_string()))?;
        let client = Client {
            pool,
            url: config.broker.url.clone(),
            names: config.names(),
            channels: (0..size).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        };
        client.channel().await?;
        Ok(client)
    }

    /// The names of this client's topology.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// A confirm channel from the round-robin set, reopened if it died.
    pub async fn channel(&self) -> Result<ConfirmChannel, ClientError> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        let mut guard = self.channels[slot].lock().await;
        if let Some(ch) = guard.as_ref().filter(|c| c.is_usable()) {
            return Ok(ch.clone());
        }
        let conn = self.connection().await?;
        let ch = ConfirmChannel::open(&conn).await?;
        *guard = Some(ch.clone());
        Ok(ch)
    }

    /// A connection of the pool, opened if needed.
    async fn connection(&self) -> Result<deadpool::managed::Object<Connector>, ClientError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => e,
            other => ClientError::Pool(format!("{other} (broker {})", self.url.redacted())),
        })
    }

    /// Publishes one task to `P.tasks` and waits for the broker's confirm.
    /// Returns the task id.
    pub async fn publish(&self, req: &TaskRequest) -> Result<String, ClientError> {
        let (id, body, props) = req.encode()?;
        let ch = self.channel().await?;
        ch.publish(
            &req.exchange(&self.names),
            &req.task_type,
            &body,
            props,
            &id,
        )
        .await?;
        Ok(id)
    }

    /// Publishes many tasks in request order, keeping up to `window` of them
    /// in flight, and waits for every confirm. `progress` is called with the
    /// count confirmed so far. Returns the task ids in request order.
    ///
    /// Every request is checked before the first is sent, so a bad one
    /// publishes nothing. Sends are pipelined as well as confirms: lapin hands
    /// each publication to its connection thread and reports when it was
    /// written, and awaiting that one message at a time costs a thread
    /// round trip per message. With up to `window` sends outstanding the
    /// connection thread writes many per wake-up.
    pub async fn publish_batch(
        &self,
        reqs: &[TaskRequest],
        window: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<String>, ClientError> {
        for req in reqs {
            req.check()?;
        }
        let ch = self.channel().await?;
        // The two exchange names, built once rather than per message.
        let (tasks, delay) = (self.names.tasks(), self.names.delay());
        let mut sends = futures::stream::iter(reqs)
            .map(|req| {
                let (ch, exchange) = (&ch, if req.is_delayed() { &delay } else { &tasks });
                async move {
                    // Checked above, before the first send.
                    let (id, body, props) = req.build()?;
                    ch.publish(exchange, &req.task_type, &body, props, &id)
                        .await?;
                    Ok::<_, ClientError>(id)
                }
            })
            // Futures are first polled in request order, and each first poll
            // numbers its message and queues its frames in one step.
            .buffered(window.max(1));
        let mut ids = Vec::with_capacity(reqs.len());
        while let Some(id) = sends.next().await {
            ids.push(id?);
            progress(ids.len());
        }
        Ok(ids)
    }

    /// Publishes a task with `reply_to` = direct reply-to and waits for its
    /// final event (`succeeded`, `dead` or `cancelled`).
    pub async fn call(&self, req: &TaskRequest, timeout: Duration) -> Result<Event, ClientError> {
        let (id, body, props) = req.encode()?;
        let conn = self.connection().await?;
        let ch = ConfirmChannel::open(&conn).await?;
        drop(conn);
        let mut replies = ch
            .channel()
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                ShortString::from(format!("{}.call.{id}", self.names.prefix())),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(ClientError::amqp("consume direct reply-to"))?;
        let props = props
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(id.as_str().into());
        ch.publish(
            &req.exchange(&self.names),
            &req.task_type,
            &body,
            props,
            &id,
        )
        .await?;
        let wait = async {
            while let Some(delivery) = replies.next().await {
                let delivery = delivery.map_err(ClientError::amqp("receive reply"))?;
                let matches = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .is_some_and(|c| c.as_str() == id);
                if let (true, Ok(event)) = (matches, Event::from_json(&delivery.data)) {
                    return Ok(event);
                }
            }
            Err(ClientError::Closed("reply consumer".into()))
        };
        let out = tokio::time::timeout(timeout, wait).await;
        let _ = ch.channel().close(200, "call done".into()).await;
        out.map_err(|_| ClientError::Timeout {
            task_id: id.clone(),
            timeout,
        })?
    }

    /// Publishes raw bytes to any exchange with confirms (tests, replay, tools).
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: lapin::BasicProperties,
    ) -> Result<(), ClientError> {
        let ch = self.channel().await?;
        let confirm = ch
            .channel()
            .basic_publish(
                exchange.into(),
                ShortString::try_new(routing_key).map_err(|_| {
                    ClientError::InvalidRequest("routing key longer than 255 bytes".into())
                })?,
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .map_err(ClientError::amqp(format!("publish to {exchange}")))?;
        confirmed(confirm, routing_key).await
    }

    /// Cancels a task: publishes `{"cancel": id}` to `P.control` and waits
    /// for the broker's confirm. A queued, delayed or retry-waiting task is
    /// dropped when next seen; a running one is aborted.
    pub async fn cancel(&self, task_id: &str) -> Result<(), ClientError> {
        let props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        self.publish_raw(
            &self.names.control(),
            "",
            &crate::cancel_command(task_id),
            props,
        )
        .await
    }

    /// Follows events on `P.events` matching any of `patterns`
    /// (e.g. `succeeded.#`, `*.diag.echo`). Start it before publishing.
    pub async fn watch(&self, patterns: &[&str]) -> Result<EventWatch, ClientError> {
        let conn = self.connection().await?;
        EventWatch::open(&conn, &self.names, patterns).await
    }
}
