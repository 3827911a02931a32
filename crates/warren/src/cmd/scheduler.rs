//! `warren scheduler`.

use warren_core::Config;

pub async fn run(config: &Config) -> anyhow::Result<i32> {
    let shutdown = crate::shutdown::on_signal()?;
    apply_topology(config).await?;
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

/// Applies the configured topology, waiting for the broker to answer.
pub async fn apply_topology(config: &Config) -> anyhow::Result<()> {
    let conn = super::connect(config, "scheduler").await?;
    let report = warren_scheduler::reconcile(&conn, config).await?;
    tracing::info!(
        exchanges = report.exchanges,
        queues = report.queues,
        bindings = report.bindings,
        "topology applied"
    );
    let _ = conn.close(200, "topology applied".into()).await;
    Ok(())
}
