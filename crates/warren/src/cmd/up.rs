//! `warren up`: topology, scheduler and a worker in one process.

use warren_core::Config;
use warren_worker::{Registry, Worker};

pub async fn run(config: Config) -> anyhow::Result<i32> {
    let shutdown = crate::shutdown::on_signal()?;
    super::scheduler::apply_topology(&config).await?;
    let worker = Worker::new(config.clone(), Registry::with_builtins())?;
    let scheduler = warren_scheduler::Scheduler::new(config);
    let (w, s) = tokio::join!(worker.run(shutdown.clone()), async {
        let r = scheduler.run(shutdown.clone()).await;
        // If the scheduler fails, stop the worker too rather than run half a system.
        shutdown.cancel();
        r
    });
    w?;
    s?;
    Ok(0)
}
