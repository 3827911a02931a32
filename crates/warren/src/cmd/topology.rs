//! `warren topology show|apply|migrate|permissions`.

use warren_core::permissions::{Permissions, Role};
use warren_core::topology::TopologyPlan;
use warren_core::Config;

use crate::cli::TopologyAction;

pub async fn run(config: &Config, action: TopologyAction) -> anyhow::Result<i32> {
    let plan = TopologyPlan::from_config(config);
    match action {
        TopologyAction::Show => print!("{}", plan.render()),
        TopologyAction::Permissions { role, user, vhost } => {
            let role: Role = role.parse()?;
            let user = user.unwrap_or_else(|| format!("{}-{role}", config.prefix));
            let vhost = vhost.unwrap_or_else(|| config.broker.url.vhost());
            println!(
                "{}",
                Permissions::for_role(config, role).set_permissions_command(&vhost, &user)
            );
        }
        TopologyAction::Migrate => {
            let conn = super::connect(config, "topology").await?;
            let report = warren_scheduler::migrate(&conn, config).await?;
            let _ = conn.close(200, "done".into()).await;
            for (queue, moved) in &report.migrated {
                println!("queue {queue} redeclared, {moved} messages moved out and back");
            }
            if report.resumed > 0 {
                println!(
                    "{} messages moved back from holding queues of an earlier run",
                    report.resumed
                );
            }
            println!(
                "topology migrated on {}: {} queues redeclared; {} exchanges, {} queues, {} bindings applied",
                config.broker.url,
                report.migrated.len(),
                report.applied.exchanges,
                report.applied.queues,
                report.applied.bindings
            );
        }
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
