//! `warren scheduler`.

use warren_core::Config;

pub async fn run(config: &Config) -> anyhow::Result<i32> {
    let shutdown = crate::shutdown::on_signal()?;
    apply_topology(config, &shutdown).await?;
    let scheduler = warren_scheduler::Scheduler::new(config.clone());
    super::serve_ops(
        "scheduler.listen",
        &config.scheduler.listen,
        scheduler.probe(),
        &shutdown,
    )
    .await?;
    scheduler.run(shutdown).await?;
    Ok(0)
}

/// Applies the configured topology, waiting for the broker to answer (a
/// broker that is down or restarting, with the reconnect backoff between
/// tries, until `shutdown`); a broker user without the permission to
/// declare it (a least-privilege scheduler) checks that it exists instead.
/// A TLS setting problem or a topology the broker refuses (a conflict, a
/// missing object) is an error at once.
pub async fn apply_topology(
    config: &Config,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let max = std::time::Duration::from_millis(config.broker.reconnect_max_ms);
    let mut retry = warren_client::runtime::Reconnect::new("scheduler (topology)", max);
    while retry.ready(shutdown).await {
        let conn = match warren_client::runtime::connect(&config.broker, "scheduler").await {
            Ok(conn) => conn,
            Err(e) if e.is_setting_problem() => return Err(e.into()),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "waiting for the broker to apply the topology"
                );
                retry.lost(&e);
                continue;
            }
        };
        let checked = warren_scheduler::apply_or_verify(&conn, config).await;
        let _ = conn.close(200, "topology applied".into()).await;
        match checked {
            Ok(warren_scheduler::TopologyCheck::Applied(report)) => tracing::info!(
                exchanges = report.exchanges,
                queues = report.queues,
                bindings = report.bindings,
                "topology applied"
            ),
            Ok(warren_scheduler::TopologyCheck::Verified { exchanges, queues }) => {
                tracing::info!(
                    exchanges,
                    queues,
                    "topology found in place (applied by the operator; this user may not \
                     declare it)"
                )
            }
            // The connection was lost while declaring: declare again.
            Err(warren_scheduler::TopologyError::Broker { source, .. })
                if !source.is_amqp_soft_error() =>
            {
                retry.lost(&source);
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        return Ok(());
    }
    Ok(())
}
