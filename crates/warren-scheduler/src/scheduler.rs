//! The scheduler process: consumes its intake queues with reconnect and backoff.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warren_client::{connect, process_identity, ClientError, ConfirmChannel, Outbox};
use warren_core::Config;

use crate::intake::park_dead_lettered;

/// Why the scheduler stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A broker operation failed in a way reconnecting cannot fix.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Applies the time and failure rules of the contract through the broker.
#[derive(Debug)]
pub struct Scheduler {
    config: Config,
    identity: String,
}

impl Scheduler {
    /// A scheduler for `config` (its topology must have been applied).
    pub fn new(config: Config) -> Self {
        Scheduler {
            config,
            identity: process_identity(),
        }
    }

    /// Runs until `shutdown`, reconnecting with backoff when the broker goes away.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), SchedulerError> {
        let max = Duration::from_millis(self.config.worker.reconnect_max_ms.max(100));
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.session(&shutdown).await {
                Ok(()) => break,
                Err(e) => warn!(error = %e, retry_in = ?backoff, "scheduler lost the broker"),
            }
            let jittered = rand::thread_rng().gen_range(backoff / 2..=backoff);
            tokio::select! {
                _ = tokio::time::sleep(jittered) => {}
                _ = shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(max);
        }
        info!("scheduler stopped");
        Ok(())
    }

    /// One connection's life: returns `Ok` on shutdown, `Err` when it died.
    async fn session(&self, shutdown: &CancellationToken) -> Result<(), ClientError> {
        let names = self.config.names();
        let conn = connect(&self.config.broker.url, "scheduler").await?;
        let amqp = |what: &str| {
            let what = what.to_owned();
            move |source| ClientError::Amqp { what, source }
        };
        let ch = conn.create_channel().await.map_err(amqp("open channel"))?;
        ch.basic_qos(64, BasicQosOptions::default())
            .await
            .map_err(amqp("set prefetch"))?;
        let out = Outbox {
            channel: ConfirmChannel::open(&conn).await?,
            names: names.clone(),
        };
        let intake = names.dead_letter_intake();
        let mut dead_letters = ch
            .basic_consume(
                intake.as_str().into(),
                format!(
                    "{}.scheduler.dlx.{}",
                    names.prefix(),
                    self.identity.replace('/', "-")
                )
                .into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp(&format!("consume {intake}")))?;
        info!("scheduler consuming {intake}");
        let result = loop {
            let next = tokio::select! {
                n = dead_letters.next() => n,
                _ = shutdown.cancelled() => break Ok(()),
            };
            let d = match next {
                None => break Err(ClientError::Closed(format!("consumer of {intake}"))),
                Some(Err(source)) => {
                    break Err(ClientError::Amqp {
                        what: format!("consume {intake}"),
                        source,
                    })
                }
                Some(Ok(d)) => d,
            };
            park_dead_lettered(&out, &names, &self.identity, &d).await?;
            d.acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(amqp("ack dead letter"))?;
        };
        let _ = conn.close(200, "scheduler stopping".into()).await;
        result
    }
}
