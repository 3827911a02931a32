//! `warren topology show|apply`.

use warren_core::topology::TopologyPlan;
use warren_core::Config;

use crate::cli::TopologyAction;

pub async fn run(config: &Config, action: TopologyAction) -> anyhow::Result<i32> {
    let plan = TopologyPlan::from_config(config);
    match action {
        TopologyAction::Show => print!("{}", plan.render()),
        TopologyAction::Apply => {
            let conn = super::connect(config, "topology").await?;
            let report = warren_scheduler::reconcile(&conn, config).await?;
            let _ = conn.close(200, "done".into()).await;
            println!(
                "topology applied on {}: {} exchanges, {} queues, {} bindings ({} stale bindings removed)",
                config.broker.url,
                report.exchanges,
                report.queues,
                report.bindings,
                report.stale_bindings_removed
            );
        }
    }
    Ok(0)
}
