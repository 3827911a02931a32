//! Keeping pauses past the cancels stream's retention.
//!
//! Pause and resume records live in the cancels stream, which forgets what
//! is older than `scheduler.cancel_ttl_ms`; a pause must hold until it is
//! resumed. So every scheduler re-publishes the latest record of every
//! target it knows, with its original time, when it starts and then every
//! quarter of `cancel_ttl_ms`: by the latest-time rule a re-published record
//! never undoes a newer one, and a target stays known while some scheduler
//! runs at least once in any three quarters of `cancel_ttl_ms`.

use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use warren_client::runtime::{confirm_all, connect, CancelSet, ConfirmChannel};
use warren_client::ClientError;
use warren_core::Config;

use crate::metrics::SchedulerMetrics;

/// How often the records are re-published: a quarter of the stream's
/// retention, at least a second.
pub(crate) fn renew_every(cancel_ttl_ms: u64) -> Duration {
    Duration::from_millis((cancel_ttl_ms / 4).max(1000))
}

/// Re-publishes the known pause and resume records now and every
/// [`renew_every`], until `shutdown`. A failed round is tried again after
/// `broker.reconnect_max_ms`.
pub(crate) async fn renew(
    config: Config,
    cancels: CancelSet,
    metrics: Arc<SchedulerMetrics>,
    shutdown: CancellationToken,
) {
    let every = renew_every(config.scheduler.cancel_ttl_ms);
    let again = Duration::from_millis(config.broker.reconnect_max_ms.max(1000));
    loop {
        let wait = match renew_once(&config, &cancels).await {
            Ok(n) => {
                metrics.pause_records_renewed(n);
                if n > 0 {
                    debug!(records = n, "pause records renewed");
                }
                every
            }
            Err(e) => {
                warn!(error = %e, "could not renew the pause records; trying again");
                again.min(every)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn renew_once(config: &Config, cancels: &CancelSet) -> Result<u64, ClientError> {
    // Changes of waiting tasks too: a task may wait longer than the stream
    // keeps its change record.
    let mut records = cancels.pauses().records();
    records.extend(cancels.changes().records());
    if records.is_empty() {
        return Ok(0);
    }
    let conn = connect(&config.broker, "scheduler pauses").await?;
    let ch = ConfirmChannel::open(&conn).await?;
    let control = config.names().control();
    let mut confirms = Vec::new();
    for m in &records {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        confirms.push(ch.send(&control, "", &m.to_json(), props).await?);
    }
    let r = confirm_all(confirms).await;
    let _ = conn.close(200, "renewed".into()).await;
    r.map(|()| records.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_renewed_four_times_per_retention() {
        assert_eq!(renew_every(86_400_000), Duration::from_secs(6 * 3600));
        assert_eq!(renew_every(2000), Duration::from_secs(1));
    }
}
