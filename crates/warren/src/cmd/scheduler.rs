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

/// Applies the configured topology, waiting for the broker to answer; a
/// broker user without the permission to declare it (a least-privilege
/// scheduler) checks that it exists instead.
pub async fn apply_topology(config: &Config) -> anyhow::Result<()> {
    let conn = super::connect(config, "scheduler").await?;
    match warren_scheduler::apply_or_verify(&conn, config).await? {
        warren_scheduler::TopologyCheck::Applied(report) => tracing::info!(
            exchanges = report.exchanges,
            queues = report.queues,
            bindings = report.bindings,
            "topology applied"
        ),
        warren_scheduler::TopologyCheck::Verified { exchanges, queues } => tracing::info!(
            exchanges,
            queues,
            "topology found in place (applied by the operator; this user may not declare it)"
        ),
    }
    let _ = conn.close(200, "topology applied".into()).await;
    Ok(())
}
