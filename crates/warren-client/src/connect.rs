use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use warren_core::config::BrokerConfig;

use tracing::{info, warn};

use crate::ClientError;

/// This process as events name it: `host/pid`.
pub fn process_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}/{}", std::process::id())
}

/// A readable connection name for the management console: `warren <role> host/pid`.
pub fn connection_name(role: &str) -> String {
    format!("warren {role} {}", process_identity())
}

/// Opens one connection to a node of `broker`, named for the console:
/// over TLS, with the `[broker]` TLS settings, for an `amqps://` URL.
///
/// With several nodes in `broker.url`, the nodes are tried in order, each
/// for at most `broker.connect_timeout_ms`, starting at this process's
/// current node: the one it last connected to, or, after that connection
/// failed, the node after it; before any connection, the node at
/// (process id mod node count), so that a fleet spreads over the cluster.
/// The first node that answers is used and logged; when none does, the
/// error names each node's failure, and the caller's reconnect loop waits
/// (its backoff) before the next round.
///
/// The connection takes the broker's `frame_max` (128 KiB on RabbitMQ unless
/// `broker.url` sets a `frame_max` query parameter): an AMQP header frame
/// cannot be split, so a consumer that asked for smaller frames would have
/// its connection closed by any message whose headers the broker accepted
/// but that did not fit, again at every redelivery.
pub async fn connect(broker: &BrokerConfig, role: &str) -> Result<Connection, ClientError> {
    let _ = CONFIRM_TIMEOUT.set(Duration::from_millis(broker.publish_timeout_ms.max(1)));
    let props = ConnectionProperties::default().with_connection_name(connection_name(role).into());
    let nodes = broker.url.nodes();
    let n = nodes.len();
    if n == 0 {
        return Err(ClientError::InvalidRequest(
            "broker.url lists no node: give at least one AMQP URI".into(),
        ));
    }
    if n == 1 {
        return connect_node(broker, 0, props).await;
    }
    let timeout = Duration::from_millis(broker.connect_timeout_ms.max(1));
    let start = current_node().load(Ordering::Relaxed) % n;
    let mut failures = Vec::with_capacity(n);
    for k in 0..n {
        let i = (start + k) % n;
        let url = nodes[i].redacted();
        let attempt = tokio::time::timeout(timeout, connect_node(broker, i, props.clone())).await;
        match attempt {
            Ok(Ok(conn)) => {
                current_node().store(i, Ordering::Relaxed);
                info!(role, node = %url, "connected to broker node {} of {n}", i + 1);
                follow_node(&conn, i, n);
                return Ok(conn);
            }
            Ok(Err(e)) => {
                warn!(role, node = %url, error = %e, "broker node unreachable; trying the next");
                failures.push((url, e));
            }
            Err(_) => {
                warn!(role, node = %url, ?timeout, "broker node did not answer; trying the next");
                failures.push((
                    url,
                    ClientError::Closed(format!("no answer within {timeout:?}")),
                ));
            }
        }
        // The next connection starts after the node that failed.
        current_node().store((i + 1) % n, Ordering::Relaxed);
    }
    // A setting problem on every node (TLS) stops the caller; one node
    // merely down leaves the others worth retrying.
    if failures.iter().all(|(_, e)| e.is_setting_problem()) {
        return Err(failures.swap_remove(0).1);
    }
    Err(ClientError::NoNode(
        failures
            .iter()
            .map(|(url, e)| format!("{url}: {e}"))
            .collect::<Vec<_>>()
            .join("; "),
    ))
}

/// Opens one connection to node `index` of `broker.url`.
async fn connect_node(
    broker: &BrokerConfig,
    index: usize,
    props: ConnectionProperties,
) -> Result<Connection, ClientError> {
    let url = &broker.url.nodes()[index];
    if url.is_tls() {
        return crate::tls::connect(broker, index, props).await;
    }
    Connection::connect(url.expose(), props)
        .await
        .map_err(|source| ClientError::Connect {
            url: url.redacted(),
            source,
        })
}

/// The index (modulo the node count) of the node this process connects to
/// first; it starts at the process id, so a fleet spreads over the nodes.
fn current_node() -> &'static AtomicUsize {
    static NODE: OnceLock<AtomicUsize> = OnceLock::new();
    NODE.get_or_init(|| AtomicUsize::new(std::process::id() as usize))
}

/// Moves this process's current node past node `index` (of `n`) when
/// `conn` fails (its socket, a missed heartbeat, or the broker closing the
/// connection; not a channel the broker closed), so the reconnect that
/// follows tries the next node first rather than the one that went away.
fn follow_node(conn: &Connection, index: usize, n: usize) {
    let mut events = conn.events_listener();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let lapin::Event::Error(e) = event else {
                continue;
            };
            let lost = e.is_io_error()
                || e.is_amqp_hard_error()
                || matches!(e.kind(), lapin::ErrorKind::MissingHeartbeatError);
            if lost {
                let _ = current_node().compare_exchange(
                    index,
                    (index + 1) % n,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                break;
            }
        }
    });
}

/// How often [`connection_gone`] looks at a connection's state.
const GONE_POLL: Duration = Duration::from_millis(250);

/// Resolves once `conn` is no longer open (its socket failed, a heartbeat
/// was missed, the broker or this process closed it). A session selects on
/// it beside its own work, so that losing the connection ends the session
/// even when none of its operations reports the loss (lapin's connection
/// events go to one listener only, so the state is polled instead).
pub async fn connection_gone(conn: &Connection) {
    while conn.status().connected() {
        tokio::time::sleep(GONE_POLL).await;
    }
}

/// A channel in confirm mode: every publication returns a confirm future.
#[derive(Clone, Debug)]
pub struct ConfirmChannel {
    channel: Channel,
}

impl ConfirmChannel {
    /// Opens a channel on `conn` and enables publisher confirms.
    pub async fn open(conn: &Connection) -> Result<Self, ClientError> {
        let channel = conn
            .create_channel()
            .await
            .map_err(ClientError::amqp("open channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(ClientError::amqp("enable publisher confirms"))?;
        Ok(Self { channel })
    }

    /// The underlying channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Whether the channel can still be used.
    pub fn is_usable(&self) -> bool {
        self.channel.status().connected()
    }

    /// Sends one message; the returned future resolves when the broker confirms it.
    /// The routing key may be given owned, so it is not copied again.
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: impl Into<String>,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm, ClientError> {
        let options = BasicPublishOptions::default();
        self.send_with(options, exchange, routing_key, body, properties)
            .await
    }

    /// Sends one message with the `mandatory` flag: a message no queue takes
    /// comes back in the confirm (see [`Confirmation::take_message`]) instead
    /// of being dropped.
    ///
    /// [`Confirmation::take_message`]: lapin::publisher_confirm::Confirmation::take_message
    pub async fn send_mandatory(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm, ClientError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        self.send_with(options, exchange, routing_key, body, properties)
            .await
    }

    async fn send_with(
        &self,
        options: BasicPublishOptions,
        exchange: &str,
        routing_key: impl Into<String>,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm, ClientError> {
        let routing_key: String = routing_key.into();
        let len = routing_key.len();
        let routing_key = ShortString::try_new(routing_key).map_err(|_| {
            ClientError::InvalidRequest(format!("routing key of {len} bytes is longer than 255"))
        })?;
        self.channel
            .basic_publish(exchange.into(), routing_key, options, body, properties)
            .await
            // The error's text is built only on failure: this runs per message.
            .map_err(|source| ClientError::Amqp {
                what: format!("publish to {exchange}"),
                source,
            })
    }

    /// Closes the channel: every later publication on it fails.
    pub async fn close(&self) {
        let _ = self.channel.close(200, "closed by Warren".into()).await;
    }

    /// Sends one message and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        what: &str,
    ) -> Result<(), ClientError> {
        let confirm = self.send(exchange, routing_key, body, properties).await?;
        confirmed(confirm, what).await
    }
}

/// How long a process waits for one publisher confirm: its
/// `broker.publish_timeout_ms`, set by its first [`connect`].
static CONFIRM_TIMEOUT: OnceLock<Duration> = OnceLock::new();

/// How long a process waits for one publisher confirm (its
/// `broker.publish_timeout_ms`): also the bound on a session's wind-down.
pub fn publish_timeout() -> Duration {
    *CONFIRM_TIMEOUT.get_or_init(|| Duration::from_millis(30_000))
}

/// Awaits a confirm; a negative one is an error naming `what`, and so is
/// none within `broker.publish_timeout_ms` while the connection lives: a
/// quorum queue whose leader died can leave a publication unconfirmed for
/// good (RabbitMQ 3.10 does not always send it again to the new leader).
/// The caller then hands its delivery back, and the work is done again.
pub(crate) async fn confirmed(confirm: PublisherConfirm, what: &str) -> Result<(), ClientError> {
    within_publish_timeout(what, async { check_confirm(confirm.await, what) }).await
}

/// Runs `confirms` (awaiting publisher confirms) under one
/// `broker.publish_timeout_ms` bound: one timer, however many confirms.
pub(crate) async fn within_publish_timeout(
    what: &str,
    confirms: impl std::future::Future<Output = Result<(), ClientError>>,
) -> Result<(), ClientError> {
    let timeout = publish_timeout();
    match tokio::time::timeout(timeout, confirms).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Unconfirmed {
            what: what.to_owned(),
            attempts: 1,
            timeout,
            last: "no confirm while the connection stayed open".into(),
        }),
    }
}

/// A confirm as an outcome: a negative one, or none, is an error naming `what`.
pub(crate) fn check_confirm(
    c: Result<lapin::Confirmation, lapin::Error>,
    what: &str,
) -> Result<(), ClientError> {
    // The error's text is built only on failure: this runs once per message.
    let c = c.map_err(|source| ClientError::Amqp {
        what: format!("confirm of {what}"),
        source,
    })?;
    if c.is_nack() {
        return Err(ClientError::Nacked {
            task_id: what.to_owned(),
        });
    }
    if !c.is_ack() {
        // Only a channel without confirms answers so; never taken for one.
        return Err(ClientError::Closed(format!(
            "{what}: no publisher confirm (confirms not enabled)"
        )));
    }
    Ok(())
}
