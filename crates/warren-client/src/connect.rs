use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use warren_core::config::BrokerConfig;

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

/// Opens one connection to the broker of `broker`, named for the console:
/// over TLS, with the `[broker]` TLS settings, for an `amqps://` URL.
///
/// The connection takes the broker's `frame_max` (128 KiB on RabbitMQ unless
/// `broker.url` sets a `frame_max` query parameter): an AMQP header frame
/// cannot be split, so a consumer that asked for smaller frames would have
/// its connection closed by any message whose headers the broker accepted
/// but that did not fit, again at every redelivery.
pub async fn connect(broker: &BrokerConfig, role: &str) -> Result<Connection, ClientError> {
    let props = ConnectionProperties::default().with_connection_name(connection_name(role).into());
    if broker.uses_tls() {
        return crate::tls::connect(broker, props).await;
    }
    Connection::connect(broker.url.expose(), props)
        .await
        .map_err(|source| ClientError::Connect {
            url: broker.url.redacted(),
            source,
        })
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
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm, ClientError> {
        let routing_key = ShortString::try_new(routing_key).map_err(|_| {
            ClientError::InvalidRequest(format!(
                "routing key of {} bytes is longer than 255",
                routing_key.len()
            ))
        })?;
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key,
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .map_err(ClientError::amqp(format!("publish to {exchange}")))
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
        let routing_key = ShortString::try_new(routing_key).map_err(|_| {
            ClientError::InvalidRequest(format!(
                "routing key of {} bytes is longer than 255",
                routing_key.len()
            ))
        })?;
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        self.channel
            .basic_publish(exchange.into(), routing_key, options, body, properties)
            .await
            .map_err(ClientError::amqp(format!("publish to {exchange}")))
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

/// Awaits a confirm; a negative one is an error naming `what`.
pub(crate) async fn confirmed(confirm: PublisherConfirm, what: &str) -> Result<(), ClientError> {
    // The error's text is built only on failure: this runs once per message.
    let c = confirm.await.map_err(|source| ClientError::Amqp {
        what: format!("confirm of {what}"),
        source,
    })?;
    if c.is_nack() {
        return Err(ClientError::Nacked {
            task_id: what.to_owned(),
        });
    }
    Ok(())
}
