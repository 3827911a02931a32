use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::stream::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::BasicProperties;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::warn;
use warren_core::config::{BrokerConfig, BrokerUrls, Config};
use warren_core::{Event, Names};

use crate::connect::ConfirmChannel;
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
/// A publication is reported done only once the broker confirmed it. One
/// whose confirm did not come because the channel, its connection or its
/// node was lost is sent again, with the same task id and properties, on a
/// channel of a new connection (to the next node that answers, with several
/// in `broker.url`), until it is confirmed or `broker.publish_timeout_ms`
/// has passed: then it fails with [`ClientError::Unconfirmed`]. This is at
/// least once: the broker may have taken the first copy before the loss, so
/// a task may be queued twice (workers see the same id), never lost. A
/// negative confirm (the broker refused the message) is not retried.
///
/// Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Client {
    pool: Pool,
    url: BrokerUrls,
    names: Names,
    channels: Vec<Mutex<Option<ConfirmChannel>>>,
    next: AtomicUsize,
    /// How long one publication may take, retries included.
    publish_timeout: Duration,
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
        // A connection tries each node for the connect timeout.
        let nodes = config.broker.url.nodes().len().max(1) as u32;
        let timeout = Some(Duration::from_millis(config.broker.connect_timeout_ms) * nodes);
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
            publish_timeout: Duration::from_millis(config.broker.publish_timeout_ms.max(1)),
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

    /// Publishes one task to `P.tasks` (or `P.delay`) and waits for the
    /// broker's confirm, sending it again after a lost connection (see
    /// [`Client`]). Returns the task id.
    pub async fn publish(&self, req: &TaskRequest) -> Result<String, ClientError> {
        let (id, body, props) = req.encode()?;
        let exchange = req.exchange(&self.names);
        self.confirmed_publish(None, &exchange, &req.task_type, &body, &props, &id)
            .await?;
        Ok(id)
    }

    /// Publishes a chain's first task (contract section 8), confirmed;
    /// returns its id, which the steps' default ids extend (`<id>.1`, …).
    pub async fn publish_chain(&self, chain: &crate::Chain) -> Result<String, ClientError> {
        self.publish(&chain.request()?).await
    }

    /// Publishes every member of a group under its workflow id, confirmed;
    /// returns the members' ids (each a chain's first task's), in order.
    /// Every member is checked before the first is sent.
    pub async fn publish_group(&self, group: &crate::Group) -> Result<Vec<String>, ClientError> {
        let reqs = group.requests()?;
        self.publish_batch(&reqs, 256, |_| {}).await
    }

    /// Publishes a chord (contract section 8): its start to `P.chords`, then
    /// its members, every one confirmed; returns the members' ids in order.
    /// The start and every member are checked before anything is sent.
    pub async fn publish_chord(&self, chord: &crate::Chord) -> Result<Vec<String>, ClientError> {
        let start = chord.start()?;
        let reqs = chord.requests()?;
        for req in &reqs {
            req.check()?;
        }
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(chord.id.as_str().into());
        self.confirmed_publish(
            None,
            &self.names.chords(),
            "",
            &start.encode(),
            &props,
            &chord.id,
        )
        .await?;
        self.publish_batch(&reqs, 256, |_| {}).await
    }

    /// Publishes many tasks, keeping up to `window` of them in flight, and
    /// waits for every confirm. `progress` is called with the count
    /// confirmed so far. Returns the task ids in request order.
    ///
    /// Every request is checked before the first is sent, so a bad one
    /// publishes nothing. Sends are pipelined as well as confirms: lapin hands
    /// each publication to its connection thread and reports when it was
    /// written, and awaiting that one message at a time costs a thread
    /// round trip per message. With up to `window` sends outstanding the
    /// connection thread writes many per wake-up. They go out in request
    /// order; a publication whose connection was lost is sent again on its
    /// own (see [`Client`]), so after a loss the broker may queue them in
    /// another order.
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
                    self.confirmed_publish(Some(ch), exchange, &req.task_type, &body, &props, &id)
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

    /// Sends one message and waits for its confirm: first on `first` (or a
    /// channel of the set), then, while the failure is one a new connection
    /// can cure, again on a fresh channel after a short pause, until it is
    /// confirmed or the publish timeout has passed since the first send.
    /// `what` names the message (the task id) in errors.
    async fn confirmed_publish(
        &self,
        first: Option<&ConfirmChannel>,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: &BasicProperties,
        what: &str,
    ) -> Result<(), ClientError> {
        let deadline = Instant::now() + self.publish_timeout;
        let mut pause = Duration::from_millis(50);
        let mut first = first.cloned();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let attempt = async {
                let ch = match first.take() {
                    Some(ch) => ch,
                    None => self.channel().await?,
                };
                ch.publish(exchange, routing_key, body, props.clone(), what)
                    .await
            };
            let error = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) if !retryable(&e) => return Err(e),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no confirm before the deadline".to_owned(),
            };
            let now = Instant::now();
            if now + pause >= deadline {
                return Err(ClientError::Unconfirmed {
                    what: what.to_owned(),
                    attempts,
                    timeout: self.publish_timeout,
                    last: error,
                });
            }
            if attempts == 1 {
                warn!(task_id = what, error = %error, "publication not confirmed; sending it again");
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
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

    /// Publishes raw bytes to any exchange with confirms (tests, replay,
    /// tools), sending them again after a lost connection like
    /// [`Client::publish`].
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: lapin::BasicProperties,
    ) -> Result<(), ClientError> {
        self.confirmed_publish(None, exchange, routing_key, body, &properties, routing_key)
            .await
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

    /// Pauses (`paused = true`) or resumes a work queue or task type
    /// fleet-wide: publishes a pause or resume record stamped now to
    /// `P.control` and waits for the broker's confirm. Workers stop taking
    /// (or take again) its tasks as soon as they read it.
    pub async fn set_paused(
        &self,
        target: &warren_core::pauses::PauseTarget,
        paused: bool,
    ) -> Result<(), ClientError> {
        let props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let (target, at_ms) = (target.clone(), crate::cancels::now_ms());
        let m = if paused {
            warren_core::control::ControlMessage::Pause { target, at_ms }
        } else {
            warren_core::control::ControlMessage::Resume { target, at_ms }
        };
        self.publish_raw(&self.names.control(), "", &m.to_json(), props)
            .await
    }

    /// Changes a waiting task (contract section 5): publishes a change
    /// record stamped now, with its new priority, due time (Unix ms), or
    /// both, to `P.control` and waits for the broker's confirm. Returns the
    /// record's time.
    pub async fn change_task(
        &self,
        task_id: &str,
        priority: Option<u8>,
        due_ms: Option<i64>,
    ) -> Result<i64, ClientError> {
        let props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let at_ms = crate::cancels::now_ms();
        let m = warren_core::control::ControlMessage::Change {
            task_id: task_id.to_owned(),
            at_ms,
            priority,
            due_ms,
        };
        self.publish_raw(&self.names.control(), "", &m.to_json(), props)
            .await?;
        Ok(at_ms)
    }

    /// Follows events on `P.events` matching any of `patterns`
    /// (e.g. `succeeded.#`, `*.diag.echo`). Start it before publishing.
    pub async fn watch(&self, patterns: &[&str]) -> Result<EventWatch, ClientError> {
        let conn = self.connection().await?;
        EventWatch::open(&conn, &self.names, patterns).await
    }
}

/// Whether a failed publication may succeed on a new channel or connection:
/// a lost channel, connection or node, or a broker that did not answer. Not
/// a channel the broker closed for this message (no such exchange, access
/// refused), a negative confirm, a bad request or a setting only a person
/// can fix.
fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { source, .. } | ClientError::Amqp { source, .. } => {
            !source.is_amqp_soft_error()
        }
        ClientError::NoNode(_) | ClientError::Closed(_) | ClientError::Pool(_) => true,
        ClientError::Tls { .. }
        | ClientError::Nacked { .. }
        | ClientError::Unconfirmed { .. }
        | ClientError::Timeout { .. }
        | ClientError::InvalidRequest(_) => false,
    }
}
